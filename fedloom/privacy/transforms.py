"""The DP-FedAvg transforms (McMahan et al. 2018, user level): clip every client's row,
add Gaussian noise on the client (local) or to the aggregate on the server (central),
and average the clipped rows over a fixed denominator with uniform weights.

The denominator is the number of clients sampled per round, whatever the examples
they hold or the rows validation drops: a data-dependent denominator or weight
would change the sensitivity the noise is calibrated to. Noise comes from the
round's own ``Stream.NOISE`` (keyed by client for local noise), so a resumed run
draws what an uninterrupted one does. Adaptive clipping keeps its clip norm in its
state (a float64 scalar), so a resumed run follows the same trajectory.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from fedloom.core.rng import Stream
from fedloom.pipeline.base import Context, Transform
from fedloom.pipeline.transforms import clip, clip_rows


def gaussian(d: int, std: float, like: Tensor, generator: torch.Generator) -> Tensor:
    """``d`` draws of N(0, std^2) from ``generator`` (a CPU stream), on ``like``'s device and dtype."""
    return (std * torch.randn(d, generator=generator, dtype=like.dtype)).to(like.device)


def dp_clip(max_norm: float, side: str) -> Transform:
    """Rows clipped to L2 norm ``max_norm``: by each client (local) or by the trusted server (central)."""
    return replace(clip(max_norm), name="dp_clip", side=side)


def local_noise(std: float) -> Transform:
    """Each client adds N(0, std^2) per coordinate to its own clipped row before sending it."""

    def apply(U: Tensor, w: Tensor, state: None, ctx: Context):
        noise = [gaussian(U.shape[1], std, U, ctx.generator(Stream.NOISE, c)) for c in ctx.client_ids]
        return U + torch.stack(noise) if noise else U, w, state, {}

    return Transform("dp_local_noise", apply, side="client")


def dp_mean(denominator: int, std: float, epsilon_after: Callable[[int], float]) -> Transform:
    """The rows' sum over ``denominator`` plus N(0, std^2) per coordinate (std 0: local noise is in the rows);
    metric ``epsilon`` after the rounds played so far, from the accountant."""

    def apply(U: Tensor, w: Tensor, state: None, ctx: Context):
        row = U.sum(0) / denominator
        if std > 0:
            row = row + gaussian(U.shape[1], std, U, ctx.generator(Stream.NOISE))
        return row[None], torch.ones(1, dtype=w.dtype), state, {"epsilon": epsilon_after(ctx.round)}

    return Transform("aggregate:dp_mean", apply)


COUNT_NOISE_KEY = (1, 1)  # the noised count's stream key after the round: never a client's (round, client) key


def adaptive_dp_mean(denominator: int, clip0: float, z_sum: float, count_std: float, quantile: float, clip_lr: float,
                     epsilon_after: Callable[[int], float]) -> Transform:
    """Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021), central: the rows clipped to the
    state's C, their noisy sum (std ``z_sum * C``) over ``denominator``, and C's geometric step
    ``C * exp(-clip_lr * (b - quantile))`` where b is the fraction of rows within C, counted with
    N(0, count_std^2) noise. Metrics ``dp_clip`` (the C this round used) and ``dp_below_clip`` (b)."""

    def apply(U: Tensor, w: Tensor, state: dict, ctx: Context):
        C = float(state["clip"])
        norms = torch.linalg.vector_norm(U, dim=1)
        row = clip_rows(U, C)[0].sum(0) / denominator
        row = row + gaussian(U.shape[1], z_sum * C / denominator, U, ctx.generator(Stream.NOISE))
        count = (norms <= C).sum().item() + count_std * torch.randn(
            1, generator=ctx.generator(Stream.NOISE, *COUNT_NOISE_KEY), dtype=torch.float64).item()
        below = count / denominator
        new_clip = state["clip"] * math.exp(-clip_lr * (below - quantile))
        metrics = {"epsilon": epsilon_after(ctx.round), "dp_clip": C, "dp_below_clip": below}
        return row[None], torch.ones(1, dtype=w.dtype), {"clip": new_clip}, metrics

    return Transform("aggregate:dp_adaptive_mean", apply,
                     init=lambda d: {"clip": torch.tensor(clip0, dtype=torch.float64)})
