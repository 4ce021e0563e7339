"""Parts a user writes in their own module and names in the config by import path."""

import os
import time

import torch
from torch import nn

from fedloom.pipeline import Transform


class SlowLogistic(nn.Module):
    """Logistic regression whose forward pass waits $SLOW_FORWARD_S seconds (none when unset): the
    same numbers, slow enough rounds for a test to kill the run mid-way."""

    def __init__(self, input_shape, n_classes):
        super().__init__()
        self.linear = nn.Linear(int(torch.tensor(input_shape).prod()), n_classes)

    def forward(self, x):
        time.sleep(float(os.environ.get("SLOW_FORWARD_S", 0)))
        return self.linear(x.flatten(1))


def add_one() -> Transform:
    """Add 1 to every coordinate of every row."""
    return Transform("add_one", lambda U, w, state, ctx: (U + 1, w, state, {}))


def scale(factor: float) -> Transform:
    return Transform("scale", lambda U, w, state, ctx: (U * factor, w, state, {}))


def count_rounds() -> Transform:
    """A stateful transform: its state counts the rounds it has seen (metric ``rounds_seen``)."""

    def apply(U, w, state, ctx):
        return U, w, state + 1, {"rounds_seen": int(state + 1)}

    return Transform("count_rounds", apply, init=lambda d: torch.tensor(0))
