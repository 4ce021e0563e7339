"""Asynchronous FL on the virtual clock: the staleness functions, FedAsync's, FedBuff's, Fraboni et al.'s and
FAVANO's server rules on hand-computed updates, staleness and frequencies on hand-built schedules, the
combination rules, determinism, and resume."""

import heapq
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedloom import checkpoint
from fedloom.builders import local_training
from fedloom.core.store import ClientStore
from fedloom.algorithms.asynchronous import completed_steps, favano_average, fraboni_weights
from fedloom.config import ConfigError, load_config
from fedloom.personalization.base import with_local
from fedloom.rounds.asynchronous import fedasync_mix, staleness_weight
from fedloom.runner import run
from helpers import stepper, train_once

TRAINING = ["client.epochs=1", "model.name=logistic", "evaluation.federated=false", "output.save=false",
            "output.progress=false", "mode=asynchronous"]
BASE = [*TRAINING, "data.n_clients=12", "system.profile=sampled", "system.speed_spread=10"]


def test_staleness_functions():
    assert staleness_weight("constant", 7, 0.5, 4) == 1.0
    assert staleness_weight("polynomial", 3, 0.5, 4) == pytest.approx(0.5)  # 1 / sqrt(1 + 3)
    assert staleness_weight("hinge", 4, 2.0, 4) == 1.0
    assert staleness_weight("hinge", 6, 2.0, 4) == pytest.approx(1 / 5)  # 1 / (2 (6 - 4) + 1)


def test_fedasync_mixes_the_local_model_in():
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])
    assert fedasync_mix(x, y, 0.25).tolist() == [1.5, 1.5]


def test_fedasync_with_one_client_at_a_time_is_alpha_mixing_of_its_local_model():
    s = stepper(*BASE, "asynchronous.algorithm=fedasync", "asynchronous.concurrency=1", "asynchronous.alpha=0.3")
    x0 = s.state["x"].clone()
    (_, _, client, _), = s.state["queue"]
    record = s.round(1)
    local = x0 - train_once(s.round_, x0, [client], round_idx=1).U[0]  # the first engine call is call 1
    assert record["staleness"] == [0]
    torch.testing.assert_close(s.state["x"], 0.7 * x0 + 0.3 * local)


def test_fedbuff_step_is_the_server_lr_times_the_mean_of_buffered_deltas():
    s = stepper(*BASE, "asynchronous.concurrency=1", "asynchronous.buffer_size=2", "server.lr=0.5")
    x0 = s.state["x"].clone()
    first = s.state["queue"][0][2]
    record = s.round(1)
    # one client at a time, no server step between the two: both started from x0, staleness 0; they
    # train at the server step, together, in engine call 1
    deltas = train_once(s.round_, x0, [first, _second_client(s, first)], round_idx=1).U
    assert record["staleness"] == [0, 0] and record["n_sampled"] == 2
    torch.testing.assert_close(s.state["x"], x0 - 0.5 * (deltas[0] + deltas[1]) / 2)


def _second_client(s, first):
    """The client job 1 drew: uniform over the idle clients online when job 0 finished."""
    from fedloom.core.rng import Stream, numpy_generator

    idle = [c for c in range(s.round_.data.n_clients) if c != first]
    return int(numpy_generator(s.round_.cfg.seed, Stream.SAMPLING, 1).choice(np.array(idle)))


def test_staleness_on_a_hand_built_schedule(tmp_path):
    # two clients always busy (concurrency 2 of 2): each restarts when it finishes, client 1 is 2.5x slower
    path = tmp_path / "two.csv"
    path.write_text("client,speed,up_mbps,down_mbps,available\n0,1.0,1e6,1e6,\n1,0.4,1e6,1e6,\n")
    s = stepper(*TRAINING, "data.n_clients=2", "partition.name=iid", "system.profile=trace",
                f"system.trace={str(path)!r}", "asynchronous.algorithm=fedasync", "asynchronous.concurrency=2")
    fp32 = [4 * s.round_.spec.dim]
    each = {c: float(s.round_.system.seconds([c], _examples(s.round_, c), fp32, fp32)[0]) for c in (0, 1)}
    # the reference: finish events of both clients merged; staleness = server updates since the job began
    events, version, expected = [(each[0], 0, 0, 0), (each[1], 1, 1, 0)], 0, []
    for job in range(2, 12):
        finish, _, client, started = heapq.heappop(events)
        expected.append((client, version - started, finish))
        version += 1
        heapq.heappush(events, (finish + each[client], job, client, version))
    records = [s.round(r) for r in range(1, 11)]
    assert [r["staleness"][0] for r in records] == [e[1] for e in expected]
    assert [r["virtual_seconds"] for r in records] == pytest.approx([e[2] for e in expected])
    assert max(e[1] for e in expected) >= 2  # the slow client's updates really are stale


def _examples(round_, client):
    from fedloom.systems.rounds import examples_processed

    from fedloom.builders import local_training

    return examples_processed(round_.data.client_sizes()[[client]], local_training(round_.cfg))


def _strip(history):
    return [{k: v for k, v in r.items() if "seconds" not in k or "virtual" in k} for r in history]


RULE_SETTINGS = {
    "fedbuff": ["asynchronous.concurrency=4", "asynchronous.buffer_size=3"],
    "fedasync": ["asynchronous.concurrency=4", "asynchronous.buffer_size=3"],
    "fraboni": ["asynchronous.concurrency=4", "asynchronous.buffer_size=3"],
    "favano": ["asynchronous.clients_per_update=3", "asynchronous.wake=poisson", "asynchronous.period_s=0.03"],
}


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedasync", "fraboni", "favano"])
def test_the_same_seed_gives_the_same_events_and_metrics(algorithm):
    overrides = [*BASE, f"asynchronous.algorithm={algorithm}", "rounds=6", "evaluation.every=3",
                 *RULE_SETTINGS[algorithm]]
    a, b = run(None, overrides), run(None, overrides)
    assert _strip(a.history) == _strip(b.history)
    assert torch.equal(a.params, b.params)
    assert _strip(run(None, [*overrides, "seed=1"]).history) != _strip(a.history)


@pytest.mark.parametrize("algorithm", ["fedbuff", "fraboni", "favano"])
def test_an_async_run_resumes_from_its_checkpoint_to_the_uninterrupted_run(tmp_path, algorithm):
    overrides = [*BASE, f"asynchronous.algorithm={algorithm}", *RULE_SETTINGS[algorithm], "evaluation.every=3",
                 f"output.dir={str(tmp_path)!r}", "output.save=true", "checkpoint.every=1"]
    whole = run(None, [*overrides, "rounds=6"])
    cut = run(None, [*overrides, "rounds=3"])
    saved = checkpoint.load(cut.run_dir / checkpoint.CHECKPOINT)
    assert saved["version"] == 3 and (saved["queue"] if algorithm != "favano" else saved["starts"])
    resumed = run(None, ["rounds=6"], resume=cut.run_dir)
    assert torch.equal(resumed.params, whole.params)
    lines = lambda d: _strip([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()])  # noqa: E731
    assert lines(cut.run_dir) == lines(whole.run_dir)
    assert (cut.run_dir / "staleness.png").is_file()


@pytest.mark.slow
def test_fedbuff_reaches_85_percent_in_less_virtual_time_than_synchronous_fedavg():
    # digits Dirichlet(0.5), speeds spread 10x, the same number of client updates (20 x 10)
    common = ["data.n_clients=100", "partition.options={alpha = 0.5}", "evaluation.federated=false",
              "output.save=false", "output.progress=false", "evaluation.target_accuracy=0.85",
              "system.profile=sampled", "system.speed_spread=10", "rounds=20"]
    sync = run(None, common).summary["time_to_target"]
    fedbuff = run(None, [*common, "mode=asynchronous", "asynchronous.concurrency=20",
                         "asynchronous.buffer_size=10"]).summary["time_to_target"]
    assert sync is not None and fedbuff is not None
    assert fedbuff["virtual_seconds"] < sync["virtual_seconds"]


def test_fraboni_weights_are_one_over_k_or_the_importance_over_the_aggregation_frequency():
    p = np.array([0.2, 0.5, 0.3])
    assert fraboni_weights("identical", p, np.array([1, 4, 2]), 8).tolist() == pytest.approx([1 / 3] * 3)
    # f_i = aggregated / steps = 1/8, 4/8, 2/8: w_i = p_i / f_i
    assert fraboni_weights("unbiased", p, np.array([1, 4, 2]), 8).tolist() == pytest.approx([1.6, 1.0, 1.2])


def test_fraboni_with_identical_weights_is_fedbuff():
    common = [*BASE, "asynchronous.concurrency=4", "asynchronous.buffer_size=3", "rounds=5", "evaluation.every=5"]
    fedbuff = run(None, [*common, "asynchronous.algorithm=fedbuff"])
    fraboni = run(None, [*common, "asynchronous.algorithm=fraboni", "asynchronous.client_weights=identical"])
    assert torch.equal(fraboni.params, fedbuff.params)
    assert [r["staleness"] for r in fraboni.history] == [r["staleness"] for r in fedbuff.history]


def test_fraboni_with_one_update_a_step_and_server_lr_alpha_is_fedasync():
    common = [*BASE, "asynchronous.concurrency=1", "asynchronous.staleness=constant", "rounds=4",
              "evaluation.every=4"]
    fedasync = run(None, [*common, "asynchronous.algorithm=fedasync", "asynchronous.alpha=0.3"])
    fraboni = run(None, [*common, "asynchronous.algorithm=fraboni", "asynchronous.client_weights=identical",
                         "asynchronous.buffer_size=1", "server.lr=0.3"])
    torch.testing.assert_close(fraboni.params, fedasync.params)  # x - 0.3 (x - y) against 0.7 x + 0.3 y


def test_fraboni_unbiased_step_on_a_hand_computed_buffer():
    s = stepper(*BASE, "asynchronous.algorithm=fraboni", "asynchronous.concurrency=1", "asynchronous.buffer_size=2",
                "server.lr=0.5")
    x0 = s.state["x"].clone()
    first = s.state["queue"][0][2]
    second = _second_client(s, first)
    s.round(1)
    deltas = train_once(s.round_, x0, [first, second], round_idx=1).U
    sizes = s.round_.data.client_sizes().astype(np.float64)
    p = sizes / sizes.sum()
    # the first server step: each client aggregated once in one step, f_i = 1, so w_i = p_i
    torch.testing.assert_close(s.state["x"], x0 - 0.5 * (p[first] * deltas[0] + p[second] * deltas[1]).float())
    assert s.state["aggregated"][[first, second]].tolist() == [1, 1] and int(s.state["aggregated"].sum()) == 2


def test_fraboni_frequencies_on_a_hand_built_schedule_reach_the_papers_asynchronous_weights(tmp_path):
    # both clients always busy, an update a server step (K = 1): client i arrives every T_i, so f_i tends to
    # (1/T_i) / sum_j 1/T_j and w_i = p_i / f_i to the paper's weighted asynchronous FedAvg, p_i T_i sum_j 1/T_j
    path = tmp_path / "two.csv"
    path.write_text("client,speed,up_mbps,down_mbps,available\n0,1.0,1e6,1e6,\n1,0.4,1e6,1e6,\n")
    s = stepper(*TRAINING, "data.n_clients=2", "partition.name=iid", "system.profile=trace",
                f"system.trace={str(path)!r}", "asynchronous.algorithm=fraboni", "asynchronous.concurrency=2",
                "asynchronous.buffer_size=1")
    fp32 = [4 * s.round_.spec.dim]
    each = np.array([float(s.round_.system.seconds([c], _examples(s.round_, c), fp32, fp32)[0]) for c in (0, 1)])
    events, counts = [(each[0], 0, 0), (each[1], 1, 1)], np.zeros(2, dtype=np.int64)
    for job in range(2, 30):
        finish, _, client = heapq.heappop(events)
        counts[client] += 1
        heapq.heappush(events, (finish + each[client], job, client))
    for r in range(1, 29):
        s.round(r)
    assert s.state["aggregated"].tolist() == counts.tolist()
    assert counts / 28 == pytest.approx((1 / each) / (1 / each).sum(), abs=1 / 28)


def test_completed_steps_count_whole_steps_up_to_the_full_round():
    steps = completed_steps(np.array([0.25, 1.0, -0.1, 10.0]), np.array([0.1, 0.3, 0.1, 1.0]), np.array([5, 5, 5, 3]))
    assert steps.tolist() == [2, 3, 0, 3]


def test_favano_averages_the_server_model_with_the_sampled_local_models_equally():
    x, local = torch.tensor([0.0, 0.0]), torch.tensor([[3.0, 3.0], [6.0, 0.0]])
    assert favano_average(x, local).tolist() == [3.0, 1.0]


def test_a_favano_wake_averages_partial_local_models_from_the_steps_each_client_completed(tmp_path):
    # fast links (the clock is compute alone): client 0 finishes 3 steps by the wake, client 1 (4x slower) none
    path = tmp_path / "two.csv"
    path.write_text("client,speed,up_mbps,down_mbps,available\n0,1.0,1e9,1e9,\n1,0.25,1e9,1e9,\n")
    defaults = load_config(None, [])
    step = defaults.client.batch_size * defaults.system.seconds_per_example  # one batch on the nominal device
    s = stepper(*TRAINING, "data.n_clients=2", "partition.name=iid", "system.profile=trace",
                f"system.trace={str(path)!r}", "asynchronous.algorithm=favano", "asynchronous.clients_per_update=2",
                f"asynchronous.period_s={3.5 * step!r}")
    x0 = s.state["x"].clone()
    record = s.round(1)
    engine = with_local(s.round_.engine, replace(local_training(s.round_.cfg), steps=3))
    y0 = x0 - engine.run_round(s.round_.algorithm, x0[None], {}, [0], 1, ClientStore()).U[0]
    torch.testing.assert_close(s.state["x"], (x0 + y0 + x0) / 3)  # client 1's model is still x0
    assert record["n_trained"] == 1 and record["staleness"] == [0, 0]
    assert record["local_progress_mean"] == pytest.approx((3 / s.round_.full_steps[0] + 0) / 2)
    assert s.state["held"].tolist() == [1, 1] and list(s.state["starts"]) == [1]


def test_favano_clients_not_sampled_keep_training_and_grow_stale():
    s = stepper(*BASE, "asynchronous.algorithm=favano", "asynchronous.clients_per_update=2",
                "asynchronous.period_s=0.01")
    records = [s.round(r) for r in range(1, 9)]
    assert all(r["n_sampled"] == 2 for r in records)
    assert max(r["staleness_max"] for r in records) >= 2
    held = s.state["held"]
    assert set(s.state["starts"]) == {int(v) for v in held.unique()}  # only models some client trains from


@pytest.mark.parametrize("overrides, message", [
    (["asynchronous.algorithm=favano", "server.transforms=[{name = 'clip', options = {max_norm = 1.0}}]"],
     "runs no server pipeline"),
    (["asynchronous.algorithm=favano", "system.availability=markov"], "leave system.availability = 'always'"),
    (["asynchronous.algorithm=favano", "asynchronous.clients_per_update=13"], "clients_per_update = 13 is more"),
    (["asynchronous.client_weights=identical"], "client_weights is a setting of asynchronous.algorithm = 'fraboni'"),
    (["asynchronous.algorithm=fraboni", "asynchronous.period_s=2"], "period_s is a setting of"),
    (["asynchronous.algorithm=fraboni", "asynchronous.concurrency=10", "asynchronous.buffer_size=4"],
     "more than data.n_clients"),
])
def test_the_new_rules_combinations_are_refused_at_config_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, *overrides])
