"""Personalization on label skew: each method's personalized models against the global FedAvg model.

    python bench/personalization.py [--rounds 20] [--seeds 0 1 2] [--out personalization]

digits, 20 clients of 2 classes each (shards), 10 sampled a round, an MLP (hidden 32), one local
epoch, FedAvg's server. Every method trains with the same config and seed; the number compared is
the mean over clients of each client's accuracy on its own test split: the personalized models'
(``personal_accuracy_client_mean``) and, for "fedavg (global)", the global model of the finetune run,
whose training is FedAvg's unchanged (``federated_accuracy_client_mean``), and for "fedloge (generic)"
FedLoGe's realigned global model on the same splits. FedCAC's fedcac_beta (the rounds its collaboration
bar takes to reach the largest overlap) is a third of the rounds, the paper's ratio (100 of 300 rounds).
"fedlaw (global)" is a global aggregation against that FedAvg row: the finetune run with FedLAW's learned
aggregation (``server.transforms = [{name = "fedlaw"}]``), its global model's mean per-client accuracy.
The central test accuracy of each global model is in the JSON. ``--methods`` runs a subset (finetune,
whose run gives the FedAvg row, always). One ``fedloom.run`` per cell, no run directory. Writes
bench/results/<out>.json (every cell, seed and config) and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, fedloom_commit, machine  # noqa: E402

from fedloom import run  # noqa: E402

METHODS = ("finetune", "fedper", "fedrep", "fedbabu", "ditto", "fedcac", "fedloge", "apfl")
AGGREGATIONS = {"fedlaw": ["server.transforms=[{name='fedlaw'}]"]}  # global models against FedAvg's, finetune's runs
KEY, GLOBAL_KEY = "personal_accuracy_client_mean", "federated_accuracy_client_mean"


def config(method: str, seed: int, rounds: int) -> list[str]:
    """A contestant's overrides: a personalization method, or an aggregation (on the finetune run)."""
    if method in AGGREGATIONS:
        return [*config("finetune", seed, rounds), *AGGREGATIONS[method]]
    return ["data.dataset=digits", "data.n_clients=20", "partition.name=shards",
            "partition.options={classes_per_client=2}", "model.name=mlp", "model.options={hidden=[32]}",
            "sampling.clients_per_round=10", "client.epochs=1", "client.lr=0.1", "client.batch_size=16",
            f"rounds={rounds}", f"seed={seed}", f"evaluation.every={rounds}", "output.save=false",
            "output.progress=false", f"personalization.method={method}", *options(method, rounds)]


def options(method: str, rounds: int) -> list[str]:
    """A method's own settings where its default is sized for another run length."""
    return [f"personalization.fedcac_beta={max(1, rounds // 3)}"] if method == "fedcac" else []


def cell(method: str, seed: int, rounds: int) -> dict:
    start = time.perf_counter()
    final = run(None, config(method, seed, rounds)).final
    return {"method": method, "seed": seed, "personal": final[KEY], "global": final[GLOBAL_KEY],
            "central": final["central_accuracy"],
            "personal_worst10": final["personal_accuracy_worst10"], "seconds": time.perf_counter() - start}


def table(cells: list[dict], seeds: list[int], methods: list[str]) -> str:
    rows = {"fedavg (global)": {c["seed"]: c["global"] for c in cells if c["method"] == "finetune"}}
    rows.update({f"{m} (global)": {c["seed"]: c["global"] for c in cells if c["method"] == m}
                 for m in methods if m in AGGREGATIONS})
    rows.update({m: {c["seed"]: c["personal"] for c in cells if c["method"] == m} for m in methods
                 if m in METHODS})
    if "fedloge" in methods:
        rows["fedloge (generic)"] = {c["seed"]: c["global"] for c in cells if c["method"] == "fedloge"}
    head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |\n|---|" + "---|" * (len(seeds) + 1)
    lines = [f"| {m} | " + " | ".join(f"{by_seed[s]:.4f}" for s in seeds)
             + f" | {statistics.mean(by_seed.values()):.4f} |" for m, by_seed in rows.items()]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="personalization")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, *AGGREGATIONS], default=[*METHODS, *AGGREGATIONS])
    args = parser.parse_args()
    methods = ["finetune", *(m for m in args.methods if m != "finetune")]
    load = os.getloadavg()[0]
    cells = [cell(m, s, args.rounds) for s in args.seeds for m in methods]
    md = table(cells, args.seeds, methods)
    RESULTS.mkdir(exist_ok=True)
    meta = {"commit": fedloom_commit(), "machine": machine(), "load_average_at_start": load,
            "load_average_at_end": os.getloadavg()[0],
            "config": {m: config(m, 0, args.rounds) for m in methods}, "cells": cells}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(meta, indent=2))
    (RESULTS / f"{args.out}.md").write_text(
        f"Mean per-client accuracy on the clients' own test splits, {args.rounds} rounds "
        f"(python bench/personalization.py --rounds {args.rounds} --seeds {' '.join(map(str, args.seeds))}"
        f"{' --methods ' + ' '.join(args.methods) if methods != [*METHODS, *AGGREGATIONS] else ''}"
        f" --out {args.out})\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
