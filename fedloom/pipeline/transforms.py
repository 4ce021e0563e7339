"""The built-in transforms: validation, the simulated attack, uplink compression,
norm clipping, aggregation and the server optimizer step (contract in ``base.py``)."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

from fedloom.aggregation.base import Aggregator
from fedloom.aggregation.validate import reject_invalid
from fedloom.algorithms.server_opt import OptimizerFactory, step_on_pseudo_gradient
from fedloom.attacks import Adversary
from fedloom.compression import uplink
from fedloom.compression.base import Compressor
from fedloom.pipeline.base import Context, Transform
from fedloom.pipeline.fedlaw import fedlaw
from fedloom.registry import Registry

log = logging.getLogger(__name__)


def validate() -> Transform:
    """Rows holding NaN or Inf, of the wrong length, or with a bad weight are dropped (metric ``n_rejected``)."""

    def apply(U: Tensor, w: Tensor, state: None, ctx: Context):
        try:
            U, w, rejected = reject_invalid(U, w, ctx.params.numel())
        except ValueError as err:  # nothing usable this round: the model stays as it was
            log.warning("round %d: %s", ctx.round, err)
            rejected = torch.ones(len(ctx.client_ids), dtype=torch.bool)
            U, w = U[:0], w[:0]
        ctx.keep(~rejected)
        return U, w, state, {"n_rejected": int(rejected.sum())}

    return Transform("validate", apply)


def reject_longer(max_norm: float) -> Transform:
    """Rows longer than ``max_norm`` (L2) are dropped (metric ``n_too_long``): one finite but huge update
    (3e38) must not move the model."""

    def apply(U: Tensor, w: Tensor, state: None, ctx: Context):
        too_long = torch.linalg.vector_norm(U, dim=1) > max_norm  # a norm past float32's range is inf: too long
        ctx.keep(~too_long)
        return U[~too_long], w[~too_long], state, {"n_too_long": int(too_long.sum())}

    return Transform("reject_longer", apply)


def attack(adversary: Adversary) -> Transform:
    """Simulated Byzantine clients replace their rows with crafted ones (metric ``n_byzantine``)."""

    def apply(U: Tensor, w: Tensor, state: None, ctx: Context):
        U, byzantine = adversary.corrupt(U, ctx.client_ids, ctx.round)
        return U, w, state, {"n_byzantine": int(byzantine.sum())}

    return Transform(f"attack:{adversary.name}", apply, side="client")


def compress(compressor: Compressor, seed: int) -> Transform:
    """Each client compresses its row and the server decodes it; the state is every client's
    compressor memory (metric ``uplink_bytes``: the payloads' real lengths)."""

    def apply(U: Tensor, w: Tensor, memories: uplink.Memories, ctx: Context):
        U, nbytes, memories = uplink.send(compressor, seed, U, ctx.client_ids, ctx.round, memories)
        return U, w, memories, {"uplink_bytes": int(nbytes.sum())}

    return Transform(f"compress:{compressor.name}", apply, init=lambda d: {}, side="client")


def clip(max_norm: float) -> Transform:
    """Every row clipped to L2 norm ``max_norm`` (rows already shorter are left as they are)."""
    if max_norm <= 0:
        raise ValueError(f"clip: max_norm must be > 0; got {max_norm}")

    def apply(U: Tensor, w: Tensor, state: None, ctx: Context):
        clipped, scale = clip_rows(U, max_norm)
        return clipped, w, state, {"n_clipped": int((scale < 1).sum())}

    return Transform("clip", apply)


def clip_rows(U: Tensor, max_norm: float) -> tuple[Tensor, Tensor]:
    """The rows scaled to L2 norm at most ``max_norm``, and each row's scale (1 where it was shorter)."""
    scale = (max_norm / torch.linalg.vector_norm(U, dim=1).clamp_min(torch.finfo(U.dtype).tiny)).clamp(max=1)
    return U * scale[:, None], scale


# what server.transforms may name (besides a user's import path); the pipeline builder supplies the run's
# model and data, and the server's own data, to the factories that take them
TRANSFORMS = Registry("transform", fixed=("model", "data", "server_data"))
TRANSFORMS.add("clip", "clip every row to L2 norm max_norm (option max_norm)")(clip)


def aggregate(aggregator: Aggregator) -> Transform:
    """The aggregator ends the matrix in one row (weight 1); its state is the aggregator's."""

    def apply(U: Tensor, w: Tensor, state, ctx: Context):
        row, state = aggregator(U, w, state)
        return row[None], torch.ones(1, dtype=w.dtype), state, {}

    return Transform(f"aggregate:{aggregator.name}", apply, init=aggregator.init)


def server_step(name: str, make_optimizer: OptimizerFactory) -> Transform:
    """The server optimizer steps the global model with the aggregated row as its gradient
    (``x_global - mean(local)``: SGD with lr 1 is FedAvg); the row out is the next global
    model. The state is the optimizer's state_dict (None before the first step)."""

    def apply(U: Tensor, w: Tensor, state: dict | None, ctx: Context):
        params = nn.Parameter(ctx.params.detach().clone())
        optimizer = make_optimizer(params)
        if state is not None:
            optimizer.load_state_dict(state)
        step_on_pseudo_gradient(optimizer, params, U[0])
        return params.detach()[None], w, optimizer.state_dict(), {}

    return Transform(f"server_optimizer:{name}", apply)


def fedau(cutoff: int = 50) -> Transform:
    """FedAU (Wang and Ji 2024): rows weighted by each client's online estimate of its participation interval
    (~1/p_i, intervals cut off at ``cutoff`` rounds), summed and divided by the number of clients N (option
    cutoff)."""
    if not isinstance(cutoff, int) or cutoff < 1:
        raise ValueError(f"fedau: cutoff must be a whole number of rounds >= 1; got {cutoff!r}")

    def apply(U: Tensor, w: Tensor, state: dict[int, Tensor], ctx: Context):
        if ctx.n_clients is None:
            raise ValueError("fedau: the round's context does not say how many clients the federation has")
        state = dict(state)  # entries are replaced, never edited in place
        weights = []
        for client in ctx.client_ids:
            weight, state[client] = participation_weight(state.get(client), ctx.round, cutoff)
            weights.append(weight)
        omega = torch.tensor(weights, dtype=U.dtype, device=U.device)
        row = (omega[:, None] * U).sum(0) / ctx.n_clients
        return row[None], torch.ones(1, dtype=w.dtype), state, {"fedau_mean_weight": float(omega.mean())}

    return Transform("fedau", apply, init=lambda d: {})


def participation_weight(seen: Tensor | None, round_idx: int, cutoff: int) -> tuple[float, Tensor]:
    """FedAU's weight for a client taking part in round ``round_idx``, and its new record.

    The record is (last round it took part, sum of its intervals, number of intervals), int64; rounds count
    from 1, so a client never seen last took part "in round 0". The weight is the mean of the intervals
    completed before this round, 1 while there is none (the estimate must not depend on this round's
    participation). Between two participations a counter of missed rounds closes an interval of length
    ``cutoff`` whenever it reaches ``cutoff``; the participation then closes one of (missed rounds left) + 1.
    Kept lazily: the missed rounds' cut-off intervals are counted when the client is next seen."""
    last, total, count = seen.tolist() if seen is not None else (0, 0, 0)
    missed = round_idx - last - 1
    total, count = total + (missed // cutoff) * cutoff, count + missed // cutoff
    weight = total / count if count else 1.0
    record = torch.tensor([round_idx, total + missed % cutoff + 1, count + 1], dtype=torch.int64)
    return weight, record


TRANSFORMS.add("fedau", "FedAU: rows weighted by each client's estimated participation interval, summed over "
               "all N clients (option cutoff)")(fedau)


def matched_averaging(model: nn.Module, method: Literal["weight", "activation", "ot"] = "weight",
                      reference: Literal["global", "clients"] = "global", data=None) -> Transform:
    """``fedloom.merging.transform.matched_averaging``, imported when built (merging needs the config). A
    pipeline built without the model (a deployed client's, which keeps only its client-side part) gets a
    server-side stand-in that refuses to run."""
    if model is None:
        def unbuilt(U: Tensor, w: Tensor, state, ctx: Context):
            raise ValueError("matched_averaging was built without the run's model (pass model= to build_pipeline)")

        return Transform("matched_averaging", unbuilt)
    from fedloom.merging import transform

    return transform.matched_averaging(model, method, reference, data)


TRANSFORMS.add("matched_averaging", "client models aligned (Git Re-Basin weight or activation matching, or OT) to "
               "the global model or to each other before the mean (options method, reference)")(matched_averaging)


TRANSFORMS.add("fedlaw", "FedLAW: aggregation weights and a global shrinking factor learned on a server proxy set, "
               "last (options proxy_fraction, epochs, lr, batch_size)")(fedlaw)
