"""FedScale's device and behaviour traces: pickles written in exactly FedScale's layout give FedScale's
round times and availability, anything but plain data is refused without running it, and a malformed
entry or an unknown client is refused naming the file and the client."""

import os
import pickle

import numpy as np
import pytest

from fedloom.config import ConfigError, load_config
from fedloom.runner import run
from fedloom.systems import TraceError
from fedloom.systems.fedscale import load_plain_pickle, read_fedscale
from fedloom.systems.model import build_system, interval_availability

SMALL = ["data.n_clients=4", "sampling.clients_per_round=2", "client.epochs=1", "model.name=logistic",
         "evaluation.federated=false", "output.save=false", "output.progress=false"]
DEVICES = {1: {"computation": 100.0, "communication": 8000.0}, 2: {"computation": 50, "communication": 1000},
           3: {"computation": 20.0, "communication": 2000.0}, 7: {"computation": 400.0, "communication": 500.0},
           9: {"computation": 1.0, "communication": 1.0}}  # more devices than clients, as real traces have
BEHAVIOUR = {c: {"duration": 100, "inactive": [40, 90], "active": [10, 60], "finish_time": 100, "model": "x"}
             for c in DEVICES}


def _pickle(tmp_path, name, value):
    path = tmp_path / name
    with path.open("wb") as f:
        pickle.dump(value, f)
    return str(path)


def test_fedscale_capacities_give_fedscales_round_times(tmp_path):
    spe = 0.002
    trace = read_fedscale(_pickle(tmp_path, "dev", DEVICES), None, 4, spe)
    # clients 0..3 are the ids 1, 2, 3, 7 (sorted); FedScale: 3 x examples x ms / 1000, kbits / kbps
    examples, nbytes = 64, 10_000
    compute = examples * spe / trace.speed
    assert np.allclose(compute, 3 * examples * np.array([100, 50, 20, 400]) / 1000)
    link = nbytes / (trace.up_mbps * 1e6 / 8)
    assert np.allclose(link, nbytes * 8 / 1024 / np.array([8000, 1000, 2000, 500]))
    assert np.array_equal(trace.up_mbps, trace.down_mbps)


def test_behaviour_intervals_repeat_every_finish_time(tmp_path):
    behaviour = {**BEHAVIOUR, 2: {"duration": 50, "inactive": [20], "active": [0], "finish_time": 50}}
    trace = read_fedscale(_pickle(tmp_path, "dev", DEVICES), _pickle(tmp_path, "beh", behaviour), 2, 0.001)
    online = interval_availability(trace.intervals, trace.periods)
    assert [bool(online(t)[0]) for t in (5, 10, 39, 45, 70, 95, 115, 165)] == [False, True, True, False, True,
                                                                                 False, True, True]
    assert [bool(online(t)[1]) for t in (5, 25, 55, 75)] == [True, False, True, False]  # its own period, 50


def test_a_pickle_naming_any_class_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = _pickle(tmp_path, "dev", {0: {"computation": Exploit(), "communication": 1.0}})
    with pytest.raises(TraceError, match=r"dev \(system.device_file\): not a plain FedScale pickle: it names"):
        load_plain_pickle(path, "device_file")
    assert not marker.exists()
    with pytest.raises(TraceError, match="not a plain FedScale pickle"):  # numpy scalars are classes too
        load_plain_pickle(_pickle(tmp_path, "np", {0: np.float64(1.0)}), "device_file")
    (tmp_path / "text").write_text("client,speed\n")
    with pytest.raises(TraceError, match="text .system.device_file.: not a plain FedScale pickle"):
        load_plain_pickle(tmp_path / "text", "device_file")


@pytest.mark.parametrize("devices, behaviour, message", [
    ({**DEVICES, 2: {"computation": 50}}, None, "dev: client 2: expected {'computation'"),
    ({**DEVICES, 3: {"computation": -1, "communication": 5}}, None, "dev: client 3: 'computation' must be a number"),
    ({**DEVICES, "x": DEVICES[1]}, None, "dev: client id 'x' is not a non-negative integer"),
    ({1: DEVICES[1]}, None, "dev .system.device_file.: 1 devices for a federation of 4 clients"),
    (DEVICES, {**BEHAVIOUR, 11: BEHAVIOUR[1]}, r"beh \(system.behavior_file\): unknown client 11"),
    (DEVICES, {c: BEHAVIOUR[c] for c in (1, 2, 3)}, r"no entry for client 7 \(federation client 3\)"),
    (DEVICES, {**BEHAVIOUR, 2: {"active": [0, 5], "inactive": [10], "finish_time": 9}},
     "beh: client 2: 'active' and 'inactive' must be lists of equal"),
    (DEVICES, {**BEHAVIOUR, 3: {"active": [0], "inactive": [10], "finish_time": 9}},
     "beh: client 3: intervals must be increasing"),
    (DEVICES, {**BEHAVIOUR, 1: {"active": [0], "finish_time": 9}}, "beh: client 1: expected a dict with 'active'"),
])
def test_a_malformed_entry_or_unknown_client_is_refused_naming_file_and_client(tmp_path, devices, behaviour,
                                                                               message):
    beh = _pickle(tmp_path, "beh", behaviour) if behaviour is not None else None
    with pytest.raises(TraceError, match=message.replace("{", r"\{")):
        read_fedscale(_pickle(tmp_path, "dev", devices), beh, 4, 0.001)


def test_a_run_on_fedscale_traces_samples_online_clients_on_their_clock(tmp_path):
    late_start = {c: {"active": [10], "inactive": [10**6], "finish_time": 2 * 10**6} for c in DEVICES}
    dev, beh = _pickle(tmp_path, "dev", DEVICES), _pickle(tmp_path, "beh", late_start)
    files = ["system.profile=trace", "system.trace_format=fedscale", f"system.device_file={dev!r}",
             f"system.behavior_file={beh!r}"]
    cfg = load_config(None, [*SMALL, *files])
    system = build_system(cfg, 4)
    assert not system.available(0.0).any() and system.available(15.0).all()
    history = run(None, [*SMALL, *files, "rounds=3"]).history
    seconds = [h["virtual_seconds"] for h in history]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    assert history[0]["n_sampled"] == 0 and seconds[0] == 60.0  # nobody online before 10 s: the round waits
    assert [h["n_sampled"] for h in history[1:]] == [2, 2] and seconds[2] > seconds[1] > 60.0


@pytest.mark.parametrize("overrides, message", [
    (["system.profile=trace", "system.trace_format=fedscale"], "system.device_file"),
    (["system.profile=trace", "system.trace_format=fedscale", "system.device_file='d'", "system.trace='t.csv'"],
     "system.trace"),
    (["system.trace_format=fedscale", "system.device_file='d'"], "set system.profile = 'trace'"),
    (["system.profile=trace", "system.trace='t.csv'", "system.behavior_file='b'"], "system.trace_format = 'fedscale'"),
])
def test_fedscale_keys_are_checked_at_config_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*SMALL, *overrides])
