"""What every personalization method shares: the run's fixed setting, the client rule of one
training pass, and the passes themselves.

A method trains a round as one or more *passes* of the engine: each pass is the engine's
ordinary local training of the sampled clients from per-client starting models ``[n, d]``
(the global model with each client's personal part), with a client rule that trains some
coordinates and freezes the others (:class:`LocalModels`), and whose row is the local model
itself. The method keeps what is personal in the round's client store (the state tree's
``clients``) and returns the rows for the server: ``x_global - x_local`` on the shared
coordinates only, so the server pipeline never sees a personal value.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedloom.algorithms.base import PlainClient
from fedloom.core.rng import Stream, seed_for
from fedloom.core.store import ClientState, ClientStore
from fedloom.engines.base import LocalTraining, RoundResult
from fedloom.personalization.split import Split

FINETUNE_PASS = 0  # evaluation's fine-tuning draws its batch orders from stream PERSONAL keyed by this


@dataclass(frozen=True)
class Setting:
    """What a method needs of the run, fixed from its config: the split, the local training and the seed."""

    split: Split
    local: LocalTraining
    seed: int

    def pass_local(self, pass_id: int, epochs: int | None = None, steps: int | None = None) -> LocalTraining:
        """Local training of an extra pass: its own batch orders (stream PERSONAL keyed by the pass),
        and ``epochs`` epochs (or ``steps`` steps) when given, instead of the run's epochs or steps."""
        local = replace(self.local, seed=seed_for(self.seed, Stream.PERSONAL, pass_id))
        return local if epochs is None else replace(local, epochs=epochs, steps=steps)


class LocalModels:
    """The client rule of a pass: ``inner``'s gradient on the ``trainable`` coordinates (all when None),
    zero on the others, which so stay where they start (the config refuses weight decay, which would
    move them); the row is the local model itself."""

    plain_sgd_only = False

    def __init__(self, inner, trainable: Tensor | None = None):
        self.inner, self.trainable = inner, trainable

    def client_init(self, d: int) -> ClientState:
        """No state of its own: a pass's client state is the method's."""
        return {}

    def correct_grad(self, g: Tensor, x: Tensor, x0: Tensor, sent: dict[str, Tensor], cstate: ClientState) -> Tensor:
        """``inner``'s corrected gradient, zeroed outside the trainable coordinates."""
        g = self.inner.correct_grad(g, x, x0, sent, cstate)
        return g if self.trainable is None else g * self.trainable.to(g.device, g.dtype)

    def client_result(self, x0: Tensor, x: Tensor, steps: Tensor, lr: float, sent: dict[str, Tensor],
                      cstate: ClientState) -> tuple[Tensor, dict[str, Tensor], ClientState]:
        """The local model itself as the row (``uplink`` turns it into what a client sends), no side tensors."""
        return x, {}, cstate


def with_local(engine, local: LocalTraining):
    """The engine training with ``local`` instead of its own settings (a shallow copy: same model and data)."""
    if local == engine.local:
        return engine
    twin = copy.copy(engine)
    twin.local = local
    return twin


def train_pass(engine, rule: LocalModels, starts: Tensor, sent: dict[str, Tensor], clients: list[int],
               round_idx: int, local: LocalTraining) -> RoundResult:
    """One pass of local training from ``starts`` (``[d]`` or ``[n, d]``); ``U`` holds the local models.
    The rule keeps no client state, so the engine gets a store of its own."""
    return with_local(engine, local).run_round(rule, starts, sent, clients, round_idx, ClientStore())


def uplink(split: Split, x: Tensor, trained: RoundResult) -> RoundResult:
    """The rows the clients send: ``x - x_local`` on the shared coordinates (``trained.U``: local models)."""
    return replace(trained, U=split.shared(x.to(trained.U.device) - trained.U), aux={})


def fine_tuned(s: Setting, engine, x: Tensor, clients: list[int], epochs: int, steps: int | None) -> Tensor:
    """Each client's model after ``epochs`` epochs (or ``steps`` steps) of plain local training (every
    parameter) from ``x`` on its own training data: the local fine-tuning baseline, ``[n, d]``."""
    local = s.pass_local(FINETUNE_PASS, epochs, steps)
    return train_pass(engine, LocalModels(PlainClient()), x, {}, clients, 0, local).U


def stored(store: ClientStore, clients: list[int], key: str, default: Tensor) -> Tensor:
    """The clients' stored ``key`` tensors ``[n, ...]``; a client not seen yet starts from ``default``."""
    return torch.stack([store.get(c, lambda: {key: default.clone()})[key] for c in clients])


def keep(store: ClientStore, clients: list[int], key: str, values: Tensor) -> None:
    """Store each client's ``values`` row under ``key`` (detached, on the CPU) in its client state."""
    for c, v in zip(clients, values):
        store.put(c, {key: v.detach().cpu().clone()})


def generic_model(method, x: Tensor) -> Tensor:
    """The global model as served and evaluated: ``x``, or the method's transform of it (FedLoGe realigns
    its head); ``method`` may be None (no personalization)."""
    return method.generic(x) if hasattr(method, "generic") else x


def side_bytes(method, n_sent: int) -> int:
    """Uplink bytes ``n_sent`` clients send beside their rows (FedCAC's critical masks); 0 for most methods."""
    return method.side_bytes(n_sent) if hasattr(method, "side_bytes") else 0
