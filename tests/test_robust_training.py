"""Robust aggregation inside training, and updates that must never reach the model."""

import torch

from fedloom.runner import run
from helpers import stepper, train_once


def _poison(exp, rows):
    real = exp.engine.run_round

    def run_round(*args, **kwargs):
        result = real(*args, **kwargs)
        result.U[rows] = float("nan")
        return result

    exp.engine.run_round = run_round


def test_nan_updates_are_rejected_and_counted(quick):
    exp = stepper(*quick, "evaluation.federated=false")
    _poison(exp, [0, 3])
    record = exp.round(1)
    assert record["n_rejected"] == 2 and torch.isfinite(exp.state["x"]).all()
    assert record["bytes_up"] == 8 * 4 * exp.spec.dim


def test_a_round_with_only_bad_updates_keeps_the_model(quick):
    exp = stepper(*quick, "evaluation.federated=false")
    before = exp.state["x"].clone()
    _poison(exp, slice(None))
    record = exp.round(1)
    assert record["n_rejected"] == 10 and torch.equal(exp.state["x"], before)


def test_robust_aggregators_train_and_compose_with_fedadam(quick):
    for aggregator in (["server.aggregator.name=median"],
                       ["server.aggregator.name=trimmed_mean", "server.aggregator.options.beta=0.2", "algorithm.name=fedadam"]):
        result = run(None, [*quick, *aggregator, "rounds=20", "evaluation.every=20", "evaluation.federated=false"])
        assert result.final["central_accuracy"] > 0.6, aggregator


# ---------------------------------------------------------------- attacks inside training
import pytest  # noqa: E402

from fedloom.aggregation.base import weighted_mean  # noqa: E402
from fedloom.attacks import signflip  # noqa: E402
from fedloom.config import ConfigError, load_config  # noqa: E402

FULL = ["data.n_clients=20", "sampling.clients_per_round=20", "evaluation.federated=false", "client.epochs=1"]


def test_byzantine_rows_are_crafted_from_the_honest_ones(quick):
    clean = stepper(*quick, *FULL)
    attacked = stepper(*quick, *FULL, "attack.name=signflip", "attack.f=5", "attack.options.scale=3.0")
    honest = train_once(clean, clean.state["x"], range(20))
    record = attacked.round(1)
    byz = attacked.adversary.byzantine(1)
    assert record["n_byzantine"] == 5 and int(byz.sum()) == 5
    expected = clean.state["x"] - weighted_mean(signflip(honest.U, byz, scale=3.0), honest.weights)
    assert torch.allclose(attacked.state["x"], expected, atol=1e-5)


def test_fixed_attackers_stay_and_redrawn_ones_move(quick):
    fixed = stepper(*quick, *FULL, "attack.name=gaussian", "attack.fraction=0.25")
    moving = stepper(*quick, *FULL, "attack.name=gaussian", "attack.fraction=0.25", "attack.redraw=true")
    assert torch.equal(fixed.adversary.byzantine(1), fixed.adversary.byzantine(2))
    assert all(int(moving.adversary.byzantine(r).sum()) == 5 for r in (1, 2, 3))
    assert not all(torch.equal(moving.adversary.byzantine(1), moving.adversary.byzantine(r)) for r in (2, 3))


def test_label_flip_poisons_only_the_byzantine_clients_training_labels(quick):
    clean = stepper(*quick, *FULL)
    flipped = stepper(*quick, *FULL, "attack.name=label_flip", "attack.f=4")
    changed = flipped.data.y != clean.data.y
    byz = flipped.adversary.byzantine(1).nonzero().flatten().tolist()
    poisoned = torch.cat([clean.data.train_idx[c] for c in byz])
    assert torch.equal(changed.nonzero().flatten().sort().values, poisoned.sort().values)
    assert torch.equal(flipped.data.y[poisoned], 9 - clean.data.y[poisoned])
    assert torch.equal(flipped.data.y_test, clean.data.y_test)


def test_signflip_breaks_the_mean_and_not_the_median(quick):
    attack = [*FULL, "attack.name=signflip", "attack.fraction=0.2", "attack.options.scale=4.0", "rounds=15",
              "evaluation.every=15"]
    mean = run(None, [*quick, *attack])
    median = run(None, [*quick, *attack, "server.aggregator.name=median"])
    assert mean.final["central_accuracy"] < 0.3
    assert median.final["central_accuracy"] > 0.6


@pytest.mark.parametrize("overrides, message", [
    (["attack.name=signflip"], "give the number of Byzantine clients"),
    (["attack.fraction=0.2"], "attack.name is 'none'"),
    (["attack.name=alie", "attack.f=2", "attack.options.scale=2"], "takes no option scale (its options: z)"),
    (["attack.name=label_flip", "attack.f=2", "attack.redraw=true"], "cannot be redrawn"),
    (["attack.name=ipm", "attack.f=200"], "attack.f = 200 is more than data.n_clients = 100"),
    (["server.aggregator.name=kurm"], "unknown aggregator 'kurm'; available: bulyan"),
    (["server.aggregator.name=centered_clipping"], "aggregator 'centered_clipping' needs option tau"),
    (["server.aggregator.name=median", "server.aggregator.options.beta=0.1"], "aggregator 'median' takes no option beta"),
])
def test_attack_config_mistakes_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)
