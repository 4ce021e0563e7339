"""The ray engine gives the serial engine's numbers (float tolerance) whichever
actor a client lands on, puts the model in the object store once per round,
and fails clearly without Ray or without a cluster."""

import copy
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray")

from fedloom.algorithms import ALGORITHMS  # noqa: E402
from fedloom.core.store import ClientStore  # noqa: E402
from fedloom.engines.ray_engine import (  # noqa: E402
    ClientWorker, RayEngine, RoundInputs, SharedData, connect, import_ray, split_evenly)
from fedloom.engines.serial import SerialEngine  # noqa: E402
from fedloom.aggregation.base import weighted_mean  # noqa: E402
from fedloom.builders import local_training  # noqa: E402
from helpers import stepper  # noqa: E402

QUICK = ["output.save=false", "output.progress=false", "evaluation.federated=false", "client.epochs=2",
         "partition.options.alpha=0.3", "engine.name=serial"]


def _experiment(*overrides):
    return stepper(*QUICK, *overrides)


@pytest.fixture(scope="module")
def shared_engine():
    """One engine for every test on the QUICK data: actors take seconds to start,
    and the engine does not depend on the algorithm."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    exp = _experiment()
    yield RayEngine(exp.model, exp.data, local_training(exp.cfg), exp.task, workers=2)
    ray.shutdown()


@pytest.fixture
def engine(shared_engine):
    return shared_engine


def _assert_same(a, b):
    assert b.client_ids == a.client_ids
    torch.testing.assert_close(b.U, a.U, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.weights, a.weights)
    torch.testing.assert_close(b.train_loss, a.train_loss, rtol=1e-4, atol=1e-6)
    assert b.aux.keys() == a.aux.keys()
    for k in a.aux:
        torch.testing.assert_close(b.aux[k], a.aux[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_rounds_equal_serial_whichever_actor_a_client_lands_on(engine, algorithm, monkeypatch):
    exp = _experiment(f"algorithm.name={algorithm}")
    put, puts = ray.put, []
    monkeypatch.setattr(ray, "put", lambda value: puts.append(value) or put(value))
    x, server, local_store, ray_store = exp.state["x"], exp.state["algorithm"], ClientStore(), ClientStore()
    # 7 clients over 2 actors go 3 + 4: clients 3-5 move from the second actor to the first and back
    for r, clients in enumerate([list(range(7)), list(range(3, 10)), list(range(7))], start=1):
        sent = exp.algorithm.broadcast(server)
        a = exp.engine.run_round(exp.algorithm, x, sent, clients, r, local_store)
        b = engine.run_round(exp.algorithm, x, sent, clients, r, ray_store)
        _assert_same(a, b)
        x, server = x - weighted_mean(a.U, a.weights), exp.algorithm.server_step(server, a.aux, 10)
    assert len(puts) == 3  # one object per round carries the model to every actor
    assert len(ray_store) == len(local_store) == 10
    for cid in range(10):
        for k, v in local_store.states[cid].items():
            torch.testing.assert_close(ray_store.states[cid][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_experiment_rounds_equal_serial(engine, algorithm):
    serial, swapped = _experiment(f"algorithm.name={algorithm}"), _experiment(f"algorithm.name={algorithm}")
    swapped.round_.engine = engine
    for r in range(1, 4):
        a, b = serial.round(r), swapped.round(r)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["central_accuracy"] == pytest.approx(a["central_accuracy"], abs=1e-9)
        torch.testing.assert_close(swapped.state["x"], serial.state["x"], rtol=1e-4, atol=1e-5)


def test_each_client_may_start_from_its_own_model(engine):
    exp = _experiment()
    clients = list(range(7))
    X0 = exp.state["x"] + 0.01 * torch.randn(len(clients), exp.spec.dim, generator=torch.Generator().manual_seed(0))
    _assert_same(exp.engine.run_round(exp.algorithm, X0, {}, clients, 1, ClientStore()),
                 engine.run_round(exp.algorithm, X0, {}, clients, 1, ClientStore()))


def test_gradient_tracking_reads_and_writes_the_driver_store_between_rounds(engine):
    def gossip():
        return stepper(*QUICK, 'mode="decentralized"', "topology.name=complete",
                       "decentralized.algorithm=gradient_tracking", "decentralized.participation=0.3")

    serial, swapped = gossip(), gossip()
    swapped.round_.engine = engine
    for r in range(1, 4):  # a different 30 nodes each round, so nodes change actors
        serial.round(r)
        swapped.round(r)
        torch.testing.assert_close(swapped.state["X"], serial.state["X"], rtol=1e-4, atol=1e-5)


def test_workers_train_vectorized_when_they_can_else_serially():
    exp = _experiment("client.batch_size=16")
    local = local_training(exp.cfg)
    assert ClientWorker(exp.model, SharedData.of(exp.data), local, exp.task, 2**30,
                        on_gpu=False).engine.name == "vectorized"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.ReLU(),
                          nn.Linear(16, exp.data.n_classes))
    serial = SerialEngine(copy.deepcopy(model), exp.data, local, exp.task)
    worker = ClientWorker(copy.deepcopy(model), SharedData.of(exp.data), local, exp.task, 2**30, on_gpu=False)
    assert worker.engine.name == "serial"
    x0, clients = serial.spec.flatten(model), list(range(5))
    result, states = worker.train(RoundInputs(exp.algorithm, x0, {}, clients, 1), slice(0, 5), {})
    _assert_same(serial.run_round(exp.algorithm, x0, {}, clients, 1, ClientStore()), result)
    assert sorted(states) == clients


def test_the_data_travels_as_arrays_and_comes_back_whole():
    data = _experiment().data
    back = SharedData.of(data).attached()
    for name in ("x", "y", "x_test", "y_test"):
        assert torch.equal(getattr(back, name), getattr(data, name))
    for name in ("train_idx", "test_idx"):
        assert len(getattr(back, name)) == len(getattr(data, name))
        assert all(torch.equal(a, b) for a, b in zip(getattr(back, name), getattr(data, name)))
    assert (back.n_classes, back.task, back.vocabulary) == (data.n_classes, data.task, data.vocabulary)


def test_workers_read_the_data_from_the_object_store_not_a_copy_each(engine):
    # Ray hands NumPy arrays over as read-only views of the node's shared memory: one copy a node
    assert ray.get([actor.data_in_shared_memory.remote() for actor in engine._actors]) == [True, True]


def test_split_evenly_keeps_round_order_and_balances():
    assert split_evenly(7, 2) == [slice(0, 3), slice(3, 7)]
    assert split_evenly(2, 3) == [slice(0, 1), slice(1, 2)]  # no empty calls
    clients = list(range(10))
    assert sum((clients[s] for s in split_evenly(10, 4)), []) == clients


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithms_survive_the_trip_to_an_actor(name):
    exp = _experiment(f"algorithm.name={name}")
    clone = ray.cloudpickle.loads(ray.cloudpickle.dumps(exp.algorithm))
    assert type(clone) is type(exp.algorithm) and clone.client_init(3).keys() == exp.algorithm.client_init(3).keys()


def test_missing_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install fedloom\[ray\]"):
        import_ray()


def _offline_ray(init):
    return SimpleNamespace(is_initialized=lambda: False, init=init)


def test_unreachable_address_is_named_without_waiting_for_ray():
    def init(address):
        raise AssertionError("ray.init should not be tried on a dead address")

    with pytest.raises(ConnectionError, match="'127.0.0.1:1'"):
        connect(_offline_ray(init), "127.0.0.1:1")


def test_no_cluster_to_join_is_named():
    def init(address):
        raise ConnectionError("Could not find any running Ray instance.")

    with pytest.raises(ConnectionError, match="address 'auto' \\(Could not find"):
        connect(_offline_ray(init), "auto")


def test_an_open_session_is_reused(shared_engine):
    connect(ray, "127.0.0.1:1")  # nothing listens there: would fail if it tried to connect


def test_a_killed_worker_is_restarted_and_the_round_gives_the_same_numbers(engine):
    exp = _experiment("algorithm.name=scaffold")
    clients = list(range(7))
    sent = exp.algorithm.broadcast(exp.state["algorithm"])
    expected = exp.engine.run_round(exp.algorithm, exp.state["x"], sent, clients, 1, ClientStore())
    ray.kill(engine._actors[0], no_restart=False)  # as if its process died: Ray restarts it, the call is retried
    _assert_same(expected, engine.run_round(exp.algorithm, exp.state["x"], sent, clients, 1, ClientStore()))


def test_a_round_that_crashes_leaves_a_complete_resumable_run_directory(tmp_path, monkeypatch):
    from fedloom import checkpoint
    from fedloom.rounds.federated import FederatedRound
    from fedloom.runner import RunFailed, run

    real_play = FederatedRound.play

    def lose_the_cluster_in_round_3(self, state, r):
        if r == 3:
            raise ray.exceptions.RayActorError()  # what Ray raises once a worker has died RESTARTS times
        return real_play(self, state, r)

    monkeypatch.setattr(FederatedRound, "play", lose_the_cluster_in_round_3)
    with pytest.raises(RunFailed, match="round 3 crashed \\(RayActorError") as failed:
        run(None, [*QUICK, "rounds=5", f"output.dir={str(tmp_path)!r}", "output.save=true"])
    run_dir = failed.value.result.run_dir
    assert failed.value.result.summary["status"] == "crashed" and failed.value.result.summary["rounds_done"] == 2
    assert checkpoint.load(run_dir / checkpoint.CHECKPOINT)["round"] == 2
    assert (run_dir / "model.safetensors").exists() and (run_dir / "report.html").exists()
    monkeypatch.setattr(FederatedRound, "play", real_play)
    assert run(None, [], resume=run_dir).summary["status"] == "completed"
