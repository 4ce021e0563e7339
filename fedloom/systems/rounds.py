"""The synchronous round on the virtual clock: who may be sampled, who finishes in time, how long it took.

Pure functions of arrays; the federated round (``rounds/federated.py``) calls them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedloom.compression.uplink import send
from fedloom.core.rng import Stream, numpy_generator
from fedloom.engines.base import local_steps

IDLE_WAIT_S = 60.0  # a round that finds nobody online waits this long on the virtual clock
BYTES_PER_FLOAT = 4


@dataclass(frozen=True)
class Cut:
    """Which sampled clients a deadline keeps (on time) or leaves late, and the round's virtual duration."""

    on_time: np.ndarray  # positions (into the sampled clients) whose updates this round aggregates
    late: np.ndarray  # positions that missed the deadline (system.late = "stale": applied next round)
    seconds: float  # the round's virtual duration


def sample_available(online: np.ndarray, k: int, over_selection: float, seed: int, round_idx: int) -> list[int]:
    """ceil(k (1 + over_selection)) clients drawn uniformly from those ``online`` (fewer if fewer are)."""
    candidates = np.flatnonzero(online)
    m = min(len(candidates), math.ceil(k * (1 + over_selection)))
    rng = numpy_generator(seed, Stream.SAMPLING, round_idx)
    return sorted(rng.choice(candidates, size=m, replace=False).tolist())


def cut(finish: np.ndarray, k: int, deadline: float | None) -> Cut:
    """The round closes at the k-th finisher or at the deadline, whichever comes first. The first k to
    finish are kept; over-selected clients still running when k have finished are cancelled; clients
    running at the deadline are late."""
    order = np.argsort(finish, kind="stable")
    in_time = order if deadline is None else order[finish[order] <= deadline]
    on_time = np.sort(in_time[:k])
    closed_by_deadline = deadline is not None and len(on_time) < k
    late = np.sort(order[len(in_time):]) if closed_by_deadline else np.zeros(0, dtype=np.int64)
    if closed_by_deadline:
        return Cut(on_time, late, float(deadline))
    return Cut(on_time, late, float(finish[on_time].max()) if len(on_time) else 0.0)


def examples_processed(sizes: np.ndarray, local) -> np.ndarray:
    """Examples each client computes in a round: its local steps times the batch size."""
    return local_steps(sizes, local) * local.batch_size


def uplink_row_bytes(compressor, seed: int, d: int) -> int:
    """Bytes one client's row takes on the uplink: fp32, or the compressor's payload for a row (its
    length does not depend on the values for the compressors fedloom ships)."""
    if compressor is None:
        return BYTES_PER_FLOAT * d
    import torch

    _, nbytes, _ = send(compressor, seed, torch.ones(1, d), [0], 0, {})
    return int(nbytes[0])
