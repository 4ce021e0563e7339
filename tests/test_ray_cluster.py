"""The ray engine on a real two-node Ray cluster, started the way a user starts one: `ray start
--head` and a second `ray start --address` (token authentication, Ray's default), here both on this
machine. The run's workers land on both nodes, train with the vectorized engine inside, and give
the serial engine's numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("ray")

import fedloom  # noqa: E402
from fedloom.engines.local_cluster import local_cluster  # noqa: E402

pytestmark = pytest.mark.slow
CONFIG = {"data": {"n_clients": 12}, "sampling": {"clients_per_round": 6}, "rounds": 3, "client": {"epochs": 1},
          "model": {"name": "mlp"}, "output": {"progress": False}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(2, tmp_path_factory.mktemp("ray-cluster")) as running:
        yield running.address, running.env


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
