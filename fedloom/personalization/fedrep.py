"""FedRep: Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated Learning".

Each sampled client first trains its personal head (``personalization.personal``) for
``personalization.head_epochs`` epochs with the body frozen, then the body for the run's local
epochs (``client.epochs``) with the new head frozen; it keeps the head and sends the body's change.
"""

from __future__ import annotations

from torch import Tensor

from fedloom.core.store import ClientStore
from fedloom.engines.base import RoundResult
from fedloom.personalization.base import LocalModels, Setting, keep, train_pass, uplink
from fedloom.personalization.fedper import PERSONAL, FedPer

HEAD_PASS = 1  # the head epochs' batch orders come from stream PERSONAL keyed by this


class FedRep(FedPer):
    """FedRep (Collins, Hassani, Mokhtari, Shakkottai 2021, "Exploiting Shared Representations for Personalized
    Federated Learning"): each client trains its head first (``head_epochs``), then the shared body."""

    name = "fedrep"

    def __init__(self, setting: Setting, head_epochs: int = 5):
        super().__init__(setting)
        self.head_epochs = head_epochs

    def train(self, engine, algorithm, x: Tensor, sent: dict[str, Tensor], clients: list[int], round_idx: int,
              store: ClientStore) -> RoundResult:
        """Train the personal head with the body frozen, then the body with the new head frozen; keep the head, send
        the body's change."""
        mask = self.s.split.mask
        headed = train_pass(engine, LocalModels(algorithm, mask), self.starts(x, clients, store), sent, clients,
                            round_idx, self.s.pass_local(HEAD_PASS, self.head_epochs))
        trained = train_pass(engine, LocalModels(algorithm, ~mask), headed.U, sent, clients, round_idx,
                             self.s.local)
        keep(store, clients, PERSONAL, self.s.split.personal_part(trained.U))
        return uplink(self.s.split, x, trained)
