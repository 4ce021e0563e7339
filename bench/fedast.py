"""Simultaneous training of three models on one federation: FedAST against Sync-ST, virtual time to train
every task to its target.

    python bench/fedast.py [--seeds 0 1 2] [--rounds 3000]

100 clients (speeds spread 10x, system.device_flops = 1e8 so a client's compute follows each model's FLOPs),
three tasks: digits MLP (Dirichlet 0.5, target 0.85), digits logistic (Dirichlet 0.1, target 0.80) and
Synthetic(1,1) logistic (IID over the 100 clients, target 0.70), 10 active clients each (30 in all).
Contestants: Sync-ST (every round each task trains its 10 clients, the round waits for the slowest),
FedAST with static buffers of 3, and FedAST with Realloc (buffer_ratio 3). Reported per run: virtual
seconds until the last task reached its target (time_to_all_targets), each task's own, client updates
(jobs whose update was used) and wall seconds, with the load average. Markdown on stdout;
bench/results/fedast.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import rows_table

from fedloom.runner import run

RESULTS = Path(__file__).parent / "results"
TASK = ["client.epochs=1", "asynchronous.concurrency=10", "asynchronous.buffer_size=3", "evaluation.every=2"]
TASKS = [
    {"name": "digits_mlp", "set": [*TASK, "model.name=mlp", "evaluation.target_accuracy=0.85"]},
    {"name": "digits_logistic", "set": [*TASK, "model.name=logistic", "partition.options={alpha = 0.1}",
                                        "evaluation.target_accuracy=0.80"]},
    {"name": "synthetic", "set": [*TASK, "data.dataset=synthetic", "partition.name=iid", "model.name=logistic",
                                  "evaluation.target_accuracy=0.70"]},
]
CONTESTANTS = {
    "Sync-ST": {"algorithm": "sync"},
    "FedAST, static buffers of 3": {"algorithm": "fedast", "realloc": False, "buffer_ratio": 3},
    "FedAST, Realloc (buffer_ratio 3)": {"algorithm": "fedast", "realloc": True, "buffer_ratio": 3},
}


def experiment(simultaneous: dict, seed: int, rounds: int) -> dict:
    return {"mode": "simultaneous", "seed": seed, "rounds": rounds, "data": {"n_clients": 100},
            "system": {"profile": "sampled", "speed_spread": 10.0, "device_flops": 1e8},
            "evaluation": {"federated": False, "every": 100_000}, "engine": {"name": "vectorized"},
            "output": {"save": False, "progress": False}, "simultaneous": {**simultaneous, "tasks": TASKS}}


def measure(name: str, simultaneous: dict, seed: int, rounds: int) -> dict:
    began = time.perf_counter()
    result = run(experiment(simultaneous, seed, rounds))
    tasks = result.summary["tasks"]
    row = {"run": name, "seed": seed, "time_to_all_targets": result.summary["time_to_all_targets"],
           **{f"{n}_s": (t["reached"] or {}).get("virtual_seconds") for n, t in tasks.items()},
           "client_updates": sum(r["n_sampled"] - r.get("n_rejected", 0) for r in result.history),
           "server_steps": sum(t["server_steps"] for t in tasks.values()),
           "wall_s": time.perf_counter() - began, "load_average": os.getloadavg()[0]}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3000, help="at most this many rounds (server steps) a run")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    rows = [measure(name, s, seed, args.rounds) for seed in args.seeds for name, s in CONTESTANTS.items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fedast.json").write_text(json.dumps(rows, indent=2))
    print(rows_table(rows))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
