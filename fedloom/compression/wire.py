"""Byte layouts: per-row headers, values, indices and packed bit codes.

Every payload is a concatenation of fixed-width little-endian blocks. Encoders build
each block for all rows at once (``[n, ...]`` arrays) and cut one contiguous buffer
into rows; decoders stack the rows back and split the blocks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

F32 = np.dtype("<f4")
F16 = np.dtype("<f2")


def index_bits(d: int) -> int:
    """Bits per index of ``0 .. d-1``: ceil(log2 d), at least 1."""
    return max(1, (d - 1).bit_length())


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """``[n, k]`` indices below ``2**bits`` -> ``[n, ceil(k * bits / 8)]`` bytes: the low
    ``bits`` bits of each, most significant first. A byte-aligned width (uint16, uint32)
    would cost up to 2x more: 17 bits per index for d = 107,786 instead of 32."""
    n, k = indices.shape
    words = indices.astype(">u4").view(np.uint8).reshape(n, k, 4)
    return np.packbits(np.unpackbits(words, axis=2)[:, :, 32 - bits :].reshape(n, -1), axis=1)


def unpack_indices(block: np.ndarray, k: int, bits: int) -> Tensor:
    """Inverse of ``pack_indices``: ``[n, k]`` int64 indices."""
    n = len(block)
    planes = np.zeros((n, k, 32), np.uint8)
    planes[:, :, 32 - bits :] = np.unpackbits(block, axis=1, count=k * bits).reshape(n, k, bits)
    return torch.from_numpy(np.packbits(planes, axis=2).view(">u4")[:, :, 0].astype(np.int64))


def join_rows(*blocks: np.ndarray) -> list[bytes]:
    """One payload per row: row ``i`` of every ``[n, ...]`` block, side by side."""
    n = len(blocks[0])
    flat = [np.ascontiguousarray(b).reshape(n, -1).view(np.uint8) for b in blocks]
    buf = flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1)
    return [row.tobytes() for row in buf]


def split_rows(name: str, payloads: list[bytes], sizes: list[int]) -> list[np.ndarray]:
    """Inverse of ``join_rows``: contiguous ``[n, size]`` byte blocks; refuses payloads of the wrong length."""
    total = sum(sizes)
    blocks = [np.empty((len(payloads), size), np.uint8) for size in sizes]
    edges = np.cumsum([0, *sizes])
    for i, p in enumerate(payloads):
        if len(p) != total:
            raise ValueError(f"{name}: payload of row {i} has {len(p)} bytes, expected {total}")
        row = np.frombuffer(p, np.uint8)
        for block, a, b in zip(blocks, edges[:-1], edges[1:]):
            block[i] = row[a:b]
    return blocks


def as_tensor(block: np.ndarray, dtype: np.dtype) -> Tensor:
    """A ``[n, bytes]`` block read as ``[n, bytes / itemsize]`` values of ``dtype``."""
    return torch.from_numpy(block.view(dtype).astype(dtype.newbyteorder("="), copy=False))


def pack_bits(codes: Tensor, bits: int) -> np.ndarray:
    """``[n, d]`` integer codes below ``2**bits`` -> ``[n, ceil(d * bits / 8)]`` bytes,
    most significant bit first. Eight codes fill ``bits`` bytes of one uint64."""
    n, d = codes.shape
    padded = np.zeros((n, -(-d // 8) * 8), np.uint8)
    padded[:, :d] = codes.to(torch.uint8).numpy()
    groups = padded.reshape(n, -1, 8)
    acc = groups[:, :, 0].astype(np.uint64)
    for j in range(1, 8):
        acc <<= np.uint64(bits)
        acc |= groups[:, :, j]
    big_endian = acc.astype(">u8").view(np.uint8).reshape(n, -1, 8)
    return big_endian[:, :, 8 - bits :].reshape(n, -1)[:, : packed_size(d, bits)]


def unpack_bits(block: np.ndarray, d: int, bits: int) -> Tensor:
    """Inverse of ``pack_bits``: ``[n, d]`` uint8 codes."""
    n, groups = len(block), -(-d // 8)
    flat = np.zeros((n, groups * bits), np.uint8)
    flat[:, : block.shape[1]] = block
    words = np.zeros((n, groups, 8), np.uint8)
    words[:, :, 8 - bits :] = flat.reshape(n, groups, bits)
    acc = words.view(">u8")[:, :, 0].astype(np.uint64)
    codes = np.empty((n, groups, 8), np.uint8)
    for j in range(8):
        codes[:, :, j] = (acc >> np.uint64(bits * (7 - j))) & np.uint64((1 << bits) - 1)
    return torch.from_numpy(codes.reshape(n, -1)[:, :d].copy())


def packed_size(d: int, bits: int) -> int:
    """The bytes that ``d`` values of ``bits`` bits each take when packed."""
    return -(-d * bits // 8)
