"""A multi-node Ray cluster on this machine, started the way a user starts one (``ray start --head``, then
``ray start --address`` for each further node, with token authentication, Ray's default): for the tests and
benchmarks that need the Ray engine on real separate nodes.

Each node is a ``ray start --block`` process in its own session, so every process of the node (its raylet,
object store, workers) shares that session id: :func:`session_memory` sums their proportional set sizes,
which counts shared memory (the object store) once. Each node has its own temporary directory, which keeps
its address out of /tmp/ray, where a plain ``ray.init()`` elsewhere would find it and join.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

START_TIMEOUT_S = 180.0


@dataclass
class LocalCluster:
    """A running cluster: its address, the environment a process needs to join it (the token), and its
    nodes' ``ray start`` processes (head first)."""

    address: str
    env: dict[str, str]
    nodes: list[subprocess.Popen]


@contextlib.contextmanager
def local_cluster(n_nodes: int, logs: Path, cpus_per_node: int = 1,
                  object_store_bytes: int = 100_000_000) -> Iterator[LocalCluster]:
    """Start ``n_nodes`` Ray nodes here, wait until all are alive, and stop them all on exit; each node
    logs into ``logs``/node<i>.log."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    node_args = [f"--num-cpus={cpus_per_node}", f"--object-store-memory={object_store_bytes}"]
    cluster = LocalCluster(address, env, [])
    try:
        for i in range(n_nodes):
            role = ["--head", f"--port={port}", "--include-dashboard=false"] if i == 0 else [f"--address={address}"]
            cluster.nodes.append(_start([*role, *node_args], env, logs / f"node{i}.log"))
            _wait_for_nodes(cluster, i + 1, logs / f"node{i}.log")
        yield cluster
    finally:
        for node in reversed(cluster.nodes):  # `ray start --block` stops its node's processes on SIGTERM
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=60)
            shutil.rmtree(next(a for a in node.args if a.startswith("--temp-dir=")).partition("=")[2],
                          ignore_errors=True)


def session_memory(session: int) -> int:
    """Bytes of memory the processes of ``session`` hold: the sum of their proportional set sizes (Pss), which
    counts pages they share, like the object store's, once in all."""
    total = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit() and _session_of(pid) == session:
            total += process_memory(int(pid))
    return total


def _session_of(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # the process is gone
        return None
    return int(stat.rpartition(")")[2].split()[3])  # after the command name: state, ppid, pgrp, session


def process_memory(pid: int) -> int:
    """Bytes of memory process ``pid`` holds, its proportional set size (0 once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("Pss:")), 0)


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    temp_dir = tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    ray = Path(sys.executable).with_name("ray")
    with open(log, "w") as out:
        return subprocess.Popen([str(ray), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                                 *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_nodes(cluster: LocalCluster, n: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while _alive_nodes(cluster) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray node {n} did not come up in {START_TIMEOUT_S:g} s:\n{log.read_text()[-2000:]}")


def _alive_nodes(cluster: LocalCluster) -> int:
    probe = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))" % cluster.address)
    done = subprocess.run([sys.executable, "-c", probe], env=cluster.env, capture_output=True, text=True,
                          timeout=120)
    return int(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
