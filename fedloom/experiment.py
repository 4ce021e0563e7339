"""Wires a config into data, model, algorithm, engine and recorder, and runs
the rounds. ``run(config)`` is the Python entry point behind ``fedloom run``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedloom import evaluation
from fedloom.aggregation.validate import reject_invalid
from fedloom.algorithms import ServerState
from fedloom.builders import build_adversary, build_algorithm, build_data, build_engine, build_model_for, local_training  # noqa: F401 (re-exported)
from fedloom.compression.downlink import Downlink
from fedloom.compression.uplink import Uplink
from fedloom.config import ExperimentConfig, load_config
from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, numpy_generator
from fedloom.decentralized import DecentralizedExperiment
from fedloom.progress import RoundProgress
from fedloom.tracking import RunDir, render_report

BYTES_PER_FLOAT = 4


def sample_clients(n_clients: int, k: int, seed: int, round_idx: int) -> list[int]:
    """Uniform sampling without replacement, from the round's own stream."""
    rng = numpy_generator(seed, Stream.SAMPLING, round_idx)
    return sorted(rng.choice(n_clients, size=k, replace=False).tolist())


@dataclass
class RunResult:
    config: ExperimentConfig
    model: nn.Module
    params: Tensor
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last evaluated values of every metric."""
        merged: dict[str, Any] = {}
        for record in self.history:
            merged.update(record)
        return merged


class Experiment:
    """One federated run: the state between rounds and the step that advances it."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.data = build_data(cfg)
        self.adversary = build_adversary(cfg, self.data)
        self.model = build_model_for(cfg, self.data)
        self.spec = ParamSpec.of(self.model)
        self.algorithm = build_algorithm(cfg)
        self.engine = build_engine(cfg, self.model, self.data)
        self.uplink = Uplink(cfg.compression.build(self.spec.shapes), cfg.seed)
        self.state: ServerState = self.algorithm.server_init(self.spec.flatten(self.model), self.data.n_clients)
        downlink = cfg.compression.build_downlink(self.spec.shapes)
        self.downlink = Downlink(downlink, cfg.seed, self.state.x) if downlink else None
        self.bytes_up = self.bytes_down = 0
        self.started = time.perf_counter()

    def round(self, round_idx: int) -> dict[str, Any]:
        began = time.perf_counter()
        clients = sample_clients(self.data.n_clients, self.cfg.clients_per_round(), self.cfg.seed, round_idx)
        sent = self.algorithm.broadcast(self.state)
        start, model_bytes = self._model_for_clients(clients, round_idx)
        result = self.engine.run_round(self.algorithm, start, sent, clients, round_idx)
        received, byzantine = self._received(result, round_idx)
        try:
            U, w, rejected = reject_invalid(received, result.weights, self.spec.dim)
        except ValueError as err:  # nothing usable this round: the model stays as it was
            logging.getLogger(__name__).warning("round %d: %s", round_idx, err)
            U, w, rejected = result.U[:0], result.weights[:0], torch.ones(len(clients), dtype=torch.bool)
        kept = [c for c, bad in zip(result.client_ids, rejected.tolist()) if not bad]
        U, payload_bytes = self.uplink.send(U, kept, round_idx)
        aux = {k: v[~rejected] for k, v in result.aux.items()}
        if kept:
            self.state = self.algorithm.server_update(self.state, U, w, aux)
        record = {"round": round_idx, "train_loss": _weighted(result.train_loss[~rejected], w),
                  "n_sampled": len(clients), "n_rejected": int(rejected.sum()), "n_byzantine": int(byzantine.sum())}
        record.update(self._count_bytes(len(clients), int(payload_bytes.sum()), aux, sent, model_bytes))
        if round_idx % self.cfg.evaluation.every == 0 or round_idx == self.cfg.rounds:
            record.update(self.evaluate())
        record["round_seconds"] = time.perf_counter() - began
        record["wall_seconds"] = time.perf_counter() - self.started
        return record

    def _received(self, result, round_idx: int) -> tuple[Tensor, Tensor]:
        """The rows as the server receives them (Byzantine ones crafted), and who was Byzantine."""
        if self.adversary is None:
            return result.U, torch.zeros(len(result.client_ids), dtype=torch.bool)
        return self.adversary.corrupt(result.U, result.client_ids, round_idx)

    def evaluate(self) -> dict[str, float]:
        metrics = evaluation.central(self.model, self.spec, self.state.x, self.data)
        if self.cfg.evaluation.federated:
            metrics.update(evaluation.federated(self.model, self.spec, self.state.x, self.data))
        return metrics

    def _model_for_clients(self, clients: list[int], round_idx: int) -> tuple[Tensor, int]:
        """The model the sampled clients train from and its downlink bytes: the fp32 global
        model, or the downlink compressor's copy of it (``compression/downlink.py``)."""
        if self.downlink is None:
            return self.state.x, len(clients) * BYTES_PER_FLOAT * self.spec.dim
        start, nbytes = self.downlink.send(self.state.x, clients, round_idx)
        return start, int(nbytes.sum())

    def _count_bytes(self, n_sampled: int, payload_bytes: int, aux: dict[str, Tensor],
                     sent: dict[str, Tensor], model_bytes: int) -> dict[str, int]:
        """Downlink: the model's bytes plus the fp32 broadcast tensors to every sampled
        client; uplink: the rows' payloads plus the algorithm's fp32 side tensors."""
        down = model_bytes + n_sampled * BYTES_PER_FLOAT * sum(t.numel() for t in sent.values())
        up = payload_bytes + BYTES_PER_FLOAT * sum(t.numel() for t in aux.values())
        self.bytes_up += up
        self.bytes_down += down
        return {"bytes_up": up, "bytes_down": down, "bytes_up_total": self.bytes_up,
                "bytes_down_total": self.bytes_down}

    @property
    def params(self) -> Tensor:
        return self.state.x

    def final_model(self) -> nn.Module:
        self.spec.load_into(self.model, self.state.x)
        return self.model

    def describe(self) -> dict[str, Any]:
        return {}

    def graph_record(self) -> None:
        """A federation has no gossip graph to draw."""
        return None


def _weighted(values: Tensor, w: Tensor) -> float:
    return float((values * w).sum() / w.sum()) if len(values) else float("nan")


def run(config: str | Path | dict | ExperimentConfig | None = None, overrides: list[str] = ()) -> RunResult:
    """Run an experiment to the end (or to Ctrl-C, keeping what was written)."""
    cfg = load_config(config, list(overrides))
    exp = DecentralizedExperiment(cfg) if cfg.mode == "decentralized" else Experiment(cfg)
    run_dir = RunDir.create(cfg.output.dir, cfg.name) if cfg.output.save else None
    if run_dir:
        run_dir.write_config(cfg.to_dict())
        run_dir.write_partition(exp.data.stats())
        if (graph := exp.graph_record()) is not None:
            run_dir.write_graph(graph)
    history: list[dict[str, Any]] = []
    status = "completed"
    try:
        with RoundProgress(cfg.rounds, enabled=cfg.output.progress) as progress:
            for r in range(1, cfg.rounds + 1):
                record = exp.round(r)
                history.append(record)
                if run_dir:
                    run_dir.append_metrics(record)
                progress.update(record)
    except KeyboardInterrupt:
        status = "interrupted"
    model = exp.final_model()
    result = RunResult(cfg, model, exp.params.clone(), history, run_dir=run_dir and run_dir.path)
    result.summary = {**_summary(cfg, result, status, exp.engine.name), **exp.describe()}
    if run_dir:
        run_dir.save_model({k: v.detach() for k, v in model.state_dict().items()})
        run_dir.write_summary(result.summary)
        render_report(run_dir.path)
    return result


def _summary(cfg: ExperimentConfig, result: RunResult, status: str, engine: str) -> dict[str, Any]:
    final = result.final
    keys = ("central_accuracy", "central_loss", "federated_accuracy", "federated_accuracy_worst10",
            "node_accuracy_mean", "node_accuracy_min", "consensus_distance", "bytes_per_node_total",
            "train_loss", "bytes_up_total", "bytes_down_total", "wall_seconds")
    return {"name": cfg.name, "mode": cfg.mode, "status": status, "rounds_done": len(result.history), "rounds": cfg.rounds,
            "algorithm": cfg.decentralized.algorithm if cfg.mode == "decentralized" else cfg.algorithm.name, "dataset": cfg.data.dataset, "engine": engine,
            **{k: final[k] for k in keys if k in final},
            "run_dir": str(result.run_dir) if result.run_dir else None}
