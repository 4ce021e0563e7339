"""DP-FTRL (Kairouz, McMahan, Song, Thakkar, Thakurta and Xu 2021, "Practical and Private
(Deep) Learning without Sampling or Shuffling"), the server's side.

Each round's leaf is the clipped rows' sum over the fixed denominator (the rows are
pseudo-gradients, ``x_global - local``). The server releases the *prefix sum* of the
leaves since the tree started, noised by tree aggregation: the prefix ``[1, t]`` is the
union of the dyadic nodes of ``t``'s set bits, each node carries its own N(0, std^2)
noise, so a prefix holds ``popcount(t)`` nodes' noise and one leaf touches at most
``ceil(log2(E + 1))`` nodes of a tree of E leaves. The model is FTRL's
``anchor - lr * M_t`` with ``M_t = momentum * M_{t-1} + noisy prefix t``: with
momentum 0, server SGD on the noisy leaves; with noise 0, heavy-ball SGD exactly.

The tree restarts every ``tree_rounds`` rounds (an epoch, in which the sampler hands
each client at most one round): the anchor becomes the current model, the sum and
the momentum restart at 0. A node's noise is drawn from its own seeded stream keyed
by (the tree's first round, level, index), so the state tree holds only the tree's
first round, the anchor, the exact running sum and the momentum, and a node reused by
later prefixes is the same draw.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fedloom.core.rng import Stream, torch_generator
from fedloom.pipeline.base import Context, Transform
from fedloom.privacy.transforms import gaussian


def tree_noise(d: int, std: float, like: Tensor, seed: int, tree: int, t: int) -> Tensor:
    """The noise on prefix ``[1, t]`` of the tree that started at round ``tree``: one node per set bit of
    ``t`` (level l, index t >> l, covering leaves ((t >> l) - 1) 2^l + 1 .. (t >> l) 2^l)."""
    noise = torch.zeros(d, dtype=like.dtype, device=like.device)
    for level in range(t.bit_length()):
        if t >> level & 1:
            node = torch_generator(seed, Stream.NOISE, tree, level + 1, t >> level)
            noise += gaussian(d, std, like, node)
    return noise


def ftrl(denominator: int, std: float, lr: float, momentum: float, tree_rounds: int,
         epsilon_after: Callable[[int], float]) -> Transform:
    """The next global model from the clipped rows (clip them first): noise std per tree node ``std`` on the
    mean's scale. State: None before the first round, then ``tree`` (its first round), ``anchor``, ``sum``,
    ``momentum``."""

    def apply(U: Tensor, w: Tensor, state: dict | None, ctx: Context):
        t = (ctx.round - 1) % tree_rounds + 1  # the round's leaf in its tree
        tree = ctx.round - t + 1
        if state is None or state["tree"] != tree:  # a new tree (its first round may have had no rows)
            anchor = ctx.params.to(U.device, U.dtype).clone()
            state = {"tree": tree, "anchor": anchor, "sum": torch.zeros_like(anchor),
                     "momentum": torch.zeros_like(anchor)}
        leaves = state["sum"] + U.sum(0) / denominator
        noisy_prefix = leaves + (tree_noise(U.shape[1], std, U, ctx.seed, tree, t) if std > 0 else 0)
        velocity = momentum * state["momentum"] + noisy_prefix
        x = state["anchor"] - lr * velocity
        new_state = {"tree": tree, "anchor": state["anchor"], "sum": leaves, "momentum": velocity}
        # the model goes where the global model lives (as the server optimizer's does), the tree stays with the rows
        metrics = {"epsilon": epsilon_after(ctx.round)}
        return x.to(ctx.params.device)[None], torch.ones(1, dtype=w.dtype), new_state, metrics

    return Transform("dp_ftrl", apply)
