"""Byzantine robustness: every aggregator against every attack, final test accuracy.

    python bench/robustness.py [--dataset mnist5k] [--rounds 40] [--seeds 0 1] [--clients-per-round 50]
                               [--aggregators mean,median] [--attacks clean,signflip] [--out robustness]

50 clients, Dirichlet(0.5) partition, all 50 sampled every round (--clients-per-round), 20% (f = 10)
Byzantine clients fixed for the run, FedAvg with server learning rate 1 and each
server aggregator below. One ``fedloom.run`` per cell (vectorized engine, no run
directory). A cell whose aggregator cannot run with the sampled count is recorded
with the aggregator's own error, never filled in. Writes bench/results/<out>.json
(every cell, seed and config), <out>.md (the table) and <out>.png (heatmap).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, fedloom_commit, machine  # noqa: E402

from fedloom import run  # noqa: E402

N_CLIENTS, F = 50, 10
UPDATE_NORM = 0.5  # about the median honest update norm of a clean run (0.47 in round 40): the clipping radius

AGGREGATORS: dict[str, list[str]] = {
    "mean": [],
    "median": ["server.aggregator.name=median"],
    "trimmed_mean": ["server.aggregator.name=trimmed_mean", "server.aggregator.options.beta=0.2"],
    "krum": ["server.aggregator.name=krum", f"server.aggregator.options.f={F}"],
    "multikrum": ["server.aggregator.name=multikrum", f"server.aggregator.options.f={F}"],
    "bulyan": ["server.aggregator.name=bulyan", f"server.aggregator.options.f={F}"],
    "geomed": ["server.aggregator.name=geomed"],
    "centered_clipping": ["server.aggregator.name=centered_clipping", f"server.aggregator.options.tau={UPDATE_NORM}",
                          "server.aggregator.options.momentum=0.0"],
    "norm_clip": ["server.aggregator.name=norm_clip", f"server.aggregator.options.max_norm={UPDATE_NORM}"],
    "flag": ["server.aggregator.name=flag", "server.aggregator.options.m=5"],  # m = 1 barely trains on clean non-IID data
}

BYZANTINE = [f"attack.f={F}"]
ATTACKS: dict[str, list[str]] = {
    "clean": [],
    "signflip": ["attack.name=signflip", "attack.options.scale=5.0", *BYZANTINE],
    "gaussian": ["attack.name=gaussian", "attack.options.std=1.0", *BYZANTINE],
    "scaling": ["attack.name=scaling", *BYZANTINE],
    "alie": ["attack.name=alie", *BYZANTINE],
    "alie_omniscient": ["attack.name=alie", "attack.omniscient=true", *BYZANTINE],
    "ipm": ["attack.name=ipm", "attack.omniscient=true", *BYZANTINE],
    "label_flip": ["attack.name=label_flip", *BYZANTINE],
}
ATTACK_NOTES = {
    "clean": "no attack",
    "signflip": "each attacker sends -5 x its own update (so the mean moves backwards: 40 - 10 x 5 < 0)",
    "gaussian": "own update + N(0, 1) per coordinate",
    "scaling": "own update x 50 (model replacement: factor n)",
    "alie": "mean - z std of the attackers' own updates, z = 0.47 from (n, f) (Baruch et al.)",
    "alie_omniscient": "the same from the honest updates of the round",
    "ipm": "-0.1 x the honest mean (omniscient)",
    "label_flip": "class c -> 9 - c in the attackers' training data",
}


def workload(dataset: str, rounds: int, seed: int, sampled: int = N_CLIENTS) -> list[str]:
    return ["output.save=false", "output.progress=false", f"seed={seed}", f"data.dataset={dataset}",
            f"data.n_clients={N_CLIENTS}", f"sampling.clients_per_round={sampled}", "partition.name=dirichlet",
            "partition.options.alpha=0.5", "client.lr=0.1", "client.epochs=1", "client.batch_size=8", f"rounds={rounds}",
            f"evaluation.every={rounds}", "evaluation.federated=false", "engine.name=vectorized"]


def cell(overrides: list[str]) -> dict[str, Any]:
    """Final central accuracy of one run, or the error that stopped it (e.g. too few clients for the rule)."""
    began = time.perf_counter()
    try:
        result = run(None, overrides)
    except ValueError as err:
        return {"error": str(err), "seconds": time.perf_counter() - began}
    return {"accuracy": result.final["central_accuracy"], "seconds": time.perf_counter() - began}


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    cells = []
    for aggregator in args.aggregators:
        for attack in args.attacks:
            runs = []
            for seed in args.seeds:
                overrides = [*workload(args.dataset, args.rounds, seed, args.clients_per_round),
                             *AGGREGATORS[aggregator], *ATTACKS[attack]]
                runs.append({"seed": seed, "overrides": overrides, **cell(overrides)})
            accuracies = [r["accuracy"] for r in runs if "accuracy" in r]
            errors = [r["error"] for r in runs if "error" in r]
            entry = {"aggregator": aggregator, "attack": attack, "runs": runs,
                     "accuracy": statistics.mean(accuracies) if accuracies and not errors else None,
                     "error": errors[0] if errors else None}
            cells.append(entry)
            shown = f"{100 * entry['accuracy']:.1f}" if entry["accuracy"] is not None else f"n/a ({entry['error']})"
            print(f"{aggregator:>18} x {attack:<16} {shown}  ({sum(r['seconds'] for r in runs):.1f} s)", flush=True)
    return cells


def _lookup(cells: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["aggregator"], c["attack"]): c for c in cells}


def verdicts(cells: list[dict[str, Any]], aggregators: list[str], attacks: list[str]) -> list[str]:
    """The issue's targets: per attack, is the best aggregator within 5 points of clean FedAvg;
    does the plain mean collapse under sign flip and scaling."""
    at = _lookup(cells)
    clean = at.get(("mean", "clean"), {}).get("accuracy")
    lines = []
    if clean is None:
        return ["(no clean FedAvg cell: targets not evaluated)"]
    for attack in attacks:
        scored = [(at[(a, attack)]["accuracy"], a) for a in aggregators if at[(a, attack)]["accuracy"] is not None]
        if not scored:
            continue
        best, who = max(scored)
        gap = 100 * (best - clean)
        mark = "reached" if gap >= -5 else "NOT reached"
        lines.append(f"- {attack}: best {who} {100 * best:.1f}, {gap:+.1f} points against clean FedAvg "
                     f"{100 * clean:.1f}: {mark}")
    for attack in ("signflip", "scaling"):
        if ("mean", attack) in at and at[("mean", attack)]["accuracy"] is not None:
            lines.append(f"- plain mean under {attack}: {100 * at[('mean', attack)]['accuracy']:.1f}")
    return lines


def markdown(record: dict[str, Any]) -> str:
    at = _lookup(record["cells"])
    aggregators, attacks = record["aggregators"], record["attacks"]
    lines = [f"| aggregator | {' | '.join(attacks)} |", "|---|" + "---:|" * len(attacks)]
    footnotes: dict[str, int] = {}
    for aggregator in aggregators:
        row = []
        for attack in attacks:
            c = at[(aggregator, attack)]
            if c["accuracy"] is not None:
                row.append(f"{100 * c['accuracy']:.1f}")
            else:
                note = footnotes.setdefault(c["error"], len(footnotes) + 1)
                row.append(f"n/a [{note}]")
        lines.append(f"| {aggregator} | {' | '.join(row)} |")
    lines += [f"\n[{i}] {error}" for error, i in footnotes.items()]
    return "\n".join(lines)


def heatmap(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    at = _lookup(record["cells"])
    aggregators, attacks = record["aggregators"], record["attacks"]
    values = np.array([[at[(g, a)]["accuracy"] if at[(g, a)]["accuracy"] is not None else np.nan for a in attacks]
                       for g in aggregators], dtype=float) * 100
    fig, ax = plt.subplots(figsize=(1.1 * len(attacks) + 2.5, 0.45 * len(aggregators) + 1.5))
    cmap = matplotlib.colormaps["RdYlGn"].copy()
    cmap.set_bad("lightgray")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(len(aggregators)):
        for j in range(len(attacks)):
            ax.text(j, i, "n/a" if np.isnan(values[i, j]) else f"{values[i, j]:.0f}", ha="center", va="center",
                    fontsize=8)
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(aggregators)), aggregators)
    ax.set_title(f"{record['dataset']}: final test accuracy (%), {record['clients_per_round']} of {N_CLIENTS} "
                 f"clients a round, f = {F} Byzantine, {record['rounds']} rounds", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist5k", help="mnist5k or digits (faster)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--clients-per-round", type=int, default=N_CLIENTS,
                        help="sampled each round (bulyan needs 4f + 3 = 43, krum 2f + 3 = 23)")
    parser.add_argument("--aggregators", type=lambda s: s.split(","), default=list(AGGREGATORS))
    parser.add_argument("--attacks", type=lambda s: s.split(","), default=list(ATTACKS))
    parser.add_argument("--out", default="robustness", help="file stem under bench/results/")
    args = parser.parse_args()
    unknown = (set(args.aggregators) - set(AGGREGATORS)) | (set(args.attacks) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown {', '.join(sorted(unknown))}; aggregators: {', '.join(AGGREGATORS)}; "
                     f"attacks: {', '.join(ATTACKS)}")
    torch.set_num_threads(1)  # the machine is shared; one core per run, cells one after the other
    load_before, began = os.getloadavg(), time.perf_counter()
    cells = grid(args)
    record = {"dataset": args.dataset, "rounds": args.rounds, "seeds": args.seeds, "n_clients": N_CLIENTS, "f": F,
              "clients_per_round": args.clients_per_round,
              "aggregators": args.aggregators, "attacks": args.attacks, "attack_notes": ATTACK_NOTES,
              "aggregator_overrides": AGGREGATORS, "cells": cells, "wall_seconds": time.perf_counter() - began,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "machine": machine(),
              "fedloom": fedloom_commit(), "command": " ".join(["python", "bench/robustness.py", *sys.argv[1:]])}
    table = markdown(record)
    targets = "\n".join(verdicts(cells, args.aggregators, args.attacks))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(f"{table}\n\nTargets:\n{targets}\n")
    heatmap(record, RESULTS / f"{args.out}.png")
    print(f"\n{table}\n\nTargets:\n{targets}\n\n{record['wall_seconds']:.0f} s; wrote bench/results/{args.out}.*")


if __name__ == "__main__":
    main()
