"""Secure aggregation in simulation: every client's row quantized into Z_{2^bits}, the four
phases of ``secagg.py`` played between simulated clients and one :class:`SecAggServer` that
gets only their byte messages, simulated dropouts at each phase, and the pipeline transform
that replaces ``aggregate`` with the dequantized, unmasked sum (quantization: ``secagg_quantize.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from fedloom.core.rng import Stream, numpy_generator, seed_for
from fedloom.pipeline.base import Context, Transform
from fedloom.privacy.secagg import Params, ProtocolAborted, SecAggClient, SecAggServer
from fedloom.privacy.secagg_quantize import Quantizer

PHASES = ("advertise", "share_keys", "masked_input", "unmask")


@dataclass
class Costs:
    """Per phase: bytes up and down (all clients together), the mean client's and the server's seconds,
    and the clients left after it."""

    up: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    down: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    client_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    server_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    survivors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    def metrics(self) -> dict[str, float | int]:
        """The costs as the round's metrics: ``secagg_<what>_<phase>`` for bytes, seconds and survivors."""
        out: dict[str, float | int] = {}
        for p in PHASES:
            out |= {f"secagg_bytes_up_{p}": self.up[p], f"secagg_bytes_down_{p}": self.down[p],
                    f"secagg_client_s_{p}": self.client_s[p], f"secagg_server_s_{p}": self.server_s[p],
                    f"secagg_survivors_{p}": self.survivors[p]}
        return out


@dataclass
class Outcome:
    """One secure aggregation's result: the survivors' sum in the ring (None when it failed), whose inputs it
    holds, its costs and why it failed."""

    total: np.ndarray | None  # the survivors' sum mod 2^bits; None when the round failed
    summed: list[int]  # whose inputs the sum holds
    costs: Costs
    failure: str | None = None


def _timed(fn: Callable, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def _clients_phase(costs: Costs, phase: str, alive: list[int], act: Callable[[int], bytes]) -> dict[int, bytes]:
    """Every live client's message of ``phase``, timed and counted."""
    messages, seconds = {}, 0.0
    for u in alive:
        messages[u], s = _timed(act, u)
        seconds += s
    costs.up[phase] = sum(len(m) for m in messages.values())
    costs.client_s[phase] = seconds / max(len(alive), 1)
    costs.survivors[phase] = len(alive)
    return messages


def run_protocol(inputs: dict[int, np.ndarray], params: Params, graph_seed: int,
                 drops: dict[str, set[int]]) -> Outcome:
    """One aggregation of ``inputs`` (ring vectors, by client id); ``drops[phase]``: the clients that go
    silent in that phase (they send nothing from it on). The server object gets only the messages."""
    clients = {u: SecAggClient(u, params) for u in inputs}
    server, costs = SecAggServer(params, graph_seed), Costs()
    alive = sorted(inputs)
    try:
        alive = [u for u in alive if u not in drops["advertise"]]
        adverts = _clients_phase(costs, "advertise", alive, lambda u: clients[u].advertise())
        group_keys, costs.server_s["advertise"] = _timed(server.collect_keys, list(adverts.values()))
        costs.down["advertise"] = sum(len(m) for m in group_keys.values())

        alive = [u for u in alive if u not in drops["share_keys"]]
        shares = _clients_phase(costs, "share_keys", alive, lambda u: clients[u].share_keys(group_keys[u]))
        routed, costs.server_s["share_keys"] = _timed(server.route_shares, shares)
        costs.down["share_keys"] = sum(len(m) for m in routed.values())

        alive = [u for u in alive if u not in drops["masked_input"]]
        masked = _clients_phase(costs, "masked_input", alive, lambda u: clients[u].masked_input(routed[u], inputs[u]))
        survivors, costs.server_s["masked_input"] = _timed(server.collect_masked, masked)
        costs.down["masked_input"] = len(survivors) * len(masked)

        summed = sorted(masked)
        alive = [u for u in summed if u not in drops["unmask"]]
        reveals = _clients_phase(costs, "unmask", alive, lambda u: clients[u].unmask(survivors))
        total, costs.server_s["unmask"] = _timed(server.unmask, reveals)
    except ProtocolAborted as why:
        return Outcome(None, [], costs, str(why))
    return Outcome(total, summed, costs)


def draw_drops(sampled: list[int], fractions: dict[str, float], seed: int, round_idx: int) -> dict[str, set[int]]:
    """round(fraction * sampled) of the clients still in go silent at each phase, from Stream.SECAGG."""
    rng, alive, drops = numpy_generator(seed, Stream.SECAGG, round_idx, 0), list(sampled), {}
    for phase in PHASES:
        k = min(round(fractions.get(phase, 0.0) * len(sampled)), len(alive))
        drops[phase] = set(rng.choice(alive, size=k, replace=False).tolist()) if k else set()
        alive = [u for u in alive if u not in drops[phase]]
    return drops


@dataclass(frozen=True)
class SecureMean:
    """What the transform needs: the protocol's parameters, the quantizer, dropout fractions by phase,
    the public weight bound w_max, and DP's fixed denominator (None: the weighted mean)."""

    threshold: Callable[[int], int]  # the round's clients -> Shamir threshold
    neighbours: Callable[[int], int | None]
    quantizer: Quantizer
    dropouts: dict[str, float]
    max_weight: float
    denominator: int | None = None
    name: str = "secagg"


def secure_mean(spec: SecureMean, extra_metrics: Callable[[int], dict] = lambda r: {}) -> Transform:
    """The aggregate from masked rows only: the dequantized unmasked sum over the summed weights
    (or over ``denominator``). Too few clients at any phase: no row out (the model stays), metrics
    ``round_failed`` and ``secagg_failure``."""

    def apply(U: Tensor, w: Tensor, state: None, ctx: Context):
        inputs = _encode_rows(spec, U, w, ctx)
        n = len(inputs)
        params = Params(spec.quantizer.bits, U.shape[1] + 1, spec.threshold(n), spec.neighbours(n))
        drops = draw_drops(sorted(inputs), spec.dropouts, ctx.seed, ctx.round)
        outcome = run_protocol(inputs, params, seed_for(ctx.seed, Stream.SECAGG, ctx.round, 1), drops)
        # uplink_bytes: what the round's record counts as bytes_up (all four phases' messages)
        metrics = {**outcome.costs.metrics(), **extra_metrics(ctx.round),
                   "uplink_bytes": sum(outcome.costs.up.values())}
        if outcome.total is None:
            return U[:0], w[:0], state, {**metrics, "round_failed": True, "secagg_failure": outcome.failure}
        row = _mean_of(spec, outcome.total)
        metrics["secagg_summed"] = len(outcome.summed)
        return torch.from_numpy(row).to(U.device, U.dtype)[None], torch.ones(1, dtype=w.dtype), state, metrics

    return Transform(f"aggregate:{spec.name}", apply)


def _encode_rows(spec: SecureMean, U: Tensor, w: Tensor, ctx: Context) -> dict[int, np.ndarray]:
    """Each client's row in the ring (client side)."""
    q = spec.quantizer
    inputs = {}
    for row, weight, c in zip(U, w.tolist(), ctx.client_ids):
        q_weight = q.levels if spec.denominator is not None else q.weight(weight, spec.max_weight)
        generator = ctx.generator(Stream.SECAGG, 2, c) if q.stochastic else None
        inputs[c] = q.encode(row, q_weight, generator)
    return inputs


def _mean_of(spec: SecureMean, total: np.ndarray) -> np.ndarray:
    weighted, q_weights = spec.quantizer.decode_sum(total)
    if spec.denominator is not None:
        return weighted / spec.denominator
    return weighted / (q_weights / spec.quantizer.levels)
