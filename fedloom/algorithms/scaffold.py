"""SCAFFOLD: Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", with control variates updated by option II.

State: the server's control variate c (``server_init``) and each client's c_i
(``client_init``). Clients correct every local gradient by ``c - c_i``, which
removes the client drift that heterogeneous data causes. After K local steps
with learning rate lr a client sets ``c_i+ = c_i - c + (x - y_i) / (K lr)`` and
sends ``delta_c = c_i+ - c_i`` beside its row. The server moves x by the
pipeline's aggregate of the rows (weighted by examples, as is common; server
lr = the paper's global step size) and c by ``|S|/N * mean(delta_c)``, the
paper's uniform mean over the sampled clients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedloom.algorithms.base import AlgorithmState, per_step
from fedloom.algorithms.fedavg import FedAvg
from fedloom.core.store import ClientState


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning"),
    control variates by option II: local gradients corrected by ``c - c_i``."""

    name = "scaffold"
    plain_sgd_only = True

    def server_init(self, x0: Tensor) -> AlgorithmState:
        """The server control variate ``c``, starting at zero."""
        return {"c": torch.zeros_like(x0)}

    def broadcast(self, state: AlgorithmState) -> dict[str, Tensor]:
        """The server control variate ``c``, sent with the model."""
        return {"c": state["c"]}

    def server_step(self, state: AlgorithmState, aux: dict[str, Tensor], n_clients: int) -> AlgorithmState:
        """``c <- c + |S|/N mean(delta_c)`` over the ``|S|`` accepted clients of ``n_clients`` = N."""
        sampled = aux["delta_c"].shape[0]
        return {"c": state["c"] + (sampled / n_clients) * aux["delta_c"].mean(dim=0)}

    def client_init(self, d: int) -> ClientState:
        """A client's control variate ``c_i``, starting at zero."""
        return {"c": torch.zeros(d)}

    def correct_grad(self, g: Tensor, x: Tensor, x0: Tensor, sent: dict[str, Tensor], cstate: ClientState) -> Tensor:
        """The drift correction: ``g + c - c_i``."""
        return g + sent["c"] - cstate["c"]

    def client_result(self, x0: Tensor, x: Tensor, steps: Tensor, lr: float, sent: dict[str, Tensor],
                      cstate: ClientState) -> tuple[Tensor, dict[str, Tensor], ClientState]:
        """The row, ``aux["delta_c"] = c_i+ - c_i`` and the new ``c_i+ = c_i - c + (x0 - x) / (steps lr)`` (option
        II)."""
        row = x0 - x
        c_new = cstate["c"] - sent["c"] + per_step(row, steps, lr)
        return row, {"delta_c": c_new - cstate["c"]}, {"c": c_new}
