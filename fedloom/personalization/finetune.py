"""Local fine-tuning after FedAvg: the baseline personalization papers report (e.g. Wang et al. 2019,
"Federated Evaluation of On-device Personalization"; Collins et al. 2022, "FedAvg with Fine Tuning:
Local Updates Lead to Representation Learning").

Training is the run's algorithm unchanged (every parameter shared). At evaluation each client
trains a copy of the global model for ``personalization.finetune_epochs`` epochs (or ``finetune_steps`` steps) on its own
training data and is evaluated with it on its own test split.
"""

from __future__ import annotations

from torch import Tensor

from fedloom.core.store import ClientStore
from fedloom.engines.base import RoundResult
from fedloom.personalization.base import Setting, fine_tuned


class FineTune:
    """Local fine-tuning after federated training: training is the run's algorithm unchanged; at evaluation each
    client fine-tunes the global model on its own data."""

    name = "finetune"
    splits = False  # every parameter is shared

    def __init__(self, setting: Setting, finetune_epochs: int = 1, finetune_steps: int | None = None):
        self.s, self.finetune_epochs, self.finetune_steps = setting, finetune_epochs, finetune_steps

    def train(self, engine, algorithm, x: Tensor, sent: dict[str, Tensor], clients: list[int], round_idx: int,
              store: ClientStore) -> RoundResult:
        """The round's algorithm unchanged."""
        return engine.run_round(algorithm, x, sent, clients, round_idx, ClientStore())

    def client_models(self, engine, x: Tensor, clients: list[int], store: ClientStore) -> Tensor:
        """Each client's copy of the global model fine-tuned on its own data (``finetune_epochs`` or
        ``finetune_steps``)."""
        return fine_tuned(self.s, engine, x, clients, self.finetune_epochs, self.finetune_steps)
