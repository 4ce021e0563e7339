"""Decentralized runs: D-SGD, gradient tracking, CHOCO-SGD, participation and churn."""

import json

import pytest
import torch

from fedloom import evaluation
from fedloom.tasks import Classification
from fedloom.config import ConfigError, load_config
from fedloom.core.params import ParamSpec
from fedloom.runner import run
from helpers import stepper, train_once
from fedloom.models import MODELS
from fedloom.topology import active_subgraph, consensus_distance

EQUAL_CLIENTS = ["data.n_clients=10", "data.test_fraction=0.21", "data.client_test_fraction=0", "partition.name=iid"]
GOSSIP = ['mode="decentralized"', "evaluation.federated=false"]


def _decentralized(quick, *overrides):
    return stepper(*quick, *GOSSIP, *overrides)


def test_complete_graph_dsgd_equals_fedavg_with_full_participation(quick):
    fedavg = stepper(*quick, *EQUAL_CLIENTS, "sampling.clients_per_round=10")
    dsgd = _decentralized(quick, *EQUAL_CLIENTS, "topology.name=complete")
    assert len(set(fedavg.data.client_sizes().tolist())) == 1  # FedAvg's weights are then uniform, as gossip's
    for r in range(1, 4):
        fedavg.round(r)
        record = dsgd.round(r)
        assert record["consensus_distance"] < 1e-9
        X = dsgd.state["X"]
        torch.testing.assert_close(X, fedavg.state["x"].expand_as(X), rtol=1e-5, atol=1e-6)


def test_ring_keeps_nodes_apart_and_gossip_preserves_the_mean_of_local_models(quick):
    exp = _decentralized(quick, "data.n_clients=16", "topology.name=ring", "partition.options.alpha=0.1")
    start = exp.state["X"].clone()
    result = train_once(exp, start, range(16))
    exp.round(1)
    X = exp.state["X"]
    assert consensus_distance(X) > 0
    torch.testing.assert_close(X.mean(0), (start - result.U).mean(0), rtol=1e-5, atol=1e-6)


def test_gradient_tracking_corrections_sum_to_zero_and_help_on_a_ring(quick):
    common = ["data.n_clients=32", "topology.name=ring", "partition.options.alpha=0.1", "client.steps=5", "client.lr=0.1",
              "rounds=20", "evaluation.every=20"]
    tracking = _decentralized(quick, *common, "decentralized.algorithm=gradient_tracking")
    for r in range(1, 4):
        tracking.round(r)
    c = torch.stack([tracking.state["clients"][i]["c"] for i in range(32)])
    assert c.abs().sum() > 0
    torch.testing.assert_close(c.sum(0), torch.zeros(c.shape[1]), atol=1e-4, rtol=0)
    dsgd = run(None, [*quick, *GOSSIP, *common])
    gt = run(None, [*quick, *GOSSIP, *common, "decentralized.algorithm=gradient_tracking"])
    assert gt.final["node_accuracy_mean"] > dsgd.final["node_accuracy_mean"] + 0.05


def test_choco_sends_compressed_models_and_still_learns(quick):
    common = ["data.n_clients=16", "topology.name=exponential", "rounds=15", "evaluation.every=15", "client.steps=5",
              "client.lr=0.1"]
    dense = run(None, [*quick, *GOSSIP, *common])
    choco = run(None, [*quick, *GOSSIP, *common, "decentralized.algorithm=choco", "compression.name=topk",
                       "compression.options.k=0.1"])
    assert choco.final["bytes_per_node_total"] < dense.final["bytes_per_node_total"] / 4
    assert choco.final["xbar_accuracy"] > 0.6


def test_choco_needs_a_compressor(quick):
    with pytest.raises(ConfigError, match="choco.*compression"):
        load_config(None, [*GOSSIP, "decentralized.algorithm=choco"])


def test_participation_trains_only_active_nodes(quick):
    exp = _decentralized(quick, "data.n_clients=20", "topology.name=complete", "decentralized.participation=0.5")
    before = exp.state["X"].clone()
    record = exp.round(1)
    moved = (exp.state["X"] != before).any(dim=1)
    assert record["n_active"] == 10 and int(moved.sum()) == 10
    assert torch.equal(moved, exp.active_nodes(1))


def test_churn_that_disconnects_the_graph_is_reported(quick):
    exp = _decentralized(quick, "data.n_clients=20", "topology.name=ring", "decentralized.churn=0.3")
    with pytest.raises(ValueError, match="components"):
        for r in range(1, 6):
            exp.round(r)


def test_bad_topologies_are_refused(quick):
    with pytest.raises(ConfigError, match="unknown topology 'hypercube'"):
        load_config(None, [*GOSSIP, "topology.name=hypercube"])
    with pytest.raises(ValueError, match="topology.matrix.*(stochastic|sum)"):
        _decentralized(quick, "data.n_clients=3", "topology.matrix=[[0.5, 0.5, 0], [0.5, 0.6, 0], [0, 0, 1]]")
    with pytest.raises(ValueError, match="3x3.*4 nodes"):
        _decentralized(quick, "data.n_clients=4", "topology.matrix=[[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]")


def test_decentralized_run_directory_has_node_plots(saved):
    result = run(None, [*saved, *GOSSIP, "data.n_clients=16", "topology.name=torus", "rounds=2"])
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"nodes.png", "consensus.png", "graph.png", "metrics.jsonl", "report.html"} <= files
    assert result.summary["spectral_gap"] > 0 and result.summary["mode"] == "decentralized"
    graph = json.loads((result.run_dir / "graph.json").read_text())
    assert graph["n_nodes"] == 16 and len(graph["edges"]) == 32  # a 4x4 torus: every node has 4 neighbours
    assert graph["byzantine"] == []


def test_graph_drawing_is_kept_for_small_fixed_graphs_only(quick):
    byzantine = _decentralized(quick, "data.n_clients=8", "topology.name=ring", "attack.name=signflip", "attack.f=2")
    record = byzantine.graph_record()
    assert sorted(map(tuple, record["edges"])) == [(0, 1), (0, 7), *((i, i + 1) for i in range(1, 7))]
    assert len(record["byzantine"]) == 2
    user = _decentralized(quick, "data.n_clients=3", "topology.matrix=[[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]")
    assert user.graph_record()["edges"] == [[0, 1], [1, 2]]
    assert _decentralized(quick, "data.n_clients=8", "topology.name=random_matching").graph_record() is None
    assert _decentralized(quick, "data.n_clients=101", "topology.name=ring").graph_record() is None


def test_static_graph_with_every_node_active_builds_w_once_and_it_equals_the_active_subgraph(quick):
    exp = _decentralized(quick, "data.n_clients=16", "topology.name=exponential")
    everyone = torch.ones(16, dtype=torch.bool)
    first, second = exp.topology.mixing(1, everyone), exp.topology.mixing(2, everyone)
    assert first is second
    torch.testing.assert_close(first.to_dense(), active_subgraph(exp.topology.graph, everyone).to_dense())
    half = torch.arange(16) < 8  # nodes 0..7 are connected by the hops 1, 2, 4 of the exponential graph
    partial = exp.topology.mixing(3, half).to_dense()
    torch.testing.assert_close(partial[8:, 8:], torch.eye(8))


def test_node_accuracies_in_chunks_of_models_and_batches_of_examples_equal_one_model_at_a_time():
    model = MODELS["mlp"][0](input_shape=(6,), n_classes=4, hidden=[5])
    spec = ParamSpec.of(model)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(7, spec.dim, generator=gen)
    x, y = torch.randn(50, 6, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    task = Classification(4)
    one_at_a_time = torch.stack([evaluation.per_example(model, spec, row, x, y, task)["accuracy"][0].mean()
                                 for row in X])
    batched = evaluation.rows_metric(model, spec, X, x, y, task, chunk=3, batch_size=16)  # neither divides 7 or 50
    assert len(set(one_at_a_time.tolist())) > 3  # the rows are different models
    torch.testing.assert_close(batched, one_at_a_time)
    assert model.training
