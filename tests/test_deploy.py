"""`fedloom server` and ten `fedloom client` processes on 127.0.0.1: the same model as the serial
simulation, clients killed mid-round, and a server killed and resumed."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from fedloom.builders import build_data
from fedloom.config import load_config
from fedloom.deploy.client import run_client
from fedloom.deploy.server import serve
from fedloom.rounds import build_round
from fedloom.runner import run
from fedloom.tracking import read_metrics

pytestmark = pytest.mark.slow

N_CLIENTS = 10
CONFIG = {"name": "deploy", "rounds": 5, "data": {"dataset": "digits", "n_clients": N_CLIENTS},
          "model": {"name": "mlp", "options": {"hidden": [32]}}, "client": {"epochs": 2, "batch_size": 16},
          "sampling": {"clients_per_round": N_CLIENTS}, "engine": {"name": "serial"}, "output": {"progress": False}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RUN_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """One server and its client processes, each client with its simulated client's training
    data in its own .npz (from the same build_data the simulation uses); logs in tmp_path."""

    def __init__(self, tmp_path: Path, config: dict):
        self.dir = tmp_path
        self.config = {**config, "output": {**config["output"], "dir": str(tmp_path / "runs")}}
        (tmp_path / "exp.toml").write_text(tomli_w.dumps(self.config))
        data = build_data(load_config(self.config))
        self.tokens = {k: secrets.token_hex(16) for k in range(N_CLIENTS)}
        (tmp_path / "tokens.txt").write_text("".join(f"{k} {t}\n" for k, t in self.tokens.items()))
        for k in range(N_CLIENTS):
            idx = data.train_idx[k]
            np.savez(tmp_path / f"client{k}.npz", x=data.x[idx].numpy(), y=data.y[idx].numpy())
        self.address = f"127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None
        self.clients: dict[int, subprocess.Popen] = {}

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.dir / log_name, "ab")
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=ENV)
        self.procs.append(proc)
        return proc

    def start_server(self, *args: str) -> None:
        self.server = self._spawn(["-m", "fedloom.deploy.server", "--address", self.address,
                                   "--tokens", str(self.dir / "tokens.txt"), *args], "server.log")

    def start_client(self, k: int, patience_s: float = 60) -> None:
        self.clients[k] = self._spawn(["-m", "fedloom.deploy.client", "--server", self.address,
                                       "--data", str(self.dir / f"client{k}.npz"), "--client-id", str(k),
                                       "--token", self.tokens[k], "--patience", str(patience_s)], f"client{k}.log")

    def log(self) -> str:
        return (self.dir / "server.log").read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = RUN_TIMEOUT_S) -> None:
        give_up = time.monotonic() + timeout
        while not re.search(pattern, self.log()):
            assert time.monotonic() < give_up, f"no {pattern!r} in the server log:\n{self.log()[-3000:]}"
            assert self.server.poll() is None, f"the server exited:\n{self.log()[-3000:]}"
            time.sleep(0.05)

    def finish(self, late: tuple[int, ...] = ()) -> Path:
        """Wait for the server and every client to end cleanly (a ``late`` client may also give up,
        having found the run over before it reconnected); the run directory."""
        assert self.server.wait(RUN_TIMEOUT_S) == 0, self.log()[-3000:]
        for k, proc in self.clients.items():
            allowed = (0, 1) if k in late else (0,)
            assert proc.wait(30) in allowed, (self.dir / f"client{k}.log").read_text()[-2000:]
        (run_dir,) = (self.dir / "runs").iterdir()
        return run_dir

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def federation(tmp_path):
    made: list[Federation] = []

    def make(config: dict = CONFIG) -> Federation:
        made.append(Federation(tmp_path, config))
        return made[-1]

    yield make
    for fed in made:
        fed.close()


@pytest.fixture(scope="module")
def simulation():
    return run({**CONFIG, "output": {"save": False, "progress": False}})


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_same_model(run_dir: Path, simulated) -> None:
    deployed = final_params(run_dir)
    for name, value in simulated.model.state_dict().items():
        torch.testing.assert_close(deployed[name], value, rtol=0, atol=1e-6)


def test_server_and_ten_clients_equal_the_serial_simulation(federation, simulation):
    fed = federation()
    fed.start_server("--config", str(fed.dir / "exp.toml"), "--round-timeout", "120")
    for k in range(N_CLIENTS):
        fed.start_client(k)
    run_dir = fed.finish()

    assert_same_model(run_dir, simulation)
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    for deployed, simulated in zip(records, simulation.history):
        assert set(simulated) <= set(deployed)
        for key in ("central_accuracy", "federated_accuracy", "n_sampled", "bytes_up", "bytes_down"):
            assert deployed[key] == simulated[key], key
        assert deployed["train_loss"] == pytest.approx(simulated["train_loss"], rel=1e-6)
        assert deployed["clients_submitted"] == list(range(N_CLIENTS)) and deployed["clients_dropped"] == []
        # real bytes: at least the fp32 payloads, plus headers and framing of a few percent at most
        assert deployed["bytes_up"] <= deployed["wire_bytes_up"] <= 1.05 * deployed["bytes_up"] + 4096
        assert deployed["bytes_down"] <= deployed["wire_bytes_down"] <= 1.05 * deployed["bytes_down"] + 20_000
    summary = (run_dir / "summary.json").read_text()
    assert '"engine": "grpc"' in summary and '"status": "completed"' in summary
    assert {"config.toml", "partition.json", "report.html", "checkpoint.pt"} <= {p.name for p in run_dir.iterdir()}


def test_clients_killed_mid_round_are_left_out_and_rejoin(federation):
    slow = {**CONFIG, "client": {"epochs": 50, "batch_size": 16}}  # a round's training outlasts the kill
    fed = federation(slow)
    # the deadline only matters while clients start (round 1): a round closes as soon as the other
    # seven are in, since the server saw the killed ones go (in round 2) or sees them gone (later rounds)
    fed.start_server("--config", str(fed.dir / "exp.toml"), "--min-clients", "7", "--round-timeout", "90")
    for k in range(N_CLIENTS):
        fed.start_client(k)
    victims = [2, 5, 7]
    fed.wait_log(r"round 2: tasks out")
    for k in victims:
        fed.clients[k].send_signal(signal.SIGKILL)
    fed.wait_log(r"round 2/5")
    for k in victims:
        fed.start_client(k, patience_s=5)  # the same ids come back, if the run is not over by then
    run_dir = fed.finish(late=tuple(victims))

    records = {r["round"]: r for r in read_metrics(run_dir)}
    assert records[2]["clients_dropped"] == victims
    assert records[2]["clients_submitted"] == [k for k in range(N_CLIENTS) if k not in victims]
    assert records[2]["n_sampled"] == N_CLIENTS and records[2]["n_submitted"] == 7
    assert records[1]["clients_dropped"] == []
    assert records[2]["clients_disconnected"] == victims  # they held their tasks when killed
    for r in (3, 4, 5):  # only victims still away are left out, and only as gone: the round did not wait for them
        assert set(records[r]["clients_dropped"]) <= set(victims)
        assert records[r]["clients_dropped"] == records[r]["clients_disconnected"]
    assert records[5]["central_accuracy"] > 0.8


def test_server_killed_after_round_3_resumes_to_the_same_model(federation, simulation):
    fed = federation()
    fed.start_server("--config", str(fed.dir / "exp.toml"), "--round-timeout", "120")
    for k in range(N_CLIENTS):
        fed.start_client(k)
    fed.wait_log(r"round 3/5")
    fed.server.send_signal(signal.SIGKILL)
    fed.server.wait()
    (run_dir,) = (fed.dir / "runs").iterdir()
    fed.start_server("--resume", str(run_dir), "--round-timeout", "120")
    assert fed.finish() == run_dir

    assert "resuming" in fed.log()
    assert_same_model(run_dir, simulation)
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    for deployed, simulated in zip(records, simulation.history):
        assert deployed["central_accuracy"] == simulated["central_accuracy"]
    assert records[-1]["bytes_up_total"] == simulation.history[-1]["bytes_up_total"]


def test_scaffold_state_and_aux_tensors_cross_the_wire(tmp_path):
    """In one process for speed: serve() and three run_client threads. Two of three clients a round,
    so a client's SCAFFOLD control variate goes to the server and comes back in a later task."""
    config = {**CONFIG, "rounds": 3, "algorithm": {"name": "scaffold"}, "data": {"dataset": "digits", "n_clients": 3},
              "sampling": {"clients_per_round": 2}, "deploy": {"round_timeout_s": 60},
              "output": {"dir": str(tmp_path / "runs"), "progress": False}}
    data = build_data(load_config(config))
    tokens = {k: secrets.token_hex(16) for k in range(3)}
    address = f"127.0.0.1:{free_port()}"
    exits: list[int] = []
    clients = []
    for k in range(3):
        np.savez(tmp_path / f"client{k}.npz", x=data.x[data.train_idx[k]].numpy(), y=data.y[data.train_idx[k]].numpy())
        clients.append(threading.Thread(target=lambda k=k: exits.append(
            run_client(address, tmp_path / f"client{k}.npz", k, tokens[k], patience_s=60))))
        clients[-1].start()
    result = serve(config, address, tokens)
    for thread in clients:
        thread.join(30)

    simulated = run({**config, "output": {"save": False, "progress": False}})
    assert exits == [0, 0, 0]
    torch.testing.assert_close(result.params, simulated.params, rtol=0, atol=1e-6)
    assert [r["central_accuracy"] for r in result.history] == [r["central_accuracy"] for r in simulated.history]


def test_rounds_with_too_few_updates_fail_at_their_deadline_and_the_run_stops(federation):
    """min_clients = 3 with only two clients running: each round closes at its 2 s deadline as failed,
    the model unchanged; after max_failed_rounds = 2 such rounds the server stops with exit code 1."""
    config = {**CONFIG, "rounds": 6, "max_failed_rounds": 2, "sampling": {"clients_per_round": 3},
              "deploy": {"min_clients": 3, "round_timeout_s": 2.0}}
    fed = federation(config)
    fed.start_server("--config", str(fed.dir / "exp.toml"))
    for k in (0, 1):
        fed.start_client(k, patience_s=5)
    assert fed.server.wait(RUN_TIMEOUT_S) == 1, fed.log()[-3000:]
    assert "no update was usable in 2 rounds in a row" in fed.log()
    (run_dir,) = (fed.dir / "runs").iterdir()
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2] and all(r["round_failed"] for r in records)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    start = build_round(load_config({**config, "output": {"save": False, "progress": False}}))
    model = start.final_model(start.init_state())
    for name, value in final_params(run_dir).items():
        assert torch.equal(value, model.state_dict()[name]), name  # failed rounds left the model as it was


def test_a_hung_client_costs_seconds_not_the_deadline(federation):
    """A client frozen by SIGSTOP keeps its TCP connection but answers no ping: keepalive closes its
    stream within seconds, so its round closes with the others instead of at the 120 s deadline."""
    slow = {**CONFIG, "rounds": 3, "client": {"epochs": 20, "batch_size": 16}}
    fed = federation(slow)
    fed.start_server("--config", str(fed.dir / "exp.toml"), "--min-clients", "5", "--round-timeout", "120")
    for k in range(N_CLIENTS):
        fed.start_client(k)
    fed.wait_log(r"round 1/3")
    fed.clients[3].send_signal(signal.SIGSTOP)  # hung mid-run: its socket stays open
    try:
        assert fed.server.wait(90) == 0, fed.log()[-3000:]
    finally:
        fed.clients[3].send_signal(signal.SIGCONT)
    (run_dir,) = (fed.dir / "runs").iterdir()
    records = {r["round"]: r for r in read_metrics(run_dir)}
    assert 3 not in records[3]["clients_submitted"] and records[3]["n_submitted"] == N_CLIENTS - 1
    assert all(r["round_seconds"] < 30 for r in records.values())  # seconds of keepalive, not the deadline
