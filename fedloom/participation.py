"""Clients that take part on their own: each client i has a probability p_i, unknown to the server and
different across clients, and joins each round independently with it (the Bernoulli setting of Wang and
Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated Averaging", 2024).
Averaging only the participants then favours the frequent ones; FedAU (``pipeline/transforms.py``)
corrects for it.

The probabilities are a pure function of the config, the seed and the data (drawn once from
``Stream.PARTICIPATION``), so they are a constant part of the run, not state; who joins round r is drawn
from the same stream keyed by r.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedloom.core.rng import Stream, numpy_generator

if TYPE_CHECKING:
    from fedloom.data import FederatedData

DISTRIBUTIONS = ("classes", "uniform", "beta", "given")


def read_probabilities(path: str | Path) -> list[float]:
    """A file of probabilities, one a line (line i is client i; blank lines and ``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"participation.path: file not found: {path}")
    values = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            values.append(float(text))
        except ValueError:
            raise ValueError(f"{path}, line {number}: {text!r} is not a probability (one number a line)") from None
        if not 0 < values[-1] <= 1:
            raise ValueError(f"{path}, line {number}: {values[-1]:g} is not a probability in (0, 1]")
    return values


def given_probabilities(p: Any) -> list[float]:
    """participation.probabilities, or those of participation.path."""
    return list(p.probabilities) if p.probabilities else read_probabilities(p.path)


def client_probabilities(p: Any, data: FederatedData, seed: int) -> np.ndarray:
    """Every client's participation probability ``[n_clients]`` under the ``[participation]`` section ``p``
    (``classes`` reads each client's training labels)."""
    rng = numpy_generator(seed, Stream.PARTICIPATION)
    if p.distribution == "given":
        return np.asarray(given_probabilities(p), dtype=np.float64)
    if p.distribution == "uniform":
        return rng.uniform(p.p_min, p.p_max, size=data.n_clients)
    if p.distribution == "beta":
        return np.clip(rng.beta(p.alpha * p.mean, p.alpha * (1 - p.mean), size=data.n_clients), p.p_min, 1.0)
    histograms = np.stack([torch.bincount(data.y[idx], minlength=data.n_classes).numpy() for idx in data.train_idx])
    return _by_classes(p, histograms, rng)


def _by_classes(p: Any, histograms: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The paper's setup: a class weight vector v ~ Dirichlet(alpha) is drawn once and a client's p_i is
    mean * n_classes * <its label shares, v>, at least p_min (and at most 1): how often a client takes
    part depends on the classes it holds, so the participants' average is biased towards some classes."""
    shares = histograms / np.maximum(histograms.sum(axis=1, keepdims=True), 1)
    v = rng.dirichlet(np.full(histograms.shape[1], p.alpha))
    return np.clip(p.mean * histograms.shape[1] * (shares @ v), p.p_min, 1.0)


def bernoulli_participants(probabilities: np.ndarray, seed: int, round_idx: int) -> list[int]:
    """The clients that take part in round ``round_idx``: client i with probability p_i, independently."""
    u = numpy_generator(seed, Stream.PARTICIPATION, round_idx).random(len(probabilities))
    return np.flatnonzero(u < probabilities).tolist()
