"""The vectorized engine gives the serial engine's numbers (float tolerance),
masks short clients exactly, chunks under a memory budget, and refuses models
it would get wrong."""

import numpy as np
import pytest
import torch
from torch import nn

from fedloom.config import ConfigError
from fedloom.core.local_optim import SGD
from fedloom.engines.base import LocalTraining, batch_order, batch_plan, local_steps
from fedloom.engines.vectorized import UnsupportedModel, VectorizedEngine, check_vectorizable
from fedloom.builders import local_training
from fedloom.core.store import ClientStore
from fedloom.runner import run
from helpers import stepper, train_once


def _pair(quick, *overrides):
    common = [*quick, "evaluation.federated=false", *overrides]
    return stepper(*common, "engine.name=serial"), stepper(*common, "engine.name=vectorized")


@pytest.mark.parametrize("algorithm", [
    ["algorithm.name=fedavg"],
    ["algorithm.name=fedprox", "algorithm.options.mu=0.1"],
    ["algorithm.name=scaffold"],
    ["algorithm.name=fedadam", "client.optimizer=adam", "client.lr=0.01"],
    ["algorithm.name=fedavg", "client.momentum=0.9", "client.weight_decay=0.01"],
])
def test_vectorized_equals_serial_per_round(quick, algorithm):
    serial, vectorized = _pair(quick, *algorithm, "client.epochs=2", "partition.options.alpha=0.3")
    sizes = serial.data.client_sizes()
    assert sizes.max() > sizes.min()  # unequal clients: masking is exercised
    for r in range(1, 4):
        a, b = serial.round(r), vectorized.round(r)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["central_accuracy"] == pytest.approx(b["central_accuracy"], abs=1e-9)
        torch.testing.assert_close(vectorized.state["x"], serial.state["x"], rtol=1e-4, atol=1e-5)


def test_short_clients_stop_exactly_where_they_would_alone(quick):
    serial, vectorized = _pair(quick, "data.n_clients=30", "partition.name=quantity", "sampling.clients_per_round=30")
    assert vectorized.data.client_sizes().max() > 3 * vectorized.data.client_sizes().min()
    clients = list(range(30))
    a = train_once(serial, serial.state["x"], clients)
    b = train_once(vectorized, vectorized.state["x"], clients)
    torch.testing.assert_close(b.U, a.U, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.train_loss, a.train_loss, rtol=1e-4, atol=1e-6)


def test_chunks_give_the_same_result_as_one_batch(quick):
    exp = stepper(*quick, "engine.name=vectorized", "algorithm.name=scaffold")
    tiny = VectorizedEngine(exp.model, exp.data, local_training(exp.cfg), exp.task, memory_budget=1)
    assert tiny.chunk_size == 1 and exp.engine.chunk_size >= 10
    sent = exp.algorithm.broadcast(exp.state["algorithm"])
    clients = list(range(10))
    whole = train_once(exp, exp.state["x"], clients, sent)
    chunked = tiny.run_round(exp.algorithm, exp.state["x"], sent, clients, 1, ClientStore())
    torch.testing.assert_close(chunked.U, whole.U, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.aux["delta_c"], whole.aux["delta_c"], rtol=1e-4, atol=1e-5)


def test_memory_budget_bounds_chunk_size(quick):
    exp = stepper(*quick, "engine.name=vectorized", "model.name=cnn")
    small = VectorizedEngine(exp.model, exp.data, local_training(exp.cfg), exp.task, memory_budget=64 * 2**20)
    large = VectorizedEngine(exp.model, exp.data, local_training(exp.cfg), exp.task, memory_budget=2**31)
    assert 1 <= small.chunk_size < large.chunk_size


def test_batchnorm_and_dropout_are_refused_with_a_pointer_to_serial():
    with pytest.raises(UnsupportedModel, match="BatchNorm.*serial"):
        check_vectorizable(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    with pytest.raises(UnsupportedModel, match="dropout.*serial"):
        check_vectorizable(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
    check_vectorizable(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0)))


class BatchNormNet(nn.Module):
    def __init__(self, input_shape, n_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, n_classes))

    def forward(self, x):
        return self.net(x)


def test_auto_falls_back_to_serial_and_explicit_vectorized_is_refused(quick):
    user_model = f"{__name__}:BatchNormNet"
    result = run(None, [*quick, f"model.name={user_model!r}", "rounds=1", "client.batch_size=16"])
    assert result.summary["engine"] == "serial"
    with pytest.raises(ConfigError, match="engine.name.*serial"):
        run(None, [*quick, f"model.name={user_model!r}", "engine.name=vectorized"])


def test_auto_picks_vectorized_for_plain_models_and_serial_for_conv_nets(quick):
    assert run(None, [*quick, "rounds=1"]).summary["engine"] == "vectorized"
    assert run(None, [*quick, "rounds=1", "model.name=cnn", "evaluation.federated=false"]).summary["engine"] == "serial"


def _local(**kw):
    return LocalTraining(SGD(lr=0.1), **{"epochs": 2, "batch_size": 4, "seed": 3, **kw})


def test_batch_plan_is_each_clients_own_shuffle_epoch_by_epoch():
    sizes, ids = np.array([5, 9, 1, 4]), np.array([11, 3, 7, 42])
    positions, steps = batch_plan(sizes, ids, _local(), round_idx=2)
    assert steps.tolist() == [4, 6, 2, 2] and positions.shape == (14, 4)
    rows = np.split(positions, np.cumsum(steps)[:-1])
    for size, client_rows, per_epoch in zip(sizes, rows, [2, 3, 1, 1]):
        for epoch in np.split(client_rows, 2):  # batches never span two epochs
            real = epoch[epoch >= 0]
            assert sorted(real.tolist()) == list(range(size))
            assert (epoch >= 0).sum(axis=1).tolist() == [min(4, size - 4 * b) for b in range(per_epoch)]
    assert not np.array_equal(rows[1][:3], rows[1][3:])  # a new shuffle each epoch


def test_batch_order_does_not_depend_on_the_other_clients_or_their_order():
    sizes, ids = np.array([5, 9, 30, 4]), np.array([11, 3, 7, 42])
    together, steps = batch_plan(sizes, ids, _local(), 2)
    rows = dict(zip(ids.tolist(), np.split(together, np.cumsum(steps)[:-1])))
    for size, cid in zip(sizes, ids):
        alone, _ = batch_plan(np.array([size]), np.array([cid]), _local(), 2)
        np.testing.assert_array_equal(alone, rows[cid])
        assert [b.tolist() for b in batch_order(int(size), _local(), 2, int(cid))] == \
            [r[r >= 0].tolist() for r in alone]
    reversed_, _ = batch_plan(sizes[::-1], ids[::-1], _local(), 2)
    np.testing.assert_array_equal(reversed_[:len(rows[42])], rows[42])
    other_round, _ = batch_plan(sizes, ids, _local(), 3)
    other_seed, _ = batch_plan(sizes, ids, _local(seed=4), 2)
    assert not np.array_equal(other_round, together) and not np.array_equal(other_seed, together)


def test_fixed_local_steps_run_over_as_many_epochs_as_needed():
    positions, steps = batch_plan(np.array([5, 40, 0]), np.array([0, 1, 2]), _local(steps=5), 1)
    assert steps.tolist() == [5, 5, 0] and len(positions) == 10
    first = positions[:5]
    assert sorted(first[:2][first[:2] >= 0].tolist()) == list(range(5))  # 5 examples: 2 batches an epoch
    assert (first >= 0).sum(axis=1).tolist() == [4, 1, 4, 1, 4]
    assert (positions[5:] >= 0).all()  # 40 examples: 5 full batches, all distinct
    assert len(set(positions[5:].ravel().tolist())) == 20


def test_results_come_back_in_the_callers_client_order(quick):
    serial, vectorized = _pair(quick, "data.n_clients=20", "partition.name=quantity", "client.epochs=2")
    clients = [7, 2, 19, 0, 11, 5]  # unsorted, unequal sizes: the engine trains them longest first
    assert len(set(local_steps(vectorized.data.client_sizes()[clients], vectorized.engine.local))) > 2
    a = train_once(serial, serial.state["x"], clients)
    b = train_once(vectorized, vectorized.state["x"], clients)
    assert b.client_ids == clients
    torch.testing.assert_close(b.weights, a.weights)
    torch.testing.assert_close(b.U, a.U, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.train_loss, a.train_loss, rtol=1e-4, atol=1e-6)
