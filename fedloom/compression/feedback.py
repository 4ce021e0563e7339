"""Error feedback: wrappers that make biased compressors converge, with explicit state.

Each wrapper takes any ``Compressor`` and returns one, so it registers, encodes and
counts bytes like the rest. Its per-client memories live in the state dict next to
the inner compressor's (keys ``"ef.error"``, ``"ef21.g"``, ``"econtrol.e"``,
``"econtrol.h"``); the caller keeps row i in client i's store. Deep Gradient
Compression is here too: top-k with its own momentum-corrected accumulation.

Server side of EF21 and EControl: their messages are increments of an estimate both
ends keep (g_i, h_i). A server that mirrors it per client gets each row as
``rebuild(messages, state_before)``; one that keeps only the sum G = sum_i g_i over
all clients updates it with ``accumulate(G, messages)`` and uses G / N as the mean.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Generator, Tensor

from fedloom.compression.base import FEEDBACK, Compressor, State, check_rows, register
from fedloom.compression.codecs import coordinates, largest, sparse_decode, sparse_payloads


def _zeros(inner: Compressor, *keys: str):
    """``init`` for a wrapper: the inner state plus zero [n, d] memories under ``keys``."""

    def init(n: int, d: int, gen: Generator | None) -> State:
        return {**inner.init(n, d, gen), **{k: torch.zeros(n, d) for k in keys}}

    return init


def _send(inner: Compressor, V: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
    """Encode ``V`` with the inner compressor and decode it as the server will."""
    payloads, state = inner.encode(V, state, gen, seeds)
    return payloads, inner.decode(payloads, V.shape[1], seeds), state


@register("ef", "classic error feedback: compress e + x, keep e <- (e + x) - decoded", FEEDBACK)
def ef(inner: Compressor) -> Compressor:
    """Error feedback (Stich et al. 2018; Karimireddy et al. 2019): what compression
    dropped is added to the next round's input, so the decoded rows summed over rounds
    equal the inputs summed, up to one bounded memory e."""
    name = f"ef({inner.name})"

    def encode(X: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
        V = check_rows(name, X) + state["ef.error"]
        payloads, sent, state = _send(inner, V, state, gen, seeds)
        return payloads, {**state, "ef.error": V - sent}

    return Compressor(name, encode, inner.decode, unbiased=False, init=_zeros(inner, "ef.error"))


@register("ef21", "EF21: send C(x - g), both ends g <- g + decoded; the server's row is g", FEEDBACK)
def ef21(inner: Compressor) -> Compressor:
    """EF21 (Richtárik, Sokolov, Fatkhullin 2021): client i keeps g_i, sends
    c_i = C(x_i - g_i) and sets g_i <- g_i + c_i; the server's estimate of row i is the
    same g_i. A contractive C makes g_i track x_i without EF's bounded-gradient
    assumptions. g starts at 0, so the first round sends C(x)."""
    name = f"ef21({inner.name})"

    def encode(X: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
        g = state["ef21.g"]
        payloads, c, state = _send(inner, check_rows(name, X) - g, state, gen, seeds)
        return payloads, {**state, "ef21.g": g + c}

    return Compressor(
        name,
        encode,
        inner.decode,
        unbiased=False,
        init=_zeros(inner, "ef21.g"),
        rebuild=lambda c, state: state["ef21.g"] + c,
    )


@register("econtrol", "EControl: send C(eta e + x - h), e <- e + x - h - decoded, h <- h + decoded; h starts at 0 "
                      "(paper: the first gradient, uncompressed)", FEEDBACK)
def econtrol(inner: Compressor, eta: float = 0.01) -> Compressor:
    """EControl (Gao, Islamov, Stich 2024): client i keeps an error e_i and an estimate
    h_i, sends D_i = C(eta * e_i + x_i - h_i), then e_i <- e_i + x_i - h_i - D_i and
    h_i <- h_i + D_i; the server's row is the new h_i. One message both corrects the
    estimate (EF21's role) and feeds back the error, ``eta`` controlling how strongly;
    eta = 0 is EF21. Keep eta small against the compressor's contraction delta (top-k:
    delta ~ k/d): the theory takes eta = delta / 400 and the paper's experiments tune it;
    with top-k on noise we saw the error diverge past eta ~ 4-10 delta.
    One deliberate difference: the paper starts from h_i = g_i^0, one uncompressed
    message per client; here h_i starts at 0, so every message is compressed (the first
    is C(x_i)) and its payload is the inner compressor's, as for EF and EF21."""
    name = f"econtrol({inner.name})"

    def encode(X: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
        e, h = state["econtrol.e"], state["econtrol.h"]
        gap = check_rows(name, X) - h
        payloads, D, state = _send(inner, eta * e + gap, state, gen, seeds)
        return payloads, {**state, "econtrol.e": e + gap - D, "econtrol.h": h + D}

    return Compressor(
        name,
        encode,
        inner.decode,
        unbiased=False,
        init=_zeros(inner, "econtrol.e", "econtrol.h"),
        rebuild=lambda D, state: state["econtrol.h"] + D,
    )


def accumulate(total: Tensor, messages: Tensor) -> Tensor:
    """EF21 / EControl server state kept as one sum: G <- G + sum_i decoded_i; G / N is
    the mean of the N clients' estimates, participants of this round or not."""
    return total + messages.sum(0)


def warmup_density(rounds: int, density: float, warmup_rounds: int) -> float:
    """DGC's warm-up: density 1/4, 1/16, 1/64, ... for the first ``warmup_rounds``
    rounds (sparsity 75%, 93.75%, 98.4%, ...), never below the final ``density``."""
    return max(density, 0.25 ** (rounds + 1)) if rounds < warmup_rounds else density


@register("dgc", "Deep Gradient Compression: momentum-corrected top-k with factor masking and warm-up")
def dgc(density: float = 0.001, momentum: float = 0.9, warmup_rounds: int = 0) -> Compressor:
    """Deep Gradient Compression (Lin et al. 2018). Momentum correction: the client
    accumulates velocity u <- m u + x into v <- v + u and sends top-k of v, so the sparse
    updates carry the momentum SGD would have applied (the server adds no momentum of
    its own). Momentum factor masking: sent coordinates are cleared from u and v.
    Warm-up: a per-client schedule from dense to ``density`` over its first
    ``warmup_rounds`` rounds; k is read off the payload length. Local gradient
    clipping belongs to the training loop."""
    if not isinstance(density, float) or not 0 < density <= 1:
        raise ValueError(f"dgc: density must be a fraction in (0, 1], got {density!r}")

    def sparsity(rounds: int) -> Callable[[int], int]:
        return coordinates("dgc", warmup_density(rounds, density, warmup_rounds))

    def init(n: int, d: int, gen: Generator | None) -> State:
        return {"dgc.u": torch.zeros(n, d), "dgc.v": torch.zeros(n, d), "dgc.rounds": torch.zeros(n, dtype=torch.long)}

    def encode(X: Tensor, state: State, gen: Generator | None, seeds: Tensor | None):
        u = momentum * state["dgc.u"] + check_rows("dgc", X)
        v = state["dgc.v"] + u
        ks = [sparsity(t)(X.shape[1]) for t in state["dgc.rounds"].tolist()]
        magnitude = v.abs()
        idx = largest(magnitude, max(ks))
        if len(set(ks)) > 1:  # rows keep their own k of the max(ks) candidates: largest first
            idx = idx.gather(1, magnitude.gather(1, idx).argsort(dim=1, descending=True))
        sent = torch.arange(idx.shape[1]) < torch.tensor(ks)[:, None]
        mask = torch.zeros_like(v, dtype=torch.bool).scatter_(1, idx, sent)
        payloads = sparse_payloads(v.gather(1, idx), idx, X.shape[1], ks)
        new = {"dgc.u": u.masked_fill(mask, 0), "dgc.v": v.masked_fill(mask, 0), "dgc.rounds": state["dgc.rounds"] + 1}
        return payloads, {**state, **new}

    def decode(payloads: list[bytes], d: int, seeds: Tensor | None) -> Tensor:
        return sparse_decode("dgc", payloads, d)

    return Compressor("dgc", encode, decode, unbiased=False, init=init)
