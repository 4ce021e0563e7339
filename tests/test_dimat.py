"""DIMAT (fedloom.algorithms.dimat): aligned merges with the neighbours in decentralized learning."""

from __future__ import annotations

import pytest
import torch

from fedloom.algorithms.dimat import Dimat
from fedloom.algorithms.gossip import DSGD
from fedloom.config import ConfigError, load_config
from fedloom.core.params import ParamSpec
from fedloom.core.store import ClientStore
from fedloom.data import FederatedData
from fedloom.merging import apply, random_permutation, spec_for
from fedloom.models import build_model
from fedloom.runner import run
from fedloom.topology import make_topology, metropolis_hastings

N = 6


def _setup(seed=0):
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(24, 12)).eval()
    x = torch.randn(N * 20, 1, 8, 8)
    data = FederatedData(x, torch.randint(0, 10, (N * 20,)), [torch.arange(i * 20, (i + 1) * 20) for i in range(N)],
                         [torch.zeros(0, dtype=torch.long)] * N, x[:10], torch.zeros(10, dtype=torch.long), 10)
    return model, data, ParamSpec.of(model), metropolis_hastings(make_topology("ring", N))


def _mix(rule, W, Y, round_idx=1):
    return rule.mix(W, Y, Y, list(range(N)), {}, ClientStore(), {}, round_idx)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_with_neighbours_whose_units_correspond_dimat_is_dsgds_mix(method):
    model, data, flat, W = _setup()
    x = flat.flatten(model)
    Y = x + 0.001 * torch.randn(N, x.numel(), generator=torch.Generator().manual_seed(1))
    merged, sent, _ = _mix(Dimat(model, data, seed=0, method=method), W, Y)
    plain, _, _ = _mix(DSGD(), W, Y)
    torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(sent, torch.full((N,), 4.0 * x.numel()))


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_with_permuted_neighbours_dimat_undoes_the_permutation_and_dsgd_does_not(method):
    model, data, flat, W = _setup()
    spec, state = spec_for(model), {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for node in range(N):  # every node holds the same function with its units in another order
        moved = apply(spec, state, random_permutation(spec, torch.Generator().manual_seed(node)))
        rows.append(torch.cat([moved[n].reshape(-1) for n in flat.names]))
    Y = torch.stack(rows)
    merged, _, _ = _mix(Dimat(model, data, seed=0, method=method), W, Y)
    torch.testing.assert_close(merged, Y, rtol=1e-5, atol=1e-6)  # each node's neighbours aligned onto itself
    plain, _, _ = _mix(DSGD(), W, Y)
    probe = data.x[:32]
    with torch.no_grad():
        expected = model(probe)
        flat.load_into(model, plain[0])
        assert (model(probe) - expected).abs().max() > 0.05  # the plain mix averages units that do not correspond


def test_between_merges_the_nodes_only_train_and_send_nothing():
    model, data, flat, W = _setup()
    Y = torch.randn(N, flat.dim, generator=torch.Generator().manual_seed(2))
    rule = Dimat(model, data, seed=0, period=3)
    for round_idx in (1, 2, 4, 5):
        merged, sent, _ = _mix(rule, W, Y, round_idx)
        assert torch.equal(merged, Y) and sent.sum() == 0
    merged, sent, _ = _mix(rule, W, Y, 3)
    assert not torch.equal(merged, Y) and sent.sum() > 0


RING = ["mode=decentralized", "data.n_clients=4", "rounds=2", "client.steps=3", "model.name=mlp",
        "model.options={hidden=[16]}", "output.save=false", "output.progress=false", "evaluation.every=1"]


def test_dimat_runs_from_the_config_and_sends_only_in_merge_rounds():
    result = run(None, [*RING, "decentralized.algorithm=dimat", "decentralized.dimat_period=2"])
    rounds = [r for r in result.history if "bytes_up" in r]
    assert [r["bytes_up"] > 0 for r in rounds] == [False, True]
    assert 0 < result.summary["node_accuracy_mean"] <= 1
    with pytest.raises(ConfigError, match="dimat_period applies to algorithm = 'dimat'"):
        load_config(None, [*RING, "decentralized.dimat_period=2"])
    with pytest.raises(ConfigError, match="dimat_method"):
        load_config(None, [*RING, "decentralized.algorithm=dimat", "decentralized.dimat_method=ot"])


def test_nodes_from_their_own_initializations_are_where_dimat_and_dsgd_part():
    from fedloom.config import load_config
    from fedloom.rounds.decentralized import DecentralizedRound

    X = DecentralizedRound(load_config(None, [*RING, "decentralized.own_init=true"])).init_state()["X"]
    assert all(not torch.equal(X[0], X[i]) for i in range(1, len(X)))
    summaries = {rule: run(None, [*RING, "decentralized.own_init=true", f"decentralized.algorithm={rule}"]).summary
                 for rule in ("dsgd", "dimat")}
    assert summaries["dsgd"]["consensus_distance"] != summaries["dimat"]["consensus_distance"]
