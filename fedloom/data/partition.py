"""Partitioners: how a dataset's examples are dealt out to simulated clients.

Each is a pure numpy function ``(labels, n_clients, rng, **options)`` returning one
sorted int64 index array per client, with every example assigned exactly once.
They model the kinds of heterogeneity the FL literature studies: none (iid),
label skew (dirichlet, shards), quantity skew, and real clients (natural).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedloom.registry import Registry

from .datasets import DataError, build_checked



def _check_clients(labels: np.ndarray, n_clients: int, min_size: int = 1) -> None:
    """Every client must be able to get ``min_size`` examples."""
    if n_clients is None or n_clients < 1:
        raise DataError(f"n_clients must be a positive integer, got {n_clients}")
    if n_clients * min_size > len(labels):
        raise DataError(
            f"cannot give {n_clients} clients {min_size} example(s) each from {len(labels)} examples; use fewer clients"
        )


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random, (almost) equal-sized clients: the homogeneous baseline."""
    _check_clients(labels, n_clients)
    return _finish(np.array_split(rng.permutation(len(labels)), n_clients))


def dirichlet(labels: np.ndarray, n_clients: int, rng: np.random.Generator, alpha: float = 0.5) -> list[np.ndarray]:
    """Label skew as in Hsu et al. 2019: client k draws class proportions
    q_k ~ Dir(alpha * K * p), p the global class frequencies over K classes, and
    fills its share of the data class by class. With balanced classes that is
    Dir(alpha) on every class, the same label mix as the per-class Dir(alpha)
    split common in FL code, without its empty clients.

    Small alpha gives each client few classes, large alpha approaches iid.
    Clients get equal sizes (so no client is empty even with alpha = 0.01 and
    few examples a client); a class that runs out is replaced by the client's
    other classes in proportion to q_k, so every example is dealt exactly once.
    """
    if alpha <= 0:
        raise DataError(f"dirichlet: alpha must be > 0, got {alpha}")
    _check_clients(labels, n_clients)
    classes, counts = np.unique(labels, return_counts=True)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    remaining = counts.astype(np.int64)
    sizes = np.diff(np.linspace(0, len(labels), n_clients + 1).astype(np.int64))
    parts: list[np.ndarray] = [np.empty(0, np.int64)] * n_clients
    for client in rng.permutation(n_clients):
        q = rng.dirichlet(alpha * len(classes) * counts / counts.sum())
        take = _draw_by_class(q, remaining, sizes[client], rng)
        parts[client] = np.array([pools[c].pop() for c in np.repeat(np.arange(len(classes)), take)], np.int64)
        remaining -= take
    return _finish(parts)


def _draw_by_class(q: np.ndarray, remaining: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """How many examples of each class a client with proportions q takes, never
    more than a class has left; the shortfall goes to the classes still open."""
    take = np.zeros_like(remaining)
    while (short := size - take.sum()) > 0:
        open_ = remaining - take > 0
        weights = np.where(open_, q, 0.0)
        weights = weights / weights.sum() if weights.sum() > 0 else open_ / open_.sum()
        take += np.minimum(rng.multinomial(short, weights), remaining - take)
    return take


def shards(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, classes_per_client: int = 2
) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into n_clients * classes_per_client shards, deal them out.

    Each client then sees about ``classes_per_client`` classes (exactly that many
    at most when the shards align with class boundaries).
    """
    if classes_per_client < 1:
        raise DataError(f"shards: classes_per_client must be at least 1, got {classes_per_client}")
    _check_clients(labels, n_clients, classes_per_client)  # every shard needs an example
    n_shards = n_clients * classes_per_client
    shuffled = rng.permutation(len(labels))  # random order within each label
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, n_shards)
    order = rng.permutation(n_shards).reshape(n_clients, classes_per_client)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in order])


def quantity_skew(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, power: float = 1.5, min_size: int = 2
) -> list[np.ndarray]:
    """Unequal client sizes, labels iid within each client.

    Size shares are Pareto(power) draws (a heavier tail for smaller power), on top
    of ``min_size`` examples per client, like the long tail of real device data.
    """
    if power <= 0:
        raise DataError(f"quantity: power must be > 0, got {power}")
    _check_clients(labels, n_clients, min_size)
    weights = rng.pareto(power, n_clients) + 1.0
    sizes = min_size + rng.multinomial(len(labels) - n_clients * min_size, weights / weights.sum())
    return _finish(np.split(rng.permutation(len(labels)), np.cumsum(sizes)[:-1]))


def natural(
    labels: np.ndarray, n_clients: int | None, rng: np.random.Generator, groups: np.ndarray
) -> list[np.ndarray]:
    """One client per distinct group id (e.g. the writer or device that produced the data).

    Clients come in sorted id order; ``rng`` is unused since nothing is random.
    """
    if groups is None:
        raise DataError("natural: this data has no natural client ids")
    groups = np.asarray(groups)
    if len(groups) != len(labels):
        raise DataError(f"natural: {len(groups)} client ids for {len(labels)} examples")
    ids, inverse = np.unique(groups, return_inverse=True)
    if n_clients is not None and n_clients != len(ids):
        raise DataError(
            f"natural: the data has {len(ids)} natural clients but n_clients={n_clients}; "
            f"set n_clients to {len(ids)} (or leave it out)"
        )
    order = np.argsort(inverse, kind="stable")
    return _finish(np.split(order, np.cumsum(np.bincount(inverse))[:-1]))


# partitioners; their keyword arguments past the fixed ones are the options (partition.options)
PARTITIONERS = Registry("partitioner", {
    "iid": (iid, "uniformly random, equal-sized clients"),
    "dirichlet": (dirichlet, "label skew: client class mix q ~ Dir(alpha p), Hsu et al. 2019 (option alpha)"),
    "shards": (shards, "label skew of McMahan et al.: label-sorted shards per client (option classes_per_client)"),
    "quantity": (quantity_skew, "power-law client sizes, iid labels (options power, min_size)"),
    "natural": (natural, "one client per natural client id in the data (synthetic, npz 'client', csv client column)"),
}, fixed=("labels", "n_clients", "rng", "groups"))


def partition(
    name: str,
    labels: np.ndarray,
    n_clients: int | None,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
    **options: Any,
) -> list[np.ndarray]:
    """Run the partitioner called ``name``; ``groups`` is used by "natural" only."""
    labels = np.asarray(labels)
    if name == "natural":
        return build_checked(PARTITIONERS, name, options, labels, n_clients, rng, groups)
    return build_checked(PARTITIONERS, name, options, labels, n_clients, rng)
