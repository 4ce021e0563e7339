"""A device trace: one CSV row per client.

    client,speed,up_mbps,down_mbps,available
    0,1.0,10,50,
    1,0.25,2,10,0-3600;7200-10800

``speed`` is relative to the nominal device (1: seconds_per_example per example), bandwidths are
megabits per second, ``available`` lists the client's online intervals in virtual seconds
(``start-end`` joined by ``;``; empty: always online). Intervals repeat with the trace's period
(the last interval's end over all clients), as FedScale replays its behaviour traces. Every client
of the federation needs a row; a row for an unknown client, a duplicate or a malformed value is
refused naming the file and line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLUMNS = ("client", "speed", "up_mbps", "down_mbps", "available")


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Trace:
    """Per-client device traces: speed, bandwidths and online intervals."""

    speed: np.ndarray  # [n]
    up_mbps: np.ndarray  # [n]
    down_mbps: np.ndarray  # [n]
    intervals: list[np.ndarray]  # per client [m, 2] online (start, end); empty: always online
    periods: np.ndarray | None = None  # per client, the intervals repeat every periods[i] s (FedScale's
    # finish_time); None: every client's repeat with the trace's latest end


def read_trace(path: str | Path, n_clients: int) -> Trace:
    """The trace CSV at ``path`` for ``n_clients`` clients; TraceError naming the file and line of a bad entry."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"system.trace: file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if tuple(header) != COLUMNS:
            raise TraceError(f"{path}:1: the header must be {','.join(COLUMNS)} (got {','.join(header)!r})")
        rows = {}
        for line, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            client, values = _row(path, line, row, n_clients)
            if client in rows:
                raise TraceError(f"{path}:{line}: client {client} has a row already (line {rows[client][0]})")
            rows[client] = (line, values)
    missing = sorted(set(range(n_clients)) - set(rows))
    if missing:
        raise TraceError(f"{path}: no row for client {missing[0]} ({len(missing)} of {n_clients} clients missing)")
    ordered = [rows[c][1] for c in range(n_clients)]
    return Trace(*(np.array([v[i] for v in ordered], dtype=np.float64) for i in range(3)), [v[3] for v in ordered])


def _row(path: Path, line: int, row: list[str], n_clients: int) -> tuple[int, tuple]:
    where = f"{path}:{line}"
    if len(row) != len(COLUMNS):
        raise TraceError(f"{where}: {len(row)} fields, expected {len(COLUMNS)} ({','.join(COLUMNS)})")
    client = _number(where, "client", row[0], int)
    if not 0 <= client < n_clients:
        raise TraceError(f"{where}: unknown client {client} (the federation has clients 0 to {n_clients - 1})")
    speed, up, down = (_number(where, name, text, float) for name, text in zip(COLUMNS[1:4], row[1:4]))
    for name, value in (("speed", speed), ("up_mbps", up), ("down_mbps", down)):
        if not value > 0:
            raise TraceError(f"{where}: {name} must be above 0 (got {value:g})")
    return client, (speed, up, down, _intervals(where, row[4]))


def _number(where: str, name: str, text: str, kind: type) -> int | float:
    try:
        return kind(text.strip())
    except ValueError:
        raise TraceError(f"{where}: {name} is not a{'n integer' if kind is int else ' number'}: {text!r}") from None


def _intervals(where: str, text: str) -> np.ndarray:
    """``start-end;start-end`` as a sorted [m, 2] array of non-overlapping intervals."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        start, sep, end = part.partition("-")
        try:
            pair = (float(start), float(end))
        except ValueError:
            pair = None
        if not sep or pair is None or not 0 <= pair[0] < pair[1]:
            raise TraceError(f"{where}: available interval {part!r} is not start-end with 0 <= start < end")
        pairs.append(pair)
    intervals = np.array(sorted(pairs), dtype=np.float64).reshape(-1, 2)
    if len(intervals) > 1 and (intervals[1:, 0] < intervals[:-1, 1]).any():
        raise TraceError(f"{where}: available intervals overlap: {text!r}")
    return intervals
