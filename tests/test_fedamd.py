"""FedAMD (anchor sampling): the recursive miner step and the anchors' target on hand-computed numbers,
a miner's row against a direct implementation, anchors kept out of the aggregate, the serial engine
equal to the vectorized one, and runs deterministic and resumable."""

import numpy as np
import pytest
import torch

from fedloom.algorithms import FedAMD
from fedloom.checkpoint import load, save
from fedloom.config import ConfigError, load_config
from fedloom.core.store import ClientStore
from fedloom.engines.base import batch_order, large_batch
from helpers import make_round, play, train_once

BASE = ["algorithm.name=fedamd", "data.n_clients=12", "model.name=mlp", "model.options={hidden = [16]}",
        "client.epochs=1", "client.batch_size=16", "evaluation.federated=false", "output.save=false",
        "output.progress=false"]
SMALL = [*BASE, "sampling.clients_per_round=6"]


def test_the_miner_direction_is_the_recursive_estimator_on_hand_numbers():
    algo = FedAMD()
    lstate = algo.local_init(torch.tensor([1.0, 2.0]), {"g": torch.tensor([0.5, -1.0])}, {})
    assert lstate["v"].tolist() == [0.5, -1.0] and lstate["x_prev"].tolist() == [1.0, 2.0]
    # v_1 = v_0 + grad(x_1) - grad(x_0) on the same batch: [0.5, -1] + [3, 1] - [2, 4] = [1.5, -4]
    v, lstate = algo.local_direction(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 4.0]), torch.tensor([0.9, 2.1]),
                                     lstate)
    assert v.tolist() == [1.5, -4.0] and lstate["v"].tolist() == [1.5, -4.0]
    assert lstate["x_prev"].tolist() == pytest.approx([0.9, 2.1])


def test_the_target_moves_by_the_anchors_change_over_all_clients():
    algo, store = FedAMD(), ClientStore({1: {"m": torch.tensor([2.0, 2.0])}})
    state = {"g": torch.tensor([1.0, 1.0])}
    # N = 4: client 1 replaces [2, 2] by [6, 0]; client 3 (new, m = 0) sends [4, 8]
    new = algo.anchor_step(state, [1, 3], torch.tensor([[6.0, 0.0], [4.0, 8.0]]), store, 4)
    assert new["g"].tolist() == [1.0 + (4 + 4) / 4, 1.0 + (-2 + 8) / 4]
    assert store.states[1]["m"].tolist() == [6.0, 0.0] and store.states[3]["m"].tolist() == [4.0, 8.0]
    assert state["g"].tolist() == [1.0, 1.0]  # the old state is left as it was


def test_anchors_are_drawn_with_their_probability():
    picked = [len(FedAMD(anchor_probability=0.3).anchor_group(list(range(100)), 0, r)) for r in range(1, 41)]
    assert abs(np.mean(picked) / 100 - 0.3) < 0.03
    assert FedAMD(anchor_probability=0.3).anchor_group(list(range(100)), 0, 5) == \
        FedAMD(anchor_probability=0.3).anchor_group(list(range(100)), 0, 5)


@pytest.mark.parametrize("engine", ["serial", "vectorized"])
def test_a_miners_row_is_the_sarah_recursion_computed_directly(engine):
    round_ = make_round(*SMALL, f"engine.name={engine}", "client.lr=0.1")
    x0 = round_.spec.flatten(round_.model).detach().clone()
    g = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    client = 4
    result = train_once(round_, x0, [client], sent={"g": g})
    loss = round_.engine._loss if engine == "serial" else None
    idx, data = round_.data.train_idx[client], round_.data

    def grad(x, batch):
        x = x.detach().requires_grad_()
        xb, yb = data.x[idx[batch]], data.y[idx[batch]]
        fn = loss or (lambda f, a, b: round_.engine._masked_loss(f, a, b, torch.ones(len(b))))
        return torch.autograd.grad(fn(x, xb, yb), x)[0]

    x, x_prev, v = x0.clone(), x0.clone(), g.clone()
    for batch in batch_order(len(idx), round_.engine.local, 1, client):
        v = v + grad(x, batch) - grad(x_prev, batch)
        x_prev, x = x, x - 0.1 * v
    assert torch.allclose(result.U[0], x0 - x, atol=1e-6)


def test_anchor_gradients_are_the_mean_loss_gradient_on_the_large_batch():
    serial, vectorized = (make_round(*SMALL, f"engine.name={e}") for e in ("serial", "vectorized"))
    x0 = serial.spec.flatten(serial.model).detach().clone()
    clients = [0, 5, 7]
    gs = serial.engine.gradients(x0, clients, 20, 3)
    gv = vectorized.engine.gradients(x0, clients, 20, 3)
    assert torch.allclose(gs, gv, atol=1e-6)
    idx = serial.data.train_idx[5]
    batch = idx[torch.from_numpy(large_batch(len(idx), 20, serial.cfg.seed, 3, 5))]
    assert len(batch) == 20 and len(set(batch.tolist())) == 20
    x = x0.clone().requires_grad_()
    direct = torch.autograd.grad(serial.engine._loss(x, serial.data.x[batch], serial.data.y[batch]), x)[0]
    assert torch.allclose(gs[1], direct, atol=1e-6)
    full = serial.engine.gradients(x0, [5], 0, 3)  # 0: all the client's examples
    x = x0.clone().requires_grad_()
    whole = torch.autograd.grad(serial.engine._loss(x, serial.data.x[idx], serial.data.y[idx]), x)[0]
    assert torch.allclose(full[0], whole, atol=1e-6)


def test_warm_start_fills_every_clients_anchor_and_the_target_is_their_mean():
    round_ = make_round(*SMALL, "algorithm.options={anchor_batch_size = 0}")
    state = round_.init_state()
    m = torch.stack([state["clients"][c]["m"] for c in range(12)])
    assert torch.allclose(state["algorithm"]["g"], m.mean(dim=0), atol=1e-6)
    assert torch.allclose(m, round_.engine.gradients(state["x"], list(range(12)), 0, 0))
    cold = make_round(*SMALL, "algorithm.options={warm_start = false}").init_state()
    assert cold["clients"] == {} and not cold["algorithm"]["g"].any()


def test_anchors_send_gradients_and_only_miners_rows_move_the_model():
    round_ = make_round(*SMALL, "algorithm.options={anchor_probability = 0.5, anchor_batch_size = 32}")
    state = round_.init_state()
    new, record = round_.play(state, 1)
    sampled = round_._sample(state, 1)
    anchors = round_.algorithm.anchor_group(sampled, round_.cfg.seed, 1)
    assert record["n_anchors"] == len(anchors) > 0 and record["n_sampled"] == len(sampled) - len(anchors)
    grads = round_.engine.gradients(state["x"], anchors, 32, 1)
    for cid, grad in zip(anchors, grads):
        assert torch.allclose(new["clients"][cid]["m"], grad)
    old_m = torch.stack([state["clients"][c]["m"] for c in anchors])
    assert torch.allclose(new["algorithm"]["g"], state["algorithm"]["g"] + (grads - old_m).sum(0) / 12, atol=1e-6)
    miners = [c for c in sampled if c not in anchors]  # the model: the miners' example-weighted mean
    result = train_once(round_, state["x"], miners, sent={"g": state["algorithm"]["g"]},
                        store=ClientStore(state["clients"]))
    w = result.weights / result.weights.sum()
    assert torch.allclose(new["x"], state["x"] - (w[:, None] * result.U).sum(0), atol=1e-6)


def test_serial_and_vectorized_engines_give_the_same_fedamd_run():
    finals = []
    for engine in ("serial", "vectorized"):
        state, _ = play(make_round(*SMALL, f"engine.name={engine}", "algorithm.options={anchor_batch_size = 24}"), 3)
        finals.append(state)
    assert torch.allclose(finals[0]["x"], finals[1]["x"], atol=1e-5)
    assert torch.allclose(finals[0]["algorithm"]["g"], finals[1]["algorithm"]["g"], atol=1e-5)


def test_a_fedamd_run_resumes_bit_identical(tmp_path):
    round_ = make_round(*SMALL)
    straight, _ = play(round_, 4)
    half, _ = play(round_, 2)
    save(tmp_path / "ckpt.pt", half)
    state = load(tmp_path / "ckpt.pt")
    for r in (3, 4):
        state, _ = round_.play(state, r)
    assert torch.equal(state["x"], straight["x"]) and torch.equal(state["algorithm"]["g"], straight["algorithm"]["g"])


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.options={anchor_probability = 1.0}"], "anchor_probability = 1.0"),
    (["algorithm.options={anchor_batch_size = -1}"], "anchor_batch_size = -1"),
    (["algorithm.options={anchor_size = 3}"], "takes no option anchor_size"),
    (["client.momentum=0.9"], "fedamd assumes plain local SGD"),
    (["engine.name=ray"], "fedamd' with engine.name = 'ray'"),
    (["system.profile=sampled"], "with a system model"),
    (["mode=asynchronous"], "mode = 'asynchronous'"),
    (["participation.mode=bernoulli", "server.transforms=[{name = 'fedau'}]"], "with server.transforms 'fedau'"),
])
def test_fedamd_combinations_are_refused_at_config_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, *overrides])
