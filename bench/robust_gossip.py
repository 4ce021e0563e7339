"""Byzantine nodes in decentralized learning: mean gossip against ClippedGossip.

    python bench/robust_gossip.py [--nodes 16 64] [--rounds 50] [--seeds 0] [--dataset digits]

D-SGD on a torus (Metropolis-Hastings weights, every node active), Dirichlet(0.5)
partition, 1/8 of the nodes Byzantine (fixed). A Byzantine node trains like an
honest one and sends its neighbours a crafted model: sign flip sends -x (He et al.'s
bit flipping), ALIE sends mean - z std of the honest nodes' models (omniscient, z from
(n, f)). ClippedGossip uses the adaptive radius: clip_delta = 0.2 clips each node's
farthest neighbour (1/5 of its weight on a torus), 0.4 its two farthest. Metrics are
over honest nodes only; "most Byzantine neighbours" is the largest number of Byzantine
neighbours an honest node has.
Writes bench/results/<out>.json and <out>.md.
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
from fedloom.attacks import Adversary  # noqa: E402
from fedloom.topology import torus  # noqa: E402

ATTACKS = {
    "clean": [],
    "signflip": ["attack.name=signflip"],
    "alie": ["attack.name=alie", "attack.omniscient=true"],
}
RULES = {"mean": ['decentralized.gossip="mean"'],
         "clipped": ['decentralized.gossip="clipped"'],
         # a node with two Byzantine neighbours out of four must clip 2/5 of its weight
         "clipped, delta 0.4": ['decentralized.gossip="clipped"', "decentralized.clip_delta=0.4"]}
METRICS = ("node_accuracy_mean", "node_accuracy_min", "xbar_accuracy", "consensus_distance")


def workload(dataset: str, nodes: int, rounds: int, seed: int) -> list[str]:
    return ["output.save=false", "output.progress=false", 'mode="decentralized"', f"seed={seed}",
            f"data.dataset={dataset}", f"data.n_clients={nodes}", "topology.name=torus", "partition.name=dirichlet",
            "partition.options.alpha=0.5", "client.epochs=1", "client.lr=0.1", f"rounds={rounds}", f"evaluation.every={rounds}",
            "evaluation.federated=false", "engine.name=vectorized"]


def most_byzantine_neighbours(nodes: int, f: int, seed: int) -> int:
    """The largest number of Byzantine neighbours of an honest node (the run's own Byzantine set)."""
    byzantine = Adversary("signflip", nodes, f, seed).fixed.tolist()
    graph = torus(nodes)
    return max((sum(byzantine[j] for j in graph[i]) for i in graph if not byzantine[i]), default=0)


def cell(nodes: int, attack: str, rule: str, args: argparse.Namespace) -> dict[str, Any]:
    f = nodes // 8 if ATTACKS[attack] else 0
    runs = []
    for seed in args.seeds:
        overrides = [*workload(args.dataset, nodes, args.rounds, seed), *ATTACKS[attack],
                     *([f"attack.f={f}"] if f else []), *RULES[rule]]
        began = time.perf_counter()
        final = run(None, overrides).final
        runs.append({"seed": seed, "overrides": overrides, "seconds": time.perf_counter() - began,
                     "most_byzantine_neighbours": most_byzantine_neighbours(nodes, f, seed),
                     **{k: final[k] for k in METRICS}})
    return {"nodes": nodes, "f": f, "attack": attack, "gossip": rule, "runs": runs,
            **{k: statistics.mean(r[k] for r in runs) for k in METRICS}}


def markdown(cells: list[dict[str, Any]]) -> str:
    lines = ["| nodes | f | most Byzantine neighbours | attack | gossip | honest node acc. mean | min | x_bar acc. "
             "| consensus distance |", "|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for c in cells:
        most = max(r["most_byzantine_neighbours"] for r in c["runs"])
        lines.append(f"| {c['nodes']} | {c['f']} | {most} | {c['attack']} | {c['gossip']} "
                     f"| {100 * c['node_accuracy_mean']:.1f} "
                     f"| {100 * c['node_accuracy_min']:.1f} | {100 * c['xbar_accuracy']:.1f} "
                     f"| {c['consensus_distance']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[16, 64], help="torus sizes (rows x cols, both >= 3)")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--out", default="robust_gossip", help="file stem under bench/results/")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; runs one after the other
    load_before, began = os.getloadavg(), time.perf_counter()
    cells = []
    for nodes in args.nodes:
        for attack in ATTACKS:
            for rule in RULES:
                cells.append(cell(nodes, attack, rule, args))
                print(markdown(cells[-1:]).splitlines()[-1], flush=True)
    record = {"dataset": args.dataset, "rounds": args.rounds, "seeds": args.seeds, "cells": cells,
              "wall_seconds": time.perf_counter() - began, "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(), "machine": machine(), "fedloom": fedloom_commit(),
              "command": " ".join(["python", "bench/robust_gossip.py", *sys.argv[1:]])}
    table = markdown(cells)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(table + "\n")
    print(f"\n{table}\n\n{record['wall_seconds']:.0f} s; wrote bench/results/{args.out}.*")


if __name__ == "__main__":
    main()
