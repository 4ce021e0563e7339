"""fedloom compare, fedloom sweep and key=value positional overrides, on tiny digits runs.

One sweep (3 algorithms x 3 seeds, 2 rounds, 10 clients, about 35 s on two cores) is shared by the
slow tests: its runs are also the runs compare is tried on."""

import csv
import json
import re
import shutil
import statistics

import pytest

from fedloom.cli import _overrides, _parse, main
from fedloom.config import ConfigError
from fedloom.sweep import sweep
from fedloom.tracking import RunDir
from fedloom.tracking.compare import expand, load_runs, render_compare, table

TINY = ["rounds=2", "data.n_clients=10", "evaluation.federated=false", "client.epochs=1", "engine.name=serial"]
ALGORITHMS = ("fedavg", "fedprox", "scaffold")
SEEDS = (0, 1, 2)
GRID = {"algorithm.name": list(ALGORITHMS)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_name(algorithm, seed):
    return f"algorithm.name={algorithm},seed={seed}"


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The sweep directory, made by the command line with positional overrides, two runs at a time."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    code = main(["sweep", "--grid", "algorithm.name=" + ",".join(ALGORITHMS), "--seeds", "0,1,2", "--jobs", "2",
                 "--out", str(out), *TINY[:2], "--set", TINY[2], *TINY[3:]])
    assert code == 0
    return out


@pytest.mark.slow
def test_sweep_runs_every_combination_and_tables_mean_and_std(swept):
    for algorithm in ALGORITHMS:
        for seed in SEEDS:
            s = summary(swept / run_name(algorithm, seed))
            assert (s["status"], s["algorithm"], s["rounds_done"]) == ("completed", algorithm, 2)
    rows = list(csv.DictReader(open(swept / "summary.csv")))
    assert [r["algorithm.name"] for r in rows] == list(ALGORITHMS)
    for row in rows:
        runs = [summary(swept / run_name(row["algorithm.name"], seed)) for seed in SEEDS]
        assert int(row["runs"]) == 3
        for key in ("central_accuracy", "central_loss", "train_loss", "bytes_up_total"):
            values = [r[key] for r in runs]
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-12, abs=1e-15)
    assert len(set(float(r["central_accuracy_mean"]) for r in rows)) > 1  # the grid changes the runs
    markdown = (swept / "summary.md").read_text()
    assert "| algorithm.name | runs | central_loss |" in markdown and " ± " in markdown
    assert (swept / "central_accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((swept / "sweep.json").read_text())["seeds"] == list(SEEDS)


@pytest.mark.slow
def test_rerun_runs_only_what_is_missing_and_refuses_other_arguments(swept, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(swept, out)
    shutil.rmtree(out / run_name("fedprox", 1))  # never started
    marked = out / run_name("fedavg", 2) / "summary.json"  # stopped by Ctrl-C or a kill of the sweep
    marked.write_text(json.dumps({**json.loads(marked.read_text()), "status": "interrupted"}))
    untouched = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/summary.json") if p != marked}

    result = sweep(None, GRID, list(SEEDS), TINY, jobs=1, out=out)  # one worker to start: cheaper here
    rerun = {run_name("fedprox", 1), run_name("fedavg", 2)}
    assert set(result.ran) == rerun and len(result.skipped) == 7
    assert all(status == "completed" for status in result.statuses.values())
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/summary.json")
            if p.parent.name not in rerun} == untouched
    for name in rerun:  # continued or run again, each ends as an uninterrupted run does
        assert summary(out / name)["central_accuracy"] == summary(swept / name)["central_accuracy"]

    assert sweep(None, GRID, list(SEEDS), TINY, jobs=2, out=out).ran == []
    with pytest.raises(ConfigError, match="other arguments.*--seeds"):
        sweep(None, GRID, [0, 1], TINY, out=out)


def test_sweep_checks_every_combination_before_running(tmp_path):
    with pytest.raises(ConfigError, match="algorithm.name=fedbogus"):
        sweep(None, {"algorithm.name": ["fedavg", "fedbogus"]}, [0], TINY, out=tmp_path / "s")
    assert not (tmp_path / "s").exists()
    assert main(["sweep", "--grid", "client.lr", *TINY]) == 2


@pytest.mark.slow
def test_compare_writes_table_plots_and_page(swept, tmp_path, capsys):
    dirs = [swept / run_name(a, 0) for a in ALGORITHMS]
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, dirs), "--out", str(out)]) == 0
    assert "fedloom compare: 3 runs" in capsys.readouterr().out
    runs, problems = load_runs(dirs)
    columns, rows = table(runs)
    assert not problems and columns[:4] == ["run", "status", "algorithm", "rounds_done"]
    written = list(csv.DictReader(open(out / "table.csv")))
    for run_dir, row, line in zip(dirs, rows, written):
        s = summary(run_dir)
        assert row[1:] == [s.get(key) for key in columns[1:]]
        assert float(line["central_accuracy"]) == s["central_accuracy"] and line["status"] == "completed"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"central_accuracy_vs_round.png", "central_accuracy_vs_uplink.png", "central_loss_vs_round.png",
            "train_loss_vs_round.png"} <= set(pngs)
    page = (out / "compare.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs) and "http" not in page
    assert all(run_dir.name in page for run_dir in dirs)


@pytest.mark.slow
def test_compare_expands_globs_and_directories_of_runs(swept):
    assert expand([str(swept / "algorithm.name=fedavg,seed=*")]) == [swept / run_name("fedavg", s) for s in SEEDS]
    assert len(expand([str(swept)])) == 9  # a sweep stands for its runs


@pytest.mark.slow
def test_compare_names_unusable_dirs(swept, tmp_path, capsys):
    empty, half = tmp_path / "empty", tmp_path / "half"
    empty.mkdir()
    shutil.copytree(swept / run_name("fedavg", 0), half)
    (half / "summary.json").unlink()
    missing = tmp_path / "missing"
    good = swept / run_name("fedavg", 1)
    assert main(["compare", str(empty), str(half), str(missing), str(good), "--out", str(tmp_path / "c")]) == 0
    err = re.sub(r"\s+", " ", capsys.readouterr().err)
    assert f"{empty}: not a fedloom run directory" in err
    assert f"{half}: no summary.json" in err and f"{missing}: does not exist" in err
    assert main(["compare", str(empty), str(missing), "--out", str(tmp_path / "d")]) == 2
    err = re.sub(r"\s+", " ", capsys.readouterr().err)
    assert str(empty) in err and str(missing) in err and "no usable run directory" in err
    assert not (tmp_path / "d").exists()


def fake_run(root, name, records, **summary):
    """A run directory written the way the runner writes one, without training."""
    run = RunDir.create(root, name)
    for record in records:
        run.append_metrics(record)
    run.write_summary({"name": name, "status": "completed", "rounds_done": len(records), **summary})
    return run.path


def test_compare_draws_epsilon_virtual_time_and_regression_where_runs_have_them(tmp_path):
    private = fake_run(tmp_path, "dp", [{"round": r, "central_accuracy": 0.1 * r, "bytes_up_total": 1000 * r,
                                         "epsilon": 0.5 * r, "virtual_seconds": 3.0 * r} for r in (1, 2, 3)],
                       central_accuracy=0.3, epsilon=1.5)
    plain = fake_run(tmp_path, "plain", [{"round": r, "central_accuracy": 0.2 * r} for r in (1, 2)],
                     central_accuracy=0.4)
    regression = fake_run(tmp_path, "reg", [{"round": r, "central_mse": 1.0 / r} for r in (1, 2)], central_mse=0.5)
    runs, problems = load_runs([private, plain, regression])
    written = render_compare(runs, tmp_path / "out")
    names = {p.name for p in written}
    assert {"central_accuracy_vs_round.png", "central_accuracy_vs_uplink.png", "central_accuracy_vs_epsilon.png",
            "central_accuracy_vs_virtual_seconds.png", "central_mse_vs_round.png"} <= names
    assert "central_perplexity_vs_round.png" not in names and "central_mse_vs_uplink.png" not in names
    columns, rows = table(runs)
    assert columns == ["run", "status", "algorithm", "rounds_done", "central_accuracy", "epsilon", "central_mse"]
    assert rows[2] == [regression.name, "completed", None, 2, None, None, 0.5]


def test_positional_overrides(tmp_path):
    args = _parse(["run", "rounds=1", "--quiet", "data.n_clients=10"])
    assert _overrides(args) == ["rounds=1", "data.n_clients=10"] and args.config is None
    with pytest.raises(SystemExit):
        _parse(["run", "--quiet", "--bogus"])
    config = tmp_path / "exp.toml"
    config.write_text('name = "tiny"\nrounds = 3\n')
    assert main(["run", str(config), "algorithm.name=fedprox", *TINY[1:], "--quiet", "rounds=1",
                 "--out", str(tmp_path / "runs")]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    resolved = (run_dir / "config.toml").read_text()
    assert 'name = "fedprox"' in resolved and "rounds = 1" in resolved and "n_clients = 10" in resolved
