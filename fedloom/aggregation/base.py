"""The aggregator contract: a pure function of the update matrix.

An aggregator turns the round's update matrix ``U`` of shape ``[n, d]`` and the
client weights ``w`` of shape ``[n]`` (examples seen) into one vector ``[d]``.
Stateful ones (server momentum, as in centered clipping) carry explicit state,
optax style: ``init(d) -> state`` and ``apply(U, w, state) -> (vector, state)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from fedloom.registry import Registry

ApplyFn = Callable[[Tensor, Tensor, Any], tuple[Tensor, Any]]


@dataclass(frozen=True)
class Aggregator:
    """A named aggregator: ``init(d) -> state`` and ``apply(U, w, state) -> (vector [d], state)``;
    calling it applies it."""

    name: str
    init: Callable[[int], Any]
    apply: ApplyFn

    def __call__(self, U: Tensor, w: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        return self.apply(U, w, state)


def stateless(name: str, fn: Callable[[Tensor, Tensor], Tensor]) -> Aggregator:
    """Wrap a pure ``(U, w) -> [d]`` function as an Aggregator with no state."""
    return Aggregator(name, init=lambda d: None, apply=lambda U, w, state: (fn(U, w), state))


def weighted_mean(U: Tensor, w: Tensor) -> Tensor:
    """FedAvg's mean: rows weighted by the examples each client saw."""
    w = w.to(U.dtype)
    return (w / w.sum()) @ U


def mean() -> Aggregator:
    """The ``mean`` aggregator: FedAvg's weighted mean of the rows, stateless."""
    return stateless("mean", weighted_mean)


# factories taking the aggregator's options (server.aggregator.options) as keywords
AGGREGATORS = Registry("aggregator", {"mean": (mean, "weighted mean (FedAvg): rows weighted by examples")})


def register(name: str):
    """Decorator adding an aggregator factory under ``name``; the first line of its docstring describes it."""

    def add(factory: Callable[..., Aggregator]) -> Callable[..., Aggregator]:
        return AGGREGATORS.add(name, (factory.__doc__ or "").strip().splitlines()[0])(factory)

    return add


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Build the aggregator registered as ``name`` with its options (``server.aggregator.options``) as keywords."""
    return AGGREGATORS.build(name, options)
