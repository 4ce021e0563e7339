"""FedProx: Li et al. 2020, "Federated Optimization in Heterogeneous Networks".

Each client minimizes its loss plus (mu/2)||x - x_global||^2, which keeps local
models near the global one when data differ across clients; mu = 0 is FedAvg.
"""

from __future__ import annotations

from torch import Tensor

from fedloom.algorithms.fedavg import FedAvg
from fedloom.core.store import ClientState


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, mu: float = 0.01):
        self.mu = mu

    def correct_grad(self, g: Tensor, x: Tensor, x0: Tensor, sent: dict[str, Tensor], cstate: ClientState) -> Tensor:
        return g + self.mu * (x - x0) if self.mu else g
