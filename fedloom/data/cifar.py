"""CIFAR-10 and CIFAR-100 from the python-pickle batches, as torchvision downloads and extracts them.

The batches are pickles, and unpickling an untrusted file can run any code, so they
are read with :class:`ArraysOnlyUnpickler`: dicts, lists, strings, numbers and
numpy arrays, nothing else.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .datasets import DataError, Dataset, from_arrays

# the numpy callables an ndarray's pickle names (numpy 1 spells the module numpy.core, numpy 2 numpy._core),
# taken from numpy's own reductions rather than imported from private modules
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]  # protocol-5 pickles of arrays
_ARRAY_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a Python object other than numpy's array reconstruction."""


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles builtin dicts, lists, tuples, str, bytes and numbers, and numpy arrays; every other
    global (a class or function the pickle would call, such as os.system) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ARRAY_GLOBALS[module, name]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None


def read_pickle(path: Path) -> Any:
    """The object in a pickle holding only plain data and numpy arrays; DataError naming the file otherwise."""
    try:
        with path.open("rb") as file:
            # latin1: the CIFAR files are Python 2 pickles whose str values include numpy's raw bytes
            return ArraysOnlyUnpickler(file, encoding="latin1").load()
    except RefusedGlobal as err:
        raise DataError(f"{path}: refused to unpickle: it calls {err}, and a data batch holds only dicts, lists, "
                        "strings, numbers and numpy arrays (a pickle can run code; this file is not a CIFAR batch)"
                        ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err})") from None
    except Exception as err:  # a malformed pickle fails in many ways (EOFError, ValueError, KeyError, ...)
        raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant's files lie as torchvision extracts them, and the training images' channel
    statistics used to normalize."""

    name: str
    folder: str  # the folder torchvision extracts
    train_files: tuple[str, ...]
    test_file: str
    mean: tuple[float, float, float]  # per-channel statistics of the training images in [0, 1]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        """The training files and the test file."""
        return (*self.train_files, self.test_file)

    def describe(self) -> str:
        """The expected folder and files, for an error message."""
        return f"{self.folder}/ holding {', '.join(self.files)} (as torchvision's {self.name.upper()} extracts it)"


CIFAR10 = CifarLayout("cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                      (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100 = CifarLayout("cifar100", "cifar-100-python", ("train",), "test",
                       (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _find_folder(path: str | Path, layout: CifarLayout) -> Path:
    """``path`` itself or ``path/<standard folder>``, whichever holds every batch file."""
    root = Path(path).expanduser()
    candidates = (root / layout.folder, root)
    for folder in candidates:
        if all((folder / name).is_file() for name in layout.files):
            return folder
    if not root.is_dir():
        raise DataError(f"{layout.name}: directory not found: {root}; expected {layout.describe()}, "
                        "or the directory that contains it")
    folder = next(f for f in candidates if f.is_dir())
    missing = ", ".join(name for name in layout.files if not (folder / name).is_file())
    where = f"{folder} lacks {missing}" if folder != root else f"{root} has no {layout.folder}/ and lacks {missing}"
    raise DataError(f"{layout.name}: {where}; expected {layout.describe()}, or the directory that contains it")


def _read_batch(path: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 3072], int64 labels [N]) of one batch file, checked."""
    batch = read_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR batch: holds a {type(batch).__name__}, not a dict")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    missing = [key for key in ("data", label_key) if key not in batch]
    if missing:
        raise DataError(f"{path}: not a CIFAR batch: no key(s) {', '.join(missing)}; "
                        f"found {sorted(map(str, batch))}")
    data, labels = batch["data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072] (32x32 RGB, channel-first); got "
                        f"{getattr(data, 'dtype', type(data).__name__)} of shape {getattr(data, 'shape', '?')}")
    in_range = labels.dtype.kind in "iu" and labels.size and 0 <= labels.min() and labels.max() < n_classes
    if labels.shape != (len(data),) or not in_range:
        raise DataError(f"{path}: {label_key!r} must be {len(data)} integer labels 0..{n_classes - 1}; got "
                        f"{labels.dtype} of shape {labels.shape}")
    return data, labels.astype(np.int64)


def _to_images(data: np.ndarray, layout: CifarLayout, normalize: bool) -> np.ndarray:
    """float32 [N, 3, 32, 32] in [0, 1], or standardized per channel with the training set's mean and std."""
    images = data.reshape(-1, 3, 32, 32).astype(np.float32)
    images /= 255
    if normalize:
        images -= np.array(layout.mean, np.float32)[:, None, None]
        images /= np.array(layout.std, np.float32)[:, None, None]
    return images


def _load_split(folder: Path, files: tuple[str, ...], layout: CifarLayout, label_key: str, n_classes: int,
               normalize: bool) -> Dataset:
    batches = [_read_batch(folder / name, label_key, n_classes) for name in files]
    data, labels = (np.concatenate(parts) for parts in zip(*batches))
    return from_arrays(_to_images(data, layout, normalize), labels, layout.name, source=str(folder / files[0]),
                       n_classes=n_classes, copy=False)


def _load_cifar(layout: CifarLayout, path: str | Path, label_key: str, n_classes: int,
               normalize: bool) -> tuple[Dataset, Dataset]:
    folder = _find_folder(path, layout)
    return (_load_split(folder, layout.train_files, layout, label_key, n_classes, normalize),
            _load_split(folder, (layout.test_file,), layout, label_key, n_classes, normalize))


def load_cifar10(*, path: str | Path, normalize: bool = False) -> tuple[Dataset, Dataset]:
    """CIFAR-10: 50,000 training and 10,000 official test images, float32 [N, 3, 32, 32], 10 classes.

    ``path`` is the ``cifar-10-batches-py`` folder or its parent (torchvision's root). Pixels are
    scaled to [0, 1]; ``normalize=True`` then standardizes each channel with the usual CIFAR-10
    training mean (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616).
    """
    return _load_cifar(CIFAR10, path, "labels", 10, normalize)


def load_cifar100(*, path: str | Path, labels: Literal["fine", "coarse"] = "fine",
                  normalize: bool = False) -> tuple[Dataset, Dataset]:
    """CIFAR-100: 50,000 training and 10,000 official test images, float32 [N, 3, 32, 32], with the
    100 fine labels or (``labels="coarse"``) the 20 superclasses.

    ``path`` is the ``cifar-100-python`` folder or its parent. Pixels are scaled to [0, 1];
    ``normalize=True`` then standardizes each channel with the usual CIFAR-100 training mean
    (0.5071, 0.4865, 0.4409) and std (0.2673, 0.2564, 0.2762).
    """
    key, n_classes = ("fine_labels", 100) if labels == "fine" else ("coarse_labels", 20)
    return _load_cifar(CIFAR100, path, key, n_classes, normalize)
