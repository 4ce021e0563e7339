"""The fused local step (fedloom/engines/fused.py): on the CPU it gives bit-identical
gradients, losses and trained models to the general vmap step, for logistic regression
and MLPs, under every client rule and local optimizer, with short clients masked; and
the engine keeps the general step for every model or task it does not know."""

import pytest
import torch
from torch import nn

from fedloom.config import ConfigError
from fedloom.core.params import ParamSpec
from fedloom.core.store import ClientStore
from fedloom.engines.fused import FusedStep, fused_step, why_not_fused
from fedloom.engines.vectorized import VectorizedEngine
from fedloom.models import logistic, mlp
from fedloom.tasks import Classification, LanguageModel
from fedloom.runner import run
from helpers import stepper, train_once

MODELS = {
    "logistic": lambda: logistic((12,), 5),
    "mlp": lambda: mlp((12,), 5, hidden=(7,)),
    "mlp-2-hidden": lambda: mlp((3, 4), 5, hidden=(7, 6)),
    "no-bias": lambda: nn.Sequential(nn.Linear(12, 6, bias=False), nn.ReLU(), nn.Linear(6, 5)),
}


def _general_step(model):
    """The engine's general step (functional_call under vmap, autograd) for ``model``, built alone."""
    engine = VectorizedEngine.__new__(VectorizedEngine)
    engine.model, engine.spec, engine.task = model, ParamSpec.of(model), Classification(5)
    engine._losses = torch.func.vmap(engine._masked_loss)
    return engine._general_step


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("clients", [1, 2, 9])
def test_fused_gradient_and_loss_are_bit_identical_to_the_general_step(name, clients):
    torch.manual_seed(0)
    model = MODELS[name]()
    spec = ParamSpec.of(model)
    example = torch.zeros(3, 4) if name == "mlp-2-hidden" else torch.zeros(12)
    step = fused_step(model, Classification(5), spec, example)
    assert isinstance(step, FusedStep)
    X = spec.flatten(model) + 0.3 * torch.randn(clients, spec.dim)
    xb = torch.randn(clients, 6, *example.shape)
    yb = torch.randint(0, 5, (clients, 6))
    valid = torch.ones(clients, 6)
    valid[-1, 2:] = 0  # a short batch: its padding examples count for nothing
    g_general, loss_general = _general_step(model)(X, xb, yb, valid)
    g_fused, loss_fused = step(X, xb, yb, valid)
    assert g_fused.shape == (clients, spec.dim) and g_fused.abs().sum() > 0
    assert torch.equal(g_fused, g_general)
    assert torch.equal(loss_fused, loss_general)


def _pair(quick, *overrides):
    common = [*quick, "evaluation.federated=false", "engine.name=vectorized", *overrides]
    return stepper(*common, "engine.fused=off"), stepper(*common, "engine.fused=auto")


@pytest.mark.parametrize("model", [["model.name=logistic"], ["model.name=mlp", "model.options.hidden=[16]"]])
@pytest.mark.parametrize("algorithm", [
    ["algorithm.name=fedavg"],
    ["algorithm.name=fedprox", "algorithm.options.mu=0.1"],
    ["algorithm.name=scaffold"],
    ["algorithm.name=fedavg", "client.momentum=0.9", "client.weight_decay=0.01"],
    ["algorithm.name=fedadam", "client.optimizer=adam", "client.lr=0.01"],
])
def test_fused_rounds_equal_general_rounds_bit_for_bit(quick, model, algorithm):
    general, fused = _pair(quick, *model, *algorithm, "client.epochs=2", "partition.name=quantity",
                           "data.n_clients=30", "sampling.clients_per_round=10")
    assert (general.engine.step_kind, fused.engine.step_kind) == ("vmap", "fused")
    sizes = fused.data.client_sizes()
    assert sizes.max() > 2 * sizes.min()  # unequal clients: short clients leave and short batches are masked
    for r in (1, 2):
        a, b = general.round(r), fused.round(r)
        assert a["train_loss"] == b["train_loss"]
        assert torch.equal(general.state["x"], fused.state["x"])
    assert not torch.equal(fused.state["x"], stepper(*quick, *model, "rounds=1").state["x"])  # it trained


def test_fused_chunks_and_short_clients_match_the_general_step(quick):
    general, fused = _pair(quick, "model.name=mlp", "data.n_clients=30", "partition.name=quantity")
    clients = list(range(30))
    a = train_once(general, general.state["x"], clients)
    b = train_once(fused, fused.state["x"], clients)
    assert torch.equal(a.U, b.U) and torch.equal(a.train_loss, b.train_loss)
    # one client a chunk: every step is the single-client (addmm) path on both sides
    tiny = {mode: VectorizedEngine(fused.model, fused.data, fused.engine.local, fused.task, memory_budget=1,
                                   fused=mode) for mode in ("off", "auto")}
    assert tiny["auto"].chunk_size == 1 and tiny["auto"].step_kind == "fused"
    c, d = (tiny[m].run_round(fused.algorithm, fused.state["x"], {}, clients, 1, ClientStore()) for m in tiny)
    assert torch.equal(c.U, d.U) and torch.equal(c.train_loss, d.train_loss)
    torch.testing.assert_close(d.U, b.U, rtol=1e-5, atol=1e-6)  # chunking changes the order of float sums only


class Square(nn.Module):
    def forward(self, x):
        return x * x


@pytest.mark.parametrize("model, task, example, reason", [
    (lambda: nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 5)), Classification(5), torch.zeros(12),
     "Linear layers with ReLU"),
    (lambda: nn.Sequential(nn.Linear(12, 6), Square(), nn.Linear(6, 5)), Classification(5), torch.zeros(12),
     "Linear layers with ReLU"),
    (lambda: nn.Sequential(nn.Linear(12, 5), nn.ReLU()), Classification(5), torch.zeros(12), "Linear layers"),
    (lambda: logistic((12,), 5), LanguageModel(5), torch.zeros(12), "classification"),
    (lambda: nn.Sequential(nn.Linear(4, 5)), Classification(5), torch.zeros(3, 4), "nn.Flatten"),
    (lambda: nn.Sequential(nn.Flatten(0), nn.Linear(12, 5)), Classification(5), torch.zeros(12), "default"),
    (lambda: nn.ModuleList([nn.Linear(12, 5)]), Classification(5), torch.zeros(12), "nn.Sequential"),
])
def test_models_and_tasks_it_does_not_know_keep_the_general_step(model, task, example, reason):
    model = model()
    spec = ParamSpec.of(model)
    assert reason in why_not_fused(model, task, spec, example)
    assert fused_step(model, task, spec, example) is None


def test_a_frozen_parameter_keeps_the_general_step():
    model = mlp((12,), 5, hidden=(7,))
    model[1].bias.requires_grad_(False)
    assert "every parameter" in why_not_fused(model, Classification(5), ParamSpec.of(model), torch.zeros(12))


def test_the_summary_says_which_local_step_ran(quick):
    short = [*quick, "rounds=1", "data.n_clients=10", "sampling.clients_per_round=3", "engine.name=vectorized"]
    assert run(None, [*short, "model.name=mlp"]).summary["local_step"] == "fused"
    assert run(None, [*short, "model.name=mlp", "engine.fused=off"]).summary["local_step"] == "vmap"
    # a user's model the fused step does not know: the general step, with the same numbers as serial
    user = run(None, [*short, "model.name=user_parts:SlowLogistic"])
    assert user.summary["local_step"] == "vmap"
    serial = run(None, [*short, "model.name=user_parts:SlowLogistic", "engine.name=serial"])
    assert user.history[-1]["central_accuracy"] == pytest.approx(serial.history[-1]["central_accuracy"], abs=1e-9)


def test_engine_fused_accepts_auto_and_off_only(quick):
    with pytest.raises(ConfigError, match="engine.fused"):
        stepper(*quick, "engine.fused=on")
    exp = stepper(*quick, "engine.name=vectorized")
    with pytest.raises(ValueError, match="engine.fused = 'yes'.*auto, off"):
        VectorizedEngine(exp.model, exp.data, exp.engine.local, exp.task, fused="yes")
