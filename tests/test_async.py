"""Asynchronous FL on the virtual clock: the staleness functions, FedAsync's and FedBuff's server rules on
hand-computed updates, staleness on a hand-built schedule, determinism, and resume."""

import heapq
import json

import numpy as np
import pytest
import torch

from fedloom import checkpoint
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


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedasync"])
def test_the_same_seed_gives_the_same_events_and_metrics(algorithm):
    overrides = [*BASE, f"asynchronous.algorithm={algorithm}", "asynchronous.concurrency=4",
                 "asynchronous.buffer_size=3", "rounds=6", "evaluation.every=3"]
    a, b = run(None, overrides), run(None, overrides)
    assert _strip(a.history) == _strip(b.history)
    assert torch.equal(a.params, b.params)
    assert _strip(run(None, [*overrides, "seed=1"]).history) != _strip(a.history)


def test_an_async_run_resumes_from_its_checkpoint_to_the_uninterrupted_run(tmp_path):
    overrides = [*BASE, "asynchronous.concurrency=4", "asynchronous.buffer_size=3", "evaluation.every=3",
                 f"output.dir={str(tmp_path)!r}", "output.save=true", "checkpoint.every=1"]
    whole = run(None, [*overrides, "rounds=6"])
    cut = run(None, [*overrides, "rounds=3"])
    saved = checkpoint.load(cut.run_dir / checkpoint.CHECKPOINT)
    assert saved["queue"] and saved["version"] == 3
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
