"""The one loop every mode runs: rounds, evaluation, metrics, progress,
checkpoints and resume, Ctrl-C and SIGTERM, the summary and the report.

``run(config)`` is the Python entry point behind ``fedloom run``; ``drive(round)``
plays any round object (``fedloom.rounds``): federated, decentralized, or the
deployment's coordinator. The runner owns the state tree between rounds and
checkpoints it (``fedloom.checkpoint``); ``run(resume=RUN_DIR)`` continues an
interrupted or killed run and ends where an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import Tensor, nn

from fedloom import checkpoint
from fedloom.builders import GivenParts
from fedloom.config import ExperimentConfig, load_config
from fedloom.data.given import GIVEN, as_datasets
from fedloom.progress import RoundProgress, central_metric
from fedloom.rounds import Round, build_round
from fedloom.tracking import RunDir, render_report
from fedloom.tracking.exporters import Exporters
from fedloom.tracking.rundir import CONFIG, DISK_ERRORS, SUMMARY_KEYS, SUMMARY_PREFIXES

SLOW_ROUND_S = 1.0  # without checkpoint.every, a round slower than this is checkpointed


@dataclass
class RunResult:
    """What ``fedloom.run`` returns: the config, the trained model and its flat parameters, the per-round
    history, the summary and the run directory."""

    config: ExperimentConfig
    model: nn.Module
    params: Tensor
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None

    def __repr__(self) -> str:
        # short: the default one prints every round's record
        s = self.summary
        key = central_metric(self.final)
        metric = f", {key}={self.final[key]:.4g}" if key else ""
        return (f"RunResult(name={s.get('name', self.config.name)!r}, status={s.get('status')!r}, "
                f"rounds={s.get('rounds_done', len(self.history))}{metric}, run_dir={self.run_dir})")

    def to_pandas(self) -> "pandas.DataFrame":  # noqa: F821
        """The history, one row per round (pandas is imported only here)."""
        import pandas

        return pandas.DataFrame(self.history)

    @property
    def final(self) -> dict[str, Any]:
        """The last evaluated values of every metric."""
        merged: dict[str, Any] = {}
        for record in self.history:
            merged.update(record)
        return merged


def run(config: str | Path | dict | ExperimentConfig | None = None, overrides: list[str] = (),
        resume: str | Path | None = None, data: Any = None, model: Callable[..., nn.Module] | None = None,
        into: str | Path | None = None) -> RunResult:
    """Run an experiment to the end (or to Ctrl-C, keeping what was written); with ``resume``,
    continue the run directory's run from its checkpoint (``overrides`` apply to its saved config).

    ``data`` (a fedloom Dataset or (train, test) pair, a dict of arrays, a torch Dataset, a Hugging Face
    Dataset) and ``model`` (an nn.Module class or a function returning one, called with the model
    options and, where it names them, input_shape and n_classes) replace data.dataset and model.name;
    resuming such a run needs them again. ``into`` writes the run into exactly that directory (made if
    missing, refused if it holds a run) instead of ``output.dir/<name>-<timestamp>``: a sweep's runs."""
    given = GivenParts(None if data is None else as_datasets(data), model)
    named = [f"data.dataset={GIVEN}"] * (data is not None) + [f"model.name={GIVEN}"] * (model is not None)
    cfg = load_config(Path(resume) / CONFIG if resume else config, [*named, *overrides])
    return drive(build_round(cfg, given), resume, into=into)


class RunDirError(OSError):
    """The run directory cannot be written (disk full, I/O error); the message names it."""


class RunFailed(RuntimeError):
    """The run stopped because no round could use any update, or a round crashed; the run directory
    is complete (checkpoint of the last complete round, metrics, model, summary), so it can be resumed."""

    def __init__(self, message: str, result: RunResult):
        super().__init__(message)
        self.result = result



def drive(round_: Round, resume: str | Path | None = None,
          on_round: Callable[[dict[str, Any]], None] | None = None, into: str | Path | None = None) -> RunResult:
    """Play ``round_``'s rounds from the start, or from ``resume``'s checkpoint, to the end."""
    # built first: a missing exporter library stops the run before its directory is made
    exporters = Exporters.build(round_.cfg) if round_.cfg.output.save or resume is not None else Exporters()
    run_dir, state, history = _open(round_, resume, into)
    try:
        with _disk_errors(run_dir):
            if run_dir:
                exporters.start(round_.cfg, run_dir.path, history, resumed=resume is not None)
            state, status, crash = _loop(round_, state, history, run_dir, on_round, exporters)
            with signals_ignored():  # a second Ctrl-C must not cut the final writes short
                result = _finish(round_, state, history, run_dir, status, exporters)
    finally:
        exporters.close()  # whatever stopped the run (a full disk, an error in the final writes)
    kept = f"; everything so far is kept in {run_dir.path} (fedloom run --resume continues)" if run_dir else ""
    done = result.summary["rounds_done"]
    if status == "failed":
        raise RunFailed(f"stopped after round {done}: no update was usable in {round_.cfg.max_failed_rounds} "
                        "rounds in a row (every one rejected as NaN/Inf or malformed, or too few by the "
                        f"deadline: deploy.min_clients){kept}", result)
    if crash is not None:
        raise RunFailed(f"round {done + 1} crashed ({type(crash).__name__}: {crash}){kept}", result) from crash
    return result


def _loop(round_: Round, state: dict, history: list[dict], run_dir: RunDir | None,
          on_round: Callable[[dict[str, Any]], None] | None,
          exporters: Exporters) -> tuple[dict, str, Exception | None]:
    """Rounds to the end, Ctrl-C/SIGTERM, too many rounds in a row without a usable update, or a crash
    (a round that raised: the state of the last complete round is returned, with the error)."""
    cfg = round_.cfg
    started = time.perf_counter() - state["wall_seconds"]
    failed_in_a_row = 0
    try:
        with signals_interrupt(), RoundProgress(cfg.rounds, state["round"], cfg.output.progress,
                                                 cfg.output.progress_every) as bar:
            for r in range(state["round"] + 1, cfg.rounds + 1):
                state, record = _play(round_, state, r, started)
                history.append(record)
                if run_dir:
                    run_dir.append_metrics(record)
                    exporters.round(record)
                    if _checkpoint_due(cfg, record):
                        checkpoint.save(run_dir.path / checkpoint.CHECKPOINT, state)
                bar.update(record)
                if on_round:
                    on_round(record)
                failed_in_a_row = failed_in_a_row + 1 if _nothing_usable(record) else 0
                if failed_in_a_row >= cfg.max_failed_rounds:
                    return state, "failed", None
                if record.get("done"):  # mode = "simultaneous": every task reached its target
                    break
    except KeyboardInterrupt:
        return state, "interrupted", None
    except OSError as err:
        if err.errno in DISK_ERRORS:
            raise  # nothing more can be written: _disk_errors says so
        return state, "crashed", err
    except Exception as err:  # a worker lost for good, a bug: keep the run directory complete and resumable
        return state, "crashed", err
    return state, "completed", None


def _nothing_usable(record: dict) -> bool:
    """Every sampled client's update was rejected, or a deployed round failed (too few updates by its
    deadline): a federated round that left the model as it was."""
    rejected = record.get("n_sampled", 0) > 0 and record.get("n_rejected") == record["n_sampled"]
    return rejected or bool(record.get("round_failed"))


@contextlib.contextmanager
def _disk_errors(run_dir: RunDir | None) -> Iterator[None]:
    """A full or failing disk stops the run with one message naming the directory; what was written
    before (the last complete checkpoint, the metrics lines) stays, and the run can be resumed."""
    try:
        yield
    except OSError as err:
        if run_dir is None or err.errno not in DISK_ERRORS:
            raise
        raise RunDirError(err.errno, f"cannot write the run directory {run_dir.path} ({err.strerror}: "
                          f"{err.filename or 'a file in it'}); the last complete checkpoint and the metrics "
                          f"written so far are kept: free space, then `fedloom run --resume {run_dir.path}`") from None


def _play(round_: Round, state: dict, r: int, started: float) -> tuple[dict, dict]:
    """One round, evaluated when due, timed; the new state knows its round and wall time."""
    cfg = round_.cfg
    began = time.perf_counter()
    state, record = round_.play(state, r)
    if r % cfg.evaluation.every == 0 or r == cfg.rounds or record.get("done"):
        record.update(round_.evaluate(state))
    record["round_seconds"] = time.perf_counter() - began
    record["wall_seconds"] = time.perf_counter() - started
    virtual = state.get("virtual_seconds", 0.0)
    if "round_virtual_seconds" in record:  # the virtual clock: a round timed by a system model
        virtual += record["round_virtual_seconds"]
        record["virtual_seconds"] = virtual
    return {**state, "round": r, "wall_seconds": record["wall_seconds"], "virtual_seconds": virtual}, record


def fresh_state(round_: Round) -> dict:
    """The state tree before round 1: the round's own, the round counter and both clocks."""
    return {**round_.init_state(), "round": 0, "wall_seconds": 0.0, "virtual_seconds": 0.0}


class Stepper:
    """Rounds played one at a time from Python (a notebook, a profiler): ``.round(r)`` plays and
    evaluates round r as the runner would and keeps the new state tree in ``.state``; every other
    attribute is the round object's (its data, model, engine, pipeline)."""

    def __init__(self, round_: Round):
        self.round_ = round_
        self.state = fresh_state(round_)
        self.started = time.perf_counter()

    def round(self, r: int) -> dict[str, Any]:
        """Play and evaluate round ``r``; returns its metrics record."""
        self.state, record = _play(self.round_, self.state, r, self.started)
        return record

    def __getattr__(self, name: str) -> Any:
        return getattr(self.round_, name)


def _checkpoint_due(cfg: ExperimentConfig, record: dict) -> bool:
    every = cfg.checkpoint.every
    return record["round"] % every == 0 if every else record["round_seconds"] > SLOW_ROUND_S


def _open(round_: Round, resume: str | Path | None, into: str | Path | None) -> tuple[RunDir | None, dict, list[dict]]:
    """The run directory, the state to start from and the records so far: a fresh run, or
    ``resume``'s checkpoint with the metrics cut back to it (a killed run may have written
    rounds after its last checkpoint, and a torn last line)."""
    cfg = round_.cfg
    fresh = fresh_state(round_)
    if resume is not None:
        run_dir = RunDir(Path(resume))
        checkpoint.remove_orphans(run_dir.path)
        saved = run_dir.path / checkpoint.CHECKPOINT
        state = checkpoint.load(saved) if saved.is_file() else fresh
        return run_dir, state, run_dir.truncate_metrics(state["round"])
    if not cfg.output.save:
        return None, fresh, []
    run_dir = RunDir.create(cfg.output.dir, cfg.name) if into is None else RunDir.fresh(into)
    run_dir.write_config(cfg.to_dict())
    run_dir.write_partition(round_.data.stats())
    if (graph := round_.graph_record()) is not None:
        run_dir.write_graph(graph)
    return run_dir, fresh, []


def _finish(round_: Round, state: dict, history: list[dict], run_dir: RunDir | None, status: str,
            exporters: Exporters) -> RunResult:
    """The last checkpoint, the final model, the summary and the report, then the exporters' ends."""
    cfg = round_.cfg
    model = round_.final_model(state)
    result = RunResult(cfg, model, round_.final_params(state).clone(), history, run_dir=run_dir and run_dir.path)
    result.summary = {**_summary(cfg, result, status, round_.engine_name), **round_.describe(state)}
    if run_dir:
        checkpoint.save(run_dir.path / checkpoint.CHECKPOINT, state)
        run_dir.save_model({k: v.detach().cpu() for k, v in model.state_dict().items()})
        _note_tracking_errors(result.summary, exporters)
        run_dir.write_summary(result.summary)
        render_report(run_dir.path)
        exporters.finish(result.summary, run_dir.path)
        if _note_tracking_errors(result.summary, exporters):  # an exporter failed at its end
            run_dir.write_summary(result.summary)
    return result


def _note_tracking_errors(summary: dict[str, Any], exporters: Exporters) -> bool:
    """The exporters' errors as the summary's ``tracking_errors``; True when that changed it."""
    if exporters.errors == summary.get("tracking_errors", {}):
        return False
    summary["tracking_errors"] = dict(exporters.errors)
    return True


def _summary(cfg: ExperimentConfig, result: RunResult, status: str, engine: str) -> dict[str, Any]:
    final = result.final
    algorithm = cfg.decentralized.algorithm if cfg.mode == "decentralized" else cfg.algorithm.name
    return {"name": cfg.name, "mode": cfg.mode, "status": status, "rounds_done": _rounds_done(result.history),
            "rounds": cfg.rounds, "algorithm": algorithm, "dataset": cfg.data.dataset, "engine": engine,
            **{k: v for k, v in final.items() if k.rpartition("/")[2].startswith(SUMMARY_PREFIXES)},  # '<task>/...' too
            **{k: final[k] for k in SUMMARY_KEYS if k in final},
            **_time_to_target(cfg, result.history),
            "run_dir": str(result.run_dir) if result.run_dir else None}


def _time_to_target(cfg: ExperimentConfig, history: list[dict]) -> dict[str, Any]:
    """With evaluation.target_accuracy: the first evaluated round whose central_accuracy reached it, its
    wall seconds and (with a system model) virtual seconds; None when no round did."""
    target = cfg.evaluation.target_accuracy
    if target is None:
        return {}
    for record in history:
        if record.get("central_accuracy", -1.0) >= target:
            reached = {k: record[k] for k in ("round", "wall_seconds", "virtual_seconds") if k in record}
            return {"time_to_target": {"target_accuracy": target, **reached}}
    return {"time_to_target": None}


def _rounds_done(history: list[dict]) -> int:
    return history[-1]["round"] if history else 0


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM stops the run like Ctrl-C does: the run directory is completed, not abandoned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM inside the block (main thread only), so the final writes are not cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
