"""Partitioners: how a dataset's examples are dealt out to simulated clients.

Each is a pure numpy function ``(labels, n_clients, rng, **options)`` returning one
sorted int64 index array per client, with every example assigned exactly once.
They model the kinds of heterogeneity the FL literature studies: none (iid),
label skew (dirichlet, shards), quantity skew, and real clients (natural); and the
partitioners of Flower Datasets (flwr_datasets.partitioner) under their own rules:
dirichlet_classwise, pathological, inner_dirichlet, linear, square, exponential.
"""

from __future__ import annotations

from typing import Any, Callable

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
            f"natural: the data has {len(ids)} natural clients but data.n_clients = {n_clients}; "
            f"set data.n_clients = {len(ids)}, or leave it out to use the data's clients"
        )
    order = np.argsort(inverse, kind="stable")
    return _finish(np.split(order, np.cumsum(np.bincount(inverse))[:-1]))


# --- Flower Datasets' partitioners (flwr_datasets.partitioner), under Flower's rules ---


def _by_owner(owner: np.ndarray, n_clients: int) -> list[np.ndarray]:
    """Client i's examples are those with owner == i."""
    order = np.argsort(owner, kind="stable")
    return _finish(np.split(order, np.cumsum(np.bincount(owner, minlength=n_clients))[:-1]))


def _alphas(name: str, alpha: float | list[float], length: int, per: str) -> np.ndarray:
    """Dirichlet concentrations: one value for all, or one per ``per`` (Flower takes both), all > 0."""
    vector = np.asarray(alpha, dtype=float)
    if vector.ndim == 0:
        vector = np.full(length, float(vector))
    elif vector.shape != (length,):
        raise DataError(f"{name}: alpha as a list needs one value per {per} ({length}), got {vector.size}")
    if not np.all(vector > 0):
        raise DataError(f"{name}: alpha must be > 0, got {alpha}")
    return vector


def dirichlet_classwise(
    labels: np.ndarray,
    n_clients: int,
    rng: np.random.Generator,
    alpha: float | list[float] = 0.5,
    min_size: int = 10,
    self_balancing: bool = False,
    max_tries: int = 10,
) -> list[np.ndarray]:
    """Label and size skew as Flower's DirichletPartitioner (Yurochkin et al. 2019): each class is
    cut over the clients in proportions p ~ Dir(alpha), so clients differ in size as well as mix.

    alpha is one value or one per client. With ``self_balancing`` a client already holding more
    than the average number of examples gets none of the classes still to come. A draw leaving a
    client with fewer than ``min_size`` examples is redrawn, up to ``max_tries`` times after the
    first (Flower's 10), then it is an error.
    """
    if min_size < 1:
        raise DataError(f"dirichlet_classwise: min_size must be at least 1, got {min_size}")
    if max_tries < 0:
        raise DataError(f"dirichlet_classwise: max_tries must be >= 0, got {max_tries}")
    _check_clients(labels, n_clients, min_size)
    alphas = _alphas("dirichlet_classwise", alpha, n_clients, "client")
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]  # dataset order, as Flower cuts
    for _ in range(max_tries + 1):
        owner = _cut_classes(members, len(labels), alphas, self_balancing, rng)
        if np.bincount(owner, minlength=n_clients).min() >= min_size:
            return _by_owner(owner, n_clients)
    raise DataError(
        f"dirichlet_classwise: some client got fewer than min_size={min_size} examples in all {max_tries + 1} "
        f"draws; raise alpha or max_tries, lower min_size, or use fewer clients"
    )


def _cut_classes(members: list[np.ndarray], n_examples: int, alphas: np.ndarray, self_balancing: bool,
                 rng: np.random.Generator) -> np.ndarray:
    """One draw of dirichlet_classwise: the client owning each example."""
    owner = np.empty(n_examples, np.int64)
    held = np.zeros(len(alphas), np.int64)
    average = n_examples / len(alphas)
    for idx in members:
        p = rng.dirichlet(alphas)
        if self_balancing:
            open_ = np.where(held > average, 0.0, p)  # Flower: strictly above the average
            p = open_ / open_.sum() if open_.sum() > 0 else p  # all open ones drew 0: Flower divides by 0
        # floored cut points, as Flower's; over the float sum (it may end below 1), so that trailing
        # clients with p = 0 (stopped by self_balancing) get nothing, not the last example
        cumulative = np.cumsum(p)
        cuts = (cumulative / cumulative[-1] * len(idx)).astype(np.int64)[:-1]
        counts = np.diff(np.concatenate([[0], cuts, [len(idx)]]))
        owner[idx] = np.repeat(np.arange(len(alphas)), counts)
        held += counts
    return owner


CLASS_ASSIGNMENTS = ("random", "deterministic", "first-deterministic")


def pathological(
    labels: np.ndarray,
    n_clients: int,
    rng: np.random.Generator,
    classes_per_client: int = 2,
    class_assignment: str = "random",
) -> list[np.ndarray]:
    """Exactly ``classes_per_client`` classes per client, as Flower's PathologicalPartitioner
    (Li et al. 2022): each client's classes are chosen, then each class's examples are split
    evenly (array_split, dataset order) among the clients holding it, in client order.

    class_assignment (classes in sorted order, K of them): "random", k distinct classes at random;
    "deterministic", client i holds classes (i + j) mod K for j < k; "first-deterministic", class
    i mod K and k - 1 others at random. Flower drops the examples of a class no client holds; here
    every example must go to a client, so that is an error.
    """
    if class_assignment not in CLASS_ASSIGNMENTS:
        raise DataError(f"pathological: class_assignment must be one of {', '.join(CLASS_ASSIGNMENTS)}, "
                        f"got {class_assignment!r}")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if not 1 <= classes_per_client <= len(classes):
        raise DataError(f"pathological: classes_per_client must be between 1 and the number of classes "
                        f"({len(classes)}), got {classes_per_client}")
    _check_clients(labels, n_clients)
    held = _assign_classes(n_clients, len(classes), classes_per_client, class_assignment, rng)
    holders = held.sum(axis=0)
    if np.any(holders == 0):
        raise DataError(f"pathological: no client holds class(es) {classes[holders == 0].tolist()} "
                        f"(Flower would drop their examples); use more clients, a larger classes_per_client "
                        f"or class_assignment='deterministic'")
    if np.any(holders > counts):
        c = int(np.argmax(holders > counts))
        raise DataError(f"pathological: class {classes[c]} is held by {holders[c]} clients but has only "
                        f"{counts[c]} examples; use fewer clients or a smaller classes_per_client")
    owner = np.empty(len(labels), np.int64)
    for c in range(len(classes)):
        clients = np.flatnonzero(held[:, c])
        share = counts[c] // len(clients) + (np.arange(len(clients)) < counts[c] % len(clients))  # array_split
        owner[inverse == c] = np.repeat(clients, share)
    return _by_owner(owner, n_clients)


def _assign_classes(n_clients: int, n_classes: int, k: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """held[i, c]: client i holds class c, under pathological's class_assignment ``mode``."""
    held = np.zeros((n_clients, n_classes), bool)
    if mode == "deterministic":
        held[np.arange(n_clients)[:, None], (np.arange(n_clients)[:, None] + np.arange(k)) % n_classes] = True
        return held
    for i in range(n_clients):
        if mode == "random":
            held[i, rng.choice(n_classes, size=k, replace=False)] = True
        else:  # first-deterministic; Flower redraws until k distinct, i.e. k - 1 of the others uniformly
            first = i % n_classes
            held[i, first] = True
            held[i, rng.choice(np.delete(np.arange(n_classes), first), size=k - 1, replace=False)] = True
    return held


def inner_dirichlet(
    labels: np.ndarray,
    n_clients: int,
    rng: np.random.Generator,
    alpha: float | list[float] = 0.5,
    sizes: list[int] | None = None,
) -> list[np.ndarray]:
    """Label skew at given client sizes, as Flower's InnerDirichletPartitioner (Acar et al. 2021).

    Client k draws class proportions q_k ~ Dir(alpha) (alpha: one value, or one per class). Then,
    one example at a time, a client not yet full is picked uniformly and a class from its q_k; a
    class that runs out is dropped from every q_k (renormalized), and the t-th example taken from a
    class is its t-th last, all as Flower does. ``sizes`` (one per client, summing to the number of
    examples) default to equal sizes as in iid; Flower requires them.
    """
    _check_clients(labels, n_clients)
    sizes_ = _check_sizes("inner_dirichlet", sizes, n_clients, len(labels))
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    priors = rng.dirichlet(_alphas("inner_dirichlet", alpha, len(classes), "class"), size=n_clients)
    steps = _fill_order(sizes_, rng)  # the client of each draw, in draw order
    drawn = _classes_until_exhausted(steps, priors, counts, rng)  # and its class
    pool = np.lexsort((-np.arange(len(labels)), inverse))  # by class, each from its last example back
    example = np.empty(len(labels), np.int64)
    example[np.argsort(drawn, kind="stable")] = pool  # a class's draws in order take its pool in order
    owner = np.empty(len(labels), np.int64)
    owner[example] = steps
    return _by_owner(owner, n_clients)


def _check_sizes(name: str, sizes: list[int] | None, n_clients: int, n_examples: int) -> np.ndarray:
    """Client sizes as given, one per client, each >= 1, summing to ``n_examples``; equal if None."""
    if sizes is None:
        return n_examples // n_clients + (np.arange(n_clients) < n_examples % n_clients)
    sizes_ = np.asarray(sizes, dtype=np.int64)
    if sizes_.shape != (n_clients,):
        raise DataError(f"{name}: sizes needs one size per client ({n_clients}), got {sizes_.size}")
    if sizes_.min() < 1:
        raise DataError(f"{name}: sizes must all be at least 1, got {sizes_.min()}")
    if sizes_.sum() != n_examples:
        raise DataError(f"{name}: sizes must sum to the number of examples ({n_examples}), got {sizes_.sum()}")
    return sizes_


def _prefix_until_quota(values: np.ndarray, quota: np.ndarray) -> int:
    """Length of the prefix of ``values`` that ends where some value first occurs quota[value]
    times (the whole array if none does): the draws valid before the state changes."""
    order = np.argsort(values, kind="stable")
    counts = np.bincount(values, minlength=len(quota))
    reached = np.flatnonzero((counts >= quota) & (quota > 0))
    if reached.size == 0:
        return len(values)
    starts = np.cumsum(counts) - counts
    return int(order[starts[reached] + quota[reached] - 1].min()) + 1


def _fill_order(sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The client of each of sum(sizes) draws, each draw uniform over the clients not yet full.

    Between two clients filling up, the draws are iid uniform over a fixed set, so they come in
    vectorized chunks cut where a client fills.
    """
    left, order = sizes.astype(np.int64), []
    while (active := np.flatnonzero(left > 0)).size:
        picks = active[rng.integers(active.size, size=active.size * left[active].min())]
        picks = picks[:_prefix_until_quota(picks, left)]
        left -= np.bincount(picks, minlength=len(left))
        order.append(picks)
    return np.concatenate(order)


def _classes_until_exhausted(steps: np.ndarray, priors: np.ndarray, counts: np.ndarray,
                             rng: np.random.Generator) -> np.ndarray:
    """The class of each draw: from priors[client] over the classes not yet run out.

    All draws are made at once; where a class runs out, the later draws of it are redrawn from
    the classes left (a draw of another class is already one from the renormalized q).
    """
    drawn = _draw_rows(priors, steps, rng)
    left, start = counts.astype(np.int64), 0
    while start < len(steps):
        end = start + _prefix_until_quota(drawn[start:], left)
        left -= np.bincount(drawn[start:end], minlength=len(left))
        start = end
        redo = start + np.flatnonzero(left[drawn[start:]] == 0)
        if redo.size:
            q = priors * (left > 0)
            q[q.sum(axis=1) == 0] = left > 0  # all of a client's classes ran out: Flower divides by 0
            drawn[redo] = _draw_rows(q, steps[redo], rng)
    return drawn


def _draw_rows(probs: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One category per entry of ``rows``, from the unnormalized probabilities probs[row]; a
    zero-probability category is never drawn (its cdf step is empty)."""
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    u = rng.random(len(rows))
    out = np.empty(len(rows), np.int64)
    order = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[order], np.arange(len(probs) + 1))
    for r in np.flatnonzero(np.diff(bounds)):
        at = order[bounds[r]:bounds[r + 1]]
        out[at] = np.searchsorted(cdf[r], u[at], side="right")
    return out


def _id_sizes(name: str, units_of: Callable[[np.ndarray], np.ndarray], n_clients: int, n_examples: int) -> np.ndarray:
    """Flower's IdToSizeFncPartitioner sizes: client i (ids 1..n) gets floor(N f(i) / sum f),
    the last (largest) client also the examples the flooring left over."""
    with np.errstate(over="ignore", invalid="ignore"):
        units = units_of(np.arange(1, n_clients + 1, dtype=float))
        share = units / units.sum() * n_examples
    if not np.all(np.isfinite(share)) or share[0] < 1:
        raise DataError(f"{name}: with {n_clients} clients the smallest would get no example of {n_examples}; "
                        f"use fewer clients")
    sizes = share.astype(np.int64)
    sizes[-1] += n_examples - sizes.sum()
    return sizes


def _sized(name: str, units_of: Callable[[np.ndarray], np.ndarray], labels: np.ndarray, n_clients: int,
           rng: np.random.Generator) -> list[np.ndarray]:
    """Sizes by ``_id_sizes``, examples dealt at random (Flower takes consecutive rows)."""
    _check_clients(labels, n_clients)
    sizes = _id_sizes(name, units_of, n_clients, len(labels))
    return _finish(np.split(rng.permutation(len(labels)), np.cumsum(sizes)[:-1]))


def linear_sizes(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Flower's LinearPartitioner: client i of 1..n gets a share proportional to i; labels iid."""
    return _sized("linear", lambda i: i, labels, n_clients, rng)


def square_sizes(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Flower's SquarePartitioner: client i of 1..n gets a share proportional to i**2; labels iid."""
    return _sized("square", np.square, labels, n_clients, rng)


def exponential_sizes(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Flower's ExponentialPartitioner: client i of 1..n gets a share proportional to e**i; labels iid."""
    return _sized("exponential", np.exp, labels, n_clients, rng)


# partitioners that need class labels; the others use only the number of examples (and natural its client ids)
NEEDS_LABELS = frozenset({"dirichlet", "shards", "dirichlet_classwise", "pathological", "inner_dirichlet"})


# partitioners; their keyword arguments past the fixed ones are the options (partition.options)
PARTITIONERS = Registry("partitioner", {
    "iid": (iid, "uniformly random, equal-sized clients"),
    "dirichlet": (dirichlet, "label skew: client class mix q ~ Dir(alpha p), Hsu et al. 2019 (option alpha)"),
    "shards": (shards, "label skew of McMahan et al.: label-sorted shards per client (option classes_per_client)"),
    "quantity": (quantity_skew, "power-law client sizes, iid labels (options power, min_size)"),
    "natural": (natural, "one client per natural client id in the data (synthetic, npz 'client', csv client column)"),
    "dirichlet_classwise": (dirichlet_classwise, "label and size skew: each class cut over clients by Dir(alpha), "
                            "Flower's DirichletPartitioner (options alpha, min_size, self_balancing, max_tries)"),
    "pathological": (pathological, "exactly k classes per client, Flower's PathologicalPartitioner "
                     "(options classes_per_client, class_assignment: random | deterministic | first-deterministic)"),
    "inner_dirichlet": (inner_dirichlet, "label skew at given sizes: client class mix Dir(alpha), "
                        "Flower's InnerDirichletPartitioner (options alpha, sizes)"),
    "linear": (linear_sizes, "client sizes proportional to id 1..n, iid labels, Flower's LinearPartitioner"),
    "square": (square_sizes, "client sizes proportional to id**2, iid labels, Flower's SquarePartitioner"),
    "exponential": (exponential_sizes, "client sizes proportional to e**id, iid labels, "
                    "Flower's ExponentialPartitioner"),
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
