"""The compressor contract: real bytes on the wire for every row of ``X [n, d]``.

A round's client updates are the rows of ``X``. ``encode`` turns all of them into
one payload (``bytes``) per row in one batched torch computation; ``decode`` turns
payloads back into rows. What a client sends is exactly its payload, so the cost
of a row is ``len(payload)``: headers (scales) included, nothing else hidden.

State is explicit, optax style. ``init(n, d, gen)`` gives a ``State``: a dict of
tensors whose leading dimension is the client (PowerSGD's warm start, error
feedback memories). The caller keeps row ``i`` in client ``i``'s store; keys are
namespaced by their owner (``"ef.error"``, ``"powersgd.q"``), so they never clash.

Randomness comes in two kinds: ``gen`` is the sender's private generator
(stochastic rounding); ``seeds`` (int64 ``[n]``) are per-row seeds both ends know,
e.g. ``seed_for(seed, Stream.COMPRESSION, round, client_id)``, so that random-k
indices cost no bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Generator, Tensor

from fedloom.registry import Registry

State = dict[str, Tensor]
Shapes = Sequence[Sequence[int]]  # the model's parameter shapes, in the order they fill a row (ParamSpec.shapes)
Encode = Callable[[Tensor, State, Generator | None, Tensor | None], tuple[list[bytes], State]]
Decode = Callable[[list[bytes], int, Tensor | None], Tensor]


def no_state(n: int, d: int, gen: Generator | None) -> State:
    """The state of a stateless compressor for ``n`` rows of length ``d``: empty."""
    return {}


def messages(decoded: Tensor, state: State) -> Tensor:
    """The server's row estimates are the decoded messages themselves."""
    return decoded


@dataclass(frozen=True)
class Compressor:
    """``encode(X, state, gen, seeds) -> (payloads, state)`` on the clients,
    ``decode(payloads, d, seeds) -> messages [n, d]`` on the server, and
    ``rebuild(messages, state_before) -> rows``: the server's estimate of each row.
    ``rebuild`` is the identity except for EF21 and EControl, whose messages are
    increments of an estimate both ends keep (see ``feedback.py``)."""

    name: str
    encode: Encode
    decode: Decode
    unbiased: bool  # E[decoded] == input, over the encoder's randomness
    init: Callable[[int, int, Generator | None], State] = no_state
    rebuild: Callable[[Tensor, State], Tensor] = messages


def roundtrip(
    comp: Compressor,
    X: Tensor,
    state: State | None = None,
    gen: Generator | None = None,
    seeds: Tensor | None = None,
) -> tuple[Tensor, Tensor, State]:
    """Encode every row, decode on the server side: ``(X_hat [n, d], nbytes [n], state)``.

    What the training loop calls; ``state=None`` starts from ``comp.init``."""
    n, d = check_shape(comp.name, X)
    if state is None:
        state = comp.init(n, d, gen)
    payloads, new_state = comp.encode(X, state, gen, seeds)
    X_hat = comp.rebuild(comp.decode(payloads, d, seeds), state)
    return X_hat, torch.tensor([len(p) for p in payloads]), new_state


def check_shape(name: str, X: Tensor) -> tuple[int, int]:
    """``(n, d)`` of the rows ``X``; ValueError naming the compressor unless ``X`` is ``[n, d]`` with ``d >= 1``."""
    if X.ndim != 2 or X.shape[1] == 0:
        raise ValueError(f"{name}: expected updates as rows [n, d] with d >= 1, got shape {tuple(X.shape)}")
    return X.shape[0], X.shape[1]


def check_rows(name: str, X: Tensor) -> Tensor:
    """``X`` as contiguous float32 rows; refuses NaN/Inf naming the compressor and the row."""
    check_shape(name, X)
    X = X.detach().to(torch.float32).contiguous()
    suspects = (~torch.isfinite(X.sum(dim=1))).nonzero().flatten()  # a cheap pass; sums may also overflow
    bad = [int(i) for i in suspects if not torch.isfinite(X[i]).all()]
    if bad:
        raise ValueError(f"{name}: row {bad[0]} contains NaN or Inf; compressors take finite float32 updates")
    return X


def layer_sizes(name: str, shapes: Shapes | None, d: int) -> list[int]:
    """Coordinates of each parameter tensor in a row of length d, in order; without shapes the
    row is one tensor of d."""
    if shapes is None:
        return [d]
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) != d:
        raise ValueError(f"{name}: the layer shapes cover {sum(sizes)} parameters, but the rows have d = {d}")
    return sizes


# factories taking the [compression] options as keywords (and the model's shapes, when they name them)
COMPRESSORS = Registry("compressor", fixed=("shapes",))
# wrappers taking the inner Compressor first, then their options
FEEDBACK = Registry("feedback", fixed=("inner", "shapes"))


def register(name: str, description: str, table: Registry = COMPRESSORS):
    """Decorator adding a factory to ``table`` (COMPRESSORS or FEEDBACK) under ``name``."""
    return table.add(name, description)


def make_compressor(
    name: str,
    *,
    feedback: str | None = None,
    feedback_options: dict[str, Any] | None = None,
    shapes: Shapes | None = None,
    **options: Any,
) -> Compressor:
    """``make_compressor("topk", k=0.01, feedback="ef21")``: a registered compressor,
    optionally wrapped in a registered error feedback. ``shapes`` (the model's parameter
    shapes) reach the compressors that work layer by layer (a keyword-only ``shapes``
    parameter: PowerSGD, TernGrad); it is not a user option."""
    comp = COMPRESSORS.build(name, options, shapes=shapes)
    if feedback is None:
        return comp
    return FEEDBACK.build(feedback, feedback_options or {}, comp, shapes=shapes)
