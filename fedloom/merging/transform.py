"""Matched averaging as a server transform: each round, the client models are aligned before the rows are
averaged (a permutation-aligned FedAvg in the spirit of Wang et al. 2020, "Federated Learning with Matched
Averaging", with Git Re-Basin's weight or activation matching, or OT, as the matcher; FedMA itself, with its
Bayesian-nonparametric matching and layer-wise rounds, is ``fedloom.merging.fedma``).

It keeps the row contract: a row is ``x_global - x_local``, so the transform rebuilds each client's model
``x_global - row``, aligns it and hands back ``x_global - aligned``; the aggregator then averages aligned
models. ``reference`` says what to align to: ``"global"``, the model the round started from; ``"clients"``,
each other (all to the first client, then each to the others' mean: MergeMany, ``merging.merge``).

From the config (``fedloom list transforms``)::

    [[server.transforms]]
    name = "matched_averaging"
    options = {method = "weight", reference = "global"}

The pipeline builder supplies the run's model (its structure) and data: activation matching correlates the
units on a batch of training examples, as a server holding a small proxy set would.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream
from fedloom.merging.merge import Aligner, State, align_all
from fedloom.merging.runs import activation_batch
from fedloom.merging.spec import spec_for
from fedloom.pipeline.base import Context, Transform

REFERENCES = ("global", "clients")


def matched_averaging(model: nn.Module, method: Literal["weight", "activation", "ot"] = "weight",
                      reference: Literal["global", "clients"] = "global", data=None) -> Transform:
    """A server transform aligning the round's client models before the mean (module docstring)."""
    if method not in ("weight", "activation", "ot"):
        raise ValueError(f"matched_averaging method {method!r}: choose weight, activation or ot")
    if method == "activation" and data is None:
        raise ValueError("matched_averaging: activation matching needs data (a batch of inputs); give the run's "
                         "data or use method = 'weight'")
    if reference not in REFERENCES:
        raise ValueError(f"matched_averaging reference {reference!r}: choose global or clients")
    spec, flat = spec_for(model), ParamSpec.of(model)

    def apply(U: Tensor, w: Tensor, state: None, ctx: Context):
        if len(U) == 0:
            return U, w, state, {"matched_shift": 0.0}
        inputs = activation_batch(data, ctx.seed) if method == "activation" else None
        align = Aligner(method, spec, model, inputs, ctx.generator(Stream.MERGING))
        x = ctx.params.to(U)
        locals_ = [{k: v.clone() for k, v in flat.unflatten(x - row).items()} for row in U]
        aligned = _aligned(locals_, flat.unflatten(x), align, reference)
        moved = torch.stack([x - torch.cat([a[n].reshape(-1).to(U) for n in flat.names]) for a in aligned])
        return moved, w, state, {"matched_shift": float((moved - U).norm(dim=1).mean())}

    return Transform("matched_averaging", apply)


def _aligned(locals_: list[State], global_state: State, align: Aligner, reference: str) -> list[State]:
    """The client models aligned to the global model, or to each other (MergeMany's order, ``merge``)."""
    if reference == "global":
        return [align(global_state, local) for local in locals_]
    return align_all(locals_, align)
