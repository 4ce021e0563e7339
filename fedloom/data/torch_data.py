"""A ``torch.utils.data.Dataset`` of (x, y) pairs as a fedloom :class:`Dataset`."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from .datasets import DataError, Dataset, from_arrays
from .images import pil_images


def _as_array(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _stack(values: list[Any], what: str, source: str) -> np.ndarray:
    arrays = [_as_array(value) for value in values]
    odd = next((i for i, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
    if odd is not None:
        raise DataError(f"{source}: every {what} must have one shape; example 0 has {arrays[0].shape}, "
                        f"example {odd} has {arrays[odd].shape}")
    return np.stack(arrays)


def _pairs(ds: Any, source: str) -> tuple[list[Any], list[Any]]:
    """The inputs and targets of every example, by index when the dataset has a length, else by iteration."""
    examples = (ds[i] for i in range(len(ds))) if hasattr(ds, "__len__") else iter(ds)
    xs, ys = [], []
    for i, example in enumerate(examples):
        if not isinstance(example, (tuple, list)) or len(example) != 2:
            raise DataError(f"{source}: example {i} is a {type(example).__name__}, not an (x, y) pair")
        xs.append(example[0])
        ys.append(example[1])
    if not xs:
        raise DataError(f"{source}: the data is empty (0 examples)")
    return xs, ys


def from_torch_dataset(ds: torch.utils.data.Dataset, *, name: str = "torch", task: str = "classification",
                       n_classes: int | None = None) -> Dataset:
    """Every (x, y) pair of ``ds``, read once, as a fedloom Dataset for ``task``.

    ``x`` may be a tensor, array or number, or a PIL image (then float32 [C, H, W] in [0, 1], as
    ToTensor makes it); ``y`` a label, a regression target or a token-id sequence. ``n_classes``
    defaults to ``len(ds.classes)`` where the dataset names its classes (torchvision's do).
    """
    xs, ys = _pairs(ds, name)
    if n_classes is None and task == "classification" and isinstance(getattr(ds, "classes", None), (list, tuple)):
        n_classes = len(ds.classes)
    pil = sys.modules.get("PIL.Image")  # a PIL image can only come from a loaded PIL
    is_image = pil is not None and isinstance(xs[0], pil.Image)
    x = pil_images(xs, name) if is_image else _stack(xs, "x", name)
    return from_arrays(x, _stack(ys, "y", name), name, source=name, n_classes=n_classes, task=task, copy=False)
