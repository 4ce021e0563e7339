"""FedAMD (anchor sampling) against FedAvg and FedAU under unknown, heterogeneous Bernoulli participation
(examples/fedau_participation.toml, the setting of bench/fedau.py).

    python bench/fedamd.py [--seeds 0 1 2] [--rounds 150] [--last 3] [--anchor-probability 0.2]
                           [--anchor-batch-size 0] [--methods fedavg fedau fedamd]

For each seed the three methods run the same federation, the same participation probabilities and the
same participants every round: FedAvg (the participants' example-weighted mean), FedAU (bench/fedau.py)
and FedAMD (each participant an anchor with the given probability; the miners' rows averaged as FedAvg's).
Prints the central test accuracy at the end and the mean of the last ``--last`` evaluations, per seed and
averaged, as a markdown table, and writes bench/results/fedamd_seeds_<seeds>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from fedau import accuracies, print_table  # bench/fedau.py: one run's final and tail accuracy

METHODS = {"fedavg": ["server.transforms=[]"], "fedau": []}


def fedamd_overrides(probability: float, batch_size: int) -> list[str]:
    return ["server.transforms=[]", "algorithm.name=fedamd",
            f"algorithm.options={{anchor_probability = {probability}, anchor_batch_size = {batch_size}}}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--last", type=int, default=3)
    parser.add_argument("--anchor-probability", type=float, default=0.2)
    parser.add_argument("--anchor-batch-size", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=["fedavg", "fedau", "fedamd"],
                        default=["fedavg", "fedau", "fedamd"])
    args = parser.parse_args()
    print("load average before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
          flush=True)
    every = {**METHODS, "fedamd": fedamd_overrides(args.anchor_probability, args.anchor_batch_size)}
    methods = {m: every[m] for m in args.methods}
    results: dict[str, dict[int, tuple[float, float]]] = {m: {} for m in methods}
    for seed in args.seeds:
        for method, overrides in methods.items():
            results[method][seed] = accuracies(overrides, seed, args.rounds, args.last)
            print(f"seed {seed} {method}: final {results[method][seed][0]:.3f}, last {args.last} "
                  f"{results[method][seed][1]:.3f}", flush=True)
    print("load average after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print_table(results, args.seeds, args.last)
    name = f"fedamd_seeds_{'_'.join(map(str, args.seeds))}" + ("" if len(methods) == 3 else "_" + "_".join(methods))
    out = Path(__file__).resolve().parent / "results" / f"{name}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
