"""Loaders for CIFAR, Hugging Face datasets and the user's own files with a test split, read from tiny
files written in exactly the on-disk formats of the real ones."""

import io
import os
import pickle
import socket
import struct
import sys

import numpy as np
import pytest
import torch

import fedloom
from fedloom.data import DataError, federate, from_hf_dataset, from_torch_dataset, load_dataset
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
    with pytest.raises(DataError, match=rf"{tmp_path} has no cifar-100-python/ and lacks train, test; "
                                        r"expected cifar-100-python/ holding train, test"):
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


# ---------------------------------------------------------------- Hugging Face datasets


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("datasets")


def images_dataset(hf, pixels, labels, users, names=("cat", "dog", "eel")):
    from PIL import Image

    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=list(names)), "user": hf.Value("string")})
    return hf.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": labels, "user": users},
                                features=features)


def test_hf_save_to_disk_dict_with_images_clients_and_test(hf, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 4, 6, 3)).astype(np.uint8)  # HWC, as PIL holds them
    hf.DatasetDict(
        train=images_dataset(hf, pixels[:3], [0, 1, 0], ["u2", "u1", "u2"]),
        test=images_dataset(hf, pixels[3:], [1, 1], ["u9", "u9"]),
    ).save_to_disk(tmp_path / "pets")
    train, test = load_dataset("hf", path=str(tmp_path / "pets"), client_column="user")
    assert train.x.dtype == torch.float32 and train.input_shape == (3, 4, 6)
    assert torch.equal(train.x, torch.from_numpy(pixels[:3].transpose(0, 3, 1, 2).astype(np.float32) / 255))
    assert train.y.tolist() == [0, 1, 0] and train.n_classes == 3  # from the ClassLabel, not the labels seen
    assert train.groups.tolist() == [1, 0, 1] and train.name == "pets"
    assert torch.equal(test.x, torch.from_numpy(pixels[3:].transpose(0, 3, 1, 2) / np.float32(255)))
    assert test.y.tolist() == [1, 1] and test.n_classes == 3
    assert test.groups.tolist() == [2, 2]  # u9 trains nowhere: numbered after the training clients u1, u2


def test_hf_single_dataset_grayscale_and_named_splits(hf, tmp_path):
    pixels = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2) * 20
    ds = images_dataset(hf, pixels, [2, 0, 1], ["a", "b", "c"])
    ds.save_to_disk(tmp_path / "one")
    train, test = load_dataset("hf", path=tmp_path / "one")
    assert test is None and train.input_shape == (1, 2, 2)
    assert torch.equal(train.x[:, 0], torch.from_numpy(pixels) / 255)
    hf.DatasetDict(fit=ds, holdout=ds.select([1])).save_to_disk(tmp_path / "named")
    train, test = load_dataset("hf", path=tmp_path / "named", train_split="fit", test_split="holdout")
    assert len(train) == 3 and test.y.tolist() == [0]
    assert load_dataset("hf", path=tmp_path / "named", train_split="fit", test_split=None)[1] is None


def tabular(hf):
    return hf.Dataset.from_dict({"a": [0.5, 1.5, 2.5, 3.5], "b": [[1, 2], [3, 4], [5, 6], [7, 8]],
                                 "label": [1, 0, 2, 1], "site": [7, 7, 3, 9]})


def test_hf_parquet_directory_splits_by_file_name(hf, tmp_path):
    ds = tabular(hf)
    (tmp_path / "data").mkdir()
    ds.select([0, 1, 2]).to_parquet(tmp_path / "data" / "train.parquet")
    ds.select([3]).to_parquet(tmp_path / "data" / "test.parquet")
    train, test = load_dataset("hf", path=tmp_path / "data", client_column="site")
    assert train.x.tolist() == [[0.5, 1, 2], [1.5, 3, 4], [2.5, 5, 6]] and train.y.tolist() == [1, 0, 2]
    assert train.groups.tolist() == [1, 1, 0] and test.x.tolist() == [[3.5, 7, 8]] and test.y.tolist() == [1]
    assert test.groups.tolist() == [2]  # site 9 is not a training site
    assert not any(tmp_path.glob("data/*.lock")) and sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "test.parquet", "train.parquet"]


@pytest.mark.parametrize("suffix, write", [(".parquet", "to_parquet"), (".csv", "to_csv"), (".jsonl", "to_json")])
def test_hf_single_file_of_each_format(hf, tmp_path, suffix, write):
    ds = tabular(hf).remove_columns("b")
    getattr(ds, write)(tmp_path / f"rows{suffix}")
    train, test = load_dataset("hf", path=tmp_path / f"rows{suffix}", feature_columns=["a", "site"])
    assert test is None and train.x.tolist() == [[0.5, 7], [1.5, 7], [2.5, 3], [3.5, 9]]
    assert train.y.tolist() == [1, 0, 2, 1] and train.name == "rows"


def test_hf_array_images_regression_and_language_model(hf):
    pixels = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    ds = hf.Dataset.from_dict({"img": pixels.tolist(), "price": [1.5, -2.0], "tokens": [[1, 2, 3], [4, 5, 0]],
                               "next": [[2, 3, -100], [5, 0, -100]]})
    images = from_hf_dataset(ds, image_column="img", label_column="price", task="regression")
    assert torch.equal(images.x, torch.from_numpy(pixels.transpose(0, 3, 1, 2) / np.float32(255)))
    assert images.y.tolist() == [1.5, -2.0] and images.task == "regression"
    text = from_hf_dataset(ds, feature_columns=["tokens"], label_column="next", task="language_model")
    assert text.x.tolist() == [[1, 2, 3], [4, 5, 0]] and text.y.dtype == torch.int64 and text.n_classes == 6


def chat(hf):
    return hf.DatasetDict(
        train=hf.Dataset.from_dict({"text": ["abcab", "cabcab", "ba", "bbbbbbb"], "who": ["x", "y", "x", "z"]}),
        test=hf.Dataset.from_dict({"text": ["abca", "cc", "aqbc"], "who": ["y", "x", "w"]}))


def test_hf_text_column_gives_each_clients_next_character_windows(hf, tmp_path):
    chat(hf).save_to_disk(tmp_path / "chat")
    train, test = load_dataset("hf", path=tmp_path / "chat", text_column="text", client_column="who", seq_len=3)
    assert train.task == test.task == "language_model" and train.vocabulary == ("\n", "a", "b", "c", "<unk>")
    # client x's text is "abcab\nba" = ids 1 2 3 1 2 0 2 1: windows of 4 ids every 3; y's "cabcab": one
    assert train.x.tolist() == [[1, 2, 3], [1, 2, 0], [3, 1, 2], [2, 2, 2], [2, 2, 2]]
    assert train.y.tolist() == [[2, 3, 1], [2, 0, 2], [1, 2, 3], [2, 2, 2], [2, 2, 2]]
    assert train.groups.tolist() == [0, 0, 1, 2, 2] and train.n_classes == 5
    assert test.x.tolist() == [[1, 2, 3], [1, 4, 2]] and test.y.tolist() == [[2, 3, 1], [4, 2, 3]]  # q: <unk>
    assert test.groups.tolist() == [1, 3]  # y as in training; w trains nowhere: numbered after the training clients
    fed = federate(train, test, "natural", None, seed=0)
    assert [len(i) for i in fed.train_idx] == [2, 1, 2] and [len(i) for i in fed.test_idx] == [0, 1, 0]


def test_hf_text_with_a_tokenizer_json(hf, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf.Dataset.from_dict({"text": ["the cat sat on the mat", "the dog sat"]}).to_parquet(tmp_path / "t.parquet")
    train, test = load_dataset("hf", path=tmp_path / "t.parquet", text_column="text",
                               tokenizer=str(tmp_path / "tokenizer.json"), seq_len=2, stride=1)
    assert test is None and train.vocabulary == ("<unk>", "the", "cat", "sat", "on", "mat")
    ids = [1, 2, 3, 4, 1, 5, 1, 0, 3]  # one stream; "dog" is unknown
    assert train.x.tolist() == [ids[s:s + 2] for s in range(len(ids) - 2)]
    assert train.y.tolist() == [ids[s + 1:s + 3] for s in range(len(ids) - 2)]


@pytest.mark.parametrize("options, message", [
    ({"text_column": "body"}, r"no text column 'body'; columns are \['text', 'who'\]"),
    ({"text_column": "who", "client_column": "text", "seq_len": 50}, r"holds no window of 51 tokens"),
    ({"text_column": "text", "tokenizer": "bpe"}, r"tokenizer 'bpe' is neither a known tokenizer nor a file"),
    ({"text_column": "text", "task": "regression"}, r"task 'regression' does not apply"),
    ({"text_column": "text", "client_column": "whom"}, r"no client column 'whom'"),
])
def test_hf_text_errors_name_the_problem(hf, tmp_path, options, message):
    chat(hf).save_to_disk(tmp_path / "chat")
    with pytest.raises(DataError, match=message):
        load_dataset("hf", path=tmp_path / "chat", **options)


def test_a_language_model_trains_on_hf_text_by_client(hf, tmp_path):
    rng = np.random.default_rng(0)
    rows = ["".join(rng.choice(list("ab "), 30)) for _ in range(40)]
    hf.Dataset.from_dict({"text": rows, "who": [i % 4 for i in range(40)]}).to_parquet(tmp_path / "c.parquet")
    result = fedloom.run({"data": {"dataset": "hf", "options": {"path": str(tmp_path / "c.parquet"),
                          "text_column": "text", "client_column": "who", "seq_len": 16}},
                          "partition": {"name": "natural"}, "model": {"name": "transformer"}, "rounds": 1,
                          "client": {"steps": 2}, "output": {"save": False, "progress": False}})
    assert result.summary["n_clients"] == 4 and result.summary["train_tokens"] == 4 * 12 * 16
    # each client: 10 rows of 30 + 9 newlines = 309 characters, 19 windows; 4 held out, 3 for its local tests
    assert np.isfinite(result.summary["central_perplexity"])


def test_hf_touches_no_network(hf, tmp_path, monkeypatch):
    tabular(hf).save_to_disk(tmp_path / "t")
    tabular(hf).to_parquet(tmp_path / "t.parquet")

    def refuse(*args):
        raise AssertionError("the hf loader opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert len(load_dataset("hf", path=tmp_path / "t")[0]) == len(load_dataset("hf", path=tmp_path / "t.parquet")[0])


@pytest.mark.parametrize("options, message", [
    ({"label_column": "target"}, r"no column\(s\) 'target'; columns are \['a', 'b', 'label', 'site'\]"),
    ({"train_split": "fit"}, r"no split 'fit'; it has train \(set train_split\)"),
    ({"test_split": "valid"}, r"no split 'valid'; it has train \(set test_split\)"),
    ({"image_column": "a"}, r"column 'a': images must be \[N, H, W\]"),
])
def test_hf_option_errors_name_the_path(hf, tmp_path, options, message):
    tabular(hf).save_to_disk(tmp_path / "t")
    with pytest.raises(DataError, match=message) as err:
        load_dataset("hf", path=tmp_path / "t", **options)
    assert str(tmp_path / "t") in str(err.value)


def test_hf_malformed_or_missing_files_name_the_path(hf, tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=rf"{tmp_path / 'broken.parquet'}: not readable as a Hugging Face dataset"):
        load_dataset("hf", path=tmp_path / "broken.parquet")
    with pytest.raises(DataError, match=rf"hf dataset: not found: {tmp_path / 'gone'}; expected a directory written"):
        load_dataset("hf", path=tmp_path / "gone")
    tabular(hf).save_to_disk(tmp_path / "saved")
    (tmp_path / "saved" / "state.json").write_text("{")
    with pytest.raises(DataError, match=rf"{tmp_path / 'saved'}: not readable as a Hugging Face dataset"):
        load_dataset("hf", path=tmp_path / "saved")
    (tmp_path / "rows.txt").write_text("1,2\n")
    with pytest.raises(DataError, match=r"unknown file type '.txt'"):
        load_dataset("hf", path=tmp_path / "rows.txt")
    hf.Dataset.from_dict({"a": [1.0, 2.0], "label": ["cat", "dog"]}).save_to_disk(tmp_path / "strings")
    with pytest.raises(DataError, match=r"label column 'label' holds .*string.*class_encode_column\('label'\)"):
        load_dataset("hf", path=tmp_path / "strings")


def test_hf_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(DataError, match=r"pip install fedloom\[hf\]"):
        load_dataset("hf", path=tmp_path / "t.parquet")


# ---------------------------------------------------------------- own test splits, tasks, torch datasets


def test_npz_own_test_split_and_regression(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((3, 2)), y=np.array([0, 1, 1]), x_test=np.zeros((2, 2)), y_test=np.array([2, 0]))
    train, test = load_dataset("npz", path=path)
    assert len(train) == 3 and test.x.tolist() == [[0, 0], [0, 0]] and test.y.tolist() == [2, 0]
    np.savez(path, x=np.ones((3, 2)), y=np.array([[0.5, 1.0], [2.0, 3.0], [4.0, -1.0]]))
    train, test = load_dataset("npz", path=path, task="regression")
    assert test is None and train.task == "regression" and train.n_classes == 2 and train.y.dtype == torch.float32
    np.savez(path, x=np.ones((3, 2)), y=np.zeros(3, int), x_test=np.zeros((2, 2)))
    with pytest.raises(DataError, match=rf"{path}: has 'x_test' but not its pair"):
        load_dataset("npz", path=path)
    np.savez(path, x=np.ones((3, 2)), y=np.zeros(3, int), x_test=np.zeros((2, 2)), y_test=np.zeros(3, int))
    with pytest.raises(DataError, match=rf"{path} \(x_test, y_test\): arrays must have one entry per example"):
        load_dataset("npz", path=path)


def test_csv_split_column_gives_the_official_test(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("f,label,split,client\n1,0,train,a\n2,1,test,b\n3,1,train,c\n4,0,test,a\n")
    train, test = load_dataset("csv", path=path)
    assert train.x.tolist() == [[1], [3]] and train.y.tolist() == [0, 1] and train.groups.tolist() == [0, 1]
    assert test.x.tolist() == [[2], [4]] and test.y.tolist() == [1, 0] and test.groups is None
    path.write_text("f,label,fold\n1,0,train\n2,1,train\n")
    train, test = load_dataset("csv", path=path, split_column="fold")
    assert test is None and train.input_shape == (1,)
    path.write_text("f,label,split\n1,0,train\n2,1,valid\n")
    with pytest.raises(DataError, match=rf"{path}: column 'split' must hold 'train' or 'test', found \['valid'\]"):
        load_dataset("csv", path=path)
    with pytest.raises(DataError, match=rf"{path}: no split column 'fold'"):
        load_dataset("csv", path=path, split_column="fold")


def test_csv_regression_with_several_targets(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("f,t1,t2\n1,0.5,1\n2,1.5,-3\n")
    train = load_dataset("csv", path=path, label_column=["t1", "t2"], task="regression")[0]
    assert train.task == "regression" and train.x.tolist() == [[1], [2]] and train.y.tolist() == [[0.5, 1], [1.5, -3]]
    assert load_dataset("csv", path=path, label_column="t1", task="regression")[0].y.tolist() == [0.5, 1.5]
    with pytest.raises(DataError, match="classification takes one label column"):
        load_dataset("csv", path=path, label_column=["t1", "t2"])


def test_from_torch_dataset_tensors_and_pil_images():
    from PIL import Image

    x = torch.arange(12.0).reshape(4, 3)
    data = from_torch_dataset(torch.utils.data.TensorDataset(x, torch.tensor([1, 0, 1, 2])), name="mine")
    assert torch.equal(data.x, x) and data.y.tolist() == [1, 0, 1, 2] and data.n_classes == 3 and data.name == "mine"

    class Folder(torch.utils.data.Dataset):
        classes = ["a", "b", "c", "d", "e"]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return Image.fromarray(np.full((2, 3, 3), 51 * i, np.uint8)), i

    images = from_torch_dataset(Folder())
    assert images.input_shape == (3, 2, 3) and images.n_classes == 5 and torch.all(images.x[1] == 0.2)
    pairs = [(torch.zeros(2), torch.tensor([0.5, 1.0]))] * 3
    assert from_torch_dataset(pairs, task="regression").y.shape == (3, 2)


def test_from_torch_dataset_errors():
    with pytest.raises(DataError, match="mine: example 1 is a int, not an"):
        from_torch_dataset([(1, 0), 5], name="mine")
    with pytest.raises(DataError, match=r"every x must have one shape; example 0 has \(2,\), example 1 has \(3,\)"):
        from_torch_dataset([(np.zeros(2), 0), (np.zeros(3), 1)])


def test_a_config_files_data_path_is_read_from_the_files_directory(tmp_path, monkeypatch):
    from fedloom.cli import main
    from fedloom.config import load_config

    folder, elsewhere = tmp_path / "experiment", tmp_path / "elsewhere"
    folder.mkdir(), elsewhere.mkdir()
    rng = np.random.default_rng(0)
    np.savez(folder / "mine.npz", x=rng.normal(size=(60, 4)).astype(np.float32), y=np.arange(60) % 3)
    (folder / "exp.toml").write_text('rounds = 1\n[data]\ndataset = "npz"\nn_clients = 4\n'
                                     '[data.options]\npath = "mine.npz"\n[model]\nname = "logistic"\n')
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../experiment/exp.toml")
    assert cfg.data.options["path"] == str(folder / "mine.npz")
    overridden = load_config("../experiment/exp.toml", ["data.options.path='here.npz'"])
    assert overridden.data.options["path"] == str(elsewhere / "here.npz")  # the command line's: the cwd's
    home = load_config(None, ["data.dataset=npz", "data.options.path='~/x.npz'"])
    assert home.data.options["path"] == os.path.expanduser("~/x.npz")
    assert main(["run", "../experiment/exp.toml", "--quiet", "--out", "runs"]) == 0
    (run_dir,) = (elsewhere / "runs").iterdir()
    monkeypatch.chdir(tmp_path)  # the saved config holds the absolute path: it loads from anywhere
    assert load_config(run_dir / "config.toml").data.options["path"] == str(folder / "mine.npz")
