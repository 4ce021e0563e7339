"""fedloom.merging: permutation specs, matching, merging, the loss barrier, one-shot, fedloom merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fedloom.cli import main
from fedloom.merging import (Aligner, MergeError, SpecError, activation_matching, apply, barrier, mean_state,
                             merge, merge_runs, one_shot, ot_fusion, path, random_permutation, spec_for,
                             weight_matching)
from fedloom.merging.spec import Axis, Segment, align_axis
from fedloom.models import build_model
from fedloom.runner import run

MODELS = [("mlp", (1, 8, 8), {"hidden": (32, 16)}), ("cnn", (1, 8, 8), {}), ("resnet20", (3, 16, 16), {}),
          ("resnet20", (3, 16, 16), {"norm": "none"}), ("resnet20", (3, 16, 16), {"norm": "batch"}),
          ("resnet20", (3, 16, 16), {"groups": 4})]
IDS = ["mlp", "cnn", "resnet20", "resnet20-nonorm", "resnet20-batchnorm", "resnet20-4groups"]


def _model(name, shape, options, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, shape, 10, **options).eval()
    for value in model.state_dict().values():  # norms' ones and zeros, BatchNorm's statistics: made to matter
        if value.is_floating_point() and value.numel() > 1 and bool((value == value.flatten()[0]).all()):
            value.copy_(torch.rand_like(value) + 0.5)
    return model


def _permuted(model, seed=1):
    spec = spec_for(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # not views: loading must not change them
    return spec, state, apply(spec, state, random_permutation(spec, torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("name,shape,options", MODELS, ids=IDS)
def test_a_permuted_model_computes_the_same_function(name, shape, options):
    model = _model(name, shape, options)
    spec, state, permuted = _permuted(model)
    moved = [k for k in state if not torch.equal(state[k], permuted[k])]
    assert len(moved) >= len([k for k in state if "weight" in k])  # every weight moves on some axis
    x = torch.randn(6, *shape)
    with torch.no_grad():
        before = model(x)
        model.load_state_dict(permuted)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,shape,options", MODELS[:3], ids=IDS[:3])
def test_permuting_one_layer_without_its_neighbours_changes_the_function(name, shape, options):
    # the spec's coupling is what keeps the function: one axis alone does not
    model = _model(name, shape, options)
    spec, state, _ = _permuted(model)
    key, axes = next((k, a) for k, a in spec.axes.items() if 0 in a and "weight" in k)
    alone = dict(state, **{key: align_axis(state[key], 0, axes[0], random_permutation(
        spec, torch.Generator().manual_seed(3)))})
    x = torch.randn(6, *shape)
    with torch.no_grad():
        before = model(x)
        model.load_state_dict(alone)
        assert (model(x) - before).abs().max() > 1e-3


def test_residual_streams_share_one_permutation_and_padding_keeps_the_previous_stage():
    spec = spec_for(_model("resnet20", (3, 16, 16), {"norm": "none"}))
    stream = spec.axes["blocks.0.conv2.weight"][0]
    assert [s.perm for s in spec.axes["blocks.2.conv2.weight"][0].segments] == [s.perm for s in stream.segments]
    assert spec.axes["stem.weight"][0] == stream  # the stem writes the first stage's stream too
    stage2 = spec.axes["blocks.3.conv2.weight"][0].segments  # 32 channels: 16 padded from stage 1, 16 new
    assert [(s.start, s.size) for s in stage2] == [(0, 16), (16, 16)] and stage2[0].perm == stream.segments[0].perm
    grouped = spec_for(_model("resnet20", (3, 16, 16), {"groups": 2})).axes["blocks.0.conv1.weight"][0]
    assert [(s.start, s.size) for s in grouped.segments] == [(0, 8), (8, 8)]  # within GroupNorm's groups


@pytest.mark.parametrize("name,shape,options", MODELS[:3], ids=IDS[:3])
def test_weight_matching_recovers_a_known_permutation_exactly(name, shape, options):
    model = _model(name, shape, options)
    spec, state, permuted = _permuted(model)
    found = weight_matching(spec, state, permuted, torch.Generator().manual_seed(0))
    back = apply(spec, permuted, found)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("name,shape,options", MODELS[:3], ids=IDS[:3])
def test_activation_matching_recovers_a_known_permutation(name, shape, options):
    model = _model(name, shape, options)
    spec, state, permuted = _permuted(model)
    found = activation_matching(spec, model, state, permuted, torch.randn(128, *shape))
    back = apply(spec, permuted, found)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_ot_fusion_with_equal_widths_is_the_permutation_and_sinkhorn_a_soft_one():
    model = _model("mlp", (1, 8, 8), {"hidden": (32, 16)})
    spec, state, permuted = _permuted(model)
    exact = apply(spec, permuted, ot_fusion(spec, state, permuted))
    for k in state:
        torch.testing.assert_close(exact[k], state[k], rtol=0, atol=1e-6)
    soft = ot_fusion(spec, state, permuted, reg=0.1)
    plan = soft[next(iter(spec.sizes))]
    assert plan.dim() == 2 and torch.allclose(plan.sum(1), torch.ones(len(plan)), atol=1e-3)
    assert 0 < (plan > 1e-3).sum() and plan.max() < 1  # spread, not a permutation


def test_soft_alignment_along_a_flattened_axis_mixes_whole_channel_blocks():
    t = torch.arange(12.0).reshape(1, 12)  # 3 units of 4 inputs each
    axis = Axis((Segment("p", 0, 3),), inner=4)
    swap = {"p": torch.tensor([2, 0, 1])}
    assert align_axis(t, 1, axis, swap).tolist() == [[8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7]]
    mix = {"p": torch.tensor([[0.5, 0.5, 0], [0, 1.0, 0], [0, 0, 1.0]])}
    assert align_axis(t, 1, axis, mix).tolist()[0][:4] == [2, 3, 4, 5]


def test_merging_a_model_with_its_permutation_gives_the_model_back_and_averaging_does_not():
    model = _model("mlp", (1, 8, 8), {"hidden": (32,)})
    spec, state, permuted = _permuted(model)
    aligned = merge([state, permuted], Aligner("weight", spec, model, generator=torch.Generator().manual_seed(0)))
    averaged = merge([state, permuted], Aligner("average", spec, model))
    assert all(torch.allclose(aligned[k], state[k]) for k in state)
    assert not torch.allclose(averaged["1.weight"], state["1.weight"])
    three = merge([state, permuted, apply(spec, state, random_permutation(spec, torch.Generator().manual_seed(7)))],
                  Aligner("weight", spec, model, generator=torch.Generator().manual_seed(0)))
    assert all(torch.allclose(three[k], state[k], atol=1e-6) for k in state)


def test_barrier_is_the_largest_rise_over_the_straight_line_between_the_ends():
    assert barrier([1.0, 3.0, 2.0], [0.0, 0.5, 1.0]) == pytest.approx(1.5)
    assert barrier([2.0, 1.0, 0.0], [0.0, 0.5, 1.0]) == pytest.approx(0.0)  # on the line
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    walked = path(a, b, lambda s: {"loss": float(s["w"].sum() * (2 - s["w"].sum()))}, points=5)
    assert walked["t"] == [0, 0.25, 0.5, 0.75, 1.0]
    assert walked["loss"] == pytest.approx([0, 0.75, 1.0, 0.75, 0]) and walked["barrier"] == pytest.approx(1.0)
    assert mean_state([a, b])["w"].tolist() == [0.5, 0.5]


def test_models_without_a_spec_are_refused_naming_the_module():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(SpecError, match="'the model' \\(Branchy\\)"):
        spec_for(Branchy())
    with pytest.raises(SpecError, match="blocks.2: a projection shortcut"):
        spec_for(build_model("resnet18", (3, 8, 8), 10))
    with pytest.raises(SpecError, match="'1' \\(LSTM\\)"):
        spec_for(nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 3)))


TINY = ["rounds=1", "data.n_clients=4", "client.epochs=1", "model.name=mlp", "output.progress=false",
        "evaluation.every=1"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    dirs = {}
    for name, extra in [("a", ["seed=1", "model.options={hidden=[24]}"]),
                        ("b", ["seed=2", "model.options={hidden=[24]}"]),
                        ("wide", ["seed=3", "model.options={hidden=[32]}"])]:
        dirs[name] = run(None, [*TINY, *extra, f"name={name}"], into=out / name).run_dir
    return dirs


def test_fedloom_merge_end_to_end_on_two_runs(tiny_runs, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(tiny_runs["a"]), str(tiny_runs["b"] / "model.safetensors"), "--out", str(out)]) == 0
    report = json.loads((out / "merge.json").read_text())
    pair = report["pairs"][0]
    assert len(pair["plain"]["t"]) == 11 and len(pair["aligned"]["loss"]) == 11
    assert pair["plain"]["loss"][0] == pytest.approx(pair["aligned"]["loss"][0])  # both start at A
    assert pair["plain"]["loss"][-1] == pytest.approx(pair["aligned"]["loss"][-1], rel=1e-4)  # pi(B) = B's function
    assert pair["barrier_plain"] == pytest.approx(barrier(pair["plain"]["loss"], pair["plain"]["t"]))
    assert (out / "barrier.png").stat().st_size > 1000
    model = build_model("mlp", (64,), 10, hidden=(24,))
    model.load_state_dict(load_file(str(out / "merged.safetensors")))
    assert "barrier weight" in capsys.readouterr().out
    again = merge_runs([tiny_runs["a"], tiny_runs["b"]], "average", out=tmp_path / "avg", points=3)
    assert again["pairs"][0]["barrier_aligned"] == again["pairs"][0]["barrier_plain"]
    assert again["merged"] == again["average"]


def test_merging_different_architectures_names_both_runs(tiny_runs, tmp_path, capsys):
    with pytest.raises(MergeError) as err:
        merge_runs([tiny_runs["a"], tiny_runs["wide"]], out=tmp_path / "x")
    assert str(tiny_runs["a"]) in str(err.value) and str(tiny_runs["wide"]) in str(err.value)
    assert main(["merge", str(tiny_runs["a"]), str(tiny_runs["wide"]), "--out", str(tmp_path / "y")]) == 2
    assert "same architecture" in capsys.readouterr().err
    assert main(["merge", str(tiny_runs["a"]), str(tiny_runs["b"]), "--method", "nope",
                 "--out", str(tmp_path / "z")]) == 2
    assert "weight, activation, ot, average" in capsys.readouterr().err
    assert main(["merge", str(tiny_runs["a"]), str(tmp_path), "--out", str(tmp_path / "w")]) == 2
    assert "no model.safetensors" in capsys.readouterr().err


def test_a_decentralized_run_reports_the_aligned_final_merge_beside_x_bar():
    result = run(None, ["mode=decentralized", "data.n_clients=4", "rounds=1", "client.steps=2",
                        "model.name=mlp", "model.options={hidden=[16]}", "decentralized.final_merge=weight",
                        "output.save=false", "output.progress=false"])
    summary = result.summary
    assert {"final_merge_accuracy", "final_merge_loss", "xbar_accuracy", "node_accuracy_mean"} <= set(summary)
    assert 0 <= summary["final_merge_accuracy"] <= 1


ONE_SHOT = ["data.dataset=digits", "data.n_clients=10", "partition.name=dirichlet", "partition.options={alpha=0.5}",
            "model.name=mlp", "model.options={hidden=[128]}", "client.epochs=10", "client.lr=0.05"]


@pytest.mark.slow
def test_one_shot_an_aligned_merge_beats_plain_averaging_of_clients_trained_apart():
    for seed in (0, 1):
        result = one_shot(None, [*ONE_SHOT, f"seed={seed}"], methods=("average", "weight"))
        assert result.merged["weight"]["accuracy"] > result.merged["average"]["accuracy"] + 0.05
        assert result.merged["weight"]["loss"] < result.merged["average"]["loss"]


def _trained_apart(tmp_path, seed, width):
    cfg = [*TINY[:-1], "data.n_clients=1", "partition.name=iid", "client.epochs=10", "client.lr=0.05",
           f"model.options={{hidden=[{width}]}}", f"seed={seed}", "evaluation.every=1000"]
    return run(None, cfg, into=tmp_path / f"s{seed}").run_dir


@pytest.mark.slow
def test_weight_matching_cuts_the_loss_barrier_of_two_independently_trained_mlps(tmp_path):
    # Git Re-Basin's headline, on digits with a wide hidden layer (narrow ones gain less)
    dirs = [_trained_apart(tmp_path, seed, 512) for seed in (1, 2)]
    pair = merge_runs(dirs, "weight", out=tmp_path / "m")["pairs"][0]
    assert pair["barrier_plain"] > 0.1
    assert pair["barrier_aligned"] < 0.5 * pair["barrier_plain"]


def test_matched_averaging_transform_undoes_the_clients_permutations_before_the_mean():
    from fedloom.core.params import ParamSpec
    from fedloom.merging.transform import matched_averaging
    from fedloom.pipeline.base import Context

    model = _model("mlp", (1, 8, 8), {"hidden": (32,)})
    flat, spec = ParamSpec.of(model), spec_for(model)
    x = flat.flatten(model)
    noisy = [x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(c)) for c in range(3)]
    locals_ = []
    for c, row in enumerate(noisy):
        moved = apply(spec, flat.unflatten(row), random_permutation(spec, torch.Generator().manual_seed(10 + c)))
        locals_.append(torch.cat([moved[n].reshape(-1) for n in flat.names]))
    U = x - torch.stack(locals_)
    ctx = Context(round=1, seed=0, client_ids=[0, 1, 2], params=x)
    aligned, w, _, metrics = matched_averaging(model, "weight").apply(U, torch.ones(3), None, ctx)
    torch.testing.assert_close(x - aligned.mean(0), torch.stack(noisy).mean(0), rtol=0, atol=1e-6)
    assert (x - U.mean(0) - torch.stack(noisy).mean(0)).abs().max() > 0.1  # the plain mean is far off
    assert metrics["matched_shift"] > 0
    with pytest.raises(ValueError, match="activation matching needs data"):
        matched_averaging(model, "activation")


def test_without_pot_the_ot_method_is_refused_naming_the_extra(monkeypatch, tiny_runs, tmp_path):
    import importlib.util

    from fedloom.config import ConfigError, load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ot" else real(name, *a))
    with pytest.raises(MergeError, match="fedloom\\[merging\\]"):
        merge_runs([tiny_runs["a"], tiny_runs["b"]], "ot", out=tmp_path / "m")
    with pytest.raises(ConfigError, match="final_merge = 'ot' needs POT"):
        load_config(None, ["mode=decentralized", "decentralized.final_merge=ot"])
