"""FedPer: Arivazhagan et al. 2019, "Federated Learning with Personalization Layers".

The model is a shared body and personal layers (``personalization.personal``, by default the
last layer). Each sampled client trains the whole model, its own personal layers on the global
body, for the run's local epochs; it keeps the personal layers and sends the body's change.
A client's personal layers start from the global model's initial ones.
"""

from __future__ import annotations

from torch import Tensor

from fedloom.core.store import ClientStore
from fedloom.engines.base import RoundResult
from fedloom.personalization.base import LocalModels, Setting, keep, stored, train_pass, uplink

PERSONAL = "personal"  # the client state's key: the client's personal coordinates


class FedPer:
    """FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers"): a shared body and
    personal layers that each client keeps."""

    name = "fedper"
    splits = True

    def __init__(self, setting: Setting):
        self.s = setting

    def starts(self, x: Tensor, clients: list[int], store: ClientStore) -> Tensor:
        """Each client's model: the global shared part and its own personal part ``[n, d]``."""
        split = self.s.split
        return split.with_personal(x, stored(store, clients, PERSONAL, split.personal_part(x)))

    def train(self, engine, algorithm, x: Tensor, sent: dict[str, Tensor], clients: list[int], round_idx: int,
              store: ClientStore) -> RoundResult:
        """Train each client's whole model (global body, own personal layers); keep the personal layers, send the
        body's change."""
        trained = train_pass(engine, LocalModels(algorithm), self.starts(x, clients, store), sent, clients,
                             round_idx, self.s.local)
        keep(store, clients, PERSONAL, self.s.split.personal_part(trained.U))
        return uplink(self.s.split, x, trained)

    def client_models(self, engine, x: Tensor, clients: list[int], store: ClientStore) -> Tensor:
        """Each client's model: the global body with its own personal layers."""
        return self.starts(x, clients, store)
