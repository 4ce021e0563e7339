"""FedProx: Li et al. 2020, "Federated Optimization in Heterogeneous Networks".

Each client minimizes its loss plus (mu/2)||x - x_global||^2, which keeps local
models near the global one when data differ across clients; mu = 0 is FedAvg.
"""

from __future__ import annotations

from torch import Tensor

from fedloom.algorithms.fedavg import FedAvg
from fedloom.core.store import ClientState


class FedProx(FedAvg):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): local training with the
    proximal term (mu/2)||x - x_global||^2; ``mu`` = 0 is FedAvg."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01):
        self.mu = mu

    def correct_grad(self, g: Tensor, x: Tensor, x0: Tensor, sent: dict[str, Tensor], cstate: ClientState) -> Tensor:
        """The proximal term's gradient added: ``g + mu (x - x0)``."""
        return g + self.mu * (x - x0) if self.mu else g
