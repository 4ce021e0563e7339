"""FedAST's allocation rules (Askin, Sharma, Joe-Wong, Joshi 2024, "FedAST: Federated Asynchronous Simultaneous
Training"), as pure functions; ``rounds/simultaneous.py`` runs them on the virtual clock.

Several tasks (models) train at once on one pool of clients. Task m keeps R_m clients training (its active
clients) and a buffer of b_m updates: a full buffer is one server step of that task (FedBuff's, without a
staleness discount). Realloc moves active clients to the tasks whose updates vary most: every so many
arrivals R_m becomes proportional to the task's normalized update variance, in chunks of ``buffer_ratio``,
and b_m = ceil(R_m / buffer_ratio). A task that reaches its target hands its clients to the others in
proportion to theirs. Checked against the authors' released code (askinb/FedAST, ``server.py``:
``calculateUpdVariance``, ``redistributeActiveWorks``, ``async_run_fedast``, the finished-task hand-over).
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor


def normalized_variance(rows: Tensor, server_lr: float, client_lr: float, local_steps: float) -> float:
    """The spread of a task's last updates, scaled to compare tasks: sum_j ||u_j - u_bar||^2 / (W ||u_bar||^2)
    times eta_g / (eta_l L^2) (L: local steps), the authors' estimate (on the weights, biases left out, as they
    do). Their code's final ``**1/2`` halves every task's value alike, which leaves the proportions Realloc
    uses unchanged, so it is left out here."""
    mean = rows.mean(dim=0)
    spread = float(((rows - mean) ** 2).sum())
    scale = float((mean ** 2).sum()) * len(rows)
    if scale == 0.0:
        return 0.0
    return spread / scale * server_lr / (client_lr * local_steps ** 2)


def reallocate(variances: list[float], total: int, ratio: int, running: list[bool]) -> list[int]:
    """Realloc: every running task gets a chunk of ``ratio`` active clients, then chunks go one at a time to
    the task furthest below its share total * v_m / sum v; finished tasks get none. The last chunk is cut so
    the tasks' clients add up to ``total`` (the authors' may overshoot by less than a chunk); chunks are of one
    client when ``ratio`` clients for every running task would be more than there are."""
    chunk_size = ratio if ratio * sum(running) <= total else 1
    scores = [v if on else 0.0 for v, on in zip(variances, running)]
    weight = sum(scores)
    new = [chunk_size if on else 0 for on in running]
    deficit = [(int(total * s / weight) if weight > 0 else 0) - chunk_size if on else -math.inf
               for s, on in zip(scores, running)]
    left = total - sum(new)
    while left > 0:
        m = int(np.argmax(deficit))
        chunk = min(chunk_size, left)
        new[m] += chunk
        deficit[m] -= chunk
        left -= chunk
    return new


def hand_over(freed: int, active: list[int], running: list[bool], rng: np.random.Generator) -> list[int]:
    """A finished task's ``freed`` clients shared among the running tasks in proportion to their active
    clients (floored), the rest one by one to running tasks drawn uniformly (as the authors do)."""
    total = sum(a for a, on in zip(active, running) if on)
    extra = [int(freed * a / total) if on and total else 0 for a, on in zip(active, running)]
    candidates = [m for m, on in enumerate(running) if on]
    while sum(extra) < freed and candidates:
        extra[int(rng.choice(candidates))] += 1
    return extra


def buffer_size(active: int, ratio: int) -> int:
    """b_m with Realloc: ceil(R_m / buffer_ratio), at least 1."""
    return max(1, -(-active // ratio))
