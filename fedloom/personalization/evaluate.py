"""Evaluation of personalized models: each client's own model on its own test split, next to the
global model on the same splits (``personal_<metric>`` beside ``federated_<metric>``)."""

from __future__ import annotations

from torch import Tensor, nn

from fedloom.core.params import ParamSpec
from fedloom.core.store import ClientState, ClientStore
from fedloom.data.federated import FederatedData
from fedloom.evaluation import by_client, client_terms, pooled, worst10
from fedloom.personalization.base import generic_model
from fedloom.tasks import Task


def personal_evaluation(method, engine, model: nn.Module, spec: ParamSpec, x: Tensor, data: FederatedData,
                        task: Task, clients: dict[int, ClientState]) -> tuple[dict[str, float], dict[str, list]]:
    """The personalized models' metrics (pooled over all clients' test examples, the worst 10% of clients,
    the mean over clients; the global model's mean over clients beside it), and the primary metric of
    every client with a test split for the global and the personalized models. ``clients`` is the
    state tree's client store, read only (the evaluation works on a copy)."""
    owned = [c for c in range(data.n_clients) if len(data.test_idx[c])]
    if not owned:
        return {}, {}
    device = next(model.parameters()).device
    models = method.client_models(engine, x.cpu(), list(range(data.n_clients)), ClientStore(clients))
    personal_terms, owners = client_terms(model, spec, models.to(device), data, task)
    global_terms, _ = client_terms(model, spec, generic_model(method, x).to(device), data, task)
    personal = by_client(personal_terms, owners, data.n_clients, task)
    shared = by_client(global_terms, owners, data.n_clients, task)
    primary = task.primary
    metrics = {**pooled(personal_terms, task, "personal"), **worst10(personal, task, "personal"),
               f"personal_{primary}_client_mean": personal.mean().item(),
               f"federated_{primary}_client_mean": shared.mean().item()}
    return metrics, {"clients": owned, "global": shared.tolist(), "personal": personal.tolist()}
