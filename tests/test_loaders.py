"""Loaders for CIFAR, read from tiny files written in exactly the on-disk format of the real ones."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from fedloom.data import DataError, load_dataset
from fedloom.data.cifar import CIFAR10, CIFAR100

# ---------------------------------------------------------------- CIFAR


class _Global:
    def __init__(self, module: str, name: str):
        self.path = f"{module}\n{name}\n".encode()


def py2_pickle(obj) -> bytes:
    """``obj`` as Python 2's cPickle wrote the CIFAR batches (protocol 2): str as 8-bit strings and an
    ndarray through numpy.core.multiarray._reconstruct with its raw bytes as a str."""
    out = io.BytesIO()
    out.write(b"\x80\x02")

    def emit(o):
        if isinstance(o, dict):
            out.write(b"}(")
            for key, value in o.items():
                emit(key), emit(value)
            out.write(b"u")
        elif isinstance(o, (list, tuple)):
            out.write(b"](" if isinstance(o, list) else b"(")
            for value in o:
                emit(value)
            out.write(b"e" if isinstance(o, list) else b"t")
        elif o is None or isinstance(o, bool):
            out.write({None: b"N", True: b"\x88", False: b"\x89"}[o])
        elif isinstance(o, int):
            out.write(b"K" + bytes([o]) if 0 <= o < 256 else b"J" + struct.pack("<i", o))
        elif isinstance(o, (str, bytes)):  # a Python 2 str: SHORT_BINSTRING or BINSTRING
            raw = o.encode("latin1") if isinstance(o, str) else o
            out.write((b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<I", len(raw))) + raw)
        elif isinstance(o, _Global):
            out.write(b"c" + o.path)
        elif isinstance(o, np.dtype):
            emit(_Global("numpy", "dtype")), emit((o.str[1:], 0, 1)), out.write(b"R")
            emit((3, "|", None, None, None, -1, -1, 0)), out.write(b"b")
        elif isinstance(o, np.ndarray):
            emit(_Global("numpy.core.multiarray", "_reconstruct")), emit((_Global("numpy", "ndarray"), (0,), "b"))
            out.write(b"R")
            emit((1, o.shape, o.dtype, False, o.tobytes())), out.write(b"b")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.write(b".")
    return out.getvalue()


def write_cifar(root, layout, per_file=4, seed=0, label_keys=("labels",), n_classes=10):
    """A torchvision-style folder with every batch file of ``layout``; returns {file: (data, labels per key)}."""
    folder = root / layout.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in layout.files:
        data = rng.integers(0, 256, (per_file, 3072)).astype(np.uint8)
        labels = {key: rng.integers(0, n_classes, per_file).tolist() for key in label_keys}
        batch = {"batch_label": f"batch {name}", **labels, "data": data,
                 "filenames": [f"{i}.png" for i in range(per_file)]}
        (folder / name).write_bytes(py2_pickle(batch))
        written[name] = (data, labels)
    (folder / ("batches.meta" if layout is CIFAR10 else "meta")).write_bytes(py2_pickle({"label_names": ["a"]}))
    return folder, written


def expected(written, files, key="labels"):
    data = np.concatenate([written[name][0] for name in files])
    labels = np.concatenate([written[name][1][key] for name in files])
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255, labels


def test_py2_pickle_matches_what_python_reads_from_a_python2_batch():
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = pickle.loads(py2_pickle({"data": data, "labels": [3, 7]}), encoding="latin1")
    assert batch["labels"] == [3, 7] and batch["data"].dtype == np.uint8 and np.array_equal(batch["data"], data)


@pytest.mark.parametrize("parent", [True, False])
def test_cifar10_train_batches_in_order_and_the_official_test(tmp_path, parent):
    folder, written = write_cifar(tmp_path, CIFAR10)
    train, test = load_dataset("cifar10", path=str(tmp_path if parent else folder))
    x, y = expected(written, CIFAR10.train_files)
    assert train.x.dtype == torch.float32 and train.input_shape == (3, 32, 32) and train.n_classes == 10
    assert torch.equal(train.x, torch.from_numpy(x)) and train.y.tolist() == y.tolist() and len(train) == 20
    x_test, y_test = expected(written, ("test_batch",))
    assert torch.equal(test.x, torch.from_numpy(x_test)) and test.y.tolist() == y_test.tolist()
    assert train.groups is None and train.name == "cifar10"


def test_cifar_pixels_are_channel_first_rows_of_32(tmp_path):
    folder, _ = write_cifar(tmp_path, CIFAR10)
    batch = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="latin1")
    batch["data"][0] = 0
    batch["data"][0, 2 * 1024 + 5 * 32 + 7] = 255  # blue plane, row 5, column 7
    (folder / "data_batch_1").write_bytes(py2_pickle(batch))
    image = load_dataset("cifar10", path=folder)[0].x[0]
    assert image[2, 5, 7] == 1.0 and image.sum() == 1.0


def test_cifar10_normalize_uses_the_usual_channel_statistics(tmp_path):
    folder, written = write_cifar(tmp_path, CIFAR10)
    train = load_dataset("cifar10", path=folder, normalize=True)[0]
    x, _ = expected(written, CIFAR10.train_files)
    mean, std = np.array([0.4914, 0.4822, 0.4465])[:, None, None], np.array([0.2470, 0.2435, 0.2616])[:, None, None]
    np.testing.assert_allclose(train.x.numpy(), (x - mean) / std, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("labels, key, n_classes", [("fine", "fine_labels", 100), ("coarse", "coarse_labels", 20)])
def test_cifar100_fine_or_coarse_labels(tmp_path, labels, key, n_classes):
    folder, written = write_cifar(tmp_path, CIFAR100, label_keys=("fine_labels", "coarse_labels"), n_classes=20)
    train, test = load_dataset("cifar100", path=tmp_path, labels=labels)
    x, y = expected(written, ("train",), key)
    assert torch.equal(train.x, torch.from_numpy(x)) and train.y.tolist() == y.tolist()
    assert test.y.tolist() == expected(written, ("test",), key)[1].tolist()
    assert train.n_classes == test.n_classes == n_classes and train.name == "cifar100"


def test_cifar_batches_repickled_by_python3_with_bytes_keys(tmp_path):
    folder = tmp_path / CIFAR100.folder
    folder.mkdir()
    data = np.full((2, 3072), 51, np.uint8)
    for name in CIFAR100.files:
        batch = {b"data": data, b"fine_labels": [99, 0], b"coarse_labels": [19, 0]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
    train, test = load_dataset("cifar100", path=folder)
    assert train.y.tolist() == [99, 0] and torch.all(test.x == 0.2)


def test_cifar_missing_directory_or_file_lists_the_layout(tmp_path):
    with pytest.raises(DataError, match=rf"directory not found: {tmp_path / 'nowhere'}; expected cifar-10-batches-py/ "
                                        "holding data_batch_1, .*test_batch"):
        load_dataset("cifar10", path=tmp_path / "nowhere")
    folder, _ = write_cifar(tmp_path, CIFAR10)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match=rf"{folder} lacks test_batch; expected"):
        load_dataset("cifar10", path=tmp_path)
    with pytest.raises(DataError, match=r"cifar-100-python/ holding train, test"):
        load_dataset("cifar100", path=tmp_path)


def _replace_batch(folder, content):
    (folder / "data_batch_3").write_bytes(content if isinstance(content, bytes) else py2_pickle(content))
    return folder / "data_batch_3"


@pytest.mark.parametrize("content, message", [
    (b"not a pickle at all", "not a readable pickle"),
    (py2_pickle({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})[:-40], "not a readable pickle"),
    ([1, 2], "not a CIFAR batch: holds a list"),
    ({"data": np.zeros((2, 3072), np.uint8)}, r"no key\(s\) labels; found \['data'\]"),
    ({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, r"uint8 array \[N, 3072\].*shape \(2, 1024\)"),
    ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "got float32"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "'labels' must be 2 integer labels 0..9"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, "'labels' must be 2 integer labels 0..9"),
])
def test_cifar_malformed_batch_names_the_file(tmp_path, content, message):
    folder, _ = write_cifar(tmp_path, CIFAR10)
    path = _replace_batch(folder, content)
    with pytest.raises(DataError, match=message) as err:
        load_dataset("cifar10", path=folder)
    assert str(path) in str(err.value)


class _RunsCode:
    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("call", [os.system, eval])
def test_restricted_unpickler_refuses_code_and_runs_none(tmp_path, call):
    folder, _ = write_cifar(tmp_path, CIFAR10)
    marker = tmp_path / "ran"
    command = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w')"
    evil = pickle.dumps({"data": _RunsCode(call, command), "labels": [0]}, protocol=2)
    path = _replace_batch(folder, evil)
    with pytest.raises(DataError, match=rf"{path}: refused to unpickle: it calls \w+\.(system|eval)") as err:
        load_dataset("cifar10", path=folder)
    assert not marker.exists() and "not a CIFAR batch" in str(err.value)
