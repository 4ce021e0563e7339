"""The federated algorithm library.

FedAvgM, FedAdam, FedYogi and FedAdagrad are FedAvg's clients with another
server optimizer (Reddi et al. 2021), so they are presets, not new classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedloom.algorithms.base import NoServerState, PlainClient
from fedloom.algorithms.fedavg import FedAvg
from fedloom.algorithms.fedprox import FedProx
from fedloom.algorithms.scaffold import Scaffold
from fedloom.algorithms.server_opt import ServerAdam, Yogi, server_optimizer, step_on_pseudo_gradient


@dataclass(frozen=True)
class AlgorithmSpec:
    cls: type[FedAvg]
    description: str
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "fedavg": AlgorithmSpec(FedAvg, "FedAvg (McMahan et al. 2017): weighted average of client models"),
    "fedprox": AlgorithmSpec(FedProx, "FedProx (Li et al. 2020): local proximal term mu/2 ||x - x_global||^2"),
    "scaffold": AlgorithmSpec(Scaffold, "SCAFFOLD (Karimireddy et al. 2020): control variates, option II"),
    "fedavgm": AlgorithmSpec(FedAvg, "FedAvgM (Hsu et al. 2019): server SGD with momentum", "sgd", 1.0, 0.9),
    "fedadam": AlgorithmSpec(FedAvg, "FedAdam (Reddi et al. 2021, Algorithm 2): server Adam, no bias correction, v_0 = tau^2", "adam", 0.01),
    "fedyogi": AlgorithmSpec(FedAvg, "FedYogi (Reddi et al. 2021): server Yogi on the pseudo-gradient", "yogi", 0.01),
    "fedadagrad": AlgorithmSpec(FedAvg, "FedAdagrad (Reddi et al. 2021): server Adagrad", "adagrad", 0.1),
}

__all__ = ["ALGORITHMS", "AlgorithmSpec", "FedAvg", "FedProx", "NoServerState", "PlainClient", "Scaffold", "ServerAdam",
           "Yogi", "server_optimizer", "step_on_pseudo_gradient"]
