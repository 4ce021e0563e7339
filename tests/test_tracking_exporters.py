"""Exporters ([tracking]): each one's output read back with that library's own reader equals
metrics.jsonl; a resumed run continues the same exports without a step twice; a missing library
names its extra; a failing exporter is reported once and the run goes on.

One run with every exporter on is shared (module scope): it is interrupted after round 3 with its
checkpoint set back to round 2, as a kill would leave it, then resumed to round 4. The round-trip tests
read it before the resume, the resume tests after (tests run in file order)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedloom import checkpoint
from fedloom.config import ConfigError, load_config
from fedloom.rounds import build_round
from fedloom.runner import RunFailed, drive, run
from fedloom.tracking import exporters, read_metrics
from fedloom.tracking.exporters import EXPORTS, MLFLOW_STORE, Exporters, wandb_files, wandb_read

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

BASE = ["rounds=4", "data.n_clients=10", "evaluation.federated=false", "evaluation.every=2", "model.name=logistic",
        "client.epochs=1", "checkpoint.every=2", "output.progress=false"]
EVERY_EXPORTER = ["tracking.tensorboard=true", "tracking.mlflow=true", "tracking.wandb=true"]
TIMINGS = ("round_seconds", "wall_seconds")  # the only values a replayed round does not repeat


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "round" and isinstance(v, (int, float))}


@pytest.fixture(scope="module")
def session():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_ERROR_REPORTING", "false")
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory, session):
    """Rounds 1-3 of 4 exported everywhere, stopped by Ctrl-C, the checkpoint back at round 2."""
    root = tmp_path_factory.mktemp("exports")
    cfg = load_config(None, [*BASE, *EVERY_EXPORTER, f"output.dir={str(root)!r}"])
    aside = root / "round2.pt"

    def on_round(record):
        (run_dir,) = root.glob(f"{cfg.name}-*")
        if record["round"] == 2:
            shutil.copy(run_dir / checkpoint.CHECKPOINT, aside)
        if record["round"] == 3:
            raise KeyboardInterrupt

    result = drive(build_round(cfg), on_round=on_round)
    shutil.copy(aside, result.run_dir / checkpoint.CHECKPOINT)  # a kill after round 3's metrics line
    return SimpleNamespace(root=root, run_dir=result.run_dir, cfg=cfg, summary=result.summary,
                           records=read_metrics(result.run_dir))


@pytest.fixture(scope="module")
def resumed(exported):
    result = run(resume=exported.run_dir)
    return SimpleNamespace(summary=result.summary, records=read_metrics(exported.run_dir))


def _mlflow(exported):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{exported.root / MLFLOW_STORE}")
    run_id = json.loads((exported.run_dir / EXPORTS).read_text())["mlflow"]["run_id"]
    return client, run_id


def _mlflow_history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / exporters.TENSORBOARD), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def _wandb_history(run_dir: Path) -> list[tuple[int, dict]]:
    """(step, row) of every history record of every session's .wandb log, in order."""
    run_id = json.loads((run_dir / EXPORTS).read_text())["wandb"]["id"]
    return [(rec["history"]["step"]["num"], rec["history"]["item"])
            for log in wandb_files(run_dir, run_id) for rec in wandb_read(log) if rec["type"] == "history"]


def _leaves(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _without_empty_tables(config: dict) -> dict:
    return {k: _without_empty_tables(v) if isinstance(v, dict) else v for k, v in config.items() if v != {}}


def test_csv_equals_metrics_jsonl(exported):
    import pandas as pd

    table = pd.read_csv(exported.run_dir / exporters.METRICS_CSV)
    assert [r["round"] for r in exported.records] == [1, 2, 3]
    keys = list(dict.fromkeys(k for r in exported.records for k in r))
    assert list(table.columns) == keys  # every key seen, central_* from round 2's evaluation on
    for row, record in zip(table.to_dict("records"), exported.records, strict=True):
        assert {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))} == record


def test_tensorboard_scalars_equal_the_records_and_the_figures_are_images(exported):
    events = _tensorboard(exported.run_dir)
    for key in {k for r in exported.records for k in _numbers(r)}:
        expected = [(r["round"], pytest.approx(v, rel=1e-6)) for r in exported.records
                    for k, v in _numbers(r).items() if k == key]
        assert [(e.step, e.value) for e in events.Scalars(key)] == expected, key
    images = events.Tags()["images"]
    assert {"figures/accuracy", "figures/partition"} <= set(images)
    (accuracy,) = events.Images("figures/accuracy")
    assert accuracy.step == 3 and accuracy.encoded_image_string.startswith(b"\x89PNG")


def test_mlflow_params_metrics_and_artifacts(exported):
    client, run_id = _mlflow(exported)
    found = client.get_run(run_id)
    leaves = _leaves(exported.cfg.to_dict())
    assert set(found.data.params) == set(leaves)
    for key, value in found.data.params.items():
        assert value == (leaves[key] if isinstance(leaves[key], str) else json.dumps(leaves[key])), key
    for key in {k for r in exported.records for k in _numbers(r)}:
        expected = [(r["round"], float(r[key])) for r in exported.records if key in r]
        assert _mlflow_history(client, run_id, key) == expected, key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.jsonl", "metrics.csv", "summary.json", "config.toml", "model.safetensors", "tensorboard",
            "accuracy.png"} <= artifacts
    assert exporters.WANDB not in artifacts
    assert found.info.status == "KILLED" and found.data.tags["fedloom.status"] == "interrupted"
    assert found.info.run_name == exported.run_dir.name


def test_wandb_offline_run_holds_the_config_history_and_summary(exported):
    history = _wandb_history(exported.run_dir)
    assert [step for step, _ in history] == [1, 2, 3]
    for (_, row), record in zip(history, exported.records):
        assert {k: row[k] for k in _numbers(record)} == pytest.approx(_numbers(record), rel=1e-12)
    (log,) = exported.run_dir.glob("wandb/offline-run-*/run-*.wandb")
    overview = wandb_read(log, summary=True)
    assert overview["config"] == _without_empty_tables(exported.cfg.to_dict())  # W&B keeps no empty table
    assert overview["summary"]["status"] == "interrupted" and overview["summary"]["rounds_done"] == 3
    assert overview["exit_code"] == 1 and overview["project"] == "fedloom"


def test_resume_continues_every_export_without_a_step_twice(exported, resumed):
    records = resumed.records
    assert [r["round"] for r in records] == [1, 2, 3, 4] and resumed.summary["status"] == "completed"
    assert "tracking_errors" not in resumed.summary
    import pandas as pd

    assert pd.read_csv(exported.run_dir / exporters.METRICS_CSV)["round"].tolist() == [1, 2, 3, 4]
    events = _tensorboard(exported.run_dir)  # the earlier session's events are purged, every round again
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [
        (r["round"], pytest.approx(r["train_loss"], rel=1e-6)) for r in records]
    assert [e.step for e in events.Images("figures/accuracy")] == [4]
    client, run_id = _mlflow(exported)
    first = {r["round"]: r for r in exported.records}  # round 3 stays as the first session exported it
    for key in ("train_loss", "central_accuracy", "wall_seconds"):
        expected = [(r["round"], float(first.get(r["round"], r)[key])) for r in records if key in r]
        assert _mlflow_history(client, run_id, key) == expected, key
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("fedloom").experiment_id])) == 1
    history = _wandb_history(exported.run_dir)  # two sessions, one run id
    assert [step for step, _ in history] == [1, 2, 3, 4]
    assert history[-1][1]["train_loss"] == pytest.approx(records[-1]["train_loss"], rel=1e-12)
    for key in set(records[2]) - set(TIMINGS) - {"round"}:
        assert records[2][key] == exported.records[2][key], key  # the replay repeats what was exported


@pytest.mark.parametrize("key,modules", [("tensorboard", ["torch.utils.tensorboard"]),
                                         ("mlflow", ["mlflow", "mlflow.tracking"]), ("wandb", ["wandb"])])
def test_a_missing_library_names_its_extra(monkeypatch, key, modules):
    for module in modules:
        monkeypatch.setitem(__import__("sys").modules, module, None)
    with pytest.raises(ConfigError, match=rf"tracking\.{key} = true needs .*pip install 'fedloom\[{key}\]'"):
        Exporters.build(load_config(None, [f"tracking.{key}=true"]))


def test_a_missing_library_stops_the_run_before_its_directory_is_made(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"fedloom\[wandb\]"):
        run(None, [*BASE, "tracking.wandb=true", f"output.dir={str(tmp_path)!r}"])
    assert not any(tmp_path.iterdir())


def test_a_failing_exporter_is_reported_once_and_the_run_goes_on(monkeypatch, tmp_path):
    calls = []

    def broken(self, record):
        calls.append(record["round"])
        if record["round"] == 2:
            raise RuntimeError("the store went away")
        return original(self, record)

    original = exporters.CsvExporter.round
    monkeypatch.setattr(exporters.CsvExporter, "round", broken)
    with pytest.warns(RuntimeWarning, match="tracking.csv failed") as caught:
        result = run(None, [*BASE, "rounds=3", f"output.dir={str(tmp_path)!r}"])
    assert len([w for w in caught if "tracking." in str(w.message)]) == 1
    assert result.summary["status"] == "completed" and result.summary["rounds_done"] == 3
    assert result.summary["tracking_errors"] == {"csv": "round 2: RuntimeError: the store went away"}
    assert json.loads((result.run_dir / "summary.json").read_text())["tracking_errors"] == result.summary[
        "tracking_errors"]
    assert calls == [1, 2] and [r["round"] for r in read_metrics(result.run_dir)] == [1, 2, 3]
    assert (result.run_dir / exporters.METRICS_CSV).read_text().count("\n") == 2  # the header and round 1


class Recorder(exporters.Exporter):
    name = "csv"

    def __init__(self, calls):
        self.calls = calls

    def start(self, cfg, run_dir, resumed):
        self.calls.append("start")

    def round(self, record):
        self.calls.append(record["round"])

    def finish(self, summary, run_dir):
        self.calls.append(f"finish {summary['status']}")

    def close(self):
        self.calls.append("close")


def test_exporters_end_on_a_crash_and_on_an_error_in_the_final_writes(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(exporters.EXPORTERS, "csv", lambda tracking: Recorder(calls))

    def crash(record):
        if record["round"] == 2:
            raise RuntimeError("a worker was lost")

    with pytest.raises(RunFailed, match="crashed"):
        drive(build_round(load_config(None, [*BASE, f"output.dir={str(tmp_path / 'a')!r}"])), on_round=crash)
    assert calls == ["start", 1, 2, "finish crashed"]  # finished: its close is not called again
    calls.clear()
    monkeypatch.setattr("fedloom.runner.render_report", lambda path: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run(None, [*BASE, "rounds=1", f"output.dir={str(tmp_path / 'b')!r}"])
    assert calls == ["start", 1, "close"]
