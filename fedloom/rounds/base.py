"""The round protocol the runner drives, and the choice of round for a config."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn

from fedloom.builders import GivenParts
from fedloom.config import ExperimentConfig
from fedloom.data import FederatedData

State = dict[str, Any]


class Round(Protocol):
    """What the runner drives: a round's constant parts (config, data, engine) and its steps on the state tree."""

    cfg: ExperimentConfig
    data: FederatedData
    engine_name: str

    def init_state(self) -> State:
        """The state tree before the first round."""

    def play(self, state: State, round_idx: int) -> tuple[State, dict[str, Any]]:
        """Play round ``round_idx`` on ``state``; returns the new state tree and the round's metrics."""

    def evaluate(self, state: State) -> dict[str, float]:
        """The test metrics of the model(s) in ``state``."""

    def final_params(self, state: State) -> Tensor:
        """The flat parameters the run ends with (decentralized: the honest nodes' average)."""

    def final_model(self, state: State) -> nn.Module:
        """The model holding ``final_params``, as saved in the run directory."""

    def describe(self, state: State) -> dict[str, Any]:
        """Facts about the run for its summary (data sizes, pipeline, engine, ...)."""

    def graph_record(self) -> dict[str, Any] | None:
        """The gossip graph to draw (decentralized runs), or None."""


def build_round(cfg: ExperimentConfig, given: GivenParts = GivenParts()) -> Round:
    """The round of ``cfg``'s mode; ``given``: data or a model handed over from Python."""
    if cfg.mode == "decentralized":
        from fedloom.rounds.decentralized import DecentralizedRound

        return DecentralizedRound(cfg, given)
    if cfg.mode == "simultaneous":
        from fedloom.rounds.simultaneous import FedASTRound, SyncSTRound

        return (FedASTRound if cfg.simultaneous.algorithm == "fedast" else SyncSTRound)(cfg, given)
    if cfg.mode == "asynchronous" and cfg.asynchronous.algorithm == "favano":
        from fedloom.rounds.favano import FavanoRound

        return FavanoRound(cfg, given=given)
    if cfg.mode == "asynchronous":
        from fedloom.rounds.asynchronous import AsynchronousRound

        return AsynchronousRound(cfg, given=given)
    from fedloom.rounds.federated import FederatedRound

    return FederatedRound(cfg, given=given)
