"""FedScale's device traces (Lai et al., "FedScale: Benchmarking Model and System Performance of
Federated Learning at Scale", 2022), read into fedloom's system model.

Two pickles, keyed by FedScale's client id:

    device file    {id: {'computation': ms per example (inference), 'communication': kbps}}
    behavior file  {id: {'duration': s, 'inactive': [s, ...], 'active': [s, ...], 'finish_time': s, ...}}

FedScale times a round as ``3 x examples x computation / 1000`` seconds of compute (backward costs
about twice the forward) and ``kilobits / communication`` on one link for both directions, and a
client is online while ``active[j] <= t mod finish_time <= inactive[j]`` for some j. fedloom's model
gives the same seconds: speed = seconds_per_example / (3 computation / 1000), both bandwidths
``communication x 1024 / 8`` bytes per second (FedScale counts kilobits of 1024 bits), and the
(active, inactive) pairs as online intervals repeating every ``finish_time``.

Federation client i takes the device file's i-th smallest id (real traces hold far more devices than
a federation uses); the behaviour file, if given, must have an entry for each of those ids and no id
the device file lacks. Pickles run code when loaded in general, so these are read by an unpickler
that builds only builtin containers, strings and numbers and refuses every global (``find_class``).
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.systems.trace import Trace, TraceError

MBPS_PER_KBPS = 1024 / 1e6  # FedScale's kilobit is 1024 bits (its model sizes: bytes / 1024 * 8)
AUGMENTATION = 3.0  # FedScale's training cost over its profiled inference latency


class _PlainUnpickler(pickle.Unpickler):
    """Builtin dicts, lists, tuples, strings and numbers only: any class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}; only dicts, lists, strings and numbers are read")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference; only dicts, lists, strings and numbers "
                                     "are read")


def load_plain_pickle(path: str | Path, key: str) -> dict:
    """The dict a FedScale pickle holds, read without running code; ``key`` is the config key naming it."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"system.{key}: file not found: {path}")
    try:
        value = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as err:
        raise TraceError(f"{path} (system.{key}): not a plain FedScale pickle: {err}") from None
    if not isinstance(value, dict):
        raise TraceError(f"{path} (system.{key}): expected a dict keyed by client id, got {type(value).__name__}")
    return value


def read_fedscale(device_file: str | Path, behavior_file: str | Path | None, n_clients: int,
                  seconds_per_example: float) -> Trace:
    """The trace of ``n_clients`` clients from FedScale's device (and behaviour) pickles."""
    devices = load_plain_pickle(device_file, "device_file")
    ids = _client_ids(devices, device_file)
    if len(ids) < n_clients:
        raise TraceError(f"{device_file} (system.device_file): {len(ids)} devices for a federation of {n_clients} "
                         "clients; every client needs one")
    ids = ids[:n_clients]
    compute_ms, kbps = np.array([_device(devices[c], c, device_file) for c in ids]).T.reshape(2, -1)
    speed = seconds_per_example / (AUGMENTATION * compute_ms / 1000)
    intervals, periods = _behaviour(behavior_file, ids, set(devices)) if behavior_file else (
        [np.zeros((0, 2))] * n_clients, [0.0] * n_clients)
    return Trace(speed, kbps * MBPS_PER_KBPS, kbps * MBPS_PER_KBPS, intervals, np.array(periods))


def _client_ids(table: dict, path: str | Path) -> list[int]:
    bad = next((k for k in table if not isinstance(k, int) or isinstance(k, bool) or k < 0), None)
    if bad is not None:
        raise TraceError(f"{path}: client id {bad!r} is not a non-negative integer")
    return sorted(table)


def _number(value: Any, client: int, field: str, path: str | Path) -> float:
    """A finite number above 0 (FedScale writes ints or floats)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise TraceError(f"{path}: client {client}: {field!r} must be a number above 0 (got {value!r})")
    return float(value)


def _device(entry: Any, client: int, path: str | Path) -> tuple[float, float]:
    if not isinstance(entry, dict) or not {"computation", "communication"} <= set(entry):
        raise TraceError(f"{path}: client {client}: expected {{'computation': ms per example, 'communication': "
                         f"kbps}}, got {entry!r}")
    return (_number(entry["computation"], client, "computation", path),
            _number(entry["communication"], client, "communication", path))


def _behaviour(path: str | Path, ids: list[int], known: set[int]) -> tuple[list[np.ndarray], list[float]]:
    """Each client's online intervals and their period (its finish_time)."""
    table = load_plain_pickle(path, "behavior_file")
    unknown = next((c for c in _client_ids(table, path) if c not in known), None)
    if unknown is not None:
        raise TraceError(f"{path} (system.behavior_file): unknown client {unknown}: the device file has no "
                         "such id")
    missing = next((c for c in ids if c not in table), None)
    if missing is not None:
        raise TraceError(f"{path} (system.behavior_file): no entry for client {missing} (federation client "
                         f"{ids.index(missing)})")
    parsed = [_online(table[c], c, path) for c in ids]
    return [p[0] for p in parsed], [p[1] for p in parsed]


def _online(entry: Any, client: int, path: str | Path) -> tuple[np.ndarray, float]:
    """(active[j], inactive[j]) pairs, sorted and within [0, finish_time]."""
    fields = ("active", "inactive", "finish_time")
    if not isinstance(entry, dict) or not set(fields) <= set(entry):
        raise TraceError(f"{path}: client {client}: expected a dict with 'active', 'inactive' and 'finish_time', "
                         f"got {entry!r}")
    active, inactive = entry["active"], entry["inactive"]
    finish = _number(entry["finish_time"], client, "finish_time", path)
    if not isinstance(active, list) or not isinstance(inactive, list) or len(active) != len(inactive) or not active:
        raise TraceError(f"{path}: client {client}: 'active' and 'inactive' must be lists of equal, non-zero length")
    if any(isinstance(t, bool) or not isinstance(t, (int, float)) for t in active + inactive):
        raise TraceError(f"{path}: client {client}: 'active' and 'inactive' must hold numbers (seconds)")
    pairs = np.array([active, inactive], dtype=np.float64).T
    if (pairs[:, 0] < 0).any() or (pairs[:, 1] < pairs[:, 0]).any() or (pairs[1:, 0] < pairs[:-1, 1]).any() \
            or pairs[-1, 1] > finish:
        raise TraceError(f"{path}: client {client}: intervals must be increasing, active[j] <= inactive[j] <= "
                         f"active[j+1], within finish_time {finish:g}")
    return pairs, finish
