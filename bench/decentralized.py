"""Decentralized accuracy by graph: does a denser graph learn better, and does
gradient tracking narrow the ring's gap?

    python bench/decentralized.py [--seeds 0,1,2,3,4] [--rounds 30]

Issue #5's experiment: digits, Dirichlet(0.1) over 64 nodes (every node trains,
no held-out local test sets), the default MLP (64-64-10), 5 local SGD steps of batch 8 at
lr 0.1, then one gossip step with Metropolis-Hastings weights, 30 rounds; the
complete, exponential, torus (8 x 8) and ring graphs, D-SGD and gradient
tracking (K-GT). Each run is ``fedloom.run`` with config overrides. Reported,
mean over the seeds (each seed redraws the partition and the initial model):
accuracy of the averaged model x_bar on the global test set, mean and worst node
accuracy, consensus distance, and the spectral gap of each graph's W.

Writes bench/results/decentralized.json (every run) and .md (the table), prints
the table and whether the expected ordering holds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from decentralized_scale import source_state
from fedloom import run

GRAPHS = ["complete", "exponential", "torus", "ring"]  # densest first: the expected accuracy order
ALGORITHMS = {"dsgd": "D-SGD", "gradient_tracking": "gradient tracking"}
METRICS = ["xbar_accuracy", "node_accuracy_mean", "node_accuracy_min", "consensus_distance"]
RESULTS = Path(__file__).resolve().parent / "results"


def overrides(graph: str, algorithm: str, seed: int, rounds: int) -> list[str]:
    return ['mode="decentralized"', "output.save=false", "output.progress=false", f"seed={seed}",
            f"rounds={rounds}", f"evaluation.every={rounds}", "evaluation.federated=false",
            "data.dataset=digits", "data.n_clients=64", "data.client_test_fraction=0",
            "partition.name=dirichlet", "partition.options.alpha=0.1",
            "client.steps=5", "client.batch_size=8", "client.lr=0.1",
            f"topology.name={graph}", f"decentralized.algorithm={algorithm}"]


def run_one(graph: str, algorithm: str, seed: int, rounds: int) -> dict:
    result = run(None, overrides(graph, algorithm, seed, rounds))
    return {"graph": graph, "algorithm": algorithm, "seed": seed, "spectral_gap": result.summary["spectral_gap"],
            **{m: result.final[m] for m in METRICS}}


def summarize(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (graph, algorithm): the mean of each metric over seeds, and its min and max."""
    table = {}
    for graph in GRAPHS:
        for algorithm in ALGORITHMS:
            rows = [r for r in runs if r["graph"] == graph and r["algorithm"] == algorithm]
            row = {"spectral_gap": rows[0]["spectral_gap"], "seeds": len(rows)}
            for m in METRICS:
                values = [r[m] for r in rows]
                row.update({m: statistics.fmean(values), f"{m}_min": min(values), f"{m}_max": max(values)})
            table[graph, algorithm] = row
    return table


def _by_seed(runs: list[dict], graph: str, algorithm: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in runs if r["graph"] == graph and r["algorithm"] == algorithm}


def ordering(runs: list[dict], table: dict[tuple[str, str], dict], algorithm: str, metric: str) -> str:
    """Whether the seed mean of ``metric`` falls from the densest graph to the sparsest; a
    reversal says on how many seeds (same partition and start for both graphs) it occurs."""
    order = "densest first: " + ", ".join(f"{g} {table[g, algorithm][metric]:.3f}" for g in GRAPHS)
    reversals = []
    for denser, sparser in zip(GRAPHS, GRAPHS[1:]):
        excess = table[sparser, algorithm][metric] - table[denser, algorithm][metric]
        if excess > 0:
            d, s = _by_seed(runs, denser, algorithm, metric), _by_seed(runs, sparser, algorithm, metric)
            reversals.append(f"{sparser} above {denser} by {excess:.3f} on average, higher on "
                             f"{sum(s[k] > d[k] for k in d)} of {len(d)} seeds")
    if not reversals:
        return f"holds ({order})"
    return f"does NOT hold strictly ({order}): {'; '.join(reversals)}"


def ordering_notes(runs: list[dict], table: dict[tuple[str, str], dict]) -> list[str]:
    """The two claims of the issue, on x_bar accuracy and, for contrast, on the nodes' own models."""
    metrics = (("xbar_accuracy", "x_bar accuracy"), ("node_accuracy_mean", "mean node accuracy"))
    notes = [f"{label}, {what}: denser graph, better: {ordering(runs, table, algorithm, metric)}"
             for algorithm, label in ALGORITHMS.items() for metric, what in metrics]
    for metric, what in metrics:
        gaps = {a: table["complete", a][metric] - table["ring", a][metric] for a in ALGORITHMS}
        narrows = gaps["gradient_tracking"] < gaps["dsgd"]
        verdict = "narrows" if narrows else "does NOT narrow"
        notes.append(f"ring's gap to complete in {what}: D-SGD {gaps['dsgd']:.3f}, gradient tracking "
                     f"{gaps['gradient_tracking']:.3f}: gradient tracking {verdict} it")
    return notes


def markdown(table: dict[tuple[str, str], dict], notes: list[str], meta: dict) -> str:
    dirty = f" + uncommitted changes to {len(meta['modified'])} files (listed in the JSON)" if meta["modified"] else ""
    lines = [f"**decentralized** (`{meta['command']}`): digits, Dirichlet(0.1), 64 nodes, MLP 64-64-10, 5 local "
             f"steps of batch 8, lr 0.1, {meta['rounds']} rounds, seeds {meta['seeds']} — {meta['date']}, torch "
             f"{meta['torch']}, fedloom {meta['commit']}{dirty}; load average before/after "
             f"{meta['loadavg_before'][0]:.2f}/"
             f"{meta['loadavg_after'][0]:.2f}", "",
             "| graph | spectral gap | algorithm | x_bar accuracy (min-max) | mean node accuracy | "
             "worst node accuracy | consensus distance |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for (graph, algorithm), row in table.items():
        lines.append(f"| {graph} | {row['spectral_gap']:.4f} | {ALGORITHMS[algorithm]} | {row['xbar_accuracy']:.3f} "
                     f"({row['xbar_accuracy_min']:.3f}-{row['xbar_accuracy_max']:.3f}) | "
                     f"{row['node_accuracy_mean']:.3f} | "
                     f"{row['node_accuracy_min']:.3f} | {row['consensus_distance']:.3g} |")
    return "\n".join([*lines, "", *(f"- {note}" for note in notes)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)  # accuracy only: leave the other core to the machine's other users
    seeds = [int(s) for s in args.seeds.split(",")]
    load_before = os.getloadavg()
    runs = [run_one(g, a, s, args.rounds) for g in GRAPHS for a in ALGORITHMS for s in seeds]
    table = summarize(runs)
    notes = ordering_notes(runs, table)
    meta = {"command": " ".join(["python", f"bench/{Path(__file__).name}", *sys.argv[1:]]),
            "rounds": args.rounds, "seeds": seeds,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            **source_state(),
            "overrides_example": overrides("ring", "dsgd", seeds[0], args.rounds)}
    text = markdown(table, notes, meta)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decentralized.json").write_text(json.dumps(
        {"meta": meta, "runs": runs, "table": [{"graph": g, "algorithm": a, **row} for (g, a), row in table.items()],
         "notes": notes}, indent=2) + "\n")
    (RESULTS / "decentralized.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
