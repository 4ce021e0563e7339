"""A federated round: sample clients, send them the model (through the downlink
compressor if any), train them on the engine, run the server pipeline on their
rows, and let the algorithm's server rule read its side matrices.

The state tree of a federated run:

    x          the global model [d]
    algorithm  the algorithm's server state (SCAFFOLD's c)
    pipeline   one state per pipeline transform (compressor memories, aggregator and optimizer states)
    clients    client id -> the algorithm's persistent client state
    downlink   the downlink rule's state, or None
    counters   running byte totals
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fedloom import evaluation
from fedloom.builders import (GivenParts, build_adversary, build_algorithm, build_data, build_engine, build_model_for,
                              build_task_for, check_model_runs, engine_notes, model_device, sized_to)
from fedloom.compression.downlink import Downlink
from fedloom.config import ExperimentConfig
from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, numpy_generator
from fedloom.core.store import ClientStore
from fedloom.data import FederatedData
from fedloom.engines.base import RoundResult
from fedloom.pipeline.base import Context
from fedloom.pipeline.build import build_pipeline
from fedloom.rounds.base import State

BYTES_PER_FLOAT = 4
TOTALS = ("bytes_up", "bytes_down", "wire_bytes_up", "wire_bytes_down")  # per-round counts that also get a _total


def sample_clients(n_clients: int, k: int, seed: int, round_idx: int, once_per_epoch: bool = False) -> list[int]:
    """Uniform sampling without replacement, from the round's own stream; ``once_per_epoch`` (DP-FTRL):
    round r's slice of its epoch's permutation instead, so each client comes at most once per n // k rounds."""
    if once_per_epoch:
        return epoch_clients(n_clients, k, seed, round_idx)
    rng = numpy_generator(seed, Stream.SAMPLING, round_idx)
    return sorted(rng.choice(n_clients, size=k, replace=False).tolist())


def epoch_clients(n_clients: int, k: int, seed: int, round_idx: int) -> list[int]:
    """Epoch e (rounds e E + 1 .. (e + 1) E, E = n // k) shuffles the clients on its own stream (key
    (e + 1, k, n): never a round's); round r takes the next k of them (the n mod k left over sit it out)."""
    epoch, position = divmod(round_idx - 1, n_clients // k)
    order = numpy_generator(seed, Stream.SAMPLING, epoch + 1, k, n_clients).permutation(n_clients)
    return sorted(order[position * k:(position + 1) * k].tolist())


class FederatedRound:
    def __init__(self, cfg: ExperimentConfig, make_engine: Callable[[nn.Module, FederatedData], Any] | None = None,
                 given: GivenParts = GivenParts()):
        self.data = build_data(cfg, given)
        self.cfg = cfg = sized_to(cfg, self.data)
        self.adversary = build_adversary(cfg, self.data)
        self.model = build_model_for(cfg, self.data, given)
        check_model_runs(cfg, self.model, self.data)
        self.spec = ParamSpec.of(self.model)
        self.algorithm = build_algorithm(cfg)
        self.engine = (make_engine or partial(build_engine, cfg))(self.model, self.data)
        self.engine_name = self.engine.name
        # evaluation runs where the engine put the model (the CPU for Ray actors' and remote clients' runs)
        self.task, self.device = build_task_for(cfg, self.data), model_device(self.model)
        self.pipeline = build_pipeline(cfg, self.adversary, self.spec.shapes,
                                       max_weight=float(self.data.client_sizes().max()))
        compressor = cfg.compression.build_downlink(self.spec.shapes)
        self.downlink = Downlink(compressor, cfg.seed) if compressor else None

    def init_state(self) -> State:
        x0 = self.spec.flatten(self.model).detach().cpu().clone()
        return {"x": x0, "algorithm": self.algorithm.server_init(x0), "pipeline": self.pipeline.init(x0.numel()),
                "clients": {}, "downlink": self.downlink.init(x0) if self.downlink else None,
                "counters": {k: 0 for k in TOTALS}}

    def play(self, state: State, round_idx: int) -> tuple[State, dict[str, Any]]:
        clients = sample_clients(self.data.n_clients, self.cfg.clients_per_round(), self.cfg.seed, round_idx,
                                 once_per_epoch=self.cfg.privacy.mechanism == "ftrl")
        sent = self.algorithm.broadcast(state["algorithm"])
        start, model_bytes, downlink = self._model_for_clients(state, clients, round_idx)
        store = ClientStore(state["clients"])
        result = self.engine.run_round(self.algorithm, start, sent, clients, round_idx, store)
        ctx = Context(round_idx, self.cfg.seed, list(result.client_ids), state["x"], dict(result.aux))
        U, _, pipeline_states, metrics = self.pipeline.apply(result.U, result.weights, state["pipeline"], ctx)
        new = {**state, "pipeline": pipeline_states, "clients": store.states, "downlink": downlink}
        model_rejected = len(U) > 0 and not bool(torch.isfinite(U[0]).all())
        if len(U) and not model_rejected:  # else no usable update, or a non-finite model: it stays as it was
            new["x"] = U[0]
            new["algorithm"] = self.algorithm.server_step(state["algorithm"], ctx.aux, self.data.n_clients)
        record = self._record(round_idx, len(clients), result, ctx, metrics, sent, model_bytes)
        if model_rejected:
            record["model_rejected"] = "the aggregated model held NaN/Inf; the previous one is kept"
        new["counters"] = _add_totals(state["counters"], record)
        return new, record

    def _model_for_clients(self, state: State, clients: list[int], round_idx: int) -> tuple[Tensor, int, Any]:
        """The model the sampled clients train from, its downlink bytes, and the downlink's new state:
        the fp32 global model, or the downlink compressor's copy of it (``compression/downlink.py``)."""
        if self.downlink is None:
            return state["x"], len(clients) * BYTES_PER_FLOAT * self.spec.dim, None
        start, nbytes, downlink = self.downlink.send(state["downlink"], state["x"], clients, round_idx)
        return start, int(nbytes.sum()), downlink

    def _record(self, round_idx: int, n_sampled: int, result: RoundResult, ctx: Context, metrics: dict,
                sent: dict[str, Tensor], model_bytes: int) -> dict[str, Any]:
        """The round's metrics. Downlink: the model's bytes plus the fp32 broadcast tensors to every
        sampled client; uplink: the rows' payloads plus the algorithm's fp32 side tensors."""
        kept = ctx.kept
        payload = metrics.pop("uplink_bytes", BYTES_PER_FLOAT * self.spec.dim * int(kept.sum()))
        record = {"round": round_idx, "train_loss": _weighted(result.train_loss[kept], result.weights[kept]),
                  "n_sampled": n_sampled, "n_rejected": 0, "n_byzantine": 0, **metrics,
                  "bytes_up": payload + BYTES_PER_FLOAT * sum(t.numel() for t in ctx.aux.values()),
                  "bytes_down": model_bytes + n_sampled * BYTES_PER_FLOAT * sum(t.numel() for t in sent.values())}
        if hasattr(self.engine, "round_record"):  # a remote engine: participation and real wire bytes
            record.update(self.engine.round_record())
        return record

    def evaluate(self, state: State) -> dict[str, float]:
        x = state["x"].to(self.device)
        metrics = evaluation.central(self.model, self.spec, x, self.data, self.task)
        if self.cfg.evaluation.federated:
            metrics.update(evaluation.federated(self.model, self.spec, x, self.data, self.task))
        return metrics

    def final_params(self, state: State) -> Tensor:
        return state["x"]

    def final_model(self, state: State) -> nn.Module:
        self.spec.load_into(self.model, state["x"])
        return self.model

    def describe(self, state: State) -> dict[str, Any]:
        described = {**self.data.size(), "pipeline": self.pipeline.steps(),
                     **engine_notes(self.cfg, self.model, self.engine)}
        if self.cfg.privacy.mechanism != "none":  # the noise multiplier run with, calibrated or given
            described["noise_multiplier"] = self.cfg.privacy_noise_multiplier()
        return described

    def graph_record(self) -> None:
        """A federation has no gossip graph to draw."""
        return None


def _add_totals(counters: dict[str, int], record: dict[str, Any]) -> dict[str, int]:
    """The running totals after this round; the record gets them as ``<key>_total``."""
    totals = dict(counters)
    for key in TOTALS:
        if key in record:
            totals[key] = totals.get(key, 0) + record[key]
            record[f"{key}_total"] = totals[key]
    return totals


def _weighted(values: Tensor, w: Tensor) -> float:
    return float((values * w).sum() / w.sum()) if len(values) else float("nan")
