"""Small shared helpers for tests that drive rounds directly."""

import torch

from fedloom import checkpoint
from fedloom.config import load_config
from fedloom.rounds import build_round
from fedloom.core.store import ClientStore
from fedloom.runner import Stepper


def make_round(*overrides):
    """The round object of a config given as overrides (federated or decentralized)."""
    return build_round(load_config(None, list(overrides)))


def play(round_, rounds, state=None):
    """The state tree after ``rounds`` rounds (from ``state``, else the start), and the last record."""
    state = round_.init_state() if state is None else state
    record = None
    for r in range(1, rounds + 1):
        state, record = round_.play(state, r)
    return state, record


def train_once(round_, x0, clients, sent=None, round_idx=1, store=None):
    """One engine call with the round's algorithm, from ``x0``, with a fresh (or given) client store."""
    return round_.engine.run_round(round_.algorithm, x0, sent or {}, list(clients), round_idx,
                                   store if store is not None else ClientStore())


def stepper(*overrides):
    """A :class:`fedloom.runner.Stepper` over the config given as overrides."""
    return Stepper(make_round(*overrides))


def assert_resumes_bit_identically(build, path):
    """Three rounds of ``build()`` in one go equal two, a checkpoint at ``path`` and the third: the
    model and every client's state."""
    whole, _ = play(build(), 3)
    first, _ = play(build(), 2)
    checkpoint.save(path, first)
    resumed, _ = build().play(checkpoint.load(path), 3)
    assert torch.equal(resumed["x"], whole["x"])
    assert resumed["clients"].keys() == whole["clients"].keys()
    for c, s in whole["clients"].items():
        assert all(torch.equal(resumed["clients"][c][k], v) for k, v in s.items())
