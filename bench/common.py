"""The benchmark harness every bench/w*.py workload command uses.

One workload, every contestant, one run, the same machine:

- ``prepare`` builds the workload's federated data with fedloom's own
  partitioner (same seed, same code as ``fedloom run``) and writes it to an
  .npz under bench/.cache/: all examples, each client's training indices, the
  global test set, the initial model weights and the client ids sampled each
  round. Every contestant trains exactly these clients, on exactly these
  examples, from exactly these weights.
- every contestant runs as a subprocess with a small driver (bench/peers/),
  with OMP/MKL threads = 1 and ``torch.set_num_threads(1)``; Flower and pfl run
  from their own virtual environments under bench/.venvs/ (created here,
  ``pip install torch==2.13.0`` first, then the peer package). A contestant that
  cannot be installed or run is recorded with its error and the rest go on.
- the parent measures wall time (start of the subprocess to its exit, so it
  includes interpreter start-up, imports and data loading) and peak resident
  memory of the contestant's whole process tree (sampled from /proc every 0.1 s);
  each driver reports its own per-round times and final test accuracy.
- results: bench/results/<workload>.json, bench/results/<workload>.png and a
  markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"
CACHE = BENCH / ".cache"
VENVS = BENCH / ".venvs"
FEDLOOM_PYTHON = sys.executable  # the interpreter with fedloom installed runs the harness
TORCH_PIN = "torch==2.13.0"  # the CPU build on this disk; a bare torch pulls a multi-GB CUDA build

PEER_PACKAGES = {
    "flower": ["flwr[simulation]==1.42.0"],  # the current release
    "flower-1.22": ["flwr[simulation]==1.22.0"],  # the release the earlier tables measured
    "pfl": ["pfl==0.6.0"],
}
FLOWER_IMPORT = "import flwr, ray; print(flwr.__version__)"
PEER_IMPORT = {"flower": FLOWER_IMPORT, "flower-1.22": FLOWER_IMPORT, "pfl": "import pfl; print(pfl.__version__)"}
# On a GPU the peers get their own venv (bench/.venvs/<peer>-cuda) with torch from PyPI itself: there the
# Linux x86-64 wheel of torch==2.13.0 is the CUDA build (about 2.5 GB with its nvidia-* wheels), whatever
# index (a CPU-only one) pip is configured with elsewhere
PYPI = "https://pypi.org/simple"
CUDA_CHECK = "; import torch; assert torch.cuda.is_available(), 'torch ' + torch.__version__ + ' sees no CUDA device'"

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0",
              "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
RESULT_PREFIX = "BENCH-RESULT "


# ----------------------------------------------------------------------------- workloads

@dataclass
class Workload:
    name: str
    title: str
    dataset: str
    model: str
    n_clients: int
    clients_per_round: int
    rounds: int
    lr: float
    batch_size: int
    epochs: int
    partition: dict[str, Any]
    hidden: list[int] | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def fedloom_config(self) -> dict[str, Any]:
        model = {"name": self.model, "options": {"hidden": self.hidden} if self.hidden else {}}
        data = {"dataset": self.dataset, "n_clients": self.n_clients, "client_test_fraction": 0.0,
                "options": dict(self.data_options)}
        return {
            "name": self.name, "seed": self.seed, "rounds": self.rounds,
            "data": data, "partition": dict(self.partition), "model": model,
            "client": {"optimizer": "sgd", "lr": self.lr, "momentum": 0.0, "epochs": self.epochs,
                       "batch_size": self.batch_size},
            "sampling": {"clients_per_round": self.clients_per_round},
            "evaluation": {"every": self.rounds, "federated": False},
            "engine": {"name": "vectorized"},
            "output": {"save": False, "progress": False},
        }


def data_key(w: Workload) -> str:
    """Names the partitioned data: the data settings plus the source of fedloom's data code
    (a change there gives new data, never a stale cache that fedloom itself would not rebuild)."""
    import hashlib

    import fedloom.data

    h = hashlib.sha256()
    cfg = w.fedloom_config()
    h.update(json.dumps([cfg["seed"], cfg["data"], cfg["partition"]], sort_keys=True).encode())
    for src in sorted(Path(fedloom.data.__file__).parent.glob("*.py")):
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def prepare(w: Workload) -> Path:
    """Write the workload's data (fedloom's partition) and spec in a subprocess, so the
    harness itself never holds the data; return the spec path."""
    out = subprocess.run([FEDLOOM_PYTHON, __file__, "--prepare", json.dumps(asdict(w))], capture_output=True,
                         text=True, env={**os.environ, **THREAD_ENV, "PYTHONPATH": fedloom_path()})
    if out.returncode != 0:
        raise RuntimeError(f"preparing {w.name} failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def fedloom_path(*first: str) -> str:
    """PYTHONPATH for fedloom's interpreter: this checkout's fedloom (the code fedloom_commit names, not
    another install of it), then the caller's PYTHONPATH (wheels unpacked aside on a bare machine)."""
    return os.pathsep.join([*first, str(BENCH.parent), *filter(None, [os.environ.get("PYTHONPATH")])])


def _prepare_here(w: Workload) -> Path:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from fedloom.config import load_config
    from fedloom.builders import build_data, build_model_for
    from fedloom.rounds.federated import sample_clients

    CACHE.mkdir(parents=True, exist_ok=True)
    cfg = load_config(w.fedloom_config())
    data_npz = CACHE / f"data-{w.dataset}-{data_key(w)}.npz"
    summary_path = data_npz.with_suffix(".json")
    if data_npz.exists() and summary_path.exists():
        with np.load(data_npz) as archive:
            n_classes, sizes = int(archive["n_classes"]), np.diff(archive["offsets"])
            input_shape = list(archive["x"].shape[1:])
        summary = json.loads(summary_path.read_text())
    else:
        data = build_data(cfg)
        sizes = np.array([len(i) for i in data.train_idx])
        n_classes, input_shape = data.n_classes, list(data.input_shape)
        np.savez(data_npz, x=data.x.numpy(), y=data.y.numpy(), train_idx=torch.cat(list(data.train_idx)).numpy(),
                 offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), x_test=data.x_test.numpy(),
                 y_test=data.y_test.numpy(), n_classes=np.int64(n_classes))
        summary = {"train_examples": int(sizes.sum()), "test_examples": int(len(data.y_test)),
                   "client_size_min": int(sizes.min()), "client_size_median": float(np.median(sizes)),
                   "client_size_max": int(sizes.max()), "input_shape": input_shape}
        summary_path.write_text(json.dumps(summary))
        del data
    from types import SimpleNamespace

    # fedloom's own initial model (build_model_for reads only these two attributes of the data)
    model = build_model_for(cfg, SimpleNamespace(input_shape=tuple(input_shape), n_classes=n_classes))
    sampled = np.array([sample_clients(len(sizes), w.clients_per_round, w.seed, r) for r in range(1, w.rounds + 1)],
                       dtype=np.int64)
    steps = w.epochs * -(-sizes[sampled] // w.batch_size)  # [rounds, k] local steps of each sampled client
    npz = CACHE / f"{w.name}.npz"
    np.savez(npz, sampled=sampled, **{f"init/{k}": v.detach().numpy() for k, v in model.state_dict().items()})
    spec = {**asdict(w), "npz": str(npz), "data_npz": str(data_npz), "n_classes": n_classes,
            "fedloom_config": w.fedloom_config(),
            "data_summary": {**summary, "params": int(sum(p.numel() for p in model.parameters())),
                             "local_steps_sum_per_round": steps.sum(1).tolist(),
                             "local_steps_max_per_round": steps.max(1).tolist()}}
    path = CACHE / f"{w.name}.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


# ----------------------------------------------------------------------------- peer environments

def ensure_venv(peer: str, log: list[str], cuda: bool = False) -> tuple[str | None, str | None]:
    """(python of the peer's venv, error). Creates bench/.venvs/<peer> (with ``cuda``: <peer>-cuda, a CUDA
    torch from PyPI) on first use."""
    venv = VENVS / (f"{peer}-cuda" if cuda else peer)
    python = venv / "bin" / "python"
    marker = venv / ".bench-installed"
    wanted = json.dumps([TORCH_PIN, *PEER_PACKAGES[peer]] + (["cuda"] if cuda else []))
    check_code = PEER_IMPORT[peer] + (CUDA_CHECK if cuda else "")
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        check = subprocess.run([str(python), "-c", check_code], capture_output=True, text=True)
        if check.returncode == 0:
            return str(python), None
    proxied = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if cuda and not proxied and not reachable("pypi.org", 443):
        # a machine without the internet (the GPU machines here): say so at once rather than let pip retry
        return None, (f"{venv} is not built, and PyPI (pypi.org:443) cannot be reached from this machine, "
                      f"so it cannot be built here (python -m venv, pip install --index-url {PYPI} {TORCH_PIN}, "
                      f"then {' '.join(PEER_PACKAGES[peer])}); {peer} is left out")
    log.append(f"installing {peer} into {venv} ...")
    print(f"[bench] installing {peer} into {venv} (once) ...", file=sys.stderr, flush=True)
    torch_from = ["--index-url", PYPI] if cuda else []
    # PyPI alone for the CUDA venv: a configured find-links or extra index (a CPU wheel house) would offer
    # torch 2.13.0+cpu, which pip ranks above PyPI's 2.13.0
    pip_env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
               "PIP_CONFIG_FILE": os.devnull} if cuda else None
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", *torch_from, TORCH_PIN],
             [str(python), "-m", "pip", "install", "-q", *torch_from, *PEER_PACKAGES[peer], "numpy"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=pip_env)
        if proc.returncode != 0:
            err = _tail(_drop_pip_noise(proc.stderr + proc.stdout), 30)
            return None, f"`{' '.join(cmd[-3:])}` failed (exit {proc.returncode}):\n{err}"
    check = subprocess.run([str(python), "-c", check_code], capture_output=True, text=True)
    if check.returncode != 0:
        return None, f"installed, but the import fails:\n{_tail(check.stderr, 30)}"
    marker.write_text(wanted)
    return str(python), None


def reachable(host: str, port: int, timeout: float = 5.0) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _drop_pip_noise(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "is ignored: it is neither a file nor a directory" not in line)


def _tail(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def peer_version(python: str, peer: str) -> str | None:
    proc = subprocess.run([python, "-c", PEER_IMPORT[peer]], capture_output=True, text=True)
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None


# ----------------------------------------------------------------------------- running a contestant

class TreeRss:
    """Peak summed RSS of a process and all its descendants, sampled from /proc."""

    def __init__(self, pid: int, every: float = 0.1):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
                ppid = int(stat[stat.rfind(")") + 2:].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        total, todo = 0, [self.pid]
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * self._page
            except (OSError, ValueError, IndexError):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def run_contestant(name: str, cmd: list[str], timeout: float, log_path: Path) -> dict[str, Any]:
    """Run one driver; return its result dict plus wall time, peak tree RSS and status."""
    env = {**os.environ, **THREAD_ENV,
           "PYTHONPATH": fedloom_path(str(PEERS)) if cmd[0] == FEDLOOM_PYTHON else str(PEERS)}
    print(f"[bench] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    began, started_unix = time.perf_counter(), time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=str(PEERS),
                                start_new_session=True)
        rss = TreeRss(proc.pid)
        try:
            out, _ = proc.communicate(timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, _ = proc.communicate()
            status = f"timeout after {timeout:.0f} s"
        wall = time.perf_counter() - began
        peak = rss.stop()
        _kill_group(proc.pid)  # anything the driver left behind (Ray)
        log.write("\n--- stdout ---\n" + out)
    result: dict[str, Any] = {}
    for line in out.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
    if status == "ok" and not result:
        status = "no result line"
    if status != "ok":
        result["error"] = _tail(_drop_pip_noise(log_path.read_text()), 25)
    result.update({"name": name, "status": status, "wall_seconds": wall, "started_unix": started_unix,
                   "peak_rss_tree_mb": peak,
                   "command": " ".join(cmd), "log": str(log_path.relative_to(BENCH))})
    times = result.get("round_seconds") or []
    if times:
        result["first_round_seconds"] = times[0]
        result["steady_round_seconds"] = statistics.median(times[1:]) if len(times) > 1 else times[0]
        result["startup_seconds"] = wall - sum(times)
    print(f"[bench] {name}: {status}, wall {wall:.1f} s"
          + (f", steady {result['steady_round_seconds']:.4f} s/round, acc {result.get('accuracy')}" if times else ""),
          file=sys.stderr, flush=True)
    return result


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- the contestants

CONTESTANTS = ["fedloom-vectorized", "fedloom-serial", "plain", "flower", "flower-1.22", "pfl"]


def command(name: str, spec: Path, rounds: int | None, python: str | None = None, extra: list[str] = ()) -> list[str]:
    r = ["--rounds", str(rounds)] if rounds else []
    if name == "fedloom-vmap":  # the vectorized engine with its general step only (engine.fused = "off")
        return [FEDLOOM_PYTHON, str(PEERS / "fedloom_driver.py"), str(spec), "--engine", "vectorized",
                "--fused", "off", *r, *extra]
    if name.startswith("fedloom-"):
        return [FEDLOOM_PYTHON, str(PEERS / "fedloom_driver.py"), str(spec), "--engine", name.split("-", 1)[1], *r,
                *extra]
    if name == "plain" or name.startswith("plain-seed"):
        seed = name.removeprefix("plain-seed") if name != "plain" else "0"
        return [FEDLOOM_PYTHON, str(PEERS / "plain_driver.py"), str(spec), "--shuffle-seed", seed, *r, *extra]
    if name == "one-big-batch":
        return [FEDLOOM_PYTHON, str(PEERS / "plain_driver.py"), str(spec), "--mode", "bigbatch", *r, *extra]
    if name in ("flower", "flower-1.22"):  # one driver: the message API is the same in both releases
        return [python, str(PEERS / "flower_driver.py"), str(spec), *r, *extra]
    if name == "pfl":
        return [python, str(PEERS / "pfl_driver.py"), str(spec), *r, *extra]
    raise ValueError(name)


def run_workload(w: Workload, contestants: list[str], rounds: int | None, timeout: float,
                 extra_args: dict[str, list[str]] | None = None, tag: str | None = None,
                 device: str | None = None, deadline: float | None = None) -> dict[str, Any]:
    """Prepare the data, run every contestant in turn, return the full record. ``device`` (cuda, cuda:N)
    passes --device to every driver and gives the peers their CUDA venvs; past ``deadline`` (a time.time())
    the contestants left are skipped and the one running is cut short."""
    tag = tag or (f"{w.name}-{rounds}r" if rounds and rounds != w.rounds else w.name)
    extra_args = extra_args or {}
    began = time.time()
    load_before = os.getloadavg()
    if rounds:
        w = Workload(**{**asdict(w), "rounds": rounds})
    t = time.perf_counter()
    spec = prepare(w)
    prepare_seconds = time.perf_counter() - t
    results, notes = [], []
    for name in contestants:
        python, left = None, (deadline - time.time()) if deadline else timeout
        if left < 10:
            results.append({"name": name, "status": "skipped: the time budget is spent"})
            continue
        if name in PEER_PACKAGES:
            python, error = ensure_venv(name, notes, cuda=bool(device and device.startswith("cuda")))
            if error:
                results.append({"name": name, "status": "not installed", "error": error})
                print(f"[bench] {name}: not installed: {error}", file=sys.stderr)
                continue
        extra = [*extra_args.get(name, []), *(["--device", device] if device else [])]
        res = run_contestant(name, command(name, spec, None, python, extra), min(timeout, left),
                             CACHE / "logs" / f"{tag}-{name}.log")
        if python:
            res["version"] = peer_version(python, name)
        results.append(res)
    record = {
        "workload": asdict(w), "tag": tag, "data": json.loads(spec.read_text())["data_summary"],
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(), "fedloom_commit": fedloom_commit(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "prepare_seconds": prepare_seconds, "elapsed_seconds": time.time() - began,
        "threads": "OMP/MKL/OPENBLAS_NUM_THREADS=1 and torch.set_num_threads(1) in every process",
        "device": device or "cpu",
        "results": results, "notes": notes,
    }
    add_ratios(record)
    return record


def add_ratios(record: dict[str, Any]) -> None:
    """speedup_vs_X = X's steady round time / this contestant's (above 1: faster than X)."""
    steady = {r["name"]: r.get("steady_round_seconds") for r in record["results"] if r.get("steady_round_seconds")}
    for r in record["results"]:
        mine = r.get("steady_round_seconds")
        r["speedup_vs"] = {other: (t / mine) for other, t in steady.items() if mine and other != r["name"]}
        wall = {o["name"]: o.get("wall_seconds") for o in record["results"] if o.get("status") == "ok"}
        if r.get("status") == "ok":
            r["wall_speedup_vs"] = {o: (t / r["wall_seconds"]) for o, t in wall.items() if o != r["name"]}


def fedloom_commit() -> str:
    """The commit fedloom was measured at, with '+dirty' when fedloom/ has uncommitted changes."""
    root = BENCH.parent

    def git(*args):
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "fedloom") else "")


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


# ----------------------------------------------------------------------------- output

def write_json(path: Path, results: Any, **meta: Any) -> None:
    """A micro-benchmark's results with the machine, the fedloom commit and the load average at
    the end (other work on the machine slows every number down), as ``{"meta", "results"}``."""
    meta = {**meta, "machine": machine(), "fedloom": fedloom_commit(), "loadavg_after": os.getloadavg()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {path}")


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.{digits}g}" if abs(x) < 0.01 else f"{x:.{digits}f}"
    return str(x)


def rows_table(rows: list[dict[str, Any]]) -> str:
    """Rows, one dict each, as a Markdown table with a column for every key any row has (floats to 4 digits)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      *("| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows)])


def markdown(record: dict[str, Any], reference: str = "fedloom-vectorized") -> str:
    w = record["workload"]
    res = record["results"]
    ok = [r for r in res if r.get("round_seconds")]
    others = [r["name"] for r in ok if r["name"] != reference and not r["name"].startswith("plain-seed")]
    head = ["contestant", "wall s (incl. start-up)", "start-up s", "first round s", "steady s/round",
            "peak RSS MiB", "test accuracy", *[f"{reference} speedup vs {o}" for o in others]]
    lines = [f"**{record['tag']}**: {w['title']}, {w['rounds']} rounds — {record['date']}, {record['machine']['cpu']}, "
             f"{record['machine']['cores']} cores, torch {record['machine']['torch']}, "
             f"fedloom {record.get('fedloom_commit', '?')}, {record.get('where', 'one thread each')}; "
             f"load average before/after {record['load_average_before'][0]:.2f}/{record['load_average_after'][0]:.2f}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = next((r for r in ok if r["name"] == reference), None)
    for r in res:
        if not r.get("round_seconds"):
            lines.append(f"| {r['name']} | {r.get('status')} | " + " | ".join("-" for _ in head[2:]) + " |")
            continue
        cells = [r["name"] + (f" {r['version']}" if r.get("version") else ""), fmt(r["wall_seconds"]),
                 fmt(r["startup_seconds"]), fmt(r["first_round_seconds"]), fmt(r["steady_round_seconds"]),
                 fmt(r.get("peak_rss_tree_mb"), 4), fmt(r.get("accuracy"))]
        if r.get("status") != "ok":
            cells[1] += f" ({r['status']})"
        for o in others:
            if ref and r["name"] == o:
                cells.append(f"**{ref['speedup_vs'].get(o, float('nan')):.1f}x**")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_lines(record: dict[str, Any], pairs: list[tuple[str, str, float | None]]) -> list[str]:
    """'a is Nx faster than b (target Mx)' for each (a, b, target) whose both sides ran."""
    steady = {r["name"]: r.get("steady_round_seconds") for r in record["results"]}
    out = []
    for a, b, target in pairs:
        if steady.get(a) and steady.get(b):
            x = steady[b] / steady[a]
            verdict = "" if target is None else (" — target reached" if x >= target else " — target NOT reached")
            out.append(f"- steady round: {a} is {x:.1f}x faster than {b}"
                       + (f" (target {target:g}x){verdict}" if target else ""))
    return out


def limit_lines(record: dict[str, Any], target: float) -> list[str]:
    """How many times the one-big-batch limit fedloom vectorized's steady round takes (W1, W3)."""
    steady = {r["name"]: r.get("steady_round_seconds") for r in record["results"]}
    if not (steady.get("fedloom-vectorized") and steady.get("one-big-batch")):
        return []
    x = steady["fedloom-vectorized"] / steady["one-big-batch"]
    return [f"- steady round: fedloom-vectorized takes {x:.2f}x the one-big-batch limit (target <= {target:g}x)"
            f" — target {'reached' if x <= target else 'NOT reached'}"]


def chart(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in record["results"] if r.get("round_seconds")]
    if not ok:
        return
    names = [r["name"] for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = ["#1f77b4" if n.startswith("fedloom") else "#7f7f7f" for n in names]
    for ax, key, label in [(axes[0], "steady_round_seconds", "steady seconds per round (median, log)"),
                           (axes[1], "wall_seconds", "wall seconds incl. start-up (log)")]:
        values = [r[key] for r in ok]
        bars = ax.bar(names, values, color=colors)
        if max(values) / min(values) > 20:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, max(values) * 1.15)
            label = label.replace(", log)", ")").replace(" (log)", "")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        for bar, v in zip(bars, values):
            ax.annotate(fmt(v), (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{record['tag']}: {record['workload']['title']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(record: dict[str, Any], extra_md: list[str] = ()) -> str:
    """The table, the extra lines and the end of each failed contestant's error."""
    md = markdown(record) + ("\n\n" + "\n".join(extra_md) if extra_md else "")
    failures = [r for r in record["results"] if r.get("status") not in ("ok", None)]
    for r in failures:
        md += f"\n\n{r['name']} ({r['status']}):\n```\n{_tail(r.get('error', ''), 12)}\n```"
    return md


def save(record: dict[str, Any], extra_md: list[str] = ()) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = record["tag"]
    (RESULTS / f"{tag}.json").write_text(json.dumps(record, indent=1))
    chart(record, RESULTS / f"{tag}.png")
    md = report(record, extra_md)
    (RESULTS / f"{tag}.md").write_text(md + "\n")
    return md


def cli(description: str, default_rounds: int | str, contestants: list[str] = CONTESTANTS,
        add_args: Any = None) -> argparse.Namespace:
    """The workload commands' options; ``add_args(parser)`` adds a command's own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(contestants),
                        help=f"comma-separated contestants (default: {','.join(contestants)})")
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds (default {default_rounds})")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per contestant (default %(default)g)")
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in args.only if c not in contestants]
    if unknown:
        parser.error(f"unknown contestant(s) {unknown}; choose from {contestants}")
    return args


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--prepare":
    print(_prepare_here(Workload(**json.loads(sys.argv[2]))))
