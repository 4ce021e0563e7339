"""Hugging Face ``datasets``, read from local files only: a ``save_to_disk`` directory, or parquet,
CSV or JSON files. ``datasets`` is optional (``pip install fedloom[hf]``) and imported only here."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .datasets import DataError, Dataset, from_arrays, shared_ids
from .images import array_images, pil_images
from .text import text_windows, tokenizer_for

if TYPE_CHECKING:
    import datasets as hf

_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
_LAYOUTS = ("a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk, a directory of parquet/CSV/"
            "JSON files (splits named by file names such as train.parquet, test.parquet), or one such file")


def _import_datasets() -> Any:
    """The ``datasets`` package, offline: fedloom reads local files only and must never reach the Hub."""
    if "datasets" not in sys.modules:  # the Hub's offline switches are read once, when datasets is imported
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the optional package 'datasets': "
                        "pip install fedloom[hf]") from None
    return datasets


def _read_splits(path: Path, cache: str) -> dict[str, hf.Dataset]:
    """Every split found at ``path``; a lone Dataset is the split 'train'. Files are converted into ``cache``."""
    datasets = _import_datasets()
    try:
        if path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path), cache_dir=cache, keep_in_memory=True)
        else:
            loaded = datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files={"train": str(path)},
                                           cache_dir=cache, keep_in_memory=True)
    except Exception as err:  # datasets, pyarrow and pandas raise many kinds of errors for a bad file
        raise DataError(f"{path}: not readable as a Hugging Face dataset ({type(err).__name__}: {err}); "
                        f"expected {_LAYOUTS}") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _check_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"hf dataset: not found: {path}; expected {_LAYOUTS}")
    if path.is_file() and path.suffix.lower() not in _BUILDERS:
        raise DataError(f"hf dataset: {path}: unknown file type {path.suffix!r}; "
                        f"files are {', '.join(sorted(_BUILDERS))}")
    return path


def _pick_split(splits: dict[str, hf.Dataset], name: str, path: Path, option: str) -> hf.Dataset:
    if name not in splits:
        raise DataError(f"{path}: no split {name!r}; it has {', '.join(sorted(splits))} (set {option})")
    return splits[name]


def load_hf(*, path: str | Path, train_split: str = "train", test_split: str | None = "test",
            label_column: str = "label", image_column: str | None = None, feature_columns: list[str] | None = None,
            client_column: str | None = None, task: str | None = None, text_column: str | None = None,
            tokenizer: str = "char", seq_len: int = 64, stride: int | None = None) -> tuple[Dataset, Dataset | None]:
    """A Hugging Face dataset from local files (see :func:`from_hf_dataset` for the columns).

    ``test_split`` is returned as the official test split; the default 'test' is used when present,
    another name must exist, and None uses none. ``text_column`` makes language-model data instead:
    see :func:`text_dataset` (``task`` then defaults to language_model, else to classification).
    """
    path = _check_path(path)
    with tempfile.TemporaryDirectory(prefix="fedloom-hf-") as cache:  # a private cache: nothing left behind
        splits = _read_splits(path, cache)
        train = _pick_split(splits, train_split, path, "train_split")
        no_test = test_split is None or (test_split == "test" and "test" not in splits)
        test = None if no_test else _pick_split(splits, test_split, path, "test_split")
        if text_column is not None:
            if task not in (None, "language_model"):
                raise DataError(f"{path}: text_column makes language-model data; task {task!r} does not apply")
            return text_dataset(train, test, text_column, client_column, tokenizer, seq_len, stride, path)
        columns = {"label_column": label_column, "image_column": image_column, "feature_columns": feature_columns,
                   "task": task or "classification", "name": path.stem}
        return _converted(train, test, client_column, path, columns, (train_split, test_split))


def _converted(train: hf.Dataset, test: hf.Dataset | None, client_column: str | None, path: Path,
               columns: dict[str, Any], split_names: tuple[str, str | None]) -> tuple[Dataset, Dataset | None]:
    """Both splits through :func:`from_hf_dataset`, the client ids of both on one map."""
    train_data = from_hf_dataset(train, client_column=client_column, source=f"{path} (split {split_names[0]!r})",
                                 **columns)
    if test is None:
        return train_data, None
    clients = client_column if client_column in test.features else None
    test_data = from_hf_dataset(test, client_column=clients, source=f"{path} (split {split_names[1]!r})", **columns)
    if clients is None:
        return train_data, test_data
    train_ids, test_ids = shared_ids(_numpy_column(train, clients), _numpy_column(test, clients))
    return dataclasses.replace(train_data, groups=train_ids), dataclasses.replace(test_data, groups=test_ids)


def text_dataset(train: hf.Dataset, test: hf.Dataset | None, text_column: str, client_column: str | None,
                 tokenizer: str, seq_len: int, stride: int | None, path: Path) -> tuple[Dataset, Dataset | None]:
    """Next-token windows of ``seq_len`` from a string column: each client's rows (``client_column``)
    tokenized in order as one text (rows joined by newlines), windows every ``stride`` tokens (default
    ``seq_len``: every token a target once). ``tokenizer`` is "char", "leaf" or a tokenizer.json
    (:mod:`fedloom.data.text`), built on the training split's text."""
    for name, value in (("seq_len", seq_len), ("stride", stride or seq_len)):
        if value < 1:
            raise DataError(f"{path}: {name} must be at least 1, got {value}")
    texts = [_strings(ds, text_column, path) for ds in (train, test) if ds is not None]
    tok = tokenizer_for(tokenizer, texts[0], f"{path}, column {text_column!r}")
    owners = _text_owners(train, test, client_column, path)
    built = []
    for split, split_texts, split_owners in zip(("train", "test"), texts, owners):
        x, y, groups = text_windows(split_texts, split_owners, tok, seq_len, stride or seq_len)
        if split == "train" and len(x) == 0:
            raise DataError(f"{path}: column {text_column!r} holds no window of {seq_len + 1} tokens")
        data = from_arrays(x, y, path.stem, source=f"{path} ({split} split)", n_classes=len(tok.vocabulary),
                           task="language_model", vocabulary=tok.vocabulary) if len(x) else None
        built.append(data if data is None or groups is None else dataclasses.replace(data, groups=groups))
    return built[0], built[1] if len(built) > 1 else None


def _strings(ds: hf.Dataset, column: str, path: Path) -> list[str]:
    if column not in ds.features:
        raise DataError(f"{path}: no text column {column!r}; columns are {list(ds.features)}")
    values = ds[column]
    if not all(isinstance(v, str) for v in values):
        raise DataError(f"{path}: text column {column!r} ({ds.features[column]}) must hold strings")
    return values


def _text_owners(train: hf.Dataset, test: hf.Dataset | None,
                 column: str | None, path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Each row's client, on one map for both splits (None where the split has no client column)."""
    if column is None:
        return None, None
    if column not in train.features:
        raise DataError(f"{path}: no client column {column!r}; columns are {list(train.features)}")
    if test is None or column not in test.features:
        ids = _numpy_column(train, column)
        return shared_ids(ids, ids[:0])[0], None
    return shared_ids(_numpy_column(train, column), _numpy_column(test, column))


def from_hf_dataset(ds: hf.Dataset, *, label_column: str = "label", image_column: str | None = None,
                    feature_columns: list[str] | None = None, client_column: str | None = None,
                    task: str = "classification", name: str = "hf", source: str | None = None,
                    n_classes: int | None = None) -> Dataset:
    """A fedloom :class:`Dataset` from a ``datasets.Dataset``.

    Inputs are ``image_column`` (an Image feature, or arrays: float32 [N, C, H, W] in [0, 1]) or
    ``feature_columns`` (numeric scalars or fixed-shape arrays, several flattened side by side); by
    default the one Image column, else every column but the label and client columns. ``label_column``
    holds integer or ClassLabel labels (classification; n_classes from the ClassLabel), numbers
    (regression) or token-id sequences (language_model). ``client_column`` (any ids) gives natural clients.
    """
    source = source or name
    present = list(ds.features)
    wanted = [label_column, image_column, client_column, *(feature_columns or [])]
    absent = [column for column in wanted if column is not None and column not in present]
    if absent:
        raise DataError(f"{source}: no column(s) {', '.join(map(repr, absent))}; columns are {present}")
    if image_column is None and feature_columns is None:
        image_column, feature_columns = _default_inputs(ds, {label_column, client_column}, source)
    x = _image_inputs(ds, image_column, source) if image_column else _feature_inputs(ds, feature_columns, source)
    y, n_classes = _label_values(ds, label_column, task, source, n_classes)
    groups = None if client_column is None else _numpy_column(ds, client_column)
    return from_arrays(x, y, name, groups, source, n_classes, task, copy=False)


def _default_inputs(ds: hf.Dataset, others: set[str | None], source: str) -> tuple[str | None, list[str] | None]:
    """The one Image column, or else every column that is neither label nor client."""
    import datasets

    images = [column for column, feature in ds.features.items() if isinstance(feature, datasets.Image)]
    if len(images) > 1:
        raise DataError(f"{source}: several image columns {images}; choose one with image_column")
    if images:
        return images[0], None
    rest = [column for column in ds.features if column not in others]
    if not rest:
        raise DataError(f"{source}: no input columns besides the label")
    return None, rest


def _numpy_column(ds: hf.Dataset, column: str) -> np.ndarray:
    return np.asarray(ds.select_columns([column]).with_format("numpy")[:][column])


def _image_inputs(ds: hf.Dataset, column: str, source: str) -> np.ndarray:
    import datasets

    where = f"{source}, column {column!r}"
    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        images = ds.select_columns([column])
        if not feature.decode:  # stored undecoded (dicts of bytes): decode to PIL images
            images = images.cast_column(column, datasets.Image())
        return pil_images(list(images[column]), where)
    return array_images(_numpy_column(ds, column), where)


def _feature_inputs(ds: hf.Dataset, columns: list[str], source: str) -> np.ndarray:
    """One column as it is ([N] or [N, ...]), several flattened and set side by side."""
    if not columns:
        raise DataError(f"{source}: feature_columns is empty")
    arrays = []
    for column in columns:
        values = _numpy_column(ds, column)
        if values.dtype.kind not in "iufb":
            shape = "of different lengths" if values.dtype == object else f"of type {values.dtype}"
            raise DataError(f"{source}: column {column!r} ({ds.features[column]}) must hold numbers or "
                            f"fixed-shape arrays of numbers; its values are {shape}")
        arrays.append(values)
    return arrays[0] if len(arrays) == 1 else np.concatenate([a.reshape(len(a), -1) for a in arrays], axis=1)


def _label_values(ds: hf.Dataset, column: str, task: str, source: str,
           n_classes: int | None) -> tuple[np.ndarray, int | None]:
    """The label column, and n_classes from a ClassLabel feature when not given."""
    import datasets

    values, feature = _numpy_column(ds, column), ds.features[column]
    if isinstance(feature, datasets.ClassLabel) and n_classes is None and task == "classification":
        n_classes = feature.num_classes
    if task == "classification" and values.dtype.kind in "USO":
        raise DataError(f"{source}: label column {column!r} holds {feature}; labels must be integers or a "
                        f"ClassLabel (convert with class_encode_column({column!r}))")
    return values, n_classes
