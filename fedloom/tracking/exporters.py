"""Exporters ([tracking]): each round's record, as metrics.jsonl gets it, also goes to metrics.csv,
TensorBoard, MLflow or Weights & Biases. Each library is an optional extra, imported only when its
exporter is on; a missing one stops the run before its directory is made, naming the extra.

The run directory stays the record of the run: an exporter that raises is reported once (a warning,
and ``tracking_errors`` in the summary), switched off, and the run goes on. Only a full or failing
disk under an exporter stops the run, as it would have for metrics.jsonl.

Resume. metrics.jsonl is cut back to the checkpoint and the rounds after it are played again, with the
same values (timings aside). Each exporter knows the last round it holds (``done``): the kept records
after it are sent when it starts, and replayed rounds up to it are not sent again.

- csv: rewritten from the kept records, so it always equals metrics.jsonl.
- tensorboard: a new event file with ``purge_step=1`` and every kept record again; TensorBoard's restart
  rule hides every event the earlier sessions wrote, so no step shows twice.
- mlflow: the same MLflow run (its id is in exports.json), set running again; ``done`` is the last step of
  its ``wall_seconds`` history. Params are not logged again (MLflow refuses a changed param).
- wandb: the same run id, ``resume="allow"``; W&B writes one ``offline-run-*`` directory a session (``wandb
  sync`` joins them into one run); ``done`` is the last step in the earlier sessions' .wandb logs, read by
  ``wandb leet inspect`` (W&B keeps only rising steps). A killed session's log may hold fewer rounds than
  it was sent (wandb-core writes it in batches): those are sent again from the kept records.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from fedloom.config import ConfigError, ExperimentConfig, TrackingConfig
from fedloom.tracking.rundir import DISK_ERRORS, METRICS, strict_record, to_json, write_text_atomic

METRICS_CSV = "metrics.csv"
TENSORBOARD = "tensorboard"  # the event files' folder in the run directory
WANDB = "wandb"  # W&B's own folder in the run directory (offline runs, logs)
EXPORTS = "exports.json"  # what a resumed run needs to continue the same exports: the MLflow and W&B run ids
MLFLOW_STORE = "mlflow.db"  # the default store, beside the run directories (one store for every run)
MLFLOW_ARTIFACTS = "mlartifacts"
MLFLOW_STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}  # else FAILED


def _require(module: str, key: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"tracking.{key} = true needs the {extra} package: pip install 'fedloom[{extra}]' "
                          f"(or set tracking.{key} = false); importing {module} failed: {err}") from None


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers (booleans as 0/1) but its round, which is the step."""
    return {k: float(v) for k, v in record.items() if k != "round" and isinstance(v, (int, float))}


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """The config as dotted keys and text values (JSON for every value but a string); an empty table
    stays a key, "{}"."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, str) else to_json(value)
    return flat


def _exports(run_dir: Path) -> dict:
    path = run_dir / EXPORTS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _save_export(run_dir: Path, key: str, value: dict) -> None:
    write_text_atomic(run_dir / EXPORTS, to_json({**_exports(run_dir), key: value}, indent=2) + "\n")


class Exporter:
    """One destination. ``start`` sets ``done``, the last round it already holds; ``finish`` ends it
    and ``close`` ends it after a run that did not reach its end (an error past the runner's hands)."""

    name = ""
    done = 0

    def start(self, cfg: ExperimentConfig, run_dir: Path, resumed: bool) -> None:
        """Open the destination for the run in ``run_dir`` (``resumed``: continue what it holds) and set ``done``."""
        raise NotImplementedError

    def round(self, record: dict) -> None:
        """Send one round's metrics record."""
        raise NotImplementedError

    def finish(self, summary: dict, run_dir: Path) -> None:
        """Send the run's final summary and end the destination."""
        self.close()

    def close(self) -> None:
        """End the destination after a run that did not reach its end."""
        pass


class CsvExporter(Exporter):
    """metrics.csv: a row a round, a column for every key seen (the columns grow as keys appear, e.g. the
    first evaluation's); cells are what metrics.jsonl holds, JSON for lists and tables, empty for none."""

    name = "csv"

    def start(self, cfg: ExperimentConfig, run_dir: Path, resumed: bool) -> None:
        self.path, self.rows, self.columns = run_dir / METRICS_CSV, [], []
        self.path.unlink(missing_ok=True)  # written again from the kept records, which Exporters sends

    def round(self, record: dict) -> None:
        record = strict_record(record)
        self.rows.append(record)
        new = [k for k in record if k not in self.columns]
        if new or not self.path.exists():
            self.columns += new
            write_text_atomic(self.path, self._lines([self.columns, *map(self._cells, self.rows)]))
        else:
            with open(self.path, "a", encoding="utf-8", newline="") as f:
                f.write(self._lines([self._cells(record)]))

    def _cells(self, record: dict) -> list[str]:
        return [_cell(record.get(k)) for k in self.columns]

    @staticmethod
    def _lines(rows: list[list[str]]) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        return out.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    text = to_json(value)
    return "" if text == "null" else text


class TensorBoardExporter(Exporter):
    """Scalars per round in <run>/tensorboard, and the run's PNG figures as images at the end."""

    name = "tensorboard"

    def __init__(self, tracking: TrackingConfig):
        self.summary_writer = _require("torch.utils.tensorboard", "tensorboard", "tensorboard").SummaryWriter
        self.writer = None

    def start(self, cfg: ExperimentConfig, run_dir: Path, resumed: bool) -> None:
        # purge_step=1: TensorBoard hides every earlier session's event; the kept records come again
        self.writer = self.summary_writer(str(run_dir / TENSORBOARD), purge_step=1 if resumed else None)

    def round(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["round"])
        self.writer.flush()  # a killed run keeps its rounds (the writer would wait up to 2 minutes)

    def finish(self, summary: dict, run_dir: Path) -> None:
        """Add the run directory's figures (PNGs) as images at the last round, then close the writer."""
        import numpy as np
        from PIL import Image  # matplotlib's own dependency

        for png in sorted(run_dir.glob("*.png")):
            with Image.open(png) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"figures/{png.stem}", pixels, summary["rounds_done"], dataformats="HWC")
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowExporter(Exporter):
    """Params (the resolved config, dotted keys), metrics per round (step = round), and the run directory
    as artifacts at the end. Default store: sqlite beside the run directories, artifacts in mlartifacts/."""

    name = "mlflow"

    def __init__(self, tracking: TrackingConfig):
        self.tracking = tracking
        uri = tracking.mlflow_uri
        if uri is None or uri.startswith("sqlite:"):
            _require("sqlalchemy", "mlflow", "mlflow")  # MLflow's sqlite store; mlflow-skinny lacks it
            _require("alembic", "mlflow", "mlflow")
        self.mlflow = _require("mlflow.tracking", "mlflow", "mlflow")
        self.entities = _require("mlflow.entities", "mlflow", "mlflow")
        self.client, self.run_id = None, None

    def start(self, cfg: ExperimentConfig, run_dir: Path, resumed: bool) -> None:
        store = (run_dir.parent / MLFLOW_STORE).resolve()  # the run directory's parent: found again on resume
        self.client = self.mlflow.MlflowClient(tracking_uri=self.tracking.mlflow_uri or f"sqlite:///{store}")
        saved = _exports(run_dir).get("mlflow", {}).get("run_id") if resumed else None
        if saved and self._reopen(saved):
            return
        run = self.client.create_run(self._experiment(run_dir), run_name=run_dir.name,
                                     tags={"fedloom.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        _save_export(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri})
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = [self.entities.Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(cfg.to_dict()).items()]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def _reopen(self, run_id: str) -> bool:
        """Continue the earlier sessions' run when this store has it."""
        try:
            self.client.get_run(run_id)
        except Exception:  # another store (mlflow_uri changed), or the run was deleted: a new run
            return False
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        self.done = max((m.step for m in self.client.get_metric_history(run_id, "wall_seconds")), default=0)
        return True

    def _experiment(self, run_dir: Path) -> str:
        name = self.tracking.mlflow_experiment
        for _ in range(2):  # two runs may create it at once: the loser finds the winner's
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            location = None if self.tracking.mlflow_uri else (run_dir.parent / MLFLOW_ARTIFACTS).resolve().as_uri()
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except Exception:
                continue
        raise RuntimeError(f"cannot create or find the MLflow experiment {name!r}")

    def round(self, record: dict) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self.entities.Metric(k, v, stamp, record["round"]) for k, v in scalars(record).items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit on metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, summary: dict, run_dir: Path) -> None:
        """Log the run directory's files as artifacts, tag the run's status and end the MLflow run."""
        for entry in sorted(run_dir.iterdir()):
            if entry.name == WANDB or entry.name.startswith("."):  # W&B's own store; temporary files
                continue
            if entry.is_dir():
                self.client.log_artifacts(self.run_id, str(entry), artifact_path=entry.name)
            else:
                self.client.log_artifact(self.run_id, str(entry))
        self.client.set_tag(self.run_id, "fedloom.status", summary["status"])
        self._end(MLFLOW_STATUS.get(summary["status"], "FAILED"))

    def close(self) -> None:
        self._end("FAILED")

    def _end(self, status: str) -> None:
        if self.run_id is not None:
            run_id, self.run_id = self.run_id, None
            self.client.set_terminated(run_id, status)


class WandbExporter(Exporter):
    """The resolved config, metrics per round (step = round) and the summary at the end, in <run>/wandb;
    offline by default (``wandb sync <run>/wandb/offline-run-*`` uploads it later)."""

    name = "wandb"

    def __init__(self, tracking: TrackingConfig):
        self.tracking = tracking
        self.wandb = _require("wandb", "wandb", "wandb")
        self.run = None

    def start(self, cfg: ExperimentConfig, run_dir: Path, resumed: bool) -> None:
        run_id = _exports(run_dir).get("wandb", {}).get("id") if resumed else None
        if run_id:
            self.done = wandb_last_step(run_dir, run_id)
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B's own form: lower-case letters and digits
            _save_export(run_dir, "wandb", {"id": run_id, "project": self.tracking.wandb_project})
        settings = self.wandb.Settings(console="off", silent=True, x_disable_stats=True)  # no capture, no sampler
        self.run = self.wandb.init(project=self.tracking.wandb_project, mode=self.tracking.wandb_mode,
                                   dir=str(run_dir), id=run_id, name=run_dir.name, resume="allow",
                                   config=cfg.to_dict(), settings=settings)

    def round(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["round"], commit=True)  # committed now: a kill keeps it

    def finish(self, summary: dict, run_dir: Path) -> None:
        self.run.summary.update(json.loads(to_json(summary)))
        self._end(0 if summary["status"] == "completed" else 1)

    def close(self) -> None:
        self._end(1)

    def _end(self, exit_code: int) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)


def wandb_files(run_dir: Path, run_id: str) -> list[Path]:
    """The run's .wandb transaction logs, one a session, oldest first."""
    return sorted(Path(run_dir, WANDB).glob(f"*-{run_id}/run-{run_id}.wandb"))


def wandb_read(log: Path, summary: bool = False) -> Any:
    """A .wandb log read by W&B's own reader (``wandb leet inspect --json``): its records, or with
    ``summary`` one object (config, summary, last step)."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *["--summary"] * summary, str(log)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out) if summary else [json.loads(line) for line in out.splitlines() if line.strip()]


def wandb_last_step(run_dir: Path, run_id: str) -> int:
    """The last step the offline W&B logs of run ``run_id`` in ``run_dir`` hold (0: none)."""
    return max((wandb_read(log, summary=True).get("step") or 0 for log in wandb_files(run_dir, run_id)), default=0)


EXPORTERS = {"csv": lambda tracking: CsvExporter(), "tensorboard": TensorBoardExporter, "wandb": WandbExporter,
             "mlflow": MLflowExporter}  # in this order: MLflow's artifacts take the others' finished files


class Exporters:
    """The exporters [tracking] turns on, called by the runner where it writes the run directory."""

    def __init__(self, exporters: list[Exporter] = ()):
        self.active = list(exporters)
        self.errors: dict[str, str] = {}

    @classmethod
    def build(cls, cfg: ExperimentConfig) -> Exporters:
        """Imports each enabled exporter's library (a ConfigError naming the extra when it is missing)."""
        return cls([factory(cfg.tracking) for key, factory in EXPORTERS.items() if getattr(cfg.tracking, key)])

    def start(self, cfg: ExperimentConfig, run_dir: Path, history: list[dict], resumed: bool) -> None:
        """Open every exporter and send it the kept records past its ``done``."""
        for exporter in list(self.active):
            if self._guard(exporter, "start", exporter.start, cfg, run_dir, resumed):
                for record in history:
                    self._send(exporter, record)

    def round(self, record: dict) -> None:
        """Send the record to every active exporter; one that fails is turned off, its error kept."""
        for exporter in list(self.active):
            self._send(exporter, record)

    def _send(self, exporter: Exporter, record: dict) -> None:
        r = record.get("round", 0)
        if r > exporter.done and self._guard(exporter, f"round {r}", exporter.round, record):
            exporter.done = r

    def finish(self, summary: dict, run_dir: Path) -> None:
        """Finish every active exporter with the summary."""
        for exporter in list(self.active):
            self._guard(exporter, "finish", exporter.finish, summary, run_dir)
        self.active = []

    def close(self) -> None:
        """End what is still open (a run that stopped before ``finish``); never raises."""
        for exporter in self.active:
            try:
                exporter.close()
            except Exception as err:  # the run is ending anyway: say so, keep closing the others
                self.errors.setdefault(exporter.name, f"close: {type(err).__name__}: {err}")
        self.active = []

    def _guard(self, exporter: Exporter, when: str, call: Any, *args: Any) -> bool:
        """Call it; on an error, note it once, warn, and switch the exporter off (the run goes on)."""
        try:
            call(*args)
            return True
        except OSError as err:
            if err.errno in DISK_ERRORS:
                raise  # the run directory's disk: the runner stops the run with one message
            self._fail(exporter, when, err)
        except Exception as err:
            self._fail(exporter, when, err)
        return False

    def _fail(self, exporter: Exporter, when: str, err: Exception) -> None:
        self.errors[exporter.name] = message = f"{when}: {type(err).__name__}: {err}"
        warnings.warn(f"tracking.{exporter.name} failed ({message}); it is off for the rest of the run, which "
                      f"goes on ({METRICS} has every round)", RuntimeWarning, stacklevel=3)
        self.active.remove(exporter)
        try:
            exporter.close()
        except Exception:
            pass  # it has failed already; its first error is the one reported
