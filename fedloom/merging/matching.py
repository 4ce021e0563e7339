"""Aligning model B's hidden units to model A's: three ways of finding the alignment.

- ``weight_matching``: Ainsworth, Hayase and Srinivasa 2023, "Git Re-Basin: Merging Models modulo
  Permutation Symmetries", weight matching: maximize sum_l <W_A^l, P_l W_B^l P_{l-1}^T> by coordinate
  descent, one permutation at a time (random order each sweep) holding the others fixed; each step is a
  linear assignment problem (``scipy.optimize.linear_sum_assignment``). Stops when a sweep improves none.
- ``activation_matching``: the same paper's activation matching: each permutation independently, the one
  maximizing the correlation of A's and B's unit activations on a batch of data (one LAP per layer).
- ``ot_fusion``: Singh and Jaggi 2020, "Model Fusion via Optimal Transport", weight-based alignment: layer
  by layer from the input, B's incoming weights are first aligned with the previous layers' transport
  maps, then the transport plan T between A's and B's neurons (uniform masses, squared Euclidean ground
  cost of the incoming weights) is solved with POT (exact ``ot.emd``, or Sinkhorn when ``reg > 0``); B's
  units become the barycentric mix n T B. With equal widths and no regularization T is a permutation.

Every function takes state dicts (name -> tensor) and returns an ``Alignment`` for ``spec.apply``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from fedloom.merging.spec import Alignment, Axis, PermutationSpec, Segment, apply, identity

State = dict[str, Tensor]


def _units(t: Tensor, axis: int, spec: Axis, seg: Segment) -> Tensor:
    """The rows of ``t`` that ``seg``'s units own: [seg.size, everything else]."""
    t = t.unflatten(axis, (t.shape[axis] // spec.inner, spec.inner)).narrow(axis, seg.start, seg.size)
    return torch.movedim(t, axis, 0).reshape(seg.size, -1).double()


def _similarity(spec: PermutationSpec, a: State, b: State, alignment: Alignment, perm: str,
                incoming_only: bool = False) -> Tensor:
    """sum over the axes ``perm`` acts on of A's units . B's units, B's other axes aligned: [n, n]."""
    n = spec.sizes[perm]
    total = torch.zeros(n, n, dtype=torch.float64)
    for key, axis, axis_spec, seg in spec.uses(perm):
        if incoming_only and axis != 0:
            continue
        b_other = apply(_only(spec, key), {key: b[key]}, alignment, skip=(key, axis))[key]
        total += (_units(a[key], axis, axis_spec, seg) @ _units(b_other, axis, axis_spec, seg).T).cpu()
    return total


def _only(spec: PermutationSpec, key: str) -> PermutationSpec:
    return PermutationSpec(spec.sizes, {key: spec.axes[key]}, {})


def _lap(similarity: Tensor) -> Tensor:
    _, cols = linear_sum_assignment(similarity.numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def weight_matching(spec: PermutationSpec, a: State, b: State, generator: torch.Generator,
                    max_sweeps: int = 100) -> Alignment:
    """Git Re-Basin's weight matching (module docstring): B's permutation that best matches A's weights."""
    perm = identity(spec)
    names = list(spec.sizes)
    for _ in range(max_sweeps):
        improved = False
        for i in torch.randperm(len(names), generator=generator).tolist():
            name = names[i]
            sim = _similarity(spec, a, b, perm, name)
            new = _lap(sim)
            rows = torch.arange(len(new))
            if sim[rows, new].sum() > sim[rows, perm[name]].sum() + 1e-12 * sim.abs().max():
                perm[name], improved = new, True
        if not improved:
            break
    return perm


def activations(model: nn.Module, spec: PermutationSpec, x: Tensor) -> dict[str, Tensor]:
    """Each permutation's unit activations on the batch ``x``: [units, examples (x positions)]."""
    modules = dict(model.named_modules())
    seen: dict[str, Tensor] = {}
    hooks = [modules[name].register_forward_hook(lambda m, i, out, name=name: seen.__setitem__(name, out))
             for name in {p.module for p in spec.probes.values()}]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(x)
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for perm, probe in spec.probes.items():
        units = seen[probe.module].narrow(1, probe.start, spec.sizes[perm])
        out[perm] = torch.movedim(units, 1, 0).reshape(spec.sizes[perm], -1).double()
    return out


def _correlation(u: Tensor, v: Tensor) -> Tensor:
    """Pearson correlation of every row of u with every row of v (constant units correlate 0)."""
    u = u - u.mean(1, keepdim=True)
    v = v - v.mean(1, keepdim=True)
    u = u / u.norm(dim=1, keepdim=True).clamp(min=1e-12)
    v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return u @ v.T


def activation_matching(spec: PermutationSpec, model: nn.Module, a: State, b: State, x: Tensor) -> Alignment:
    """Git Re-Basin's activation matching (module docstring) on the batch ``x``."""
    model = copy.deepcopy(model)  # the caller's model keeps its weights
    acts_a, acts_b = _model_activations(model, spec, a, x), _model_activations(model, spec, b, x)
    return {name: _lap(_correlation(acts_a[name], acts_b[name]).cpu()) for name in spec.sizes}


def _model_activations(model: nn.Module, spec: PermutationSpec, state: State, x: Tensor) -> dict[str, Tensor]:
    model.load_state_dict(state, strict=False)
    return activations(model, spec, x.to(next(model.parameters()).device))


def ot_fusion(spec: PermutationSpec, a: State, b: State, reg: float = 0.0) -> Alignment:
    """Singh and Jaggi's weight-based OT alignment (module docstring); needs the ``pot`` package
    (``pip install fedloom[merging]``)."""
    import ot

    alignment = identity(spec)
    for name, n in spec.sizes.items():  # from the input to the output: earlier maps align the incoming axes
        cost = _squared_distances(spec, a, b, alignment, name)
        marginal = np.full(n, 1.0 / n)
        plan = ot.emd(marginal, marginal, cost) if reg == 0 else ot.sinkhorn(marginal, marginal,
                                                                            cost / max(cost.max(), 1e-12), reg)
        alignment[name] = torch.as_tensor(n * plan, dtype=torch.float32)
    return alignment


def _squared_distances(spec: PermutationSpec, a: State, b: State, alignment: Alignment, perm: str) -> np.ndarray:
    """||A_i||^2 + ||B_j||^2 - 2 A_i . B_j over the incoming weights of ``perm``'s units."""
    cross = _similarity(spec, a, b, alignment, perm, incoming_only=True)
    self_a = _similarity(spec, a, a, identity(spec), perm, incoming_only=True).diagonal()
    aligned_b = {k: apply(_only(spec, k), {k: v}, alignment, skip=(k, 0))[k] for k, v in b.items() if k in spec.axes}
    self_b = _similarity(spec, aligned_b, aligned_b, identity(spec), perm, incoming_only=True).diagonal()
    return (self_a[:, None] + self_b[None, :] - 2 * cross).clamp(min=0).numpy()

