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

from fedloom.core.options import OptionError, check_option_types

ApplyFn = Callable[[Tensor, Tensor, Any], tuple[Tensor, Any]]


@dataclass(frozen=True)
class Aggregator:
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
    return stateless("mean", weighted_mean)


# name -> factory taking the [aggregator] options of the config as keywords
AGGREGATORS: dict[str, Callable[..., Aggregator]] = {"mean": mean}


def register(name: str):
    """Decorator adding an aggregator factory to the registry under ``name``."""

    def add(factory: Callable[..., Aggregator]) -> Callable[..., Aggregator]:
        AGGREGATORS[name] = factory
        return factory

    return add


def make_aggregator(name: str, **options: Any) -> Aggregator:
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; available: {', '.join(sorted(AGGREGATORS))}")
    check_option_types("aggregator", name, AGGREGATORS[name], options)
    try:
        return AGGREGATORS[name](**options)
    except ValueError as err:  # the factory's own check of its options' values
        raise OptionError(f"aggregator {name!r}: {err}") from None
