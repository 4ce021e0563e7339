"""Central evaluation (the global test set) and federated evaluation (each
client's local test set: the pooled mean, and the worst 10% of clients as a
fairness view), of the metrics the task names (``fedloom.tasks``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fedloom.core.params import ParamSpec
from fedloom.data.federated import FederatedData
from fedloom.tasks import Task
from fedloom.tasks.base import Terms


@torch.no_grad()
def per_example(model: nn.Module, spec: ParamSpec, flat: Tensor, x: Tensor, y: Tensor, task: Task,
                batch_size: int = 2048) -> dict[str, Terms]:
    """Every metric's (sum, count) of each example (``fedloom.tasks``), for the model with parameters
    ``flat``, computed on the device ``flat`` is on, ``batch_size`` examples at a time."""
    was_training = model.training
    model.eval()
    params = spec.unflatten(flat)
    parts: list[dict[str, Terms]] = []
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size].to(flat.device), y[start:start + batch_size].to(flat.device)
        parts.append(task.metric_terms(functional_call(model, params, (xb,)), yb))
    model.train(was_training)
    if not parts:
        return {}
    return {k: (torch.cat([p[k][0] for p in parts]).cpu(), torch.cat([p[k][1] for p in parts]).cpu())
            for k in parts[0]}


def pooled(terms: dict[str, Terms], task: Task, prefix: str) -> dict[str, float]:
    """Each metric over all the examples (sum of sums over sum of counts), as ``<prefix>_<metric>``."""
    means = {k: (total.sum() / count.sum()).item() for k, (total, count) in terms.items()}
    return {f"{prefix}_{k}": v for k, v in task.finish(means).items()}


def central(model: nn.Module, spec: ParamSpec, flat: Tensor, data: FederatedData, task: Task) -> dict[str, float]:
    """The global model's metrics on the held-out test set, as ``central_<metric>``."""
    return pooled(per_example(model, spec, flat, data.x_test, data.y_test, task), task, "central")


def federated(model: nn.Module, spec: ParamSpec, flat: Tensor, data: FederatedData, task: Task) -> dict[str, float]:
    """Every metric over all clients' local test examples, and the task's primary metric averaged over
    the 10% of clients (with a test set) for whom it is worst."""
    terms, owners = client_terms(model, spec, flat, data, task)
    if owners is None:
        return {}
    return {**pooled(terms, task, "federated"), **worst10(by_client(terms, owners, data.n_clients, task), task,
                                                          "federated")}


def client_terms(model: nn.Module, spec: ParamSpec, flat: Tensor, data: FederatedData,
                 task: Task) -> tuple[dict[str, Terms], Tensor | None]:
    """Every metric's terms on all clients' local test examples, and each example's client (None when no
    client has test examples). ``flat`` is one model ``[d]``, or each client's own ``[n_clients, d]``."""
    owners = torch.cat([torch.full((len(idx),), c) for c, idx in enumerate(data.test_idx)])
    if len(owners) == 0:
        return {}, None
    if flat.dim() == 1:
        idx = torch.cat(list(data.test_idx))
        return per_example(model, spec, flat, data.x[idx], data.y[idx], task), owners
    parts = [per_example(model, spec, flat[c], data.x[idx], data.y[idx], task)
             for c, idx in enumerate(data.test_idx) if len(idx)]
    return {k: (torch.cat([p[k][0] for p in parts]), torch.cat([p[k][1] for p in parts])) for k in parts[0]}, owners


def per_client(model: nn.Module, spec: ParamSpec, flat: Tensor, data: FederatedData, task: Task) -> dict[str, list]:
    """The global model's primary metric on each client's own test examples (clients without: left out)."""
    terms, owners = client_terms(model, spec, flat, data, task)
    if owners is None:
        return {}
    return {"clients": [c for c in range(data.n_clients) if len(data.test_idx[c])],
            "global": by_client(terms, owners, data.n_clients, task).tolist()}


def by_client(terms: dict[str, Terms], owners: Tensor, n_clients: int, task: Task) -> Tensor:
    """The primary metric of each client that has test examples, in client order."""
    total, count = (torch.bincount(owners, weights=t, minlength=n_clients) for t in terms[task.primary])
    return total[count > 0] / count[count > 0]


def worst10(per_client: Tensor, task: Task, prefix: str) -> dict[str, float]:
    """The primary metric averaged over the 10% of clients for whom it is worst."""
    ranked = per_client.sort(descending=not task.higher_is_better).values  # worst first
    return {f"{prefix}_{task.primary}_worst10": ranked[: math.ceil(0.1 * len(per_client))].mean().item()}


@torch.no_grad()
def rows_metric(model: nn.Module, spec: ParamSpec, X: Tensor, x: Tensor, y: Tensor, task: Task, chunk: int = 64,
                batch_size: int = 2048) -> Tensor:
    """The task's primary metric on the test set of every row of X (one model per node), ``[n]``:
    ``chunk`` models at a time with vmap, on ``batch_size`` examples at a time, so memory stays at
    ``chunk * batch_size`` activations however many nodes and test examples there are."""
    was_training = model.training
    model.eval()

    def terms(flat: Tensor, xb: Tensor, yb: Tensor) -> Terms:
        total, count = task.metric_terms(functional_call(model, spec.unflatten(flat), (xb,)), yb)[task.primary]
        return total.sum(), count.sum()

    batched = vmap(terms, in_dims=(0, None, None))
    total, count = torch.zeros(len(X), device=X.device), torch.zeros(len(X), device=X.device)
    for first in range(0, len(X), chunk):
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size].to(X.device), y[start:start + batch_size].to(X.device)
            t, c = batched(X[first:first + chunk], xb, yb)
            total[first:first + chunk] += t
            count[first:first + chunk] += c
    model.train(was_training)
    return (total / count.clamp(min=1)).cpu()
