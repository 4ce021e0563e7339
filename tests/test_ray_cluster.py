"""The ray engine on a real two-node Ray cluster, started the way a user starts one: `ray start
--head` and a second `ray start --address` (token authentication, Ray's default), here both on this
machine. The run's workers land on both nodes, train with the vectorized engine inside, and give
the serial engine's numbers."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("ray")

import fedloom  # noqa: E402

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")
CONFIG = {"data": {"n_clients": 12}, "sampling": {"clients_per_round": 6}, "rounds": 3, "client": {"epochs": 1},
          "model": {"name": "mlp"}, "output": {"progress": False}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """One node; its own temporary directory keeps its address out of /tmp/ray, where a plain
    ``ray.init()`` elsewhere (the other tests) would find it and join this cluster."""
    temp_dir = tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    with open(log, "w") as out:
        return subprocess.Popen([str(RAY), "start", "--block", "--num-cpus=1", "--object-store-memory=100000000",
                                 "--disable-usage-stats", f"--temp-dir={temp_dir}", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    probe = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    return int(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-cluster")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    address = f"127.0.0.1:{_free_port()}"
    nodes = [_start(["--head", f"--port={address.rpartition(':')[2]}", "--include-dashboard=false"], env,
                    logs / "head.log")]
    try:
        deadline = time.monotonic() + 180
        while _alive_nodes(address, env) < 1:
            assert time.monotonic() < deadline, (logs / "head.log").read_text()[-2000:]
        nodes.append(_start([f"--address={address}"], env, logs / "worker.log"))
        while _alive_nodes(address, env) < 2:
            assert time.monotonic() < deadline, (logs / "worker.log").read_text()[-2000:]
        yield address, env
    finally:
        for node in reversed(nodes):  # `ray start --block` stops its node's processes on SIGTERM
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=60)
            shutil.rmtree(next(a for a in node.args if a.startswith("--temp-dir=")).partition("=")[2],
                          ignore_errors=True)


def test_two_node_cluster_gives_the_serial_engines_numbers(cluster, tmp_path):
    address, env = cluster
    serial = fedloom.run(CONFIG, [f"output.dir={tmp_path / 'serial'}", "engine.name=serial"])
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(CONFIG))  # JSON is YAML
    overrides = [f"output.dir={tmp_path / 'ray'}", "engine.name=ray", f"engine.ray_address={address}",
                 "engine.ray_workers=2"]
    done = subprocess.run([sys.executable, "-m", "fedloom.cli", "run", str(config), *[a for o in overrides
                                                                               for a in ("--set", o)]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = next((tmp_path / "ray").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ray_nodes"] == 2 and summary["ray_workers"] == 2  # one worker on each machine
    assert summary["central_accuracy"] == pytest.approx(serial.summary["central_accuracy"], abs=1e-3)
    ray_model = load_file(run_dir / "model.safetensors")
    serial_model = load_file(serial.run_dir / "model.safetensors")
    for name, tensor in serial_model.items():
        torch.testing.assert_close(ray_model[name], tensor, rtol=1e-4, atol=1e-5)
