"""Each optional extra alone: its code path works with only core's and that extra's packages importable,
and without them fedloom says which extra to install (exit 2, no traceback).

The other packages are refused by a meta-path finder (tests/extras_alone.py) in a subprocess, as if not
installed; which ones follows pyproject.toml's requirements and their installed dependencies.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import extras_alone

pytestmark = pytest.mark.slow  # two fresh interpreters per extra, some running a 1-round experiment

ROOT = Path(__file__).resolve().parent.parent
CLI = "import sys; from fedloom.cli import main; sys.exit(main(sys.argv[1:]))"
RUN = ["run", "rounds=1", "data.n_clients=4", "client.epochs=1", "--quiet", "--out", "runs"]
DEPLOY = """
from concurrent import futures
import grpc
from fedloom.deploy import client, codec, security, server, servicer
grpc_server = grpc.server(futures.ThreadPoolExecutor(1))
assert grpc_server.add_insecure_port("127.0.0.1:0") > 0
grpc_server.start(); grpc_server.stop(0)
"""
DASHBOARD = """
import json, socket, time, urllib.request
from fedloom.dashboard import serve
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
thread = serve(".", port=port, background=True)
for _ in range(200):
    if thread.server.started: break
    time.sleep(0.05)
page = urllib.request.urlopen(f"http://127.0.0.1:{port}/").read().decode()
assert "plotly" in page and json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs")) == []
thread.server.should_exit = True
"""
MNIST5K = """
from fedloom.data import load_dataset
train, test = load_dataset("mnist5k")
assert len(train) == 5000 and train.input_shape == (1, 28, 28) and train.n_classes == 10, train.input_shape
"""
RAY = """
from fedloom.engines.ray_engine import RayEngine, import_ray
assert callable(import_ray().remote)
"""
HF_DATA = "a,b,label\n" + "".join(f"{i % 7},{i % 3},{i % 2}\n" for i in range(60))
HF = """
from fedloom.data import load_dataset
train, test = load_dataset("hf", path="d.csv", feature_columns=["a", "b"])
assert len(train) == 60 and test is None and train.n_classes == 2
"""
EXPORT = """
import fedloom
result = fedloom.run({{"rounds": 1, "data": {{"n_clients": 4}}, "client": {{"epochs": 1}},
                      "output": {{"dir": "runs", "progress": False}}, "tracking": {{"{key}": True}}}})
assert result.summary["status"] == "completed" and "tracking_errors" not in result.summary, result.summary
assert any(result.run_dir.iterdir())
"""
RUN_SETTINGS = """
import fedloom
result = fedloom.run({{"rounds": 1, "data": {{"n_clients": 4}}, "client": {{"epochs": 1}},
                      "output": {{"save": False, "progress": False}}, {settings}}})
assert result.summary["status"] == "completed", result.summary
assert {check}, result.summary
"""
PRIVACY = RUN_SETTINGS.format(settings='"privacy": {"mechanism": "central", "noise_multiplier": 1.0}',
                              check='result.summary["epsilon"] > 0')
SECAGG = RUN_SETTINGS.format(settings='"secure_aggregation": {"protocol": "secagg"}',
                             check='"aggregate:secagg (server)" in " ".join(result.summary["pipeline"])')
MERGING = RUN_SETTINGS.format(settings='"mode": "decentralized", "decentralized": {"final_merge": "ot"}',
                              check='0 <= result.summary["final_merge_accuracy"] <= 1')
# extra -> (smoke code with the extra's packages, CLI arguments that need them)
CASES = {
    "deploy": (DEPLOY, ["client", "--server", "127.0.0.1:1", "--data", "d.npz", "--client-id", "1", "--token", "t"]),
    "dashboard": (DASHBOARD, ["dashboard", ".", "--port", "1"]),
    "mnist5k": (MNIST5K, [*RUN, "data.dataset=mnist5k"]),
    "ray": (RAY, [*RUN, "engine.name=ray"]),
    "hf": (HF, [*RUN, "data.dataset=hf", "data.options.path=d.csv", "data.options.feature_columns=['a', 'b']"]),
    "tensorboard": (EXPORT.format(key="tensorboard"), [*RUN, "tracking.tensorboard=true"]),
    "mlflow": (EXPORT.format(key="mlflow"), [*RUN, "tracking.mlflow=true"]),
    "wandb": (EXPORT.format(key="wandb"), [*RUN, "tracking.wandb=true"]),
    "privacy": (PRIVACY, [*RUN, "privacy.mechanism=central", "privacy.noise_multiplier=1.0"]),
    "secagg": (SECAGG, [*RUN, "secure_aggregation.protocol=secagg"]),
    "merging": (MERGING, [*RUN, "mode=decentralized", "decentralized.final_merge=ot"]),
}


def blocked_run(tmp_path: Path, blocked: list[str], *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "blocked.json").write_text(json.dumps(blocked))
    (tmp_path / "d.csv").write_text(HF_DATA)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, str(Path(extras_alone.__file__)), str(tmp_path / "blocked.json"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_every_code_extra_is_covered():
    """A new extra must get a case here (docs: the site build; tracking, test: the others together)."""
    _, extras = extras_alone.project_requirements()
    assert set(extras) - {"docs", "tracking", "test"} == set(CASES)


def test_blocker_refuses_the_other_extras():
    blocked = extras_alone.blocked_modules("deploy")
    assert {"starlette", "ray", "mlxtend", "pytest"} <= set(blocked) and "grpc" not in blocked
    assert "torch" not in blocked and "numpy" not in blocked
    assert "grpc" in extras_alone.blocked_modules("dashboard")


def needs_installed(extra: str) -> None:
    from importlib import metadata

    from packaging.requirements import Requirement

    _, extras = extras_alone.project_requirements()
    for requirement in extras[extra]:
        try:
            metadata.distribution(Requirement(requirement).name)
        except metadata.PackageNotFoundError:
            pytest.skip(f"{requirement} is not installed: pip install -e '.[{extra}]' (the test extra has it)")


@pytest.mark.parametrize("extra", CASES)
def test_extra_alone_works(extra, tmp_path):
    needs_installed(extra)
    ran = blocked_run(tmp_path, extras_alone.blocked_modules(extra), "-c", CASES[extra][0])
    assert ran.returncode == 0, ran.stderr[-3000:]


@pytest.mark.parametrize("extra", CASES)
def test_missing_extra_is_named(extra, tmp_path):
    needs_installed(extra)
    core, extras = extras_alone.project_requirements()
    own = extras_alone.closure(extras[extra]) - extras_alone.closure(core)
    ran = blocked_run(tmp_path, extras_alone.blocked_modules(extra, own), "-c", CLI, *CASES[extra][1])
    assert ran.returncode == 2, ran.stderr[-3000:]
    assert f"fedloom[{extra}]" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # refused before a run directory is made
