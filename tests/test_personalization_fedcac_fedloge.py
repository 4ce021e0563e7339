"""FedCAC and FedLoGe: hand-computed critical-parameter selection, overlaps and per-client aggregation;
the ETF head's geometry and GLA-FR's realignment; the rounds' wiring against full-batch SGD steps;
serial == vectorized; bit-identical resume; and the combinations config.py refuses."""

import math

import pytest
import torch

from fedloom import evaluation
from fedloom.config import ConfigError, load_config
from fedloom.core.params import ParamSpec
from fedloom.engines.base import functional_loss
from fedloom.personalization.fedcac import (CRITICAL, CUSTOMIZED, collaborators, critical_mask, customized_models,
                                            overlaps)
from fedloom.core.rng import Stream, torch_generator
from fedloom.personalization.fedloge import ETF_KEY, LOCAL_HEAD, simplex_etf, sparsified
from helpers import assert_resumes_bit_identically, make_round, play

TINY = ["data.dataset=digits", "data.n_clients=6", "partition.name=shards", "partition.options={classes_per_client=2}",
        "model.name=mlp", "model.options={hidden=[16]}", "sampling.clients_per_round=3", "client.epochs=1",
        "client.batch_size=32", "client.lr=0.1"]
D = 64 * 16 + 16 + 16 * 10 + 10  # Flatten, Linear(64, 16), ReLU, Linear(16, 10)
HEAD = slice(64 * 16 + 16, D)  # the last layer's coordinates (weight, then bias)
LR = 0.1


def _round(method, *more):
    return make_round(*TINY, f"personalization.method={method}", *more)


def _one_step(method, *more):
    """Three clients, all sampled, each one full batch an epoch: every pass is one SGD step."""
    return _round(method, "data.n_clients=3", "partition.name=iid", "partition.options={}",
                  "sampling.clients_per_round=3", "client.batch_size=1000", "engine.name=serial", *more)


def _grad(round_, flat, client):
    idx = round_.data.train_idx[client]
    flat = flat.detach().requires_grad_()
    loss = functional_loss(round_.model, round_.spec, round_.task)(flat, round_.data.x[idx], round_.data.y[idx])
    return torch.autograd.grad(loss, flat)[0]


def _sizes(round_):
    return torch.tensor([len(round_.data.train_idx[c]) for c in range(3)], dtype=torch.float32)


# FedCAC ---------------------------------------------------------------------------------------------------------

def test_fedcac_marks_the_top_tau_of_each_parameter_tensor_by_update_times_value():
    spec = ParamSpec(("a", "b"), (torch.Size([4]), torch.Size([2])))
    start = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 2.0]])
    trained = torch.tensor([[2.0, 1.5, 0.0, 1.0, 2.0, 2.0]])
    # |(trained - start) * trained| = a: [2, 0.75, 0, 0], b: [0, 0]
    assert critical_mask(spec, start, trained, 0.5).tolist() == [[True, True, False, False, False, False]]
    assert critical_mask(spec, start, trained, 0.25).tolist() == [[True, False, False, False, False, False]]
    # a cut falling among unmoved parameters keeps only the moved ones; b did not move: none of it
    assert critical_mask(spec, start, trained, 1.0).tolist() == [[True, True, False, False, False, False]]
    # ties at the cut count (a: all four at 2, k = int(0.4 * 4) = 1); a fraction that rounds down to no
    # entry marks none (b: int(0.4 * 2) = 0)
    moved = torch.tensor([[2.0, 2.0, 2.0, 2.0, 3.0, 1.0]])
    assert critical_mask(spec, start, moved, 0.4).tolist() == [[True, True, True, True, False, False]]
    # one row a client, each its own cut (b of the second: |1 * 3|, |-1 * 1|: the 3 alone)
    both = critical_mask(spec, start.expand(2, -1), torch.cat([trained, moved]), 0.5)
    assert both.tolist() == [[True, True, False, False, False, False], [True, True, True, True, True, False]]


def test_fedcac_overlap_is_the_share_of_a_clients_critical_set_another_shares():
    masks = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    o = overlaps(masks)
    # o_01 = 1 - |{1, 2}| / (2 * 3) = 2/3; o_10 = 1 - 2 / (2 * 1) = 0; o_02 = 1 - 4 / 6; o_20 = 1 - 4 / 2
    torch.testing.assert_close(o[0, 1], torch.tensor(2 / 3))
    torch.testing.assert_close(o[1, 0], torch.tensor(0.0))
    torch.testing.assert_close(o[0, 2], torch.tensor(1 / 3))
    torch.testing.assert_close(o[2, 0], torch.tensor(-1.0))
    assert torch.all(o.diagonal() == 1)


def test_fedcac_customizes_critical_coordinates_among_clients_with_overlapping_critical_sets():
    # clients 0 and 1 mark coordinates 0, 1; client 2 marks 2, 3
    masks = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    o = overlaps(masks)  # off-diagonal: o_01 = o_10 = 1, the other four 0: mean 1/3, max 1
    # round 1 of beta 2: the bar is 1/3 + (1/2)(2/3) = 2/3: 0 and 1 together, 2 alone
    together = collaborators(o, 1, 2)
    assert together.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert collaborators(o, 2, 2).tolist() == together.tolist()  # the bar reaches the largest overlap (ties count)
    assert collaborators(o, 3, 2).tolist() == torch.eye(3, dtype=torch.bool).tolist()  # past it: each alone
    assert collaborators(o, 0, 2).tolist() == together.tolist()  # the bar at the mean, 1/3: o_02 = 0 stays below
    models = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 6.0, 5.0, 0.0], [10.0, 20.0, 30.0, 40.0]])
    custom = customized_models(models, together)
    expected = torch.tensor([[2.0, 4.0, 4.0, 2.0], [2.0, 4.0, 4.0, 2.0], [10.0, 20.0, 30.0, 40.0]])
    torch.testing.assert_close(custom, expected)  # 0 and 1: their mean; 2: its own
    # each client's next start: critical coordinates from its customized model, the others from the global one
    x = models.mean(0)
    starts = torch.where(masks, custom, x)
    torch.testing.assert_close(starts, torch.tensor([[2.0, 4.0, 38 / 3, 44 / 3], [2.0, 4.0, 38 / 3, 44 / 3],
                                                     [14 / 3, 28 / 3, 30.0, 40.0]]))


def test_fedcac_round_keeps_masks_and_customized_models_and_counts_the_mask_bits():
    tau, beta = 0.3, 2
    round_ = _one_step("fedcac", f"personalization.fedcac_tau={tau}", f"personalization.fedcac_beta={beta}")
    state0 = round_.init_state()
    state1, record = round_.play(state0, 1)
    x0 = state0["x"]
    local = torch.stack([x0 - LR * _grad(round_, x0, c) for c in range(3)])  # every client from the global model
    masks = critical_mask(round_.spec, x0.expand(3, -1), local, tau)
    custom = customized_models(local, collaborators(overlaps(masks), 1, beta))
    for c in range(3):
        assert torch.equal(state1["clients"][c][CRITICAL], masks[c])
        torch.testing.assert_close(state1["clients"][c][CUSTOMIZED], custom[c], rtol=0, atol=1e-6)
    sizes = _sizes(round_)
    torch.testing.assert_close(state1["x"], (local * sizes[:, None]).sum(0) / sizes.sum(), rtol=0, atol=1e-6)
    assert record["bytes_up"] == 3 * (4 * D + math.ceil(D / 8)) and record["bytes_down"] == 3 * 4 * D
    # round 2 starts each client from its critical coordinates of round 1 and the global model elsewhere
    starts = torch.where(masks, custom, state1["x"])
    models = round_.personal.client_models(round_.engine, state1["x"], [0, 1, 2], _store(state1))
    torch.testing.assert_close(models, starts, rtol=0, atol=1e-6)
    state2, _ = round_.play(state1, 2)
    local2 = torch.stack([starts[c] - LR * _grad(round_, starts[c], c) for c in range(3)])
    torch.testing.assert_close(state2["x"], (local2 * sizes[:, None]).sum(0) / sizes.sum(), rtol=0, atol=1e-6)


def _store(state):
    from fedloom.core.store import ClientStore
    return ClientStore(state["clients"])


# FedLoGe --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("features, classes", [(16, 10), (10, 10), (32, 3)])
def test_the_simplex_etf_has_unit_columns_at_equal_maximal_angles(features, classes):
    M = simplex_etf(features, classes, torch.Generator().manual_seed(0))
    assert M.shape == (features, classes)
    gram = M.T @ M
    torch.testing.assert_close(gram.diagonal(), torch.ones(classes), rtol=0, atol=1e-6)
    off = gram[~torch.eye(classes, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / (classes - 1)), rtol=0, atol=1e-6)


def test_sse_c_zeroes_the_smallest_magnitude_entries():
    M = torch.tensor([[0.5, -0.1], [-0.3, 0.2], [0.05, -0.9]])
    assert torch.equal(sparsified(M, 0.5), torch.tensor([[0.5, 0.0], [-0.3, 0.0], [0.0, -0.9]]))
    assert torch.equal(sparsified(M, 0.0), M)
    etf = simplex_etf(16, 10, torch.Generator().manual_seed(1))
    sparse = sparsified(etf, 0.6)
    zero = sparse == 0
    assert int(zero.sum()) == 96  # int(0.6 * 160)
    assert etf[zero].abs().max() <= etf[~zero].abs().min()
    assert torch.equal(sparse[~zero], etf[~zero])


def test_the_fixed_head_is_the_sparse_etf_and_backbone_and_heads_step_together():
    round_ = _one_step("fedloge", "sampling.clients_per_round=1")
    method = round_.personal
    etf = simplex_etf(16, 10, torch_generator(round_.cfg.seed, Stream.PERSONAL, ETF_KEY))
    assert torch.equal(method.sse_c[:160], sparsified(etf, 0.6).T.flatten())  # weight [10, 16]: the ETF's columns
    assert torch.equal(method.sse_c[160:], torch.zeros(10))  # no bias
    state0 = round_.init_state()
    state1, _ = round_.play(state0, 1)
    (client,) = state1["clients"]
    x0 = state0["x"]
    under = x0.clone()
    under[HEAD] = method.sse_c
    # one joint step from x0: the backbone's under SSE-C (its head frozen), the auxiliary head's on x0's
    # backbone features, not on the stepped backbone's
    stepped = under - LR * _grad(round_, under, client)
    stepped[HEAD] = (x0 - LR * _grad(round_, x0, client))[HEAD]
    torch.testing.assert_close(state1["x"], stepped, rtol=0, atol=1e-6)  # one client: FedAvg is its model
    # a new client's local head starts from the auxiliary head: after one step it equals it
    torch.testing.assert_close(state1["clients"][client][LOCAL_HEAD], stepped[HEAD], rtol=0, atol=1e-6)


def test_gla_fr_realigns_the_global_head_to_unit_rows_and_local_heads_by_their_row_norms():
    round_ = _round("fedloge")
    method, x = round_.personal, round_.init_state()["x"].clone()
    aux_w, local_w = torch.zeros(10, 16), torch.zeros(10, 16)
    aux_w[:, :2] = torch.tensor([3.0, 4.0])  # every class row (3, 4, 0, ...): norm 5
    local_w[:, 2] = 2.0  # the client's rows (0, 0, 2, 0, ...): norm 2
    x[HEAD] = torch.cat([aux_w.flatten(), torch.ones(10)])
    store = _store({"clients": {4: {LOCAL_HEAD: torch.cat([local_w.flatten(), torch.full((10,), 0.5)])}}})
    generic = method.generic(x)
    assert torch.equal(generic[:HEAD.start], x[:HEAD.start])
    row = torch.zeros(16)
    row[:2] = torch.tensor([0.6, 0.8])
    torch.testing.assert_close(generic[HEAD], torch.cat([row.repeat(10), torch.ones(10)]))
    models = method.client_models(round_.engine, x, [4, 0], store)
    row = torch.zeros(16)
    row[:3] = torch.tensor([6.0, 8.0, 2.0])  # (3, 4) * 2 + (0, 0, 2)
    torch.testing.assert_close(models[0][HEAD], torch.cat([row.repeat(10), torch.full((10,), 1.5)]))
    torch.testing.assert_close(models[1], generic)  # never sampled: the generic model
    # the global model evaluated (and saved) is the generic one
    state = {**round_.init_state(), "x": x}
    metrics = round_.evaluate(state)
    expected = evaluation.federated(round_.model, round_.spec, generic, round_.data, round_.task)
    assert metrics["federated_accuracy"] == expected["federated_accuracy"]
    torch.testing.assert_close(round_.final_params(state), generic)


def test_fedloge_needs_a_linear_head():
    with pytest.raises(ConfigError, match="needs a linear head"):
        _round("fedloge", "personalization.personal=['1.weight', '3.weight']")
    with pytest.raises(ConfigError, match="classes <= features"):
        _round("fedloge", "model.options={hidden=[8]}")


# both -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fedcac", "fedloge"])
def test_the_serial_and_the_vectorized_engines_agree(method):
    results = []
    for engine in ("serial", "vectorized"):
        round_ = _round(method, f"engine.name={engine}")
        state, _ = play(round_, 2)
        results.append((state, round_.evaluate(state)))
    (s, m), (v, n) = results
    torch.testing.assert_close(s["x"], v["x"], rtol=1e-5, atol=1e-6)
    assert s["clients"].keys() == v["clients"].keys()
    for c in s["clients"]:
        for k in s["clients"][c]:
            if s["clients"][c][k].dtype == torch.bool:  # a sensitivity tie at the cut could flip one bit
                assert (s["clients"][c][k] != v["clients"][c][k]).float().mean() < 0.01
            else:
                torch.testing.assert_close(s["clients"][c][k], v["clients"][c][k], rtol=1e-5, atol=1e-5)
    assert m.keys() == n.keys() and "personal_accuracy" in m
    for k in m:
        assert m[k] == pytest.approx(n[k], abs=2e-3), k


@pytest.mark.parametrize("method", ["fedcac", "fedloge"])
def test_personal_state_checkpoints_and_resumes_bit_identically(tmp_path, method):
    assert_resumes_bit_identically(lambda: _round(method), tmp_path / "ckpt")


@pytest.mark.parametrize("overrides, message", [
    (["personalization.method=fedcac", "mode=asynchronous", "system.profile=sampled"], "federated mode"),
    (["personalization.method=fedloge", "mode=asynchronous", "system.profile=sampled"], "federated mode"),
    (["personalization.method=fedcac", "secure_aggregation.protocol=secagg"], "secure_aggregation"),
    (["personalization.method=fedloge", "secure_aggregation.protocol=secagg"], "secure_aggregation"),
    (["personalization.method=fedcac", "compression.name=topk", "compression.options={k=0.1}"], "compression.name"),
    (["personalization.method=fedcac", "privacy.mechanism=gaussian"], "privacy.mechanism"),
    (["personalization.method=fedcac", "attack.name=sign_flip", "attack.f=1"], "attack.name"),
    (["personalization.method=fedcac", "server.aggregator.name=median"], "server.aggregator.name"),
    (["personalization.method=fedloge", "client.weight_decay=0.01"], "weight_decay"),
    (["personalization.method=fedcac", "personalization.fedcac_tau=0"], "fedcac_tau"),
    (["personalization.method=fedcac", "personalization.fedcac_beta=0"], "fedcac_beta"),
    (["personalization.method=fedloge", "personalization.fedloge_sparsity=1"], "fedloge_sparsity"),
])
def test_combinations_that_do_not_fit_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


SHARDS = ["data.dataset=digits", "data.n_clients=20", "partition.name=shards", "partition.options={classes_per_client=2}",
          "model.name=mlp", "model.options={hidden=[32]}", "sampling.clients_per_round=10", "client.epochs=1",
          "client.lr=0.1", "client.batch_size=16", "rounds=10", "evaluation.every=10", "output.save=false",
          "output.progress=false", "seed=0"]


@pytest.mark.slow
def test_on_two_class_shards_fedcac_and_fedloge_beat_the_global_fedavg_model():
    from fedloom import run

    fedavg = run(None, [*SHARDS, "personalization.method=finetune"]).final["federated_accuracy_client_mean"]
    fedcac = run(None, [*SHARDS, "personalization.method=fedcac", "personalization.fedcac_beta=3"]).final
    fedloge = run(None, [*SHARDS, "personalization.method=fedloge"]).final
    assert fedcac["personal_accuracy_client_mean"] > fedavg + 0.1
    assert fedloge["personal_accuracy_client_mean"] > fedavg + 0.1
    assert fedloge["personal_accuracy_client_mean"] > fedloge["federated_accuracy_client_mean"]
