"""Small reference models, all plain nn.Module, and user models by import path."""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable

from torch import nn

from fedloom.core.options import OptionError, check_option_types


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


MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "logistic": (logistic, "multinomial logistic regression"),
    "mlp": (mlp, "ReLU MLP; option hidden = [widths]"),
    "cnn": (cnn, "LeNet-5 style CNN for image data [C, H, W]"),
}


def _import_path(path: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.partition(":")
    if not (module_name and attr):
        raise OptionError(f"model {path!r}: a user model is written 'package.module:ClassName'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise OptionError(f"model {path!r} could not be imported: {err}") from None


def _user_arguments(name: str, factory, options: dict[str, Any], input_shape, n_classes) -> dict[str, Any]:
    """The keywords a user model is called with: its options, and ``input_shape`` and ``n_classes``
    where its signature names them; refused when the options do not fit that signature."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        raise OptionError(f"model {name!r}: its parameters cannot be read (a built-in {type(factory).__name__}?); "
                          "a user model is a Python class or function that returns a torch.nn.Module") from None
    accepted = signature.parameters
    extra = {k: v for k, v in (("input_shape", input_shape), ("n_classes", n_classes)) if k in accepted}
    try:
        signature.bind(**options, **extra)
    except TypeError as err:
        raise OptionError(f"model {name!r} options {sorted(options)}: {err} "
                          f"(its parameters: {', '.join(accepted) or 'none'})") from None
    return {**options, **extra}


def build_model(name: str, input_shape: tuple[int, ...], n_classes: int, **options: Any) -> nn.Module:
    """A reference model by name, or a user's class/function by 'pkg.mod:Name'.

    A user model receives the [model] options, plus ``input_shape`` and
    ``n_classes`` when its signature names them.
    """
    if name in MODELS:
        check_option_types("model", name, MODELS[name][0], options)
        return MODELS[name][0](input_shape, n_classes, **options)
    if ":" not in name:
        raise OptionError(f"unknown model {name!r}; available: {', '.join(MODELS)} or 'package.module:ClassName'")
    factory = _import_path(name)
    model = factory(**_user_arguments(name, factory, options, input_shape, n_classes))
    if not isinstance(model, nn.Module):
        raise OptionError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
