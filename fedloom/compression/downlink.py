"""The downlink as the training loop sees it: the global model reaches the clients as
compressed differences, and the bytes counted are the payloads' real lengths.

The rule is EF21-P (Gruntkowska, Tyurin, Richtárik 2023, "EF21-P and Friends"), error
feedback in the primal space: the server keeps the model x and one copy w of what the
clients hold, sends ``C(x - w)`` and both ends set ``w <- w + C(x - w)``; the clients
train from w. What compression dropped stays in x - w and is sent in later rounds, as in
the server side of DoubleSqueeze (Tang et al. 2019), so w tracks x.

Clients that sat out rounds hold an older w. A sampled client catches up with the
messages it missed, replayed, or with w itself in fp32 when that is smaller (always on
its first round): it costs ``min(sum of the missed payload lengths, 4 d)`` bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedloom.compression.base import Compressor, roundtrip
from fedloom.core.rng import Stream, seed_for, torch_generator

FLOAT32_BYTES = 4
SERVER = 2**32 - 1  # the server's key in the compression stream, above every client id


class Downlink:
    """The rule's constants (compressor, seed); its state is explicit (``init``), in the run's state tree:
    the clients' copy w, the compressor's state, the running total of message bytes, and for each
    client how many messages its copy includes."""

    def __init__(self, compressor: Compressor, seed: int):
        self.compressor = compressor
        self.seed = seed

    def init(self, x0: Tensor) -> dict:
        """The rule's state for the start model ``x0``: the clients' copy, the compressor's state, bytes sent, syncs."""
        gen = torch_generator(self.seed, Stream.COMPRESSION, 0, SERVER)
        return {"copy": x0.detach().clone(), "compressor": self.compressor.init(1, x0.numel(), gen),
                "sent": [0], "synced": {}}

    def send(self, state: dict, x: Tensor, client_ids: list[int], round_idx: int) -> tuple[Tensor, Tensor, dict]:
        """(the model the clients train from, downlink bytes per client, the new state)."""
        gen = torch_generator(self.seed, Stream.COMPRESSION, round_idx, SERVER)
        seeds = torch.tensor([seed_for(self.seed, Stream.COMPRESSION, round_idx, SERVER)])
        step, nbytes, compressor_state = roundtrip(self.compressor, (x - state["copy"])[None], state["compressor"],
                                                   gen, seeds)
        sent = [*state["sent"], state["sent"][-1] + int(nbytes[0])]
        synced = dict(state["synced"])
        costs = [_catch_up(sent, synced, c, x.numel()) for c in client_ids]
        new_state = {"copy": state["copy"] + step[0], "compressor": compressor_state, "sent": sent, "synced": synced}
        return new_state["copy"], torch.tensor(costs, dtype=torch.long), new_state


def _catch_up(sent: list[int], synced: dict[int, int], client_id: int, d: int) -> int:
    """Bytes to bring the client's copy up to date (``synced`` records that it now is)."""
    full = FLOAT32_BYTES * d
    held = synced.get(client_id)
    synced[client_id] = len(sent) - 1
    return full if held is None else min(full, sent[-1] - sent[held])
