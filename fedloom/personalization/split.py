"""The shared/personal split of a model's parameters (``personalization.personal``).

Parameters are personal or shared whole, by name: fnmatch patterns on the names
``ParamSpec`` lists (``"head.*"``, ``"3.*"``), or ``"head"`` for the model's last
layer (the parameters of the last module that holds any). Personal coordinates
are client state; the rows a client sends, and so everything the server
pipeline sees, hold the shared coordinates only (``shared``), and the server's
new shared part goes back into the full model with ``merged``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cached_property

import torch
from torch import Tensor

from fedloom.core.params import ParamSpec

LAST_LAYER = "head"


def personal_names(spec: ParamSpec, personal: str | list[str]) -> tuple[str, ...]:
    """The parameter names ``personal`` selects; a pattern matching none, or a selection leaving
    nothing shared, is refused naming the patterns and the model's parameters."""
    from fedloom.config import ConfigError  # config imports this package's registry

    if personal == LAST_LAYER:
        return _last_layer(spec)
    patterns = [personal] if isinstance(personal, str) else list(personal)
    if not patterns:
        raise ConfigError(f"personalization.personal is empty: name the personal parameters (the model's "
                          f"parameters: {', '.join(spec.names)}) or give \"head\"")
    unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in spec.names)]
    if unmatched:
        raise ConfigError(f"personalization.personal: pattern(s) {', '.join(map(repr, unmatched))} match no "
                          f"parameter of the model (its parameters: {', '.join(spec.names)})")
    chosen = tuple(n for n in spec.names if any(fnmatchcase(n, p) for p in patterns))
    if len(chosen) == len(spec.names):
        raise ConfigError(f"personalization.personal = {patterns!r} makes every parameter personal: nothing "
                          f"would be shared (the model's parameters: {', '.join(spec.names)})")
    return chosen


def _last_layer(spec: ParamSpec) -> tuple[str, ...]:
    """The parameters of the module that owns the last parameter (a bare parameter alone)."""
    from fedloom.config import ConfigError
    last = spec.names[-1]
    owner = last.rpartition(".")[0]
    chosen = tuple(n for n in spec.names if n.rpartition(".")[0] == owner) if owner else (last,)
    if len(chosen) == len(spec.names):
        raise ConfigError(f"personalization.personal = 'head': the model's last layer is all of it "
                          f"({', '.join(spec.names)}); name the personal parameters by pattern instead")
    return chosen


@dataclass(frozen=True)
class Split:
    """A model's flat vector split into shared and personal coordinates (``personal``: the personal parameters'
    names)."""

    spec: ParamSpec
    personal: tuple[str, ...] = ()  # personal parameter names; () shares everything

    @cached_property
    def mask(self) -> Tensor:
        """``[d]`` True at personal coordinates."""
        return torch.cat([torch.full((size,), name in self.personal, dtype=torch.bool)
                          for name, size in zip(self.spec.names, self.spec.sizes)])

    @cached_property
    def shared_index(self) -> Tensor:
        return (~self.mask).nonzero().flatten()

    @property
    def shared_dim(self) -> int:
        """The number of shared coordinates."""
        return len(self.shared_index)

    @property
    def shared_shapes(self) -> tuple[torch.Size, ...]:
        """The shapes of the shared parameters, in order."""
        return tuple(s for n, s in zip(self.spec.names, self.spec.shapes) if n not in self.personal)

    def shared(self, x: Tensor) -> Tensor:
        """The shared coordinates of ``x`` (``[d]`` or ``[n, d]``)."""
        return x[..., self.shared_index.to(x.device)] if self.personal else x

    def merged(self, x: Tensor, shared: Tensor) -> Tensor:
        """``x`` with its shared coordinates replaced by ``shared``; the personal ones are kept."""
        if not self.personal:
            return shared
        out = x.clone()
        out[..., self.shared_index.to(x.device)] = shared.to(x.dtype)
        return out

    def with_personal(self, x: Tensor, personal: Tensor) -> Tensor:
        """``x`` (``[d]`` or ``[n, d]``) with its personal coordinates replaced by ``personal``
        (``[n, d_personal]``), ``[n, d]``."""
        mask = self.mask.to(x.device)
        out = x.expand(len(personal), -1).clone()
        out[:, mask] = personal.to(x.device, x.dtype)
        return out

    def personal_part(self, X: Tensor) -> Tensor:
        """The personal coordinates of rows ``X`` (``[..., d]`` to ``[..., d_personal]``)."""
        return X[..., self.mask.to(X.device)]
