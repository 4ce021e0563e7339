"""Robust aggregators, Byzantine attacks and update validation (issue 6)."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedloom.aggregation.robust  # noqa: F401  (registers the robust aggregators)
from fedloom.aggregation.base import make_aggregator
from fedloom.aggregation.validate import reject_invalid
from fedloom.attacks import ATTACKS, alie, alie_z, flip_labels, gaussian, ipm, sample_byzantine, scaling, signflip

FEW = settings(max_examples=15, deadline=None)

# (aggregator, options) pairs; every one accepts n >= 7 clients.
CASES = [
    ("median", {}),
    ("trimmed_mean", {"beta": 0.2}),
    ("krum", {"f": 1}),
    ("multikrum", {"f": 1}),
    ("bulyan", {"f": 1}),
    ("geomed", {}),
    ("centered_clipping", {"tau": 1.0, "iterations": 3, "momentum": 0.5}),
    ("norm_clip", {"max_norm": 1.0}),
    ("flag", {}),
    ("flag", {"m": 2, "lam": 1.0}),
]
IDS = [f"{name}{'-' + '-'.join(map(str, o.values())) if o else ''}" for name, o in CASES]


def run(name: str, options: dict, U: torch.Tensor, w: torch.Tensor | None = None, state=None) -> torch.Tensor:
    agg = make_aggregator(name, **options)
    w = torch.ones(U.shape[0], dtype=U.dtype) if w is None else w
    return agg(U, w, agg.init(U.shape[1]) if state is None else state)[0]


def data(seed: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(d, generator=gen, dtype=torch.float64) + torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    return U, w, gen


# ---------------------------------------------------------------- properties of every aggregator


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
@FEW
@given(n=st.integers(7, 12), d=st.integers(1, 6), seed=st.integers(0, 2**20))
def test_permutation_invariant(name, options, n, d, seed):
    U, w, gen = data(seed, n, d)
    state = torch.randn(d, generator=gen, dtype=torch.float64)  # only centered clipping reads it
    perm = torch.randperm(n, generator=gen)
    a = run(name, options, U, w, state)
    b = run(name, options, U[perm], w[perm], state)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# options under which a clipping rule leaves an update whole
UNCLIPPED = {"centered_clipping": {"tau": 1e9, "momentum": 0.0}, "norm_clip": {"max_norm": 1e9}}


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
@FEW
@given(n=st.integers(7, 12), d=st.integers(1, 6), seed=st.integers(0, 2**20), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_identical_rows_give_that_row(name, options, n, d, seed, scale):
    row = scale * torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    U, w, _ = data(seed, n, d)
    out = run(name, UNCLIPPED.get(name, options), row.expand(n, d).clone(), w)
    torch.testing.assert_close(out, row, rtol=1e-6, atol=1e-9 * scale)


def box(H: torch.Tensor) -> float:
    """Diagonal of the honest rows' coordinate-wise bounding box."""
    return float(torch.linalg.vector_norm(H.max(0).values - H.min(0).values))


def radius(H: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(H - H.mean(0), dim=1).max())


def biggest(H: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(H, dim=1).max())


def geomed_bound(H: torch.Tensor, f: int, n: int) -> float:
    """Minsker (2015), Lemma 2.1: fewer than alpha*n points outside B(x, r) put the geometric
    median within (1 - alpha) / sqrt(1 - 2 alpha) * r of x."""
    alpha = (f + 0.5) / n
    return (1 - alpha) / math.sqrt(1 - 2 * alpha) * radius(H)


def clip_bound(H: torch.Tensor, f: int, n: int) -> float:
    """Honest rows unclipped, f rows of norm <= the clip radius: mean off by f/n (radius + |honest mean|)."""
    return f / n * (biggest(H) + float(torch.linalg.vector_norm(H.mean(0))))


# name -> (options for f Byzantine of n, least n for f, distance bound from the honest mean)
ROBUST = {
    "median": (lambda f, n: {}, lambda f: 2 * f + 1, lambda H, f, n: box(H)),
    "trimmed_mean": (lambda f, n: {"beta": (f + 0.5) / n}, lambda f: 2 * f + 2, lambda H, f, n: box(H)),
    "krum": (lambda f, n: {"f": f}, lambda f: 2 * f + 3, lambda H, f, n: radius(H)),
    "multikrum": (lambda f, n: {"f": f}, lambda f: 2 * f + 3, lambda H, f, n: radius(H)),
    "bulyan": (lambda f, n: {"f": f}, lambda f: 4 * f + 3, lambda H, f, n: box(H)),
    "geomed": (lambda f, n: {}, lambda f: 2 * f + 2, geomed_bound),
    "centered_clipping": (lambda f, n: {"tau": None, "momentum": 0.0}, lambda f: 2 * f + 1, clip_bound),
    "norm_clip": (lambda f, n: {"max_norm": None}, lambda f: 2 * f + 1, clip_bound),
    "flag": (lambda f, n: {}, lambda f: 2 * f + 1, lambda H, f, n: 2 * biggest(H)),
}


def attacked(seed: int, f: int, extra: int, d: int, collude: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Honest rows (a shared direction plus noise) followed by f rows moved ~1e6 away."""
    gen = torch.Generator().manual_seed(seed)
    H = 3 * torch.randn(d, generator=gen, dtype=torch.float64) + torch.randn(extra, d, generator=gen, dtype=torch.float64)
    far = torch.nn.functional.normalize(torch.randn(1 if collude else f, d, generator=gen, dtype=torch.float64), dim=1)
    return torch.cat([H, 1e6 * far.expand(f, d)]), H, extra + f


@pytest.mark.parametrize("name", ROBUST)
@FEW
@given(f=st.integers(1, 3), slack=st.integers(0, 4), d=st.integers(1, 8), seed=st.integers(0, 2**20), collude=st.booleans())
def test_far_byzantine_rows_move_output_a_bounded_distance(name, f, slack, d, seed, collude):
    options_for, least, bound = ROBUST[name]
    U, H, n = attacked(seed, f, least(f) - f + slack, d, collude)
    options = {k: (biggest(H) if v is None else v) for k, v in options_for(f, n).items()}
    out = run(name, options, U)
    assert float(torch.linalg.vector_norm(out - H.mean(0))) <= bound(H, f, n) * (1 + 1e-6) + 1e-9


@FEW
@given(f=st.integers(1, 3), d=st.integers(1, 8), seed=st.integers(0, 2**20))
def test_mean_is_not_robust(f, d, seed):
    U, H, _ = attacked(seed, f, 2 * f + 1, d, collude=True)
    out = run("mean", {}, U)
    assert float(torch.linalg.vector_norm(out - H.mean(0))) > 1e3 * (box(H) + biggest(H))


# ---------------------------------------------------------------- hand-computed cases


def test_median_by_hand():
    U = torch.tensor([[1.0, 5.0], [3.0, 2.0], [2.0, 9.0]])
    torch.testing.assert_close(run("median", {}, U), torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(run("median", {}, torch.tensor([[1.0], [2.0], [3.0], [10.0]])), torch.tensor([2.5]))


def test_trimmed_mean_by_hand():
    U = torch.tensor([[1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])
    torch.testing.assert_close(run("trimmed_mean", {"beta": 0.2}, U), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(run("trimmed_mean", {"beta": 0.0}, U), U.mean(0))


KRUM_ROWS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [50.0, 50.0]])


def test_krum_picks_the_expected_row():
    # f=1, so each score sums the 5 - 1 - 2 = 2 smallest squared distances:
    # [0,0]: 1 + 1 = 2; [1,0] and [0,1]: 1 + 2 = 3; [2,2]: 5 + 5 = 10; [50,50]: far more
    torch.testing.assert_close(run("krum", {"f": 1}, KRUM_ROWS), torch.tensor([0.0, 0.0]))
    perm = torch.tensor([4, 2, 0, 3, 1])
    torch.testing.assert_close(run("krum", {"f": 1}, KRUM_ROWS[perm]), torch.tensor([0.0, 0.0]))


def test_multikrum_weighted_mean_of_the_best_rows():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # the three best scores are rows 0, 1, 2: weighted mean (1*[0,0] + 2*[1,0] + 3*[0,1]) / 6
    torch.testing.assert_close(run("multikrum", {"f": 1, "m": 3}, KRUM_ROWS, w), torch.tensor([1 / 3, 1 / 2]))


def test_bulyan_without_byzantine_clients_is_the_mean():
    U, _, _ = data(0, 9, 4)
    torch.testing.assert_close(run("bulyan", {"f": 0}, U), U.mean(0))


def test_too_few_clients_is_a_clear_error():
    with pytest.raises(ValueError, match="2f \\+ 3"):
        run("krum", {"f": 2}, torch.randn(6, 3))
    with pytest.raises(ValueError, match="4f \\+ 3"):
        run("bulyan", {"f": 2}, torch.randn(10, 3))
    with pytest.raises(ValueError, match="beta"):
        make_aggregator("trimmed_mean", beta=0.5)


def test_geometric_median_matches_scipy():
    optimize = pytest.importorskip("scipy.optimize")
    U, w, _ = data(3, 7, 3)
    U[0] += 40.0
    out = run("geomed", {"tol": 1e-10, "max_iter": 1000}, U, w)

    def objective(x):
        return float((w * torch.linalg.vector_norm(U - torch.as_tensor(x), dim=1)).sum())

    best = optimize.minimize(objective, U.mean(0).numpy(), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    assert objective(out.numpy()) <= best.fun + 1e-8
    torch.testing.assert_close(out, torch.as_tensor(best.x), atol=1e-5, rtol=0)


def test_centered_clipping_without_clipping_is_momentum_on_the_mean():
    U, w, gen = data(1, 8, 5)
    previous = torch.randn(5, generator=gen, dtype=torch.float64)
    out = run("centered_clipping", {"tau": 1e9, "momentum": 0.9, "iterations": 2}, U, w, previous)
    torch.testing.assert_close(out, 0.9 * previous + 0.1 * (w / w.sum()) @ U)


@FEW
@given(seed=st.integers(0, 2**20), iterations=st.integers(1, 4), tau=st.floats(0.01, 10.0), spread=st.sampled_from([1.0, 1e6]))
def test_centered_clipping_moves_at_most_tau_per_iteration(seed, iterations, tau, spread):
    U, w, gen = data(seed, 9, 4)
    previous = torch.randn(4, generator=gen, dtype=torch.float64)
    out = run("centered_clipping", {"tau": tau, "iterations": iterations, "momentum": 0.5}, spread * U, w, previous)
    assert float(torch.linalg.vector_norm(out - previous)) <= iterations * tau * (1 + 1e-9)


def test_norm_clip_by_hand():
    U = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    torch.testing.assert_close(run("norm_clip", {"max_norm": 1.0}, U, torch.tensor([1.0, 1.0])), torch.tensor([0.45, 0.6]))


def test_flag_ignores_orthogonal_outliers():
    gen = torch.Generator().manual_seed(0)
    H = torch.tensor([5.0, 0.0, 0.0]) + 0.3 * torch.randn(7, 3, generator=gen)
    U = torch.cat([H, 1e6 * torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])])
    out = run("flag", {}, U)
    assert torch.nn.functional.cosine_similarity(out, H.mean(0), dim=0) > 0.99
    assert float(torch.linalg.vector_norm(out)) <= float(torch.linalg.vector_norm(U, dim=1).median()) * (1 + 1e-6)


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_huge_finite_updates_neither_overflow_nor_win(name, options):
    H = 1 + torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    U = torch.cat([H, torch.tensor([[3e38, -3e38, 1e30, 0.0]])])  # finite float32, squares overflow
    out = run(name, options, U)
    assert torch.isfinite(out).all() and float(torch.linalg.vector_norm(out)) <= 2 * biggest(H)


def test_large_d_runs_in_float32():
    U = torch.randn(9, 300_000)
    for name, options in CASES:
        out = run(name, options, U)
        assert out.shape == (300_000,) and out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------- attacks


def byzantine_setup(seed: int, n: int, f: int, d: int = 5):
    gen = torch.Generator().manual_seed(seed)
    U = 2 + torch.randn(n, d, generator=gen, dtype=torch.float64)
    return U, sample_byzantine(n, f, gen), gen


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("omniscient", [False, True])
@FEW
@given(n=st.integers(5, 12), f=st.integers(0, 2), seed=st.integers(0, 2**20))
def test_attacks_leave_honest_rows_untouched(attack, omniscient, n, f, seed):
    U, byz, gen = byzantine_setup(seed, n, f)
    before = U.clone()
    out = ATTACKS[attack][0](U, byz, gen, omniscient=omniscient)
    assert torch.equal(out[~byz], before[~byz]) and torch.equal(U, before)
    assert out.shape == U.shape and torch.isfinite(out).all()


def test_signflip_negates():
    U, byz, gen = byzantine_setup(0, 8, 2)
    torch.testing.assert_close(signflip(U, byz, gen)[byz], -U[byz])
    torch.testing.assert_close(signflip(U, byz, gen, scale=3.0, omniscient=True)[byz], (-3 * U[~byz].mean(0)).expand(2, -1))


def test_scaling_and_ipm():
    U, byz, gen = byzantine_setup(1, 10, 3)
    torch.testing.assert_close(scaling(U, byz, gen)[byz], 10 * U[byz])
    torch.testing.assert_close(ipm(U, byz, gen, epsilon=0.5, omniscient=True)[byz], (-0.5 * U[~byz].mean(0)).expand(3, -1))


def test_gaussian_is_reproducible_from_the_generator():
    U, byz, _ = byzantine_setup(2, 8, 2)
    a = gaussian(U, byz, torch.Generator().manual_seed(5), std=2.0)
    b = gaussian(U, byz, torch.Generator().manual_seed(5), std=2.0)
    c = gaussian(U, byz, torch.Generator().manual_seed(6), std=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_alie_z_follows_the_paper():
    # n=50, f=12: s = floor(26) - 12 = 14 supporters, z = Phi^-1(36 / 50)
    assert alie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(0.72))
    with pytest.raises(ValueError, match="pass z"):
        alie_z(10, 6)


def test_alie_rows_sit_inside_the_honest_range():
    gen = torch.Generator().manual_seed(0)
    n, f, d = 50, 12, 64
    U = torch.randn(n, d, generator=gen, dtype=torch.float64)
    byz = torch.zeros(n, dtype=torch.bool)
    byz[:f] = True
    out = alie(U, byz, gen, omniscient=True)[byz]
    H = U[~byz]
    torch.testing.assert_close(out, (H.mean(0) - alie_z(n, f) * H.std(0)).expand(f, -1))
    assert (out >= H.min(0).values).all() and (out <= H.max(0).values).all()
    own = alie(U, byz, gen, z=1.0)[byz]  # non-omniscient: statistics of the attackers' own rows
    torch.testing.assert_close(own, (U[byz].mean(0) - U[byz].std(0)).expand(f, -1))


def test_omniscient_attack_without_honest_rows_fails_clearly():
    U = torch.randn(3, 2)
    with pytest.raises(ValueError, match="honest"):
        ipm(U, torch.ones(3, dtype=torch.bool), None, omniscient=True)


def test_sample_byzantine_draws_exactly_f():
    a = sample_byzantine(20, 6, torch.Generator().manual_seed(1))
    b = sample_byzantine(20, 6, torch.Generator().manual_seed(1))
    assert a.dtype == torch.bool and int(a.sum()) == 6 and torch.equal(a, b)
    with pytest.raises(ValueError):
        sample_byzantine(3, 4)


def test_flip_labels():
    assert flip_labels(torch.tensor([0, 1, 9]), 10).tolist() == [9, 8, 0]


# ---------------------------------------------------------------- validation


def test_invalid_rows_are_rejected_and_counted():
    good = [torch.ones(4), 2 * torch.ones(4)]
    rows = [good[0], torch.tensor([1.0, math.nan, 0.0, 0.0]), torch.ones(3), good[1],
            torch.tensor([0.0, math.inf, 0.0, 0.0]), torch.ones(2, 2)]
    w = torch.arange(1.0, 7.0)
    U, w_ok, rejected = reject_invalid(rows, w, 4)
    assert rejected.tolist() == [False, True, True, False, True, True]
    assert torch.equal(U, torch.stack(good)) and w_ok.tolist() == [1.0, 4.0]


def test_valid_matrix_passes_through_and_bad_weights_are_rejected():
    U = torch.randn(3, 4)
    out, w, rejected = reject_invalid(U, torch.ones(3), 4)
    assert out is U and not rejected.any()
    out, w, rejected = reject_invalid(U, torch.tensor([1.0, -1.0, math.nan]), 4)
    assert rejected.tolist() == [False, True, True] and torch.equal(out, U[:1])


def test_all_rejected_is_a_clear_error():
    with pytest.raises(ValueError, match="all 3 update rows were rejected: 1 held NaN/Inf, 2 were not of length d=4"):
        reject_invalid([torch.full((4,), math.nan), torch.ones(5), torch.ones(1)], torch.ones(3), 4)
    with pytest.raises(ValueError, match="all 2 update rows"):
        reject_invalid(torch.ones(2, 5), torch.ones(2), 4)


def _krum_pick_by_hand(U: torch.Tensor, f: int) -> int:
    """Krum's pick from distances computed directly on float64 differences (no Gram matrix)."""
    X = U.double()
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(dim=2)
    k = U.shape[0] - f - 2
    scores = [sorted(D[i].tolist()[:i] + D[i].tolist()[i + 1 :])[:k] for i in range(len(U))]
    return min(range(len(U)), key=lambda i: sum(scores[i]))


def test_krum_keeps_its_digits_on_rows_sharing_a_huge_common_part():
    # spread / norm = 1e-4: a float32 Gram matrix rounds the distances (about 1e-8 of ||x||^2)
    # away; the centred float64 one keeps them
    gen = torch.Generator().manual_seed(4)
    common = 100.0 * torch.randn(512, generator=gen)
    offsets = torch.randn(9, 512, generator=gen) * torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0])[:, None]
    U = (common + 1e-4 * float(common.norm()) / 512**0.5 * offsets).float()
    best = _krum_pick_by_hand(U, f=2)
    torch.testing.assert_close(run("krum", {"f": 2}, U), U[best], rtol=0, atol=0)
    torch.testing.assert_close(run("multikrum", {"f": 2, "m": 1}, U), U[best], rtol=0, atol=0)


def test_bulyan_shares_ties_at_the_window_edge():
    # n = 7, f = 1: theta = n - 2f = 5 picks, the 5 rows near 0 (the two at +-1000 are far from
    # everything), and beta = theta - 2f = 3 values per coordinate.
    # Coordinate 0 of the kept rows: -1, -1, 0, 1, 5 (ALIE-like repeated values left of the median 0);
    # the 3 nearest the median: 0, then 2 of the three values at distance 1 (-1, -1, 1), which share
    # the 2 slots: (0 + 2 * (-1 - 1 + 1) / 3) / 3 = -2/9. The old window rule took -1, -1, 0: -2/3.
    # Coordinate 1: 2, 2, 3, 4, 4 -> 3 and two of {2, 2, 4, 4}: (3 + 2 * 3) / 3 = 3 (old: 7/3).
    kept = torch.tensor([[-1.0, 2.0], [-1.0, 2.0], [0.0, 3.0], [1.0, 4.0], [5.0, 4.0]])
    U = torch.cat([kept, torch.tensor([[1000.0, 1000.0], [-1000.0, -1000.0]])])
    torch.testing.assert_close(run("bulyan", {"f": 1}, U), torch.tensor([-2 / 9, 3.0]))
    torch.testing.assert_close(run("bulyan", {"f": 1}, U[torch.tensor([6, 3, 0, 5, 2, 4, 1])]), torch.tensor([-2 / 9, 3.0]))
