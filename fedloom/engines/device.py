"""Where local training and evaluation compute: ``engine.device``.

The run's state tree stays on the CPU (checkpoints load anywhere, the server
pipeline runs there); an engine moves what a round needs to its device and
brings the rows back. Data stays on the CPU and only each step's batch is
copied, unless the whole data set fits ``engine.data_on_device_gb``.

On CUDA, results are reproducible run to run where torch has deterministic
kernels: ``torch.use_deterministic_algorithms(True, warn_only=True)`` is set and
cuBLAS gets the fixed workspace it needs; an op without a deterministic kernel
warns once instead of failing (docs/architecture.md, "Devices").
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor


DATA_ON_DEVICE = 2**30  # bytes of data kept on the device when nothing else is said


class DeviceError(ValueError):
    """A device that this machine does not have; the message says what it has."""


def available() -> str:
    """The devices this torch build can use, for messages."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return ", ".join(found)


def resolve_device(name: str) -> tuple[torch.device, str | None]:
    """The torch device for ``engine.device``, and a note when "auto" had to settle for the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return _prepared(torch.device("cuda")), None
        return torch.device("cpu"), "engine.device = auto found no CUDA device and runs on the CPU"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"engine.device = {name!r} is not a device; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device is visible"
        raise DeviceError(f"engine.device = {name!r} but CUDA is not available here ({build}); available: "
                          f"{available()} (engine.device = auto uses CUDA when there is one)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"engine.device = {name!r}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s); available: {available()}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"engine.device = {name!r} but MPS is not available here; available: {available()}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"engine.device = {name!r}: fedloom runs on cpu, cuda or mps")
    return (_prepared(device) if device.type == "cuda" else device), None


def _prepared(device: torch.device) -> torch.device:
    """Deterministic kernels where torch has them (cuBLAS needs a fixed workspace for that)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def free_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device, None elsewhere (the CPU's budget is the configured one)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def moved(tree: Any, device: torch.device) -> Any:
    """Every tensor of a dict / tuple / list tree on ``device`` (no copy when it is there already)."""
    if isinstance(tree, Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: moved(v, device) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(moved(v, device) for v in tree)
    return tree


def loss_accumulator(device: torch.device, shape: tuple[int, ...] = ()) -> Tensor:
    """Zeros to sum step losses into on the device (no sync per step), in float64 where the device
    has it, as a Python float would sum them."""
    return torch.zeros(shape, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)


GATHER_ROWS = 256  # batches of more rows than this are gathered with index_select


class DeviceData:
    """A data set's examples for training on ``device``: all of it there when it fits ``budget`` bytes,
    else kept on the CPU with each batch copied over as it is gathered."""

    def __init__(self, x: Tensor, y: Tensor, device: torch.device, budget: int):
        fits = x.element_size() * x.numel() + y.element_size() * y.numel() <= budget
        self.home = device if fits else torch.device("cpu")
        self.x, self.y, self.device = x.to(self.home), y.to(self.home), device

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The examples at ``index`` on the training device."""
        index = index.to(self.home)
        if index.numel() > GATHER_ROWS:  # many rows: index_select copies whole rows, several times faster
            flat = index.reshape(-1)
            x = self.x.index_select(0, flat).view(*index.shape, *self.x.shape[1:])
            y = self.y.index_select(0, flat).view(*index.shape, *self.y.shape[1:])
        else:  # a few rows: advanced indexing is one call, less fixed overhead
            x, y = self.x[index], self.y[index]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
