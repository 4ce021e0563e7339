"""Partitioners: every example exactly once, seeded, and the heterogeneity each promises."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.data import PARTITIONERS, DataError, dirichlet, iid, natural, partition, quantity_skew, shards

N_CLASSES = 10


@pytest.fixture(scope="module")
def labels():
    """10,000 balanced labels in random order: large enough that sampling noise is small."""
    return np.random.default_rng(0).permutation(np.repeat(np.arange(N_CLASSES), 1000))


@pytest.fixture(scope="module")
def groups(labels):
    return np.random.default_rng(1).integers(0, 7, len(labels)) * 3 + 100  # 7 arbitrary, non-contiguous ids


def run(name, labels, groups, seed, n_clients=7):
    return partition(name, labels, n_clients, np.random.default_rng(seed), groups=groups)


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
    name=st.sampled_from(["iid", "dirichlet", "shards", "quantity"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_cover_property(n_examples, n_clients, n_classes, name, seed):
    labels = np.random.default_rng(seed).integers(0, n_classes, n_examples)
    options = {"dirichlet": {"alpha": 1.0}}.get(name, {})
    parts = partition(name, labels, n_clients, np.random.default_rng(seed), **options)
    assert_exact_cover(parts, n_examples, n_clients)


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
    with pytest.raises(DataError, match=r"7 natural clients but n_clients=5"):
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
