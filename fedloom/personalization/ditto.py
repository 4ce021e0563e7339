"""Ditto: Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization".

Each sampled client runs the round's algorithm from the global model w (its change is the row
sent, as in FedAvg), and besides trains its personal model v, kept in its client state, on
F_i(v) + lambda/2 ||v - w||^2: every local step is v <- v - lr (grad F_i(v) + lambda (v - w)),
with w the global model the round started from. A client's v starts as the first global model
it receives (a client never sampled is evaluated with the global model).
"""

from __future__ import annotations

from torch import Tensor

from fedloom.core.store import ClientState, ClientStore
from fedloom.engines.base import RoundResult
from fedloom.personalization.base import LocalModels, Setting, keep, stored, train_pass

V = "v"  # the client state's key: the personal model
PERSONAL_PASS = 2  # the personal model's batch orders come from stream PERSONAL keyed by this


class TowardsGlobal:
    """The client rule of Ditto's personal model: the proximal pull lambda (v - w) towards ``sent["w"]``."""

    def __init__(self, lam: float):
        self.lam = lam

    def correct_grad(self, g: Tensor, x: Tensor, x0: Tensor, sent: dict[str, Tensor], cstate: ClientState) -> Tensor:
        """The local gradient plus the pull towards the global model: ``g + lambda (x - w)``."""
        return g + self.lam * (x - sent["w"])


class Ditto:
    """Ditto (Li, Hu, Beirami, Smith 2021, "Ditto: Fair and Robust Federated Learning Through Personalization"):
    the round's algorithm trains the global model; each client also trains a personal model pulled towards it
    with strength ``ditto_lambda``."""

    name = "ditto"
    splits = False  # the global model is shared whole; v is a second, personal, model

    def __init__(self, setting: Setting, ditto_lambda: float = 0.1):
        self.s, self.rule = setting, LocalModels(TowardsGlobal(ditto_lambda))

    def train(self, engine, algorithm, x: Tensor, sent: dict[str, Tensor], clients: list[int], round_idx: int,
              store: ClientStore) -> RoundResult:
        """Run the round's algorithm from the global model (its rows are sent), then a pass training each client's
        personal model towards the global model, kept in the client states."""
        trained = engine.run_round(algorithm, x, sent, clients, round_idx, ClientStore())
        personal = train_pass(engine, self.rule, stored(store, clients, V, x), {"w": x}, clients, round_idx,
                              self.s.pass_local(PERSONAL_PASS))
        keep(store, clients, V, personal.U)
        return trained

    def client_models(self, engine, x: Tensor, clients: list[int], store: ClientStore) -> Tensor:
        """The clients' personal models (the global model for a client not trained yet)."""
        return stored(store, clients, V, x)
