"""Run directory, metrics stream, plots and HTML report."""

from __future__ import annotations

import base64
import json
import os
import re
import tomllib
from datetime import datetime

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fedloom
from fedloom.tracking import RunDir, read_metrics, render_report, rundir
from fedloom.tracking.rundir import METRICS, SUMMARY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run(tmp_path) -> RunDir:
    return RunDir.create(tmp_path, "exp")


def federated_records(n_rounds: int = 12) -> list[dict]:
    """Evaluation every 3rd round only, as real runs log it."""
    records = []
    for r in range(1, n_rounds + 1):
        record = {"round": r, "train_loss": 2.0 / r, "bytes_up": 1000, "bytes_up_total": 1000 * r}
        if r % 3 == 0:
            record.update(central_accuracy=0.5 + r / 100, federated_accuracy=0.45 + r / 100,
                          federated_accuracy_worst10=0.3 + r / 100, central_loss=1.0 / r)
        records.append(record)
    return records


def assert_png(path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, f"{path} is suspiciously small ({len(data)} bytes)"


# --- run directory ----------------------------------------------------------

def test_create_makes_unique_dirs_within_one_second(tmp_path, monkeypatch):
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 5, 17, 9, 3, 7)

    monkeypatch.setattr(rundir, "datetime", FrozenClock)
    first = RunDir.create(tmp_path / "runs", "exp")
    (first.path / "keep.txt").write_text("mine")
    names = [first.path.name] + [RunDir.create(tmp_path / "runs", "exp").path.name for _ in range(2)]
    assert names == ["exp-20240517-090307", "exp-20240517-090307-2", "exp-20240517-090307-3"]
    assert (first.path / "keep.txt").read_text() == "mine"


def test_create_rejects_names_that_are_paths(tmp_path):
    with pytest.raises(ValueError, match="a/b"):
        RunDir.create(tmp_path, "a/b")


def test_metrics_round_trip_including_numpy_and_torch_scalars(run):
    run.append_metrics({"round": 1, "train_loss": np.float32(0.5), "n_sampled": torch.tensor(7)})
    run.append_metrics({"round": 2, "central_accuracy": 0.75, "bytes_up_total": 2**40})
    assert read_metrics(run.path) == [
        {"round": 1, "train_loss": 0.5, "n_sampled": 7},
        {"round": 2, "central_accuracy": 0.75, "bytes_up_total": 2**40},
    ]


def test_every_metrics_line_is_fsynced(run, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    for r in range(3):
        run.append_metrics({"round": r + 1})
    assert len(synced) == 3


def test_truncated_last_line_is_skipped_with_warning(run):
    run.append_metrics({"round": 1, "train_loss": 1.0})
    run.append_metrics({"round": 2, "train_loss": 0.9})
    with open(run.path / METRICS, "a") as f:
        f.write('{"round": 3, "train_lo')  # a crash mid-write
    with pytest.warns(UserWarning, match="truncated last line 3"):
        records = read_metrics(run.path)
    assert [r["round"] for r in records] == [1, 2]


def test_corrupt_middle_line_is_an_error_naming_file_and_line(run):
    (run.path / METRICS).write_text('{"round": 1}\n{"round": 2,,}\n{"round": 3}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(run.path / METRICS))}: line 2"):
        read_metrics(run.path)


def test_missing_metrics_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / METRICS))):
        read_metrics(tmp_path)


def test_summary_is_replaced_atomically(run, monkeypatch):
    run.write_summary({"status": "interrupted", "rounds_done": 3})

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        run.write_summary({"status": "completed", "rounds_done": 10})
    assert json.loads((run.path / SUMMARY).read_text()) == {"status": "interrupted", "rounds_done": 3}
    assert sorted(p.name for p in run.path.iterdir()) == [SUMMARY], "temporary file left behind"


def test_unserializable_summary_leaves_previous_one(run):
    run.write_summary({"status": "completed"})
    with pytest.raises(TypeError):
        run.write_summary({"status": object()})
    assert json.loads((run.path / SUMMARY).read_text()) == {"status": "completed"}


def test_model_round_trips_through_safetensors(run):
    weight = torch.randn(4, 3)
    tensors = {"fc.weight": weight.T, "fc.bias": torch.randn(4)[::2], "tied": weight}  # views, shared storage
    path = run.save_model(tensors)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name


def test_config_round_trips_and_drops_none(run, tmp_path):
    run.write_config({"name": "exp", "seed": 3, "resume": None, "out": tmp_path,
                      "data": {"alpha": 0.5, "root": None, "sizes": (1, 2)}})
    config = tomllib.loads((run.path / "config.toml").read_text())
    assert config == {"name": "exp", "seed": 3, "out": str(tmp_path), "data": {"alpha": 0.5, "sizes": [1, 2]}}


# --- plots and report --------------------------------------------------------

def test_report_draws_plots_and_self_contained_html(run):
    run.write_config({"name": "exp", "note": "<script>alert('x') & more</script>"})
    for record in federated_records():
        run.append_metrics(record)
    run.write_summary({"name": "fedavg-on-<mnist>", "status": "completed", "rounds_done": 12})
    rng = np.random.default_rng(0)
    run.write_partition({"n_clients": 150, "train_sizes": rng.integers(10, 100, 150).tolist(),
                         "test_sizes": rng.integers(1, 20, 150).tolist(),
                         "label_histogram": rng.integers(0, 30, (150, 10)).tolist(), "global_test_size": 1000})

    html_path = render_report(run.path)

    assert html_path == run.path / "report.html"
    for name in ("accuracy", "loss", "partition"):
        assert_png(run.path / f"{name}.png")
    assert not (run.path / "nodes.png").exists() and not (run.path / "consensus.png").exists()
    page = html_path.read_text()
    assert "fedavg-on-&lt;mnist&gt;" in page and "<mnist>" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    assert base64.b64decode(images[0]) == (run.path / "accuracy.png").read_bytes()
    assert "&lt;script&gt;alert(&#x27;x&#x27;) &amp; more&lt;/script&gt;" in page
    assert "<script" not in page.lower() and "http" not in page.lower()


def test_report_survives_missing_evaluation_and_bytes(run):
    run.append_metrics({"round": 1, "train_loss": 1.0})
    run.append_metrics({"round": 2})
    run.append_metrics({"round": 3, "central_accuracy": 0.4})
    html_path = render_report(run.path)
    assert_png(run.path / "accuracy.png")
    assert_png(run.path / "loss.png")
    assert "Final metrics (round 3)" in html_path.read_text()


def test_report_merges_evaluation_logged_as_separate_records(run):
    run.append_metrics({"round": 1, "train_loss": 1.0, "bytes_up_total": 2_000_000})
    run.append_metrics({"round": 1, "central_accuracy": 0.4})
    page = render_report(run.path).read_text()
    assert "<th>central_accuracy</th>" in page and "<th>bytes_up_total</th>" in page


def test_report_of_empty_run(run):
    (run.path / METRICS).touch()
    page = render_report(run.path).read_text()
    assert "No rounds recorded yet" in page
    assert not list(run.path.glob("*.png"))


def test_decentralized_keys_draw_nodes_and_consensus(run):
    for r in range(1, 21):
        run.append_metrics({"round": r, "node_accuracy_mean": 0.5 + r / 50, "node_accuracy_min": 0.3 + r / 50,
                            "node_accuracy_max": 0.6 + r / 50, "xbar_accuracy": 0.55 + r / 50,
                            "consensus_distance": 10.0 ** -r if r != 5 else 0.0, "bytes_per_node": 100 * r})
    render_report(run.path)
    assert_png(run.path / "nodes.png")
    assert_png(run.path / "consensus.png")
    assert not (run.path / "accuracy.png").exists()


def test_missing_run_dir_names_the_path(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        render_report(missing)


def test_the_summary_lists_each_clients_final_metric_for_the_histograms():
    import math

    result = fedloom.run({"rounds": 2, "data": {"n_clients": 12}, "client": {"epochs": 1},
                          "output": {"save": False, "progress": False}})
    per_client = result.summary["per_client_accuracy"]
    assert per_client["clients"] == list(range(12)) and len(per_client["global"]) == 12
    worst = sorted(per_client["global"])[: math.ceil(0.1 * 12)]  # the same model's worst 10% of clients
    assert sum(worst) / len(worst) == pytest.approx(result.summary["federated_accuracy_worst10"], abs=1e-6)


def test_the_partition_plot_draws_client_sizes_as_two_polygons_whatever_the_number_of_clients(monkeypatch, tmp_path):
    """A bar per client made a 100,000-client run spend two minutes on this figure; the sizes are one filled
    step polygon per series, whose outline is the sorted sizes (train, then test stacked on it)."""
    from fedloom.tracking import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.setdefault("fig", fig) and path)
    rng = np.random.default_rng(0)
    train, test = rng.integers(1, 60, 20_000), rng.integers(0, 15, 20_000)
    stats = {"train_sizes": train.tolist(), "test_sizes": test.tolist(), "n_clients": 20_000,
             "label_histogram": rng.integers(0, 10, (20_000, 10)).tolist()}
    plots.plot_partition(stats, tmp_path / "partition.png")
    sizes = drawn["fig"].axes[0]
    assert len(sizes.patches) == 0 and len(sizes.collections) == 2
    order = np.argsort(-train, kind="stable")
    tops = [c.get_paths()[0].vertices[:, 1].max() for c in sizes.collections]
    assert tops == [train.max(), (train[order] + test[order]).max()]
    assert sizes.get_ylim()[0] == 0
