"""The federated algorithm library.

FedAvgM, FedAdam, FedYogi and FedAdagrad are FedAvg's clients with another
server optimizer (Reddi et al. 2021), so they are presets, not new classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedloom.algorithms.base import NoServerState, PlainClient
from fedloom.algorithms.fedamd import FedAMD
from fedloom.algorithms.fedavg import FedAvg
from fedloom.algorithms.fedprox import FedProx
from fedloom.algorithms.scaffold import Scaffold
from fedloom.algorithms.server_opt import ServerAdam, Yogi, server_optimizer, step_on_pseudo_gradient
from fedloom.registry import Registry


@dataclass(frozen=True)
class ServerPreset:
    """The server step an algorithm runs unless [server] says otherwise."""

    optimizer: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0


# algorithm classes; their constructor's keyword arguments are the options (algorithm.options)
ALGORITHMS = Registry("algorithm", {
    "fedavg": (FedAvg, "FedAvg (McMahan et al. 2017): weighted average of client models"),
    "fedprox": (FedProx, "FedProx (Li et al. 2020): local proximal term mu/2 ||x - x_global||^2 (option mu)"),
    "scaffold": (Scaffold, "SCAFFOLD (Karimireddy et al. 2020): control variates, option II; c by the uniform "
                 "mean of the sampled clients, x by the pipeline's (example-weighted) aggregate"),
    "fedamd": (FedAMD, "FedAMD (Wu et al. 2023): anchor sampling; anchors send large-batch gradients, miners run "
               "SARAH steps from their mean (options anchor_probability, anchor_batch_size, warm_start)"),
    "fedavgm": (FedAvg, "FedAvgM (Hsu et al. 2019): server SGD with momentum"),
    "fedadam": (FedAvg, "FedAdam (Reddi et al. 2021, Algorithm 2): server Adam, no bias correction, v_0 = tau^2"),
    "fedyogi": (FedAvg, "FedYogi (Reddi et al. 2021): server Yogi on the pseudo-gradient"),
    "fedadagrad": (FedAvg, "FedAdagrad (Reddi et al. 2021): server Adagrad"),
})
SERVER_PRESETS: dict[str, ServerPreset] = {
    "fedavgm": ServerPreset("sgd", 1.0, 0.9),
    "fedadam": ServerPreset("adam", 0.01),
    "fedyogi": ServerPreset("yogi", 0.01),
    "fedadagrad": ServerPreset("adagrad", 0.1),
}

__all__ = ["ALGORITHMS", "SERVER_PRESETS", "ServerPreset", "FedAMD", "FedAvg", "FedProx", "NoServerState", "PlainClient", "Scaffold", "ServerAdam",
           "Yogi", "server_optimizer", "step_on_pseudo_gradient"]
