"""FAVANO on the virtual clock (mode = "asynchronous", asynchronous.algorithm = "favano").

Leconte et al. 2023, "FAVANO: Federated AVeraging with Asynchronous NOdes": every client trains without
pause at its own speed from the last model it received; the server wakes every ``period_s`` virtual seconds
(``wake = "poisson"``: exponential gaps of that mean, from Stream.SYSTEM keyed by the round), takes the
current local models y_i of ``clients_per_update`` clients drawn uniformly among the online ones (Stream.SAMPLING
keyed by the round) and sets x <- (x + sum_i y_i) / (s + 1); those clients download the new x and restart.
Unfinished work counts: a client's model at the wake is its start model after the local steps it has completed
since it began, (wake - its upload seconds - its start) / (batch_size x seconds_per_example / speed), at most
its full round of steps (a client done early waits, holding its model). One round is one wake.

A client's local model depends only on its start model and its completed steps, so it trains when the server
takes it: the sampled clients train at the wake, one engine call per distinct step count, each from its own
start model. The state tree adds to the federated one:

    now       the virtual clock
    version   server updates so far
    held      [n] the version each client trains from
    began     [n] virtual time each client's current local run began computing (after its download)
    starts    version -> the model, for versions some client holds
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedloom.algorithms.asynchronous import completed_steps, favano_average
from fedloom.builders import local_training
from fedloom.core.rng import Stream, numpy_generator
from fedloom.core.store import ClientStore
from fedloom.engines.base import local_steps
from fedloom.personalization.base import with_local
from fedloom.rounds.base import State
from fedloom.rounds.federated import BYTES_PER_FLOAT, FederatedRound, _add_totals
from fedloom.systems.rounds import IDLE_WAIT_S

WAKE_KEY = 3  # Stream.SYSTEM keys 0-2 draw the system model; 3 (and the round) the poisson wake gaps
MAX_WAITS = 100_000  # IDLE_WAIT_S steps a wake may wait for a client to come online


class FavanoRound(FederatedRound):
    """FAVANO (Leconte et al. 2023) on the virtual clock: clients train without pause, the server wakes
    every ``period_s`` and averages itself with the current, possibly partial, local models of a sample."""
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        local = local_training(self.cfg)
        self.full_steps = local_steps(self.data.client_sizes(), local)  # a client's whole round of local steps
        self.step_seconds = local.batch_size * self.system.seconds_per_example / self.system.speed
        self.up_seconds = self.row_bytes / self.system.up_bytes_s
        self.down_seconds = BYTES_PER_FLOAT * self.spec.dim / self.system.down_bytes_s

    def init_state(self) -> State:
        state = super().init_state()
        n = self.data.n_clients
        return {**state, "now": 0.0, "version": 0, "held": torch.zeros(n, dtype=torch.int64),
                "began": torch.from_numpy(self.down_seconds.astype(np.float64)), "starts": {0: state["x"]}}

    def play(self, state: State, round_idx: int) -> tuple[State, dict[str, Any]]:
        now, clients = self._wake(state["now"], round_idx)
        store = ClientStore(state["clients"])
        steps = self._completed(state, clients, now)
        starts = torch.stack([state["starts"][int(v)] for v in state["held"][clients]])
        models, losses = self._local_models(starts, clients, steps, round_idx, store)
        x = favano_average(state["x"], models)
        version = state["version"] + 1
        held, began = state["held"].clone(), state["began"].clone()
        staleness = (state["version"] - held[clients]).tolist()
        held[clients] = version
        began[clients] = torch.from_numpy(now + self.down_seconds[clients])
        kept = {int(v) for v in held.unique()}
        starts_after = {v: m for v, m in {**state["starts"], version: x}.items() if v in kept}
        st = {**state, "x": x, "now": now, "version": version, "held": held, "began": began,
              "starts": starts_after, "clients": store.states}
        record = self._record(round_idx, now - state["now"], clients, steps, losses, staleness)
        st["counters"] = _add_totals(state["counters"], record)
        return st, record

    def _wake(self, last: float, round_idx: int) -> tuple[float, list[int]]:
        """The server's next wake after ``last`` (the first with a client online) and the clients it samples."""
        a = self.cfg.asynchronous
        gap = a.period_s
        if a.wake == "poisson":
            gap = float(numpy_generator(self.cfg.seed, Stream.SYSTEM, WAKE_KEY, round_idx).exponential(a.period_s))
        now = last + gap
        for _ in range(MAX_WAITS):
            online = np.flatnonzero(self.system.available(now))
            if len(online):
                break
            now += IDLE_WAIT_S
        else:
            raise RuntimeError(f"no client came online within {MAX_WAITS * IDLE_WAIT_S:g} virtual seconds")
        rng = numpy_generator(self.cfg.seed, Stream.SAMPLING, round_idx)
        return now, sorted(int(c) for c in rng.choice(online, min(a.clients_per_update, len(online)), replace=False))

    def _completed(self, state: State, clients: list[int], now: float) -> np.ndarray:
        """Local steps each client has completed by the wake (its upload must end by then)."""
        elapsed = now - self.up_seconds[clients] - state["began"][clients].numpy()
        return completed_steps(elapsed, self.step_seconds[clients], self.full_steps[clients])

    def _local_models(self, starts: Tensor, clients: list[int], steps: np.ndarray, round_idx: int,
                      store: ClientStore) -> tuple[Tensor, list[float]]:
        """Each client's model after its completed steps: one engine call per distinct step count (none: the start
        model); and the mean train loss of each client that trained."""
        models, losses = starts.clone(), []
        local = local_training(self.cfg)
        for count in sorted(set(steps[steps > 0].tolist())):
            group = np.flatnonzero(steps == count)
            engine = with_local(self.engine, replace(local, steps=int(count)))
            result = engine.run_round(self.algorithm, starts[group], {}, [clients[i] for i in group], round_idx, store)
            models[group] = starts[group] - result.U
            losses += result.train_loss.tolist()
        return models, losses

    def _record(self, round_idx: int, seconds: float, clients: list[int], steps: np.ndarray, losses: list[float],
                staleness: list[int]) -> dict[str, Any]:
        progress = steps / np.maximum(self.full_steps[clients], 1)
        record = {"round": round_idx, "n_sampled": len(clients), "n_trained": int((steps > 0).sum()),
                  "n_rejected": 0, "local_progress_mean": float(progress.mean()), "staleness": staleness,
                  "staleness_mean": float(np.mean(staleness)), "staleness_max": int(max(staleness)),
                  "round_virtual_seconds": seconds, "bytes_up": len(clients) * self.row_bytes,
                  "bytes_down": len(clients) * BYTES_PER_FLOAT * self.spec.dim}
        if losses:  # no client may have finished a step since it last synchronized
            record["train_loss"] = float(np.mean(losses))
        return record
