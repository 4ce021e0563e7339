"""Where a fedloom round's time goes: cProfile of the steady rounds of a workload.

    python bench/profile_round.py w1 [--engine vectorized] [--rounds 6] [--top 25]

Builds the workload's Experiment (fedloom's own code path), runs one warm-up
round unprofiled, then profiles the remaining rounds and prints the functions
with the most cumulative and own time. One thread, like the benchmark.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

WORKLOADS = {
    "w1": ("w1", "W1"), "w2": ("w2", "W2"), "w3": ("w3", "W3"),
    "w4-logistic": ("w4", "W4_LOGISTIC"), "w4-mlp": ("w4", "W4_MLP"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--engine", default="vectorized", choices=["vectorized", "serial"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None, help="also dump the raw stats here (for snakeviz etc.)")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead of cProfile: wall time of the round's parts (timers wrapped around "
                             "fedloom's functions, no profiler overhead)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module, attr = WORKLOADS[args.workload]
    w = getattr(__import__(module), attr)

    from fedloom.config import load_config
    from fedloom.rounds import build_round
    from fedloom.runner import Stepper

    config = w.fedloom_config()
    config["rounds"] = args.rounds
    config["evaluation"]["every"] = args.rounds
    config["engine"]["name"] = args.engine
    t = time.perf_counter()
    exp = Stepper(build_round(load_config(config)))
    print(f"build_round() {time.perf_counter() - t:.2f} s, engine {exp.engine.name}, "
          f"chunk size {getattr(exp.engine, 'chunk_size', '-')}")
    t = time.perf_counter()
    exp.round(1)
    print(f"round 1 (unprofiled warm-up) {time.perf_counter() - t:.3f} s")
    if args.breakdown:
        breakdown(exp, args.rounds)
        return
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    for r in range(2, args.rounds + 1):
        exp.round(r)
    profiler.disable()
    n = args.rounds - 1
    print(f"rounds 2..{args.rounds}: {(time.perf_counter() - t) / n:.4f} s/round under cProfile")
    if args.out:
        profiler.dump_stats(args.out)
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(args.top)
        print(f"\n=== by {key} (totals over {n} rounds) ===")
        print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:12000])


def breakdown(exp, rounds: int) -> None:
    """Median per-round seconds spent in each part of a round."""
    import statistics
    from collections import defaultdict

    import fedloom.engines.vectorized as vectorized
    import fedloom.pipeline.transforms as transforms
    import fedloom.rounds.federated as federated

    spent: dict[str, float] = defaultdict(float)

    def timed(label, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t0
        return wrapper

    engine, algorithm = exp.engine, exp.algorithm
    parts = {"engine.run_round (all local training)": (engine, "run_round")}
    if hasattr(engine, "_batch_plan"):
        parts.update({"  _batch_plan (batch order + padding)": (engine, "_batch_plan"),
                      "  _step (the fused or the vmap step)": (engine, "_step"),
                      "  _stacked_states": (vectorized, "_stacked_states")})
    if hasattr(engine, "_train_client"):
        parts["  _train_client"] = (engine, "_train_client")
    parts.update({"  local optimizer step": (engine.local.optimizer, "step"),
                  "  algorithm.client_result": (algorithm, "client_result"),
                  "pipeline.apply (the server's steps)": (exp.pipeline, "apply"),
                  "evaluate": (exp.round_, "evaluate")})
    for label, (obj, attr) in parts.items():
        try:
            object.__setattr__(obj, attr, timed(label, getattr(obj, attr)))
        except AttributeError:
            pass
    transforms.reject_invalid = timed("reject_invalid", transforms.reject_invalid)
    federated.sample_clients = timed("sample_clients", federated.sample_clients)
    per_round: dict[str, list[float]] = defaultdict(list)
    totals = []
    for r in range(2, rounds + 1):
        spent.clear()
        t0 = time.perf_counter()
        exp.round(r)
        totals.append(time.perf_counter() - t0)
        for k in [*parts, "reject_invalid", "sample_clients"]:
            per_round[k].append(spent.get(k, 0.0))
    total = statistics.median(totals)
    print(f"median round {total * 1e3:.2f} ms over rounds 2..{rounds} (each part: its median over the same rounds)")
    for label in [*parts, "reject_invalid", "sample_clients"]:
        if any(per_round.get(label, [])):
            v = statistics.median(per_round[label])
            print(f"  {label:<45s} {v * 1e3:9.2f} ms  {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main()
