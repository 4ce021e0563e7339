"""APFL: the three per-step updates (w, v, alpha) match hand-computed steps, alpha is clipped to [0, 1] and
fixed without adaptive_alpha, the personalized model is the mixture, the serial and the vectorized engines
agree, the state resumes bit-identically, and the combinations that make no sense are refused."""

import pytest
import torch

from fedloom import checkpoint
from fedloom.config import ConfigError, load_config
from fedloom.core.store import ClientStore
from fedloom.engines.base import functional_loss
from helpers import make_round, play

LR = 0.1
TINY = ["data.dataset=digits", "data.n_clients=6", "partition.name=shards", "partition.options={classes_per_client=2}",
        "model.name=mlp", "model.options={hidden=[8]}", "sampling.clients_per_round=3", "client.epochs=1",
        "client.batch_size=32", f"client.lr={LR}", "personalization.method=apfl"]
# three clients, all sampled every round, each one full batch: a round is a single local step
FULL_BATCH = [*TINY, "data.n_clients=3", "partition.name=iid", "partition.options={}", "client.batch_size=1000",
              "engine.name=serial"]


def _grad(round_, flat, client):
    idx = round_.data.train_idx[client]
    flat = flat.detach().requires_grad_()
    loss = functional_loss(round_.model, round_.spec, round_.task)(flat, round_.data.x[idx], round_.data.y[idx])
    return torch.autograd.grad(loss, flat)[0]


def _mean_by_size(round_, rows):
    sizes = torch.tensor([len(round_.data.train_idx[c]) for c in range(len(rows))], dtype=torch.float32)
    return (rows * sizes[:, None]).sum(0) / sizes.sum()


def test_one_local_step_updates_w_v_and_alpha_as_the_paper_writes():
    alpha_lr = 0.05
    round_ = make_round(*FULL_BATCH, "personalization.apfl_alpha=0.3", f"personalization.alpha_lr={alpha_lr}")
    state0 = round_.init_state()
    state1, _ = round_.play(state0, 1)
    x0, x1 = state0["x"], state1["x"]
    for c in range(3):  # round 1: v = w = x0, so the mixture is x0 and alpha's gradient <v - w, g> is 0
        g = _grad(round_, x0, c)
        torch.testing.assert_close(state1["clients"][c]["v"], x0 - LR * 0.3 * g, rtol=0, atol=1e-6)
        assert state1["clients"][c]["alpha"].item() == pytest.approx(0.3, abs=1e-7)
    # the global model is FedAvg's over the clients' plain steps on w
    torch.testing.assert_close(x1, _mean_by_size(round_, torch.stack([x0 - LR * _grad(round_, x0, c)
                                                                      for c in range(3)])), rtol=0, atol=1e-6)
    state2, _ = round_.play(state1, 2)
    steps = []
    for c in range(3):
        v, alpha = state1["clients"][c]["v"], state1["clients"][c]["alpha"]
        mixed = alpha * v + (1 - alpha) * x1
        g_mixed = _grad(round_, mixed, c)
        torch.testing.assert_close(state2["clients"][c]["v"], v - LR * alpha * g_mixed, rtol=0, atol=1e-6)
        expected_alpha = (alpha - alpha_lr * torch.dot(v - x1, g_mixed)).clamp(0, 1)
        assert state2["clients"][c]["alpha"].item() == pytest.approx(expected_alpha.item(), abs=1e-6)
        assert state2["clients"][c]["alpha"].item() != pytest.approx(0.3, abs=1e-6)  # it moved
        steps.append(x1 - LR * _grad(round_, x1, c))
    torch.testing.assert_close(state2["x"], _mean_by_size(round_, torch.stack(steps)), rtol=0, atol=1e-6)


def test_alpha_is_clipped_to_the_unit_interval_and_fixed_without_adaptive_alpha():
    clipped, _ = play(make_round(*FULL_BATCH, "personalization.alpha_lr=100000"), 3)
    alphas = {s["alpha"].item() for s in clipped["clients"].values()}
    assert alphas <= {0.0, 1.0} and alphas  # a huge step lands on the bounds exactly
    fixed, _ = play(make_round(*FULL_BATCH, "personalization.adaptive_alpha=false",
                               "personalization.apfl_alpha=0.7"), 3)
    assert all(s["alpha"].item() == pytest.approx(0.7, abs=1e-7) for s in fixed["clients"].values())


def test_the_personalized_model_is_the_mixture_with_the_current_global_model():
    round_ = make_round(*FULL_BATCH)
    state, _ = play(round_, 2)
    models = round_.personal.client_models(round_.engine, state["x"], [0, 1, 2], ClientStore(state["clients"]))
    for c in range(3):
        s = state["clients"][c]
        torch.testing.assert_close(models[c], s["alpha"] * s["v"] + (1 - s["alpha"]) * state["x"], rtol=0, atol=0)
    unseen = make_round(*TINY).personal.client_models(None, state["x"], [4], ClientStore())
    assert torch.equal(unseen[0], state["x"])  # a client never sampled: v = x, so its mixture is the global model


@pytest.mark.parametrize("chunked", [False, True])
def test_the_serial_and_the_vectorized_engines_agree(chunked):
    results = []
    for engine in ("serial", "vectorized"):  # chunked: one client a chunk
        round_ = make_round(*TINY, f"engine.name={engine}", "personalization.alpha_lr=0.5",
                            *(["engine.memory_budget_gb=0.00001"] if chunked else []))
        state, record = play(round_, 2)
        results.append((state, record, round_.evaluate(state)))
    (s, r, m), (v, q, n) = results
    torch.testing.assert_close(s["x"], v["x"], rtol=1e-5, atol=1e-6)
    assert s["clients"].keys() == v["clients"].keys() and len(s["clients"]) >= 3
    for c in s["clients"]:
        for k in ("v", "alpha"):
            torch.testing.assert_close(s["clients"][c][k], v["clients"][c][k], rtol=1e-5, atol=1e-6)
    assert r["train_loss"] == pytest.approx(q["train_loss"], rel=1e-5)
    assert "personal_accuracy" in m
    for k in m:
        assert m[k] == pytest.approx(n[k], abs=2e-3), k


def test_apfl_state_checkpoints_and_resumes_bit_identically(tmp_path):
    whole, _ = play(make_round(*TINY), 3)
    first, _ = play(make_round(*TINY), 2)
    checkpoint.save(tmp_path / "ckpt", first)
    resumed, _ = make_round(*TINY).play(checkpoint.load(tmp_path / "ckpt"), 3)
    assert torch.equal(resumed["x"], whole["x"])
    assert resumed["clients"].keys() == whole["clients"].keys()
    for c, s in whole["clients"].items():
        assert s.keys() == {"v", "alpha"}
        assert all(torch.equal(resumed["clients"][c][k], t) for k, t in s.items())


def test_uplink_carries_w_only():
    round_ = make_round(*TINY)
    seen = []
    apply = round_.pipeline.apply

    def spy(U, w, states, ctx):
        seen.append(U.clone())
        return apply(U, w, states, ctx)

    object.__setattr__(round_.pipeline, "apply", spy)
    _, record = play(round_, 1)
    d = round_.spec.dim
    assert seen[0].shape == (3, d) and record["bytes_up"] == 4 * d * 3


@pytest.mark.parametrize("overrides, message", [
    (["secure_aggregation.protocol=secagg"], "secure_aggregation"),
    (["client.optimizer=adam"], "client.optimizer = 'sgd'"),
    (["client.weight_decay=0.01"], "weight_decay = 0"),
    (["algorithm.name=scaffold"], "client state"),
    (["personalization.apfl_alpha=1.5"], "apfl_alpha"),
])
def test_combinations_that_do_not_fit_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["personalization.method=apfl", *overrides])
