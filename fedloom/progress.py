"""A live progress bar for long runs, showing the latest accuracy (or perplexity, or MSE)."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# the first of these a record carries is shown beside the training loss
PROGRESS_METRICS = (("central_perplexity", "ppl"), ("central_accuracy", "acc"), ("central_mse", "mse"))


def central_metric(record: dict[str, Any]) -> str | None:
    """The key of the metric a run is followed by: perplexity, accuracy or MSE when the record has it,
    else a user task's own central metric, else the central loss (None before any evaluation)."""
    for key, _ in PROGRESS_METRICS:
        if key in record:
            return key
    central = [k for k in record if k.startswith("central_") and k != "central_loss"]
    return central[0] if central else ("central_loss" if "central_loss" in record else None)


class RoundProgress:
    def __init__(self, total: int, done: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.total = total
        self.done = done  # rounds already played (a resumed run)
        self._progress = Progress(
            TextColumn("round"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), transient=False)

    def __enter__(self) -> "RoundProgress":
        if self.enabled:
            self._progress.start()
            self._task = self._progress.add_task("rounds", total=self.total, completed=self.done, status="")
        return self

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        status = f"loss {record['train_loss']:.3f}"
        for key, short in PROGRESS_METRICS:
            if key in record:
                status += f"  {short} {record[key]:.3f}"
                break
        self._progress.update(self._task, advance=1, status=status)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._progress.stop()
