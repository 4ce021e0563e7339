"""Byzantine nodes in decentralized runs, and the ClippedGossip rule that resists them."""

import pytest
import torch

from fedloom.algorithms.gossip import ClippedGossip, adaptive_radius, mean_gossip
from fedloom.attacks import Adversary, alie_z
from fedloom.config import ConfigError, load_config
from fedloom.rounds.decentralized import byzantine_messages
from helpers import stepper
from fedloom.topology import complete, gossip, max_degree, metropolis_hastings, torus

TORUS = metropolis_hastings(torus(16))  # 4 x 4, every weight 1/5


def _points(n=16, d=30, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_mean_gossip_of_honest_nodes_is_exactly_w_times_x():
    X = _points()
    assert torch.equal(mean_gossip(TORUS, X, X), gossip(TORUS, X))


def test_clipped_gossip_with_a_large_radius_is_plain_gossip():
    X = _points()
    torch.testing.assert_close(ClippedGossip(tau=1e9)(TORUS, X, X), gossip(TORUS, X), rtol=1e-5, atol=1e-6)


def test_a_fixed_radius_bounds_each_neighbours_pull():
    W = max_degree(complete(5))  # every weight 1/5, diagonal included
    X = torch.zeros(5, 2)
    X[1:, 0] = torch.tensor([1.0, 2.0, 3.0, 10.0])
    mixed = ClippedGossip(tau=2.0)(W, X, X)
    assert mixed[0].tolist() == pytest.approx([0.2 * (1 + 2 + 2 + 2), 0.0])


def test_adaptive_radius_clips_the_farthest_neighbours_holding_delta_of_the_weight():
    rows = torch.zeros(4, dtype=torch.long)
    weights = torch.full((4,), 0.2)
    distances = torch.tensor([1.0, 10.0, 2.0, 3.0])
    assert adaptive_radius(1, rows, weights, distances, delta=0.2).item() == 3.0  # the farthest alone
    assert adaptive_radius(1, rows, weights, distances, delta=0.3).item() == 2.0  # two are needed for 0.3
    assert adaptive_radius(1, rows, weights, distances, delta=0.9).item() == 0.0  # every neighbour: keep own model


def test_adaptive_clipped_gossip_moves_by_the_clipped_differences():
    W = max_degree(complete(5))
    X = torch.zeros(5, 2)
    X[1:, 0] = torch.tensor([1.0, 2.0, 3.0, 10.0])
    mixed = ClippedGossip(delta=0.2)(W, X, X)
    assert mixed[0, 0].item() == pytest.approx(0.2 * (1 + 2 + 3 + 3))  # 10 clipped to the next distance, 3


def _consensus_under_signflip(rule, steps=40):
    """Honest nodes average their points while node 5 sends the negation of its own: how far does
    the honest mean drift, and how far apart do the honest nodes stay?"""
    X = _points() + 3.0
    adversary = Adversary("signflip", 16, 0, seed=0)
    adversary.fixed = torch.zeros(16, dtype=torch.bool)
    adversary.fixed[5] = True
    messages = byzantine_messages(adversary)
    target = X[~adversary.fixed].mean(0)
    for r in range(steps):
        X = rule(TORUS, X, messages(X, list(range(16)), r))
    honest = X[~adversary.fixed]
    return float((honest.mean(0) - target).norm() / target.norm()), float((honest - honest.mean(0)).norm(dim=1).max())


def test_clipped_gossip_keeps_the_honest_consensus_that_a_sign_flipping_node_destroys():
    mean_drift, _ = _consensus_under_signflip(mean_gossip)
    clipped_drift, clipped_spread = _consensus_under_signflip(ClippedGossip())
    assert mean_drift > 0.9  # the honest nodes are dragged to 0, the fixed point of x <- -x
    assert clipped_drift < 0.15 and clipped_spread < 0.5


def test_byzantine_nodes_send_the_attack_on_the_active_models():
    X = _points(8, 5)
    adversary = Adversary("alie", 8, 2, seed=3, omniscient=True)
    byz = adversary.fixed
    sent = byzantine_messages(adversary)(X, list(range(8)), 1)
    std, mean = torch.std_mean(X[~byz], dim=0)
    assert torch.equal(sent[~byz], X[~byz])
    torch.testing.assert_close(sent[byz], (mean - alie_z(8, 2) * std).expand(2, -1))


QUICK = ["output.save=false", "output.progress=false", 'mode="decentralized"', "data.n_clients=16",
         "topology.name=torus", "partition.name=iid", "evaluation.federated=false", "client.epochs=1", "rounds=12",
         "evaluation.every=12"]
SIGNFLIP = ["attack.name=signflip", "attack.f=2"]


def _final(*overrides):
    exp = stepper(*QUICK, *overrides)
    for r in range(1, 13):
        record = exp.round(r)
    return exp, record


def test_honest_nodes_keep_training_under_clipped_gossip_and_not_under_plain_gossip():
    _, clean = _final()
    mean_exp, mean = _final(*SIGNFLIP)
    _, clipped = _final(*SIGNFLIP, 'decentralized.gossip="clipped"')
    assert mean["n_byzantine"] == clipped["n_byzantine"] == 2 and clean["n_byzantine"] == 0
    assert clean["node_accuracy_mean"] > 0.88
    assert mean["node_accuracy_min"] < clean["node_accuracy_min"] - 0.15
    assert clipped["node_accuracy_min"] > clean["node_accuracy_min"] - 0.04
    assert clipped["consensus_distance"] < 0.2 < mean["consensus_distance"]
    honest = ~mean_exp.adversary.fixed
    X = mean_exp.state["X"]
    torch.testing.assert_close(mean_exp.final_params(mean_exp.state), X[honest].mean(0))  # x_bar leaves the attackers out


@pytest.mark.parametrize("overrides, message", [
    (["decentralized.clip_tau=1.0"], "clip_tau applies to gossip = 'clipped' (gossip is 'mean')"),
    (['decentralized.gossip="clipped"', 'decentralized.algorithm="gradient_tracking"'],
     "gossip = 'clipped' runs with algorithm = 'dsgd'"),
    (['decentralized.gossip="clipped"', "decentralized.clip_tau=1.0", "decentralized.clip_delta=0.3"],
     "with a fixed clip_tau it has no effect"),
    (['decentralized.gossip="median"'], "decentralized.gossip"),
])
def test_gossip_config_mistakes_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides", [[], ['decentralized.gossip="clipped"', "decentralized.clip_tau=0.5"],
                                       ['decentralized.gossip="clipped"', "decentralized.clip_delta=0.4"]])
def test_a_saved_config_with_every_key_written_loads_again(overrides):
    cfg = load_config(None, overrides)
    assert load_config(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides, message", [
    ([*SIGNFLIP, "attack.redraw=true"], "attack.redraw: Byzantine nodes of a decentralized run are fixed"),
    ([*SIGNFLIP, 'decentralized.algorithm="gradient_tracking"'], "runs with decentralized.algorithm = 'dsgd'"),
])
def test_byzantine_node_mistakes_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*QUICK, *overrides])
