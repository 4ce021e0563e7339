"""Secure aggregation in simulation: every client's row quantized into Z_{2^bits}, the four
phases of ``secagg.py`` played between simulated clients and one :class:`SecAggServer` that
gets only their byte messages, simulated dropouts at each phase, and the pipeline transform
that replaces ``aggregate`` with the dequantized, unmasked sum (quantization: ``secagg_quantize.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from fedloom.core.rng import Stream, numpy_generator, seed_for
from fedloom.pipeline.base import Context, Transform
from fedloom.privacy.secagg import Params, ProtocolAborted, SecAggClient, SecAggServer
from fedloom.privacy.secagg_quantize import Quantizer

PHASES = ("advertise", "share_keys", "masked_input", "consistency", "unmask")  # consistency: when checked


def phases(params: Params) -> tuple[str, ...]:
    """The phases one aggregation plays: the consistency check only when ``params`` asks for it."""
    return PHASES if params.consistency else tuple(p for p in PHASES if p != "consistency")


@dataclass
class Costs:
    """Per phase played: bytes up and down (all clients together), the mean client's and the server's
    seconds, and the clients left after it."""

    clients_timed: bool = True  # False in a deployment: the clients' seconds are theirs, not the server's to know
    played: tuple[str, ...] = tuple(p for p in PHASES if p != "consistency")

    def __post_init__(self) -> None:
        self.up, self.down, self.survivors = (dict.fromkeys(self.played, 0) for _ in range(3))
        self.client_s, self.server_s = dict.fromkeys(self.played, 0.0), dict.fromkeys(self.played, 0.0)

    def metrics(self) -> dict[str, float | int]:
        """The costs as the round's metrics: ``secagg_<what>_<phase>`` for bytes, seconds and survivors."""
        out: dict[str, float | int] = {}
        for p in self.played:
            out |= {f"secagg_bytes_up_{p}": self.up[p], f"secagg_bytes_down_{p}": self.down[p],
                    f"secagg_server_s_{p}": self.server_s[p], f"secagg_survivors_{p}": self.survivors[p]}
            if self.clients_timed:
                out[f"secagg_client_s_{p}"] = self.client_s[p]
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


Exchange = Callable[[str, dict[int, bytes] | None], dict[int, bytes]]


def answer(client: SecAggClient, phase: str, incoming: bytes | None, x: np.ndarray) -> bytes:
    """Client ``client``'s message of ``phase``, given what the server sent it for that phase (None for
    advertise) and its ring vector ``x``: the one client step of both the simulation and a deployment."""
    if phase == "advertise":
        return client.advertise()
    if phase == "share_keys":
        return client.share_keys(incoming)
    if phase == "masked_input":
        return client.masked_input(incoming, x)
    if phase == "consistency":
        return client.consistency(incoming)
    return client.unmask(incoming)


def _server_step(server: SecAggServer, phase: str, messages: dict[int, bytes]):
    """The server's answer to a phase: what it sends each client for the next phase (the unmasked
    total after the last)."""
    if phase == "advertise":
        return server.collect_keys(list(messages.values()))
    if phase == "share_keys":
        return server.route_shares(messages)
    if phase == "masked_input":
        return dict.fromkeys(messages, server.collect_masked(messages))
    if phase == "consistency":
        return dict.fromkeys(messages, server.collect_signatures(messages))
    return server.unmask(messages)


def serve_phases(server: SecAggServer, exchange: Exchange, costs: Costs) -> Outcome:
    """The four phases from the server's side: ``exchange(phase, outgoing)`` delivers ``outgoing`` (client
    -> bytes; None: the round's clients, for advertise) and returns the messages of the clients that answered.
    Whatever carries the messages (simulated clients, gRPC), the server gets only them."""
    outgoing, summed, played = None, [], phases(server.params)
    try:
        for i, phase in enumerate(played):
            if outgoing is not None:
                costs.down[played[i - 1]] = sum(len(m) for m in outgoing.values())
            messages = exchange(phase, outgoing)
            costs.up[phase], costs.survivors[phase] = sum(len(m) for m in messages.values()), len(messages)
            if phase == "masked_input":
                summed = sorted(messages)
            outgoing, costs.server_s[phase] = _timed(_server_step, server, phase, messages)
    except ProtocolAborted as why:
        return Outcome(None, [], costs, str(why))
    return Outcome(outgoing, summed, costs)


def run_protocol(inputs: dict[int, np.ndarray], params: Params, graph_seed: int,
                 drops: dict[str, set[int]]) -> Outcome:
    """One aggregation of ``inputs`` (ring vectors, by client id); ``drops[phase]``: the clients that go
    silent in that phase (they send nothing from it on). The server object gets only the messages."""
    clients = {u: SecAggClient(u, params) for u in inputs}
    costs, alive = Costs(played=phases(params)), set(inputs)

    def exchange(phase: str, outgoing: dict[int, bytes] | None) -> dict[int, bytes]:
        alive.difference_update(drops.get(phase, ()))
        messages, seconds = {}, 0.0
        for u in sorted(alive if outgoing is None else alive & set(outgoing)):
            incoming = None if outgoing is None else outgoing[u]
            messages[u], s = _timed(answer, clients[u], phase, incoming, inputs[u])
            seconds += s
        costs.client_s[phase] = seconds / max(len(messages), 1)
        alive.intersection_update(messages)
        return messages

    return serve_phases(SecAggServer(params, graph_seed), exchange, costs)


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
    consistency: bool = False  # the consistency check against a malicious server


Protocol = Callable[["SecureMean", Tensor, Tensor, Context], Outcome]


def simulated(spec: "SecureMean", U: Tensor, w: Tensor, ctx: Context) -> Outcome:
    """The protocol among simulated clients: each encodes its own row, drops drawn from Stream.SECAGG."""
    inputs = {c: encode_row(spec, row, weight, ctx, c) for row, weight, c in zip(U, w.tolist(), ctx.client_ids)}
    params = round_params(spec, len(inputs), U.shape[1])
    drops = draw_drops(sorted(inputs), spec.dropouts, ctx.seed, ctx.round)
    return run_protocol(inputs, params, graph_seed(ctx.seed, ctx.round), drops)


def round_params(spec: "SecureMean", clients: int, dim: int) -> Params:
    """The protocol's parameters for a round of ``clients`` rows of ``dim`` (one more ring element: the weight)."""
    return Params(spec.quantizer.bits, dim + 1, spec.threshold(clients), spec.neighbours(clients), spec.consistency)


def graph_seed(seed: int, round_idx: int) -> int:
    """SecAgg+'s sharing graph: public, drawn by the server from Stream.SECAGG keyed by the round."""
    return seed_for(seed, Stream.SECAGG, round_idx, 1)


def secure_mean(spec: SecureMean, extra_metrics: Callable[[int], dict] = lambda r: {},
                protocol: Protocol = simulated) -> Transform:
    """The aggregate from masked rows only: the dequantized unmasked sum over the summed weights
    (or over ``denominator``). Too few clients at any phase: no row out (the model stays), metrics
    ``round_failed`` and ``secagg_failure``. ``protocol`` runs the four phases: among simulated clients, or
    (a deployment) over the network, where the server's ``U`` has no columns: it never holds a row."""

    def apply(U: Tensor, w: Tensor, state: None, ctx: Context):
        outcome = protocol(spec, U, w, ctx)
        # uplink_bytes: what the round's record counts as bytes_up (all four phases' messages)
        metrics = {**outcome.costs.metrics(), **extra_metrics(ctx.round),
                   "uplink_bytes": sum(outcome.costs.up.values())}
        if outcome.total is None:
            return U[:0], w[:0], state, {**metrics, "round_failed": True, "secagg_failure": outcome.failure}
        row = torch.from_numpy(_mean_of(spec, outcome.total)).to(U.device, U.dtype)
        metrics["secagg_summed"] = len(outcome.summed)
        return row[None], torch.ones(1, dtype=w.dtype), state, metrics

    return Transform(f"aggregate:{spec.name}", apply)


def encode_row(spec: SecureMean, row: Tensor, weight: float, ctx: Context, client: int) -> np.ndarray:
    """Client ``client``'s row in the ring (the client's side, in simulation and on a deployed client)."""
    q = spec.quantizer
    q_weight = q.levels if spec.denominator is not None else q.weight(weight, spec.max_weight)
    generator = ctx.generator(Stream.SECAGG, 2, client) if q.stochastic else None
    return q.encode(row, q_weight, generator)


def _mean_of(spec: SecureMean, total: np.ndarray) -> np.ndarray:
    weighted, q_weights = spec.quantizer.decode_sum(total)
    if spec.denominator is not None:
        return weighted / spec.denominator
    return weighted / (q_weights / spec.quantizer.levels)
