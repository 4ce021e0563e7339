"""The uplink as the training loop sees it: each client compresses its row,
keeping its compressor state (error memories, warm starts) across rounds, and
the bytes counted are the payloads' real lengths.

The memories are explicit state (client id -> that client's compressor state),
kept in the run's state tree; ``send`` returns the new memories and leaves the
old ones as they were.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedloom.compression.base import Compressor, State, roundtrip
from fedloom.core.rng import Stream, seed_for, torch_generator

FLOAT32_BYTES = 4
Memories = dict[int, State]


def send(compressor: Compressor, seed: int, U: Tensor, client_ids: list[int], round_idx: int,
         memories: Memories) -> tuple[Tensor, Tensor, Memories]:
    """(rows as the server decodes them, payload bytes per row, the clients' new memories)."""
    if len(client_ids) == 0:
        return U, torch.zeros(0, dtype=torch.long), memories
    gen = torch_generator(seed, Stream.COMPRESSION, round_idx)
    seeds = torch.tensor([seed_for(seed, Stream.COMPRESSION, round_idx, c) for c in client_ids])
    state = _stacked(compressor, memories, client_ids, U.shape[1], gen)
    U_hat, nbytes, new_state = roundtrip(compressor, U, state, gen, seeds)
    updated = dict(memories)
    for i, cid in enumerate(client_ids):
        updated[cid] = {k: v[i] for k, v in new_state.items()}
    return U_hat, nbytes, updated


def _stacked(compressor: Compressor, memories: Memories, client_ids: list[int], d: int,
             gen: torch.Generator) -> State:
    """The clients' states stacked row by row; a client seen for the first time starts fresh."""
    def fresh() -> State:
        return {k: v[0] for k, v in compressor.init(1, d, gen).items()}

    states = [memories[cid] if cid in memories else fresh() for cid in client_ids]
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}
