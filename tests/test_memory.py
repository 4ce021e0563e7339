"""engine.keep_freed_memory: glibc keeps the rounds' freed tensors instead of mapping fresh pages each round."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from fedloom.config import load_config
from fedloom.engines import memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

CHURN = """
import ctypes, resource, sys, torch
from fedloom.engines import memory
if sys.argv[1] == "kept":
    assert memory.keep_freed_memory()
else:  # glibc's documented defaults, held fixed (its dynamic threshold depends on what ran before)
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    assert mallopt(memory.M_MMAP_THRESHOLD, 128 * 1024) == 1 and mallopt(memory.M_TRIM_THRESHOLD, 128 * 1024) == 1
def churn():  # a round's fresh tensors: six of about 1 MB, freed at its end
    held = [torch.ones(100, 2410) for _ in range(6)]
    return sum(float(t[0, 0]) for t in held)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    env = {k: v for k, v in __import__("os").environ.items() if k not in memory.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_rounds_of_fresh_tensors_stop_faulting_in_new_pages():
    plain, kept = _page_faults("glibc-defaults"), _page_faults("kept")
    assert kept * 5 < plain, (plain, kept)  # measured: about 70,800 minor faults against 2,100-3,800


def test_the_users_own_glibc_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert memory.keep_freed_memory() is False


@pytest.mark.parametrize("engine, keep, kept", [("vectorized", True, True), ("vectorized", False, False),
                                               ("serial", True, False)])
def test_the_vectorized_engine_keeps_freed_memory_when_configured(monkeypatch, engine, keep, kept):
    """Only the vectorized engine: the serial one's convolutions ran slower with it (W3)."""
    from fedloom import builders

    calls = []
    monkeypatch.setattr(builders, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = load_config(None, ["model.name=logistic", "data.n_clients=4", f"engine.name={engine}",
                             f"engine.keep_freed_memory={str(keep).lower()}"])
    data = builders.build_data(cfg)
    builders.build_engine(cfg, builders.build_model_for(builders.sized_to(cfg, data), data), data)
    assert calls == ([1] if kept else [])
