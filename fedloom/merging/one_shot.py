"""One-shot federated learning: every client trains apart once (the config's local training: client.epochs
or client.steps), and the server merges the client models once, by plain averaging or after aligning
them (``fedloom.merging.merge``), as in Singh and Jaggi 2020's one-shot fusion of models trained on
heterogeneous data.

``same_init = False`` starts each client from its own random model (independent training, the setting of
Git Re-Basin); ``True`` from the config's one initial model (a server that sent one model first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedloom.config import ExperimentConfig, load_config
from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, seed_for
from fedloom.core.store import ClientStore
from fedloom.data import FederatedData
from fedloom.merging.merge import METHODS, State, merge
from fedloom.merging.runs import Evaluator, aligner_for

INIT_KEY = 2  # the merging stream's key for the clients' own initial models (0, 1: activation batch, sweeps)


@dataclass(frozen=True)
class OneShotResult:
    """A one-shot run's test metrics: each client model's and each merge method's."""

    clients: list[dict[str, float]]  # each client model's test metrics
    merged: dict[str, dict[str, float]]  # method -> the merged model's test metrics

    def table(self) -> dict[str, Any]:
        """The clients' mean metrics (``client_mean``) beside each method's merged model."""
        mean = {k: sum(c[k] for c in self.clients) / len(self.clients) for k in self.clients[0]}
        return {"client_mean": mean, **self.merged}


def one_shot(config: str | Path | dict | ExperimentConfig | None = None, overrides: list[str] = (),
             methods: tuple[str, ...] = ("average", "weight"), same_init: bool = False) -> OneShotResult:
    """Train every client of ``config`` apart once, merge once by each of ``methods`` (module docstring)."""
    from fedloom.builders import (build_algorithm, build_data, build_engine, build_model_for, build_task_for,
                                  sized_to)

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"one_shot methods {unknown}: choose from {', '.join(METHODS)}")
    cfg = load_config(config, list(overrides))
    data = build_data(cfg)
    cfg = sized_to(cfg, data)
    model = build_model_for(cfg, data)
    spec = ParamSpec.of(model)
    clients = list(range(data.n_clients))
    starts = client_starts(cfg, data, spec, model, clients, same_init)
    engine = build_engine(cfg, model, data)
    result = engine.run_round(build_algorithm(cfg), starts, {}, clients, 1, ClientStore())
    states = states_of_rows(model, spec, starts - result.U)
    evaluate = Evaluator(model, data, build_task_for(cfg, data))
    merged = {m: evaluate(merge(states, aligner_for(m, model, data, cfg.seed))) for m in methods}
    return OneShotResult([evaluate(s) for s in states], merged)


def client_starts(cfg: ExperimentConfig, data, spec: ParamSpec, model, clients: list[int], same_init: bool) -> Tensor:
    """The clients' starting models [n, d]: the config's one model, or each client's own."""
    from fedloom.models import build_model

    if same_init:
        return spec.flatten(model).expand(len(clients), -1).clone()
    rows = []
    for client in clients:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(cfg.seed, Stream.MERGING, INIT_KEY, client))
            own = build_model(cfg.model.name, data.input_shape, data.n_classes, **cfg.model.options)
        rows.append(spec.flatten(own))
    return torch.stack(rows)


def states_of_rows(model: nn.Module, spec: ParamSpec, rows: Tensor) -> list[State]:
    """State dicts of the flat models ``rows`` [n, d] (buffers, if any, the model's own)."""
    buffers = {k: v for k, v in model.state_dict().items() if k not in spec.names}
    return [{**buffers, **{k: v.clone() for k, v in spec.unflatten(row).items()}} for row in rows]


def merge_rows(model: nn.Module, spec: ParamSpec, rows: Tensor, method: str, data: FederatedData,
               seed: int) -> Tensor:
    """The flat models ``rows`` [n, d] merged by ``method`` (after aligning them), as one flat model [d]."""
    merged = merge(states_of_rows(model, spec, rows.cpu()), aligner_for(method, model, data, seed))
    return torch.cat([merged[name].reshape(-1) for name in spec.names]).float()
