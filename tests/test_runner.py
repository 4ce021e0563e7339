"""The runner: resume after SIGKILL ends bit-identical to an uninterrupted run, checkpoints are
never left torn, SIGTERM completes the run directory, user transforms plug in by import path,
and every combination rule fires when the config loads."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedloom import checkpoint
from fedloom.config import ConfigError, load_config
from fedloom.runner import run
from helpers import play, stepper

TESTS = Path(__file__).parent
SMALL = ["rounds=6", "data.n_clients=20", "sampling.clients_per_round=6", "client.epochs=1", "model.name=logistic",
         "output.progress=false"]
SLOW = ["model.name=user_parts:SlowLogistic"]
RESUMABLE = {
    "fedavg": [],
    "scaffold": ["algorithm.name=scaffold", "client.lr=0.05"],
    "topk_ef": ["compression.name=topk", "compression.options={k = 0.05}", "compression.feedback=ef"],
    "fedadam": ["algorithm.name=fedadam"],
    "dsgd": ["mode=decentralized", "data.n_clients=12"],
    "fedbuff_async": ["mode=asynchronous", "system.profile=sampled", "system.speed_spread=10",
                      "asynchronous.concurrency=4", "asynchronous.buffer_size=3"],
    "stale_deadline": ["system.profile=sampled", "system.speed_spread=10", "system.deadline_s=0.02",
                       "system.late=stale"],
}


def _fedloom(*args, env=None, check=True, **kwargs):
    environment = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    out = subprocess.run([sys.executable, "-m", "fedloom.cli", *args], env=environment, capture_output=True,
                         text=True, timeout=240, **kwargs)
    if check and out.returncode not in (0, 130):
        raise AssertionError(f"fedloom {' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _only_run_dir(root: Path) -> Path:
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir


def _kill_after_round(overrides, out: Path, k: int) -> Path:
    """Start ``fedloom run`` with slowed forward passes, SIGKILL it once round k's metrics line is
    written (it is then in round k + 1 or later), and return its run directory."""
    env = {**os.environ, "PYTHONPATH": str(TESTS), "SLOW_FORWARD_S": "0.005"}
    process = subprocess.Popen([sys.executable, "-m", "fedloom.cli", "run", *_sets(overrides), "--out", str(out)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        metrics = list(out.glob("*/metrics.jsonl"))
        if metrics and len(metrics[0].read_text().splitlines()) >= k:
            break
        time.sleep(0.01)
    process.kill()
    assert process.wait(30) == -signal.SIGKILL, process.stderr.read()[-2000:]
    return _only_run_dir(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_a_run_killed_after_round_3_resumes_to_the_uninterrupted_model(tmp_path, name):
    overrides = [*SMALL, *RESUMABLE[name], *SLOW, "checkpoint.every=1"]
    _fedloom("run", *_sets(overrides), "--out", str(tmp_path / "whole"))
    run_dir = _kill_after_round(overrides, tmp_path / "cut", 3)
    # killed in round 4 or later, or between round 3's metrics line and its checkpoint (cut on resume)
    assert 2 <= checkpoint.load(run_dir / checkpoint.CHECKPOINT)["round"] < 6
    assert not (run_dir / "model.safetensors").exists()
    _fedloom("run", "--resume", str(run_dir))
    whole = _only_run_dir(tmp_path / "whole")
    assert (run_dir / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    strip = lambda d: [{k: v for k, v in json.loads(line).items() if "seconds" not in k}  # noqa: E731
                       for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert strip(run_dir) == strip(whole)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_resume_cuts_rounds_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    result = run(None, [*SMALL, f"output.dir={str(tmp_path)!r}", "checkpoint.every=2", "rounds=3"])
    metrics = result.run_dir / "metrics.jsonl"
    # as if killed after round 3's metrics line and before its checkpoint: the checkpoint holds round 2
    two_rounds = stepper(*SMALL, "output.save=false")
    two_rounds.round(1), two_rounds.round(2)
    checkpoint.save(result.run_dir / checkpoint.CHECKPOINT, two_rounds.state)
    metrics.write_text(metrics.read_text() + '{"round": 4, "train_lo')  # torn by the kill
    (result.run_dir / ".checkpoint.pt.999.tmp").write_bytes(b"half a checkpoint")
    resumed = run(None, [], resume=result.run_dir)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert torch.equal(resumed.params, result.params)
    assert not list(result.run_dir.glob(".checkpoint.pt.*.tmp"))


def test_checkpoints_survive_being_killed_mid_write(tmp_path):
    """A writer saving 8 MB checkpoints in a loop is SIGKILLed at random moments: the checkpoint
    on disk always loads, whole, with one of the values written."""
    path = tmp_path / checkpoint.CHECKPOINT
    writer = ("import sys, torch\nfrom pathlib import Path\nfrom fedloom import checkpoint\n"
              "print('ready', flush=True)\n"
              "for i in range(10**6):\n"
              "    checkpoint.save(Path(sys.argv[1]), {'round': i, 'x': torch.full((2**21,), float(i))})\n")
    generator = torch.Generator().manual_seed(0)
    for attempt in range(12):
        process = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"  # imports done: from here on it only writes
        time.sleep(0.05 + 0.3 * float(torch.rand(1, generator=generator)))
        process.kill()
        process.wait(30)
        if path.exists():
            state = checkpoint.load(path)
            assert torch.equal(state["x"], torch.full((2**21,), float(state["round"])))
    assert path.exists(), "no checkpoint was ever completed: the writer never got going"


def test_sigterm_leaves_a_complete_run_directory(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "fedloom.cli", "run", "--set", "rounds=400", "--set",
                                "output.progress=false", "--out", str(tmp_path)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 130, process.stderr.read()[-2000:]
    run_dir = _only_run_dir(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 1 <= summary["rounds_done"] < 400
    assert (run_dir / "model.safetensors").exists() and (run_dir / "report.html").exists()
    assert checkpoint.load(run_dir / checkpoint.CHECKPOINT)["round"] == summary["rounds_done"]


def test_a_user_transform_plugs_in_by_import_path(quick):
    base = [*quick, *SMALL, "rounds=1"]
    plain = run(None, base)
    shifted = run(None, [*base, 'server.transforms=[{name = "user_parts:add_one"}]'])
    # mean of the rows + 1, stepped by SGD with lr 1: the model moves by one more in every coordinate
    torch.testing.assert_close(shifted.params, plain.params - 1)
    assert shifted.summary["pipeline"] == ["validate (server)", "add_one (server)", "aggregate:mean (server)",
                                           "server_optimizer:sgd (server)"]


def test_a_user_transforms_state_lives_in_the_state_tree(quick):
    round_ = stepper(*quick, *SMALL, 'server.transforms=[{name = "user_parts:count_rounds"}]')
    records = [round_.round(r) for r in (1, 2, 3)]
    assert [r["rounds_seen"] for r in records] == [1, 2, 3]
    assert int(round_.state["pipeline"][1]) == 3


def test_transform_options_are_checked_at_load_time():
    with pytest.raises(ConfigError, match="transform 'user_parts:scale' needs option factor"):
        load_config(None, ['server.transforms=[{name = "user_parts:scale"}]'])
    with pytest.raises(ConfigError, match="transform 'clip' takes no option max"):
        load_config(None, ['server.transforms=[{name = "clip", options = {max = 1.0}}]'])
    with pytest.raises(ConfigError, match="unknown transform 'clop'; available: clip"):
        load_config(None, ['server.transforms=[{name = "clop"}]'])


def test_clip_transform_bounds_every_row(quick):
    round_ = stepper(*quick, *SMALL, 'server.transforms=[{name = "clip", options = {max_norm = 0.01}}]')
    x0 = round_.state["x"].clone()
    record = round_.round(1)
    assert record["n_clipped"] == 6
    assert float(torch.linalg.vector_norm(round_.state["x"] - x0)) <= 0.01 + 1e-6


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.name=scaffold", "client.optimizer=adam"], "scaffold assumes plain local SGD"),
    (["algorithm.name=scaffold", "client.momentum=0.9"], "scaffold assumes plain local SGD"),
    (["mode=decentralized", "decentralized.algorithm=gradient_tracking", "client.optimizer=adam"],
     "gradient_tracking assumes plain local SGD"),
    (["mode=decentralized", "decentralized.algorithm=choco"], "choco' needs a \\[compression\\] compressor"),
    (["mode=decentralized", 'server.transforms=[{name = "clip", options = {max_norm = 1.0}}]'],
     "decentralized runs have no server"),
    (["mode=decentralized", "server.aggregator.name=median"], "decentralized runs have no server"),
    (["mode=decentralized", "data.n_clients=3", "decentralized.participation=0.5",
      "topology.matrix=[[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]"], "user-given topology.matrix cannot"),
    (["mode=decentralized", "topology.name=random_matching", "decentralized.churn=0.1"],
     "time-varying topology 'random_matching' cannot"),
    (["mode=decentralized", "data.n_clients=4", "topology.matrix=[[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]"],
     "3x3, but there are 4 nodes"),
])
def test_combination_rules_fire_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_fedavg_family_may_use_any_local_optimizer():
    assert load_config(None, ["algorithm.name=fedadam", "client.optimizer=adam"]).client.optimizer == "adam"


GOSSIP_FIRST = ["mode=decentralized", "data.n_clients=12", "client.epochs=1", "model.name=logistic",
                "decentralized.order=gossip_then_local", "evaluation.federated=false"]


def test_gossip_then_local_updates_the_tracker_of_gradient_tracking(quick):
    round_ = stepper(*quick, *GOSSIP_FIRST, "decentralized.algorithm=gradient_tracking", "client.lr=0.05")
    round_.round(1)
    round_.round(2)  # round 2's gossip reads round 1's directions
    c = torch.stack([round_.state["clients"][i]["c"] for i in range(12)])
    assert c.abs().sum() > 0
    torch.testing.assert_close(c.sum(0), torch.zeros(c.shape[1]), atol=1e-4, rtol=0)


def test_gossip_then_local_choco_sends_compressed_models(quick):
    dense = stepper(*quick, *GOSSIP_FIRST).round(1)
    choco = stepper(*quick, *GOSSIP_FIRST, "decentralized.algorithm=choco", "compression.name=topk",
                    "compression.options={k = 0.05}").round(1)
    assert choco["bytes_per_node"] < dense["bytes_per_node"] / 8


def test_state_of_a_round_is_left_as_it_was(quick):
    """play hands back a new state tree: the one it was given can still be checkpointed."""
    round_ = stepper(*quick, *SMALL, "algorithm.name=scaffold", "client.lr=0.05", "compression.name=topk",
                     "compression.options={k = 0.05}", "compression.feedback=ef").round_
    state, _ = play(round_, 1)
    before = state["x"].clone()
    memories = {c: {k: v.clone() for k, v in m.items()} for c, m in state["pipeline"][1].items()}
    play(round_, 2, state)
    assert torch.equal(state["x"], before)
    for c, m in memories.items():
        assert all(torch.equal(state["pipeline"][1][c][k], v) for k, v in m.items())


def test_a_non_finite_aggregate_keeps_the_previous_model(quick):
    round_ = stepper(*quick, *SMALL, 'server.transforms=[{name = "user_parts:scale", options = {factor = inf}}]')
    before = round_.state["x"].clone()
    record = round_.round(1)
    assert "NaN/Inf" in record["model_rejected"] and torch.equal(round_.state["x"], before)


def test_run_result_has_a_short_repr_and_a_data_frame(quick):
    result = run(None, [*quick, *SMALL, "rounds=3", "name=short"])
    shown = repr(result)
    assert shown.startswith("RunResult(name='short', status='completed', rounds=3, central_accuracy=")
    assert shown.endswith("run_dir=None)") and len(shown) < 200
    frame = result.to_pandas()
    assert list(frame["round"]) == [1, 2, 3] and frame["train_loss"].iloc[-1] == result.history[-1]["train_loss"]


@pytest.mark.parametrize("overrides, name", [
    ([], "digits-fedavg"), (["algorithm.name=scaffold"], "digits-scaffold"),
    (["data.dataset=synthetic", "mode=decentralized", "decentralized.algorithm=choco", "compression.name=topk",
      "compression.options={k = 0.1}"], "synthetic-choco"),
    (["algorithm.name=scaffold", "name=mine"], "mine"),
])
def test_the_default_run_name_follows_dataset_and_algorithm(overrides, name):
    cfg = load_config(None, overrides)
    assert cfg.name == name and load_config(cfg.to_dict(), ["algorithm.name=fedprox"]).name == name


def _assert_interrupted_and_complete(process, root: Path) -> None:
    stderr = process.stderr.read()
    assert process.wait(120) == 130, f"SIGINT here: {signal.getsignal(signal.SIGINT)}; {stderr[-2000:]}"
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "interrupted after round" in stderr
    run_dir = _only_run_dir(root)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds_done"] >= 1
    assert (run_dir / "model.safetensors").exists() and (run_dir / "report.html").exists()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a blocked one is inherited too


def _piped_run(out: Path, *args) -> subprocess.Popen:
    overrides = _sets([*SMALL[1:-1], "rounds=100000"])  # SMALL with progress on, and rounds enough never to end
    command = [sys.executable, "-m", "fedloom.cli", "run", *overrides, *args, "--out", str(out)]
    # Ctrl-C as a terminal delivers it: a child inherits an ignored or blocked SIGINT (the CI's test worker had
    # one so by the end of the suite, and the run rightly never stopped), so the child gets the default
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(TESTS)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    watchdog = threading.Timer(180, process.kill)  # a readline waiting for a line that never comes
    watchdog.daemon = True
    watchdog.start()
    return process


def test_ctrl_c_through_a_closed_stdout_pipe_completes_the_run_directory(tmp_path):
    """`fedloom run | tee log` and Ctrl-C: tee is gone, so every write to stdout fails (EPIPE)."""
    process = _piped_run(tmp_path, "--quiet")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.stdout.close()
    process.send_signal(signal.SIGINT)
    _assert_interrupted_and_complete(process, tmp_path)


def test_a_reader_closing_stdout_stops_the_run_as_ctrl_c_does(tmp_path):
    """`fedloom run | head -1`: the next progress line finds the pipe closed."""
    process = _piped_run(tmp_path, "--progress-every", "1")
    assert process.stdout.readline().startswith("round 1/100000")
    process.stdout.close()
    _assert_interrupted_and_complete(process, tmp_path)
