"""The round protocol the runner drives, and the choice of round for a config."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn

from fedloom.builders import GivenParts
from fedloom.config import ExperimentConfig
from fedloom.data import FederatedData

State = dict[str, Any]


class Round(Protocol):
    cfg: ExperimentConfig
    data: FederatedData
    engine_name: str

    def init_state(self) -> State: ...

    def play(self, state: State, round_idx: int) -> tuple[State, dict[str, Any]]: ...

    def evaluate(self, state: State) -> dict[str, float]: ...

    def final_params(self, state: State) -> Tensor: ...

    def final_model(self, state: State) -> nn.Module: ...

    def describe(self, state: State) -> dict[str, Any]: ...

    def graph_record(self) -> dict[str, Any] | None: ...


def build_round(cfg: ExperimentConfig, given: GivenParts = GivenParts()) -> Round:
    """The round of ``cfg``'s mode; ``given``: data or a model handed over from Python."""
    if cfg.mode == "decentralized":
        from fedloom.rounds.decentralized import DecentralizedRound

        return DecentralizedRound(cfg, given)
    if cfg.mode == "asynchronous" and cfg.asynchronous.algorithm == "favano":
        from fedloom.rounds.favano import FavanoRound

        return FavanoRound(cfg, given=given)
    if cfg.mode == "asynchronous":
        from fedloom.rounds.asynchronous import AsynchronousRound

        return AsynchronousRound(cfg, given=given)
    from fedloom.rounds.federated import FederatedRound

    return FederatedRound(cfg, given=given)
