"""Secure aggregation's quantization: rows into the ring Z_{2^bits} and the unmasked sum back.

Quantization (client side): a client of weight w (its examples) scales its row by
p = round(Q w / w_max) / Q, Q = 2^(value_bits - 1) - 1, w_max public (the federation's largest
client), clamps p * row to [-clip, clip] per coordinate and rounds (clip / Q) steps to integers
(stochastically, from Stream.SECAGG keyed by round and client, or to the nearest); the integer
Q p rides along as one extra coordinate. The server divides the unmasked sum of the rows by the
sum of the p's: the weighted mean of the survivors' rows with weights p (= w / w_max up to 1/2Q).
Per coordinate, with no clamping, it is off the p-weighted mean of the unquantized rows by less
than (clip / Q) / mean(p) (stochastic; half that to the nearest). DP's distributed mechanism
weighs clients uniformly (p = 1) and divides by the fixed clients_per_round instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Quantizer:
    """Rows into the ring and the unmasked sum back (see the module's docstring)."""

    bits: int
    value_bits: int
    clip: float
    stochastic: bool

    @property
    def levels(self) -> int:
        """The largest magnitude a quantized value takes: ``2^(value_bits - 1) - 1``."""
        return 2 ** (self.value_bits - 1) - 1

    def weight(self, w: float, w_max: float) -> int:
        """Q p: the client's weight on the integer grid."""
        return max(1, round(self.levels * min(w / w_max, 1.0)))

    def encode(self, row: Tensor, q_weight: int, generator: torch.Generator | None) -> np.ndarray:
        """[d + 1] integers: the row's quantized coordinates and the weight, two's complement in the ring."""
        scaled = (row.detach().double().cpu() * (q_weight / self.levels)).clamp(-self.clip, self.clip)
        scaled = scaled * (self.levels / self.clip)
        noise = torch.rand(scaled.shape, generator=generator, dtype=torch.float64) if self.stochastic else 0.5
        ints = torch.floor(scaled + noise).long().numpy()
        return np.append(ints, q_weight).astype(np.uint64) & np.uint64((1 << self.bits) - 1)

    def signed(self, total: np.ndarray) -> np.ndarray:
        """The ring's elements as the integers in [-2^(bits-1), 2^(bits-1)) they stand for."""
        ints = total.astype(np.int64)
        return np.where(ints >= 2 ** (self.bits - 1), ints - 2 ** self.bits, ints)

    def decode_sum(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """The sum of the rows p * row (floats) and the sum of the weights Q p."""
        ints = self.signed(total)
        return ints[:-1] * (self.clip / self.levels), int(ints[-1])


def needed_bits(clients: int, value_bits: int) -> int:
    """Ring bits for the sum of ``clients`` values in [-(2^(value_bits-1) - 1), 2^(value_bits-1) - 1] not to wrap."""
    return math.ceil(math.log2(clients * (2 ** (value_bits - 1) - 1) + 1)) + 1
