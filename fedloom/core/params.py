"""ParamSpec: a model's parameters as one flat vector (docs/architecture.md: an update is a row).

Every algorithm, aggregator and engine works on flat float vectors of length d;
ParamSpec is the one place that knows how names and shapes map to slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParamSpec:
    """A model's trainable parameters as one flat vector: their names and shapes, in ``named_parameters`` order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, module: nn.Module) -> "ParamSpec":
        """The spec of a module's trainable parameters."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Each parameter's number of elements."""
        return tuple(s.numel() for s in self.shapes)

    @property
    def dim(self) -> int:
        """The flat vector's length d."""
        return sum(self.sizes)

    def flatten(self, module: nn.Module) -> Tensor:
        """A detached copy of the module's parameters as one float32 vector."""
        params = dict(module.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names]).float()

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` shaped like the parameters. ``flat`` may be ``[d]`` or
        batched ``[..., d]`` (the views then keep the leading dimensions)."""
        lead = flat.shape[:-1]
        pieces = torch.split(flat, self.sizes, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, pieces, self.shapes)}

    def load_into(self, module: nn.Module, flat: Tensor) -> None:
        """Copy a flat vector into the module's parameters, in place."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in self.unflatten(flat).items():
                params[name].copy_(value)

    def check(self, flat: Tensor, what: str = "vector") -> None:
        """ValueError naming ``what`` unless the last dimension of ``flat`` is the model's length d."""
        if flat.shape[-1] != self.dim:
            raise ValueError(f"{what} has length {flat.shape[-1]}, the model has {self.dim} parameters")
