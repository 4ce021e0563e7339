"""A run is a directory: config, metrics stream, summary, model, partition.

Files are written so that a crash or Ctrl-C never leaves a half-written file
behind: each metrics line is fsync'd as it is appended, and every other file is
written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any, Callable

import tomli_w
import torch
from safetensors.torch import save_file

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model.safetensors"
PARTITION = "partition.json"
GRAPH = "graph.json"
SUMMARY_PREFIXES = ("central_", "federated_", "personal_", "node_", "xbar_")  # the task's metrics, whatever they are
PER_CLIENT = "per_client_"  # the summary's per-client final metric: the report's and the dashboard's histograms
SUMMARY_KEYS = ("consensus_distance", "bytes_per_node_total", "train_loss", "bytes_up_total", "bytes_down_total",
                "epsilon", "dp_clip", "wall_seconds", "virtual_seconds")  # what the summary takes from the last metrics
DISK_ERRORS = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # the disk, not the file


def _jsonable(obj: Any) -> Any:
    """Let numpy/torch scalars and arrays and paths into JSON without the caller converting them."""
    if isinstance(obj, PurePath):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def to_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON: a NaN or infinite number is written as null (``strict_record`` says why)."""
    return json.dumps(_finite(obj), default=_jsonable, allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_record(record: dict) -> dict:
    """The record with a ``non_finite`` entry naming each top-level value that was NaN or infinite
    (JSON has neither; they are written as null)."""
    bad = {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    return {**record, "non_finite": bad} if bad else record


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary sibling, fsync it, then rename it over ``path``,
    so a reader sees either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary sibling renamed over it)."""
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _toml_ready(value: Any) -> Any:
    """TOML has no null and tomli_w knows no paths: drop None entries, stringify paths."""
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_ready(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


@dataclass(frozen=True)
class RunDir:
    """Handle on one run's directory; ``RunDir(path)`` reopens an existing one."""

    path: Path

    @classmethod
    def create(cls, root: str | Path, name: str) -> RunDir:
        """Make ``root/<name>-<YYYYmmdd-HHMMSS>`` (then ``-2``, ``-3``... if taken);
        ``mkdir`` without ``exist_ok`` means two runs can never share a directory."""
        if not name or Path(name).name != name:
            raise ValueError(f"run name {name!r} must be a plain, non-empty file name (no '/')")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        stem = f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
        path = root / stem
        for n in itertools.count(2):
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                path = root / f"{stem}-{n}"

    @classmethod
    def fresh(cls, path: str | Path) -> RunDir:
        """Exactly ``path`` (made if missing), for a run whose place is fixed in advance (a sweep's);
        refused if it already holds a run, whose files a new one would mix with."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if (path / CONFIG).exists() or (path / METRICS).exists():
            raise FileExistsError(f"{path} already holds a run; `fedloom run --resume {path}` continues it")
        return cls(path)

    def write_config(self, config: dict) -> None:
        """Write the resolved config as ``config.toml``."""
        write_text_atomic(self.path / CONFIG, tomli_w.dumps(_toml_ready(config)))

    def append_metrics(self, record: dict) -> None:
        """Append one JSON line and fsync it, so an interrupted run keeps every finished round."""
        line = to_json(strict_record(record)) + "\n"
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, rounds: int) -> list[dict]:
        """Keep the records of rounds 1..``rounds`` (what a checkpoint holds) and drop the rest, a torn
        last line included; returns the records kept."""
        path = self.path / METRICS
        if not path.is_file():
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn last line is expected here: it is cut off
            kept = [r for r in read_metrics(self.path) if r.get("round", 0) <= rounds]
        write_text_atomic(path, "".join(to_json(r) + "\n" for r in kept))
        return kept

    def write_summary(self, summary: dict) -> None:
        """Write the summary as ``summary.json``."""
        write_text_atomic(self.path / SUMMARY, to_json(strict_record(summary), indent=2) + "\n")

    def save_model(self, tensors: dict[str, torch.Tensor]) -> Path:
        """Save contiguous CPU copies (safetensors refuses views, shared storage and GPU tensors)."""
        cpu = {
            name: t.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)
            for name, t in tensors.items()
        }
        path = self.path / MODEL
        replace_atomically(path, lambda tmp: save_file(cpu, str(tmp)))
        return path

    def write_partition(self, stats: dict) -> None:
        """Write the partition's statistics (examples and classes per client)."""
        write_text_atomic(self.path / PARTITION, to_json(stats) + "\n")

    def write_graph(self, graph: dict) -> None:
        """A decentralized run's gossip graph (nodes, edges, Byzantine nodes), for its drawing."""
        write_text_atomic(self.path / GRAPH, to_json(graph) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Parse ``metrics.jsonl``, forgiving only what a crash can leave: a cut-off last line."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path} (is {run_dir} a fedloom run directory?)")
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    records = []
    for i, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == lines[-1][0]:
                warnings.warn(f"{path}: skipping truncated last line {i} ({e.msg}); the run was probably interrupted mid-write")
                break
            raise ValueError(f"{path}: line {i} is not valid JSON ({e.msg}); the metrics file is corrupt") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {i} is a JSON {type(record).__name__}, expected one object per line")
        records.append(record)
    return records
