"""Partitioners: every example exactly once, seeded, and the heterogeneity each promises."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.data import (
    NEEDS_LABELS,
    PARTITIONERS,
    DataError,
    dirichlet,
    dirichlet_classwise,
    exponential_sizes,
    iid,
    inner_dirichlet,
    linear_sizes,
    natural,
    partition,
    pathological,
    quantity_skew,
    shards,
    square_sizes,
)
from fedloom.data.partition import _fill_order

N_CLASSES = 10
# options the generic tests need: 7 clients of 2 random classes would leave classes nobody holds
OPTIONS = {"pathological": {"classes_per_client": 7}}


@pytest.fixture(scope="module")
def labels():
    """10,000 balanced labels in random order: large enough that sampling noise is small."""
    return np.random.default_rng(0).permutation(np.repeat(np.arange(N_CLASSES), 1000))


@pytest.fixture(scope="module")
def groups(labels):
    return np.random.default_rng(1).integers(0, 7, len(labels)) * 3 + 100  # 7 arbitrary, non-contiguous ids


def run(name, labels, groups, seed, n_clients=7):
    return partition(name, labels, n_clients, np.random.default_rng(seed), groups=groups, **OPTIONS.get(name, {}))


def mean_tv(parts, labels):
    """Mean total-variation distance of client label histograms from the global one."""
    overall = np.bincount(labels, minlength=N_CLASSES) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=N_CLASSES) / len(p) - overall).sum() for p in parts])


def assert_exact_cover(parts, n_examples, n_clients):
    assert len(parts) == n_clients
    for p in parts:
        assert p.dtype == np.int64 and len(p) > 0 and np.all(np.diff(p) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n_examples))


@pytest.mark.parametrize("name", list(PARTITIONERS))
def test_every_example_exactly_once(name, labels, groups):
    assert_exact_cover(run(name, labels, groups, seed=0), len(labels), 7)


@pytest.mark.parametrize("name", list(PARTITIONERS))
def test_same_seed_same_partition(name, labels, groups):
    for a, b in zip(run(name, labels, groups, seed=3), run(name, labels, groups, seed=3)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", [n for n in PARTITIONERS if n != "natural"])
def test_different_seed_different_partition(name, labels, groups):
    first, second = run(name, labels, groups, seed=3), run(name, labels, groups, seed=4)
    assert any(len(a) != len(b) or np.any(a != b) for a, b in zip(first, second))


@settings(max_examples=40, deadline=None)
@given(
    n_examples=st.integers(10, 300),
    n_clients=st.integers(1, 5),
    n_classes=st.integers(1, 6),
    name=st.sampled_from(sorted(set(PARTITIONERS) - {"natural"})),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_cover_property(n_examples, n_clients, n_classes, name, seed):
    labels = np.random.default_rng(seed).integers(0, n_classes, n_examples)
    options = {"dirichlet": {"alpha": 1.0}, "dirichlet_classwise": {"alpha": 1.0, "min_size": 1},
               "pathological": {"classes_per_client": 1}}.get(name, {})
    try:
        parts = partition(name, labels, n_clients, np.random.default_rng(seed), **options)
    except DataError as err:  # only the refusals these partitioners document, for the reason they give
        assert re.search(REFUSALS.get(name, "(never refused)"), str(err)), str(err)
        if name in SIZE_UNITS:  # and truly so: Flower's floor gives the smallest client nothing
            units = SIZE_UNITS[name](np.arange(1.0, n_clients + 1))
            assert int(units[0] / units.sum() * n_examples) == 0
        return
    assert_exact_cover(parts, n_examples, n_clients)


SIZE_UNITS = {"linear": lambda i: i, "square": np.square, "exponential": np.exp}
REFUSALS = {
    "dirichlet_classwise": r"fewer than min_size=1 examples in all 11 draws",
    "pathological": r"no client holds class|held by \d+ clients but has only",
    "linear": r"smallest would get no example",
    "square": r"smallest would get no example",
    "exponential": r"smallest would get no example",
}


def test_dirichlet_alpha_controls_label_skew(labels):
    near_iid = mean_tv(dirichlet(labels, 10, np.random.default_rng(0), alpha=1000.0), labels)
    skewed = mean_tv(dirichlet(labels, 10, np.random.default_rng(0), alpha=0.1), labels)
    reference = mean_tv(iid(labels, 10, np.random.default_rng(0)), labels)
    assert near_iid < 0.05 and near_iid <= 2 * reference
    assert skewed > 0.5


def test_dirichlet_gives_tiny_datasets_equal_nonempty_clients():
    labels = np.arange(1437) % 10
    parts = dirichlet(labels, 100, np.random.default_rng(0), alpha=0.1)
    assert_exact_cover(parts, len(labels), 100)
    assert {len(p) for p in parts} == {14, 15}
    # label skew survives the tiny sizes: most clients hold few classes
    assert np.median([len(np.unique(labels[p])) for p in parts]) <= 3


@pytest.mark.parametrize("n_clients, per_client", [(5, 2), (10, 1), (2, 5)])
def test_shards_limit_classes_per_client(n_clients, per_client):
    aligned = np.random.default_rng(0).permutation(np.repeat(np.arange(N_CLASSES), 100))
    parts = shards(aligned, n_clients, np.random.default_rng(0), classes_per_client=per_client)
    assert_exact_cover(parts, len(aligned), n_clients)
    assert all(len(np.unique(aligned[p])) == per_client for p in parts)


def test_shards_on_iid_data_are_far_from_iid(labels):
    assert mean_tv(shards(labels, 10, np.random.default_rng(0)), labels) > 0.7


def test_quantity_skew_unequal_sizes_iid_labels(labels):
    parts = quantity_skew(labels, 20, np.random.default_rng(0), power=1.5, min_size=2)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() / sizes.min() > 4 and sizes.min() >= 2
    assert mean_tv(parts, labels) < 0.15  # dirichlet(0.1) is above 0.5


def test_quantity_power_controls_the_tail(labels):
    def spread(power):
        draws = [quantity_skew(labels, 20, np.random.default_rng(seed), power=power) for seed in range(10)]
        return np.mean([np.std([len(p) for p in parts]) for parts in draws])

    assert spread(0.8) > spread(5.0)


def test_natural_one_client_per_group(labels, groups):
    parts = natural(labels, None, np.random.default_rng(0), groups)
    assert len(parts) == len(np.unique(groups))
    assert all(len(np.unique(groups[p])) == 1 for p in parts)
    assert [groups[p[0]] for p in parts] == sorted(np.unique(groups))


def test_natural_equals_one_scan_per_group(groups):
    labels = np.zeros(len(groups), np.int64)
    slow = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    fast = natural(labels, None, np.random.default_rng(0), groups)
    assert len(fast) == len(slow) and all(np.array_equal(a, b) for a, b in zip(fast, slow))


def test_natural_client_count_mismatch_is_clear(labels, groups):
    with pytest.raises(DataError, match=r"7 natural clients but data.n_clients = 5; set data.n_clients = 7, or leave"):
        natural(labels, 5, np.random.default_rng(0), groups)
    with pytest.raises(DataError, match="no natural client ids"):
        partition("natural", labels, None, np.random.default_rng(0))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda y: partition("round_robin", y, 3, np.random.default_rng(0)), r"unknown partitioner 'round_robin'.*iid"),
        (lambda y: partition("dirichlet", y, 3, np.random.default_rng(0), beta=1), r"partitioner 'dirichlet' takes no option beta \(its options: alpha\)"),
        (lambda y: iid(y[:5], 6, np.random.default_rng(0)), r"6 clients .* from 5 examples"),
        (lambda y: shards(y[:10], 6, np.random.default_rng(0)), r"6 clients 2 example"),
        (lambda y: iid(y, 0, np.random.default_rng(0)), r"n_clients must be a positive integer"),
        (lambda y: dirichlet(y, 3, np.random.default_rng(0), alpha=0), r"alpha must be > 0"),
    ],
)
def test_bad_arguments_are_clear(labels, call, message):
    with pytest.raises(DataError, match=message):
        call(labels)


# --- Flower Datasets' partitioners ---


def classes_held(parts, labels):
    return [set(np.unique(labels[p]).tolist()) for p in parts]


def test_needs_labels_names_the_label_based_partitioners(labels):
    assert NEEDS_LABELS == {"dirichlet", "shards", "dirichlet_classwise", "pathological", "inner_dirichlet"}
    # the others see only how many examples there are: zeros for labels change nothing
    for name in set(PARTITIONERS) - NEEDS_LABELS - {"natural"}:
        for a, b in zip(run(name, labels, None, seed=5), run(name, np.zeros_like(labels), None, seed=5)):
            np.testing.assert_array_equal(a, b)


def test_dirichlet_classwise_cuts_each_class_in_dataset_order_at_floored_dirichlet_points():
    """Flower's rule: per class (sorted), p ~ Dir(alpha) over clients, the class's examples (in
    dataset order) cut at floor(cumsum(p) * n_class) (the float sum made exactly 1); the draws
    come from rng alone."""
    labels = np.random.default_rng(7).integers(0, 3, 90)
    alpha = [0.5, 1.0, 2.0, 4.0]
    parts = dirichlet_classwise(labels, 4, np.random.default_rng(11), alpha=alpha, min_size=1)
    draws = np.random.default_rng(11)
    expected = [[] for _ in range(4)]
    for c in range(3):
        members = np.flatnonzero(labels == c)
        cumulative = np.cumsum(draws.dirichlet(alpha))
        cuts = np.floor(cumulative / cumulative[-1] * len(members)).astype(int)[:-1]
        for client, piece in enumerate(np.split(members, cuts)):
            expected[client] += piece.tolist()
    assert [p.tolist() for p in parts] == [sorted(e) for e in expected]


def test_dirichlet_classwise_sizes_and_label_mix_follow_alpha(labels):
    skewed = dirichlet_classwise(labels, 10, np.random.default_rng(0), alpha=0.1)
    near_iid = dirichlet_classwise(labels, 10, np.random.default_rng(0), alpha=1000.0)
    assert mean_tv(skewed, labels) > 0.5 and mean_tv(near_iid, labels) < 0.05
    sizes = [len(p) for p in skewed]
    assert max(sizes) > 2 * min(sizes) and min(sizes) >= 10  # unequal sizes, min_size's default 10


def test_dirichlet_classwise_self_balancing_stops_clients_above_the_average(labels):
    """A client holding more than N / n_clients before a class gets none of it."""
    n, average, stopped = 10, len(labels) / 10, 0
    for seed in range(5):
        parts = dirichlet_classwise(labels, n, np.random.default_rng(seed), alpha=0.3, self_balancing=True)
        for c in range(1, N_CLASSES):
            before = np.array([np.sum(labels[p] < c) for p in parts])
            got = np.array([np.sum(labels[p] == c) for p in parts])
            assert np.all(got[before > average] == 0)
            stopped += np.sum(before > average)
    assert stopped > 0  # the rule was exercised
    unbalanced = dirichlet_classwise(labels, n, np.random.default_rng(0), alpha=0.3)
    assert max(len(p) for p in unbalanced) > max(
        len(p) for p in dirichlet_classwise(labels, n, np.random.default_rng(0), alpha=0.3, self_balancing=True))


def test_dirichlet_classwise_redraws_until_min_size():
    labels = np.arange(400) % 4
    first = dirichlet_classwise(labels, 20, np.random.default_rng(0), alpha=1.0, min_size=1, max_tries=0)
    assert min(len(p) for p in first) < 10  # the first draw misses min_size=10 ...
    parts = dirichlet_classwise(labels, 20, np.random.default_rng(0), alpha=1.0, min_size=10)
    assert_exact_cover(parts, 400, 20)
    assert min(len(p) for p in parts) >= 10  # ... so a later one is taken
    with pytest.raises(DataError, match=r"fewer than min_size=10 examples in all 1 draws"):
        dirichlet_classwise(labels, 20, np.random.default_rng(0), alpha=1.0, min_size=10, max_tries=0)
    with pytest.raises(DataError, match=r"min_size=19 examples in all 11 draws"):
        dirichlet_classwise(labels, 20, np.random.default_rng(2), alpha=0.05, min_size=19)


def test_pathological_deterministic_split_by_hand():
    labels = np.repeat([0, 1, 2], 6)  # class c at 6c .. 6c + 5
    parts = pathological(labels, 3, np.random.default_rng(0), classes_per_client=2, class_assignment="deterministic")
    # client i holds classes i, i + 1 (mod 3); a class's examples go half to each holder, lower client first
    assert [p.tolist() for p in parts] == [[0, 1, 2, 6, 7, 8], [9, 10, 11, 12, 13, 14], [3, 4, 5, 15, 16, 17]]


def test_pathological_uneven_class_split_is_array_split():
    labels = np.array([0] * 7 + [1] * 3)
    parts = pathological(labels, 2, np.random.default_rng(0), classes_per_client=2, class_assignment="deterministic")
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3, 7, 8], [4, 5, 6, 9]]


@pytest.mark.parametrize("mode, n_clients, k", [("random", 20, 3), ("deterministic", 7, 4),
                                                ("first-deterministic", 12, 2), ("random", 10, 10)])
def test_pathological_clients_hold_exactly_k_classes(labels, mode, n_clients, k):
    parts = pathological(labels, n_clients, np.random.default_rng(1), classes_per_client=k, class_assignment=mode)
    assert_exact_cover(parts, len(labels), n_clients)
    held = classes_held(parts, labels)
    assert all(len(h) == k for h in held)
    if mode == "deterministic":
        assert held == [{(i + j) % N_CLASSES for j in range(k)} for i in range(n_clients)]
    if mode == "first-deterministic":
        assert all(i % N_CLASSES in h for i, h in enumerate(held))
    for c in range(N_CLASSES):  # each class evenly over its holders
        shares = [np.sum(labels[p] == c) for p in parts if c in classes_held([p], labels)[0]]
        assert max(shares) - min(shares) <= 1


def test_pathological_random_assignments_vary_with_the_seed(labels):
    held = [classes_held(pathological(labels, 20, np.random.default_rng(s), classes_per_client=3), labels)
            for s in (0, 1)]
    assert held[0] != held[1]


def test_inner_dirichlet_keeps_the_given_sizes_and_follows_alpha(labels):
    sizes = [500, 1500, 3000, 5000]
    parts = inner_dirichlet(labels, 4, np.random.default_rng(0), alpha=0.1, sizes=sizes)
    assert_exact_cover(parts, len(labels), 4)
    assert [len(p) for p in parts] == sizes
    assert mean_tv(parts, labels) > 0.3
    near_iid = inner_dirichlet(labels, 10, np.random.default_rng(0), alpha=1000.0)
    assert [len(p) for p in near_iid] == [1000] * 10 and mean_tv(near_iid, labels) < 0.05


def test_inner_dirichlet_exhausted_classes_pass_to_the_others():
    # client 0 wants class 0 only, but it has 2 examples: the other 8 come from class 1
    labels = np.array([0, 0] + [1] * 18)
    parts = inner_dirichlet(labels, 2, np.random.default_rng(0), alpha=[1000.0, 1e-3], sizes=[10, 10])
    assert_exact_cover(parts, 20, 2)
    assert [len(p) for p in parts] == [10, 10]


def test_fill_order_picks_uniformly_among_clients_not_full():
    """Flower picks the next client uniformly among those with room (not by room left): with
    sizes [1, 5] client 0 comes first half the time, not a sixth."""
    orders = [_fill_order(np.array([1, 5]), np.random.default_rng(s)) for s in range(400)]
    assert all(np.bincount(o).tolist() == [1, 5] for o in orders)
    assert 0.42 < np.mean([o[0] == 0 for o in orders]) < 0.58


def flower_inner_dirichlet_counts(labels, sizes, alpha, rng):
    """A one-example-at-a-time simulation of Flower's rule, to compare the vectorized one with."""
    counts = np.bincount(labels)
    priors = rng.dirichlet([alpha] * len(counts), size=len(sizes))
    left, room, held = counts.copy(), np.array(sizes), np.zeros((len(sizes), len(counts)))
    while room.sum():
        client = rng.choice(np.flatnonzero(room > 0))
        q = priors[client] * (left > 0)
        c = rng.choice(len(counts), p=q / q.sum())
        room[client], left[c], held[client, c] = room[client] - 1, left[c] - 1, held[client, c] + 1
    return held


def test_inner_dirichlet_matches_a_step_by_step_simulation_in_distribution():
    labels, sizes, reps = np.repeat([0, 1, 2], [4, 8, 12]), [2, 6, 16], 1500
    slow = np.array([flower_inner_dirichlet_counts(labels, sizes, 0.4, np.random.default_rng(s)) for s in range(reps)])
    fast = np.array([[np.bincount(labels[p], minlength=3) for p in
                      inner_dirichlet(labels, 3, np.random.default_rng(10**6 + s), alpha=0.4, sizes=sizes)]
                     for s in range(reps)])
    se = np.sqrt((slow.var(0) + fast.var(0)) / reps) + 1e-9
    assert np.all(np.abs(slow.mean(0) - fast.mean(0)) < 4.5 * se)


@pytest.mark.parametrize("partitioner, n_clients, n_examples, sizes", [
    (linear_sizes, 4, 100, [10, 20, 30, 40]),  # 1:2:3:4 of 100, ids from 1
    (linear_sizes, 4, 103, [10, 20, 30, 43]),  # floors 10.3, 20.6, 30.9, 41.2; the 2 left go to the last
    (linear_sizes, 2, 3, [1, 2]),  # ids from 0 would give [0, 3]
    (square_sizes, 3, 100, [7, 28, 65]),  # 100/14 * (1, 4, 9) = 7.1, 28.6, 64.3
    (exponential_sizes, 3, 100, [9, 24, 67]),  # 100 * (e, e^2, e^3) / 30.19 = 9.0, 24.5, 66.5
])
def test_size_partitioners_follow_flowers_rule(partitioner, n_clients, n_examples, sizes):
    parts = partitioner(np.zeros(n_examples, np.int64), n_clients, np.random.default_rng(0))
    assert_exact_cover(parts, n_examples, n_clients)
    assert [len(p) for p in parts] == sizes


def test_size_partitioners_deal_labels_at_random(labels):
    for partitioner in (linear_sizes, square_sizes):
        parts = partitioner(labels, 10, np.random.default_rng(0))
        assert all(len(a) < len(b) for a, b in zip(parts, parts[1:]))
        assert mean_tv(parts[3:], labels) < 0.1  # the larger clients' label mix is the global one


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda y: dirichlet_classwise(y, 3, np.random.default_rng(0), alpha=0),
         r"dirichlet_classwise: alpha must be > 0"),
        (lambda y: dirichlet_classwise(y, 3, np.random.default_rng(0), alpha=[1.0, 2.0]),
         r"alpha as a list needs one value per client \(3\), got 2"),
        (lambda y: dirichlet_classwise(y, 3, np.random.default_rng(0), min_size=0), r"min_size must be at least 1"),
        (lambda y: dirichlet_classwise(y, 3, np.random.default_rng(0), max_tries=-1), r"max_tries must be >= 0"),
        (lambda y: dirichlet_classwise(y[:50], 6, np.random.default_rng(0)), r"6 clients 10 example\(s\) each from 50"),
        (lambda y: pathological(y, 3, np.random.default_rng(0), classes_per_client=11),
         r"pathological: classes_per_client must be between 1 and the number of classes \(10\), got 11"),
        (lambda y: pathological(y, 3, np.random.default_rng(0), classes_per_client=0), r"classes_per_client must be"),
        (lambda y: pathological(y, 3, np.random.default_rng(0), class_assignment="cyclic"),
         r"class_assignment must be one of random, deterministic, first-deterministic, got 'cyclic'"),
        (lambda y: pathological(y, 3, np.random.default_rng(0), class_assignment="deterministic"),
         r"no client holds class\(es\) \[4, 5, 6, 7, 8, 9\]"),
        (lambda y: pathological(np.array([0, 1, 1, 1]), 3, np.random.default_rng(0), classes_per_client=2,
                                class_assignment="deterministic"),
         r"class 0 is held by 3 clients but has only 1 examples"),
        (lambda y: inner_dirichlet(y, 3, np.random.default_rng(0), alpha=-1), r"inner_dirichlet: alpha must be > 0"),
        (lambda y: inner_dirichlet(y, 3, np.random.default_rng(0), alpha=[1.0] * 3),
         r"alpha as a list needs one value per class \(10\), got 3"),
        (lambda y: inner_dirichlet(y, 2, np.random.default_rng(0), sizes=[5000, 4000]),
         r"sizes must sum to the number of examples \(10000\), got 9000"),
        (lambda y: inner_dirichlet(y, 3, np.random.default_rng(0), sizes=[5000, 5000]),
         r"sizes needs one size per client \(3\), got 2"),
        (lambda y: inner_dirichlet(y, 2, np.random.default_rng(0), sizes=[10000, 0]), r"sizes must all be at least 1"),
        (lambda y: exponential_sizes(y, 20, np.random.default_rng(0)),
         r"exponential: with 20 clients the smallest would get no example of 10000"),
        (lambda y: partition("pathological", y, 3, np.random.default_rng(0), k=2),
         r"partitioner 'pathological' takes no option k \(its options: class_assignment, classes_per_client\)"),
        (lambda y: partition("linear", y, 3, np.random.default_rng(0), alpha=1), r"'linear' takes no option alpha"),
    ],
)
def test_flower_partitioners_bad_options_are_clear(labels, call, message):
    with pytest.raises(DataError, match=message):
        call(labels)
