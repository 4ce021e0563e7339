"""FedAMD: Wu, Guo, Qu, He, Liu and Gao, "Anchor Sampling for Federated Learning with Partial Client
Participation", ICML 2023.

Each round, every participant independently joins the *anchor group* with probability
``anchor_probability``; the others are *miners*.

- An anchor computes its gradient at the global model x on a large batch of ``anchor_batch_size``
  examples (0: all of its own), its "bullseye" m_i. The server keeps every client's latest m_i (in the
  client store, like SCAFFOLD's c_i) and their mean over all N clients, the global target
  ``g = (1/N) sum_i m_i``, which moves by ``(1/N) sum_anchors (m_i_new - m_i_old)``. Anchors send no
  model update.
- A miner runs K local steps of the recursive (SARAH) estimator started at the target the server
  sent: ``v_0 = g``, ``v_k = v_{k-1} + grad f_i(x_k; B_k) - grad f_i(x_{k-1}; B_k)`` (both gradients on
  the same batch) and ``x_{k+1} = x_k - lr v_k``; its row is ``x - x_K``, aggregated by the pipeline.

The miners of a round use the target of the round's start; the anchors' new gradients move it for
the next round. As the authors' code does, ``warm_start`` fills every m_i at the initial model before
round 1 (false: they start at zero and the target fills as clients are anchored). The two gradients
of a miner's step are the engines' two-point hook: ``local_init`` and ``local_direction`` replace
``correct_grad`` for an algorithm with ``two_point = True``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedloom.algorithms.base import AlgorithmState, PlainClient
from fedloom.core.rng import Stream, numpy_generator
from fedloom.core.store import ClientState, ClientStore


class FedAMD(PlainClient):
    """FedAMD (Wu et al., "Anchor Sampling for Federated Learning with Partial Client Participation",
    2023): each participant is an anchor with ``anchor_probability`` (a large-batch gradient at the global
    model, kept as its state ``m``) or a miner (recursive SARAH steps started from the target g = mean m)."""
    name = "fedamd"
    plain_sgd_only = True  # the estimator is a plain SGD direction
    two_point = True

    def __init__(self, anchor_probability: float = 0.2, anchor_batch_size: int = 0, warm_start: bool = True):
        self.anchor_probability = anchor_probability
        self.anchor_batch_size = anchor_batch_size
        self.warm_start = warm_start

    # server side
    def server_init(self, x0: Tensor) -> AlgorithmState:
        """The target gradient g, zero until the anchors (or the warm start) fill it."""
        return {"g": torch.zeros_like(x0)}

    def broadcast(self, state: AlgorithmState) -> dict[str, Tensor]:
        """The miners start their estimator from the target g."""
        return {"g": state["g"]}

    def server_step(self, state: AlgorithmState, aux: dict[str, Tensor], n_clients: int) -> AlgorithmState:
        """Unchanged: the target moves with the anchors (``anchor_step``), not with the miners' rows."""
        return state  # the target moves with the anchors (anchor_step), not with the miners' rows

    def anchor_group(self, clients: list[int], seed: int, round_idx: int) -> list[int]:
        """The participants that are anchors this round: each with anchor_probability, independently."""
        u = numpy_generator(seed, Stream.ANCHOR, round_idx).random(len(clients))
        return [c for c, ui in zip(clients, u) if ui < self.anchor_probability]

    def anchor_step(self, state: AlgorithmState, anchors: list[int], grads: Tensor, store: ClientStore,
                    n_clients: int) -> AlgorithmState:
        """Store each anchor's new large-batch gradient ``grads [n, d]`` and move the target by their change."""
        d = grads.shape[-1]
        change = torch.zeros(d, dtype=grads.dtype)
        for cid, grad in zip(anchors, grads):
            change += grad - store.get(cid, lambda: self.client_init(d))["m"]
            store.put(cid, {"m": grad.clone()})
        return {"g": state["g"] + change / n_clients}

    # client side
    def client_init(self, d: int) -> ClientState:
        return {"m": torch.zeros(d)}

    def local_init(self, x0: Tensor, sent: dict[str, Tensor], cstate: ClientState) -> dict[str, Tensor]:
        """The estimator before the first step: v = g at the point x0 (one client [d] or stacked [n, d])."""
        return {"v": sent["g"].expand_as(x0).clone(), "x_prev": x0.clone()}

    def local_direction(self, g: Tensor, g_prev: Tensor, x: Tensor, lstate: dict[str, Tensor]
                        ) -> tuple[Tensor, dict[str, Tensor]]:
        """The step's direction from the gradients at x and at the previous point on the same batch."""
        v = lstate["v"] + g - g_prev
        return v, {"v": v, "x_prev": x}

