"""What every engine shares: the local-training settings, the round result,
the functional loss, and the order of a client's batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedloom.core.local_optim import Adam, SGD
from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, counter_keys, numpy_generator
from fedloom.core.store import ClientStore
from fedloom.tasks import Task, mean_loss


@dataclass(frozen=True)
class LocalTraining:
    """The clients' local training: the optimizer, epochs (or a fixed number of ``steps``), batch size and seed."""

    optimizer: SGD | Adam
    epochs: int
    batch_size: int
    seed: int
    steps: int | None = None  # a fixed number of local steps (batches) instead of epochs


@dataclass
class RoundResult:
    """What a round's clients return: their ids, the rows ``U``, the weights (examples used), side matrices and
    each client's mean training loss."""

    client_ids: list[int]
    U: Tensor  # [n, d] rows x_global - x_local
    weights: Tensor  # [n] training examples each client used
    aux: dict[str, Tensor]  # extra [n, d'] matrices (e.g. SCAFFOLD's delta_c)
    train_loss: Tensor  # [n] mean loss over each client's local steps


class Engine(Protocol):
    """Runs the clients' local training. ``x0`` is the global model ``[d]``, or
    each client's own starting model ``[n, d]`` (decentralized learning). ``store``
    holds the clients' persistent states: read, and the new ones put back (it is
    the round's copy of the state tree's, so an engine keeps no client state)."""

    def run_round(self, algorithm: Any, x0: Tensor, sent: dict[str, Tensor], client_ids: list[int],
                  round_idx: int, store: ClientStore) -> RoundResult:
        """Train ``client_ids`` in round ``round_idx`` from ``x0`` with the algorithm's client side (``sent``: what
        its server broadcast); their new states go back into ``store``."""


def functional_loss(model: nn.Module, spec: ParamSpec, task: Task) -> Callable[..., Tensor]:
    """The task's mean loss of ``model`` run with the flat parameters ``flat`` on a batch
    (``valid`` masks the padding examples of a short batch)."""

    def loss(flat: Tensor, xb: Tensor, yb: Tensor, valid: Tensor | None = None) -> Tensor:
        return mean_loss(task, functional_call(model, spec.unflatten(flat), (xb,)), yb, valid)

    return loss


def client_objective(algorithm: Any, loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The loss a client rule trains its rows on: the model's ``loss``, or the rule's own ``objective``
    built on it (APFL's, on a row holding two models and a mixing weight)."""
    objective = getattr(algorithm, "objective", None)
    return loss if objective is None else objective(loss)


def projected(algorithm: Any, x: Tensor) -> Tensor:
    """The rows after a local step, put back in the rule's feasible set when it has one (APFL's alpha in [0, 1])."""
    project = getattr(algorithm, "project", None)
    return x if project is None else project(x)


def local_steps(sizes: np.ndarray, local: LocalTraining) -> np.ndarray:
    """Local steps (batches) of clients holding ``sizes`` training examples."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if local.steps is not None:
        return np.where(sizes > 0, local.steps, 0)
    return -(-sizes // local.batch_size) * local.epochs


def block_starts(lengths: np.ndarray) -> np.ndarray:
    """Where each of consecutive blocks of ``lengths`` begins."""
    return np.cumsum(lengths) - lengths


def block_offsets(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every element of consecutive blocks of ``lengths``: its block, and its place in the block."""
    block = np.repeat(np.arange(len(lengths)), lengths)
    return block, np.arange(len(block)) - block_starts(lengths)[block]


def shuffles(sizes: np.ndarray, epochs: np.ndarray, client_ids: np.ndarray, local: LocalTraining,
             round_idx: int) -> np.ndarray:
    """Each client's ``epochs`` permutations of ``range(size)``, concatenated client by client, epoch by epoch.

    A position's place in its epoch is the rank of a counter-based hash of
    (seed, round, client, epoch, position), so a client's order depends on
    nothing but those: not on the engine, the chunking or the other clients.
    """
    client, offset = block_offsets(sizes * epochs)
    epoch, position = np.divmod(offset, np.maximum(sizes, 1)[client])
    keys = counter_keys(local.seed, Stream.BATCHES, round_idx, np.asarray(client_ids)[client], epoch, position)
    return position[np.lexsort((keys, epoch, client))]


def batch_plan(sizes: np.ndarray, client_ids: np.ndarray, local: LocalTraining,
               round_idx: int) -> tuple[np.ndarray, np.ndarray]:
    """Every client's batches as positions into its own examples, ``[total steps, batch_size]``
    client after client (-1 pads an epoch's short last batch), and each client's number of steps.

    Batches never span two epochs; with ``local.steps`` set, epochs repeat until that many batches.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    steps = local_steps(sizes, local)
    per_epoch = np.maximum(-(-sizes // local.batch_size), 1)
    epochs = -(-steps // per_epoch)  # the last one possibly cut short by local.steps
    order = shuffles(sizes, epochs, client_ids, local, round_idx)
    client, t = block_offsets(steps)
    epoch, batch = np.divmod(t, per_epoch[client])
    place = batch[:, None] * local.batch_size + np.arange(local.batch_size)  # within the epoch
    valid = place < sizes[client, None]
    start = block_starts(sizes * epochs)[client] + epoch * sizes[client]
    return np.where(valid, order[np.where(valid, start[:, None] + place, 0)], -1), steps


def batch_order(n_examples: int, local: LocalTraining, round_idx: int, client_id: int) -> Iterator[Tensor]:
    """Positions of one client's examples, batch by batch, epoch by epoch (see :func:`batch_plan`)."""
    positions, _ = batch_plan(np.array([n_examples]), np.array([client_id]), local, round_idx)
    for row in torch.from_numpy(positions):
        yield row[row >= 0]


def two_point(algorithm: Any) -> bool:
    """Whether the algorithm's local step needs the gradient at a second point on the same batch (FedAMD's
    recursive estimator): it then gives ``local_init(x0, sent, cstate) -> lstate`` and
    ``local_direction(g, g_prev, x, lstate) -> (direction, lstate)`` in place of ``correct_grad``, where
    ``g_prev`` is the gradient at ``lstate["x_prev"]``."""
    return getattr(algorithm, "two_point", False)


def large_batch(n_examples: int, batch_size: int, seed: int, round_idx: int, client_id: int) -> np.ndarray:
    """Positions of a client's one large batch (FedAMD's anchors): ``batch_size`` of its examples drawn
    without replacement from Stream.ANCHOR keyed by round and client, or all of them when ``batch_size``
    is 0 or not smaller."""
    if batch_size == 0 or batch_size >= n_examples:
        return np.arange(n_examples)
    rng = numpy_generator(seed, Stream.ANCHOR, round_idx, client_id)
    return np.sort(rng.choice(n_examples, size=batch_size, replace=False))


def concatenate(parts: list[RoundResult]) -> RoundResult:
    """One round's result from results of consecutive groups of its clients, in order."""
    return RoundResult([c for p in parts for c in p.client_ids], torch.cat([p.U for p in parts]),
                       torch.cat([p.weights for p in parts]),
                       {k: torch.cat([p.aux[k] for p in parts]) for k in parts[0].aux},
                       torch.cat([p.train_loss for p in parts]))


def rows_of(result: RoundResult, index: Tensor) -> RoundResult:
    """The result's rows at ``index``, in that order."""
    return RoundResult([result.client_ids[i] for i in index.tolist()], result.U[index], result.weights[index],
                       {k: v[index] for k, v in result.aux.items()}, result.train_loss[index])


def starts_of(x0: Tensor, index: int | slice) -> Tensor:
    """The starting model(s) of the clients at ``index``: the shared model ``[d]``,
    or their own rows of ``[n, d]`` (decentralized nodes)."""
    return x0[index] if x0.dim() == 2 else x0
