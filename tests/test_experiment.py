"""End to end: accuracy targets, determinism, the run directory, interruption."""

import json

import pytest

from fedloom.rounds.federated import FederatedRound
from fedloom.runner import RunResult, run
from fedloom.config import load_config


@pytest.mark.parametrize("partition, target", [(["partition.name=iid"], 0.90), (["partition.options.alpha=0.1"], 0.80)])
def test_fedavg_on_digits_reaches_target_accuracy(quick, partition, target):
    result = run(None, [*quick, "evaluation.every=10", *partition])
    assert result.final["central_accuracy"] >= target


def test_same_seed_gives_identical_metrics(saved):
    overrides = [*saved, "rounds=4", "algorithm.name=scaffold"]
    first, second = run(None, overrides), run(None, overrides)
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]  # noqa: E731
    assert strip(first.history) == strip(second.history)
    lines = lambda r: [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(lines(first)) == strip(lines(second))
    other = run(None, [*overrides, "seed=1", "output.save=false"])
    assert strip(other.history) != strip(first.history)


def test_run_directory_holds_everything(saved):
    result = run(None, [*saved, "rounds=3", "name=unit"])
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"config.toml", "metrics.jsonl", "summary.json", "model.safetensors", "partition.json",
            "accuracy.png", "loss.png", "partition.png", "report.html"} <= files
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_done"] == 3
    assert summary["central_accuracy"] == result.history[-1]["central_accuracy"]
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    d = result.params.numel()
    assert records[0]["bytes_up"] == 10 * d * 4 and records[0]["bytes_down"] == 10 * d * 4
    assert records[-1]["bytes_up_total"] == 3 * 10 * d * 4
    resolved = load_config(result.run_dir / "config.toml")
    assert resolved.rounds == 3 and resolved.name == "unit"


def test_ctrl_c_keeps_what_was_written(saved, monkeypatch):
    real_play = FederatedRound.play

    def interrupt_at_third(self, state, r):
        if r == 3:
            raise KeyboardInterrupt
        return real_play(self, state, r)

    monkeypatch.setattr(FederatedRound, "play", interrupt_at_third)
    result: RunResult = run(None, [*saved, "rounds=10"])
    assert result.summary["status"] == "interrupted" and result.summary["rounds_done"] == 2
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (result.run_dir / "model.safetensors").exists() and (result.run_dir / "report.html").exists()


def test_adaptive_server_optimizers_learn(quick):
    for name in ("fedadam", "fedyogi", "fedadagrad", "fedavgm"):
        result = run(None, [*quick, f"algorithm.name={name}", "rounds=10", "evaluation.every=10",
                            "evaluation.federated=false"])
        assert result.final["central_accuracy"] > 0.6, name


def test_overrides_leave_the_callers_dict_alone():
    from fedloom.config import load_config

    raw = {"client": {"lr": 0.1}}
    assert load_config(raw, ["client.lr=0.3"]).client.lr == 0.3
    assert raw == {"client": {"lr": 0.1}}


def test_the_readme_config_block_loads_and_holds_the_defaults():
    import re
    import tomllib
    from pathlib import Path

    from fedloom.cli import DEFAULTS
    from fedloom.config import load_config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Config.*?```toml\n(.*?)```", readme, re.S).group(1)
    assert load_config(tomllib.loads(block)).to_dict() == load_config().to_dict()
    assert block == DEFAULTS.read_text()  # what `fedloom config` prints


def test_the_readme_import_lines_import():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = re.findall(r"`(from fedloom[\w.]* import [\w, ]+)`", readme)
    assert len(lines) >= 4
    for line in lines:
        exec(line, {})
