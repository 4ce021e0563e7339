"""Grid sweeps (``fedloom sweep``): every combination of grid values and seeds is one run, in its own
fixed directory under the sweep directory, played by a pool of local processes (or as Ray tasks when
the config sets ``engine.ray_address``). A rerun of the same sweep skips the runs whose summary says
completed (or failed: a result of the config too) and continues the others from their checkpoints
(``fedloom run --resume``), so killing a sweep loses at most the rounds since each run's last
checkpoint. ``sweep.json`` records the arguments; a rerun with other ones is refused. The sweep ends
with a table of mean and sample standard deviation over seeds per grid point (summary.csv,
summary.md) and the central metric against round, a mean line and a +-1 std band per grid point.

Local runs are spawned processes (a fresh interpreter each), so a script calling ``sweep()`` needs
the usual ``if __name__ == "__main__":`` guard of multiprocessing."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedloom.config import ConfigError, load_config
from fedloom.tracking.compare import metric_keys, write_csv, write_markdown
from fedloom.tracking.rundir import CONFIG, SUMMARY, to_json, write_text_atomic

SPEC = "sweep.json"
FINISHED = ("completed", "failed")  # rerunning either gives the same result; the others are continued
MAX_NAME = 150  # characters of a run directory's name before it is shortened and hashed


@dataclass(frozen=True)
class Combination:
    """One run of the sweep: a grid point (key, value as given) and a seed, and its directory's name."""

    point: tuple[tuple[str, str], ...]
    seed: int
    name: str

    def overrides(self) -> list[str]:
        """The overrides that make this run: its grid point, seed and name, saved and without a progress bar."""
        return [*(f"{k}={v}" for k, v in self.point), f"seed={self.seed}", f"name={json.dumps(self.name)}",
                "output.save=true", "output.progress=false"]


@dataclass
class SweepResult:
    """A sweep's outcome: which runs ran, were skipped (finished earlier) or failed, the summary table and the
    files written."""

    out: Path
    combinations: list[Combination]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, str | None] = field(default_factory=dict)
    interrupted: bool = False
    columns: list[str] = field(default_factory=list)  # the table printed: mean +- std cells
    rows: list[list[Any]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``key=v1,v2,...`` per entry (values split at commas) into key -> values, in the order given."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {spec!r} is not of the form key=value1,value2 "
                              "(e.g. algorithm.name=fedavg,fedprox)")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; give all its values in one: {key}=a,b,c")
        if key == "seed":
            raise ConfigError("seeds are not a grid key: give --seeds 0,1,2")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds 0,1,2``; ConfigError unless they are distinct whole numbers."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give whole numbers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give distinct whole numbers separated by commas, e.g. 0,1,2")
    return seeds


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


def combinations(grid: dict[str, list[str]], seeds: list[int]) -> list[Combination]:
    """The grid's product times the seeds, each named ``key=value,...,seed=N`` (filesystem-safe); names
    that would clash after cleaning, or are too long, get a hash of the exact values."""
    points = list(itertools.product(*[[(k, v) for v in values] for k, values in grid.items()]))
    raw = [(point, seed, ",".join([*(f"{_safe(k)}={_safe(v)}" for k, v in point), f"seed={seed}"]))
           for point in points for seed in seeds]
    names = [name for *_, name in raw]
    combos = []
    for point, seed, name in raw:
        if names.count(name) > 1 or len(name) > MAX_NAME:
            digest = hashlib.sha1(repr((point, seed)).encode()).hexdigest()[:8]
            name = f"{name[:MAX_NAME]}-{digest}"
        combos.append(Combination(tuple(point), seed, name))
    return combos


def check_spec(out: Path, spec: dict[str, Any]) -> None:
    """Write ``sweep.json``, or refuse a sweep directory that other arguments made."""
    path = out / SPEC
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        differs = [what for key, what in (("base", "the config (with --set and key=value overrides)"),
                                          ("grid", "--grid"), ("seeds", "--seeds")) if before.get(key) != spec[key]]
        if differs:
            raise ConfigError(f"{out} holds a sweep made with other arguments ({', '.join(differs)} differ); rerun "
                              f"it with the arguments in {path} to continue it, or give another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, to_json(spec, indent=2) + "\n")


def status_of(run_dir: Path) -> str | None:
    """The summary's status; None while there is no (readable) summary."""
    try:
        return json.loads((run_dir / SUMMARY).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def run_one(run_dir: str, config: str | None, overrides: list[str]) -> tuple[str | None, str]:
    """One combination, in whatever process runs it: continue the run its directory holds, else start
    it there. Returns (status, message); exceptions become messages, so one bad run ends only itself."""
    from fedloom.runner import RunFailed, run

    try:
        if (Path(run_dir) / CONFIG).is_file():
            result = run(resume=run_dir, overrides=["output.progress=false"])
        else:
            result = run(config, overrides, into=run_dir)
        return result.summary["status"], ""
    except RunFailed as failed:
        return failed.result.summary["status"], str(failed)
    except KeyboardInterrupt:
        return "interrupted", "interrupted before its first round"
    except Exception as err:  # noqa: BLE001 - reported with the run's name, the sweep goes on
        return None, f"{type(err).__name__}: {err}"


def _worker_init(threads: int) -> None:
    """Ctrl-C reaches the whole process group: workers leave it to the sweep, which stops them with
    SIGTERM (a run then ends as interrupted, keeping its directory resumable). Threads are shared out
    so N runs at a time do not oversubscribe the cores."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)


class LocalPool:
    """Runs in spawned processes (a clean interpreter each, nothing forked from the caller's threads)."""

    def __init__(self, jobs: int):
        threads = max(1, (os.cpu_count() or 1) // jobs)
        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init, initargs=(threads,))

    def submit(self, *args: Any) -> Future:
        """Start one run (``run_one``'s arguments) in a worker process."""
        return self.pool.submit(run_one, *args)

    def stop(self) -> None:
        """Cancel the waiting runs and end the worker processes (Ctrl-C)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():  # the pool's workers: this process starts no others
            child.terminate()
        self.pool.shutdown(wait=True)

    def close(self) -> None:
        """Wait for the workers to finish and shut the pool down."""
        self.pool.shutdown(wait=True)


class RayPool:
    """Runs as Ray tasks of one CPU on the cluster at ``address``; run directories must be on a file
    system every node sees (the sweep directory is read back here)."""

    def __init__(self, address: str):
        from fedloom.engines.ray_engine import connect, import_ray

        self.ray = import_ray()
        connect(self.ray, address)
        self.remote = self.ray.remote(num_cpus=1, max_retries=0)(run_one)
        self.refs: list[Any] = []

    def submit(self, *args: Any) -> Future:
        """Start one run as a Ray task."""
        ref = self.remote.remote(*args)
        self.refs.append(ref)
        return ref.future()

    def stop(self) -> None:
        """Cancel the submitted tasks (their runs end as interrupted)."""
        for ref in self.refs:
            self.ray.cancel(ref)  # a KeyboardInterrupt in the task: the run ends as interrupted

    def close(self) -> None:
        """Nothing to release: Ray's tasks end on their own."""
        pass


def sweep(config: str | Path | None, grid: dict[str, list[str]], seeds: list[int] | None = None,
          overrides: list[str] = (), jobs: int | None = None, out: str | Path | None = None,
          report: Callable[[str], None] = lambda line: None) -> SweepResult:
    """Run what the sweep directory (default ``sweeps/<config name>``) lacks, then write its table and plot.
    Every combination's config is checked before anything runs; ``report`` gets a line per finished run."""
    overrides = list(overrides)
    base = load_config(config, overrides)
    seeds = list(seeds) if seeds else [base.seed]
    combos = combinations(grid, seeds)
    for combo in combos:
        try:
            load_config(config, [*overrides, *combo.overrides()])
        except ConfigError as err:
            raise ConfigError(f"sweep run {combo.name}: {err}") from None
    out = Path(out or Path("sweeps") / base.name).resolve()
    config = str(Path(config).resolve()) if config else None  # runs may start elsewhere (Ray)
    check_spec(out, {"config": config, "base": base.to_dict(), "grid": grid, "seeds": seeds})
    result = SweepResult(out, combos)
    todo = [c for c in combos if status_of(out / c.name) not in FINISHED]
    result.skipped = [c.name for c in combos if c not in todo]
    if todo:
        address = base.engine.ray_address
        jobs = jobs or (len(todo) if address else 1)
        pool = RayPool(address) if address else LocalPool(min(jobs, len(todo)))
        _execute(pool, todo, jobs, config, overrides, result, report)
    result.statuses = {c.name: status_of(out / c.name) for c in combos}
    summarize(result, list(grid))
    return result


def _execute(pool: LocalPool | RayPool, todo: list[Combination], jobs: int, config: str | None,
             overrides: list[str], result: SweepResult, report: Callable[[str], None]) -> None:
    """Every run, or Ctrl-C/SIGTERM: the running ones are stopped (each ends as interrupted, its directory
    complete, and the next sweep continues it) and the sweep waits for their last writes."""
    from fedloom.runner import signals_ignored, signals_interrupt

    try:
        with signals_interrupt():
            result.interrupted = True  # until the last run has ended
            _schedule(pool, todo, jobs, config, overrides, result, report)
            result.interrupted = False
            pool.close()
    except KeyboardInterrupt:
        with signals_ignored():  # a second Ctrl-C must not leave runs half-written
            pool.stop()


def _schedule(pool: LocalPool | RayPool, todo: list[Combination], jobs: int, config: str | None,
              overrides: list[str], result: SweepResult, report: Callable[[str], None]) -> None:
    """At most ``jobs`` runs at a time; a line to ``report`` as each ends."""
    pending, running = list(todo), {}
    while pending or running:
        while pending and len(running) < jobs:
            combo = pending.pop(0)
            future = pool.submit(str(result.out / combo.name), config, [*overrides, *combo.overrides()])
            running[future] = combo, time.perf_counter()
            result.ran.append(combo.name)
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            combo, began = running.pop(future)
            status, message = _outcome(future)
            if message and status != "completed":
                result.errors[combo.name] = message
            said = f": {message}" if message else ""
            report(f"[{len(todo) - len(pending) - len(running)}/{len(todo)}] {combo.name}: "
                   f"{status or 'error'} ({time.perf_counter() - began:.1f} s){said}")


def _outcome(future: Future) -> tuple[str | None, str]:
    try:
        return future.result()
    except BaseException as err:  # a worker process that died (killed, out of memory), a cancelled task
        return None, f"{type(err).__name__}: {err}"


def summarize(result: SweepResult, grid_keys: list[str]) -> None:
    """summary.csv (mean and std columns), summary.md and the printed rows (mean +- std cells) over the
    completed runs of each grid point, and the central metric's band plot."""
    from fedloom.tracking.compare import load_run
    from fedloom.tracking.plots import CENTRAL_METRICS, plot_bands

    groups: dict[tuple, list] = {}
    for combo in result.combinations:
        runs = groups.setdefault(combo.point, [])
        if result.statuses.get(combo.name) == "completed":
            runs.append(load_run(result.out / combo.name))
    keys = metric_keys([run.summary for runs in groups.values() for run in runs])
    stats = {point: [_mean_std([run.summary.get(k) for run in runs]) for k in keys] for point, runs in groups.items()}
    head = [*grid_keys, "runs"]
    firsts = {point: [*(v for _, v in point), len(runs)] for point, runs in groups.items()}
    csv_rows = [[*firsts[p], *itertools.chain.from_iterable(stats[p])] for p in groups]
    csv_columns = [*head, *(f"{k}_{s}" for k in keys for s in ("mean", "std"))]
    result.columns = [*head, *keys]  # cells: mean ± std
    result.rows = [[*firsts[p], *(_cell(*ms) for ms in stats[p])] for p in groups]
    out = result.out
    result.written = [write_csv(out / "summary.csv", csv_columns, csv_rows),
                      write_markdown(out / "summary.md", result.columns, result.rows)]
    curves = {", ".join(f"{k}={v}" for k, v in point) or "all runs": [run.rows for run in runs]
              for point, runs in groups.items()}
    for key, (quantity, ylabel, scale) in CENTRAL_METRICS.items():
        if (plot := plot_bands(curves, key, quantity, ylabel, scale, out / f"{key}.png")) is not None:
            result.written.append(plot)


def _mean_std(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the numbers (None with none; std None with one)."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numbers:
        return None, None
    return statistics.fmean(numbers), statistics.stdev(numbers) if len(numbers) > 1 else None


def _cell(mean: float | None, std: float | None) -> str | None:
    from fedloom.tracking.report import format_value

    if mean is None:
        return None
    return format_value(mean) + ("" if std is None else f" ± {std:.3g}")
