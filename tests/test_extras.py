"""Each optional extra installed alone, in a real fresh venv, the way a user installs it: its feature works,
no other extra's packages come along, and without the extra fedloom says which one to install.

``pip install 'fedloom[EXTRA] @ <wheel>'`` runs in a new venv beside a base venv holding torch and the core
dependencies (tests/fresh_venv.py: the base is installed once a session from the package registries, as
``pip install torch==2.13.0`` and pyproject.toml's dependencies); pip resolves the extra against the base and
installs fedloom and the extra's own packages. A venv of fedloom with no extra (a simulation-only user)
runs an experiment, holds no extra's packages, and each extra's command exits 2 naming ``fedloom[EXTRA]``.
"""

import json
import subprocess
from pathlib import Path

import pytest

import fresh_venv

pytestmark = pytest.mark.slow  # a pip install and a fresh interpreter per extra (about 5 minutes in all)

TESTS = Path(__file__).resolve().parent

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


INSTALLED = """
import json, sys
from importlib import metadata
sys.path.insert(0, sys.argv[3])
import fresh_venv
core, extras = fresh_venv.project_requirements()
extra, own_site = sys.argv[1], sys.argv[2]
allowed = fresh_venv.closure(core) | (fresh_venv.closure(extras[extra]) if extra else set()) | {"fedloom"}
own = {fresh_venv.canonical(d.metadata["Name"]) for d in metadata.distributions(path=[own_site])}
from packaging.requirements import Requirement
others = {fresh_venv.canonical(Requirement(r).name) for name, reqs in extras.items() if name != extra
          for r in reqs} - allowed
present = sorted(n for n in others if next(iter(metadata.distributions(name=n)), None) is not None)
print(json.dumps({"own": sorted(own), "outside_the_extra": sorted(own - allowed), "other_extras": present}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return fresh_venv.build_wheel(fresh_venv.shared_dir(tmp_path_factory) / "wheel")


@pytest.fixture(scope="module")
def base_site(tmp_path_factory) -> Path:
    return fresh_venv.base_venv(fresh_venv.shared_dir(tmp_path_factory) / "base-venv")


@pytest.fixture(scope="module")
def core_python(wheel, base_site, tmp_path_factory) -> Path:
    """fedloom installed with no extra."""
    return fresh_venv.venv_on(base_site, tmp_path_factory.mktemp("core") / "venv", str(wheel))


def run_in(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python *args`` in ``cwd`` (holding the hf case's d.csv), nothing from the source tree."""
    (cwd / "d.csv").write_text(HF_DATA)
    env = fresh_venv.clean_env() | {"WANDB_SILENT": "true"}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def installed(python: Path, extra: str) -> dict:
    """The venv's own distributions, those outside core + the extra, and other extras' packages it sees."""
    site = fresh_venv.site_packages(python)
    done = run_in(python, site.parent, "-c", INSTALLED, extra, str(site), str(TESTS))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_code_extra_is_covered():
    """A new extra must get a case here (docs: the site build; tracking, test: the others together)."""
    _, extras = fresh_venv.project_requirements()
    assert set(extras) - {"docs", "tracking", "test"} == set(CASES)


@pytest.mark.parametrize("extra", CASES)
def test_extra_installed_alone_works(extra, wheel, base_site, tmp_path):
    python = fresh_venv.venv_on(base_site, tmp_path / "venv", f"fedloom[{extra}] @ {wheel.as_uri()}")
    found = installed(python, extra)
    assert "fedloom" in found["own"] and found["outside_the_extra"] == [] and found["other_extras"] == [], found
    (tmp_path / "work").mkdir()
    ran = run_in(python, tmp_path / "work", "-c", "import fedloom, sys; print(fedloom.__file__)\n" + CASES[extra][0])
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.startswith(str(tmp_path / "venv")), ran.stdout  # the installed copy, not the checkout


def test_core_install_runs_without_any_extra(core_python, tmp_path):
    found = installed(core_python, "")
    assert found["outside_the_extra"] == [] and found["other_extras"] == [], found
    assert "grpcio" not in found["own"]  # a simulation-only user does not install gRPC
    fedloom = core_python.parent / "fedloom"
    ran = subprocess.run([str(fedloom), *RUN], cwd=tmp_path, env=fresh_venv.clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_done"] == 1


@pytest.mark.parametrize("extra", CASES)
def test_missing_extra_is_named(extra, core_python, tmp_path):
    ran = run_in(core_python, tmp_path, "-c", CLI, *CASES[extra][1])
    assert ran.returncode == 2, ran.stderr[-3000:]
    assert f"fedloom[{extra}]" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # refused before a run directory is made
