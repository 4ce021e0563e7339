"""Plots of a run, drawn only from its files so ``fedloom report`` can redraw them any time.

Figures use matplotlib's object API (``Figure``, no pyplot), so drawing needs no
display and never changes the caller's global backend. Accuracy keys are
fractions in [0, 1] and are shown as percentages. Every key may be missing on
some rounds (evaluation is periodic), so each curve uses only the rounds that
carry it; a plot with nothing to show is not drawn and its function returns None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .rundir import PER_CLIENT

ACCURACY_CURVES = {
    "central_accuracy": ("central (global test set)", "tab:blue", "-"),
    "federated_accuracy": ("federated (weighted mean over clients)", "tab:orange", "-"),
    "federated_accuracy_worst10": ("federated (worst 10% of clients)", "tab:red", "--"),
    "personal_accuracy": ("personalized (each client's own model)", "tab:green", "-"),
    "personal_accuracy_worst10": ("personalized (worst 10% of clients)", "tab:olive", "--"),
}
LOSS_CURVES = {
    "train_loss": ("train (clients' local batches)", "tab:green", "-"),
    "central_loss": ("central (global test set)", "tab:blue", "-"),
    "federated_loss": ("federated (weighted mean over clients)", "tab:orange", "-"),
}
PERPLEXITY_CURVES = {  # language models
    "central_perplexity": ("central (global test set)", "tab:blue", "-"),
    "federated_perplexity": ("federated (all clients' test tokens)", "tab:orange", "-"),
}
ERROR_CURVES = {  # regression
    "central_mse": ("central MSE (global test set)", "tab:blue", "-"),
    "federated_mse": ("federated MSE (all clients)", "tab:orange", "-"),
    "federated_mse_worst10": ("federated MSE (worst 10% of clients)", "tab:red", "--"),
    "central_mae": ("central MAE (global test set)", "tab:cyan", ":"),
}
NODE_KEYS = ("node_accuracy_mean", "node_accuracy_min", "node_accuracy_max", "xbar_accuracy")
MARKER_LIMIT = 60  # beyond this many points markers only clutter; below it they show sparse evaluations
HEATMAP_CLIENTS = 100

XFn = Callable[[dict], float | None]


def by_round(records: list[dict]) -> list[dict]:
    """One row per round, sorted; records sharing a round (training and evaluation
    logged separately) are merged so every row knows its byte counters."""
    rows: dict[int, dict] = {}
    for record in records:
        if record.get("round") is not None:
            rows.setdefault(record["round"], {}).update(record)
    return [rows[r] for r in sorted(rows)]


def _round(row: dict) -> float | None:
    return row.get("round")


def _uplink_mb(row: dict) -> float | None:
    total = row.get("bytes_up_total")
    return None if total is None else total / 1e6


def _series(rows: list[dict], key: str, x: XFn, scale: float = 1.0) -> tuple[list, list]:
    """(x, y) over the rows that carry both ``key`` and an x value."""
    points = [(x(r), r[key] * scale) for r in rows if r.get(key) is not None and x(r) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _line(ax: Axes, xs: list, ys: list, label: str, color: str, style: str = "-") -> None:
    marker = "o" if len(xs) <= MARKER_LIMIT else None
    ax.plot(xs, ys, label=label, color=color, linestyle=style, marker=marker, markersize=3.5)


def _decorate(ax: Axes, title: str, xlabel: str, ylabel: str, integer_x: bool = False) -> None:
    """Title, labelled axes, grid and legend; ``integer_x`` keeps ticks off fractional rounds and clients."""
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.35)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _placeholder(ax: Axes, title: str, message: str) -> None:
    """Say why a panel is empty rather than leave a blank frame."""
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _round_and_uplink(rows: list[dict], curves: dict, quantity: str, ylabel: str, scale: float, path: Path) -> Path | None:
    """The figure shared by accuracy and loss: vs round, vs cumulative uplink MB and, when a system model
    timed the run, vs virtual seconds."""
    if not any(_series(rows, key, _round)[0] for key in curves):
        return None
    panels = [(_round, "round", f"{quantity} vs round"),
              (_uplink_mb, "cumulative uplink (MB)", f"{quantity} vs cumulative uplink")]
    if any(r.get("virtual_seconds") is not None for r in rows):
        panels.append((_virtual_seconds, "virtual seconds", f"{quantity} vs virtual time"))
    fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    for ax, (x, xlabel, title) in zip(fig.subplots(1, len(panels)), panels):
        drawn = False
        for key, (label, color, style) in curves.items():
            xs, ys = _series(rows, key, x, scale)
            if xs:
                _line(ax, xs, ys, label, color, style)
                drawn = True
        if drawn:
            _decorate(ax, title, xlabel, ylabel, integer_x=x is _round)
        else:
            _placeholder(ax, title, "no byte counts recorded (bytes_up_total)")
    return _save(fig, path)


def plot_staleness(rows: list[dict], path: Path) -> Path | None:
    """An asynchronous run: how stale the applied updates were (server versions behind), all rounds together."""
    values = [s for r in rows for s in r.get("staleness") or ()]
    if not values:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.hist(values, bins=np.arange(max(values) + 2) - 0.5, color="tab:purple")
    _decorate(ax, f"Staleness of the {len(values)} applied updates (mean {np.mean(values):.2f})",
              "staleness (server updates since the client's start)", "updates", integer_x=True)
    return _save(fig, path)


def plot_accuracy(rows: list[dict], path: Path) -> Path | None:
    """The accuracy curves against round and uplink bytes (and virtual time) into ``path``; None with no accuracy."""
    return _round_and_uplink(rows, ACCURACY_CURVES, "Accuracy", "accuracy (%)", 100.0, path)


def plot_task_accuracy(rows: list[dict], path: Path) -> Path | None:
    """mode = "simultaneous": each task's central accuracy ('<task>/central_accuracy') against round, uplink
    bytes and virtual time; None when no task was evaluated."""
    suffix = "/central_accuracy"
    tasks = sorted({k.removesuffix(suffix) for r in rows for k in r if k.endswith(suffix)})
    curves = {f"{t}{suffix}": (t, f"C{i % 10}", "-") for i, t in enumerate(tasks)}
    return _round_and_uplink(rows, curves, "Accuracy by task", "accuracy (%)", 100.0, path) if tasks else None


def plot_loss(rows: list[dict], path: Path) -> Path | None:
    """The loss curves against round and uplink bytes (and virtual time) into ``path``; None with no loss."""
    return _round_and_uplink(rows, LOSS_CURVES, "Loss", "loss (mean per example)", 1.0, path)


def plot_perplexity(rows: list[dict], path: Path) -> Path | None:
    """The perplexity curves (language models) into ``path``; None with no perplexity."""
    return _round_and_uplink(rows, PERPLEXITY_CURVES, "Perplexity", "perplexity (exp of mean token loss)", 1.0, path)


def plot_error(rows: list[dict], path: Path) -> Path | None:
    """The error curves (regression: MSE, MAE) into ``path``; None with no error metric."""
    return _round_and_uplink(rows, ERROR_CURVES, "Error", "mean error per example", 1.0, path)


def _epsilon(row: dict) -> float | None:
    return row.get("epsilon")


def _virtual_seconds(row: dict) -> float | None:
    return row.get("virtual_seconds")


CENTRAL_METRICS = {  # the task's headline metric: key -> (title, axis label, scale)
    "central_accuracy": ("Accuracy", "accuracy (%)", 100.0),
    "central_perplexity": ("Perplexity", "perplexity", 1.0),
    "central_mse": ("MSE", "mean squared error", 1.0),
}
X_AXES = {  # name -> (x of a row, axis label)
    "round": (_round, "round"),
    "uplink": (_uplink_mb, "cumulative uplink (MB)"),
    "epsilon": (_epsilon, "epsilon"),
    "virtual_seconds": (_virtual_seconds, "virtual seconds"),
}


def _run_style(i: int) -> tuple[str, str]:
    """A colour (and past ten runs a dash pattern) per run, the same in every panel."""
    return f"C{i % 10}", ("-", "--", ":", "-.")[i // 10 % 4]


def plot_runs(runs: dict[str, list[dict]], key: str, axis: str, quantity: str, ylabel: str, scale: float,
              path: Path) -> Path | None:
    """``key`` of several runs overlaid against one of ``X_AXES``; None when no run has both."""
    x, xlabel = X_AXES[axis]
    curves = [(label, *_series(rows, key, x, scale)) for label, rows in runs.items()]
    if not any(xs for _, xs, _ in curves):
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (label, xs, ys) in enumerate(curves):
        if xs:
            _line(ax, xs, ys, label, *_run_style(i))
    _decorate(ax, f"{quantity} vs {xlabel.split(' (')[0]}", xlabel, ylabel, integer_x=axis == "round")
    return _save(fig, path)


def plot_bands(groups: dict[str, list[list[dict]]], key: str, quantity: str, ylabel: str, scale: float,
               path: Path) -> Path | None:
    """Per group (a sweep's grid point), the mean of ``key`` over its runs against round and a band of
    mean +- one sample standard deviation (as the sweep's table gives it; one run: a line, no band)."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    drawn = False
    for i, (label, runs) in enumerate(groups.items()):
        by = {}
        for rows in runs:
            for x, y in zip(*_series(rows, key, _round, scale)):
                by.setdefault(x, []).append(y)
        if not by:
            continue
        xs = sorted(by)
        mean = np.array([np.mean(by[x]) for x in xs])
        std = np.array([np.std(by[x], ddof=1) if len(by[x]) > 1 else 0.0 for x in xs])
        color, style = _run_style(i)
        _line(ax, xs, mean, f"{label} (n={len(runs)})", color, style)
        ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2)
        drawn = True
    if not drawn:
        return None
    _decorate(ax, f"{quantity} vs round (mean and +-1 std over seeds)", "round", ylabel, integer_x=True)
    return _save(fig, path)


def plot_privacy(rows: list[dict], path: Path) -> Path | None:
    """A private run's trade-off: accuracy against the epsilon spent so far (at the run's delta)."""
    curves = {k: v for k, v in ACCURACY_CURVES.items() if _series(rows, k, _epsilon)[0]}
    if not curves:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for key, (label, color, style) in curves.items():
        _line(ax, *_series(rows, key, _epsilon, 100.0), label, color, style)
    _decorate(ax, "Accuracy vs privacy spent", "epsilon", "accuracy (%)")
    return _save(fig, path)


def plot_partition(stats: dict, path: Path) -> Path | None:
    """How unequal and how non-IID the split is: sorted client sizes, and labels per client."""
    train = np.asarray(stats.get("train_sizes") or [])
    hist = np.asarray(stats.get("label_histogram") or [])
    if not train.size and not hist.size:
        return None
    n_clients = stats.get("n_clients", max(len(train), len(hist)))
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    sizes_ax, hist_ax = fig.subplots(1, 2)
    if train.size:
        _client_sizes(sizes_ax, train, np.asarray(stats.get("test_sizes") or []), n_clients)
    else:
        _placeholder(sizes_ax, "Client dataset sizes", "no client sizes recorded")
    if hist.size:
        _label_heatmap(fig, hist_ax, hist, n_clients)
    else:
        _placeholder(hist_ax, "Label histogram", "no label histogram recorded")
    return _save(fig, path)


def _client_sizes(ax: Axes, train: np.ndarray, test: np.ndarray, n_clients: int) -> None:
    # one filled step polygon per series, not a bar per client: 100,000 clients draw in about a second
    order = np.argsort(-train, kind="stable")
    edges = np.arange(len(train) + 1) - 0.5
    steps = lambda v: np.append(v, v[-1])  # noqa: E731 (fill_between's "post" steps need the last value twice)
    ax.fill_between(edges, 0, steps(train[order]), step="post", color="tab:blue", label="train", linewidth=0)
    if len(test) == len(train):
        top = train[order] + test[order]
        ax.fill_between(edges, steps(train[order]), steps(top), step="post", color="tab:orange",
                        label="test (stacked on train)", linewidth=0)
    ax.set_ylim(bottom=0)
    _decorate(ax, f"Client dataset sizes ({n_clients} clients)", "client (sorted by train size)", "examples", integer_x=True)


def _label_heatmap(fig: Figure, ax: Axes, hist: np.ndarray, n_clients: int) -> None:
    shown = hist[:HEATMAP_CLIENTS]
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="training examples")
    which = f"first {len(shown)} of {n_clients} clients" if len(shown) < n_clients else f"{n_clients} clients"
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Label histogram ({which})")
    ax.set_xlabel("class")
    ax.set_ylabel("client")


def plot_nodes(rows: list[dict], path: Path) -> Path | None:
    """Decentralized accuracy: the spread over nodes, their mean, and the averaged model x_bar."""
    if not any(_series(rows, key, _round)[0] for key in NODE_KEYS):
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    band = [r for r in rows if r.get("node_accuracy_min") is not None and r.get("node_accuracy_max") is not None]
    if band:
        ax.fill_between(
            [r["round"] for r in band],
            [100 * r["node_accuracy_min"] for r in band],
            [100 * r["node_accuracy_max"] for r in band],
            color="tab:blue", alpha=0.25, label="nodes (min to max)",
        )
    for key, label, color in (("node_accuracy_mean", "nodes (mean)", "tab:blue"), ("xbar_accuracy", "x_bar (average of all nodes)", "tab:purple")):
        xs, ys = _series(rows, key, _round, 100.0)
        if xs:
            _line(ax, xs, ys, label, color)
    _decorate(ax, "Node accuracy vs round", "round", "accuracy (%)", integer_x=True)
    return _save(fig, path)


def plot_consensus(rows: list[dict], path: Path) -> Path | None:
    """How far nodes are from agreeing; log scale because gossip shrinks it geometrically."""
    xs, ys = _series(rows, "consensus_distance", _round)
    points = [(x, y) for x, y in zip(xs, ys) if y > 0]  # zero (exact agreement) has no place on a log axis
    if not points:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    _line(ax, [p[0] for p in points], [p[1] for p in points], "consensus distance", "tab:red")
    ax.set_yscale("log")
    _decorate(ax, "Consensus distance vs round", "round", "consensus distance (log scale)", integer_x=True)
    return _save(fig, path)


def plot_graph(graph: dict, path: Path) -> Path:
    """The gossip graph of a decentralized run, Byzantine nodes in red."""
    import networkx as nx

    G = nx.Graph()
    G.add_nodes_from(range(graph["n_nodes"]))
    G.add_edges_from(map(tuple, graph["edges"]))
    byzantine = set(graph.get("byzantine", []))
    fig = Figure(figsize=(6.5, 6.5), layout="constrained")
    ax = fig.subplots()
    pos = nx.kamada_kawai_layout(G)  # deterministic, and shows rings and tori as what they are
    colors = ["tab:red" if v in byzantine else "tab:blue" for v in G.nodes]
    nx.draw_networkx(G, pos, ax=ax, node_color=colors, node_size=120, font_size=6, font_color="white",
                     edge_color="0.6", width=0.8)
    suffix = f", {len(byzantine)} Byzantine (red)" if byzantine else ""
    ax.set_title(f"Gossip graph: {graph.get('name', '')}, {G.number_of_nodes()} nodes, "
                 f"{G.number_of_edges()} edges{suffix}")
    ax.set_axis_off()
    return _save(fig, path)



def per_client_values(summary: dict | None) -> tuple[str, dict] | None:
    """The metric and the per-client values (global and personalized models) a personalized run's summary holds."""
    for key, value in (summary or {}).items():
        if key.startswith(PER_CLIENT) and isinstance(value, dict):
            return key[len(PER_CLIENT):], value
    return None


def plot_personalization(summary: dict | None, path: Path) -> Path | None:
    """The distribution over clients of each client's metric on its own test split, for the global and
    the personalized models side by side (histograms on shared bins, each panel marking its mean and
    the worst 10% of clients' mean)."""
    found = per_client_values(summary)
    if found is None or not found[1].get("personal"):
        return None
    metric, values = found
    accuracy = "accuracy" in metric
    scale = 100.0 if accuracy else 1.0
    series = {"global model": np.asarray(values["global"]) * scale,
              "personalized models": np.asarray(values["personal"]) * scale}
    lo, hi = (0.0, 100.0) if accuracy else (min(map(np.min, series.values())), max(map(np.max, series.values())))
    bins = np.linspace(lo, hi, 21)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    for ax, (label, v), color in zip(fig.subplots(1, 2, sharey=True), series.items(), ("tab:orange", "tab:green")):
        ax.hist(v, bins=bins, color=color, edgecolor="white")
        worst = _worst10(v, higher_is_better=accuracy)
        ax.axvline(v.mean(), color="black", label=f"mean {v.mean():.4g}")
        ax.axvline(worst.mean(), color="tab:red", linestyle="--", label=f"worst 10% {worst.mean():.4g}")
        _decorate(ax, f"{label}: {metric} per client ({len(v)} clients)", f"{metric}{' (%)' if accuracy else ''}",
                  "clients")
    return _save(fig, path)


def _worst10(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """The 10% of clients (at least one) for whom the metric is worst."""
    ranked = np.sort(values) if higher_is_better else np.sort(values)[::-1]
    return ranked[: max(1, int(np.ceil(0.1 * len(values))))]
