"""Updates holding NaN or Inf, or of the wrong length, never reach an aggregator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def reject_invalid(U: Tensor | Sequence[Tensor], w: Tensor, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """Drop the rows that are not a finite vector of length d, or whose weight is not finite and >= 0.

    U is an [n, d] tensor or a list of n 1-D tensors (of any lengths). Returns the valid rows
    stacked [k, d], their weights, and the [n] mask of rejected rows for the metrics. Raises a
    ValueError when no row is left: the caller keeps the previous model.
    """
    w = torch.as_tensor(w)
    if isinstance(U, Tensor) and U.dim() == 2 and U.shape[1] == d and len(U) == w.numel():
        return _reject_in_matrix(U, w)
    rows = list(U)
    if len(rows) != w.numel():
        raise ValueError(f"{len(rows)} update rows but {w.numel()} weights")
    if not rows:
        raise ValueError("no update rows to aggregate")
    wrong_length = torch.tensor([r.dim() != 1 or r.numel() != d for r in rows])
    non_finite = torch.tensor([not bad and not bool(torch.isfinite(r).all()) for r, bad in zip(rows, wrong_length)])
    bad_weight = ~torch.isfinite(w) | (w < 0)
    rejected = wrong_length | non_finite | bad_weight
    if rejected.all():
        raise ValueError(
            f"all {len(rows)} update rows were rejected: {int(non_finite.sum())} held NaN/Inf, "
            f"{int(wrong_length.sum())} were not of length d={d}, {int(bad_weight.sum())} had a NaN/Inf "
            "or negative weight; keep the previous model"
        )
    if isinstance(U, Tensor) and not rejected.any():
        return U, w, rejected
    return torch.stack([r for r, bad in zip(rows, rejected) if not bad]), w[~rejected], rejected


def _reject_in_matrix(U: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The common case, one vectorized pass: a well-shaped matrix from an engine. A row whose sum is
    finite holds no NaN or Inf (either would make the sum NaN or Inf), so only rows whose sum is not
    (a NaN, an Inf, or finite values whose sum overflows) are looked at element by element."""
    suspect = ~torch.isfinite(U.sum(dim=1))
    non_finite = suspect.clone()
    if bool(suspect.any()):
        non_finite[suspect] = ~torch.isfinite(U[suspect]).all(dim=1)
    rejected = non_finite | ~torch.isfinite(w) | (w < 0)
    if len(U) == 0 or bool(rejected.all()):
        raise ValueError(f"all {len(U)} update rows were rejected (NaN/Inf values or bad weights); "
                         "keep the previous model")
    return (U, w, rejected) if not bool(rejected.any()) else (U[~rejected], w[~rejected], rejected)
