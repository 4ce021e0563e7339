"""FedMA (fedloom.merging.fedma): PFNM's matching with its Beta-Bernoulli process costs, layer growth, the
layer-wise procedure, from Python and from the config's [fedma] keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedloom.merging import apply, random_permutation, spec_for
from fedloom.merging.fedma import (FedMAError, Matching, Prior, assignment_costs, fedma, layerwise, match_layer,
                                   matched_average, model_of)
from fedloom.models import build_model


def _permuted_copies(model, n, seed=1):
    spec, state = spec_for(model), {k: v.clone() for k, v in model.state_dict().items()}
    return [state] + [apply(spec, state, random_permutation(spec, torch.Generator().manual_seed(seed + c)))
                      for c in range(n - 1)]


def test_the_costs_are_pfnms_gaussian_posterior_gains():
    # one client neuron v, one global neuron holding m = 2 neurons (sum s), J = 4 clients, scalar by hand
    prior = Prior(sigma=0.5, sigma0=2.0, gamma0=3.0, mu0=0.1)
    v, s, m, J = torch.tensor([[0.7, -0.2]]), torch.tensor([[1.0, 0.4]]), torch.tensor([2.0]), 4
    cost = assignment_costs(v, s, m, J, prior, n_new=2)
    s2, s02 = 0.25, 4.0
    N = 0.1 / s02 + s.double() / s2
    P = 1 / s02 + 2 / s2
    match = ((N + v.double() / s2).square().sum() / (P + 1 / s2) - N.square().sum() / P
             + 2 * math.log(2 / (J - 2)))
    fresh = (0.1 / s02 + v.double() / s2).square().sum() / (1 / s02 + 1 / s2) - 2 * 0.1 ** 2 / s02
    np.testing.assert_allclose(cost, [[float(match), float(fresh) + 2 * math.log(3 / J),
                                       float(fresh) - 2 * math.log(2) + 2 * math.log(3 / J)]], rtol=1e-12)


def test_permuted_copies_are_matched_back_exactly_without_growth():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32, 16)).eval()
    states = _permuted_copies(model, 4)
    m = Matching.of(model, torch.ones(4), Prior(sigma=0.1), seed=0)
    merged, widths = layerwise(m, states, m.widths())
    assert widths == {"1": 32, "3": 16}
    x = torch.randn(20, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        model.load_state_dict(merged)
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_permuted_copies_of_a_cnn_are_matched_back_through_its_conv_and_flatten():
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10).eval()
    states = _permuted_copies(model, 3)
    m = Matching.of(model, torch.tensor([1.0, 2.0, 3.0]), Prior(sigma=0.1), seed=1)
    merged, widths = layerwise(m, states, m.widths())
    assert widths == {"0.0": 6, "0.3": 16, "2": 120, "4": 84}
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        model.load_state_dict(merged)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def _with_a_private_neuron(seed=0, clients=3, width=8, dim=6):
    g = torch.Generator().manual_seed(seed)
    base = 3 * torch.randn(width, dim, generator=g)
    neurons = [base[torch.randperm(width, generator=g)] for _ in range(clients)]
    neurons[0] = neurons[0].clone()
    neurons[0][2] = 3 * torch.randn(dim, generator=g)  # a neuron no other client has
    return neurons


def test_a_neuron_no_other_client_has_grows_the_layer_by_one():
    neurons = _with_a_private_neuron()
    assign, width = match_layer(neurons, Prior(sigma=0.3), cap=12, generator=torch.Generator().manual_seed(0))
    assert width == 9
    owners = torch.bincount(torch.cat(assign), minlength=width)
    private = assign[0][2]
    assert owners[private] == 1 and sorted(owners.tolist()) == [1, 2] + [3] * 7
    atoms = matched_average(neurons, assign, width, torch.ones(3))
    torch.testing.assert_close(atoms[private], neurons[0][2])
    for j, a in enumerate(assign):  # each global neuron averages the same base neuron of every client
        keep = torch.ones(8, dtype=torch.bool)
        keep[2] = j != 0
        torch.testing.assert_close(atoms[a[keep]], neurons[j][keep], rtol=1e-5, atol=1e-5)


def test_growth_is_bounded_by_the_cap():
    neurons = _with_a_private_neuron()
    _, width = match_layer(neurons, Prior(sigma=0.3), cap=8, generator=torch.Generator().manual_seed(0))
    assert width == 8


def test_a_grown_layer_builds_a_wider_model_that_loads_the_matched_state():
    model = build_model("mlp", (1, 8, 8), 10, hidden=(8,))
    m = Matching.of(model, torch.ones(2))
    wider = model_of(model, m.layers, {"1": 11})
    assert wider[1].weight.shape == (11, 64) and wider[3].weight.shape == (10, 11)
    assert model[1].weight.shape == (8, 64)  # the template is left as it was


def test_models_fedma_cannot_match_are_refused_naming_the_module():
    with pytest.raises(FedMAError, match="BatchNorm"):
        Matching.of(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)),
                    torch.ones(2))
    with pytest.raises(FedMAError, match="client.weight_decay"):
        fedma(None, ["client.weight_decay=0.01"])


DIGITS = ["data.dataset=digits", "data.n_clients=5", "partition.name=dirichlet", "partition.options={alpha=0.5}",
          "model.name=mlp", "model.options={hidden=[64]}", "client.epochs=3", "client.batch_size=16",
          "seed=0"]


@pytest.mark.slow
def test_fedma_on_digits_beats_averaging_models_trained_apart_from_different_inits():
    result = fedma(None, DIGITS)
    assert result.fedma["accuracy"] > result.average["accuracy"] + 0.1
    assert result.fedma["loss"] < result.average["loss"]
    assert 64 <= result.widths["1"] <= 96


@pytest.mark.slow
def test_fedma_with_communication_runs_more_rounds_from_the_config_keys():
    result = fedma(None, [*DIGITS, "fedma.rounds=2", "fedma.sigma=0.3", "fedma.max_growth=0.25"])
    assert 64 <= result.widths["1"] <= 80
    assert result.model[1].weight.shape[0] == result.widths["1"]
    assert result.fedma["accuracy"] > result.average["accuracy"]


def test_the_command_line_prints_fedma_against_averaging_and_writes_the_grown_model(tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from fedloom.builders import build_data, build_model_for, build_task_for, sized_to
    from fedloom.cli import main
    from fedloom.config import load_config
    from fedloom.merging.fedma import layers_of
    from fedloom.merging.runs import Evaluator

    out = tmp_path / "fedma"
    assert main(["fedma", *DIGITS, "--set", "output.progress=false", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "fedma.json").read_text())
    assert f"{table['fedma']['accuracy']:.4f}" in printed and f"{table['average']['accuracy']:.4f}" in printed
    assert table["fedma"]["accuracy"] > table["average"]["accuracy"] + 0.1
    assert len(table["clients"]) == 5
    # the saved weights are FedMA's model: rebuilt at the grown widths, they score what the table says
    state = load_file(str(out / "model.safetensors"))
    assert state["1.weight"].shape[0] == table["widths"]["1"] and 64 <= table["widths"]["1"] <= 96
    cfg = load_config(None, DIGITS)
    data = build_data(cfg)
    template = build_model_for(sized_to(cfg, data), data)
    model = model_of(template, layers_of(template), table["widths"])
    metrics = Evaluator(model, data, build_task_for(cfg, data))(state)
    assert metrics["accuracy"] == pytest.approx(table["fedma"]["accuracy"], abs=1e-6)


def test_the_command_line_refuses_what_fedma_cannot_run_with_exit_2(tmp_path, capsys):
    from fedloom.cli import main

    assert main(["fedma", "client.weight_decay=0.01", "--out", str(tmp_path / "x")]) == 2
    assert "client.weight_decay" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written for a run that never started
