"""What every contestant's driver shares, with no dependency but torch and numpy
(the Flower and pfl drivers run in their own virtual environments, without fedloom).

- ``load_workload(spec_path)``: the workload JSON and the partitioned arrays of
  its .npz (written once by bench/common.py from fedloom's own partition, so every
  contestant trains on identical client data, starts from the same initial
  weights and samples the same clients each round);
- ``build_model``: the same architectures as fedloom.models (same nn.Sequential
  layout, so parameter names match and the initial weights load by name; the
  ResNets are fedloom's own file, which needs only torch);
- ``Workload.to(device)`` and ``sync``: a contestant on a GPU holds the whole
  data set there (as fedloom does when it fits ``engine.data_on_device_gb``)
  and waits for the device before it stops a round's clock;
- ``accuracy``: accuracy on the global test set; ``Curve``: that accuracy after
  every round with the time it was reached (``--curve``, for bench/tta.py);
- ``emit``: the one JSON line a driver prints for bench/common.py to read.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

RESULT_PREFIX = "BENCH-RESULT "


def one_thread() -> None:
    """Every contestant runs torch on one intra-op and one inter-op thread."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


class Workload:
    """The workload JSON plus its arrays, as torch tensors."""

    def __init__(self, spec: dict, arrays: dict[str, np.ndarray]):
        self.spec = spec
        self.x = torch.from_numpy(arrays["x"])
        self.y = torch.from_numpy(arrays["y"])
        offsets = arrays["offsets"]
        flat = torch.from_numpy(arrays["train_idx"])
        self.train_idx = [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        self.x_test = torch.from_numpy(arrays["x_test"])
        self.y_test = torch.from_numpy(arrays["y_test"])
        self.sampled = arrays["sampled"]  # [rounds, clients_per_round] client ids
        self.init = {k[len("init/"):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("init/")}

    def to(self, device: str) -> "Workload":
        """Every example, index and the initial weights on ``device``, once (no copy per batch)."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        self.x_test, self.y_test = self.x_test.to(device), self.y_test.to(device)
        self.train_idx = [i.to(device) for i in self.train_idx]
        self.init = {k: v.to(device) for k, v in self.init.items()}
        return self

    @property
    def n_clients(self) -> int:
        return len(self.train_idx)

    def client(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.train_idx[cid]
        return self.x[idx], self.y[idx]

    def model(self) -> nn.Module:
        m = build_model(self.spec["model"], tuple(self.x.shape[1:]), self.spec["n_classes"], self.spec.get("hidden"))
        m.load_state_dict(self.init)
        return m.to(self.x.device)


def load_workload(spec_path: str) -> Workload:
    with open(spec_path) as f:
        spec = json.load(f)
    arrays = {}
    for key in ("data_npz", "npz"):
        with np.load(spec[key]) as archive:
            arrays.update({k: archive[k] for k in archive.files})
    return Workload(spec, arrays)


def build_model(name: str, input_shape: tuple[int, ...], n_classes: int, hidden=None) -> nn.Module:
    """fedloom.models' logistic / mlp / cnn, layer for layer."""
    if name == "logistic":
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), n_classes))
    if name == "mlp":
        widths = [math.prod(input_shape), *(hidden or [64])]
        layers: list[nn.Module] = [nn.Flatten()]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], n_classes))
        return nn.Sequential(*layers)
    if name == "cnn":
        channels, height, width = input_shape
        features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 16 * (height // 4) * (width // 4)
        return nn.Sequential(features, nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                             nn.Linear(84, n_classes))
    if name in ("resnet20", "resnet18"):
        return getattr(_fedloom_resnet(), name)(input_shape, n_classes)
    raise ValueError(f"unknown model {name!r}")


def _fedloom_resnet():
    """fedloom/models/resnet.py loaded from its file: the very model fedloom builds (same parameter
    names), without the fedloom package, which the peers' venvs do not have."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "fedloom" / "models" / "resnet.py"
    spec = importlib.util.spec_from_file_location("fedloom_models_resnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.train()
    return correct / max(len(y), 1)


def shuffle_seed(seed: int, round_idx: int, cid: int) -> int:
    """A batch-order seed per (seed, round, client) for the contestants that shuffle themselves."""
    return int(np.random.SeedSequence([seed, 0xBE7C, round_idx, cid]).generate_state(1)[0])


def peak_rss_mb() -> float:
    """This process's peak resident memory (and its waited-for children's), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def emit(result: dict) -> None:
    result.setdefault("peak_rss_self_mb", peak_rss_mb())
    result.setdefault("torch_threads", torch.get_num_threads())
    result.setdefault("torch", torch.__version__)
    result.setdefault("python", sys.version.split()[0])
    result.setdefault("pid", os.getpid())
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work, so a round's time includes it (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Round timestamps: ``start_round()`` and ``end_round()`` around each round."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.t0 = time.perf_counter()
        self.rounds: list[float] = []
        self._last = None
        self.device = device

    def start_round(self) -> None:
        self._last = time.perf_counter()

    def end_round(self) -> None:
        sync(self.device)
        self.rounds.append(time.perf_counter() - self._last)


class Curve:
    """Test accuracy after every round (``--curve``: bench/tta.py's time to accuracy). Each point is
    [unix time after the round and its evaluation, accuracy, seconds the evaluation took]: the harness
    takes the evaluations out of the clock, since a contestant pays them only for this measurement."""

    def __init__(self, w: Workload, enabled: bool):
        self.w, self.enabled = w, enabled
        self.points: list[list[float]] = []

    def point(self, model: nn.Module) -> None:
        if not self.enabled:
            return
        sync(self.w.x.device)
        began = time.perf_counter()
        acc = accuracy(model, self.w.x_test, self.w.y_test)
        self.points.append([time.time(), acc, time.perf_counter() - began])

    def result(self) -> dict:
        return {"curve": self.points} if self.enabled else {}
