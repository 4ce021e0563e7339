"""DIMAT: Saadati, Pham, Saleem, Waite, Balu, Jiang, Hegde and Sarkar 2024, "DIMAT: Decentralized Iterative
Merging-And-Training for Deep Learning Models".

A decentralized rule: every ``period`` rounds each active node aligns the models its neighbours trained to its
own (Git Re-Basin's weight matching, or activation matching on a batch of the node's own training examples)
and merges them with the gossip weights, x_i <- w_ii y_i + sum_{j != i} w_ij P_ij(y_j), P_ij the permutation
aligning y_j's hidden units to y_i's; in the rounds between, the nodes only train (nothing is sent). With
aligned units (one shared start, little drift) P_ij is the identity and the merge is D-SGD's W Y; models that
differ by a permutation of their units merge into the same function instead of being averaged apart.

The node's aligner is configuration (the model's permutation spec, the data a node matches activations on);
every random draw (weight matching's sweep order, the activation batch) comes from ``Stream.MERGING`` keyed
by round and edge, so a run is deterministic and resumable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedloom.algorithms.gossip import DSGD
from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, numpy_generator, torch_generator
from fedloom.core.store import ClientStore
from fedloom.data.federated import FederatedData
from fedloom.merging.merge import Aligner
from fedloom.merging.runs import ACTIVATION_BATCH
from fedloom.merging.spec import spec_for

DIMAT_KEY = 4  # the merging stream's key for DIMAT (0..3: activation batch, sweeps, inits, FedMA's order)


class Dimat(DSGD):
    """DIMAT (Saadati et al., "DIMAT: Decentralized Iterative Merging-And-Training for Deep Learning
    Models", 2024): every ``period`` rounds each node aligns its neighbours' models to its own (weight or
    activation matching) and mixes them with the gossip weights; between merges nodes only train."""
    name = "dimat"

    def __init__(self, model: nn.Module, data: FederatedData, seed: int, period: int = 1, method: str = "weight"):
        super().__init__()
        if method not in ("weight", "activation"):
            raise ValueError(f"decentralized.dimat_method = {method!r}: choose weight or activation")
        self.model, self.data, self.seed, self.period, self.method = model, data, seed, period, method
        self.spec, self.flat = spec_for(model), ParamSpec.of(model)

    def mix(self, W: Tensor, X: Tensor, Y: Tensor, active: list[int], aux: dict[str, Tensor], clients: ClientStore,
            state: dict, round_idx: int) -> tuple[Tensor, Tensor, dict]:
        """Merge rounds: every active node's aligned merge with its neighbours; others: local training only."""
        if round_idx % self.period:
            return Y, torch.zeros(len(active)), state
        W = W.coalesce()
        rows, cols = W.indices()
        merged = Y.clone()
        for node in active:
            edges = rows == node
            merged[node] = self._merged(node, Y, cols[edges].tolist(), W.values()[edges], round_idx)
        return merged, torch.full((len(active),), 4.0 * X.shape[1]), state

    def _merged(self, node: int, Y: Tensor, neighbours: list[int], weights: Tensor, round_idx: int) -> Tensor:
        """sum_j w_ij P_ij(y_j) over node's row of W (its own model unaligned)."""
        own = self.flat.unflatten(Y[node])
        align = self._aligner(node, round_idx)
        total = torch.zeros_like(Y[node])
        for j, w in zip(neighbours, weights.tolist()):
            if j == node:
                total += w * Y[node]
                continue
            aligned = align(own, {k: v.clone() for k, v in self.flat.unflatten(Y[j]).items()})
            total += w * torch.cat([aligned[n].reshape(-1).to(Y) for n in self.flat.names])
        return total

    def _aligner(self, node: int, round_idx: int) -> Aligner:
        inputs = None
        if self.method == "activation":  # the node's own training examples
            idx = self.data.train_idx[node]
            rng = numpy_generator(self.seed, Stream.MERGING, DIMAT_KEY, round_idx, node)
            chosen = torch.as_tensor(rng.choice(len(idx), size=min(ACTIVATION_BATCH, len(idx)), replace=False))
            inputs = self.data.x[idx[chosen]]
        return Aligner(self.method, self.spec, self.model, inputs,
                       torch_generator(self.seed, Stream.MERGING, DIMAT_KEY, round_idx, node))
