"""FEMNIST and Shakespeare as LEAF (Caldas et al. 2018) writes them: directories of JSON files.

Each file is ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}``
(``"hierarchies"``, when present, is ignored). ``path`` is LEAF's ``data`` directory holding
``train/`` and ``test/`` (LEAF's own per-user split), one directory of JSON files (e.g.
``all_data/``), or one JSON file. The natural client of an example is its LEAF user (a FEMNIST
writer, a Shakespeare speaking role); client ids number the users in sorted name order.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from .datasets import DataError, Dataset, from_arrays

# LEAF's 80 characters (models/utils/language_utils.py); a character's id is its place here, as in LEAF
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
UNKNOWN = len(LEAF_LETTERS)  # id 80: any other character (LEAF's lookup gives -1, which no embedding takes)
VOCABULARY = (*LEAF_LETTERS, "<unk>")
FEMNIST_CLASSES = 62  # digits 0-9, then A-Z, then a-z
FEMNIST_PIXELS = 28 * 28

_ASCII_IDS = np.full(128, UNKNOWN, dtype=np.int64)
_ASCII_IDS[[ord(c) for c in LEAF_LETTERS]] = np.arange(UNKNOWN)

TestSplit = Literal["official", "merge", "drop"]
# one user's examples: (x, y, the file they came from)
UserData = dict[str, tuple[np.ndarray, np.ndarray, Path]]
Converter = Callable[[list, list, str], tuple[np.ndarray, np.ndarray]]


def encode(text: str) -> np.ndarray:
    """Character ids of ``text`` in :data:`VOCABULARY`; characters outside LEAF's 80 get :data:`UNKNOWN`."""
    codes = np.fromiter(map(ord, text), dtype=np.int64, count=len(text))
    return np.where(codes < 128, _ASCII_IDS[np.minimum(codes, 127)], UNKNOWN)


def _json_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.suffix == ".json" and p.is_file())
    if not files:
        raise DataError(f"{directory}: no .json files; a LEAF directory holds LEAF's JSON files "
                        "(or train/ and test/ subdirectories of them)")
    return files


def _read_file(path: Path, convert: Converter) -> UserData:
    """One LEAF JSON file's users, each checked against its num_samples and converted to arrays."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable JSON file ({err})") from None
    missing = [key for key in ("users", "num_samples", "user_data") if not isinstance(data, dict) or key not in data]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(map(repr, missing))}; a LEAF file is an object with "
                        "'users' (list), 'num_samples' (list) and 'user_data' ({user: {'x': [...], 'y': [...]}})")
    users, counts, user_data = data["users"], data["num_samples"], data["user_data"]
    if not isinstance(users, list) or not isinstance(counts, list) or len(users) != len(counts):
        raise DataError(f"{path}: 'users' and 'num_samples' must be lists of the same length, got "
                        f"{len(users) if isinstance(users, list) else type(users).__name__} users and "
                        f"{len(counts) if isinstance(counts, list) else type(counts).__name__} counts")
    if not all(isinstance(user, str) for user in users) or len(set(users)) != len(users):
        raise DataError(f"{path}: 'users' must be distinct user names (strings)")
    if not isinstance(user_data, dict):
        raise DataError(f"{path}: 'user_data' must be an object {{user: {{'x': [...], 'y': [...]}}}}")
    absent, unlisted = sorted(set(users) - set(user_data)), sorted(set(user_data) - set(users))
    if absent or unlisted:
        raise DataError(f"{path}: 'users' and 'user_data' must name the same users; listed without data: "
                        f"{absent[:5]}, data without listing: {unlisted[:5]}")
    out: UserData = {}
    for user, count in zip(users, counts):
        where = f"{path}: user {user!r}"
        record = user_data[user]
        if not isinstance(record, dict) or not all(isinstance(record.get(k), list) for k in "xy"):
            raise DataError(f"{where}: user_data must be {{'x': [...], 'y': [...]}}")
        if not len(record["x"]) == len(record["y"]) == count:
            raise DataError(f"{where}: num_samples says {count} but x has {len(record['x'])} and y "
                            f"{len(record['y'])} examples")
        if count:
            out[user] = (*convert(record["x"], record["y"], where), path)
    return out


def _read_split(files: list[Path], convert: Converter) -> UserData:
    users: UserData = {}
    for path in files:
        for user, data in _read_file(path, convert).items():
            if user in users:
                raise DataError(f"{path}: user {user!r} is also in {users[user][2]}; a user's examples "
                                "belong in one file per split")
            users[user] = data
    return users


def _read_leaf(path: str | Path, convert: Converter, test_split: TestSplit) -> tuple[UserData, UserData | None]:
    """(train users, test users or None) from LEAF's layout: train/ and test/, a directory, or one file."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"LEAF dataset: path not found: {root}")
    if root.is_file():
        return _read_split([root], convert), None
    if not (root / "train").is_dir():
        return _read_split(_json_files(root), convert), None
    train = _read_split(_json_files(root / "train"), convert)
    test_dir = root / "test"
    test = _read_split(_json_files(test_dir), convert) if test_dir.is_dir() and test_split != "drop" else None
    if test is not None and test_split == "merge":
        for user, (x, y, source) in test.items():
            if user in train:
                train_x, train_y, _ = train[user]
                x, y = np.concatenate([train_x, x]), np.concatenate([train_y, y])
            train[user] = (x, y, source)
        test = None
    return train, test


def _stack(users: UserData, ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All users' examples one user after another, in id order, and each example's client id."""
    order = sorted(users, key=ids.__getitem__)
    first = users[order[0]]
    odd = next((users[u] for u in order if users[u][0].shape[1:] != first[0].shape[1:]), None)
    if odd is not None:
        raise DataError(f"{odd[2]}: examples of shape {odd[0].shape[1:]}, but {first[2]} has {first[0].shape[1:]}; "
                        "every example must have the same shape")
    groups = np.repeat([ids[u] for u in order], [len(users[u][1]) for u in order]).astype(np.int64)
    return np.concatenate([users[u][0] for u in order]), np.concatenate([users[u][1] for u in order]), groups


def _load(path: str | Path, test_split: TestSplit, convert: Converter, name: str,
          **dataset: Any) -> tuple[Dataset, Dataset | None]:
    """Train (and LEAF's test split) as Datasets whose groups share one user -> id map: train users
    0..G-1 in sorted order, then users found only in the test files (LEAF's split by user)."""
    train, test = _read_leaf(path, convert, test_split)
    if not train:
        raise DataError(f"{path}: the LEAF data holds no examples")
    ids = {user: i for i, user in enumerate(sorted(train))}
    ids |= {user: len(ids) + i for i, user in enumerate(sorted(set(test or ()) - set(ids)))}
    parts = []
    for users in (train, test):
        if not users:
            parts.append(None)
            continue
        x, y, groups = _stack(users, ids)
        built = from_arrays(x, y, name, source=str(path), copy=False, **dataset)
        parts.append(dataclasses.replace(built, groups=groups))  # ids kept as mapped, not renumbered per split
    return parts[0], parts[1]


def _femnist_arrays(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    bad = next((i for i, image in enumerate(x) if not isinstance(image, list) or len(image) != FEMNIST_PIXELS), None)
    if bad is not None:
        raise DataError(f"{where}: example {bad} of x is not {FEMNIST_PIXELS} numbers (a flattened 28x28 image)")
    try:
        images = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
        labels = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: x must hold numbers and y integer classes ({err})") from None
    bad = ~np.isin(labels, np.arange(FEMNIST_CLASSES))
    if bad.any():
        raise DataError(f"{where}: y must be classes 0..{FEMNIST_CLASSES - 1}, example {int(np.argmax(bad))} "
                        f"is {y[int(np.argmax(bad))]!r}")
    return images, labels.astype(np.int64)


def _shakespeare_arrays(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Strings and their next characters become ids x [n, T] and, for every position, the next id."""
    width = len(x[0]) if x and isinstance(x[0], str) else 0
    bad = next((i for i, s in enumerate(x) if not isinstance(s, str) or len(s) != width or not s), None)
    if bad is not None:
        raise DataError(f"{where}: example {bad} of x is not a string of the same length as the first "
                        f"({width}); LEAF Shakespeare's x are 80-character strings")
    bad = next((i for i, c in enumerate(y) if not isinstance(c, str) or len(c) != 1), None)
    if bad is not None:
        raise DataError(f"{where}: example {bad} of y is {y[bad]!r}, not one character (the one after x)")
    inputs = encode("".join(x)).reshape(len(x), width)
    return inputs, np.concatenate([inputs[:, 1:], encode("".join(y))[:, None]], axis=1)


def load_femnist(*, path: str | Path, test_split: TestSplit = "official") -> tuple[Dataset, Dataset | None]:
    """LEAF's FEMNIST: 28x28 images [N, 1, 28, 28] with LEAF's pixel values, 62 classes, clients = writers.

    ``test_split``: "official" returns LEAF's test/ files as the test split (its ``groups`` numbered
    like train's), "merge" adds them to the training data, "drop" ignores them.
    """
    return _load(path, test_split, _femnist_arrays, "femnist", n_classes=FEMNIST_CLASSES)


def load_leaf_shakespeare(*, path: str | Path,
                          test_split: TestSplit = "official") -> tuple[Dataset, Dataset | None]:
    """LEAF's Shakespeare as next-character modelling: x [N, 80] character ids of LEAF's strings, y the
    string shifted by one plus LEAF's target character; vocabulary LEAF's 80 characters plus ``<unk>``
    (id 80); clients = speaking roles. ``test_split`` as for :func:`load_femnist`; LEAF's windows
    overlap by 79 characters, so "merge" lets fedloom's random splits test on text seen in training.
    """
    return _load(path, test_split, _shakespeare_arrays, "leaf_shakespeare", task="language_model",
                 n_classes=len(VOCABULARY), vocabulary=VOCABULARY)
