"""The algorithm protocol: plain functions of explicit state, no state on ``self``.

An algorithm object holds only its hyperparameters (FedProx's mu). Everything
that changes between rounds is passed in and handed back:

- client side, run by every engine (FedJAX's init / step / final):
  ``client_init(d)`` (a new client's persistent state), ``correct_grad(g, x, x0,
  sent, cstate)`` (applied to every local gradient) and ``client_result(x0, x,
  steps, lr, sent, cstate) -> (row, aux, cstate)``, where ``steps`` are the local
  steps each client took and ``lr`` the local learning rate;
- server side, run by the federated round after the pipeline:
  ``server_init(x0) -> state``, ``broadcast(state) -> sent`` (what clients receive
  besides the model) and ``server_step(state, aux, n_clients) -> state`` on the
  side matrices ``aux`` of the accepted clients.

Client functions are written with broadcasting so they run on one client
(``x`` of shape ``[d]``) or on stacked clients (``[n, d]``) unchanged. A row is
the pseudo-gradient ``x_global - x_local``; what the server does with the rows
(validation, aggregation, the server optimizer) is the pipeline's job.

``plain_sgd_only`` marks algorithms whose rule assumes plain local SGD (SCAFFOLD
option II and K-GT divide the model change by ``steps * lr``); the config
refuses another local optimizer for them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedloom.core.store import ClientState

AlgorithmState = dict[str, Tensor]


class PlainClient:
    """The client side of FedAvg and D-SGD: plain local training, no state, the row is the model's change."""

    plain_sgd_only = False

    def client_init(self, d: int) -> ClientState:
        """A new client's persistent state (``d``: the model's length); empty for plain local training."""
        return {}

    def correct_grad(self, g: Tensor, x: Tensor, x0: Tensor, sent: dict[str, Tensor], cstate: ClientState) -> Tensor:
        """Correct a local gradient ``g`` at the client's model ``x`` (``x0``: the round's start model, ``sent``:
        what the server broadcast, ``cstate``: the client's state); plain training returns ``g`` unchanged."""
        return g

    def client_result(self, x0: Tensor, x: Tensor, steps: Tensor, lr: float, sent: dict[str, Tensor],
                      cstate: ClientState) -> tuple[Tensor, dict[str, Tensor], ClientState]:
        """The client's row ``x0 - x``, its side tensors ``aux`` for the server step and its new state
        (``steps``: the local steps taken, ``lr``: the local learning rate)."""
        return x0 - x, {}, cstate


class NoServerState:
    """The server side of algorithms whose server needs nothing besides the pipeline."""

    def server_init(self, x0: Tensor) -> AlgorithmState:
        """The algorithm's server state for the start model ``x0``; empty here."""
        return {}

    def broadcast(self, state: AlgorithmState) -> dict[str, Tensor]:
        """What clients receive besides the model (keyed tensors); nothing here."""
        return {}

    def server_step(self, state: AlgorithmState, aux: dict[str, Tensor], n_clients: int) -> AlgorithmState:
        """The server state after a round, from the accepted clients' side matrices ``aux``
        (``n_clients``: all clients)."""
        return state


def per_step(row: Tensor, steps: Tensor, lr: float) -> Tensor:
    """``row / (steps * lr)``: the average corrected gradient of a client's local SGD steps,
    for one client or stacked clients (one step count per row)."""
    steps = torch.as_tensor(steps, dtype=row.dtype, device=row.device).clamp(min=1)
    if steps.dim() == 1:
        steps = steps[:, None]
    return row / (steps * lr)
