"""Fresh virtual environments for the packaging tests: fedloom's wheel, and venvs installed with pip as a user would.

A test session builds one *base* venv holding torch and fedloom's core dependencies, installed by pip from the
package registries (``pip install torch==2.13.0`` and pyproject.toml's ``dependencies``); every other venv
sees it through a ``.pth`` line (a plain path entry) and gets its own packages installed by pip beside it:
fedloom from the wheel and one extra's requirements, which pip resolves against what the base already holds.
Under pytest-xdist the workers share the wheel and the base (built once, under a file lock).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the CPU build on this disk; a bare torch requirement may pull a CUDA build of GBs
SELF = re.compile(r"^fedloom\[([\w,-]+)\]$")
PIP_TIMEOUT_S = 900


def canonical(name: str) -> str:
    """A distribution name as pip and importlib.metadata compare them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """Core requirements and each extra's, with ``fedloom[a,b]`` expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def expand(requirements: list[str]) -> list[str]:
        out = []
        for requirement in requirements:
            named = SELF.match(requirement.replace(" ", ""))
            out += expand([r for e in named.group(1).split(",") for r in extras[e]]) if named else [requirement]
        return out

    return project["dependencies"], {name: expand(reqs) for name, reqs in extras.items()}


def closure(requirements: list[str], path: list[str] | None = None) -> set[str]:
    """The installed distributions (found on ``path``, default sys.path) these requirements pull in,
    transitively, with markers evaluated for this interpreter."""
    from packaging.requirements import Requirement

    seen: set[tuple[str, str]] = set()
    todo = [(r, "") for r in requirements]
    while todo:
        text, extra = todo.pop()
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonical(requirement.name)
        found = next(iter(metadata.distributions(name=name, path=path or sys.path)), None)
        if found is None:
            continue
        for wanted in ["", *requirement.extras]:
            if (name, wanted) not in seen:
                seen.add((name, wanted))
                todo += [(r, wanted) for r in found.requires or []]
    return {name for name, _ in seen}


def sh(*args: str, cwd: Path, env: dict | None = None, timeout: int = PIP_TIMEOUT_S) -> str:
    """Run a command; AssertionError with its output tail unless it succeeds."""
    done = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def clean_env() -> dict:
    """The environment without PYTHONPATH: nothing may come from the source tree."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | {"MPLBACKEND": "Agg"}


def shared_dir(tmp_path_factory) -> Path:
    """A directory every xdist worker of this session sees (the session's base temp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` (a sibling lock file), across processes."""
    with open(f"{path}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build_wheel(out: Path) -> Path:
    """fedloom's wheel, built offline (``--no-build-isolation``: the installed setuptools) from a copy of the
    checkout, so the build's own files stay out of it; built once into ``out``."""
    with locked(out):
        found = sorted(out.glob("fedloom-*.whl"))
        if found:
            return found[0]
        source = out / "source"
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir(parents=True)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, source)
        shutil.copytree(ROOT / "fedloom", source / "fedloom", ignore=shutil.ignore_patterns("__pycache__"))
        sh(sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
           "-w", str(out), cwd=out)
        (built,) = out.glob("fedloom-*.whl")
        return built


def pip_install(python: Path, *requirements: str) -> None:
    """``pip install`` into the venv of ``python`` (this interpreter's pip, run with ``--python``)."""
    sh(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", *requirements,
       cwd=python.parent)


def site_packages(python: Path) -> Path:
    """The venv's own site-packages."""
    return Path(sh(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                   cwd=python.parent, env=clean_env()).strip())


def base_venv(where: Path) -> Path:
    """The base venv's site-packages: torch and the core dependencies, from the registries; built once."""
    with locked(where):
        python, done = where / "bin" / "python", where / "installed"
        if not done.exists():
            shutil.rmtree(where, ignore_errors=True)
            venv.create(where, with_pip=False)
            core, _ = project_requirements()
            pip_install(python, TORCH, *core)
            done.touch()
        return site_packages(python)


def venv_on(base_site: Path, where: Path, *requirements: str) -> Path:
    """A fresh venv that sees the base, with ``requirements`` installed by pip; returns its python."""
    venv.create(where, with_pip=False)
    python = where / "bin" / "python"
    (site_packages(python) / "fedloom_base.pth").write_text(f"{base_site}\n")
    pip_install(python, *requirements)
    return python
