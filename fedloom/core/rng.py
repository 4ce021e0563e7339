"""Seeded random streams: one independent stream per (purpose, round, client).

Results must not depend on the engine or on the order clients run in, so no
stream is shared: each is derived from the experiment seed and its own key.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """The purposes random numbers are drawn for; each is an independent stream (``seed_for``)."""

    SAMPLING = 1  # which clients take part in a round
    BATCHES = 2  # the order of a client's local batches
    INIT = 3  # the initial model
    ATTACK = 4  # Byzantine behaviour
    COMPRESSION = 5  # stochastic compressors
    NOISE = 6  # differential privacy noise
    DROPOUT = 7  # layers like dropout in local training
    SECAGG = 8  # secure aggregation: simulated dropouts, the clients' own randomness
    SYSTEM = 9  # the system model: client speeds, bandwidths, availability
    PARTICIPATION = 10  # clients that take part on their own (unknown) probabilities
    PERSONAL = 11  # personalization: personal heads, fine-tuning batches
    MERGING = 12  # model merging: activation matching's batches
    ANCHOR = 13  # FedAMD: who of a round's participants is an anchor, and an anchor's large batch


def seed_for(seed: int, stream: Stream, *key: int) -> int:
    """A 63-bit seed for ``stream`` at ``key`` (e.g. round, client id)."""
    state = np.random.SeedSequence([seed, int(stream), *[int(k) for k in key]]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def torch_generator(seed: int, stream: Stream, *key: int) -> torch.Generator:
    """A torch CPU generator seeded for ``stream`` at ``key`` (e.g. round, client id)."""
    return torch.Generator().manual_seed(seed_for(seed, stream, *key))


def numpy_generator(seed: int, stream: Stream, *key: int) -> np.random.Generator:
    """A numpy generator seeded for ``stream`` at ``key`` (e.g. round, client id)."""
    return np.random.default_rng(seed_for(seed, stream, *key))


_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection of uint64 that spreads every input bit over the output."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def counter_keys(seed: int, stream: Stream, *key: int | np.ndarray) -> np.ndarray:
    """Pseudo-random uint64 values, one per element of the broadcast ``key`` arrays.

    Counter-based: a value depends only on its own key (e.g. round, client,
    epoch, position), never on how many other values are drawn with it, so
    clients drawn together in one array get what each would get alone.
    """
    h = np.atleast_1d(np.uint64(seed_for(seed, stream)))  # arrays, because uint64 scalars warn when they wrap
    for k in key:
        h = _mix64(h ^ np.atleast_1d(np.asarray(k)).astype(np.uint64))
    return h
