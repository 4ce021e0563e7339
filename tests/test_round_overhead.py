"""W1's per-round overhead cuts keep every result: the update matrix's validation (a row sum first,
element by element only for the rows whose sum is not finite), the batch plan's one gather over all
clients' indices, and no reordering when the clients already come in training order."""

import math

import numpy as np
import torch

from fedloom.aggregation.validate import reject_invalid
from fedloom.engines.base import batch_plan, block_starts
from helpers import stepper, train_once


def test_matrix_validation_rejects_nan_and_inf_and_keeps_rows_whose_sum_overflows():
    big = torch.finfo(torch.float32).max
    U = torch.tensor([[1.0, 2.0, 3.0],
                      [big, big, 0.0],  # finite, its sum overflows to inf: kept
                      [math.inf, -math.inf, 0.0],  # the sum is NaN
                      [0.0, math.nan, 1.0],
                      [-big, -big, 1.0],  # finite again
                      [0.0, 0.0, -math.inf]])
    out, w, rejected = reject_invalid(U, torch.ones(6), 3)
    assert rejected.tolist() == [False, False, True, True, False, True]
    assert torch.equal(out, U[[0, 1, 4]]) and w.tolist() == [1.0, 1.0, 1.0]


def test_batch_plan_indexes_each_clients_own_examples(quick):
    exp = stepper(*quick, "engine.name=vectorized", "data.n_clients=12", "partition.name=quantity")
    clients = [7, 3, 11, 0]
    plan, steps = exp.engine._batch_plan(clients, 2)
    positions, expected_steps = batch_plan(exp.engine.sizes[clients], np.asarray(clients), exp.engine.local, 2)
    assert steps.tolist() == expected_steps.tolist()
    # row by row (client after client) the global indices of the positions each client's plan names
    starts = block_starts(expected_steps)
    for i, c in enumerate(clients):
        own = exp.data.train_idx[c]
        for t in range(expected_steps[i]):
            row = plan[_row_of_step(steps, i, t)]
            want = torch.where(torch.from_numpy(positions[starts[i] + t]) >= 0,
                               own[torch.from_numpy(positions[starts[i] + t]).clamp(min=0)], -1)
            assert torch.equal(row, want)


def _row_of_step(steps, client, t):
    """The plan's row of ``client`` at step ``t``: the rows of the steps before, then the clients before it."""
    before = int(torch.minimum(steps, torch.tensor(t)).sum())
    return before + int((steps[:client] > t).sum())


def test_clients_in_any_order_get_the_same_rows(quick):
    exp = stepper(*quick, "engine.name=vectorized", "data.n_clients=20", "partition.name=quantity")
    ordered = sorted(range(20), key=lambda c: -exp.engine.sizes[c])  # longest first: returned as trained
    shuffled = list(np.random.default_rng(0).permutation(20))
    a = train_once(exp, exp.state["x"], ordered)
    b = train_once(exp, exp.state["x"], shuffled)
    assert a.client_ids == ordered and b.client_ids == shuffled
    at = {c: i for i, c in enumerate(ordered)}
    index = torch.tensor([at[c] for c in shuffled])
    torch.testing.assert_close(b.U, a.U[index], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.weights, a.weights[index])
