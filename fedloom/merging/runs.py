"""Merging saved models: run directories (their ``model.safetensors``, and their ``config.toml`` that names
the model and data), what ``fedloom merge`` calls.

``merge_runs`` aligns every model to the first, merges them all, and writes into ``out``:
``merged.safetensors``, ``merge.json`` (each pair's loss and accuracy along the straight path from the first
model to the other, plain and aligned, with the barriers; the merged and the averaged models' metrics) and
``barrier.png`` (the loss along those paths).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedloom import evaluation
from fedloom.config import ExperimentConfig, load_config
from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, numpy_generator, torch_generator
from fedloom.data import FederatedData
from fedloom.merging.merge import METHODS, Aligner, Method, State, mean_state, merge, path
from fedloom.merging.spec import SpecError, spec_for
from fedloom.tasks import Task
from fedloom.tracking.rundir import CONFIG, MODEL

ACTIVATION_BATCH = 512  # training examples activation matching correlates units on


class MergeError(ValueError):
    """The models cannot be merged (the message names the run directories)."""


@dataclass(frozen=True)
class Saved:
    """A finished run's model: its directory, config and state dict."""

    where: Path  # the run directory
    cfg: ExperimentConfig
    state: State


def load_saved(given: str | Path) -> Saved:
    """A run directory, or the model.safetensors file in one."""
    where = Path(given)
    where = where.parent if where.is_file() else where
    for needed in (MODEL, CONFIG):
        if not (where / needed).is_file():
            raise FileNotFoundError(f"{given}: no {needed} (give a run directory, or the {MODEL} in one)")
    return Saved(where, load_config(where / CONFIG), load_file(str(where / MODEL)))


def check_same_architecture(first: Saved, other: Saved) -> None:
    """The same model name, options and parameter shapes, or an error naming both runs."""
    a, b = first.cfg.model, other.cfg.model
    if (a.name, a.options) != (b.name, b.options):
        raise MergeError(f"{first.where} has model {a.name!r} {a.options or ''} but {other.where} has model "
                         f"{b.name!r} {b.options or ''}: merging needs the same architecture")
    for key in sorted(set(first.state) | set(other.state)):
        sa, sb = first.state.get(key), other.state.get(key)
        if sa is None or sb is None or sa.shape != sb.shape:
            shape = lambda t: "missing" if t is None else list(t.shape)  # noqa: E731
            raise MergeError(f"{first.where} and {other.where} differ at parameter {key!r}: {shape(sa)} vs "
                             f"{shape(sb)}: merging needs the same architecture")


@dataclass(frozen=True)
class Evaluator:
    """A model's test-set metrics (``{"loss": ..., "accuracy": ...}``) from a state dict."""
    model: nn.Module
    data: FederatedData
    task: Task

    def __call__(self, state: State) -> dict[str, float]:
        self.model.load_state_dict(state)
        spec = ParamSpec.of(self.model)
        flat = spec.flatten(self.model).to(next(self.model.parameters()).device)
        return {k.removeprefix("central_"): v
                for k, v in evaluation.central(self.model, spec, flat, self.data, self.task).items()}


def activation_batch(data: FederatedData, seed: int) -> Tensor:
    """Training examples drawn from the merging stream (the same for the same seed)."""
    rng = numpy_generator(seed, Stream.MERGING, 0)
    size = min(ACTIVATION_BATCH, len(data.x))
    return data.x[torch.as_tensor(rng.choice(len(data.x), size=size, replace=False))]


def check_method(method: str) -> None:
    """MergeError unless ``method`` is a merge method whose packages are installed (``ot`` needs fedloom[merging])."""
    if method not in METHODS:
        raise MergeError(f"merge method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "ot" and importlib.util.find_spec("ot") is None:
        raise MergeError("merge method 'ot' needs POT (optimal transport): pip install fedloom[merging]")


def aligner_for(method: Method, model: nn.Module, data: FederatedData, seed: int, ot_reg: float = 0.0) -> Aligner:
    """The aligner for ``method`` on ``model``'s permutation spec (activation matching: a batch of ``data``,
    drawn from the seeded MERGING stream); MergeError for a model without a spec."""
    check_method(method)
    try:
        spec = spec_for(model)
    except SpecError as err:
        raise MergeError(str(err)) from None
    inputs = activation_batch(data, seed) if method == "activation" else None
    return Aligner(method, spec, model, inputs, torch_generator(seed, Stream.MERGING, 1), ot_reg)


def merge_runs(models: list[str | Path], method: Method = "weight", data_config: str | Path | None = None,
               out: str | Path = "merged", points: int = 11, seed: int | None = None) -> dict[str, Any]:
    """Align and merge saved models, report the loss barriers; writes into ``out`` (module docstring).
    ``data_config``: evaluate (and match activations) on this config's data instead of the first run's."""
    from fedloom.builders import build_data, build_model_for, build_task_for

    if len(models) < 2:
        raise MergeError("give at least two models to merge")
    check_method(method)
    saved = [load_saved(m) for m in models]
    for other in saved[1:]:
        check_same_architecture(saved[0], other)
    cfg = load_config(data_config) if data_config else saved[0].cfg
    seed = cfg.seed if seed is None else seed
    data = build_data(cfg)
    model = build_model_for(saved[0].cfg, data)
    evaluate = Evaluator(model, data, build_task_for(cfg, data))
    align = aligner_for(method, model, data, seed)
    states = [s.state for s in saved]
    pairs = [_pair(states[0], b, str(s.where), align, evaluate, points) for b, s in zip(states[1:], saved[1:])]
    merged = merge(states, align)
    report = {"method": method, "models": [str(s.where) for s in saved], "pairs": pairs,
              "ends": [evaluate(s) for s in states], "merged": evaluate(merged),
              "average": evaluate(mean_state(states))}
    _write(Path(out), merged, report)
    return report


def _pair(a: State, b: State, name: str, align: Aligner, evaluate: Evaluator, points: int) -> dict[str, Any]:
    plain = path(a, b, evaluate, points)
    aligned = path(a, align(a, b), evaluate, points)
    return {"model": name, "plain": plain, "aligned": aligned, "barrier_plain": plain["barrier"],
            "barrier_aligned": aligned["barrier"]}


def _write(out: Path, merged: State, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in merged.items()}, str(out / "merged.safetensors"))
    (out / "merge.json").write_text(json.dumps(report, indent=2))
    plot_barriers(report, out / "barrier.png")


def plot_barriers(report: dict[str, Any], png: Path) -> None:
    """The loss along each straight path, plain (dashed) and aligned (solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, pair in enumerate(report["pairs"]):
        color = f"C{i}"
        ax.plot(pair["plain"]["t"], pair["plain"]["loss"], "--", color=color,
                label=f"plain, barrier {pair['barrier_plain']:.3f}")
        ax.plot(pair["aligned"]["t"], pair["aligned"]["loss"], "-", color=color,
                label=f"{report['method']}, barrier {pair['barrier_aligned']:.3f}")
    ax.set_xlabel("t: (1 - t) A + t B")
    ax.set_ylabel("test loss")
    ax.set_title("loss along the linear path from the first model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
