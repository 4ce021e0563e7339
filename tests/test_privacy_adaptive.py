"""Adaptive clipping (Andrew et al. 2021): the clip reaches the target quantile of the update norms, the
noise split between the clipped sum and the count costs what the plain Gaussian costs, resume, the rules."""

import math

import pytest
import torch
from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
from dp_accounting.pld import PLDAccountant

from fedloom import checkpoint
from fedloom.config import ConfigError, load_config
from fedloom.pipeline.base import Context
from fedloom.privacy import transforms as dp
from fedloom.privacy.accounting import sum_noise_multiplier
from fedloom.runner import run
from tests.helpers import stepper
from tests.test_privacy import SMALL, _analytic_gaussian_epsilon

ADAPTIVE = ['privacy.mechanism="central"', "privacy.adaptive_clip=true"]


def _rows_with_norms(norms, d=5, seed=0):
    directions = torch.randn(len(norms), d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return directions / torch.linalg.vector_norm(directions, dim=1, keepdim=True) * norms[:, None]


def _clip_trajectory(norms, quantile, count_std, rounds=150, clip0=0.1, z_sum=0.0):
    """The clip each round used, over ``rounds`` rounds of the same rows."""
    m = len(norms)
    transform = dp.adaptive_dp_mean(m, clip0, z_sum, count_std, quantile, 0.2, lambda r: 0.0)
    U, state, clips = _rows_with_norms(norms), transform.init(5), []
    for r in range(1, rounds + 1):
        _, _, state, metrics = transform.apply(U, torch.ones(m), state, Context(r, 0, list(range(m)), torch.zeros(5)))
        clips.append(metrics["dp_clip"])
    return clips


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.8])
def test_without_noise_the_clip_reaches_the_target_quantile_of_the_norms(quantile):
    norms = torch.linspace(0.05, 10, 200, dtype=torch.float64)  # the q-quantile is about 10 q
    clips = _clip_trajectory(norms, quantile, count_std=0.0)
    assert clips[0] == 0.1
    last = torch.tensor(clips[-50:])
    below = (norms[None, :] <= last[:, None]).double().mean(1)  # the fraction each late clip leaves unclipped
    assert (below - quantile).abs().max() < 0.03  # the geometric step's one-row dither around the quantile
    assert last.mean().item() == pytest.approx(torch.quantile(norms, quantile).item(), rel=0.03)


def test_with_the_papers_count_noise_the_clip_stays_near_the_quantile():
    norms = torch.linspace(0.05, 10, 200, dtype=torch.float64)
    clips = _clip_trajectory(norms, 0.5, count_std=200 / 20, rounds=200)
    late = torch.tensor(clips[-100:])
    assert late.mean().item() == pytest.approx(torch.quantile(norms, 0.5).item(), rel=0.08)
    # the count's noise (std 0.05 on the fraction) moves log C by about 0.2 * 0.05 a round (measured 1.01 times
    # that; without noise the clip settles and the ratio is 0)
    assert 0.8 < (late.log().diff().std() / (0.2 * 0.05)).item() < 1.25


def test_the_sum_noise_has_std_z_sum_times_the_current_clip_over_m_and_the_rows_are_clipped_to_it():
    m, d, clip0, z_sum = 4, 300_000, 0.6, 1.7
    U = torch.zeros(m, d)
    U[:, 0] = torch.tensor([0.1, 0.2, 5.0, 9.0])  # two rows within the clip, two clipped to it
    transform = dp.adaptive_dp_mean(m, clip0, z_sum, 0.0, 0.5, 0.2, lambda r: 0.0)
    row, _, state, metrics = transform.apply(U, torch.ones(m), transform.init(d), Context(3, 0, [0, 1, 2, 3], U[0]))
    assert row[0, 1:].std().item() == pytest.approx(z_sum * clip0 / m, rel=0.01)
    assert row[0, 0].item() == pytest.approx((0.1 + 0.2 + 2 * clip0) / m, abs=5 * z_sum * clip0 / m)
    exact = dp.adaptive_dp_mean(m, clip0, 0.0, 0.0, 0.5, 0.2, lambda r: 0.0)
    assert exact.apply(U, torch.ones(m), exact.init(d), Context(3, 0, [0, 1, 2, 3], U[0]))[0][0, 0].item() == (
        pytest.approx((0.1 + 0.2 + 2 * clip0) / m))
    assert metrics["dp_below_clip"] == 0.5 and float(state["clip"]) == pytest.approx(clip0)  # at the target: stays


@pytest.mark.parametrize("z, count_std", [(1.0, 0.6), (0.8, 5.0), (2.0, 1.5)])
def test_the_sum_noise_multiplier_makes_the_pair_one_gaussian_of_multiplier_z(z, count_std):
    z_sum = sum_noise_multiplier(z, count_std)
    assert z_sum > z
    # replace one: the sum moves 2C against std z_sum C, the count 1 against count_std; the stacked pair
    # is one Gaussian of multiplier 1 / sqrt((2 / z_sum)^2 + (1 / count_std)^2), the plain round's z / 2
    assert ((2 / z_sum) ** 2 + (1 / count_std) ** 2) ** -0.5 == pytest.approx(z / 2, rel=1e-12)
    rounds, delta = 10, 1e-5
    pair = PLDAccountant(value_discretization_interval=1e-3)  # the two releases of every round, composed
    pair.compose(SelfComposedDpEvent(GaussianDpEvent(z_sum / 2), rounds))
    pair.compose(SelfComposedDpEvent(GaussianDpEvent(count_std), rounds))
    cfg = load_config(None, [*ADAPTIVE, f"privacy.noise_multiplier={z}", f"privacy.count_noise={count_std}",
                             f"rounds={rounds}", "data.n_clients=10", "sampling.clients_per_round=10",
                             'privacy.accountant="pld"', f"privacy.delta={delta}"])
    reported = cfg.privacy_accounting().epsilon(z, rounds)
    assert reported == pytest.approx(pair.get_epsilon(delta), rel=1e-2)  # the coarser grid: measured < 0.2%
    assert reported == pytest.approx(_analytic_gaussian_epsilon(z, rounds, delta), rel=1e-6)
    assert cfg.privacy_sum_noise_multiplier() == z_sum


def test_target_epsilon_calibrates_z_and_the_sum_noise_is_derived_from_it():
    cfg = load_config(None, [*ADAPTIVE, "privacy.target_epsilon=10.0", "rounds=20", "data.n_clients=100",
                             "sampling.clients_per_round=100"])
    z = cfg.privacy_noise_multiplier()
    assert cfg.privacy_accounting().epsilon(z, 20) <= 10.0 < cfg.privacy_accounting().epsilon(0.98 * z, 20)
    assert cfg.privacy_count_noise() == 5.0  # clients_per_round / 20
    assert cfg.privacy_sum_noise_multiplier() == sum_noise_multiplier(z, 5.0)


def test_a_resumed_adaptive_run_follows_the_uninterrupted_clip_and_model(tmp_path):
    adaptive = [*SMALL, *ADAPTIVE, "privacy.noise_multiplier=0.4", "privacy.clip=0.05", "privacy.count_noise=1.0"]
    whole = run(None, [*adaptive, f"output.dir={str(tmp_path)!r}", "checkpoint.every=4"])
    clips = [r["dp_clip"] for r in whole.history if "dp_clip" in r]
    assert len(clips) == 4 and clips[0] == 0.05 and len(set(clips)) == 4  # it moves every round
    assert whole.summary["dp_clip"] == clips[-1]
    two_rounds = stepper(*adaptive, "output.save=false")
    two_rounds.round(1), two_rounds.round(2)
    checkpoint.save(whole.run_dir / checkpoint.CHECKPOINT, two_rounds.state)  # as if killed after round 2
    resumed = run(None, [], resume=whole.run_dir)
    assert torch.equal(resumed.params, whole.params)
    assert [r["dp_clip"] for r in resumed.history if "dp_clip" in r][-2:] == clips[-2:]
    assert resumed.summary["epsilon"] == whole.summary["epsilon"] > 0


@pytest.mark.parametrize("overrides, names", [
    (['privacy.mechanism="local"', "privacy.adaptive_clip=true", "privacy.noise_multiplier=1.0"],
     "privacy.adaptive_clip"),
    (['privacy.mechanism="ftrl"', "privacy.adaptive_clip=true", "privacy.noise_multiplier=1.0"],
     "privacy.adaptive_clip"),
    ([*ADAPTIVE, "privacy.noise_multiplier=1.0", "sampling.clients_per_round=10"], "privacy.count_noise"),
    ([*ADAPTIVE, "privacy.noise_multiplier=1.0", "privacy.count_noise=0.5"], "privacy.count_noise"),
    (["privacy.target_quantile=0.9"], "privacy.mechanism"),
    ([*ADAPTIVE, "privacy.noise_multiplier=0.5", "privacy.target_quantile=1.0"], "privacy.target_quantile"),
])
def test_adaptive_configs_that_cannot_run_are_refused_naming_the_key(overrides, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, overrides)


def test_the_clip_step_is_geometric_from_the_noised_count():
    m = 10
    transform = dp.adaptive_dp_mean(m, 2.0, 0.0, 3.0, 0.5, 0.2, lambda r: 0.0)
    U = _rows_with_norms(torch.full((m,), 1.0, dtype=torch.float64))  # all within the clip
    ctx = Context(7, 4, list(range(m)), torch.zeros(5))
    _, _, state, metrics = transform.apply(U, torch.ones(m), transform.init(5), ctx)
    noise = 3.0 * torch.randn(1, generator=ctx.generator(dp.Stream.NOISE, *dp.COUNT_NOISE_KEY),
                              dtype=torch.float64).item()
    assert metrics["dp_below_clip"] == pytest.approx((m + noise) / m)
    assert float(state["clip"]) == pytest.approx(2.0 * math.exp(-0.2 * ((m + noise) / m - 0.5)))
