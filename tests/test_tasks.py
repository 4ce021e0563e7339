"""Tasks: the loss and metrics every engine and evaluation take (fedloom.tasks), and the devices
they compute on (engine.device)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedloom.builders import device_for
from fedloom.config import ConfigError, load_config
from fedloom.engines.device import DeviceError, resolve_device
from fedloom.engines.vectorized import UnsupportedModel, check_vectorizable, why_not_vectorize
from fedloom.models import build_model
from fedloom.registry import OptionError
from fedloom.tasks import IGNORE, Classification, LanguageModel, Regression, build_task, mean_loss

GEN = torch.Generator().manual_seed(0)


def test_classification_loss_is_cross_entropy_and_padding_examples_do_not_count():
    logits, y = torch.randn(6, 12, generator=GEN), torch.randint(0, 12, (6,), generator=GEN)
    task = Classification(12)
    torch.testing.assert_close(mean_loss(task, logits, y), F.cross_entropy(logits, y))
    valid = torch.tensor([1.0, 1, 1, 1, 0, 0])
    torch.testing.assert_close(mean_loss(task, logits, y, valid), F.cross_entropy(logits[:4], y[:4]))


def test_classification_reports_top5_only_with_more_than_ten_classes():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6]])
    terms = Classification(12).metric_terms(logits, torch.tensor([4]))
    assert terms["accuracy"][0].item() == 0.0 and terms["top5_accuracy"][0].item() == 1.0
    assert "top5_accuracy" not in Classification(10).metric_terms(logits[:, :10], torch.tensor([5]))
    assert Classification(12).metric_terms(logits, torch.tensor([5]))["top5_accuracy"][0].item() == 0.0


def test_language_model_loss_is_token_cross_entropy_with_padding_masked():
    logits, y = torch.randn(2, 5, 7, generator=GEN), torch.randint(0, 7, (2, 5), generator=GEN)
    padded = y.clone()
    padded[1, 3:] = IGNORE
    task = LanguageModel(7)
    real = torch.cat([logits[0], logits[1, :3]]), torch.cat([y[0], y[1, :3]])
    torch.testing.assert_close(mean_loss(task, logits, padded), F.cross_entropy(*real))
    other = logits.clone()
    other[1, 3:] += 100 * torch.randn(2, 7, generator=GEN)  # what the model says at padded positions is not scored
    torch.testing.assert_close(mean_loss(task, other, padded), mean_loss(task, logits, padded))
    total, count = task.metric_terms(logits, padded)["accuracy"]
    assert count.tolist() == [5.0, 3.0]
    hits = (logits.argmax(-1) == y).float()
    assert total.tolist() == [hits[0].sum().item(), hits[1, :3].sum().item()]


def test_perplexity_is_the_exponential_of_the_mean_token_loss():
    assert LanguageModel(7).finish({"loss": math.log(7.0), "accuracy": 0.1})["perplexity"] == pytest.approx(7.0)


def test_regression_reports_mse_and_mae_over_outputs():
    out, y = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, -3.0]])
    terms = Regression(2).metric_terms(out, y)
    assert terms["mse"][0].tolist() == [2.5, 5.0] and terms["mae"][0].tolist() == [1.5, 2.0]
    torch.testing.assert_close(mean_loss(Regression(1), torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 0.0])),
                               torch.tensor(5.0))


def test_a_user_task_gives_its_loss_and_metrics_per_example():
    task = build_task("test_task_engines:AbsoluteError", {}, "regression", 1, "mine")
    out, y = torch.tensor([[0.25], [3.0]]), torch.tensor([0.0, 0.0])
    assert mean_loss(task, out, y).item() == pytest.approx(1.625)
    terms = task.metric_terms(out, y)
    assert terms["within_half"][0].tolist() == [1.0, 0.0] and task.primary == "within_half" and task.higher_is_better


class NoLoss:
    def metrics(self, output, target):
        return {}


class ScalarLoss:
    def loss(self, output, target):
        return F.mse_loss(output.squeeze(-1), target)


def test_a_user_task_must_give_one_loss_per_example():
    task = build_task("test_tasks:ScalarLoss", {}, "regression", 1, "mine")
    with pytest.raises(OptionError, match=r"one value per example \(shape \[2\]\), got shape \[\]"):
        task.loss_terms(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(OptionError, match="needs a method loss.*NoLoss has none"):
        build_task("test_tasks:NoLoss", {}, "regression", 1, "mine")


def test_a_built_in_task_must_fit_the_data():
    with pytest.raises(OptionError, match="task 'regression' does not fit dataset 'digits'.*classification"):
        build_task("regression", {}, "classification", 10, "digits")
    assert build_task("auto", {}, "language_model", 80, "shakespeare").name == "language_model"
    with pytest.raises(ConfigError, match="task: task 'regression' does not fit"):
        from fedloom.rounds import build_round
        build_round(load_config(None, ["task=regression"]))


def test_task_is_written_as_a_name_or_a_table():
    assert load_config(None, ['task="regression"']).task.name == "regression"
    assert load_config({"task": {"name": "classification"}}).task.name == "classification"
    with pytest.raises(ConfigError, match="unknown task 'ranking'"):
        load_config(None, ["task=ranking"])


def test_cuda_without_cuda_is_a_clear_error_and_auto_runs_on_the_cpu_with_a_note():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="engine.device = 'cuda' but CUDA is not available here.*available: cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="engine.device = 'cuda:1'"):
        device_for(load_config(None, ["engine.device=cuda:1"]))
    assert resolve_device("auto") == (torch.device("cpu"), "engine.device = auto found no CUDA device and runs on "
                                      "the CPU")
    with pytest.raises(DeviceError, match="'tpu' is not a device"):
        resolve_device("tpu")


def test_the_summary_names_the_device_and_why_auto_chose_the_engine(quick):
    from fedloom import run

    summary = run(None, [*quick, "rounds=1", "model.name=cnn", "evaluation.federated=false",
                         "data.n_clients=10"]).summary
    assert summary["engine"] == "serial" and summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert "convolutions" in summary["engine_note"] and "no CUDA" in summary["device_note"]


def test_recurrent_models_are_refused_by_the_vectorized_engine_and_auto_trains_them_serially():
    lstm = build_model("shakespeare_lstm", (20,), 80)
    with pytest.raises(UnsupportedModel, match="recurrent layers.*LSTM.*engine.name = \"serial\""):
        check_vectorizable(lstm)
    assert "recurrent" in why_not_vectorize(lstm)
    assert why_not_vectorize(build_model("transformer", (20,), 80)) is None
    assert why_not_vectorize(nn.Sequential(nn.Conv2d(1, 2, 3)), torch.device("cuda")) is None  # GPUs batch convs
