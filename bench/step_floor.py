"""The per-step floor: milliseconds per sequential local step of one client training alone
(W4's longest client is such a tail of 650-1,850 steps), for logistic regression and the
60-32-10 MLP, with the vectorized engine's fused step and its general vmap step side by
side in one process, and a round of 1,000 clients whose last one trains alone the longest.

    python bench/step_floor.py [--steps 1000] [--repeats 3]

Prints a Markdown table (median of the repeats) with the load average before and after.
Target (issue #20): under 0.15 ms a step on the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fedloom.core.local_optim import SGD
from fedloom.core.store import ClientStore
from fedloom.data.federated import FederatedData
from fedloom.engines.base import LocalTraining
from fedloom.engines.vectorized import VectorizedEngine
from fedloom.algorithms.fedavg import FedAvg
from fedloom.models import logistic, mlp
from fedloom.tasks import Classification

FEATURES, CLASSES, BATCH = 60, 10, 16


def federation(sizes: list[int]) -> FederatedData:
    """Clients of the given sizes over random Synthetic-shaped examples (60 features, 10 classes)."""
    gen = torch.Generator().manual_seed(0)
    n = sum(sizes)
    x, y = torch.randn(n, FEATURES, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    train = [torch.arange(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    return FederatedData(x, y, train, [torch.zeros(0, dtype=torch.long)] * len(sizes), x[:1], y[:1], CLASSES)


def seconds(engine: VectorizedEngine, clients: list[int], repeats: int) -> float:
    x0 = engine.spec.flatten(engine.model)
    times = []
    for r in range(repeats + 1):  # the first is a warm-up
        t = time.perf_counter()
        engine.run_round(FedAvg(), x0, {}, clients, r, ClientStore())
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    alone = federation([args.steps * BATCH])
    # a W4-like round: 999 clients of 1-40 steps and one of args.steps, trained together
    sizes = [BATCH * (1 + i % 40) for i in range(999)] + [args.steps * BATCH]
    crowd = federation(sizes)
    local = LocalTraining(SGD(0.05), 1, BATCH, 0)
    rows = []
    for name, build in [("logistic", lambda: logistic((FEATURES,), CLASSES)),
                        ("mlp 60-32-10", lambda: mlp((FEATURES,), CLASSES, hidden=(32,)))]:
        ms = {}
        for mode in ("off", "auto"):
            one = VectorizedEngine(build(), alone, local, Classification(CLASSES), fused=mode)
            many = VectorizedEngine(build(), crowd, local, Classification(CLASSES), fused=mode)
            ms[mode] = (1e3 * seconds(one, [0], args.repeats) / args.steps,
                        seconds(many, list(range(len(sizes))), args.repeats))
        rows.append(f"| {name} | {ms['off'][0]:.3f} | {ms['auto'][0]:.3f} | {ms['off'][0] / ms['auto'][0]:.2f}x "
                    f"| {ms['off'][1]:.3f} | {ms['auto'][1]:.3f} | {ms['off'][1] / ms['auto'][1]:.2f}x |")
    print(f"load average before/after {load_before:.2f}/{os.getloadavg()[0]:.2f}; one thread; "
          f"{args.steps} steps of batch {BATCH}; median of {args.repeats}\n")
    print("| model | ms/step vmap | ms/step fused | speedup | 1,000-client round s, vmap | fused | speedup |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
