"""The transform contract, and the chain that runs transforms in order.

A transform is ``init(d) -> state`` and ``apply(U, w, state, ctx) -> (U, w,
state, metrics)``: the update rows ``U [n, d]`` and their weights ``w [n]`` in,
the same out, possibly changed, fewer (validation drops rows) or a single row
(an aggregator ends the matrix in one row; the server step turns that row into
the next global model). State is explicit and lives in the run's state tree;
``apply`` never edits a state in place, it returns the new one.

``side`` says where the transform runs in a deployment: ``"client"`` (each
client on its own row before sending: compression, a client's clipping) or
``"server"``. In a simulation every transform runs in the one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from fedloom.core.rng import Stream, torch_generator

Metrics = dict[str, Any]
Apply = Callable[[Tensor, Tensor, Any, "Context"], tuple[Tensor, Tensor, Any, Metrics]]


@dataclass
class Context:
    """What a transform may read about the round. ``client_ids`` and ``aux`` (the
    algorithm's side matrices, one row per client) follow the rows: a transform that
    drops rows drops them here too, with :meth:`keep`."""

    round: int
    seed: int
    client_ids: list[int]
    params: Tensor  # the global model the round started from [d]
    aux: dict[str, Tensor] = field(default_factory=dict)
    kept: Tensor | None = None  # [n sampled] which of the round's original rows are still in
    n_clients: int | None = None  # the federation's size (FedAU's aggregate is over every client)

    def __post_init__(self) -> None:
        if self.kept is None:
            self.kept = torch.ones(len(self.client_ids), dtype=torch.bool)

    def keep(self, mask: Tensor) -> None:
        """Keep only the current rows where ``mask`` is true."""
        self.client_ids = [c for c, k in zip(self.client_ids, mask.tolist()) if k]
        self.aux = {k: v[mask] for k, v in self.aux.items()}
        still = self.kept.nonzero().flatten()
        self.kept = torch.zeros_like(self.kept).index_fill_(0, still[mask], True)

    def generator(self, stream: Stream, *key: int) -> torch.Generator:
        """The round's own seeded stream ``stream`` (keyed further by ``key``, e.g. a client id)."""
        return torch_generator(self.seed, stream, self.round, *key)


@dataclass(frozen=True)
class ServerData:
    """What the server holds besides the rows, for a transform that learns on data (FedLAW's proxy set; a
    factory naming a ``server_data`` parameter gets it): the federation's data, the loss of a flat model
    on a batch, the run's seed and the model's device."""

    data: Any  # fedloom.data.FederatedData
    loss: Callable[[Tensor, Tensor, Tensor], Tensor]
    seed: int
    device: torch.device

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The examples at ``index`` and their targets, on the model's device."""
        return self.data.x[index].to(self.device), self.data.y[index].to(self.device)


@dataclass(frozen=True)
class Transform:
    """A server-pipeline step: ``init(d) -> state`` and ``apply(U, w, state, ctx) -> (U, w, state, metrics)``,
    run on the client side or the server side."""

    name: str
    apply: Apply
    init: Callable[[int], Any] = lambda d: None
    side: Literal["client", "server"] = "server"


@dataclass(frozen=True)
class Pipeline:
    """The chain of transforms a round's rows go through; its state is one entry per transform."""

    transforms: tuple[Transform, ...]

    def init(self, d: int) -> list[Any]:
        """Each transform's initial state for rows of length ``d``."""
        return [t.init(d) for t in self.transforms]

    def apply(self, U: Tensor, w: Tensor, states: list[Any], ctx: Context) -> tuple[Tensor, Tensor, list[Any], Metrics]:
        """Run the chain. When a transform leaves no row, the rest is skipped (their states
        kept): the caller keeps the previous model."""
        states, metrics = list(states), {}
        for i, transform in enumerate(self.transforms):
            U, w, states[i], step_metrics = transform.apply(U, w, states[i], ctx)
            metrics.update(step_metrics)
            if len(U) == 0:
                break
        return U, w, states, metrics

    def on(self, side: str) -> "Pipeline":
        """The transforms that run on ``side`` (a deployment splits the chain between client and server)."""
        return Pipeline(tuple(t for t in self.transforms if t.side == side))

    def steps(self) -> list[str]:
        """The transforms in order, each with its side: what the summary reports."""
        return [f"{t.name} ({t.side})" for t in self.transforms]
