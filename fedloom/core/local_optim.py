"""Client optimizers as pure functions over flat parameters.

They step ``x`` of shape ``[d]`` or stacked ``[n, d]`` (one row per client) with
the same code, so the serial and the vectorized engines share them. Semantics
follow torch.optim.SGD and torch.optim.Adam (tests compare against them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SGD:
    """torch.optim.SGD's rule on flat parameters: momentum (the first buffer is the gradient) and weight decay."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def init(self, x: Tensor) -> Any:
        """The optimizer state for parameters ``x``: a momentum buffer of zeros, or None without momentum."""
        return torch.zeros_like(x) if self.momentum else None

    def step(self, x: Tensor, g: Tensor, buf: Any) -> tuple[Tensor, Any]:
        """One step of ``x`` along the gradient ``g``; returns the new parameters and state."""
        # torch.optim.SGD's own kernels (add with alpha), so the result is bit-identical to it
        if self.weight_decay:
            g = torch.add(g, x, alpha=self.weight_decay)
        if self.momentum:
            buf = self.momentum * buf + g  # torch: first buffer is g itself, the same as 0 * 0 + g
            g = buf
        return torch.add(x, g, alpha=-self.lr), buf


@dataclass(frozen=True)
class Adam:
    """torch.optim.Adam's rule on flat parameters, with bias correction and L2 weight decay."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def init(self, x: Tensor) -> Any:
        """The optimizer state for parameters ``x``: first and second moments of zeros and the step count 0."""
        return torch.zeros_like(x), torch.zeros_like(x), 0

    def step(self, x: Tensor, g: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One Adam step of ``x`` along the gradient ``g``; returns the new parameters and ``(m, v, t)``."""
        m, v, t = state
        t += 1
        if self.weight_decay:
            g = g + self.weight_decay * x
        m = self.beta1 * m + (1 - self.beta1) * g
        v = self.beta2 * v + (1 - self.beta2) * g * g
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (1 - self.beta2**t)
        return x - self.lr * m_hat / (v_hat.sqrt() + self.eps), (m, v, t)


LOCAL_OPTIMIZERS = {"sgd": SGD, "adam": Adam}
