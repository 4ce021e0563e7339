"""Accuracy against uplink megabytes: MNIST-5k, LeNet-5, 100 clients, Dirichlet(0.5).

    python bench/compression.py [--jobs 2] [--rounds N] [--only "none,top-1% + EF"] [--set client.lr=0.1]

Every method runs ``fedloom.run`` on the same config (same seed, data, clients and
batches), only ``[compression]`` differs: none (fp32), top-1% with no error feedback,
with EF and with EF21, QSGD 4-bit, sign + EF, PowerSGD r=2 and r=4 + EF. Uplink megabytes are
fedloom's ``bytes_up`` (real payload lengths) summed over rounds.

Writes bench/results/compression.json (every round's accuracy and bytes),
compression.md (the table) and compression.png (accuracy against cumulative uplink MB,
log x), and prints the table. Target (issue #7): top-1% + EF ends within 1 point of
the uncompressed accuracy with at least 50x fewer uplink bytes, and top-1% without
error feedback shows a gap.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch

import fedloom
from common import RESULTS, fedloom_commit, machine

# Same settings for every method (no per-method tuning): see bench/README.md.
SETTINGS = {
    "data.dataset": "mnist5k", "model.name": "cnn", "data.n_clients": 100, "data.client_test_fraction": 0.0,
    "partition.name": "dirichlet", "partition.alpha": 0.5, "sampling.clients_per_round": 20,
    "client.optimizer": "sgd", "client.lr": 0.15, "client.epochs": 1, "client.batch_size": 10,
    "evaluation.every": 1, "evaluation.federated": False, "output.save": False, "output.progress": False,
}
METHODS = {
    "none": {},
    "top-1%": {"compression.name": "topk", "compression.options.k": 0.01},
    "top-1% + EF": {"compression.name": "topk", "compression.options.k": 0.01, "compression.feedback": "ef"},
    "top-1% + EF21": {"compression.name": "topk", "compression.options.k": 0.01, "compression.feedback": "ef21"},
    "QSGD 4-bit": {"compression.name": "qsgd", "compression.options.levels": 7},
    "sign + EF": {"compression.name": "sign", "compression.feedback": "ef"},
    "PowerSGD r=2 + EF": {"compression.name": "powersgd", "compression.options.rank": 2,
                          "compression.feedback": "ef"},
    "PowerSGD r=4 + EF": {"compression.name": "powersgd", "compression.options.rank": 4,
                          "compression.feedback": "ef"},
}
FINAL_WINDOW = 5  # "final accuracy" is the mean of the last rounds' accuracies: one round is noisy
REACH = 0.9  # the table's budget column: MB until accuracy first reaches 90% of uncompressed final
MB = 1e6


def overrides(settings: dict) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def run_method(label: str, rounds: int, engine: str, changes: list[str]) -> dict:
    torch.set_num_threads(1)  # one core per method, as in every bench here; the machine is shared
    config = {**SETTINGS, **METHODS[label], "rounds": rounds, "engine.name": engine}
    began = time.perf_counter()
    result = fedloom.run(None, overrides(config) + changes)
    curve = [{"round": r["round"], "accuracy": r["central_accuracy"], "uplink_mb": r["bytes_up_total"] / MB,
              "downlink_mb": r["bytes_down_total"] / MB} for r in result.history]
    accuracies = [point["accuracy"] for point in curve]
    return {"label": label, "overrides": overrides(METHODS[label]), "engine": result.summary["engine"],
            "wall_seconds": time.perf_counter() - began, "curve": curve,
            "final_accuracy": sum(accuracies[-FINAL_WINDOW:]) / len(accuracies[-FINAL_WINDOW:]),
            "uplink_mb": curve[-1]["uplink_mb"]}


def summarize(runs: list[dict]) -> None:
    """Adds the ratio against none and the MB needed to reach 90% of none's final accuracy."""
    baseline = next((r for r in runs if r["label"] == "none"), None)
    if baseline is None:
        return
    goal = REACH * baseline["final_accuracy"]
    for r in runs:
        r["ratio_vs_none"] = baseline["uplink_mb"] / r["uplink_mb"]
        r["gap_points"] = 100 * (baseline["final_accuracy"] - r["final_accuracy"])
        reached = [p for p in r["curve"] if p["accuracy"] >= goal]
        r["mb_to_goal"] = reached[0]["uplink_mb"] if reached else None
        r["round_to_goal"] = reached[0]["round"] if reached else None


def table(runs: list[dict]) -> str:
    rows = ["| method | final accuracy | gap to none (points) | uplink MB | ratio vs none "
            f"| MB to {REACH:.0%} of none's final (round) | wall s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        goal = f"{r['mb_to_goal']:.2f} ({r['round_to_goal']})" if r.get("mb_to_goal") is not None else "not reached"
        rows.append(f"| {r['label']} | {r['final_accuracy']:.4f} | {r.get('gap_points', 0):+.2f} | "
                    f"{r['uplink_mb']:.2f} | {r.get('ratio_vs_none', 1):.1f}x | {goal} | {r['wall_seconds']:.0f} |")
    return "\n".join(rows)


def verdict(runs: list[dict]) -> list[str]:
    by = {r["label"]: r for r in runs}
    if not {"none", "top-1%", "top-1% + EF"} <= set(by):
        return []
    ef, plain = by["top-1% + EF"], by["top-1%"]
    reached = ef["gap_points"] <= 1 and ef["ratio_vs_none"] >= 50
    return [
        f"- top-1% + EF: {ef['gap_points']:+.2f} points from none with {ef['ratio_vs_none']:.1f}x fewer uplink bytes "
        f"(target: within 1 point, at least 50x) — target {'reached' if reached else 'NOT reached'}",
        f"- top-1% without error feedback: {plain['gap_points']:+.2f} points from none "
        f"(target: a gap) — {'a gap' if plain['gap_points'] > 1 else 'NO gap'}",
    ]


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        ax.plot([p["uplink_mb"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], label=r["label"])
    baseline = next((r for r in runs if r["label"] == "none"), None)
    if baseline:
        ax.axhline(REACH * baseline["final_accuracy"], color="grey", linestyle="--", linewidth=1,
                   label=f"{REACH:.0%} of uncompressed final")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink MB (all clients, real payload bytes)")
    ax.set_ylabel("test accuracy")
    ax.set_title("MNIST-5k, LeNet-5, 100 clients, Dirichlet(0.5)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--engine", default="serial", help="serial or vectorized (equally fast here; see README)")
    parser.add_argument("--only", default=",".join(METHODS), help="comma-separated method labels")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting for every method, e.g. --set client.epochs=1")
    parser.add_argument("--jobs", type=int, default=1, help="methods run side by side (one thread each)")
    parser.add_argument("--out", type=Path, default=RESULTS / "compression")
    args = parser.parse_args()
    labels = [label.strip() for label in args.only.split(",")]
    unknown = [label for label in labels if label not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; methods: {', '.join(METHODS)}")

    load_before = os.getloadavg()[0]
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    runs = []
    # every run is seeded, so running them side by side changes wall times only
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = pool.map(partial(run_method, rounds=args.rounds, engine=args.engine, changes=args.set), labels)
        for r in done:
            runs.append(r)
            print(f"{r['label']}: accuracy {r['final_accuracy']:.4f}, uplink {r['uplink_mb']:.2f} MB, "
                  f"{r['wall_seconds']:.0f} s", flush=True)
    summarize(runs)
    meta = {"started": started, "command": f"python bench/compression.py --rounds {args.rounds} "
            f"--engine {args.engine} --jobs {args.jobs}" + "".join(f" --set {change}" for change in args.set)
            + ("" if labels == list(METHODS) else f" --only {args.only!r}"),
            "settings": {**SETTINGS, "rounds": args.rounds, "engine.name": args.engine}, "changes": args.set,
            "final_accuracy": f"mean of the last {FINAL_WINDOW} rounds", "threads": 1,
            "load_average_before_after": [load_before, os.getloadavg()[0]], "fedloom": fedloom_commit(),
            "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    plot(runs, args.out.with_suffix(".png"))
    text = "\n".join([f"`{meta['command']}` — {started}, fedloom {meta['fedloom']}, {args.rounds} rounds, "
                      f"engine {args.engine}, one thread per method, {args.jobs} side by side; load average before/after "
                      f"{load_before:.2f}/{meta['load_average_before_after'][1]:.2f}", "",
                      table(runs), "", *verdict(runs)])
    args.out.with_suffix(".md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
