"""The system model and the synchronous round on the virtual clock: trace files are refused naming the
line, virtual time is compute plus payloads over links, deadlines drop exactly the slow clients,
over-selection keeps the first k, only online clients are sampled, and the runner's clock adds up."""

import numpy as np
import torch
import pytest

from fedloom.builders import local_training
from fedloom.config import ConfigError, load_config
from fedloom.runner import run
from fedloom.systems import SystemModel, TraceError, build_system, read_trace
from fedloom.systems.model import diurnal_availability, interval_availability
from fedloom.systems.rounds import cut, examples_processed, sample_available
from helpers import make_round, stepper

SMALL = ["data.n_clients=20", "sampling.clients_per_round=5", "client.epochs=1", "model.name=logistic",
         "evaluation.federated=false", "output.save=false", "output.progress=false"]
SAMPLED = [*SMALL, "system.profile=sampled", "system.speed_spread=10"]


def _trace(tmp_path, *rows, header="client,speed,up_mbps,down_mbps,available"):
    path = tmp_path / "devices.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.parametrize("row, message", [
    ("5,1.0,10,50,", "devices.csv:3: unknown client 5"),
    ("1,fast,10,50,", "devices.csv:3: speed is not a number: 'fast'"),
    ("1,1.0,10,50", "devices.csv:3: 4 fields, expected 5"),
    ("1,0,10,50,", "devices.csv:3: speed must be above 0"),
    ("1,1.0,10,50,10-5", "devices.csv:3: available interval '10-5'"),
    ("1,1.0,10,50,0-10;5-20", "devices.csv:3: available intervals overlap"),
    ("0,1.0,10,50,", "devices.csv:3: client 0 has a row already (line 2)"),
])
def test_a_bad_trace_row_is_refused_naming_file_and_line(tmp_path, row, message):
    path = _trace(tmp_path, "0,1.0,10,50,", row)
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_trace(path, 2)


def test_a_trace_needs_every_client_and_its_header(tmp_path):
    with pytest.raises(TraceError, match="no row for client 1"):
        read_trace(_trace(tmp_path, "0,1.0,10,50,"), 2)
    with pytest.raises(TraceError, match="devices.csv:1: the header must be"):
        read_trace(_trace(tmp_path, "0,1.0,10,50,", header="id,speed,up,down,available"), 1)


def test_trace_speeds_links_and_intervals_replay_with_the_trace_period(tmp_path):
    trace = read_trace(_trace(tmp_path, "1,0.5,2,8,100-200;300-400", "0,2.0,10,50,"), 2)
    assert trace.speed.tolist() == [2.0, 0.5] and trace.up_mbps.tolist() == [10, 2]
    online = interval_availability(trace.intervals)
    assert [online(t)[1] for t in (50, 150, 250, 350, 450, 550)] == [False, True, False, True, False, True]
    assert all(online(t)[0] for t in (0, 250, 1e6))  # no intervals: always online


def test_virtual_time_is_compute_over_speed_plus_bytes_over_bandwidth():
    system = SystemModel(np.array([1.0, 2.0]), np.array([1000.0, 500.0]), np.array([2000.0, 4000.0]), 0.01,
                         lambda t: np.ones(2, dtype=bool))
    # client 0: 100 * 0.01 / 1 + 1000 / 1000 + 4000 / 2000 = 4; client 1: 100 * 0.01 / 2 + 1000 / 500 + 4000 / 4000
    assert system.seconds([0, 1], np.array([100, 100]), np.array([1000, 1000]), np.array([4000, 4000])).tolist() == \
        [4.0, 3.5]


def test_speed_spread_is_the_ratio_of_the_95th_to_the_5th_percentile():
    cfg = load_config(None, ["data.n_clients=100000", "system.profile=sampled", "system.speed_spread=10"])
    speed = build_system(cfg, 100_000).speed
    assert np.percentile(speed, 95) / np.percentile(speed, 5) == pytest.approx(10, rel=0.05)
    assert np.median(speed) == pytest.approx(1, rel=0.02)


def test_bandwidth_classes_are_drawn_by_share():
    cfg = load_config(None, ["data.n_clients=10000", "system.profile=sampled", "system.bandwidth_classes="
                             "[{up_mbps = 1, down_mbps = 2, share = 3}, {up_mbps = 8, down_mbps = 16, share = 1}]"])
    up = build_system(cfg, 10_000).up_bytes_s
    assert set(np.unique(up)) == {1e6 / 8, 8e6 / 8}
    assert (up == 1e6 / 8).mean() == pytest.approx(0.75, abs=0.02)


def test_diurnal_clients_are_online_their_fraction_of_the_day():
    online = diurnal_availability(2000, 100.0, 0.3, np.random.default_rng(0))
    assert np.mean([online(t).mean() for t in np.arange(0, 100, 5)]) == pytest.approx(0.3, abs=0.01)


def test_the_cut_keeps_the_first_k_and_drops_those_past_the_deadline():
    finish = np.array([5.0, 1.0, 9.0, 3.0, 7.0])
    kept = cut(finish, 3, None)
    assert kept.on_time.tolist() == [0, 1, 3]
    assert kept.seconds == 5.0 and len(kept.late) == 0
    deadline = cut(finish, 5, 6.0)
    assert sorted(deadline.on_time.tolist()) == [0, 1, 3] and deadline.late.tolist() == [2, 4]
    assert deadline.seconds == 6.0
    early = cut(finish, 2, 6.0)  # two finished before the deadline: the round closes at the second
    assert sorted(early.on_time.tolist()) == [1, 3] and early.seconds == 3.0 and len(early.late) == 0


def _trained(round_, monkeypatch):
    """The client lists the round's engine is asked to train, in order."""
    calls = []
    original = round_.engine.run_round

    def recording(algorithm, x0, sent, client_ids, *args):
        calls.append(list(client_ids))
        return original(algorithm, x0, sent, client_ids, *args)

    monkeypatch.setattr(round_.engine, "run_round", recording)
    return calls


def _seconds(round_, clients):
    examples = examples_processed(round_.data.client_sizes()[clients], local_training(round_.cfg))
    d = round_.spec.dim
    return round_.system.seconds(clients, examples, np.full(len(clients), 4 * d), np.full(len(clients), 4 * d))


def test_a_deadline_trains_and_aggregates_exactly_the_clients_that_finish_by_it(monkeypatch):
    s = stepper(*SAMPLED, "system.deadline_s=0.05")
    calls = _trained(s.round_, monkeypatch)
    record = s.round(1)
    sampled = sample_available(np.ones(20, dtype=bool), 5, 0.0, 0, 1)
    seconds = _seconds(s.round_, sampled)
    assert 0 < (seconds > 0.05).sum() < 5, "the deadline should cut some but not all of the sampled clients"
    assert calls == [[c for c, t in zip(sampled, seconds) if t <= 0.05]]
    assert record["n_late"] == int((seconds > 0.05).sum()) and record["round_virtual_seconds"] == 0.05


def test_over_selection_samples_30_percent_more_and_keeps_the_first_k_to_finish(monkeypatch):
    s = stepper(*SAMPLED, "sampling.clients_per_round=10", "system.over_selection=0.3")
    calls = _trained(s.round_, monkeypatch)
    record = s.round(1)
    sampled = sample_available(np.ones(20, dtype=bool), 10, 0.3, 0, 1)
    seconds = _seconds(s.round_, sampled)
    first = sorted(np.array(sampled)[np.argsort(seconds, kind="stable")[:10]].tolist())
    assert record["n_sampled"] == 13 and record["n_cancelled"] == 3
    assert calls == [first]
    assert record["round_virtual_seconds"] == pytest.approx(np.sort(seconds)[9])


def test_over_selection_cuts_the_round_virtual_time():
    def mean_round_seconds(extra):
        history = run(None, [*SAMPLED, "data.n_clients=50", "sampling.clients_per_round=10", "rounds=4",
                             "evaluation.every=4", *extra]).history
        return np.mean([r["round_virtual_seconds"] for r in history])

    assert mean_round_seconds(["system.over_selection=0.3"]) < mean_round_seconds([])


def test_only_clients_online_at_the_round_start_are_sampled(monkeypatch):
    s = stepper(*SAMPLED, "system.availability=diurnal", "system.day_s=1.0", "system.online_fraction=0.3")
    calls = _trained(s.round_, monkeypatch)
    for r in (1, 2, 3):
        began = s.state["virtual_seconds"]
        s.round(r)
        online = s.round_.system.available(began)
        assert 0 < online.sum() < 20 and all(online[c] for c in calls[-1])


def test_late_updates_kept_stale_arrive_in_the_next_round():
    s = stepper(*SAMPLED, "system.deadline_s=0.05", "system.late=stale")
    record = s.round(1)
    late = s.state["late"]
    assert record["n_late"] == len(late["client_ids"]) > 0
    second = s.round(2)
    assert s.state["late"] is None or s.state["late"]["client_ids"] != late["client_ids"]
    assert second["n_sampled"] == 5  # sampled this round; last round's late rows ride along


def test_records_carry_the_cumulative_virtual_clock_and_the_summary_its_time_to_target():
    result = run(None, [*SAMPLED, "rounds=4", "evaluation.target_accuracy=0.3"])
    rounds = [r["round_virtual_seconds"] for r in result.history]
    assert [r["virtual_seconds"] for r in result.history] == pytest.approx(np.cumsum(rounds).tolist())
    reached = next(r for r in result.history if r.get("central_accuracy", 0) >= 0.3)
    assert result.summary["time_to_target"] == {"target_accuracy": 0.3, "round": reached["round"],
                                                "wall_seconds": reached["wall_seconds"],
                                                "virtual_seconds": reached["virtual_seconds"]}
    assert run(None, [*SMALL, "rounds=1", "evaluation.target_accuracy=1.0"]).summary["time_to_target"] is None


def test_top_k_compression_cuts_virtual_time_on_a_bandwidth_bound_system():
    slow_links = [*SAMPLED, "model.name=mlp", "system.bandwidth_classes=[{up_mbps = 0.01, down_mbps = 1.0}]"]
    plain = make_round(*slow_links)
    topk = make_round(*slow_links, "compression.name=topk", "compression.options={k = 0.05}")
    assert topk.row_bytes < plain.row_bytes / 5
    assert topk.play(topk.init_state(), 1)[1]["round_virtual_seconds"] < \
        plain.play(plain.init_state(), 1)[1]["round_virtual_seconds"]


@pytest.mark.parametrize("overrides, message", [
    (["system.deadline_s=5"], "system.deadline_s needs a system model"),
    (["system.profile=trace"], "give system.trace"),
    (["system.profile=sampled", "system.late=stale"], "set a deadline"),
    (["mode=asynchronous"], "runs on the virtual clock"),
    (["mode=decentralized", "system.profile=sampled"], "decentralized runs have no clock"),
    (["mode=asynchronous", "system.profile=sampled", "asynchronous.algorithm=fedasync", "compression.name=topk",
      "compression.options={k = 0.1}"], "use 'fedbuff'"),
    (["mode=asynchronous", "system.profile=sampled", "data.n_clients=10", "asynchronous.concurrency=8"],
     "more than data.n_clients"),
])
def test_system_combination_rules_fire_at_config_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_trace_with_an_unknown_client_stops_the_run_naming_the_line(tmp_path):
    path = _trace(tmp_path, *[f"{c},1.0,10,50," for c in range(20)], "20,1.0,10,50,")
    with pytest.raises(TraceError, match="devices.csv:22: unknown client 20"):
        make_round(*SMALL, "system.profile=trace", f"system.trace={str(path)!r}")


def test_a_round_nobody_finishes_by_its_deadline_keeps_the_model_and_takes_the_deadline():
    s = stepper(*SAMPLED, "system.deadline_s=0.00001")
    x0 = s.state["x"].clone()
    record = s.round(1)
    assert record["n_late"] == 5 and record["round_virtual_seconds"] == 0.00001 and record["bytes_up"] == 0
    assert torch.equal(s.state["x"], x0)


def test_device_flops_time_an_example_by_the_models_training_flops():
    round_ = make_round(*SMALL, "system.profile=sampled", "system.device_flops=3840")
    # logistic regression on digits: 64 x 10 multiply-adds = 1,280 forward FLOPs, 3x for training
    assert round_.system.seconds_per_example == pytest.approx(1.0)
