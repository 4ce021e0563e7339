"""DP-FTRL (Kairouz et al. 2021): without noise it is server SGD (with momentum) on the same updates, the
tree's noise per prefix sum, the epoch sampler, the epsilon against dp_accounting and an analytic bound,
resume, and a private digits run that learns."""

import math

import pytest
import torch
from dp_accounting import NeighboringRelation, SingleEpochTreeAggregationDpEvent
from dp_accounting.rdp import RdpAccountant

from fedloom import checkpoint
from fedloom.config import ConfigError, load_config
from fedloom.pipeline.base import Context
from fedloom.privacy.ftrl import ftrl, tree_noise
from fedloom.rounds.federated import epoch_clients
from fedloom.runner import run
from tests.helpers import stepper
from tests.test_privacy import SMALL, _analytic_gaussian_epsilon

FTRL = ['privacy.mechanism="ftrl"']


def _leaves(rounds, m=3, d=6):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(m, d, generator=g, dtype=torch.float64) for _ in range(rounds)]


def _ftrl_models(leaves, lr, momentum, tree_rounds, x0):
    transform, state, x, models = ftrl(len(leaves[0]), 0.0, lr, momentum, tree_rounds, lambda r: 0.0), None, x0, []
    for r, U in enumerate(leaves, start=1):
        out, _, state, _ = transform.apply(U, torch.ones(len(U)), state, Context(r, 0, list(range(len(U))), x))
        x = out[0]
        models.append(x)
    return models


def _sgd_models(leaves, lr, momentum, x0):
    params = torch.nn.Parameter(x0.clone())
    optimizer, models = torch.optim.SGD([params], lr=lr, momentum=momentum), []
    for U in leaves:
        params.grad = U.sum(0) / len(U)
        optimizer.step()
        models.append(params.detach().clone())
    return models


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_without_noise_one_tree_is_server_sgd_with_momentum_on_the_same_updates(momentum):
    leaves, x0 = _leaves(12), torch.linspace(-1, 1, 6, dtype=torch.float64)
    for ours, sgd in zip(_ftrl_models(leaves, 0.3, momentum, 100, x0), _sgd_models(leaves, 0.3, momentum, x0)):
        assert torch.allclose(ours, sgd, rtol=0, atol=1e-12)


def test_restarts_anchor_at_the_current_model_so_without_momentum_it_stays_sgd():
    leaves, x0 = _leaves(11), torch.zeros(6, dtype=torch.float64)
    ours = _ftrl_models(leaves, 0.5, 0.0, 3, x0)  # trees of 3 rounds: restarts at rounds 4, 7, 10
    for a, b in zip(ours, _sgd_models(leaves, 0.5, 0.0, x0)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    with_momentum = _ftrl_models(leaves, 0.5, 0.9, 3, x0)  # the momentum restarts with the tree
    assert torch.allclose(with_momentum[3], with_momentum[2] - 0.5 * leaves[3].mean(0), atol=1e-12)
    assert not torch.allclose(with_momentum[2], ours[2])  # within a tree the momentum is there


def test_each_prefix_sum_holds_one_node_of_noise_per_set_bit_of_its_length():
    d, std, like = 200_000, 0.7, torch.zeros(1)
    noises = {t: tree_noise(d, std, like, 3, 1, t) for t in range(1, 17)}
    for t, noise in noises.items():
        assert noise.var().item() == pytest.approx(bin(t).count("1") * std ** 2, rel=0.02)
        assert bin(t).count("1") <= math.ceil(math.log2(t + 1))  # never more than the tree's levels
    # consecutive prefixes share their nodes: 5 = 4 + leaf 5, and 8 is one node (the first eight leaves)
    assert (noises[5] - noises[4]).var().item() == pytest.approx(std ** 2, rel=0.02)
    assert (noises[7] - noises[6]).var().item() == pytest.approx(std ** 2, rel=0.02)
    assert (noises[8] - noises[7]).var().item() == pytest.approx(4 * std ** 2, rel=0.02)  # 3 nodes out, 1 in
    assert torch.equal(noises[4], tree_noise(d, std, like, 3, 1, 4))  # the same node is the same draw
    assert not torch.equal(noises[4], tree_noise(d, std, like, 3, 9, 4))  # another tree, other noise


def test_the_epoch_sampler_gives_each_client_at_most_one_round_an_epoch():
    n, k = 23, 5  # epochs of 4 rounds, 3 clients sit out each epoch
    rounds = [epoch_clients(n, k, 0, r) for r in range(1, 13)]
    assert all(len(c) == k and len(set(c)) == k for c in rounds)
    for epoch in range(3):
        seen = [c for r in rounds[4 * epoch:4 * epoch + 4] for c in r]
        assert len(seen) == len(set(seen)) == 20
    assert rounds[:4] != rounds[4:8]  # a fresh shuffle each epoch
    assert epoch_clients(n, k, 1, 1) != rounds[0]  # from the seed


@pytest.mark.parametrize("n, m, z, rounds, delta", [(100, 10, 1.0, 25, 1e-5), (50, 50, 2.0, 30, 1e-6),
                                                    (1000, 10, 5.0, 250, 1e-5)])
def test_epsilon_is_dp_accountings_tree_aggregation_and_within_the_analytic_gaussian_bound(n, m, z, rounds, delta):
    cfg = load_config(None, [*FTRL, f"privacy.noise_multiplier={z}", f"privacy.delta={delta}", f"rounds={rounds}",
                             f"data.n_clients={n}", f"sampling.clients_per_round={m}"])
    reported = cfg.privacy_accounting().epsilon(z, rounds)
    epoch = n // m
    full, rest = divmod(rounds, epoch)
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)
    accountant.compose(SingleEpochTreeAggregationDpEvent(z / 2, epoch), full)
    if rest:
        accountant.compose(SingleEpochTreeAggregationDpEvent(z / 2, rest))
    assert reported == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    # a client's leaf moves ceil(log2(E + 1)) nodes of each tree by up to 2 clip, against std z clip: all the
    # nodes released are one Gaussian of mu = 2 sqrt(nodes) / z, whose exact epsilon RDP bounds from above
    nodes = full * math.ceil(math.log2(epoch + 1)) + (math.ceil(math.log2(rest + 1)) if rest else 0)
    exact = _analytic_gaussian_epsilon(z, nodes, delta)  # T Gaussians of sensitivity 2, std z
    assert exact < reported < 1.12 * exact


def test_a_resumed_ftrl_run_ends_with_the_uninterrupted_model(tmp_path):
    ftrl_run = [*SMALL, *FTRL, "privacy.noise_multiplier=0.8", "server.momentum=0.5", "server.lr=0.5"]
    whole = run(None, [*ftrl_run, f"output.dir={str(tmp_path)!r}", "checkpoint.every=4"])
    assert whole.summary["pipeline"][-2:] == ["dp_clip (server)", "dp_ftrl (server)"]
    three_rounds = stepper(*ftrl_run, "output.save=false")  # epochs of 4 rounds: stop inside the first tree
    three_rounds.round(1), three_rounds.round(2), three_rounds.round(3)
    checkpoint.save(whole.run_dir / checkpoint.CHECKPOINT, three_rounds.state)
    resumed = run(None, [], resume=whole.run_dir)
    assert torch.equal(resumed.params, whole.params)
    assert resumed.summary["epsilon"] == whole.summary["epsilon"] > 0
    no_noise = run(None, [*SMALL, "output.save=false", "server.momentum=0.5", "server.lr=0.5"])
    assert not torch.equal(no_noise.params, resumed.params)


DIGITS = ["rounds=10", "data.n_clients=100", "sampling.clients_per_round=20", "client.epochs=1",
          'model.name="logistic"', 'partition.name="iid"', "evaluation.federated=false", "output.progress=false",
          "output.save=false", "privacy.noise_multiplier=1.0", "server.momentum=0.9", "server.lr=0.5"]


def test_a_private_ftrl_digits_run_learns():
    result = run(None, [*DIGITS, *FTRL])
    assert result.summary["central_accuracy"] > 0.5  # chance is 0.1; measured 0.73, 0.71, 0.68 at seeds 0, 1, 2
    epsilons = [r["epsilon"] for r in result.history if "epsilon" in r]
    assert epsilons == sorted(epsilons) and epsilons[-1] == result.summary["epsilon"]


@pytest.mark.parametrize("overrides, names", [
    ([*FTRL, "privacy.noise_multiplier=1.0", 'server.optimizer="adam"'], "server.optimizer"),
    ([*FTRL, "privacy.noise_multiplier=1.0", 'privacy.accountant="pld"'], "privacy.accountant"),
    ([*FTRL, "privacy.noise_multiplier=1.0", 'mode="decentralized"'], "privacy.mechanism"),
])
def test_ftrl_configs_that_cannot_run_are_refused_naming_the_key(overrides, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, overrides)
