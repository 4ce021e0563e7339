"""Runs under faults, through the real command line: a full disk, updates that are all rejected,
NaN in a user's data; and strict JSON in the run directory."""

import json
import math
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from fedloom import checkpoint
from fedloom.data import DataError, load_dataset
from fedloom.tracking.rundir import to_json

SMALL = ["data.n_clients=20", "sampling.clients_per_round=6", "client.epochs=1", "model.name=logistic",
         "output.progress=false"]


def _fedloom(*args, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "fedloom.cli", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec_fn)


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _small_disk(limit_bytes):
    """A child whose files cannot grow past ``limit_bytes`` (writes past it fail with EFBIG, as on a full disk)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return limit


def test_a_full_disk_stops_with_one_message_and_the_run_resumes(tmp_path):
    done = _fedloom("run", *_sets([*SMALL, "rounds=300", "checkpoint.every=1"]), "--out", str(tmp_path),
                    preexec_fn=_small_disk(40_000))
    assert done.returncode == 1, done.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    assert "cannot write the run directory" in done.stderr and str(run_dir) in done.stderr.replace("\n", "")
    assert "Traceback" not in done.stderr
    saved = checkpoint.load(run_dir / checkpoint.CHECKPOINT)["round"]
    assert 10 < saved < 300  # the last complete checkpoint is kept
    resumed = _fedloom("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, 301))


def test_a_run_whose_every_update_is_rejected_stops_as_failed(tmp_path):
    # every client Byzantine, scaling its update past float32's range: every row is Inf/NaN, every round
    flood = ["attack.name=scaling", "attack.f=20", "attack.options.factor=1e39"]
    done = _fedloom("run", *_sets([*SMALL, *flood, "rounds=30", "max_failed_rounds=3"]), "--out", str(tmp_path))
    assert done.returncode == 1 and "no update was usable in 3 rounds in a row" in done.stderr
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_done"] == 3
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")) for line in lines]
    assert all(r["n_rejected"] == 6 and r["train_loss"] is None for r in records)
    assert all(r["non_finite"]["train_loss"] == "nan" for r in records)
    assert (run_dir / "model.safetensors").exists() and (run_dir / "report.html").exists()


def test_json_in_the_run_directory_is_strict():
    assert to_json({"a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}}) == \
        '{"a": null, "b": [null, 1.0], "c": {"d": null}}'


@pytest.mark.parametrize("suffix", ["npz", "csv"])
def test_nan_in_a_users_data_is_refused_naming_the_file_and_row(tmp_path, suffix):
    x = np.ones((10, 3), dtype=np.float32)
    x[6, 2] = np.nan
    y = np.arange(10) % 2
    path = tmp_path / f"mine.{suffix}"
    if suffix == "npz":
        np.savez(path, x=x, y=y)
    else:
        x[6, 2] = np.inf  # a missing CSV value is refused too, naming its line; inf parses as a number
        rows = ["f0,f1,f2,label", *[f"{a},{b},{c},{label}" for (a, b, c), label in zip(x.tolist(), y)]]
        path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=rf"{path}: example 6 .* holds NaN or Inf"):
        load_dataset(suffix, path=str(path))
    done = _fedloom("run", "--set", f"data.dataset={suffix}", "--set", f"data.options.path={str(path)!r}",
                    "--set", "data.n_clients=2", "--set", "output.save=false")
    assert done.returncode == 2 and "example 6" in done.stderr and "Traceback" not in done.stderr
