"""One self-contained HTML page per run, rebuilt from the run directory alone.

Images are embedded as base64 and there is no JavaScript or network resource, so
the page can be mailed, archived or opened offline and still show everything.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from .plots import (by_round, plot_accuracy, plot_consensus, plot_error, plot_graph, plot_loss, plot_nodes,
                    plot_partition, plot_personalization, plot_perplexity, plot_privacy, plot_staleness,
                    plot_task_accuracy)
from .rundir import CONFIG, GRAPH, PARTITION, PER_CLIENT, SUMMARY, read_metrics, to_json, write_text_atomic

REPORT = "report.html"

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1320px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #ddd; margin-bottom: 1em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def render_report(run_dir: str | Path) -> Path:
    """(Re)draw every plot the run's files support and write ``report.html``; return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    rows = by_round(read_metrics(run_dir))
    summary = _read_json(run_dir / SUMMARY)
    partition = _read_json(run_dir / PARTITION)
    graph = _read_json(run_dir / GRAPH)
    plots = [
        plot_accuracy(rows, run_dir / "accuracy.png"),
        plot_task_accuracy(rows, run_dir / "task_accuracy.png"),
        plot_loss(rows, run_dir / "loss.png"),
        plot_perplexity(rows, run_dir / "perplexity.png"),
        plot_error(rows, run_dir / "error.png"),
        plot_privacy(rows, run_dir / "privacy.png"),
        plot_staleness(rows, run_dir / "staleness.png"),
        plot_partition(partition, run_dir / "partition.png") if partition else None,
        plot_nodes(rows, run_dir / "nodes.png"),
        plot_consensus(rows, run_dir / "consensus.png"),
        plot_graph(graph, run_dir / "graph.png") if graph else None,
        plot_personalization(summary, run_dir / "personalization.png"),
    ]
    config_path = run_dir / CONFIG
    config = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    name = (summary or {}).get("name") or run_dir.name
    page = _page(name, run_dir, summary, rows[-1] if rows else None, [p for p in plots if p], config)
    path = run_dir / REPORT
    write_text_atomic(path, page)
    return path


def _read_json(path: Path) -> Any:
    """The file's JSON, or None if the run never wrote it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e


def format_value(value: Any) -> str:
    """A summary value as tables show it: floats to 6 significant digits, ints with thousands commas."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return to_json(value)


def _table(mapping: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(format_value(v))}</td></tr>" for k, v in mapping.items())
    return f"<table>{rows}</table>"


def _summary_table(summary: dict) -> str:
    """The summary without the per-client values (the personalization plot draws them)."""
    return _table({k: v for k, v in summary.items() if not k.startswith(PER_CLIENT)})


def grid_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A table with a header row; None cells stay empty."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{'' if v is None else html.escape(format_value(v))}</td>" for v in row)
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(path: Path) -> str:
    """The PNG at ``path`` as an HTML figure with the image inlined (the report is one self-contained file)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)} plot"></figure>'


def _page(name: str, run_dir: Path, summary: dict | None, last: dict | None, plots: list[Path], config: str | None) -> str:
    e = html.escape
    sections = [
        f"<h1>fedloom run: {e(name)}</h1>",
        f"<p>Run directory: <code>{e(str(run_dir.resolve()))}</code></p>",
        "<h2>Summary</h2>",
        _summary_table(summary) if summary else "<p>No summary.json: the run is still going or was killed before finishing.</p>",
        (f"<h2>Final metrics (round {e(str(last['round']))})</h2>" + _table(last)) if last else "<h2>Final metrics</h2><p>No rounds recorded yet.</p>",
        "<h2>Plots</h2>",
        "".join(image(p) for p in plots) or "<p>Nothing to plot yet.</p>",
        "<h2>Resolved config</h2>",
        f"<pre>{e(config)}</pre>" if config is not None else "<p>No config.toml.</p>",
    ]
    return html_page(f"fedloom run: {name}", sections)


def html_page(title: str, sections: list[str]) -> str:
    """The page around ``sections`` (HTML already escaped): styled, no script, nothing fetched."""
    e = html.escape
    body = "\n".join(sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
