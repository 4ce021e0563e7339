"""Data handed to ``fedloom.run(data=...)`` from Python, as the (train, test) pair every loader returns.

Accepted: a fedloom :class:`Dataset` or a ``(train, test)`` pair of them; arrays ``(x, y)``
(numpy or torch, classification labels); a dict of arrays (``x``, ``y``, optional ``x_test``,
``y_test``, ``client`` and ``task``); a torch ``Dataset`` of (x, y) pairs; a Hugging Face
``datasets.Dataset``.
"""

from __future__ import annotations

from typing import Any

from .datasets import DataError, Dataset, from_arrays

GIVEN = "python"  # data.dataset / model.name of parts handed over from Python


def as_datasets(data: Any) -> tuple[Dataset, Dataset | None]:
    """``data`` as (train, official test or None); a DataError names what was given and what is accepted."""
    if isinstance(data, Dataset):
        return data, None
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Dataset):
        if data[1] is not None and not isinstance(data[1], Dataset):
            raise DataError(f"data: the test half of (train, test) is a {type(data[1]).__name__}, not a Dataset")
        return data
    if isinstance(data, tuple) and len(data) == 2 and all(hasattr(a, "shape") for a in data):
        return _from_dict({"x": data[0], "y": data[1]})
    if isinstance(data, dict):
        return _from_dict(data)
    if type(data).__module__.startswith("datasets."):
        from .hf import from_hf_dataset

        return from_hf_dataset(data), None
    import torch.utils.data

    if isinstance(data, torch.utils.data.Dataset):
        from .torch_data import from_torch_dataset

        return from_torch_dataset(data), None
    raise DataError(f"data: a {type(data).__name__} is not data fedloom reads; give a fedloom Dataset, a (train, "
                    "test) pair of them, arrays (x, y), a dict of arrays (x, y, optional x_test, y_test, client, "
                    "task), a torch Dataset or a Hugging Face datasets.Dataset")


def _from_dict(arrays: dict[str, Any]) -> tuple[Dataset, Dataset | None]:
    stray = sorted(set(arrays) - {"x", "y", "x_test", "y_test", "client", "task"})
    missing = [k for k in ("x", "y") if k not in arrays]
    if stray or missing:
        raise DataError(f"data: the dict {'lacks ' + ', '.join(missing) if missing else 'holds ' + ', '.join(stray)}; "
                        "it takes x, y and optionally x_test, y_test, client, task")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError("data: give x_test and y_test together")
    task = arrays.get("task", "classification")
    train = from_arrays(arrays["x"], arrays["y"], GIVEN, arrays.get("client"), "data", task=task)
    if "x_test" not in arrays:
        return train, None
    # federate takes the larger class count of the two splits
    return train, from_arrays(arrays["x_test"], arrays["y_test"], GIVEN, None, "data (test)", task=task)
