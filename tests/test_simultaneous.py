"""Simultaneous training of several models on one federation (mode = "simultaneous"): FedAST's rules on
hand-computed inputs, its buffers, active clients and hand-over on real runs, Sync-ST's disjoint rounds,
the config's refusals, determinism, resume and the report."""

import json

import numpy as np
import pytest
import torch

from fedloom import checkpoint
from fedloom.algorithms.fedast import buffer_size, hand_over, normalized_variance, reallocate
from fedloom.config import ConfigError, load_config
from fedloom.rounds import build_round
from fedloom.runner import Stepper, run

TASK = ["client.epochs=1", "asynchronous.concurrency=4"]


def config(*, algorithm="fedast", tasks=None, **top):
    """Two digits tasks (logistic and MLP) on 24 clients with a 10x speed spread, unless told otherwise."""
    tasks = tasks or [{"name": "lin", "set": [*TASK, "model.name=logistic"]},
                      {"name": "mlp", "set": [*TASK, "model.name=mlp"]}]
    raw = {"mode": "simultaneous", "rounds": 12, "data": {"n_clients": 24},
           "system": {"profile": "sampled", "speed_spread": 10.0},
           "evaluation": {"federated": False, "every": 4}, "output": {"save": False, "progress": False},
           "simultaneous": {"algorithm": algorithm, "realloc": False, "tasks": tasks}}
    for key, value in top.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw.setdefault(section, {})[leaf] = value
        else:
            raw[section] = value
    return raw


def in_flight(state, name):
    return [entry[2] for entry in state["tasks"][name]["queue"]]


def test_normalized_variance_is_the_spread_over_the_squared_mean_scaled_by_the_rates():
    rows = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): spread 1 + 1 = 2, ||mean||^2 * W = 4 * 2
    assert normalized_variance(rows, 1.0, 1.0, 1.0) == pytest.approx(0.25)
    assert normalized_variance(rows, 0.5, 0.1, 2.0) == pytest.approx(0.25 * 0.5 / (0.1 * 4))
    assert normalized_variance(torch.zeros(3, 2), 1.0, 1.0, 1.0) == 0.0


def test_realloc_gives_chunks_to_the_task_furthest_below_its_share():
    # shares 24 * (1/4, 3/4) = (6, 18): a chunk of 3 each, then five chunks of 3 to the second task, one to the first
    assert reallocate([1.0, 3.0], 24, 3, [True, True]) == [6, 18]
    # shares (3.3, 16.7): 3 each, four chunks of 3 to the third task, then the last chunk cut to the 2 left
    assert reallocate([1.0, 3.0, 5.0], 20, 3, [True, False, True]) == [3, 0, 17]
    assert sum(reallocate([0.2, 0.7, 0.1], 31, 4, [True] * 3)) == 31
    assert reallocate([0.0, 0.0], 8, 2, [True, True]) == [4, 4]  # no variance yet: the chunks alternate
    assert reallocate([1.0, 3.0], 8, 32, [True, True]) == [2, 6]  # chunks of 32 would not fit 8: chunks of 1


def test_a_finished_tasks_clients_go_to_the_running_tasks_in_proportion():
    extra = hand_over(10, [0, 5, 15], [False, True, True], np.random.default_rng(0))
    assert sum(extra) == 10 and extra[0] == 0 and extra[1] in (2, 3) and extra[2] in (7, 8)
    assert hand_over(4, [0, 0], [False, False], np.random.default_rng(0)) == [0, 0]


def test_buffer_size_is_the_ceiling_of_active_over_the_ratio():
    assert [buffer_size(a, 3) for a in (0, 1, 3, 4, 10)] == [1, 1, 1, 2, 4]


def test_each_task_keeps_its_active_clients_in_flight_and_steps_on_full_buffers():
    raw = config(tasks=[{"name": "lin", "set": [*TASK, "model.name=logistic", "asynchronous.buffer_size=2"]},
                        {"name": "mlp", "set": [*TASK, "model.name=mlp", "asynchronous.buffer_size=3"]}])
    s = Stepper(build_round(load_config(raw)))
    for r in range(1, 13):
        x_before = {n: s.state["tasks"][n]["x"].clone() for n in ("lin", "mlp")}
        record = s.round(r)
        name = record["task"]
        assert record["n_sampled"] == {"lin": 2, "mlp": 3}[name]  # FedBuff steps of that task's buffer size
        assert not torch.equal(s.state["tasks"][name]["x"], x_before[name])
        other = "mlp" if name == "lin" else "lin"
        assert torch.equal(s.state["tasks"][other]["x"], x_before[other])
        lin, mlp = in_flight(s.state, "lin"), in_flight(s.state, "mlp")
        assert len(lin) == len(mlp) == 4  # R_m each, refilled at every arrival
        assert not set(lin) & set(mlp)  # a client trains one job at a time
    assert sum(s.state["steps"]) == 12 and s.state["now"] > 0


def test_a_task_at_its_target_hands_its_clients_over_and_the_run_ends_when_all_are_done():
    tasks = [{"name": "easy", "set": [*TASK, "model.name=logistic", "evaluation.target_accuracy=0.05",
                                      "evaluation.every=1"]},
             {"name": "hard", "set": [*TASK, "model.name=mlp", "evaluation.target_accuracy=0.6",
                                      "evaluation.every=1", "server.lr=1.0"]}]
    result = run(config(rounds=400, simultaneous={"realloc": False, "buffer_ratio": 2, "tasks": tasks}))
    easy = next(r for r in result.history if r.get("finished") == "easy")
    assert easy["active"] == [0, 8] and easy["easy/central_accuracy"] >= 0.05
    handed = Stepper(build_round(load_config(config(rounds=400, simultaneous={"realloc": False, "buffer_ratio": 2,
                                                                               "tasks": tasks}))))
    for r in range(1, easy["round"] + 1):
        handed.round(r)
    assert handed.state["buffers"][1] == 4 and len(in_flight(handed.state, "hard")) == 8  # round(8 / 2), started
    later = [r for r in result.history if r["round"] > easy["round"]]
    assert later and all(r["task"] == "hard" for r in later)  # the finished task's work was cancelled
    assert result.history[-1]["finished"] == "hard" and result.history[-1]["done"]
    assert result.summary["status"] == "completed" and result.summary["rounds_done"] < 400
    reached = {n: t["reached"] for n, t in result.summary["tasks"].items()}
    assert reached["hard"]["central_accuracy"] >= 0.6
    assert result.summary["time_to_all_targets"] == reached["hard"]["virtual_seconds"] > reached["easy"]["virtual_seconds"]
    assert result.summary["hard/central_accuracy"] == result.final["hard/central_accuracy"] >= 0.6


def test_realloc_moves_clients_between_tasks_keeping_their_total_and_sizes_the_buffers():
    raw = config(rounds=150, simultaneous={"realloc": True, "buffer_ratio": 2, "variance_window": 3,
                                           "realloc_every": 2, "tasks": config()["simultaneous"]["tasks"]})
    s = Stepper(build_round(load_config(raw)))
    seen = set()
    for r in range(1, 151):
        record = s.round(r)
        seen.add(tuple(record["active"]))
        assert sum(record["active"]) == 8
        m = ["lin", "mlp"].index(record["task"])
        # b_m = ceil(in flight / ratio), set at the task's last arrival (the one that filled its buffer)
        assert s.state["buffers"][m] == buffer_size(len(in_flight(s.state, record["task"])), 2)
    assert len(seen) > 1  # Realloc did move clients
    assert all(a % 2 == 0 for active in seen for a in active)  # in chunks of buffer_ratio


def test_a_task_may_cost_more_per_example_on_the_same_devices():
    tasks = [{"name": "fast", "set": [*TASK, "model.name=logistic"]},
             {"name": "slow", "set": [*TASK, "model.name=logistic", "system.seconds_per_example=0.01"]}]
    fast, slow = build_round(load_config(config(tasks=tasks))).tasks
    assert np.array_equal(fast.system.speed, slow.system.speed)  # one device per client for every task
    assert np.array_equal(fast.system.up_bytes_s, slow.system.up_bytes_s)
    clients = np.arange(24)
    compute = lambda t: t.system.seconds(clients, t.examples, np.zeros(24), np.zeros(24))  # noqa: E731
    np.testing.assert_allclose(compute(slow), 10 * compute(fast))


def test_the_realloc_variance_leaves_the_biases_out():
    fedast = build_round(load_config(config()))
    assert len(fedast.weight_coordinates[0]) == 650 and int(fedast.weight_coordinates[0].sum()) == 640  # 10 x 64 + 10


def test_sync_st_gives_the_tasks_disjoint_clients_and_waits_for_the_slowest():
    s = Stepper(build_round(load_config(config(algorithm="sync"))))
    for r in range(1, 4):
        record = s.round(r)
        lin, mlp = s.state["tasks"]["lin"]["assigned"], s.state["tasks"]["mlp"]["assigned"]
        assert len(lin) == len(mlp) == 4 and not set(lin) & set(mlp)
        seconds = [t.system.seconds(c, t.examples[c], np.full(4, t.row_bytes), np.full(4, 4 * t.spec.dim)).max()
                   for t, c in zip(s.round_.tasks, (lin, mlp))]
        assert record["round_virtual_seconds"] == pytest.approx(max(seconds))
        assert record["n_sampled"] == 8


@pytest.mark.parametrize("algorithm", ["fedast", "sync"])
def test_the_same_seed_gives_the_same_run_and_resume_continues_it_exactly(tmp_path, algorithm):
    raw = config(algorithm=algorithm, output={"save": True, "progress": False, "dir": str(tmp_path)},
                 checkpoint={"every": 1})
    whole = run({**raw, "rounds": 8})
    again = run({**raw, "rounds": 8})
    assert torch.equal(whole.params, again.params)
    cut = run({**raw, "rounds": 4})
    resumed = run(None, ["rounds=8"], resume=cut.run_dir)
    assert torch.equal(resumed.params, whole.params)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k or "virtual" in k} for r in rows]  # noqa: E731
    lines = lambda d: strip([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()])  # noqa: E731
    assert lines(cut.run_dir) == lines(whole.run_dir)
    assert (cut.run_dir / "task_accuracy.png").is_file()
    saved = checkpoint.load(cut.run_dir / checkpoint.CHECKPOINT)
    assert set(saved["tasks"]) == {"lin", "mlp"}


def test_the_engines_give_the_same_fedast_run():
    vectorized = run(config(engine={"name": "vectorized"}))
    serial = run(config(engine={"name": "serial"}))
    assert [r["task"] for r in vectorized.history] == [r["task"] for r in serial.history]
    torch.testing.assert_close(vectorized.params, serial.params, rtol=1e-4, atol=1e-5)


def test_the_saved_model_holds_every_task_under_its_name(tmp_path):
    result = run(config(output={"save": True, "progress": False, "dir": str(tmp_path)}, rounds=2))
    from safetensors.torch import load_file

    saved = load_file(result.run_dir / "model.safetensors")
    assert {k.split(".")[0] for k in saved} == {"lin", "mlp"}
    assert sum(v.numel() for v in saved.values()) == result.params.numel()


@pytest.mark.parametrize("change, message", [
    ({"simultaneous": {"tasks": []}}, "needs [[simultaneous.tasks]]"),
    ({"simultaneous": {"tasks": [{"name": "a"}, {"name": "a"}]}}, "each with its own name"),
    ({"system": {"profile": "none"}}, "runs on the virtual clock"),
    ({"simultaneous": {"tasks": [{"name": "a", "set": ["model.name=nope"]}]}}, "simultaneous.tasks 'a': model"),
    ({"simultaneous": {"tasks": [{"name": "a", "set": ["asynchronous.concurrency=14"]},
                                 {"name": "b", "set": ["asynchronous.concurrency=14"]}]}}, "add up to 28"),
    ({"simultaneous": {"tasks": [{"name": "a"}, {"name": "b", "set": ["data.n_clients=30"]}]}}, "n_clients differ"),
    ({"system": {"profile": "sampled", "deadline_s": 1.0}, "simultaneous": {"tasks": [{"name": "a"}]}},
     "deadline_s"),
    ({"simultaneous": {"tasks": [{"name": "a", "set": ["system.speed_spread=3.0"]}]}}, "system.speed_spread differs"),
    ({"simultaneous": {"tasks": [{"name": "a b"}]}}, "name"),
    ({"simultaneous": {"algorithm": "sync", "tasks": [{"name": "a", "set": ["privacy.mechanism=central",
                                                                            "privacy.noise_multiplier=1.0"]}]}},
     "privacy and secure aggregation"),
])
def test_malformed_simultaneous_configs_are_refused_naming_the_problem(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config({**config(), **change})


def test_tasks_outside_simultaneous_mode_are_refused():
    with pytest.raises(ConfigError, match="set mode to run them"):
        load_config({"simultaneous": {"tasks": [{"name": "a"}]}})
