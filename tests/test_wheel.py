"""The wheel holds everything an installed fedloom reads (package data), and runs from outside the source tree.

Offline: the wheel is built with ``pip wheel --no-deps --no-build-isolation`` (the setuptools already
installed), and installed with ``--no-deps --no-index`` into a fresh venv without the system's
site-packages. Its dependencies (torch, ...) come from this interpreter's site-packages, appended to the
fresh venv's path by a .pth line: a plain path entry, so the .pth files there (this checkout's editable
fedloom) are not run, and the fresh venv's own fedloom, the wheel's, is the one imported.
"""

import json
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from fresh_venv import build_wheel, clean_env, sh, shared_dir

PACKAGE_DATA = ["fedloom/defaults.toml", "fedloom/dashboard/index.html", "fedloom/dashboard/static/plotly.min.js",
                "fedloom/dashboard/static/dashboard.js", "fedloom/deploy/deploy.proto"]
DASHBOARD_CHECK = """
import sys, fedloom
from starlette.testclient import TestClient
from fedloom.dashboard import create_app
assert fedloom.__file__.startswith(sys.prefix), fedloom.__file__  # the wheel's copy, not the checkout's
client = TestClient(create_app(sys.argv[1]))
page, plotly = client.get("/"), client.get("/static/plotly.min.js")
assert page.status_code == 200 and "plotly" in page.text, page.status_code
assert plotly.status_code == 200 and len(plotly.content) > 1_000_000, plotly.status_code
print([run["name"] for run in client.get("/api/runs").json()])
"""

pytestmark = pytest.mark.slow  # builds a wheel and a venv, runs fedloom from it (about a minute)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(shared_dir(tmp_path_factory) / "wheel")


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel; returns its bin directory."""
    env_dir = tmp_path_factory.mktemp("venv") / "fresh"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = sh(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=env_dir).strip()
    Path(site, "fedloom_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    sh(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel),
       cwd=env_dir)
    return env_dir / "bin"


def test_wheel_holds_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [p for p in PACKAGE_DATA if p not in names] == []
    assert "fedloom/cli.py" in names and not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)


def test_installed_wheel_runs_outside_the_source_tree(installed, tmp_path):
    env = clean_env()
    assert sh(str(installed / "fedloom"), "--version", cwd=tmp_path, env=env).strip() == "fedloom 0.1.0"
    defaults = sh(str(installed / "fedloom"), "config", cwd=tmp_path, env=env)
    assert "[tracking]" in defaults and "rounds = 50" in defaults  # defaults.toml read from the wheel
    sh(str(installed / "fedloom"), "run", "rounds=1", "data.n_clients=10", "client.epochs=1", "--quiet",
       "--out", "runs", cwd=tmp_path, env=env)
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_done"] == 1
    assert (run_dir / "model.safetensors").stat().st_size > 0 and (run_dir / "report.html").exists()
    listed = sh(str(installed / "python"), "-c", DASHBOARD_CHECK, str(tmp_path / "runs"), cwd=tmp_path, env=env)
    assert run_dir.name in listed
