"""FedBABU: Oh et al. 2022, "FedBABU: Toward Enhanced Representation for Federated Image Classification".

During federated training the head (``personalization.personal``) stays at its random
initialization: clients train and send the body only. At evaluation each client fine-tunes
the whole global model (body and the initial head) for ``personalization.finetune_epochs``
epochs on its own training data.
"""

from __future__ import annotations

from torch import Tensor

from fedloom.core.store import ClientStore
from fedloom.engines.base import RoundResult
from fedloom.personalization.base import LocalModels, Setting, fine_tuned, train_pass, uplink


class FedBABU:
    """FedBABU (Oh, Kim, Yun 2022, "FedBABU: Toward Enhanced Representation for Federated Image Classification"):
    the body is trained and shared, the head stays at its initialization; clients fine-tune the whole model
    before evaluation."""

    name = "fedbabu"
    splits = True

    def __init__(self, setting: Setting, finetune_epochs: int = 1, finetune_steps: int | None = None):
        self.s, self.finetune_epochs, self.finetune_steps = setting, finetune_epochs, finetune_steps

    def train(self, engine, algorithm, x: Tensor, sent: dict[str, Tensor], clients: list[int], round_idx: int,
              store: ClientStore) -> RoundResult:
        """Train the body only (the head frozen) and send its change."""
        trained = train_pass(engine, LocalModels(algorithm, ~self.s.split.mask), x, sent, clients, round_idx,
                             self.s.local)
        return uplink(self.s.split, x, trained)

    def client_models(self, engine, x: Tensor, clients: list[int], store: ClientStore) -> Tensor:
        """Each client's copy of the global model fine-tuned on its own data (``finetune_epochs`` or
        ``finetune_steps``)."""
        return fine_tuned(self.s, engine, x, clients, self.finetune_epochs, self.finetune_steps)
