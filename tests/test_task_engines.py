"""Every task trains to the same numbers on the serial and the vectorized engine, with data and models
handed over from Python: regression, language modelling with the transformer, a user's task, and
ResNet-20 with GroupNorm; recurrent models fall back to the serial engine."""

import numpy as np
import pytest
import torch
from torch import nn

from fedloom import run
from fedloom.builders import GivenParts
from fedloom.config import ConfigError, load_config
from fedloom.core.store import ClientStore
from fedloom.data.datasets import IGNORE
from fedloom.data.given import as_datasets
from fedloom.rounds import build_round
from fedloom.runner import Stepper

QUICK = ["output.save=false", "output.progress=false", "evaluation.federated=true"]


def regression_data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    return {"x": x, "y": (x @ rng.normal(size=5) + 0.1 * rng.normal(size=n)).astype(np.float32),
            "task": "regression"}


def token_data(n=120, length=12, vocab=9, seed=0):
    """Sequences that count up modulo the vocabulary (learnable), with the last targets of some padded."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab, size=(n, 1))
    tokens = (start + np.arange(length + 1)) % vocab
    y = tokens[:, 1:].copy()
    y[: n // 3, length - 4:] = IGNORE
    return {"x": tokens[:, :-1], "y": y, "task": "language_model"}


def _round(data, *overrides, model=None):
    cfg = load_config(None, [*QUICK, "data.dataset=python", *(["model.name=python"] if model else []), *overrides])
    return Stepper(build_round(cfg, GivenParts(as_datasets(data), model)))


def _serial_and_vectorized(data, *overrides, model=None):
    return (_round(data, *overrides, "engine.name=serial", model=model),
            _round(data, *overrides, "engine.name=vectorized", model=model))


def relative_gap(a, b):
    """The largest ||a - b|| / ||a|| over rows. (On a badly conditioned batch, e.g. one draw of pure noise
    images for a ResNet at initialization, float32 rounding alone moves a row by 1e-4 whichever engine
    computes it: the serial engine's gradient differed from float64's by 1.9e-4 there, the vmapped one's
    by 7e-7. The data below has signal.)"""
    return ((a - b).norm(dim=-1) / a.norm(dim=-1)).max().item()


def _same_rounds(serial, vectorized, rounds, metrics, rel=1e-4):
    for r in range(1, rounds + 1):
        a, b = serial.round(r), vectorized.round(r)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=rel)
        for key in metrics:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), key
        assert relative_gap(serial.state["x"], vectorized.state["x"]) < rel
    return a


def test_regression_is_the_same_on_both_engines_and_learns():
    serial, vectorized = _serial_and_vectorized(regression_data(), "partition.name=quantity", "data.n_clients=10",
                                                "model.name=logistic", "client.lr=0.05", "client.epochs=2")
    first = serial.round_.evaluate(serial.state)["central_mse"]
    last = _same_rounds(serial, vectorized, 4, ["central_mse", "central_mae", "federated_mse_worst10"])
    assert last["central_mse"] < 0.2 * first  # a linear target: the model finds it
    assert "central_accuracy" not in last and last["central_loss"] == last["central_mse"]


def test_label_skew_partitioners_need_class_labels():
    with pytest.raises(Exception, match="partitioner 'dirichlet' deals out examples by class label.*regression"):
        _round(regression_data(), "partition.name=dirichlet")


def test_language_modelling_with_the_transformer_is_the_same_on_both_engines_and_learns():
    serial, vectorized = _serial_and_vectorized(
        token_data(), "partition.name=iid", "data.n_clients=6", "sampling.clients_per_round=6", "model.name=transformer",
        "model.options.d_model=16", "model.options.heads=2", "model.options.layers=1", "client.lr=0.5",
        "client.batch_size=7", "client.epochs=2")
    first = serial.round_.evaluate(serial.state)
    last = _same_rounds(serial, vectorized, 3, ["central_loss", "central_accuracy", "central_perplexity"])
    assert last["central_perplexity"] < 0.2 * first["central_perplexity"]  # 9.87 -> 1.46 measured
    assert last["central_perplexity"] == pytest.approx(np.exp(last["central_loss"]))


class AbsoluteError:
    """A user's task by import path: absolute error as the loss, the share within 0.5 as its metric."""

    primary = "within_half"

    def loss(self, output, target):
        return (output.squeeze(-1) - target).abs()

    def metrics(self, output, target):
        return {"within_half": ((output.squeeze(-1) - target).abs() < 0.5).float()}


def test_a_user_task_by_import_path_runs_end_to_end_on_both_engines():
    serial, vectorized = _serial_and_vectorized(regression_data(), "task=test_task_engines:AbsoluteError",
                                                "partition.name=iid", "data.n_clients=8", "model.name=logistic",
                                                "client.lr=0.05")
    last = _same_rounds(serial, vectorized, 3, ["central_within_half", "federated_within_half_worst10"])
    assert last["central_within_half"] > 0.5 and "central_mse" not in last


def test_resnet20_groupnorm_per_client_rows_are_the_same_on_both_engines():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 40)
    x = rng.random((40, 3, 32, 32), dtype=np.float32) * 0.5 + (y[:, None, None, None] / 20).astype(np.float32)
    data = {"x": x, "y": y}
    serial, vectorized = _serial_and_vectorized(data, "partition.name=iid", "data.n_clients=4", "model.name=resnet20",
                                                "client.batch_size=4", "client.epochs=1", "client.lr=0.05")
    clients, x0 = [0, 1, 2, 3], serial.state["x"]
    a = serial.engine.run_round(serial.algorithm, x0, {}, clients, 1, ClientStore())
    b = vectorized.engine.run_round(vectorized.algorithm, x0, {}, clients, 1, ClientStore())
    assert a.U.abs().sum() > 0
    assert relative_gap(a.U, b.U) < 1e-5  # measured 4.5e-7
    torch.testing.assert_close(b.train_loss, a.train_loss, rtol=1e-4, atol=1e-6)


def test_an_lstm_runs_serially_under_auto_with_the_reason_and_is_refused_by_vectorized():
    lm = token_data(n=30)
    result = run(None, [*QUICK, "rounds=1", "partition.name=iid", "data.n_clients=3", "model.name=shakespeare_lstm",
                        "model.options.hidden=8", "model.options.layers=1"], data=lm)
    assert result.summary["engine"] == "serial" and "recurrent layers" in result.summary["engine_note"]
    assert np.isfinite(result.summary["central_perplexity"])
    with pytest.raises(ConfigError, match="engine.name: the vectorized engine cannot run recurrent layers"):
        run(None, [*QUICK, "rounds=1", "partition.name=iid", "data.n_clients=3", "model.name=shakespeare_lstm",
                   "engine.name=vectorized"], data=lm)


class Wide(nn.Module):
    def __init__(self, input_shape, n_classes, width=4):
        super().__init__()
        self.layer = nn.Linear(input_shape[0], n_classes)
        self.width = width

    def forward(self, x):
        return self.layer(x)


def test_a_model_class_or_function_from_python_is_built_with_its_options():
    data = regression_data()
    result = run(None, [*QUICK, "rounds=2", "partition.name=iid", "data.n_clients=4", "model.options.width=7"],
                 data=data, model=Wide)
    assert result.model.width == 7 and result.summary["dataset"] == "python"
    lam = run(None, [*QUICK, "rounds=1", "partition.name=iid", "data.n_clients=4"], data=data,
              model=lambda input_shape, n_classes: nn.Linear(input_shape[0], n_classes))
    assert isinstance(lam.model, nn.Linear)
    with pytest.raises(Exception, match=r"model 'python' takes no option depth"):
        run(None, [*QUICK, "rounds=1", "partition.name=iid", "data.n_clients=4", "model.options.depth=2"], data=data,
            model=Wide)


def test_a_model_that_does_not_fit_the_data_fails_before_the_run_naming_both():
    with pytest.raises(ConfigError, match=r"model 'mlp' cannot run on dataset 'python', whose inputs are torch.int64 "
                                          r"of shape \[12\]"):
        run(None, [*QUICK, "rounds=1", "partition.name=iid", "data.n_clients=3", "model.name=mlp"], data=token_data())


def test_a_model_that_fails_while_being_built_is_one_message():
    def broken(input_shape, n_classes):
        raise RuntimeError("no GPU kernels for this")

    with pytest.raises(Exception, match="model 'python' failed while being built: RuntimeError: no GPU kernels"):
        run(None, [*QUICK, "rounds=1", "partition.name=iid", "data.n_clients=4"], data=regression_data(), model=broken)


def test_handed_over_names_without_the_data_are_a_clear_error():
    with pytest.raises(Exception, match=r"data.dataset = 'python' is data handed to fedloom.run\(data=...\)"):
        run(None, [*QUICK, "rounds=1", "data.dataset=python"])


def test_a_regression_npz_runs_from_the_config_alone_and_plots_its_errors(tmp_path):
    arrays = regression_data(n=300)
    np.savez(tmp_path / "houses.npz", x=arrays["x"], y=arrays["y"])
    result = run(None, [f"output.dir={str(tmp_path / 'runs')!r}", "output.progress=false", "rounds=3",
                        "data.dataset=npz", f"data.options.path={str(tmp_path / 'houses.npz')!r}",
                        "data.options.task=regression", "partition.name=iid", "data.n_clients=5",
                        "model.name=logistic", "client.lr=0.05"])
    assert result.summary["central_mse"] < result.history[0]["central_mse"]
    assert (result.run_dir / "error.png").is_file() and not (result.run_dir / "accuracy.png").exists()
    partition = (result.run_dir / "partition.json").read_text()
    assert '"task": "regression"' in partition and "label_histogram" not in partition


def test_a_language_model_run_reports_tokens_and_plots_perplexity(tmp_path):
    result = run(None, [f"output.dir={str(tmp_path / 'runs')!r}", "output.progress=false", "rounds=2",
                        "partition.name=iid", "data.n_clients=4", "model.name=transformer",
                        "model.options.d_model=8", "model.options.heads=2", "model.options.layers=1"],
                 data=token_data(n=40))
    train = result.summary["train_examples"]
    assert result.summary["n_clients"] == 4 and result.summary["train_tokens"] < 12 * train
    assert (result.run_dir / "perplexity.png").is_file() and "central_perplexity" in result.summary


def test_data_from_python_as_arrays_a_dict_with_a_test_split_or_a_torch_dataset():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(120, 4)).astype(np.float32), rng.integers(0, 3, 120)
    overrides = [*QUICK, "rounds=1", "partition.name=iid", "data.n_clients=4", "model.name=logistic"]
    arrays = run(None, overrides, data=(x, torch.from_numpy(y)))
    assert arrays.summary["train_examples"] == 76  # 96 after the global test set, 19 of each client's 24
    split = run(None, overrides, data={"x": x[:100], "y": y[:100], "x_test": x[100:], "y_test": y[100:]})
    assert split.summary["train_examples"] == 80  # no global test set held out: the given one is used
    tensors = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    assert run(None, overrides, data=tensors).summary["train_examples"] == 76
    with pytest.raises(Exception, match="data: a str is not data fedloom reads"):
        run(None, overrides, data="digits")
