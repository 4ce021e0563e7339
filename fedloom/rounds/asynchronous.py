"""Asynchronous federated learning, event-driven on the virtual clock (mode = "asynchronous").

``asynchronous.concurrency`` clients train at once; when one finishes (its finish event: start time
plus its virtual seconds from the system model) the server uses its update and a new client, drawn
uniformly from the idle clients online at that moment, starts from the server's model as it is then.
One round is one server model update:

- FedAsync (Xie, Koyejo, Gupta 2019, "Asynchronous Federated Optimization"): every arriving local
  model y is mixed in, x <- (1 - a) x + a y with a = alpha * s(staleness);
- FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"): arriving
  deltas, scaled by s(staleness), are buffered; every buffer_size of them run through the server
  pipeline (compression, validation, aggregator, the server optimizer: server.lr is eta_g) as one step;
- the general buffered rule of Fraboni et al. 2023 (``fraboni``): FedBuff's buffer with each delta weighted
  w_i (``fedloom.algorithms.asynchronous.fraboni_weights``): 1/K, or p_i / f_i with p_i the client's share of
  the training examples and f_i the share of server steps so far that took its update (``aggregated``).

Staleness is the number of server updates since the client started. s is constant, polynomial
(1 + tau)^-a (a = 0.5 is FedBuff's 1/sqrt(1 + tau)) or hinge (1 up to b, then 1 / (a (tau - b) + 1)).

A client's update depends only on its start model, so training waits until an update is needed (FedAsync:
at its arrival; FedBuff: at the server step): then every started, untrained client trains in one engine
call, each from its own start model (the vectorized engine batches them although they finish at
different virtual times). The state tree adds to the
federated one:

    now       the virtual clock
    version   server updates so far
    queue     heap of in-flight jobs (finish time, job number, client, start version)
    starts    start version -> the model, for versions with untrained jobs
    results   job number -> (row, examples, train loss) of trained jobs in flight or buffered
    buffer    fedbuff, fraboni: (client, job, start version, staleness, s(staleness)) waiting for the server step
    aggregated  [n] server steps that took each client's update (fraboni's f_i)
    jobs, calls  counters keying the sampling and the engine calls' batch streams
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedloom.algorithms.asynchronous import fedasync_mix, fraboni_weights, staleness_weight
from fedloom.core.rng import Stream, numpy_generator
from fedloom.core.store import ClientStore
from fedloom.pipeline.base import Context
from fedloom.rounds.base import State
from fedloom.rounds.federated import BYTES_PER_FLOAT, FederatedRound, _add_totals
from fedloom.systems.rounds import IDLE_WAIT_S

MAX_WAITS = 100_000  # IDLE_WAIT_S steps a new start may wait for an idle client to come online


class AsynchronousRound(FederatedRound):
    """Asynchronous federated learning on the virtual clock (module docstring): FedAsync or FedBuff, one round
    per server model update."""

    def init_state(self) -> State:
        """The federated state tree plus the virtual clock, the job queue and the buffer, with ``concurrency``
        clients already started."""
        state = self.idle_state()
        for _ in range(self.cfg.asynchronous.concurrency):
            state = self._start(state)
        return state

    def idle_state(self) -> State:
        """The state tree with no client started yet."""
        return {**super().init_state(), "now": 0.0, "version": 0, "queue": [], "starts": {}, "results": {},
                "buffer": [], "jobs": 0, "calls": 0, "aggregated": torch.zeros(self.data.n_clients, dtype=torch.int64)}

    def play(self, state: State, round_idx: int) -> tuple[State, dict[str, Any]]:
        """Advance the virtual clock through finishing clients until the server model is updated once (FedAsync:
        one arrival; FedBuff: a full buffer); returns the new state and the round's metrics."""
        a = self.cfg.asynchronous
        st = {**state, "queue": list(state["queue"]), "starts": dict(state["starts"]),
              "results": dict(state["results"]), "buffer": list(state["buffer"])}
        store = ClientStore(state["clients"])
        began, applied, metrics = state["now"], [], {}
        while not metrics:
            if a.algorithm == "fedasync" and st["queue"][0][1] not in st["results"]:
                st = self._train_pending(st, store)  # FedAsync needs this update now
            finish, job, client, version = heapq.heappop(st["queue"])
            staleness = st["version"] - version
            weight = staleness_weight(a.staleness, staleness, a.staleness_a, a.staleness_b)
            st["now"] = finish
            if a.algorithm == "fedasync":
                row, _, loss = st["results"].pop(job)
                applied.append((staleness, loss))
                st["x"], st["version"] = fedasync_mix(st["x"], row, a.alpha * weight), st["version"] + 1
                metrics = {"n_rejected": 0}
            else:  # FedBuff and fraboni need the buffered deltas only at the server step: they train then, together
                st["buffer"].append((client, job, version, staleness, weight))
                if len(st["buffer"]) == a.buffer_size:
                    st, applied, metrics = self._flush(st, round_idx, store)
            st = self._start(st)
        st["clients"] = store.states
        record = self._async_record(round_idx, st["now"] - began, applied, metrics)
        st["counters"] = _add_totals(state["counters"], record)
        return st, record

    def _start(self, st: State) -> State:
        """A new job: an idle client online now (or as soon as one is) starts from the current model."""
        client, start = self.idle_client(busy_clients(st), st["now"], (st["jobs"],))
        return {**self.start_job(st, client, start, st["jobs"]), "jobs": st["jobs"] + 1}

    def idle_client(self, busy: set[int], now: float, key: tuple[int, ...]) -> tuple[int, float]:
        """A client not in ``busy``, drawn uniformly (Stream.SAMPLING keyed by ``key``) from those online at
        ``now`` or, if none is, at the first IDLE_WAIT_S step at which one is; (the client, that time)."""
        idle = np.ones(self.data.n_clients, dtype=bool)
        idle[list(busy)] = False
        start = now
        for _ in range(MAX_WAITS):
            candidates = np.flatnonzero(idle & self.system.available(start))
            if len(candidates):
                break
            start += IDLE_WAIT_S
        else:
            raise RuntimeError(f"no idle client came online within {MAX_WAITS * IDLE_WAIT_S:g} virtual seconds")
        return int(numpy_generator(self.cfg.seed, Stream.SAMPLING, *key).choice(candidates)), start

    def start_job(self, st: State, client: int, start: float, job: int) -> State:
        """Job ``job``: ``client`` starts from the current model at ``start``; it finishes after its virtual seconds."""
        seconds = self.system.seconds([client], self.examples[[client]], np.array([self.row_bytes]),
                                      np.array([BYTES_PER_FLOAT * self.spec.dim]))
        st = {**st, "queue": list(st["queue"]), "starts": {**st["starts"], st["version"]: st["x"]}}
        heapq.heappush(st["queue"], (start + float(seconds[0]), job, client, st["version"]))
        return st

    def _train_pending(self, st: State, store: ClientStore) -> State:
        """Every job not trained yet (in flight or buffered), in one engine call from each job's start model."""
        jobs = [(job, client, version) for _, job, client, version in st["queue"]]
        jobs += [(job, client, version) for client, job, version, _, _ in st["buffer"]]
        pending = sorted(entry for entry in jobs if entry[0] not in st["results"])
        versions = [version for _, _, version in pending]
        x0 = (st["starts"][versions[0]] if len(set(versions)) == 1
              else torch.stack([st["starts"][v] for v in versions]))
        result = self.engine.run_round(self.algorithm, x0, {}, [client for _, client, _ in pending], st["calls"] + 1,
                                       store)
        results = dict(st["results"])
        for i, (job, _, version) in enumerate(pending):
            start = st["starts"][version]
            row = start - result.U[i] if self.cfg.asynchronous.algorithm == "fedasync" else result.U[i]
            results[job] = (row.detach().cpu(), float(result.weights[i]), float(result.train_loss[i]))
        return {**st, "results": results, "starts": {}, "calls": st["calls"] + 1}

    def _flush(self, st: State, round_idx: int, store: ClientStore) -> tuple[State, list[tuple], dict[str, Any]]:
        """FedBuff's server step: the buffered deltas, scaled by s(staleness), through the server pipeline;
        (the new state, (staleness, train loss) of each update, the pipeline's metrics)."""
        if any(job not in st["results"] for _, job, _, _, _ in st["buffer"]):
            st = self._train_pending(st, store)
        results = dict(st["results"])
        taken = [(entry, results.pop(entry[1])) for entry in st["buffer"]]
        clients = [entry[0] for entry, _ in taken]
        scale, aggregated = self._client_scales(st, clients)
        U = torch.stack([float(k) * weight * row for k, ((_, _, _, _, weight), (row, _, _)) in zip(scale, taken)])
        ctx = Context(round_idx, self.cfg.seed, clients, st["x"], {})
        out, _, pipeline_states, metrics = self.pipeline.apply(U, torch.ones(len(clients)), st["pipeline"], ctx)
        st = {**st, "pipeline": pipeline_states, "buffer": [], "results": results, "version": st["version"] + 1,
              "aggregated": aggregated}
        if len(out) and bool(torch.isfinite(out[0]).all()):
            st["x"] = out[0]
        else:
            metrics["model_rejected"] = "no usable update, or the aggregated model held NaN/Inf; the previous one is kept"
        metrics.setdefault("n_rejected", 0)
        return st, [(entry[3], loss) for entry, (_, _, loss) in taken], metrics

    def _client_scales(self, st: State, clients: list[int]) -> tuple[np.ndarray, Tensor]:
        """K w_i of each buffered client (the pipeline's mean then applies sum_i w_i Delta_i; FedBuff: 1), and the
        per-client counts of server steps that took an update, this one included."""
        aggregated = st["aggregated"].clone()
        aggregated[clients] += 1
        a = self.cfg.asynchronous
        if a.algorithm != "fraboni":
            return np.ones(len(clients)), aggregated
        sizes = self.data.client_sizes().astype(np.float64)
        weights = fraboni_weights(a.client_weights, sizes[clients] / sizes.sum(), aggregated[clients].numpy(),
                                  st["version"] + 1)
        return len(clients) * weights, aggregated

    def _async_record(self, round_idx: int, seconds: float, applied: list[tuple], metrics: dict) -> dict[str, Any]:
        staleness = [s for s, _ in applied]
        payload = metrics.pop("uplink_bytes", self.row_bytes * len(applied))
        return {"round": round_idx, "train_loss": float(np.mean([loss for _, loss in applied])),
                "n_sampled": len(applied), **metrics, "staleness": staleness,
                "staleness_mean": float(np.mean(staleness)), "staleness_max": int(max(staleness)),
                "round_virtual_seconds": seconds, "bytes_up": payload,
                "bytes_down": len(applied) * BYTES_PER_FLOAT * self.spec.dim}


def busy_clients(st: State) -> set[int]:
    """Clients training (in flight) or waiting in the buffer for the server step (their update trains then)."""
    return {entry[2] for entry in st["queue"]} | {entry[0] for entry in st["buffer"]}
