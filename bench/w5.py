"""W5, one process: Synthetic(1,1) with 100,000 natural clients (46 million examples, 10.3 GiB of
float32 inputs), 10,000 sampled a round, logistic regression, 10 local steps of batch 8, on the
vectorized engine: build seconds (generating and dealing the data), seconds a round, and the peak
resident memory of the process.

    python bench/w5.py [--clients 100000] [--per-round 10000] [--rounds 3] [--engine vectorized]

Each run is a child process (``fedloom.run``, no run directory) so that its peak memory is its own
(``ru_maxrss`` of the child). Writes bench/results/w5.json and w5.md. The two-node Ray cluster half of
W5 is not here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, fedloom_commit, machine  # noqa: E402

CHILD = """
import json, sys, time
start = time.perf_counter()
from fedloom import run
result = run(None, json.loads(sys.argv[1]))
rounds = [r["round_seconds"] for r in result.history if "round_seconds" in r]
print("W5", json.dumps({"total_s": time.perf_counter() - start, "round_seconds": rounds,
                        "final": {k: result.final.get(k) for k in ("central_accuracy", "train_loss", "n_clients")}}))
"""


def overrides(clients: int, per_round: int, rounds: int, engine: str) -> list[str]:
    """The W5 experiment as config overrides."""
    return ["data.dataset=synthetic", f"data.options={{n_clients={clients}}}", "partition.name=natural",
            f"sampling.clients_per_round={per_round}", f"rounds={rounds}", "model.name=logistic",
            "client.steps=10", "client.batch_size=8", f"engine.name={engine}", f"evaluation.every={rounds}",
            "output.save=false", "output.progress=false"]


def measure(args: argparse.Namespace) -> dict:
    """One child run: its timings, its final metrics and its peak resident memory."""
    before = os.getloadavg()[0]
    config = overrides(args.clients, args.per_round, args.rounds, args.engine)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"the W5 run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    line = next(text for text in out.stdout.splitlines() if text.startswith("W5 "))
    record = json.loads(line[3:])
    rounds = record["round_seconds"]
    # the last round also evaluates (evaluation.every = rounds): the steady round is the fastest of the others
    return {"config": config, "wall_s": wall, "rounds_s": rounds, "steady_s_per_round": min(rounds[1:-1] or rounds),
            "build_and_evaluation_s": record["total_s"] - sum(rounds), "final": record["final"],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
            "load_before": before, "load_after": os.getloadavg()[0]}


def table(result: dict, args: argparse.Namespace) -> str:
    rounds = ", ".join(f"{s:.2f}" for s in result["rounds_s"])
    return "\n".join([
        f"W5 (one process): Synthetic(1,1), {args.clients:,} natural clients, {args.per_round:,} a round, logistic, "
        f"10 local steps of 8, engine {args.engine}, {args.rounds} rounds; fedloom {fedloom_commit()}, "
        f"load average before/after {result['load_before']:.2f}/{result['load_after']:.2f}", "",
        "| wall s | build + evaluation s | rounds s (the last holds the one evaluation) | steady s/round | "
        "peak RSS GiB | central accuracy |",
        "|---|---|---|---|---|---|",
        f"| {result['wall_s']:.1f} | {result['build_and_evaluation_s']:.1f} | {rounds} | "
        f"{result['steady_s_per_round']:.2f} | {result['peak_rss_gib']:.2f} | "
        f"{result['final']['central_accuracy']:.4f} |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--per-round", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine", default="vectorized", choices=["vectorized", "serial"])
    args = parser.parse_args()
    result = {**measure(args), "machine": machine(), "commit": fedloom_commit()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "w5.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result, args)
    (RESULTS / "w5.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
