"""Align and merge models, and the loss barrier along the linear path between two of them.

``merge`` averages models after aligning them: every model is first aligned to the first one, then (for
``refine`` sweeps) each is aligned again to the mean of the others, as Git Re-Basin's MergeMany does
(Ainsworth et al. 2023, section on merging many models). ``method = "average"`` is plain parameter
averaging, the baseline.

The loss barrier of Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery Ticket Hypothesis"),
as Git Re-Basin reports it: the loss at ``points`` models (1 - t) A + t B on [0, 1], and
barrier = max_t [loss(t) - ((1 - t) loss(0) + t loss(1))].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from fedloom.merging.matching import activation_matching, ot_fusion, weight_matching
from fedloom.merging.spec import PermutationSpec, apply

Method = Literal["weight", "activation", "ot", "average"]
METHODS: tuple[str, ...] = ("weight", "activation", "ot", "average")
State = dict[str, Tensor]


@dataclass(frozen=True)
class Aligner:
    """How B is aligned to A: the method, the model (activation matching runs it), a batch of inputs
    (activation matching) and the generator of weight matching's sweep order."""
    method: Method
    spec: PermutationSpec
    model: nn.Module
    inputs: Tensor | None = None
    generator: torch.Generator | None = None
    ot_reg: float = 0.0

    def __call__(self, a: State, b: State) -> State:
        if self.method == "average":
            return b
        if self.method == "weight":
            alignment = weight_matching(self.spec, a, b, self.generator or torch.Generator().manual_seed(0))
        elif self.method == "activation":
            if self.inputs is None:
                raise ValueError("activation matching needs a batch of inputs (the data's training examples)")
            alignment = activation_matching(self.spec, self.model, a, b, self.inputs)
        elif self.method == "ot":
            alignment = ot_fusion(self.spec, a, b, self.ot_reg)
        else:
            raise ValueError(f"merge method {self.method!r}: choose one of {', '.join(METHODS)}")
        return apply(self.spec, b, alignment)


def mean_state(states: list[State]) -> State:
    """The parameters' mean; integer buffers (BatchNorm's batch count) are the first model's."""
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


def align_all(states: list[State], align: Aligner, refine: int = 1) -> list[State]:
    """All models aligned to the first, then ``refine`` sweeps aligning each to the others' mean (MergeMany)."""
    aligned = [states[0], *(align(states[0], s) for s in states[1:])]
    if align.method != "average" and len(states) > 2:
        for _ in range(refine):
            for i in range(len(states)):
                others = mean_state(aligned[:i] + aligned[i + 1:])
                aligned[i] = align(others, states[i])
    return aligned


def merge(states: list[State], align: Aligner, refine: int = 1) -> State:
    """The mean of the models after ``align_all``."""
    return mean_state(align_all(states, align, refine))


def interpolate(a: State, b: State, t: float) -> State:
    """The state ``(1 - t) a + t b``: floating-point entries interpolated, the others (counters) taken from ``a``."""
    return {k: ((1 - t) * v.float() + t * b[k].float()).to(v.dtype) if v.is_floating_point() else v
            for k, v in a.items()}


def barrier(losses: list[float], ts: list[float]) -> float:
    """max_t of loss(t) minus the straight line between the end losses."""
    return max(loss - ((1 - t) * losses[0] + t * losses[-1]) for loss, t in zip(losses, ts))


def path(a: State, b: State, evaluate: Callable[[State], dict[str, float]],
         points: int = 11) -> dict[str, list[float] | float]:
    """The metrics of the models on the segment from A to B (``evaluate``: state -> {"loss": ..., ...})
    and the loss barrier."""
    ts = [i / (points - 1) for i in range(points)]
    rows = [evaluate(interpolate(a, b, t)) for t in ts]
    curves = {k: [r[k] for r in rows] for k in rows[0]}
    return {"t": ts, **curves, "barrier": barrier(curves["loss"], ts)}

