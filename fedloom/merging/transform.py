"""Matched averaging as a server transform: each round, the client models are aligned to the global model
they started from before the rows are averaged (a permutation-aligned FedAvg in the spirit of Wang et al.
2020, "Federated Learning with Matched Averaging", with Git Re-Basin's weight matching or OT as the
matcher, not FedMA's Bayesian-nonparametric matching).

It keeps the row contract: a row is ``x_global - x_local``, so the transform rebuilds each client's model
``x_global - row``, aligns it to ``x_global`` and hands back ``x_global - aligned``; the aggregator then
averages aligned models. It needs the model's structure, so it is made from Python with the model
(``server.transforms`` entries are built from options alone):
``matched_averaging(model, "weight")``, then ``Pipeline((..., it, aggregate, ...))``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream
from fedloom.merging.merge import Aligner
from fedloom.merging.spec import spec_for
from fedloom.pipeline.base import Context, Transform


def matched_averaging(model: nn.Module, method: str = "weight") -> Transform:
    """A server transform aligning the round's client models to the global model (module docstring)."""
    if method not in ("weight", "ot"):
        raise ValueError(f"matched_averaging method {method!r}: choose weight or ot (activation matching "
                         "needs data, which the server does not have)")
    spec, flat = spec_for(model), ParamSpec.of(model)

    def apply(U: Tensor, w: Tensor, state: None, ctx: Context):
        align = Aligner(method, spec, model, generator=ctx.generator(Stream.MERGING))
        global_state = flat.unflatten(ctx.params.to(U))
        rows = []
        for row in U:
            local = {k: v.clone() for k, v in flat.unflatten(ctx.params.to(U) - row).items()}
            aligned = align(global_state, local)
            rows.append(ctx.params.to(U) - torch.cat([aligned[n].reshape(-1) for n in flat.names]))
        moved = torch.stack(rows) if rows else U
        return moved, w, state, {"matched_shift": float((moved - U).norm(dim=1).mean()) if rows else 0.0}

    return Transform("matched_averaging", apply)
