"""Progress of a run: a live bar with an ETA on a terminal, else (stdout piped to a file or `tee`,
a CI log) one plain line every few rounds; both show the loss and the latest accuracy (or perplexity,
or MSE)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

# the first of these a record carries is shown beside the training loss
PROGRESS_METRICS = (("central_perplexity", "ppl"), ("central_accuracy", "acc"), ("central_mse", "mse"))
PLAIN_LINES = 10  # without output.progress_every, a plain line every tenth of the rounds


class OutputClosed(KeyboardInterrupt):
    """stdout's reader has gone (`| tee` ended by Ctrl-C, `| head`): the run stops as on Ctrl-C,
    completing its run directory."""


def silence_stdout() -> None:
    """What is still written to stdout goes to /dev/null: a broken pipe must not fail the final
    writes, nor Python's flush at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (replaced in a notebook, a test)
        pass


def central_metric(record: dict[str, Any]) -> str | None:
    """The key of the metric a run is followed by: perplexity, accuracy or MSE when the record has it,
    else a user task's own central metric, else the central loss (None before any evaluation)."""
    for key, _ in PROGRESS_METRICS:
        if key in record:
            return key
    central = [k for k in record if k.startswith("central_") and k != "central_loss"]
    return central[0] if central else ("central_loss" if "central_loss" in record else None)


def _status(record: dict[str, Any]) -> str:
    # mode = "simultaneous" records each task's loss as '<task>/train_loss'
    parts = [f"{k.removesuffix('train_loss')}loss {v:.3f}" for k, v in record.items() if k.endswith("train_loss")]
    if (key := central_metric(record)) is not None:
        short = dict(PROGRESS_METRICS).get(key, key.removeprefix("central_"))
        parts.append(f"{short} {record[key]:.3f}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


class RoundProgress:
    """A run's progress over ``total`` rounds (``done`` already played): a live bar on a terminal or in Jupyter,
    else a plain line every ``every`` rounds; nothing when not ``enabled``."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True, every: int | None = None,
                 console: Console | None = None):
        self.enabled = enabled
        self.total = total
        self.done = done  # rounds already played (a resumed run)
        self.console = console or Console()
        self.live = self.console.is_terminal or self.console.is_jupyter
        self.every = every or max(1, round(total / PLAIN_LINES))
        self._progress = Progress(
            TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False)

    def __enter__(self) -> "RoundProgress":
        self._started, self._first = time.monotonic(), self.done
        if self.enabled and self.live:
            self._progress.start()
            self._task = self._progress.add_task("rounds", total=self.total, completed=self.done, status="")
        return self

    def update(self, record: dict[str, Any]) -> None:
        """Show a finished round from its metrics record."""
        if not self.enabled:
            return
        if self.live:
            self._progress.update(self._task, advance=1, status=_status(record))
            return
        r = record["round"]
        if r % self.every == 0 or r == self.total:
            # the rate of the rounds played here: a resumed run's earlier rounds took no time in this process
            eta = (time.monotonic() - self._started) / max(1, r - self._first) * (self.total - r)
            try:
                self.console.file.write(f"round {r}/{self.total}  {_status(record)}  eta {_clock(eta)}\n")
                self.console.file.flush()
            except BrokenPipeError:
                silence_stdout()
                raise OutputClosed from None

    def __exit__(self, *exc: Any) -> None:
        if self.enabled and self.live:
            self._progress.stop()
