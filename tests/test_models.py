"""The field's reference models (ResNet-20/18, LEAF's FEMNIST CNN and Shakespeare
LSTM, a small causal transformer): output shapes, parameter counts computed by
hand from the architectures, and that the vectorized engine's stacked
computation (vmap over functional_call) gives each client's own outputs and
gradients."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedloom.core.params import ParamSpec
from fedloom.engines.vectorized import check_vectorizable
from fedloom.models import MODELS, build_model
from fedloom.registry import OptionError

N_CLIENTS = 3


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _clients(model: nn.Module) -> torch.Tensor:
    """N_CLIENTS distinct parameter vectors [n, d] near the model's own."""
    spec = ParamSpec.of(model)
    base = spec.flatten(model)
    return torch.stack([base + 0.05 * torch.randn(spec.dim) for _ in range(N_CLIENTS)])


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy spelled as the vectorized engine does (also per position of a language model)."""
    return -logits.log_softmax(dim=-1).gather(-1, y[..., None]).mean()


def assert_vmap_matches(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> None:
    """The vmapped forward over stacked parameters equals each client run alone, for
    the outputs and for the gradients of the loss (autograd through the vmapped
    forward, as VectorizedEngine._step takes them). xb, yb: [n, batch, ...]."""
    spec = ParamSpec.of(model)
    X = _clients(model).requires_grad_()
    outputs = vmap(lambda flat, x: functional_call(model, spec.unflatten(flat), (x,)))(X, xb)
    losses = vmap(lambda out, y: _loss(out, y))(outputs, yb)
    (grads,) = torch.autograd.grad(losses.sum(), X)
    for i in range(N_CLIENTS):
        flat = X[i].detach().clone().requires_grad_()
        out = functional_call(model, spec.unflatten(flat), (xb[i],))
        (grad,) = torch.autograd.grad(_loss(out, yb[i]), flat)
        # vmap turns a conv into one grouped conv, summing float32 in another order: a little slack
        torch.testing.assert_close(outputs[i].detach(), out.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[i], grad, rtol=1e-5, atol=1e-5)


def _images(shape, n_classes, batch=2):
    return torch.randn(N_CLIENTS, batch, *shape), torch.randint(0, n_classes, (N_CLIENTS, batch))


def _tokens(length, vocab, batch=2):
    return torch.randint(0, vocab, (N_CLIENTS, batch, length)), torch.randint(0, vocab, (N_CLIENTS, batch, length))


def test_registered_with_descriptions():
    for name in ("resnet20", "resnet18", "femnist_cnn", "shakespeare_lstm", "transformer"):
        assert MODELS[name].description


def test_resnet20_shape_count_and_vmap():
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # by hand (He et al. 4.2, option-A shortcuts have no parameters): convs have no bias,
    # every GroupNorm a scale and a shift per channel
    convs = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 * 32 + 5 * 32 * 32) * 9 + (32 * 64 + 5 * 64 * 64) * 9
    norms = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
    assert _n_params(model) == convs + norms + 64 * 10 + 10 == 269_722  # "0.27M"
    check_vectorizable(model)
    assert_vmap_matches(model, *_images((3, 8, 8), 10))  # a small image: the same layers, faster


def test_resnet18_shape_count_and_vmap():
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 8, 8), 10)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    convs = 3 * 64 * 9 + sum((c_in * c + 3 * c * c) * 9 for c_in, c in [(64, 64), (64, 128), (128, 256), (256, 512)])
    projections = 64 * 128 + 128 * 256 + 256 * 512 + 2 * (128 + 256 + 512)
    norms = 2 * (64 + 4 * (64 + 128 + 256 + 512))
    assert _n_params(model) == convs + projections + norms + 512 * 10 + 10 == 11_173_962
    check_vectorizable(model)
    assert_vmap_matches(model, *_images((3, 8, 8), 10))


def test_resnet_norm_options():
    batch = build_model("resnet20", (3, 16, 16), 10, norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules()) and list(batch.buffers())
    plain = build_model("resnet20", (3, 16, 16), 10, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert plain(torch.randn(2, 3, 15, 17)).shape == (2, 10)  # odd sizes: shortcut and conv agree
    gn = build_model("resnet18", (3, 8, 8), 10, groups=4)
    assert {m.num_groups for m in gn.modules() if isinstance(m, nn.GroupNorm)} == {4}
    with pytest.raises(OptionError, match="groups"):
        build_model("resnet20", (3, 32, 32), 10, groups=3)
    with pytest.raises(OptionError, match="norm"):
        build_model("resnet20", (3, 32, 32), 10, norm="layer")
    with pytest.raises(OptionError, match="image input"):
        build_model("resnet20", (3072,), 10)


def test_femnist_cnn_shape_count_and_vmap():
    torch.manual_seed(0)
    model = build_model("femnist_cnn", (1, 28, 28), 62)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 62)
    # LEAF's models/femnist/cnn.py: 5x5 convs with bias, two 2x2 pools take 28 -> 7
    count = (25 * 32 + 32) + (25 * 32 * 64 + 64) + (7 * 7 * 64 * 2048 + 2048) + (2048 * 62 + 62)
    assert _n_params(model) == count == 6_603_710
    flat = build_model("femnist_cnn", (784,), 62)
    assert flat(torch.randn(2, 784)).shape == (2, 62) and _n_params(flat) == count
    check_vectorizable(model)
    assert_vmap_matches(model, *_images((1, 28, 28), 62))
    assert_vmap_matches(flat, *_images((784,), 62))


def test_transformer_shape_causality_and_vmap():
    torch.manual_seed(0)
    model = build_model("transformer", (12,), 20, d_model=16, heads=2, layers=2)
    tokens = torch.randint(0, 20, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 20)
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 20
    torch.testing.assert_close(model(changed)[:, :6], logits[:, :6])  # no position sees the future
    assert model(tokens[:, :5]).shape == (2, 5, 20)  # shorter than the max length
    check_vectorizable(model)
    assert_vmap_matches(model, *_tokens(12, 20))
    default = build_model("transformer", (8,), 30)
    assert default.tokens.embedding_dim == 64 and len(default.blocks) == 2 and default.blocks[0].attn.heads == 4
    with pytest.raises(OptionError, match="multiple of heads"):
        build_model("transformer", (8,), 30, d_model=10, heads=4)


def test_shakespeare_lstm_shape_count_and_no_vmap():
    """nn.LSTM has no vmap batching rule in torch 2.13 (CPU): the stacked computation
    raises, so this model is for the serial engine. functional_call alone works."""
    torch.manual_seed(0)
    vocab = 80
    model = build_model("shakespeare_lstm", (10,), vocab)
    tokens, targets = _tokens(10, vocab)
    assert model(tokens[0]).shape == (2, 10, vocab)
    # torch keeps two biases per gate (LEAF's TensorFlow BasicLSTMCell one: 2 * 4 * 256 fewer)
    lstm = 4 * 256 * (8 + 256) + 4 * 256 * (256 + 256) + 2 * 2 * 4 * 256
    assert _n_params(model) == vocab * 8 + lstm + 256 * vocab + vocab
    spec = ParamSpec.of(model)
    X = _clients(model)
    out = functional_call(model, spec.unflatten(X[1]), (tokens[1],))
    assert out.shape == (2, 10, vocab) and torch.isfinite(_loss(out, targets[1]))
    with pytest.raises(RuntimeError, match="Batching rule not implemented for aten::lstm"):
        vmap(lambda flat, x: functional_call(model, spec.unflatten(flat), (x,)))(X, tokens)
