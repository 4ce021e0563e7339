"""A decentralized round: no server; each active node trains on its own data and
mixes with its neighbours through the gossip matrix W (``X <- W X``).

Shares data, models, engines, config and the runner with federated rounds. With
``decentralized.order = "gossip_then_local"`` the algorithm's gossip step (its
``mix``: the tracker update of gradient tracking, CHOCO's compressed exchange)
comes before local training, reading the side matrices of the round before.

The state tree of a decentralized run:

    X        the stacked node models [n, d]
    clients  node id -> the algorithm's persistent node state (gradient tracking's c)
    gossip   the algorithm's gossip state (CHOCO's public copies and compressor memories)
    pending  gossip_then_local: the side matrices of the last training, [n, d'] each
    sent     bytes each node has sent so far [n]

Byzantine nodes (``[attack]``, a set fixed for the run) train like honest ones but
send crafted models to their neighbours: the attack of ``fedloom.attacks`` applied
to the rows of the active nodes' models, as in He et al. 2023 (sign flip sends -x,
ALIE mean - z std of the models). They keep mixing their own true model, and every
metric (node accuracy, x_bar, consensus distance) is over the honest nodes only.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import networkx as nx
import torch
from torch import Tensor

from fedloom import evaluation
from fedloom.algorithms.gossip import (DSGD, Choco, ClippedGossip, GradientTracking, Messages, dimat,
                                      honest_messages, mean_gossip)
from fedloom.attacks import ATTACKS, Adversary
from fedloom.builders import (GivenParts, build_adversary, build_data, build_engine, build_model_for, build_task_for,
                              check_model_runs, engine_notes, model_device, sized_to)
from fedloom.config import ExperimentConfig
from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, numpy_generator
from fedloom.core.store import ClientStore
from fedloom.data import FederatedData
from fedloom.rounds.base import State
from fedloom.topology import (TimeVarying, active_subgraph, check_connected, consensus_distance, make_topology,
                              max_degree, metropolis_hastings, mixing_from_user, spectral_gap)


def byzantine_messages(adversary: Adversary) -> Messages:
    """What the nodes send when some are Byzantine: the active nodes' models, the Byzantine rows crafted."""

    def messages(models: Tensor, active: list[int], round_idx: int) -> Tensor:
        sent = models.clone()
        sent[active] = adversary.corrupt(models[active], active, round_idx)[0]
        return sent

    return messages


def build_gossip_algorithm(cfg: ExperimentConfig, adversary: Adversary | None = None,
                           shapes: tuple[torch.Size, ...] | None = None, model: torch.nn.Module | None = None,
                           data: FederatedData | None = None) -> DSGD:
    """The decentralized algorithm of the config: D-SGD (mean or clipped gossip, Byzantine messages from
    ``adversary``), K-GT, CHOCO-SGD (its compressor built for the model's ``shapes``) or DIMAT (``model``
    and ``data``: the run's, to align the node models)."""
    d = cfg.decentralized
    if d.algorithm == "dimat":
        return dimat(model, data, cfg.seed, d.dimat_period, d.dimat_method)
    if d.algorithm == "choco":
        return Choco(cfg.compression.build(shapes), cfg.seed, d.choco_gamma)
    if d.algorithm == "gradient_tracking":
        return GradientTracking()
    rule = ClippedGossip(d.clip_tau, d.clip_delta) if d.gossip == "clipped" else mean_gossip
    crafted = adversary is not None and adversary.name in ATTACKS
    return DSGD(rule, byzantine_messages(adversary) if crafted else honest_messages)


DRAWN_NODES = 100  # beyond this a drawing of the graph is a hairball


class Topology:
    """The round's mixing matrix: fixed, time-varying, or a user's matrix, on the
    nodes active that round."""

    def __init__(self, cfg: ExperimentConfig, n: int):
        t = cfg.topology
        self.weights = {"metropolis_hastings": metropolis_hastings, "max_degree": max_degree}[t.weights]
        self.user_matrix = mixing_from_user(t.matrix) if t.matrix is not None else None
        self.graph = None if self.user_matrix is not None else make_topology(t.name, n, **t.options)
        if isinstance(self.graph, nx.Graph):
            check_connected(self.graph, name=f"topology {t.name!r}")

    def mixing(self, round_idx: int, active: Tensor) -> Tensor:
        """W for the round (the config refuses partial participation with a user matrix or a time-varying graph)."""
        if self.user_matrix is not None:
            return self.user_matrix
        if isinstance(self.graph, TimeVarying):
            return self.graph.mixing_at(round_idx)
        if bool(active.all()):
            return self.full_mixing
        return active_subgraph(self.graph, active, self.weights)

    @cached_property
    def full_mixing(self) -> Tensor:
        """W of the static graph with every node active: built once, not every round
        (networkx builds it in Python, O(edges): 0.27 s on the 1,000-node exponential graph)."""
        return self.weights(self.graph)

    def edges(self) -> list[list[int]] | None:
        """The fixed graph's edges (of a user matrix: its nonzero off-diagonal pairs), or None
        for a graph drawn anew every round."""
        if self.user_matrix is not None:
            i, j = self.user_matrix.indices()
            return [[a, b] for a, b in zip(i.tolist(), j.tolist()) if a < b]
        if isinstance(self.graph, nx.Graph):
            return [sorted(e) for e in self.graph.edges()]
        return None

    def static_gap(self) -> float | None:
        """The spectral gap of a fixed mixing matrix; None for a time-varying graph."""
        if self.user_matrix is not None:
            return spectral_gap(self.user_matrix)
        if isinstance(self.graph, nx.Graph):
            return spectral_gap(self.full_mixing)
        return None


class DecentralizedRound:
    """The decentralized run's constant parts and its round step on the state tree (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, given: GivenParts = GivenParts()):
        self.data = build_data(cfg, given)
        self.cfg = cfg = sized_to(cfg, self.data)
        self.adversary = build_adversary(cfg, self.data)
        self.byzantine = (self.adversary.fixed if self.adversary is not None
                          else torch.zeros(self.data.n_clients, dtype=torch.bool))
        self.model = build_model_for(cfg, self.data, given)
        check_model_runs(cfg, self.model, self.data)
        self.spec = ParamSpec.of(self.model)
        self.engine = build_engine(cfg, self.model, self.data)
        self.engine_name = self.engine.name
        # evaluation runs where the engine put the model (the CPU for Ray actors' and remote clients' runs)
        self.task, self.device = build_task_for(cfg, self.data), model_device(self.model)
        self.algorithm = build_gossip_algorithm(cfg, self.adversary, self.spec.shapes, self.model, self.data)
        self.topology = Topology(cfg, self.data.n_clients)

    def init_state(self) -> State:
        """Every node starts from the initial model (``X [n, d]``), with the gossip rule's state."""
        X = self.spec.flatten(self.model).detach().cpu().expand(self.data.n_clients, -1).clone()
        if self.cfg.decentralized.own_init:  # each node's own model, drawn as one-shot's clients draw theirs
            from fedloom.merging.one_shot import client_starts

            X = client_starts(self.cfg, self.data, self.spec, self.model, list(range(self.data.n_clients)),
                              False).detach()
        return {"X": X, "clients": {}, "gossip": self.algorithm.gossip_init(X), "pending": {},
                "sent": torch.zeros(self.data.n_clients)}

    def honest(self, X: Tensor) -> Tensor:
        """The honest nodes' rows: what every metric is about."""
        return X[~self.byzantine] if self.byzantine.any() else X

    def final_params(self, state: State) -> Tensor:
        """The average honest model x_bar: the single final merge."""
        return self.honest(state["X"]).mean(dim=0)

    def active_nodes(self, round_idx: int) -> Tensor:
        """Which nodes take part: a MoDeST-style random subset and churn."""
        d = self.cfg.decentralized
        n = self.data.n_clients
        rng = numpy_generator(self.cfg.seed, Stream.SAMPLING, round_idx)
        active = torch.ones(n, dtype=torch.bool)
        if d.participation < 1:
            chosen = rng.choice(n, size=max(1, round(d.participation * n)), replace=False)
            active = torch.zeros(n, dtype=torch.bool)
            active[torch.as_tensor(chosen)] = True
        if d.churn > 0:
            active &= torch.as_tensor(rng.random(n) >= d.churn)
        return active

    def play(self, state: State, round_idx: int) -> tuple[State, dict[str, Any]]:
        """One round: the active nodes train and gossip with the round's mixing matrix, in the configured order."""
        active_mask = self.active_nodes(round_idx)
        active = active_mask.nonzero().flatten().tolist()
        W = self.topology.mixing(round_idx, active_mask)
        store, gossip_state, X = ClientStore(state["clients"]), state["gossip"], state["X"]
        if self.cfg.decentralized.order == "gossip_then_local":
            pending = {k: v[active] for k, v in state["pending"].items()}
            X, sent, gossip_state = self.algorithm.mix(W, X, X, active, pending, store, gossip_state, round_idx)
            result, X_new = self._train(X, active, round_idx, store)
        else:
            result, Y = self._train(X, active, round_idx, store)
            X_new, sent, gossip_state = self.algorithm.mix(W, X, Y, active, result.aux, store, gossip_state,
                                                           round_idx)
        round_bytes = sent * self._degrees(W)[active]
        total_sent = state["sent"].clone()
        total_sent[active] += round_bytes
        new = {"X": X_new, "clients": store.states, "gossip": gossip_state, "sent": total_sent,
               "pending": self._pending(result.aux, active, state["pending"])}
        record = {"round": round_idx, "train_loss": float(result.train_loss.mean()), "n_active": len(active),
                  "n_byzantine": int(self.byzantine[active_mask].sum()),
                  "consensus_distance": consensus_distance(self.honest(X_new)),
                  "bytes_per_node": float(round_bytes.mean()), "bytes_per_node_total": float(total_sent.mean()),
                  "bytes_up": int(round_bytes.sum()), "bytes_up_total": int(total_sent.sum())}
        return new, record

    def _train(self, X: Tensor, active: list[int], round_idx: int, store: ClientStore):
        """Local training of the active nodes from their own rows: (the result, the models after it)."""
        result = self.engine.run_round(self.algorithm, X[active], {}, active, round_idx, store)
        Y = X.clone()
        Y[active] = X[active] - result.U
        return result, Y

    def _pending(self, aux: dict[str, Tensor], active: list[int], before: dict[str, Tensor]) -> dict[str, Tensor]:
        """gossip_then_local: the side matrices the next round's gossip reads, one row per node."""
        if self.cfg.decentralized.order != "gossip_then_local":
            return before
        pending = {}
        for key, rows in aux.items():
            pending[key] = torch.zeros(self.data.n_clients, rows.shape[1], dtype=rows.dtype)
            pending[key][active] = rows
        return pending

    @staticmethod
    def _degrees(W: Tensor) -> Tensor:
        """Neighbours each node sends to: off-diagonal nonzeros of its row."""
        W = W.coalesce()
        rows, cols = W.indices()
        off = (rows != cols) & (W.values() != 0)
        return torch.bincount(rows[off], minlength=W.shape[0]).float()

    def evaluate(self, state: State) -> dict[str, float]:
        """The honest nodes' mean, min and max test metric, and the metrics of their average model."""
        honest = self.honest(state["X"])
        metric = self.task.primary
        per_node = evaluation.rows_metric(self.model, self.spec, honest.to(self.device), self.data.x_test,
                                          self.data.y_test, self.task)
        merged = evaluation.central(self.model, self.spec, self.final_params(state).to(self.device), self.data,
                                    self.task)
        return {**merged, f"node_{metric}_mean": float(per_node.mean()), f"node_{metric}_min": float(per_node.min()),
                f"node_{metric}_max": float(per_node.max()), f"xbar_{metric}": merged[f"central_{metric}"]}

    def final_model(self, state: State):
        """The model holding the honest nodes' average."""
        self.spec.load_into(self.model, self.final_params(state))
        return self.model

    def describe(self, state: State) -> dict[str, Any]:
        """The summary's facts: data sizes, topology, spectral gap, engine and the final merge's results."""
        return {**self.data.size(), "topology": self.cfg.topology.name, "spectral_gap": self.topology.static_gap(),
                **engine_notes(self.cfg, self.model, self.engine), **self.final_merge(state)}

    def final_merge(self, state: State) -> dict[str, Any]:
        """``decentralized.final_merge``: the honest node models merged after aligning them, evaluated as
        x_bar is (``final_merge_<metric>`` beside ``xbar_<metric>``)."""
        method = self.cfg.decentralized.final_merge
        if method == "none":
            return {}
        from fedloom.merging.one_shot import merge_rows

        merged = merge_rows(self.model, self.spec, self.honest(state["X"]), method, self.data, self.cfg.seed)
        metrics = evaluation.central(self.model, self.spec, merged.to(self.device), self.data, self.task)
        return {f"final_merge_{k.removeprefix('central_')}": v for k, v in metrics.items()}

    def graph_record(self) -> dict[str, Any] | None:
        """What the run directory keeps to draw the graph: up to DRAWN_NODES nodes, fixed graphs only."""
        edges = self.topology.edges()
        if edges is None or self.data.n_clients > DRAWN_NODES:
            return None
        return {"name": self.cfg.topology.name, "n_nodes": self.data.n_clients, "edges": edges,
                "byzantine": self.byzantine.nonzero().flatten().tolist()}
