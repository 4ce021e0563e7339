import numpy as np
import pytest
import torch
from torch import nn

from fedloom.core import ParamSpec, Stream, seed_for, torch_generator
from fedloom.core.local_optim import SGD, Adam
from fedloom.core.rng import counter_keys
from fedloom.core.store import ClientStore
from fedloom.models import build_model


def test_paramspec_roundtrip_and_batched_views():
    model = build_model("cnn", (1, 8, 8), 10)
    spec = ParamSpec.of(model)
    flat = spec.flatten(model)
    assert flat.shape == (sum(p.numel() for p in model.parameters()),)
    target = build_model("cnn", (1, 8, 8), 10)
    spec.load_into(target, flat)
    for a, b in zip(model.parameters(), target.parameters()):
        assert torch.equal(a, b)
    stacked = torch.stack([flat, 2 * flat])
    views = spec.unflatten(stacked)
    first = spec.names[0]
    assert views[first].shape == (2, *dict(model.named_parameters())[first].shape)
    assert torch.equal(views[first][1], 2 * dict(model.named_parameters())[first].detach())


def test_streams_are_independent_and_reproducible():
    assert seed_for(0, Stream.BATCHES, 1, 2) == seed_for(0, Stream.BATCHES, 1, 2)
    assert seed_for(0, Stream.BATCHES, 1, 2) != seed_for(0, Stream.BATCHES, 2, 1)
    assert seed_for(0, Stream.BATCHES, 1, 2) != seed_for(0, Stream.SAMPLING, 1, 2)
    a = torch.randn(5, generator=torch_generator(3, Stream.INIT))
    b = torch.randn(5, generator=torch_generator(3, Stream.INIT))
    assert torch.equal(a, b)


def _torch_reference(opt_cls, steps, **kw):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(2, 7))
    grads = [torch.randn(2, 7) for _ in range(steps)]
    start = p.detach().clone()
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return start, grads, p.detach()


@pytest.mark.parametrize("options", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, weight_decay=0.01),
                                     dict(lr=0.05, weight_decay=0.1)])
def test_local_sgd_is_bit_identical_to_torch(options):
    start, grads, expected = _torch_reference(torch.optim.SGD, 5, **options)
    opt = SGD(**options)
    x, state = start, opt.init(start)
    for g in grads:  # the same code steps stacked rows
        x, state = opt.step(x, g, state)
    assert torch.equal(x, expected)


def test_local_adam_matches_torch():
    start, grads, expected = _torch_reference(torch.optim.Adam, 6, lr=0.01, weight_decay=0.1)
    opt = Adam(lr=0.01, weight_decay=0.1)
    x, state = start, opt.init(start)
    for g in grads:
        x, state = opt.step(x, g, state)
    torch.testing.assert_close(x, expected)


def test_client_store_makes_state_once():
    store = ClientStore()
    made = []
    state = store.get(3, lambda: made.append(1) or {"c": torch.zeros(2)})
    store.put(3, {"c": state["c"] + 1})
    assert torch.equal(store.get(3, lambda: made.append(1) or {}) ["c"], torch.ones(2))
    assert len(made) == 1 and 3 in store and len(store) == 1


def test_counter_keys_depend_only_on_their_own_key():
    grid = counter_keys(5, Stream.BATCHES, 1, np.arange(4)[:, None], np.arange(6))
    assert grid.shape == (4, 6) and grid.dtype == np.uint64
    assert counter_keys(5, Stream.BATCHES, 1, 2, 3)[0] == grid[2, 3]  # drawn alone or with others: the same
    assert len(np.unique(grid)) == grid.size
    assert not np.array_equal(counter_keys(6, Stream.BATCHES, 1, np.arange(4)[:, None], np.arange(6)), grid)
    assert not np.array_equal(counter_keys(5, Stream.SAMPLING, 1, np.arange(4)[:, None], np.arange(6)), grid)


def test_counter_keys_bits_are_balanced():
    keys = counter_keys(0, Stream.BATCHES, 3, np.arange(20000))  # consecutive counters
    bits = (keys[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    assert np.abs(bits.mean(axis=0) - 0.5).max() < 0.02
