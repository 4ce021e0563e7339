"""FedAU against FedAvg under unknown, heterogeneous Bernoulli participation (examples/fedau_participation.toml).

    python bench/fedau.py [--seeds 0 1 2] [--rounds 150] [--last 3]

For each seed, FedAvg (the participants' example-weighted mean) and FedAU (rows weighted by each client's
estimated participation interval, summed over all clients) run the same federation, the same participation
probabilities and the same participants every round. Prints the central test accuracy at the end, and the
mean of the last ``--last`` evaluations (less noisy), per seed and averaged, as a markdown table, and writes
bench/results/fedau_seeds_<seeds>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedloom import run

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "fedau_participation.toml"
METHODS = {"fedavg": ["server.transforms=[]"], "fedau": []}


def accuracies(method: list[str], seed: int, rounds: int, last: int) -> tuple[float, float]:
    """The final central accuracy and the mean of the last ``last`` evaluations of the config with the
    method's overrides."""
    overrides = [f"seed={seed}", f"rounds={rounds}", "output.save=false", "output.progress=false", *method]
    evaluated = [h["central_accuracy"] for h in run(CONFIG, overrides).history if "central_accuracy" in h]
    return evaluated[-1], statistics.fmean(evaluated[-last:])


def print_table(results: dict[str, dict[int, tuple[float, float]]], seeds: list[int], last: int) -> None:
    """The markdown table: each method's final accuracy (and mean of the last evaluations) per seed."""
    print(f"| method | {' | '.join(f'seed {s}' for s in seeds)} | mean final | mean of last {last} |")
    print("|---" * (len(seeds) + 3) + "|")
    for method, by_seed in results.items():
        finals = [f"{final:.3f} ({tail:.3f})" for final, tail in by_seed.values()]
        mean_final = statistics.fmean(final for final, _ in by_seed.values())
        mean_tail = statistics.fmean(tail for _, tail in by_seed.values())
        print(f"| {method} | {' | '.join(finals)} | {mean_final:.3f} | {mean_tail:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--last", type=int, default=3)
    args = parser.parse_args()
    results = {m: {s: accuracies(METHODS[m], s, args.rounds, args.last) for s in args.seeds} for m in METHODS}
    print_table(results, args.seeds, args.last)
    out = Path(__file__).resolve().parent / "results" / f"fedau_seeds_{'_'.join(map(str, args.seeds))}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
