"""FedAvg: McMahan et al. 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data".

Clients run plain local SGD from the global model and send back the change;
the server pipeline takes the weighted mean of the rows (weights: examples
each client trained on) and steps SGD with lr 1, which is exactly FedAvg's
weighted average of the local models. The server optimizer presets of
Reddi et al. 2021 (FedAvgM, FedAdam, FedYogi, FedAdagrad) are FedAvg with
another server step (``fedloom.algorithms.ALGORITHMS``).
"""

from __future__ import annotations

from fedloom.algorithms.base import NoServerState, PlainClient


class FedAvg(PlainClient, NoServerState):
    """FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data"):
    plain local SGD; the pipeline's weighted mean of the rows is the server's step."""

    name = "fedavg"
