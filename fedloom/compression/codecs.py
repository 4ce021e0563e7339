"""Stateless compressors: dense casts, sparsifiers, stochastic quantizers, sign.

Payload layouts (little-endian, per row; d is known to both ends):

    none      d fp32
    fp16      scale fp32 | d fp16 of x / scale
    topk      k fp32 values | k indices of ceil(log2 d) bits each, packed
    randk     k fp32 values (indices come from the row's shared seed)
    qsgd      ceil(d / bucket) scales fp32 | d codes of b bits, packed
    terngrad  one scale fp32 per layer | d codes of 2 bits, packed
    sr8, sr4  scale fp32 | d codes of b bits, packed
    sign      scale fp32 | d bits, packed
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Generator, Tensor

from fedloom.compression.base import Compressor, Shapes, State, check_rows, layer_sizes, register
from fedloom.compression.wire import (
    F16,
    F32,
    as_tensor,
    index_bits,
    join_rows,
    pack_bits,
    pack_indices,
    packed_size,
    split_rows,
    unpack_bits,
    unpack_indices,
)


@register("none", "fp32 as is: 4 bytes a coordinate, exact")
def identity() -> Compressor:
    """The ``none`` compressor: fp32 rows sent as they are."""
    def encode(X: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
        return join_rows(check_rows("none", X).numpy()), state

    def decode(payloads: list[bytes], d: int, seeds: Tensor | None) -> Tensor:
        (values,) = split_rows("none", payloads, [4 * d])
        return as_tensor(values, F32)

    return Compressor("none", encode, decode, unbiased=True)


@register("fp16", "half precision after scaling by the row's max |x|: 2 bytes a coordinate + 4")
def fp16() -> Compressor:
    """Scaling first makes every finite float32 row representable (plain fp16 overflows past 65504)."""

    def encode(X: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
        X = check_rows("fp16", X)
        scale = norms(X, math.inf)
        return join_rows(scale.numpy(), (X / nonzero(scale)[:, None]).half().numpy()), state

    def decode(payloads: list[bytes], d: int, seeds: Tensor | None) -> Tensor:
        scale, values = split_rows("fp16", payloads, [4, 2 * d])
        return as_tensor(values, F16).float().mul_(as_tensor(scale, F32))

    return Compressor("fp16", encode, decode, unbiased=False)


def norms(X: Tensor, ord: float) -> Tensor:
    """Per-row ``ord``-norms (ord = 1, 2 or inf), never below max|x| so ``|x_i| <= norm``
    holds exactly. Rows whose float32 sum of powers overflows or underflows (|x| past
    about 1e19 or below 1e-19) are redone on x / max|x|."""
    peak = torch.maximum(X.amax(dim=1), X.amin(dim=1).neg())
    if ord == math.inf:
        return peak
    norm = torch.linalg.vector_norm(X, ord, dim=1)
    redo = (~torch.isfinite(norm) | (norm < 1e-18)).nonzero().flatten()
    if len(redo):
        safe = nonzero(peak[redo])
        norm[redo] = torch.linalg.vector_norm(X[redo] / safe[:, None], ord, dim=1) * safe
    return torch.maximum(norm, peak)


def header(name: str, scale: Tensor) -> Tensor:
    """The fp32 scales (``[n]`` or ``[n, buckets]``) that go on the wire; refuses one
    beyond float32 range, naming its row."""
    too_big = (~torch.isfinite(scale.view(len(scale), -1))).any(dim=1).nonzero()
    if len(too_big):
        raise ValueError(f"{name}: row {int(too_big[0])} has a scale beyond float32 range; scale the update down first")
    return scale


def nonzero(scale: Tensor) -> Tensor:
    """Scales safe to divide by: an all-zero row keeps scale 0 on the wire and divides by 1."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# --- sparsifiers -----------------------------------------------------------------


def coordinates(name: str, k: int | float) -> Callable[[int], int]:
    """``k`` as a number of coordinates for a given d: a float in (0, 1] is a fraction
    of d, an int a count (at most d). Checked when the compressor is made."""
    if isinstance(k, float) and 0 < k <= 1:
        return lambda d: max(1, round(k * d))
    if isinstance(k, int) and not isinstance(k, bool) and k >= 1:
        return lambda d: min(k, d)
    raise ValueError(f"{name}: k must be a fraction in (0, 1] or a count >= 1, got {k!r}")


def largest(A: Tensor, k: int) -> Tensor:
    """Indices ``[n, k]`` of each row's k largest entries, unordered (numpy's introselect:
    several times faster than torch.topk on CPU for large k)."""
    d = A.shape[1]
    return torch.from_numpy(np.argpartition(A.numpy(), d - k, axis=1)[:, d - k :])


def sparse_payloads(values: Tensor, indices: Tensor, d: int, ks: list[int]) -> list[bytes]:
    """Row ``i`` sends its first ``ks[i]`` values (fp32) then their indices, bit-packed."""
    v, idx, bits = values.numpy().astype(F32, copy=False), indices.numpy(), index_bits(d)
    payloads: list[bytes] = [b""] * len(ks)
    for k in sorted(set(ks)):  # rows of one k pack together (DGC's warm-up mixes k in a batch)
        rows = [r for r, kr in enumerate(ks) if kr == k]
        packed = pack_indices(idx[rows, :k], bits)
        for j, r in enumerate(rows):
            payloads[r] = v[r, :k].tobytes() + packed[j].tobytes()
    return payloads


def sparse_size(k: int, d: int) -> int:
    """Bytes of a sparse payload: k fp32 values and k indices of ``index_bits(d)`` bits."""
    return 4 * k + packed_size(k, index_bits(d))


def sparse_decode(name: str, payloads: list[bytes], d: int) -> Tensor:
    """Dense rows from value/index payloads; k is read off each payload's length."""
    bits = index_bits(d)
    out = torch.zeros(len(payloads), d)
    for length in sorted({len(p) for p in payloads}):
        rows = [r for r, p in enumerate(payloads) if len(p) == length]
        k = 8 * length // (32 + bits)  # the one k with sparse_size(k, d) == length, if any
        if not 1 <= k <= d or sparse_size(k, d) != length:
            raise ValueError(f"{name}: payload of row {rows[0]} has {length} bytes, not the size of k values "
                             f"and k {bits}-bit indices with 1 <= k <= {d}")
        values, indices = split_rows(name, [payloads[r] for r in rows], [4 * k, length - 4 * k])
        idx = unpack_indices(indices, k, bits)
        if idx.max() >= d:
            raise ValueError(f"{name}: an index of row {rows[0]} is out of range for d={d}")
        out[torch.tensor(rows)[:, None], idx] = as_tensor(values, F32)
    return out


@register("topk", "k largest |x|: k fp32 values + k packed ceil(log2 d)-bit indices (k: fraction of d or count)")
def topk(k: int | float = 0.01) -> Compressor:
    """Top-k sparsification: each row's ``k`` largest-magnitude coordinates (``k``: a fraction of d, or a count)
    with bit-packed indices; biased."""
    size = coordinates("topk", k)

    def encode(X: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
        X = check_rows("topk", X)
        kk = size(X.shape[1])
        idx = largest(X.abs(), kk)
        return sparse_payloads(X.gather(1, idx), idx, X.shape[1], [kk] * len(X)), state

    def decode(payloads: list[bytes], d: int, seeds: Tensor | None) -> Tensor:
        return sparse_decode("topk", payloads, d)

    return Compressor("topk", encode, decode, unbiased=False)


def shared_indices(name: str, seeds: Tensor | None, n: int, d: int, k: int) -> Tensor:
    """``k`` distinct sorted indices per row, a function of that row's seed alone: the first k
    of a permutation of [0, d) drawn by ``torch.randperm`` from a generator seeded with it, so
    every k-subset is exactly equally likely. O(d) per row (7 ms for d = 10^6)."""
    if seeds is None or seeds.shape != (n,):
        raise ValueError(
            f"{name}: needs seeds, one int per row, known to both ends "
            "(e.g. seed_for(seed, Stream.COMPRESSION, round, client_id))"
        )
    rows = [torch.randperm(d, generator=torch.Generator().manual_seed(seed))[:k] for seed in seeds.tolist()]
    return torch.stack(rows).sort(dim=1).values


@register("randk", "k random coordinates scaled by d/k, indices from a shared seed: k fp32 values, unbiased")
def randk(k: int | float = 0.01) -> Compressor:
    """Random-k sparsification: ``k`` coordinates drawn from the row's shared seed, scaled by d/k; unbiased, and
    the indices cost no bytes."""
    size = coordinates("randk", k)

    def encode(X: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
        X = check_rows("randk", X)
        n, d = X.shape
        return join_rows(X.gather(1, shared_indices("randk", seeds, n, d, size(d))).numpy()), state

    def decode(payloads: list[bytes], d: int, seeds: Tensor | None) -> Tensor:
        kk = size(d)
        (values,) = split_rows("randk", payloads, [4 * kk])
        idx = shared_indices("randk", seeds, len(payloads), d, kk)
        return torch.zeros(len(payloads), d).scatter_(1, idx, as_tensor(values, F32) * (d / kk))

    return Compressor("randk", encode, decode, unbiased=True)


# --- stochastic quantizers -------------------------------------------------------


def stochastic_round(y: Tensor, top: int, gen: Generator | None) -> Tensor:
    """``floor(y + u)``, u ~ U[0, 1): ``floor(y) + 1`` with probability ``frac(y)``, so
    ``E[q] = y`` (to the 2**-24 resolution of the draws). In place on a fresh draw; the
    clamp only catches ``y + u`` rounding up to ``top + 1``."""
    return torch.rand(y.shape, generator=gen).add_(y).floor_().clamp_(max=top)


def grid(name: str, levels: int, ord: float, bucket: int | None = None) -> Compressor:
    """Unbiased quantizer onto ``scale * q / levels``, ``q`` an integer in [-levels, levels],
    ``scale`` the ``ord``-norm of each bucket of ``bucket`` coordinates (None: the row):
    one fp32 scale per bucket, then codes ``q + levels`` of ``bits`` bits each."""
    if not isinstance(levels, int) or not 1 <= levels <= 127:
        raise ValueError(f"{name}: levels must be an int in 1..127, got {levels!r}")
    if bucket is not None and (not isinstance(bucket, int) or bucket < 1):
        raise ValueError(f"{name}: bucket must be an int >= 1 or None, got {bucket!r}")

    def buckets(d: int) -> tuple[int, int]:
        size = min(bucket or d, d)
        return -(-d // size), size

    def encode(X: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
        X = check_rows(name, X)
        (n, d), (nb, size) = X.shape, buckets(X.shape[1])
        B = (X if nb * size == d else F.pad(X, (0, nb * size - d))).view(n * nb, size)
        scale = header(name, norms(B, ord).view(n, nb))
        y = torch.div(B, nonzero(scale).view(-1, 1)).mul_(levels).view(n, -1)[:, :d]
        return quantized(scale, y, levels, gen), state

    def decode(payloads: list[bytes], d: int, seeds: Tensor | None) -> Tensor:
        nb, size = buckets(d)
        return dequantized(name, payloads, d, levels, nb,
                           lambda step: step if nb == 1 else step.repeat_interleave(size, dim=1)[:, :d])

    return Compressor(name, encode, decode, unbiased=True)


def code_bits(levels: int) -> int:
    """Bits of a code q + levels in 0..2 levels."""
    return (2 * levels).bit_length()


def quantized(scale: Tensor, y: Tensor, levels: int, gen: Generator | None) -> list[bytes]:
    """Payloads of the scales then the codes q + levels of ``y`` (x / scale * levels, in
    [-levels, levels]) stochastically rounded, packed."""
    q = stochastic_round(y, levels, gen)
    return join_rows(scale.numpy(), pack_bits(q.add_(levels), code_bits(levels)))


def dequantized(name: str, payloads: list[bytes], d: int, levels: int, scales: int,
                spread: Callable[[Tensor], Tensor]) -> Tensor:
    """Rows from ``quantized`` payloads with ``scales`` fp32 scales a row; ``spread`` maps the
    steps [n, scales] to the coordinates [n, d]."""
    bits = code_bits(levels)
    scale, codes = split_rows(name, payloads, [4 * scales, packed_size(d, bits)])
    q = unpack_bits(codes, d, bits).float().sub_(levels)
    return q.mul_(spread(as_tensor(scale, F32) / levels))


@register("qsgd", "QSGD: stochastic rounding of x/||x||_2 to s levels per bucket; unbiased, packed codes")
def qsgd(levels: int = 7, bucket: int | None = 512) -> Compressor:
    """QSGD (Alistarh et al. 2017), dense fixed-width variant: |x_i| / ||x||_2 is rounded
    at random to one of ``levels`` steps, sign kept. Signed rounding of x_i/||x|| * s
    to integers is the same distribution, so a code holds q + s in ceil(log2(2s+1)) bits
    (levels=7: 4 bits). As in the paper's experiments the norm is taken per bucket of
    ``bucket`` coordinates (None: the whole row), which keeps the variance bounded for
    large d. Elias coding of the paper's sparse regime is not done."""
    return grid("qsgd", levels, 2.0, bucket)


def clipped_to_std(X: Tensor, c: float) -> Tensor:
    """Each row clipped to [-c sigma, c sigma], sigma its standard deviation; a constant row
    (sigma = 0) stays as it is rather than collapse to 0."""
    bound = c * X.std(dim=1, correction=0, keepdim=True)
    bound = torch.where(bound > 0, bound, torch.full_like(bound, math.inf))
    return torch.minimum(torch.maximum(X, -bound), bound)


@register("terngrad", "TernGrad per layer: clip at c = 2.5 std, then {-1, 0, 1} * max|x| at random; 2 bits a "
                      "coordinate + 4 bytes a layer")
def terngrad(clip: float | None = 2.5, *, shapes: Shapes | None = None) -> Compressor:
    """TernGrad (Wen et al. 2017), layer by layer as in the paper: each layer's gradient is
    clipped to c standard deviations of that layer (c = 2.5, the authors' clip_factor; None: no
    clipping), then s = max|x| of the layer and x_i -> s * sign(x_i) * Bernoulli(|x_i| / s),
    i.e. stochastic rounding of x / s to {-1, 0, 1}. Unbiased for the clipped gradient, so
    biased for the input unless clip is None. Without the model's layer shapes the row is one layer."""
    if clip is not None and not clip > 0:
        raise ValueError(f"terngrad: clip is in standard deviations, > 0 (or None for no clipping); got {clip!r}")

    def spread(d: int) -> Callable[[Tensor], Tensor]:
        sizes = torch.tensor(layer_sizes("terngrad", shapes, d))
        return lambda per_layer: per_layer.repeat_interleave(sizes.to(per_layer.device), dim=1)

    def encode(X: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
        X = check_rows("terngrad", X)
        layers = X.split(layer_sizes("terngrad", shapes, X.shape[1]), dim=1)
        if clip is not None:
            layers = [clipped_to_std(layer, clip) for layer in layers]
        scale = header("terngrad", torch.stack([norms(layer, math.inf) for layer in layers], dim=1))
        return quantized(scale, torch.cat(layers, dim=1) / spread(X.shape[1])(nonzero(scale)), 1, gen), state

    def decode(payloads: list[bytes], d: int, seeds: Tensor | None) -> Tensor:
        return dequantized("terngrad", payloads, d, 1, len(layer_sizes("terngrad", shapes, d)), spread(d))

    return Compressor("terngrad", encode, decode, unbiased=clip is None)


@register("sr8", "stochastic rounding to 8 bits, per-row max|x| scale; unbiased")
def sr8() -> Compressor:
    """Stochastic rounding to 8 bits with a per-row max|x| scale; unbiased."""
    return grid("sr8", 127, math.inf)


@register("sr4", "stochastic rounding to 4 bits, per-row max|x| scale; unbiased")
def sr4() -> Compressor:
    """Stochastic rounding to 4 bits with a per-row max|x| scale; unbiased."""
    return grid("sr4", 7, math.inf)


# --- sign ------------------------------------------------------------------------


@register("sign", "scaled sign (EF-signSGD): ||x||_1/d * sign(x), 1 bit a coordinate + 4 bytes")
def sign() -> Compressor:
    """Scaled sign (Karimireddy et al. 2019, EF-signSGD): C(x) = ||x||_1 / d * sign(x),
    the scale making it a contraction so error feedback converges. Zero maps to +."""

    def encode(X: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
        X = check_rows("sign", X)
        scale = header("sign", norms(X, 1.0) / X.shape[1])
        return join_rows(scale.numpy(), np.packbits((X >= 0).numpy(), axis=1)), state

    def decode(payloads: list[bytes], d: int, seeds: Tensor | None) -> Tensor:
        scale, bits = split_rows("sign", payloads, [4, packed_size(d, 1)])
        scale = as_tensor(scale, F32)
        return torch.from_numpy(np.unpackbits(bits, axis=1, count=d)).float().mul_(2 * scale).sub_(scale)

    return Compressor("sign", encode, decode, unbiased=False)


def majority_vote(sign_rows: Tensor) -> Tensor:
    """signSGD with majority vote (Bernstein et al. 2018): the server's update is the
    sign of the clients' summed signs, ``[n, d] -> [d]``; ties give 0."""
    return torch.sign(torch.sign(sign_rows).sum(0))
