"""The task protocol, the built-in tasks and a user's task by import path (see the package docstring)."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

from fedloom.data.datasets import IGNORE, TASK_KINDS
from fedloom.registry import OptionError, Registry

Terms = tuple[Tensor, Tensor]  # per example: (sum, count)


class Task(Protocol):
    """A task: how a model's output is scored against the target, as per-example (sum, count) terms that pool
    over clients and batches exactly."""

    name: str
    primary: str  # the metric progress, the worst-10% view and per-node statistics report
    higher_is_better: bool

    def loss_terms(self, output: Tensor, target: Tensor) -> Terms:
        """The loss as per-example (sum, count): what local training minimizes."""

    def metric_terms(self, output: Tensor, target: Tensor) -> dict[str, Terms]:
        """Each metric (``loss`` among them) as per-example (sum, count)."""

    def finish(self, means: dict[str, float]) -> dict[str, float]:
        """The reported metrics from the pooled means (e.g. perplexity from the loss)."""


def mean_loss(task: Task, output: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """The batch's mean loss over its real examples (``valid`` masks padding examples)."""
    total, count = task.loss_terms(output, target)
    if valid is not None:
        total, count = total * valid, count * valid
    return total.sum() / count.sum().clamp(min=1)


def _token_nll(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of every position, spelled out: under vmap F.cross_entropy runs a Python
    decomposition each call. ``target`` may hold IGNORE (read as class 0; the caller masks it)."""
    return -logits.log_softmax(dim=-1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)


def _once(values: Tensor) -> Terms:
    return values, torch.ones_like(values)


class Classification:
    """Cross-entropy; accuracy, and top-5 accuracy where there are more than 10 classes."""

    name, primary, higher_is_better = "classification", "accuracy", True

    def __init__(self, n_classes: int):
        self.top5 = n_classes > 10

    def loss_terms(self, output: Tensor, target: Tensor) -> Terms:
        """Cross-entropy per example, each counting once."""
        return _once(_token_nll(output, target))

    def metric_terms(self, output: Tensor, target: Tensor) -> dict[str, Terms]:
        """Loss and accuracy per example (and top-5 accuracy when asked for)."""
        terms = {"loss": self.loss_terms(output, target), "accuracy": _once((output.argmax(-1) == target).float())}
        if self.top5:
            hits = (output.topk(5, dim=-1).indices == target[..., None]).any(-1)
            terms["top5_accuracy"] = _once(hits.float())
        return terms

    def finish(self, means: dict[str, float]) -> dict[str, float]:
        """The pooled means as they are."""
        return means


class LanguageModel:
    """Next-token cross-entropy over sequences, padded targets (IGNORE) masked; next-token accuracy,
    and perplexity = exp(mean token loss)."""

    name, primary, higher_is_better = "language_model", "accuracy", True

    def __init__(self, n_classes: int):
        self.vocabulary = n_classes

    def loss_terms(self, output: Tensor, target: Tensor) -> Terms:
        """Per sequence: the summed cross-entropy of its real tokens (not IGNORE) and their count."""
        real = (target != IGNORE).float()
        return (_token_nll(output, target) * real).sum(-1), real.sum(-1)

    def metric_terms(self, output: Tensor, target: Tensor) -> dict[str, Terms]:
        """Per sequence: token loss and next-token accuracy over its real tokens."""
        real = (target != IGNORE).float()
        hits = (output.argmax(-1) == target).float() * real
        return {"loss": self.loss_terms(output, target), "accuracy": (hits.sum(-1), real.sum(-1))}

    def finish(self, means: dict[str, float]) -> dict[str, float]:
        """The pooled means with the perplexity, ``exp`` of the mean token loss."""
        return {**means, "perplexity": math.exp(min(means["loss"], 700.0))}  # exp(700) is near float64's end


class Regression:
    """Mean squared error (the loss) and mean absolute error, over the target's outputs."""

    name, primary, higher_is_better = "regression", "mse", False

    def __init__(self, n_classes: int):
        self.outputs = n_classes

    @staticmethod
    def _error(output: Tensor, target: Tensor) -> Tensor:
        return output.reshape(target.shape[0], -1) - target.reshape(target.shape[0], -1)

    def loss_terms(self, output: Tensor, target: Tensor) -> Terms:
        """Mean squared error per example."""
        return _once(self._error(output, target).square().mean(-1))

    def metric_terms(self, output: Tensor, target: Tensor) -> dict[str, Terms]:
        """Loss (the MSE), MSE and mean absolute error per example."""
        error = self._error(output, target)
        mse = _once(error.square().mean(-1))
        return {"loss": mse, "mse": mse, "mae": _once(error.abs().mean(-1))}

    def finish(self, means: dict[str, float]) -> dict[str, float]:
        """The pooled means as they are."""
        return means


class UserTask:
    """A user's task: an object with ``loss(output, target)`` (one loss per example, [B]) and optionally
    ``metrics(output, target)`` (name -> one value per example), ``primary`` (the metric to follow,
    default the loss) and ``higher_is_better`` (default True for a metric, False for the loss). Every
    example counts once; the loss is reported as ``loss`` beside the metrics."""

    def __init__(self, name: str, user: Any):
        if not callable(getattr(user, "loss", None)):
            raise OptionError(f"task {name!r}: a task needs a method loss(output, target) returning one loss per "
                              f"example; {type(user).__name__} has none")
        self.name, self.user = name, user
        self._metrics = getattr(user, "metrics", None)
        self.primary = getattr(user, "primary", "loss")
        self.higher_is_better = getattr(user, "higher_is_better", self.primary != "loss")

    def loss_terms(self, output: Tensor, target: Tensor) -> Terms:
        """The user's loss per example (OptionError unless it gives one value per example)."""
        return _once(self._per_example(self.user.loss(output, target), "loss", output))

    def metric_terms(self, output: Tensor, target: Tensor) -> dict[str, Terms]:
        """The loss and the user's metrics per example."""
        terms = {"loss": self.loss_terms(output, target)}
        if self._metrics is not None:
            for key, values in self._metrics(output, target).items():
                terms[key] = _once(self._per_example(torch.as_tensor(values, dtype=torch.float32), key, output))
        return terms

    def _per_example(self, values: Tensor, what: str, output: Tensor) -> Tensor:
        if values.dim() != 1 or len(values) != len(output):
            raise OptionError(f"task {self.name!r}: {what}(output, target) must return one value per example "
                              f"(shape [{len(output)}]), got shape {list(values.shape)}")
        return values.float()

    def finish(self, means: dict[str, float]) -> dict[str, float]:
        """The pooled means as they are."""
        return means


BUILT_IN = {"classification": Classification, "language_model": LanguageModel, "regression": Regression}
TASKS = Registry("task", {
    "auto": (lambda n_classes: None, "the dataset's own task (the default)"),
    "classification": (Classification, "cross-entropy; accuracy, top-5 accuracy where classes > 10"),
    "language_model": (LanguageModel, "next-token cross-entropy, padding masked; perplexity, next-token accuracy"),
    "regression": (Regression, "mean squared error; MSE and MAE"),
}, fixed=("n_classes",))


def build_task(name: str, options: dict[str, Any], data_task: str, n_classes: int, dataset: str) -> Task:
    """The configured task for data made for ``data_task``: "auto" is the data's own; a built-in task must
    match the data's layout; a user's task ('pkg.mod:Name') takes any data."""
    name = data_task if name == "auto" else name
    if name in TASK_KINDS and name != data_task:
        raise OptionError(f"task {name!r} does not fit dataset {dataset!r}, which is {data_task} data "
                          f"(leave task unset to use it, or choose a dataset made for {name})")
    built = TASKS.build(name, options, n_classes=n_classes)
    return built if name in BUILT_IN else UserTask(name, built)
