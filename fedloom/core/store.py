"""Per-client state kept across rounds (SCAFFOLD's control variates, error
feedback memories, personal layers), keyed by client id.

A store wraps a piece of the run's state tree: ``ClientStore(states)`` copies the
mapping, so a round's puts never reach the state of the last complete round, which
can be checkpointed at any time (client states are replaced, never changed in place).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

ClientState = dict[str, Tensor]


class ClientStore:
    """The clients' persistent states of a round, keyed by client id (a copy of the state tree's mapping)."""

    def __init__(self, states: dict[int, ClientState] | None = None) -> None:
        self.states: dict[int, ClientState] = dict(states or {})

    def get(self, client_id: int, make: Callable[[], ClientState]) -> ClientState:
        """The client's state, made fresh the first time the client is seen."""
        if client_id not in self.states:
            self.states[client_id] = make()
        return self.states[client_id]

    def put(self, client_id: int, state: ClientState) -> None:
        """Replace the client's state (states are replaced, never changed in place)."""
        self.states[client_id] = state

    def __len__(self) -> int:
        return len(self.states)

    def __contains__(self, client_id: int) -> bool:
        return client_id in self.states
