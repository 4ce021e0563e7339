"""Byzantine attacks: pure functions that replace the Byzantine rows of the update matrix.

Every attack takes ``(U [n, d], byz [n] bool, generator, **options)``, where U holds what
every client computed honestly, and returns a new matrix in which only the rows marked in
``byz`` differ. With ``omniscient=True`` the attackers read the honest rows; otherwise they
know only their own honestly computed rows (Baruch et al. 2019's non-omniscient setting).
Label flipping poisons data instead: ``flip_labels`` is applied in local training.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist
from typing import Callable

import torch
from torch import Tensor

from fedloom.core.rng import Stream, torch_generator
from fedloom.registry import Registry


def _byzantine_rows(rows: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Turn ``rows(U, byz, generator, **options) -> [f, d] or [d]`` into an attack on the whole matrix."""

    @functools.wraps(rows)
    def attack(U: Tensor, byz: Tensor, generator: torch.Generator | None = None, **options) -> Tensor:
        out = U.clone()
        if byz.any():
            out[byz] = rows(U, byz, generator, **options).to(U.dtype)
        return out

    return attack


def _visible(U: Tensor, byz: Tensor, omniscient: bool) -> Tensor:
    """The rows the attackers read: the honest ones if omniscient, else their own."""
    seen = U[~byz] if omniscient else U[byz]
    if seen.shape[0] == 0:
        raise ValueError("an omniscient attack needs at least one honest client; every row is Byzantine")
    return seen


def _own_or_mean(U: Tensor, byz: Tensor, omniscient: bool) -> Tensor:
    """What a per-row attack starts from: each attacker's own row, or the honest mean if omniscient."""
    return _visible(U, byz, True).mean(dim=0) if omniscient else U[byz]


@_byzantine_rows
def signflip(U: Tensor, byz: Tensor, generator, scale: float = 1.0, omniscient: bool = False) -> Tensor:
    """Send -scale times the honest update: the mean is pulled backwards."""
    return -scale * _own_or_mean(U, byz, omniscient)


@_byzantine_rows
def gaussian(U: Tensor, byz: Tensor, generator, std: float = 1.0, omniscient: bool = False) -> Tensor:
    """Add N(0, std^2) noise to the honest update; a large std is the classic random-vector attack."""
    base = _own_or_mean(U, byz, omniscient)
    noise = torch.randn((int(byz.sum()), U.shape[1]), generator=generator, dtype=U.dtype, device=U.device)
    return base + std * noise


@_byzantine_rows
def scaling(U: Tensor, byz: Tensor, generator, factor: float | None = None, omniscient: bool = False) -> Tensor:
    """Model replacement (Bagdasaryan et al. 2020): boost the update by factor (default n, so that
    with server learning rate 1 the plain mean takes the attacker's update whole)."""
    return (len(byz) if factor is None else factor) * _own_or_mean(U, byz, omniscient)


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019, Algorithm 3: the attackers need s = floor(n/2 + 1) - f honest
    supporters, so z = Phi^-1((n - s) / n), the largest shift (in honest standard deviations)
    beyond which, for normal honest values, at least s of them still lie."""
    s = math.floor(n / 2 + 1) - f
    if s <= 0:
        raise ValueError(f"alie: z is undefined for f={f} of n={n} (f >= n/2 + 1); pass z explicitly")
    return NormalDist().inv_cdf((n - s) / n)


@_byzantine_rows
def alie(U: Tensor, byz: Tensor, generator, z: float | None = None, omniscient: bool = False) -> Tensor:
    """A Little Is Enough (Baruch et al. 2019): every attacker sends mean - z * std, coordinate-wise,
    a shift small enough to pass median- and distance-based defences. Unless given, z is
    ``alie_z(n, f)``, Baruch et al.'s Algorithm 3 formula with n the round's clients and f the
    round's attackers, so z follows each round's participation rather than being fixed once."""
    seen = _visible(U, byz, omniscient)
    std, mean = torch.std_mean(seen, dim=0, correction=1 if seen.shape[0] > 1 else 0)
    return mean - (alie_z(len(byz), int(byz.sum())) if z is None else z) * std


@_byzantine_rows
def ipm(U: Tensor, byz: Tensor, generator, epsilon: float = 0.1, omniscient: bool = False) -> Tensor:
    """Inner Product Manipulation (Xie, Koyejo, Gupta 2020): send -epsilon times the honest mean,
    so the aggregate's inner product with the true gradient turns negative."""
    return -epsilon * _visible(U, byz, omniscient).mean(dim=0)


def flip_labels(y: Tensor, n_classes: int) -> Tensor:
    """Label flipping (data poisoning): class c becomes n_classes - 1 - c."""
    return n_classes - 1 - y


def sample_byzantine(n: int, f: int, generator: torch.Generator | None = None) -> Tensor:
    """Mask of exactly f Byzantine clients out of n, uniformly at random; draw once for fixed
    attackers or every round for attackers that move."""
    if not 0 <= f <= n:
        raise ValueError(f"need 0 <= f <= n Byzantine clients; got f={f}, n={n}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:f]] = True
    return mask


# attacks on the rows; their keyword arguments past the fixed ones are the options (attack.options)
ATTACKS = Registry("attack", {
    "signflip": (signflip, "send -scale x the honest update"),
    "gaussian": (gaussian, "add N(0, std^2) noise to the honest update"),
    "scaling": (scaling, "boost the update by factor (model replacement)"),
    "alie": (alie, "mean - z * std of the visible updates (A Little Is Enough); z from Baruch et al.'s formula "
                   "with n and the number of attackers unless given"),
    "ipm": (ipm, "-epsilon x the mean of the visible updates (Inner Product Manipulation)"),
}, fixed=("U", "byz", "generator", "omniscient"))

# data poisoning: goes through local training instead of replacing rows
DATA_ATTACKS = Registry("attack", {
    "label_flip": (flip_labels, "class c becomes n_classes - 1 - c in the Byzantine clients' training data"),
}, fixed=("y", "n_classes"))
ATTACK_NAMES = [*ATTACKS, *DATA_ATTACKS]


def attack_registry(name: str) -> Registry:
    """The registry an attack name belongs to: row attacks or data poisoning."""
    return DATA_ATTACKS if name in DATA_ATTACKS else ATTACKS


class Adversary:
    """The Byzantine clients of a run and what they send.

    A fixed set is drawn once from the run's attack stream (``redraw`` draws a new set
    every round); a round's Byzantine rows are the sampled clients that are in the set.
    """

    def __init__(self, name: str, n_clients: int, f: int, seed: int, redraw: bool = False,
                 omniscient: bool = False, options: dict | None = None):
        self.name, self.n_clients, self.f, self.seed = name, n_clients, f, seed
        self.redraw, self.omniscient, self.options = redraw, omniscient, dict(options or {})
        self.fixed = sample_byzantine(n_clients, f, torch_generator(seed, Stream.ATTACK))

    def byzantine(self, round_idx: int) -> Tensor:
        """Mask over all clients: who is Byzantine in this round."""
        if not self.redraw:
            return self.fixed
        return sample_byzantine(self.n_clients, self.f, torch_generator(self.seed, Stream.ATTACK, round_idx))

    def poison(self, y: Tensor, train_idx: list[Tensor], n_classes: int) -> None:
        """Data attacks: flip the labels of the Byzantine clients' training examples in place."""
        if self.name == "label_flip":
            for client in self.fixed.nonzero().flatten().tolist():
                y[train_idx[client]] = flip_labels(y[train_idx[client]], n_classes)

    def corrupt(self, U: Tensor, client_ids: list[int], round_idx: int) -> tuple[Tensor, Tensor]:
        """The rows the server receives, and the mask of the Byzantine ones among ``client_ids``."""
        byz = self.byzantine(round_idx)[torch.as_tensor(client_ids, dtype=torch.long)]
        if self.name not in ATTACKS or not byz.any():
            return U, byz
        # an omniscient attacker with no honest row to read falls back to its own rows
        omniscient = self.omniscient and bool((~byz).any())
        gen = torch_generator(self.seed, Stream.ATTACK, round_idx, 1)
        return ATTACKS[self.name][0](U, byz, gen, omniscient=omniscient, **self.options), byz
