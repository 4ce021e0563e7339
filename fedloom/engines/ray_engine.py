"""The Ray engine: the round's clients train on Ray actors, for when one machine is not enough.

Each actor gets the federated data once, at creation, and keeps it: one ``ray.put``
of the data as NumPy arrays (``SharedData``), which Ray's workers read in place from
the node's shared-memory object store, so a node holds the data once however many
workers it runs (torch tensors would be deserialized into a copy per worker). Each
round the algorithm, the global model (or each client's own starting model, for
gossip) and what the server broadcasts go into
the object store once; the sampled clients are split evenly over the actors, and
each actor trains its share with the vectorized engine when the model allows
it, else with the serial one.

Client state (SCAFFOLD's control variates) stays in the driver's store (the run's state tree):
every call carries the states of its clients and returns the new ones. Results
then do not depend on which actor a client lands on, on the number of actors,
or on an actor being restarted, and the store is in one place for checkpoints;
the price is 2 x d' floats per stateful client per round on the wire.
"""

from __future__ import annotations

import socket
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedloom.core.store import ClientState, ClientStore
from fedloom.data.federated import FederatedData
from fedloom.engines.base import LocalTraining, RoundResult, concatenate, starts_of
from fedloom.engines.serial import SerialEngine
from fedloom.engines.memory import keep_freed_memory
from fedloom.engines.vectorized import DEFAULT_MEMORY_BUDGET, VectorizedEngine, why_not_vectorize
from fedloom.tasks import Task

CONNECT_TIMEOUT_S = 5.0
RESTARTS = 3  # times a killed worker is restarted (and its round's call retried) before the run stops


def import_ray():
    """Ray is an optional dependency: say how to get it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("the ray engine needs Ray: pip install fedloom[ray]") from err
    return ray


def connect(ray, address: str | None) -> None:
    """Join the cluster at ``address`` ("auto": the one running here), or start a
    local one for None; a session already open in this process is reused."""
    if ray.is_initialized():
        return
    _check_reachable(address)
    try:
        ray.init(address=address)
    except ConnectionError as err:
        raise _cannot_connect(address, _innermost_message(err)) from err


def _check_reachable(address: str | None) -> None:
    """Fail in seconds on a dead ``host:port``, where ray.init retries for minutes."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        raise _cannot_connect(address, err) from None


def _innermost_message(err: BaseException) -> str:
    """Ray wraps the telling error (e.g. a missing auth token) in generic ones,
    the innermost as the last line of a formatted traceback."""
    while err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[-1]


def _cannot_connect(address: str, reason: object) -> ConnectionError:
    return ConnectionError(f"cannot connect to a Ray cluster at address {address!r} ({reason}); start one with "
                           "`ray start --head`, or leave the address unset to start a local Ray")


@dataclass(frozen=True)
class SharedData:
    """FederatedData as NumPy arrays, the form Ray's object store hands to workers without copying (read-only
    views of the node's shared memory); the client index lists as one array and their lengths."""

    arrays: dict[str, np.ndarray]  # x, y, x_test, y_test, train (every client's indices), test
    train_sizes: np.ndarray
    test_sizes: np.ndarray
    n_classes: int
    task: str
    vocabulary: tuple[str, ...] | None

    @classmethod
    def of(cls, data: FederatedData) -> "SharedData":
        """``data``'s tensors as arrays (the driver's memory, until ``ray.put`` copies them into the store)."""
        joined = lambda parts: torch.cat(parts).numpy() if parts else np.empty(0, np.int64)  # noqa: E731
        arrays = {"x": data.x.numpy(), "y": data.y.numpy(), "x_test": data.x_test.numpy(),
                  "y_test": data.y_test.numpy(), "train": joined(data.train_idx), "test": joined(data.test_idx)}
        sizes = lambda parts: np.array([len(p) for p in parts], dtype=np.int64)  # noqa: E731
        return cls(arrays, sizes(data.train_idx), sizes(data.test_idx), data.n_classes, data.task, data.vocabulary)

    def attached(self) -> FederatedData:
        """The FederatedData over these arrays, not copied. The engines only read their data; torch warns that
        the arrays are read-only, which here is the point."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = {k: torch.from_numpy(v) for k, v in self.arrays.items()}
        split = lambda flat, sizes: list(torch.split(flat, sizes.tolist()))  # noqa: E731
        return FederatedData(t["x"], t["y"], split(t["train"], self.train_sizes), split(t["test"], self.test_sizes),
                             t["x_test"], t["y_test"], self.n_classes, self.task, self.vocabulary)


def split_evenly(n: int, parts: int) -> list[slice]:
    """Contiguous, non-empty shares of ``n`` clients whose sizes differ by at most one, in round order."""
    bounds = [i * n // parts for i in range(parts + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:]) if stop > start]


@dataclass
class RoundInputs:
    """What every actor reads in a round, put in the object store once."""

    algorithm: Any
    x0: Tensor  # the global model [d], or each client's own [n, d]
    sent: dict[str, Tensor]
    client_ids: list[int]
    round_idx: int


class ClientWorker:
    """What runs inside one actor: a local engine over the actor's copy of the data."""

    def __init__(self, model: nn.Module, shared: SharedData, local: LocalTraining, task: Task, memory_budget: int,
                 on_gpu: bool, keep_memory: bool = True):
        device = torch.device("cuda" if on_gpu else "cpu")  # Ray makes the actor's GPU share its "cuda"
        self.shared = shared  # held: the tensors below are views of its arrays in the object store
        data = shared.attached()
        serial = why_not_vectorize(model, device)
        if keep_memory and not serial:  # the worker's own process: engine.keep_freed_memory, as in the driver
            keep_freed_memory()
        self.engine = (SerialEngine(model, data, local, task, device) if serial
                       else VectorizedEngine(model, data, local, task, memory_budget, device))

    def train(self, inputs: RoundInputs, share: slice,
              states: dict[int, ClientState]) -> tuple[RoundResult, dict[int, ClientState]]:
        """Train the round's clients in ``share`` from the states the driver holds; return their new states."""
        client_ids = inputs.client_ids[share]
        x0 = starts_of(inputs.x0, share)
        store = ClientStore(states)
        result = self.engine.run_round(inputs.algorithm, x0, inputs.sent, client_ids, inputs.round_idx, store)
        return result, {cid: store.get(cid, dict) for cid in client_ids}

    def data_in_shared_memory(self) -> bool:
        """Whether this worker's examples are the object store's read-only arrays, not a copy of its own."""
        return not self.shared.arrays["x"].flags.writeable

    def node(self) -> str:
        """The id of the Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()


class RayEngine:
    """Clients on Ray actors (``workers`` of them, at ``address`` or a local Ray), each running the vectorized
    engine on its share of the round's clients."""

    name = "ray"

    def __init__(self, model: nn.Module, data: FederatedData, local: LocalTraining, task: Task,
                 address: str | None = None, workers: int = 2, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 gpus_per_worker: float = 0.0, keep_memory: bool = True):
        if workers < 1:
            raise ValueError(f"the ray engine needs at least one worker, got workers = {workers}")
        self._ray = import_ray()
        connect(self._ray, address)
        # a killed worker is restarted and its call retried: train() is a pure function of its inputs
        actor = self._ray.remote(num_cpus=1, num_gpus=gpus_per_worker, scheduling_strategy="SPREAD",
                                 max_restarts=RESTARTS, max_task_retries=RESTARTS)(ClientWorker)
        # held for the engine's life: a restarted worker is built from it again
        self._data = self._ray.put(SharedData.of(data))
        self._actors = [actor.remote(model, self._data, local, task, memory_budget, gpus_per_worker > 0, keep_memory)
                        for _ in range(workers)]

    def placement(self) -> dict[str, int]:
        """How many workers the run has and on how many Ray nodes (machines) they landed."""
        nodes = self._ray.get([actor.node.remote() for actor in self._actors])
        return {"ray_workers": len(self._actors), "ray_nodes": len(set(nodes))}

    def run_round(self, algorithm, x0: Tensor, sent: dict[str, Tensor], client_ids: list[int],
                  round_idx: int, store: ClientStore) -> RoundResult:
        """Split the round's clients evenly over the actors, train them there and gather the rows in client order;
        the clients' new states are put back in ``store``."""
        client_ids = list(client_ids)
        inputs = self._ray.put(RoundInputs(algorithm, x0, sent, client_ids, round_idx))
        calls = [actor.train.remote(inputs, share, _states_of(store, client_ids[share]))
                 for actor, share in zip(self._actors, split_evenly(len(client_ids), len(self._actors)))]
        results = self._ray.get(calls)
        for _, states in results:
            for cid, state in states.items():
                store.put(cid, state)
        return concatenate([result for result, _ in results])


def _states_of(store: ClientStore, client_ids: list[int]) -> dict[int, ClientState]:
    """The stored states of the clients seen before; new ones start on the actor."""
    return {cid: store.get(cid, dict) for cid in client_ids if cid in store}
