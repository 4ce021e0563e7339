"""Decentralized algorithms: nodes train locally and average with neighbours.

The node parameters are stacked ``X [n, d]``; a round trains every active node
from its own row (the engines accept per-client starting points), giving the
local models ``Y = X - U``, and then mixes them with the gossip matrix W. The
client side follows the FedAvg protocol (``client_init``, ``correct_grad``,
``client_result``), so every engine runs these nodes unchanged.

- D-SGD (Lian et al. 2017; with local steps, Koloskova et al. 2020): X <- W Y.
- K-GT, gradient tracking with local steps (Liu, Lin, Koloskova, Stich 2023):
  every local gradient is corrected by c_i, the tracked difference between the
  neighbourhood's average update direction and the node's own. With
  delta_i = (x_i - y_i) / (K lr) (the node's corrected direction over its K
  steps), after gossip c_i <- c_i + (W delta)_i - delta_i. The c_i sum to zero,
  so the average model moves like D-SGD's while heterogeneity is cancelled.
- DIMAT (Saadati et al. 2024, ``dimat.py``): X <- W applied to the neighbours' models after aligning their
  hidden units to each node's own (``fedloom.merging``), every few rounds.
- CHOCO-SGD (Koloskova, Stich, Jaggi 2019, Algorithm 2): nodes keep public
  copies x_hat; each sends only q_i = C(y_i - x_hat_i), all copies move by q,
  and x_i <- y_i + gamma ((W X_hat)_i - x_hat_i).

What a node receives can differ from what its neighbour holds (a Byzantine node
sends a crafted model), so a gossip rule is ``rule(W, own, received)``: node i
weighs its own model by w_ii and the models its neighbours sent by w_ij.

- mean gossip: x_i <- w_ii x_i + sum_{j != i} w_ij z_j, i.e. ``W @ X`` when
  every node is honest.
- ClippedGossip (He, Karimireddy, Jaggi 2023, "Byzantine-robust decentralized
  learning via ClippedGossip"): x_i <- x_i + sum_{j != i} w_ij clip(z_j - x_i, tau_i),
  clip(v, tau) = v min(1, tau / ||v||). Self-centred: a neighbour moves node i by
  at most w_ij tau_i, however far its message lies. tau_i is fixed, or adaptive:
  the farthest neighbours that hold at least ``delta`` of node i's gossip weight
  (the share it must tolerate being Byzantine) are clipped to the distance of the
  next-farthest one, as the authors' code does with the second-largest distance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fedloom.algorithms.base import PlainClient, per_step
from fedloom.compression import uplink
from fedloom.compression.base import Compressor
from fedloom.core.store import ClientState, ClientStore
from fedloom.registry import Registry


GossipRule = Callable[[Tensor, Tensor, Tensor], Tensor]  # (W, own [n, d], received [n, d]) -> mixed [n, d]
Messages = Callable[[Tensor, list[int], int], Tensor]  # (models, active nodes, round) -> what each node sends


def _edges(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """W coalesced (entries in row-major order), the mask of its off-diagonal entries (edges i <- j,
    i != j), and its diagonal [n]."""
    W = W.coalesce()
    rows, cols = W.indices()
    off = rows != cols
    diagonal = torch.zeros(W.shape[0], dtype=W.dtype).index_add_(0, rows[~off], W.values()[~off])
    return W, off, diagonal


def _mix(W: Tensor, edge_weights: Tensor, diagonal: Tensor, own: Tensor, received: Tensor) -> Tensor:
    """sum_{j != i} w_ij z_j + w_ii x_i, the w_ij given on W's entries (zero on its diagonal)."""
    off = torch.sparse_coo_tensor(W.indices(), edge_weights.to(own.dtype), W.shape, is_coalesced=True,
                                  check_invariants=False)
    return torch.sparse.mm(off, received) + diagonal.to(own.dtype)[:, None] * own


def _mixed(W: Tensor, X: Tensor) -> Tensor:
    """``W @ X`` (``fedloom.topology.gossip``), imported here so that federated runs do not load networkx
    and scipy, which the topology package needs."""
    from fedloom.topology import gossip

    return gossip(W, X)


def mean_gossip(W: Tensor, own: Tensor, received: Tensor) -> Tensor:
    """x_i <- w_ii x_i + sum_{j != i} w_ij z_j; exactly ``W @ X`` when every node sent its own model."""
    if received is own:
        return _mixed(W, own)
    W, off, diagonal = _edges(W)
    return _mix(W, torch.where(off, W.values(), 0), diagonal, own, received)


def edge_distances(own: Tensor, received: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """||z_j - x_i|| for the edges i <- j (given in row-major order), from one sampled product
    <x_i, z_j> over the edges only (never an [edges, d] matrix; several times faster than gathering rows).
    In float64 about the nodes' mean, so that models close to consensus keep their digits."""
    n = own.shape[0]
    centre = own.mean(dim=0)
    A, B = (own - centre).double(), (received - centre).double()
    zeros = torch.zeros(len(rows), dtype=torch.float64)
    pattern = torch.sparse_coo_tensor(torch.stack([rows, cols]), zeros, (n, n), is_coalesced=True,
                                      check_invariants=False)
    with warnings.catch_warnings():  # sampled_addmm needs CSR, which torch flags as beta on every first use
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        pattern = pattern.to_sparse_csr()
    dots = torch.sparse.sampled_addmm(pattern, A, B.T).values()
    squared = A.square().sum(dim=1)[rows] + B.square().sum(dim=1)[cols] - 2 * dots
    return squared.clamp_min(0).sqrt().to(own.dtype)


def adaptive_radius(n: int, rows: Tensor, weights: Tensor, distances: Tensor, delta: float) -> Tensor:
    """tau_i [n]: node i's farthest neighbours, taken until they hold at least delta of its weight,
    are clipped to the distance of the next-farthest; 0 if that takes every neighbour."""
    order = torch.argsort(distances, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]  # grouped by node, farthest first
    r, w = rows[order], weights[order].double()
    row_total = torch.zeros(n, dtype=torch.float64).index_add_(0, r, w)
    earlier_rows = torch.cumsum(row_total, 0) - row_total
    farther = torch.cumsum(w, 0) - w - earlier_rows[r]  # weight of node r's neighbours farther than this one
    kept = farther >= delta - 1e-9
    tau = torch.zeros(n, dtype=distances.dtype)
    return tau.scatter_reduce(0, r[kept], distances[order][kept], "amax", include_self=True)


@dataclass(frozen=True)
class ClippedGossip:
    """The ClippedGossip rule (module docstring): a fixed radius ``tau``, or adaptive with ``delta``."""

    tau: float | None = None
    delta: float = 0.2

    def __call__(self, W: Tensor, own: Tensor, received: Tensor) -> Tensor:
        W, off, _ = _edges(W)
        n = W.shape[0]
        rows, cols = W.indices()[:, off]
        weights = W.values()[off]
        distances = edge_distances(own, received, rows, cols)
        tau = (torch.full((n,), self.tau, dtype=distances.dtype) if self.tau is not None
               else adaptive_radius(n, rows, weights, distances, self.delta))
        # x_i + sum_j w_ij s_ij (z_j - x_i) is mean gossip with weights w_ij s_ij and the rest on x_i
        clipped = weights * (tau[rows] / distances.clamp_min(torch.finfo(distances.dtype).tiny)).clamp(max=1)
        diagonal = 1 - torch.zeros(n, dtype=clipped.dtype).index_add_(0, rows, clipped)
        return _mix(W, torch.zeros_like(W.values()).masked_scatter_(off, clipped), diagonal, own, received)


def honest_messages(models: Tensor, active: list[int], round_idx: int) -> Tensor:
    """Every node sends the model it holds."""
    return models


class DSGD(PlainClient):
    """D-SGD; also the base of the other gossip algorithms. ``mix`` is a function of explicit
    state: the clients' store (a copy the round owns) and the algorithm's gossip state
    (``gossip_init``), both handed back new."""

    name = "dsgd"

    def __init__(self, rule: GossipRule = mean_gossip, messages: Messages = honest_messages):
        self.rule, self.messages = rule, messages

    def gossip_init(self, X: Tensor) -> dict:
        """The gossip rule's state for the stacked node models ``X [n, d]``; D-SGD keeps none."""
        return {}

    def exchange(self, W: Tensor, X: Tensor, active: list[int], round_idx: int) -> Tensor:
        """One gossip step: every node mixes its own model with the models its neighbours sent."""
        return self.rule(W, X, self.messages(X, active, round_idx))

    def mix(self, W: Tensor, X: Tensor, Y: Tensor, active: list[int], aux: dict[str, Tensor], clients: ClientStore,
            state: dict, round_idx: int) -> tuple[Tensor, Tensor, dict]:
        """(new node parameters, bytes each active node sent this round, new gossip state)."""
        return self.exchange(W, Y, active, round_idx), torch.full((len(active),), 4.0 * X.shape[1]), state


class GradientTracking(DSGD):
    """K-GT, gradient tracking with local steps (Liu, Lin, Koloskova, Stich 2023, "Decentralized Gradient
    Tracking with Local Steps"): each node's gradients are corrected by its tracked variable ``c_i``."""

    name = "gradient_tracking"
    plain_sgd_only = True

    def client_init(self, d: int) -> ClientState:
        """A node's tracking variable ``c_i``, starting at zero."""
        return {"c": torch.zeros(d)}

    def correct_grad(self, g: Tensor, x: Tensor, x0: Tensor, sent: dict[str, Tensor], cstate: ClientState) -> Tensor:
        """The local gradient corrected by the node's tracking variable: ``g + c_i``."""
        return g + cstate["c"]

    def client_result(self, x0: Tensor, x: Tensor, steps: Tensor, lr: float, sent: dict[str, Tensor],
                      cstate: ClientState) -> tuple[Tensor, dict[str, Tensor], ClientState]:
        """The row ``x0 - x`` and, as ``aux["delta"]``, the node's corrected direction per local step, which the
        gossip step mixes to update ``c_i``."""
        row = x0 - x
        return row, {"delta": per_step(row, steps, lr)}, cstate

    def mix(self, W, X, Y, active, aux, clients, state, round_idx):
        delta = torch.zeros_like(X)
        if "delta" in aux:  # gossip before the round's training has no new directions yet
            delta[active] = aux["delta"]
        tracked = _mixed(W, delta) - delta  # (W delta)_i - delta_i; zero for inactive (identity) rows
        for node in active:
            clients.put(node, {"c": clients.get(node, lambda: self.client_init(X.shape[1]))["c"] + tracked[node]})
        return _mixed(W, Y), torch.full((len(active),), 2 * 4.0 * X.shape[1]), state


class Choco(DSGD):
    """State: the public copies x_hat every neighbour holds, and each node's compressor memory."""

    name = "choco"

    def __init__(self, compressor: Compressor, seed: int, gamma: float):
        super().__init__()
        self.compressor, self.seed, self.gamma = compressor, seed, gamma

    def gossip_init(self, X: Tensor) -> dict:
        """CHOCO's public copies ``x_hat`` (zeros like ``X``) and the compressors' per-node memories."""
        return {"public": torch.zeros_like(X), "memories": {}}

    def mix(self, W, X, Y, active, aux, clients, state, round_idx):
        public = state["public"]
        q, nbytes, memories = uplink.send(self.compressor, self.seed, (Y - public)[active], active, round_idx,
                                          state["memories"])
        public = public.clone()
        public[active] += q
        mixed = Y + self.gamma * (_mixed(W, public) - public)
        X_new = X.clone()
        X_new[active] = mixed[active]
        return X_new, nbytes.float(), {"public": public, "memories": memories}


def dimat(*args, **kwargs):
    """DIMAT's rule (``fedloom.algorithms.dimat``), imported when built: it aligns with ``fedloom.merging``."""
    from fedloom.algorithms.dimat import Dimat

    return Dimat(*args, **kwargs)


# what decentralized.algorithm and decentralized.gossip may name
DECENTRALIZED = Registry("decentralized algorithm", {
    "dsgd": (DSGD, "D-SGD (Lian et al. 2017; local steps: Koloskova et al. 2020): X <- W (X - U)"),
    "gradient_tracking": (GradientTracking, "K-GT (Liu, Lin, Koloskova, Stich 2023): gradient tracking with local "
                          "steps; the tracker moves by (W delta)_i - delta_i"),
    "choco": (Choco, "CHOCO-SGD (Koloskova, Stich, Jaggi 2019): nodes send compressed differences to public copies "
              "(needs [compression]; choco_gamma)"),
    "dimat": (dimat, "DIMAT (Saadati et al. 2024): every dimat_period rounds each node aligns its neighbours' "
              "models to its own (dimat_method weight | activation) and merges them with W"),
})
GOSSIP_RULES = Registry("gossip rule", {
    "mean": (mean_gossip, "x_i <- sum_j w_ij x_j (W X)"),
    "clipped": (ClippedGossip, "ClippedGossip (He, Karimireddy, Jaggi 2023): neighbours' pulls clipped to tau_i, "
                "fixed (clip_tau) or adaptive (clip_delta)"),
})
