"""Several runs side by side (``fedloom compare``): one table of their final metrics and their curves
overlaid, as PNGs, a CSV and a markdown table and one self-contained HTML page, read from the run
directories alone. The table's values are the runs' summary.json values, unrounded."""

from __future__ import annotations

import csv
import glob
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plots import CENTRAL_METRICS, X_AXES, by_round, plot_runs
from .report import format_value, grid_table, html_page, image
from .rundir import CONFIG, METRICS, SUMMARY, SUMMARY_KEYS, SUMMARY_PREFIXES, read_metrics, write_text_atomic

PAGE = "compare.html"
ID_KEYS = ("status", "algorithm", "rounds_done")
LOSSES = {"central_loss": "Central loss", "train_loss": "Train loss"}


class UnusableRun(ValueError):
    """A path that is not a complete run directory; the message names it and says why."""


@dataclass
class Run:
    """A run directory read for ``fedloom compare``: its label, path, summary and metrics rows."""

    label: str
    path: Path
    summary: dict[str, Any]
    rows: list[dict]


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run's config, metrics or summary."""
    return any((path / name).is_file() for name in (CONFIG, METRICS, SUMMARY))


def expand(args: list[str]) -> list[Path]:
    """The run directories the arguments name: globs a shell left unexpanded are expanded, and a
    directory of run directories (runs/, a sweep) stands for the runs in it; order kept, no repeats."""
    paths: dict[Path, None] = {}
    for arg in args:
        globbed = any(c in arg for c in "*?[") and not Path(arg).exists()
        for match in (sorted(glob.glob(arg)) or [arg]) if globbed else [arg]:
            path = Path(match)
            inner = sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p)) \
                if path.is_dir() and not is_run_dir(path) else []
            paths.update(dict.fromkeys(inner or [path]))
    return list(paths)


def load_run(path: Path) -> Run:
    """The run's summary and its metrics by round, or UnusableRun naming what is missing."""
    if not path.is_dir():
        raise UnusableRun(f"{path}: {'not a directory' if path.exists() else 'does not exist'}")
    if not is_run_dir(path):
        raise UnusableRun(f"{path}: not a fedloom run directory (no {CONFIG}, {METRICS} or {SUMMARY})")
    missing = [name for name in (METRICS, SUMMARY) if not (path / name).is_file()]
    if missing:
        raise UnusableRun(f"{path}: no {' and no '.join(missing)} (still running, or killed: "
                          f"`fedloom run --resume {path}` finishes it)")
    try:
        summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
        rows = by_round(read_metrics(path))
    except (ValueError, OSError) as err:
        raise UnusableRun(f"{path}: {err}") from None
    return Run(path.name, path, summary, rows)


def load_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """The usable runs, labelled by directory name (by path where names repeat), and one message per
    path that is not usable."""
    runs, problems = [], []
    for path in paths:
        try:
            runs.append(load_run(path))
        except UnusableRun as err:
            problems.append(str(err))
    names = [run.label for run in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = str(run.path)
    return runs, problems


def metric_keys(summaries: list[dict]) -> list[str]:
    """The final metrics any summary holds (the task's metrics, bytes, epsilon, wall seconds), first seen first."""
    keys: dict[str, None] = {}
    for summary in summaries:
        keys.update((k, None) for k in summary if k.startswith(SUMMARY_PREFIXES) or k in SUMMARY_KEYS)
    return list(keys)


def table(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
    """One row per run: its label, status, algorithm, rounds done and every final metric (None where absent)."""
    keys = [*ID_KEYS, *metric_keys([run.summary for run in runs])]
    return ["run", *keys], [[run.label, *(run.summary.get(k) for k in keys)] for run in runs]


def write_csv(path: Path, columns: list[str], rows: list[list[Any]]) -> Path:
    """Values as they are (floats in full), empty cells for None."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([columns, *[["" if v is None else v for v in row] for row in rows]])
    return path


def write_markdown(path: Path, columns: list[str], rows: list[list[Any]]) -> Path:
    """A markdown table, values formatted as the HTML page shows them."""
    lines = [columns, ["---"] * len(columns), *[["" if v is None else format_value(v) for v in row] for row in rows]]
    write_text_atomic(path, "".join("| " + " | ".join(map(str, line)) + " |\n" for line in lines))
    return path


def plot_curves(curves: dict[str, list[dict]], out: Path) -> list[Path]:
    """The task's central metric against every x axis some run has, and the losses against round."""
    plots = []
    for key, (quantity, ylabel, scale) in CENTRAL_METRICS.items():
        plots += [plot_runs(curves, key, axis, quantity, ylabel, scale, out / f"{key}_vs_{axis}.png")
                  for axis in X_AXES]
    plots += [plot_runs(curves, key, "round", quantity, "loss (mean per example)", 1.0, out / f"{key}_vs_round.png")
              for key, quantity in LOSSES.items()]
    return [p for p in plots if p]


def render_compare(runs: list[Run], out: Path, problems: list[str] = ()) -> list[Path]:
    """Write the table, the plots and ``compare.html`` into ``out`` (made if missing); return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = table(runs)
    tables = [write_csv(out / "table.csv", columns, rows), write_markdown(out / "table.md", columns, rows)]
    plots = plot_curves({run.label: run.rows for run in runs}, out)
    e = html.escape
    listed = "".join(f"<li><code>{e(str(run.path.resolve()))}</code></li>" for run in runs)
    sections = [f"<h1>fedloom compare: {len(runs)} runs</h1>", "<h2>Final metrics</h2>", grid_table(columns, rows),
                f"<h2>Runs</h2><ul>{listed}</ul>"]
    if problems:
        sections.append("<h2>Left out</h2><ul>" + "".join(f"<li>{e(p)}</li>" for p in problems) + "</ul>")
    sections += ["<h2>Plots</h2>", "".join(image(p) for p in plots) or "<p>Nothing to plot.</p>"]
    page = out / PAGE
    write_text_atomic(page, html_page(f"fedloom compare: {len(runs)} runs", sections))
    return [page, *tables, *plots]
