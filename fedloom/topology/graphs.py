"""Communication graphs for decentralized learning, all on nodes ``0..n-1``.

Static graphs are plain ``nx.Graph`` objects built by the functions in
``TOPOLOGIES``; graphs that change every round are ``TimeVarying`` objects whose
``mixing_at(round)`` gives that round's gossip matrix. Random builders take a
``seed`` and are reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import networkx as nx
import numpy as np
from torch import Tensor

from fedloom.registry import Registry
from fedloom.topology.mixing import Weights, directed_average, metropolis_hastings


def _check_n(name: str, n: int, minimum: int) -> None:
    if n < minimum:
        raise ValueError(f"{name} needs at least {minimum} nodes, got n={n}")


def _connected_sample(
    name: str, sample: Callable[[random.Random], nx.Graph], seed: int, tries: int, hint: str
) -> nx.Graph:
    """Draw random graphs until one is connected: gossip on a disconnected one never agrees."""
    rng = random.Random(seed)
    for _ in range(tries):
        G = sample(rng)
        if nx.is_connected(G):
            return G
    raise ValueError(f"{name}: no connected graph in {tries} draws; {hint}")


def ring(n: int) -> nx.Graph:
    """Cycle: degree 2, the sparsest connected regular graph (slowest mixing)."""
    _check_n("ring", n, 3)
    return nx.cycle_graph(n)


def _torus_shape(n: int) -> tuple[int, int] | None:
    """The most square ``rows * cols = n`` with both >= 3 (fewer would merge neighbours)."""
    for rows in range(math.isqrt(n), 2, -1):
        if n % rows == 0 and n // rows >= 3:
            return rows, n // rows
    return None


def torus(n: int) -> nx.Graph:
    """2-D periodic grid, as square as ``n`` allows: degree 4."""
    shape = _torus_shape(n)
    if shape is None:
        nearby = [m for m in range(max(9, n - 3), n + 4) if _torus_shape(m)]  # multiples of 3 >= 9 all fit
        raise ValueError(f"torus needs n = rows * cols with rows, cols >= 3; n={n} is not (nearby: {nearby})")
    G = nx.grid_2d_graph(*shape, periodic=True)
    return nx.convert_node_labels_to_integers(G, ordering="sorted")


def complete(n: int) -> nx.Graph:
    """Everyone talks to everyone: one gossip step is exact averaging."""
    _check_n("complete", n, 1)
    return nx.complete_graph(n)


def star(n: int) -> nx.Graph:
    """Node 0 is a hub linked to all others: the server of federated learning as a graph."""
    _check_n("star", n, 2)
    return nx.star_graph(n - 1)


def erdos_renyi(n: int, p: float = 0.1, seed: int = 0, tries: int = 100) -> nx.Graph:
    """G(n, p) conditioned on being connected."""
    _check_n("erdos_renyi", n, 1)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"erdos_renyi: p must be in [0, 1], got {p}")
    hint = f"G(n, p) is connected with high probability only for p above ln(n)/n = {math.log(n) / n:.3g}"
    return _connected_sample("erdos_renyi", lambda rng: nx.gnp_random_graph(n, p, seed=rng), seed, tries, hint)


def regular(n: int, k: int = 4, seed: int = 0, tries: int = 100) -> nx.Graph:
    """Uniformly random connected k-regular graph: an expander for k >= 3."""
    if not 1 <= k < n or n * k % 2:
        raise ValueError(f"regular: need 1 <= k < n and n * k even, got n={n}, k={k}")
    hint = "use k >= 3 (random graphs with k <= 2 are unions of cycles or pairs)"
    return _connected_sample("regular", lambda rng: nx.random_regular_graph(k, n, seed=rng), seed, tries, hint)


def _exponential_offsets(n: int) -> list[int]:
    """Powers of two below ``n``: the hops of the exponential graph."""
    return [2**k for k in range((n - 1).bit_length())]


def exponential(n: int) -> nx.Graph:
    """Undirected exponential graph: node i linked both ways to i + 2^k mod n for every 2^k < n,
    so degree about 2 log2 n, and gossiped with the symmetric weight rules (Metropolis-Hastings by
    default); its spectral gap shrinks only like 1 / log2 n, against 1 / n^2 for the ring. Ying et
    al. (2021) define the directed graph of the same hops, ``exponential_directed``."""
    _check_n("exponential", n, 1)
    G = nx.empty_graph(n)
    G.add_edges_from((i, (i + hop) % n) for hop in _exponential_offsets(n) for i in range(n))
    return G


def small_world(n: int, k: int = 4, p: float = 0.1, seed: int = 0, tries: int = 100) -> nx.Graph:
    """Connected Watts-Strogatz graph: a k-neighbour ring with each edge rewired with probability p."""
    if k < 2 or k % 2 or k >= n:
        raise ValueError(f"small_world: k must be even with 2 <= k < n, got n={n}, k={k}")
    try:
        return nx.connected_watts_strogatz_graph(n, k, p, tries=tries, seed=seed)
    except nx.NetworkXError:
        raise ValueError(f"small_world(n={n}, k={k}, p={p}): no connected graph in {tries} draws; lower p") from None


@dataclass(frozen=True)
class TimeVarying:
    """A graph that changes every round. ``graph_at`` is a pure function of the round,
    so a resumed run, or any engine, sees the same sequence."""

    n: int
    graph_at: Callable[[int], nx.Graph]
    weights: Weights = metropolis_hastings

    def mixing_at(self, round: int) -> Tensor:
        """The mixing matrix of round ``round``'s graph."""
        return self.weights(self.graph_at(round))


def random_matching(n: int, seed: int = 0) -> TimeVarying:
    """A fresh uniformly random matching every round (perfect for even n, one node idle
    for odd n): each pair averages, W_ij = 1/2."""
    _check_n("random_matching", n, 2)

    def graph_at(round: int) -> nx.Graph:
        order = np.random.default_rng([seed, round]).permutation(n).tolist()
        G = nx.empty_graph(n)
        G.add_edges_from(zip(order[0::2], order[1::2]))
        return G

    return TimeVarying(n, graph_at)


def one_peer_exponential(n: int) -> TimeVarying:
    """Ying et al. (2021): at round t node i averages with node i + 2^(t mod tau),
    tau = ceil(log2 n). One peer per round, and for n a power of two any tau
    consecutive rounds average exactly."""
    _check_n("one_peer_exponential", n, 2)
    offsets = _exponential_offsets(n)

    def graph_at(round: int) -> nx.DiGraph:
        hop = offsets[round % len(offsets)]
        G = nx.empty_graph(n, create_using=nx.DiGraph)
        G.add_edges_from((i, (i + hop) % n) for i in range(n))
        return G

    return TimeVarying(n, graph_at, directed_average)


def exponential_directed(n: int) -> TimeVarying:
    """The static exponential graph of Ying et al. (2021): node i averages itself with the
    tau = ceil(log2 n) nodes i + 2^k mod n, k = 0..tau-1, each weight 1/(tau + 1), i.e.
    W_ij = 1/(tau + 1) when j - i mod n is 0 or a power of two. Row- and column-stochastic but not
    symmetric. The same W every round; it is a ``TimeVarying`` because those carry their own weight
    rule (``directed_average``), so, like them, it needs every node active."""
    _check_n("exponential_directed", n, 2)
    G = nx.empty_graph(n, create_using=nx.DiGraph)
    G.add_edges_from((i, (i + hop) % n) for hop in _exponential_offsets(n) for i in range(n))
    return TimeVarying(n, lambda round: G, directed_average)


# builders taking n and the topology's options (topology.options); the graphs that change every
# round (or carry their own weights) build TimeVarying objects
TOPOLOGIES = Registry("topology", {
    "ring": (ring, "cycle, degree 2; slowest mixing"),
    "torus": (torus, "2-D periodic grid, degree 4; n must be rows * cols with both >= 3"),
    "complete": (complete, "all pairs; one gossip step averages exactly"),
    "star": (star, "hub node 0 linked to all others"),
    "erdos_renyi": (erdos_renyi, "random G(n, p) conditioned on connectivity (p, seed)"),
    "regular": (regular, "random connected k-regular graph (k, seed)"),
    "exponential": (exponential, "undirected i <-> i + 2^k mod n, Metropolis-Hastings weights; degree ~2 log2 n"),
    "small_world": (small_world, "connected Watts-Strogatz ring with rewiring (k, p, seed)"),
    "random_matching": (random_matching, "a fresh random perfect matching each round (seed)"),
    "one_peer_exponential": (one_peer_exponential, "one peer i + 2^(t mod log2 n) per round; directed"),
    "exponential_directed": (exponential_directed, "Ying et al. 2021: i pulls from i + 2^k mod n, weights "
                             "1/(ceil(log2 n) + 1); directed, static"),
}, fixed=("n",))
TIME_VARYING = frozenset({"random_matching", "one_peer_exponential", "exponential_directed"})


def make_topology(name: str, n: int, **options: Any) -> nx.Graph | TimeVarying:
    """Build a registered topology, with errors that list what would be accepted."""
    return TOPOLOGIES.build(name, options, n)


def draw_graph(G: nx.Graph, path: str | Path, max_nodes: int = 100) -> Path:
    """Save a picture of a small graph (a larger drawing is an unreadable hairball)."""
    n = G.number_of_nodes()
    if n > max_nodes:
        raise ValueError(
            f"draw_graph draws at most {max_nodes} nodes, got {n}; look at the degree "
            "histogram or spectral_gap of a graph this size instead"
        )
    from matplotlib.figure import Figure  # deferred: plotting is optional and slow to import

    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.set_axis_off()
    nx.draw_networkx(G, nx.kamada_kawai_layout(G), ax=ax, node_size=120, font_size=7, with_labels=n <= 30)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return Path(path)
