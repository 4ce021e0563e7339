"""A dataset dealt out to clients: the one object engines and algorithms read data from.

All clients' examples live in one tensor pair ``x, y``; a client is just two
index tensors into them (local train and local test). Keeping data in one place
lets the vectorized engine gather any set of clients' batches in one indexing call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .datasets import IGNORE, DataError, Dataset
from .loaders import NATURAL_CLIENTS
from .partition import NEEDS_LABELS, partition

_DATA_STREAM = 0xDA7A  # keeps these seeds apart from the streams of fedloom.core.rng
_HOLDOUT, _PARTITION, _LOCAL_SPLIT = range(3)


@dataclass
class FederatedData:
    """A dataset split among clients: all examples, each client's train and test indices into them, the global
    test set and what the model needs to know (classes, input shape)."""

    x: torch.Tensor  # all clients' examples
    y: torch.Tensor
    train_idx: list[torch.Tensor]  # per client, int64 indices into x/y for local training
    test_idx: list[torch.Tensor]  # per client, local test indices (may be empty)
    x_test: torch.Tensor  # global test set for central evaluation
    y_test: torch.Tensor
    n_classes: int  # classes; the vocabulary size of a language model; a regression's outputs
    task: str = "classification"  # the data's own task (fedloom.data.datasets.TASK_KINDS)
    vocabulary: tuple[str, ...] | None = None

    @property
    def n_clients(self) -> int:
        """The number of clients."""
        return len(self.train_idx)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example."""
        return tuple(self.x.shape[1:])

    def client_sizes(self) -> np.ndarray:
        """Training examples per client: FedAvg's aggregation weights."""
        return np.array([len(idx) for idx in self.train_idx], dtype=np.int64)

    def size(self) -> dict:
        """How big the federation is, for the summary: clients, training examples and, for a language
        model, the training tokens (targets that are not padding)."""
        size = {"n_clients": self.n_clients, "train_examples": int(self.client_sizes().sum())}
        if self.task == "language_model":
            trained = torch.cat(list(self.train_idx)) if self.n_clients else torch.zeros(0, dtype=torch.long)
            size["train_tokens"] = int((self.y[trained] != IGNORE).sum())
        return size

    def stats(self) -> dict:
        """JSON-able summary for the run directory; label_histogram counts each client's training labels
        (classification data only)."""
        stats = {
            "n_clients": self.n_clients,
            "n_classes": self.n_classes,
            "task": self.task,
            "train_sizes": self.client_sizes().tolist(),
            "test_sizes": [len(idx) for idx in self.test_idx],
            "global_test_size": len(self.y_test),
        }
        if self.task == "classification":
            stats["label_histogram"] = [torch.bincount(self.y[idx], minlength=self.n_classes).tolist()
                                        for idx in self.train_idx]
        if self.vocabulary is not None:
            stats["vocabulary_size"] = len(self.vocabulary)
        return stats


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _DATA_STREAM, step]))


def _split(strata: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) positions: about ``fraction`` of each stratum held out, never all of it.

    One shuffle and one stable sort for all strata: each stratum's held-out part
    is a uniformly random subset of it, in O(N log N) however many strata there are.
    """
    shuffled = rng.permutation(len(strata))
    grouped = shuffled[np.argsort(strata[shuffled], kind="stable")]  # stratum by stratum, random order within
    _, first, counts = np.unique(strata[grouped], return_index=True, return_counts=True)
    quota = np.minimum((fraction * counts + 0.5).astype(np.int64), counts - 1)
    rank = np.arange(len(strata)) - np.repeat(first, counts)
    held = np.zeros(len(strata), dtype=bool)
    held[grouped[rank < np.repeat(quota, counts)]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def _split_clients(parts: list[np.ndarray], fraction: float,
                   rng: np.random.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each client's (train, test) indices: ``fraction`` of its examples held out for
    local testing (never all), all clients in one :func:`_split` stratified by client."""
    owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    flat = np.concatenate(parts)
    kept, held = _split(owner, fraction, rng)

    def per_client(positions: np.ndarray) -> list[torch.Tensor]:
        bounds = np.cumsum(np.bincount(owner[positions], minlength=len(parts)))[:-1]
        return [torch.from_numpy(p) for p in np.split(flat[positions], bounds)]

    return per_client(kept), per_client(held)


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise DataError(f"{name} must be in [0, 1), got {value}")


def federate(
    train: Dataset,
    official_test: Dataset | None,
    partitioner: str,
    n_clients: int,
    seed: int,
    test_fraction: float = 0.2,
    client_test_fraction: float = 0.2,
    consume: bool = False,
    **partition_options,
) -> FederatedData:
    """Hold out a global test set, partition the rest over clients, split each client train/test.

    ``consume=True``: ``train``'s tensors are the caller's to discard, and the clients' examples are
    moved into them in place (peak memory 1.2x the examples, not 2x: a dataset may be gigabytes).

    Without an official test split, ``test_fraction`` of ``train`` is held out,
    stratified by label; for the "natural" partitioner it is stratified by natural
    client instead, so that no natural client loses all its data. Each client keeps
    at least one training example. Natural clients that the official test split names
    test on their own examples of it (``client_test_fraction`` does not apply). Every
    random step has its own seed stream.
    """
    _check_fraction("test_fraction", test_fraction)
    _check_fraction("client_test_fraction", client_test_fraction)
    natural = partitioner == "natural"
    if natural and train.groups is None:
        raise DataError(
            f"dataset {train.name!r} has no natural clients, so partitioner 'natural' does not apply; "
            f"datasets with natural clients: {NATURAL_CLIENTS}"
        )
    labels = _labels_for(train, partitioner)
    if official_test is None:
        pool, held = _split(train.groups if natural else labels, test_fraction, _rng(seed, _HOLDOUT))
        x_test, y_test = train.x[torch.from_numpy(held)], train.y[torch.from_numpy(held)]
    else:
        if official_test.input_shape != train.input_shape:
            raise DataError(
                f"dataset {train.name!r}: test inputs have shape {official_test.input_shape}, "
                f"train inputs {train.input_shape}"
            )
        if official_test.task != train.task:
            raise DataError(f"dataset {train.name!r}: the test split is {official_test.task} data, the train "
                            f"split {train.task} data")
        pool, x_test, y_test = np.arange(len(train)), official_test.x, official_test.y
    groups = None if train.groups is None else train.groups[pool]
    parts = partition(partitioner, labels[pool], n_clients, _rng(seed, _PARTITION), groups, **partition_options)
    n_classes = max(train.n_classes, 0 if official_test is None else official_test.n_classes)
    if consume:
        x, y = _moved_to_front(train.x, pool), _moved_to_front(train.y, pool)
    else:
        pool_t = torch.from_numpy(pool)
        x, y = train.x[pool_t], train.y[pool_t]
    if natural and official_test is not None and official_test.groups is not None:
        x, y, train_idx, test_idx = _own_tests(x, y, parts, groups, official_test)
    else:
        train_idx, test_idx = _split_clients(parts, client_test_fraction, _rng(seed, _LOCAL_SPLIT))
    return FederatedData(x, y, train_idx, test_idx, x_test, y_test, n_classes, train.task, train.vocabulary)


COMPACT_ROWS = 1 << 16  # rows _moved_to_front gathers at a time


def _moved_to_front(t: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """``t[rows]`` for ascending ``rows``, written over ``t``'s first ``len(rows)`` rows a block at a time
    (row k's source is at or after k, and each block is gathered before it is written); ``t`` is overwritten."""
    if len(rows) == len(t):
        return t
    for start in range(0, len(rows), COMPACT_ROWS):
        block = torch.from_numpy(rows[start:start + COMPACT_ROWS])
        t[start:start + len(block)] = t[block]
    return t[:len(rows)]


def _own_tests(x: torch.Tensor, y: torch.Tensor, parts: list[np.ndarray], groups: np.ndarray,
               test: Dataset) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Natural clients that the test split names (LEAF's per-user split): each client trains on all its
    examples and tests on its own test examples, appended after the training ones; a test split's
    client absent from training has no client, its examples stay in the central test set only."""
    ids = np.unique(groups)  # the natural partition's clients, in this order
    owner = np.searchsorted(ids, test.groups)
    known = (owner < len(ids)) & (ids[np.minimum(owner, len(ids) - 1)] == test.groups)
    positions = np.flatnonzero(known)
    by_client = positions[np.argsort(owner[positions], kind="stable")]
    bounds = np.cumsum(np.bincount(owner[positions], minlength=len(ids)))[:-1]
    test_idx = [torch.from_numpy(p + len(x)) for p in np.split(by_client, bounds)]
    return (torch.cat([x, test.x]), torch.cat([y, test.y]), [torch.from_numpy(p) for p in parts], test_idx)


def _labels_for(train: Dataset, partitioner: str) -> np.ndarray:
    """The class labels that stratify the held-out test set and drive label-skew partitioners; data
    without classes (regression, language modelling) is one stratum, and label skew does not apply."""
    labels = train.labels()
    if labels is not None:
        return labels
    if partitioner in NEEDS_LABELS:
        raise DataError(f"partitioner {partitioner!r} deals out examples by class label, and dataset "
                        f"{train.name!r} is {train.task} data without classes; use iid, quantity or natural")
    return np.zeros(len(train), dtype=np.int64)
