"""Each client's compute speed, link bandwidths and availability, and the virtual seconds a round costs it.

A client's virtual time for a round is

    local steps x batch_size x seconds_per_example / speed + bytes up / uplink + bytes down / downlink

with bandwidths in bytes per second and the payload bytes the round counts (compressed rows are
smaller, so compression shows in time). Speeds are log-normal with median 1: ``speed_spread`` is the
ratio of the 95th to the 5th percentile (1: every client equal). Availability is ``always``, a
two-state Markov chain (mean online and offline durations), ``diurnal`` (online a fraction of each day,
at a phase of its own: time zones), or a trace's intervals. Everything is drawn once from Stream.SYSTEM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fedloom.core.rng import Stream, numpy_generator
from fedloom.systems.fedscale import read_fedscale
from fedloom.systems.trace import Trace, read_trace

Z95 = 1.6448536269514722  # the standard normal's 95th percentile
MARKOV_SLOTS = 4096  # the chain is drawn for this many slots, then repeats
SLOTS_PER_MEAN = 10  # a slot is a tenth of the shorter mean duration
BYTES_PER_MEGABIT = 1e6 / 8

Availability = Callable[[float], np.ndarray]  # virtual time -> which clients are online [n] bool


def speed_sigma(spread: float) -> float:
    """The log-normal sigma whose 95th/5th percentile ratio is ``spread``."""
    return math.log(spread) / (2 * Z95)


@dataclass(frozen=True)
class SystemModel:
    """The clients' simulated devices: relative speed, link bandwidths, seconds per example and when each is
    online."""

    speed: np.ndarray  # [n] relative compute speed, 1 = the nominal device
    up_bytes_s: np.ndarray  # [n]
    down_bytes_s: np.ndarray  # [n]
    seconds_per_example: float
    availability: Availability

    def seconds(self, clients: list[int] | np.ndarray, examples: np.ndarray, bytes_up: np.ndarray,
                bytes_down: np.ndarray) -> np.ndarray:
        """Virtual seconds of each client's round: computing ``examples`` (steps x batch) and moving the bytes."""
        c = np.asarray(clients, dtype=np.int64)
        compute = np.asarray(examples, dtype=np.float64) * self.seconds_per_example / self.speed[c]
        return compute + np.asarray(bytes_up) / self.up_bytes_s[c] + np.asarray(bytes_down) / self.down_bytes_s[c]

    def available(self, t: float) -> np.ndarray:
        """Which clients are online at virtual time ``t`` (boolean ``[n]``)."""
        return self.availability(t)


def training_flops_per_example(model: nn.Module, example: Tensor) -> float:
    """FLOPs of one example's training step: three times its forward pass (forward, and backward for
    the inputs and the weights), the forward counted by torch's FlopCounterMode."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example[None])
    return 3.0 * counter.get_total_flops()


def build_system(cfg, n_clients: int, model: nn.Module | None = None, example: Tensor | None = None
                 ) -> SystemModel | None:
    """The system model of ``cfg.system`` for ``n_clients`` clients, or None without one; ``model`` and an
    ``example`` input time an example from FLOPs when system.device_flops is set."""
    s = cfg.system
    if s.profile == "none":
        return None
    per_example = (s.seconds_per_example if s.device_flops is None
                   else training_flops_per_example(model, example) / s.device_flops)
    if s.profile == "trace":
        return _traced(s, n_clients, per_example)
    speed = np.exp(speed_sigma(s.speed_spread) * numpy_generator(cfg.seed, Stream.SYSTEM, 0).standard_normal(n_clients))
    shares = np.array([b.share for b in s.bandwidth_classes], dtype=np.float64)
    drawn = numpy_generator(cfg.seed, Stream.SYSTEM, 1).choice(len(shares), size=n_clients, p=shares / shares.sum())
    up = np.array([b.up_mbps for b in s.bandwidth_classes])[drawn] * BYTES_PER_MEGABIT
    down = np.array([b.down_mbps for b in s.bandwidth_classes])[drawn] * BYTES_PER_MEGABIT
    rng = numpy_generator(cfg.seed, Stream.SYSTEM, 2)
    return SystemModel(speed, up, down, per_example, _availability(s, n_clients, rng))


def _traced(s, n_clients: int, per_example: float) -> SystemModel:
    """The system model of a trace file: fedloom's CSV, or FedScale's device and behaviour pickles."""
    trace: Trace = (read_fedscale(s.device_file, s.behavior_file, n_clients, per_example)
                    if s.trace_format == "fedscale" else read_trace(s.trace, n_clients))
    return SystemModel(trace.speed, trace.up_mbps * BYTES_PER_MEGABIT, trace.down_mbps * BYTES_PER_MEGABIT,
                       per_example, interval_availability(trace.intervals, trace.periods))


def _availability(s, n: int, rng: np.random.Generator) -> Availability:
    if s.availability == "markov":
        return markov_availability(n, s.mean_online_s, s.mean_offline_s, rng)
    if s.availability == "diurnal":
        return diurnal_availability(n, s.day_s, s.online_fraction, rng)
    return lambda t: np.ones(n, dtype=bool)


def markov_availability(n: int, mean_on: float, mean_off: float, rng: np.random.Generator) -> Availability:
    """On/off chains in slots; each client starts from the stationary law and leaves a state with
    probability slot / mean duration per slot (geometric durations with those means)."""
    slot = min(mean_on, mean_off) / SLOTS_PER_MEAN
    states = np.empty((MARKOV_SLOTS, n), dtype=bool)
    states[0] = rng.random(n) < mean_on / (mean_on + mean_off)
    flips = rng.random((MARKOV_SLOTS - 1, n))
    for k in range(1, MARKOV_SLOTS):
        leave = np.where(states[k - 1], slot / mean_on, slot / mean_off)
        states[k] = states[k - 1] ^ (flips[k - 1] < leave)
    return lambda t: states[int(t // slot) % MARKOV_SLOTS].copy()


def diurnal_availability(n: int, day: float, online_fraction: float, rng: np.random.Generator) -> Availability:
    """Online during ``online_fraction`` of every day, starting at a uniformly drawn time of day."""
    phase = rng.random(n) * day
    return lambda t: ((t + phase) % day) < online_fraction * day


def interval_availability(intervals: list[np.ndarray], periods: np.ndarray | None = None) -> Availability:
    """Online inside the given intervals, repeating with each client's period (FedScale's finish_time) or,
    without periods, with the period of the latest end over all clients (a trace replayed)."""
    if periods is None:
        latest = max((float(iv[-1, 1]) for iv in intervals if len(iv)), default=0.0)
        periods = np.full(len(intervals), latest)
    starts = [iv[:, 0] for iv in intervals]
    ends = [iv[:, 1] for iv in intervals]

    def available(t: float) -> np.ndarray:
        online = np.ones(len(intervals), dtype=bool)
        for c, (st, en) in enumerate(zip(starts, ends)):
            if len(st):
                at = t % periods[c] if periods[c] else t
                i = np.searchsorted(st, at, side="right") - 1
                online[c] = i >= 0 and at < en[i]
        return online

    return available
