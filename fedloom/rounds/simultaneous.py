"""Several models trained at once on one federation's clients (mode = "simultaneous").

Each ``[[simultaneous.tasks]]`` entry is the experiment with its own overrides (its data, model, client and
server settings, ``evaluation.target_accuracy``); the tasks share
the clients and the system model (a client is the same device for every task: the same speed, links and
availability; its compute per example follows each task's model where ``system.device_flops`` is set).
A task's ``asynchronous.concurrency`` is its active clients R_m. A task is done at its target accuracy
(checked every ``evaluation.every`` of its server steps); the run ends when every task is, or at ``rounds``
(fedast: server steps of all tasks together; sync: rounds of all tasks at once).

- ``fedast`` (Askin, Sharma, Joe-Wong, Joshi 2024): a buffer per task. Each arrival goes to its task's buffer,
  and that task starts new clients (up to two) while it has fewer than R_m in flight; a full buffer of b_m
  is one FedBuff server step of the task (``server.lr`` is eta_g; no staleness discount). With
  ``realloc``, every ``realloc_every`` arrivals per unfinished task R_m follows the tasks' normalized update
  variance (``algorithms/fedast.py``) and b_m = ceil(in flight / buffer_ratio). A task that reaches its
  target cancels its clients' work and hands its R_m to the others. One runner round is one server step.
- ``sync`` (Sync-ST, the paper's synchronous baseline): every round each unfinished task trains its R_m
  clients, drawn without overlap from those online, and the round lasts until the slowest of all of them.

A client runs one job at a time; an update trains lazily, when its task's server step needs it (it depends
only on its start model), as in mode = "asynchronous". The state tree:

    tasks      task name -> that task's own state tree (mode = "asynchronous"'s, or "federated"'s for sync)
    active     [M] each task's R_m
    running    [M] whether the task still trains
    steps      [M] each task's server steps
    buffers    [M] fedast: each task's buffer size b_m
    windows    [M] fedast realloc: each task's last variance_window update rows
    variances  [M] fedast realloc: each task's variance estimates since the last reallocation
    arrivals   fedast realloc: arrivals since the last reallocation
    reached    task name -> where it reached its target (round, task_round, virtual_seconds, accuracy), or None
    now, jobs  fedast: the virtual clock; jobs started (the sampling streams' key)
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedloom import evaluation
from fedloom.algorithms.fedast import buffer_size, hand_over, normalized_variance, reallocate
from fedloom.builders import GivenParts, local_training
from fedloom.config import ConfigError, ExperimentConfig
from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, numpy_generator
from fedloom.core.store import ClientStore
from fedloom.engines.base import local_steps
from fedloom.rounds.asynchronous import AsynchronousRound, busy_clients
from fedloom.rounds.base import State
from fedloom.rounds.federated import FederatedRound, _add_totals

HANDOVER_KEY = 1 << 20  # Stream.SAMPLING keys (HANDOVER_KEY, round): a finished task's clients to the others
MAX_NEW_PER_ARRIVAL = 2  # fedast: new clients a task starts at one of its arrivals (the authors')


class AssignedRound(FederatedRound):
    """A sync task's federated round on the clients the simultaneous round gives it (``state['assigned']``);
    the round waits for all of them."""

    def _sample(self, state: State, round_idx: int) -> list[int]:
        return list(state["assigned"])

    def closing_count(self) -> int:
        return self.data.n_clients


class _Tasks:
    """What both simultaneous algorithms share: the tasks, their state around them, evaluation and the summary."""

    def __init__(self, cfg: ExperimentConfig, given: GivenParts, task_round: type):
        if given.datasets is not None or given.model is not None:
            raise ConfigError("mode = 'simultaneous' builds every task from its config; data and model given from "
                              "Python are not taken (name them in each task's set)")
        self.cfg, configs = cfg, cfg.task_configs()
        self.names = list(configs)
        self.tasks = [task_round(c) for c in configs.values()]
        sizes = {name: t.data.n_clients for name, t in zip(self.names, self.tasks)}
        if len(set(sizes.values())) > 1:
            raise ConfigError(f"simultaneous.tasks train on one federation's clients: their data have {sizes} clients")
        self.data, self.engine_name = self.tasks[0].data, self.tasks[0].engine_name
        self.system = self.tasks[0].system

    def task_init(self) -> State:
        m = len(self.tasks)
        return {"active": [t.cfg.asynchronous.concurrency for t in self.tasks], "running": [True] * m,
                "steps": [0] * m, "reached": dict.fromkeys(self.names), "counters": {}}

    def evaluate(self, state: State) -> dict[str, float]:
        """Every task's test metrics, as '<task>/<metric>'."""
        return {f"{name}/{k}": v for name, task in zip(self.names, self.tasks)
                for k, v in task.evaluate(state["tasks"][name]).items()}

    def final_params(self, state: State) -> Tensor:
        """The tasks' models' flat parameters, one after the other in task order."""
        return torch.cat([t.final_params(state["tasks"][n]) for n, t in zip(self.names, self.tasks)])

    def final_model(self, state: State) -> nn.Module:
        """The tasks' models by name (the saved model's keys are '<task>.<parameter>')."""
        return nn.ModuleDict({n: t.final_model(state["tasks"][n]) for n, t in zip(self.names, self.tasks)})

    def describe(self, state: State) -> dict[str, Any]:
        """Each task's facts, server steps and where it reached its target; the virtual seconds at which the
        last task reached its (None while any has not)."""
        reached = state["reached"]
        tasks = {n: {**t.describe(state["tasks"][n]), "server_steps": state["steps"][i],
                     "target_accuracy": t.cfg.evaluation.target_accuracy, "reached": reached[n]}
                 for i, (n, t) in enumerate(zip(self.names, self.tasks))}
        done = all(r is not None for r in reached.values())
        return {"simultaneous": self.cfg.simultaneous.algorithm, "tasks": tasks,
                "time_to_all_targets": max(r["virtual_seconds"] for r in reached.values()) if done else None}

    def graph_record(self) -> None:
        return None

    def check_target(self, st: State, m: int, round_idx: int, now: float, record: dict[str, Any]) -> bool:
        """Task m's central metrics into ``record`` when due (a target set, every ``evaluation.every`` of its
        server steps); True when they reach its target: the task is done."""
        task, name = self.tasks[m], self.names[m]
        target, steps = task.cfg.evaluation.target_accuracy, st["steps"][m]
        if target is None or steps % task.cfg.evaluation.every:
            return False
        x = task.final_params(st["tasks"][name]).to(task.device)
        metrics = evaluation.central(task.model, task.spec, x, task.data, task.task)
        record.update({f"{name}/{k}": v for k, v in metrics.items()})
        accuracy = metrics.get("central_accuracy", -1.0)
        if accuracy < target:
            return False
        st["reached"] = {**st["reached"], name: {"round": round_idx, "task_round": steps, "virtual_seconds": now,
                                                 "central_accuracy": accuracy}}
        return True

    def count(self, st: State, record: dict[str, Any]) -> dict[str, Any]:
        """The record with the run's byte totals; the run ends when no task trains."""
        st["counters"] = _add_totals(st["counters"], record)
        if not any(st["running"]):
            record["done"] = True
        return record


class FedASTRound(_Tasks):
    """FedAST (module docstring): a buffer per task on one virtual clock, Realloc between the tasks."""

    def __init__(self, cfg: ExperimentConfig, given: GivenParts = GivenParts()):
        super().__init__(cfg, given, AsynchronousRound)
        s = cfg.simultaneous
        self.total = sum(t.cfg.asynchronous.concurrency for t in self.tasks)
        self.period = s.realloc_every or self.total * 3 // 4
        self.steps_per_job = [float(local_steps(t.data.client_sizes(), local_training(t.cfg)).mean())
                              for t in self.tasks]
        self.weight_coordinates = [_weights_only(t.spec) for t in self.tasks]  # the variance skips biases

    def init_state(self) -> State:
        """Every task's state with its R_m clients started, the buffers and the Realloc statistics."""
        s, m = self.cfg.simultaneous, len(self.tasks)
        st = {**self.task_init(), "tasks": {n: t.idle_state() for n, t in zip(self.names, self.tasks)}, "now": 0.0,
              "jobs": 0, "windows": [[] for _ in range(m)], "variances": [[] for _ in range(m)], "arrivals": 0}
        st["buffers"] = [buffer_size(r, s.buffer_ratio) if s.realloc else t.cfg.asynchronous.buffer_size
                         for r, t in zip(st["active"], self.tasks)]
        for i, r in enumerate(st["active"]):
            for _ in range(r):
                st = self._start(st, i)
        return st

    def play(self, state: State, round_idx: int) -> tuple[State, dict[str, Any]]:
        """Arrivals in virtual-time order until some task's buffer is full; that task's server step."""
        st = {**state, "tasks": {n: _opened(sub) for n, sub in state["tasks"].items()},
              **{k: list(state[k]) for k in ("active", "running", "steps", "buffers", "windows", "variances")}}
        began = st["now"]
        while True:
            m = self._next_arrival(st)
            sub = st["tasks"][self.names[m]]
            finish, job, client, version = heapq.heappop(sub["queue"])
            st["now"] = sub["now"] = finish
            sub["buffer"].append((client, job, version, sub["version"] - version, 1.0))
            st["arrivals"] += 1
            st = self._refill(st, m)
            if self.cfg.simultaneous.realloc:
                st = self._realloc(st, m)
            if len(st["tasks"][self.names[m]]["buffer"]) >= st["buffers"][m]:
                return self._server_step(st, m, round_idx, began)

    def _next_arrival(self, st: State) -> int:
        """The running task whose next job finishes first (ties: the job started first)."""
        heads = [(st["tasks"][n]["queue"][0][:2], i) for i, n in enumerate(self.names)
                 if st["running"][i] and st["tasks"][n]["queue"]]
        if not heads:
            raise RuntimeError("no client is training for any running task (every task's R_m is 0)")
        return min(heads)[1]

    def _start(self, st: State, m: int) -> State:
        """A job for task m: an idle client (not in flight for any task, nor in task m's buffer) starts now."""
        name = self.names[m]
        busy = set().union(*({e[2] for e in sub["queue"]} for sub in st["tasks"].values()))
        busy |= busy_clients(st["tasks"][name])
        client, start = self.tasks[m].idle_client(busy, st["now"], (st["jobs"], 1 + m))
        sub = self.tasks[m].start_job(st["tasks"][name], client, start, st["jobs"])
        return {**st, "tasks": {**st["tasks"], name: sub}, "jobs": st["jobs"] + 1}

    def _refill(self, st: State, m: int) -> State:
        """After an arrival task m starts up to two clients while it has fewer than R_m in flight (and the
        tasks fewer than their total)."""
        in_flight = [len(st["tasks"][n]["queue"]) for n in self.names]
        new = min(st["active"][m] - in_flight[m], sum(st["active"]) - sum(in_flight), MAX_NEW_PER_ARRIVAL)
        for _ in range(max(new, 0)):
            st = self._start(st, m)
        return st

    def _realloc(self, st: State, m: int) -> State:
        """b_m follows task m's clients in flight; every period x running tasks arrivals, once every running task
        has a variance estimate and more server steps than the window, R follows the variances."""
        s = self.cfg.simultaneous
        st["buffers"][m] = buffer_size(len(st["tasks"][self.names[m]]["queue"]), s.buffer_ratio)
        running = st["running"]
        # the authors take the minimum over every task; a task finished early would then block Realloc for good
        steps = min(n for n, on in zip(st["steps"], running) if on)
        due = st["arrivals"] >= self.period * sum(running) and steps > s.variance_window
        if due and all(st["variances"][i] for i in range(len(running)) if running[i]):
            means = [float(np.mean(v)) if v else 0.0 for v in st["variances"]]
            st["active"] = reallocate(means, sum(st["active"]), s.buffer_ratio, running)
            st["variances"], st["arrivals"] = [[] for _ in running], 0
        return st

    def _server_step(self, st: State, m: int, round_idx: int, began: float) -> tuple[State, dict[str, Any]]:
        """Task m's FedBuff step on its buffer; the Realloc statistics, its target, the record."""
        task, name = self.tasks[m], self.names[m]
        sub, store = st["tasks"][name], ClientStore(st["tasks"][name]["clients"])
        if any(entry[1] not in sub["results"] for entry in sub["buffer"]):
            sub = task._train_pending(sub, store)
        if self.cfg.simultaneous.realloc:
            st = self._track_variance(st, m, [sub["results"][entry[1]][0] for entry in sub["buffer"]])
        sub, applied, metrics = task._flush(sub, round_idx, store)
        st["tasks"] = {**st["tasks"], name: {**sub, "clients": store.states}}
        st["steps"][m] += 1
        record = task._async_record(round_idx, st["now"] - began, applied, metrics)
        record = {"task": name, "task_round": st["steps"][m], f"{name}/train_loss": record.pop("train_loss"),
                  **record}
        if self.check_target(st, m, round_idx, st["now"], record):
            st = self._finish(st, m, round_idx)
            record["finished"] = name
        record["active"] = list(st["active"])
        return st, self.count(st, record)

    def _track_variance(self, st: State, m: int, rows: list[Tensor]) -> State:
        """Each of task m's new updates enters its window; every full window gives a variance estimate."""
        s, task = self.cfg.simultaneous, self.tasks[m]
        window, variances = list(st["windows"][m]), list(st["variances"][m])
        server_lr, client_lr = task.cfg.server_choice()[1], task.cfg.client.lr
        for row in rows:
            window = [*window, row][-s.variance_window:]
            if len(window) == s.variance_window:
                rows = torch.stack(window)[:, self.weight_coordinates[m]]
                variances.append(normalized_variance(rows, server_lr, client_lr, self.steps_per_job[m]))
        st["windows"][m], st["variances"][m] = window, variances
        return st

    def _finish(self, st: State, m: int, round_idx: int) -> State:
        """Task m is done: its clients' work is cancelled and its R_m goes to the running tasks, whose buffers
        become round(R / buffer_ratio); without Realloc they start the new clients at once, with it they grow
        at their own arrivals."""
        name, s = self.names[m], self.cfg.simultaneous
        sub = st["tasks"][name]
        st["tasks"] = {**st["tasks"], name: {**sub, "queue": [], "buffer": [], "results": {}, "starts": {}}}
        freed, st["active"][m], st["running"][m] = st["active"][m], 0, False
        rng = numpy_generator(self.cfg.seed, Stream.SAMPLING, HANDOVER_KEY, round_idx)
        extra = hand_over(freed, st["active"], st["running"], rng)
        st["active"] = [a + e for a, e in zip(st["active"], extra)]
        for i, add in enumerate(extra):
            if not add:
                continue
            st["buffers"][i] = max(1, round(st["active"][i] / s.buffer_ratio))  # the authors' in both modes
            for _ in range(0 if s.realloc else add):
                st = self._start(st, i)
        return st


class SyncSTRound(_Tasks):
    """Sync-ST (module docstring): every round each running task trains its R_m clients, drawn without overlap."""

    def __init__(self, cfg: ExperimentConfig, given: GivenParts = GivenParts()):
        super().__init__(cfg, given, AssignedRound)

    def init_state(self) -> State:
        """Every task's federated state tree, with the active clients and the targets' progress."""
        return {**self.task_init(), "tasks": {n: t.init_state() for n, t in zip(self.names, self.tasks)}}

    def play(self, state: State, round_idx: int) -> tuple[State, dict[str, Any]]:
        """One round of every running task on its share of the online clients; it lasts as long as the slowest."""
        st = {**state, **{k: list(state[k]) for k in ("active", "running", "steps")}, "tasks": dict(state["tasks"])}
        online = np.flatnonzero(self.system.available(state.get("virtual_seconds", 0.0)))
        order = numpy_generator(self.cfg.seed, Stream.SAMPLING, round_idx).permutation(online)
        record: dict[str, Any] = {"round": round_idx, "n_sampled": 0, "n_rejected": 0, "bytes_up": 0,
                                  "bytes_down": 0, "round_virtual_seconds": 0.0}
        trained, begin = [m for m in range(len(self.names)) if st["running"][m]], 0
        for m in trained:
            name = self.names[m]
            clients = sorted(order[begin:begin + st["active"][m]].tolist())
            begin += st["active"][m]
            st["tasks"][name], own = self.tasks[m].play({**st["tasks"][name], "assigned": clients}, round_idx)
            st["steps"][m] += 1
            _merge(record, name, own)
        end = state.get("virtual_seconds", 0.0) + record["round_virtual_seconds"]  # every task steps at the end
        finished = [m for m in trained if self.check_target(st, m, round_idx, end, record)]
        for m in finished:
            st = self._finish(st, m, round_idx)
        record.update(finished=[self.names[m] for m in finished], active=list(st["active"]))
        return st, self.count(st, record)

    def _finish(self, st: State, m: int, round_idx: int) -> State:
        """Task m is done; its clients go to the running tasks in proportion to theirs."""
        freed, st["active"][m], st["running"][m] = st["active"][m], 0, False
        rng = numpy_generator(self.cfg.seed, Stream.SAMPLING, HANDOVER_KEY, round_idx, m)
        st["active"] = [a + e for a, e in zip(st["active"], hand_over(freed, st["active"], st["running"], rng))]
        return st


def _merge(record: dict[str, Any], name: str, own: dict[str, Any]) -> None:
    """A sync task's round record into the round's: its loss under its name, the counts summed, the longest time."""
    record[f"{name}/train_loss"] = own["train_loss"]
    for key in ("n_sampled", "n_rejected", "bytes_up", "bytes_down"):
        record[key] += own.get(key, 0)
    record["round_virtual_seconds"] = max(record["round_virtual_seconds"], own.get("round_virtual_seconds", 0.0))


def _weights_only(spec: ParamSpec) -> Tensor:
    """The flat coordinates of every parameter but the biases (the authors' variance leaves biases out)."""
    return torch.cat([torch.full((size,), "bias" not in name.rsplit(".", 1)[-1], dtype=torch.bool)
                      for name, size in zip(spec.names, spec.sizes)])


def _opened(sub: State) -> State:
    """A copy of an asynchronous task's state whose queue, buffer, starts and results may change in place."""
    return {**sub, "queue": list(sub["queue"]), "buffer": list(sub["buffer"]), "starts": dict(sub["starts"]),
            "results": dict(sub["results"])}
