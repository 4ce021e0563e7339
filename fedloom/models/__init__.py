"""Small reference models, all plain nn.Module, and user models by import path."""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from fedloom.models.leaf import femnist_cnn, shakespeare_lstm
from fedloom.models.resnet import resnet18, resnet20
from fedloom.models.transformer import transformer
from fedloom.registry import OptionError, Registry

GIVEN = "python"  # model.name of a model handed to fedloom.run(model=...)


def logistic(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """Multinomial logistic regression."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), n_classes))


def mlp(input_shape: tuple[int, ...], n_classes: int, hidden: tuple[int, ...] = (64,)) -> nn.Module:
    """Fully connected ReLU network; ``hidden`` lists the hidden widths."""
    widths = [math.prod(input_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], n_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """LeNet-5 style: two conv + pool blocks, then 120-84-classes.

    Padding keeps small inputs (8x8 digits) usable: the spatial size after the
    blocks is computed, not assumed to be MNIST's.
    """
    if len(input_shape) != 3:
        raise ValueError(f"cnn needs image input [channels, height, width], got shape {list(input_shape)}")
    channels, height, width = input_shape
    features = nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
    )
    flat = 16 * (height // 4) * (width // 4)
    return nn.Sequential(
        features, nn.Flatten(),
        nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, n_classes),
    )


def handed_over(**options: Any) -> nn.Module:
    """The factory of ``model.name = "given"``: always an OptionError, since such a model comes from
    ``fedloom.run(model=...)``, not from a config."""
    raise OptionError(f"model.name = {GIVEN!r} is a model handed to fedloom.run(model=...) from Python; give it "
                      "there (resuming such a run needs it again)")


MODELS = Registry("model", {
    "logistic": (logistic, "multinomial logistic regression"),
    "mlp": (mlp, "ReLU MLP; option hidden = [widths]"),
    "cnn": (cnn, "LeNet-5 style CNN for image data [C, H, W]"),
    "resnet20": (resnet20, "CIFAR ResNet-20 (He et al. 2016); options norm = group|batch|none, groups (2)"),
    "resnet18": (resnet18, "CIFAR ResNet-18, 3x3 stem, no max-pool; options norm = group|batch|none, groups (2)"),
    "femnist_cnn": (femnist_cnn, "LEAF's FEMNIST CNN (Caldas et al.), [1, 28, 28] or flat 784"),
    "shakespeare_lstm": (shakespeare_lstm, "LEAF's Shakespeare char LSTM, tokens [T] -> [T, vocab]; serial engine"),
    "transformer": (transformer, "causal transformer LM, tokens [T]; options d_model (64), heads (4), layers (2)"),
    GIVEN: (handed_over, "the model handed to fedloom.run(model=...) from Python"),
}, fixed=("input_shape", "n_classes"))


def build_given_model(factory: Callable[..., Any], input_shape: tuple[int, ...], n_classes: int,
                      options: dict[str, Any]) -> nn.Module:
    """A model class or function handed to ``fedloom.run(model=...)``, built as a registered one is."""
    given = Registry("model", {GIVEN: (factory, "the model handed to fedloom.run")}, fixed=MODELS.fixed)
    return _checked(GIVEN, given.build(GIVEN, options, input_shape=input_shape, n_classes=n_classes))


def build_model(name: str, input_shape: tuple[int, ...], n_classes: int, **options: Any) -> nn.Module:
    """A reference model by name, or a user's class/function by 'pkg.mod:Name'.

    A user model receives the [model] options, plus ``input_shape`` and
    ``n_classes`` when its signature names them.
    """
    return _checked(name, MODELS.build(name, options, input_shape=input_shape, n_classes=n_classes))


def _checked(name: str, model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise OptionError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
