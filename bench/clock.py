"""The virtual clock: synchronous against asynchronous FL on heterogeneous clients, and the clock's own cost.

    python bench/clock.py compare [--rounds 40]   # digits Dirichlet(0.5), speeds spread 10x
    python bench/clock.py cost [--rounds 3]       # 10,000 clients: async (1,000 concurrent) vs sync
    python bench/clock.py favano [--rounds 200]   # FAVANO's wake period: virtual seconds and wakes to 0.85

compare: virtual seconds to 0.85 central accuracy (evaluation.target_accuracy) of synchronous FedAvg
(10 clients a round), the same with 30% over-selection, FedBuff (buffer 10, concurrency 20), the general
buffered rule of Fraboni et al. (the same, client weights p_i / f_i) and FAVANO (10 clients' current models
averaged every 0.05 virtual seconds) at the same number of client updates; then a bandwidth-bound system (0.1 Mbps uplinks) without and with top-k
compression (k = 0.25, error feedback). cost: wall seconds of an asynchronous FedBuff run of 10,000
synthetic clients with 1,000 training at once (buffer 1,000) against the synchronous vectorized run of
1,000 clients a round, the same number of client updates, run one after the other with the load average.
favano: FAVANO (10 clients a wake) on compare's setting with a wake every 0.025, 0.05 and 0.1 virtual
seconds, --rounds wakes each (rounds_to_0.85: the first wake at 0.85).
Markdown tables on stdout; bench/results/clock_<part>.json.
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
COMMON = ["data.n_clients=100", "partition.options={alpha = 0.5}", "evaluation.federated=false", "output.save=false",
          "output.progress=false", "evaluation.target_accuracy=0.85", "system.profile=sampled",
          "system.speed_spread=10", "engine.name=vectorized"]
COMPARE = {
    "sync FedAvg": [],
    "sync FedAvg, 30% over-selection": ["system.over_selection=0.3"],
    "FedBuff (K=10, C=20)": ["mode=asynchronous", "asynchronous.concurrency=20", "asynchronous.buffer_size=10"],
    "Fraboni et al., unbiased weights (K=10, C=20)": [
        "mode=asynchronous", "asynchronous.algorithm=fraboni", "asynchronous.concurrency=20",
        "asynchronous.buffer_size=10"],
    "FAVANO (s=10, a wake every 0.05 s)": ["mode=asynchronous", "asynchronous.algorithm=favano",
                                           "asynchronous.clients_per_update=10", "asynchronous.period_s=0.05"],
    "sync FedAvg, 0.1 Mbps uplink": ["system.bandwidth_classes=[{up_mbps = 0.1, down_mbps = 1.0}]"],
    "sync FedAvg, 0.1 Mbps uplink, top-k 0.25 + EF": [
        "system.bandwidth_classes=[{up_mbps = 0.1, down_mbps = 1.0}]", "compression.name=topk",
        "compression.options={k = 0.25}", "compression.feedback=ef"],
}


def _row(name: str, result, wall: float) -> dict:
    history = result.history
    target = result.summary.get("time_to_target") or {}
    return {"run": name, "client_updates": sum(r.get("n_sampled", 0) - r.get("n_cancelled", 0) for r in history),
            "virtual_s_to_0.85": target.get("virtual_seconds"), "rounds_to_0.85": target.get("round"),
            "mean_round_virtual_s": sum(r["round_virtual_seconds"] for r in history) / len(history),
            "final_accuracy": result.final.get("central_accuracy"), "wall_s": wall,
            "local_progress_mean": _mean(history, "local_progress_mean"), "staleness_mean": _mean(history, "staleness_mean"),
            "load_average": os.getloadavg()[0]}


def _mean(history: list[dict], key: str) -> float | None:
    """The mean of a per-round key over the rounds that have it (None: no round has it)."""
    values = [r[key] for r in history if key in r]
    return sum(values) / len(values) if values else None


def compare(rounds: int) -> list[dict]:
    rows = []
    for name, extra in COMPARE.items():
        began = time.perf_counter()
        result = run(None, [*COMMON, f"rounds={rounds}", *extra])
        rows.append(_row(name, result, time.perf_counter() - began))
        print(rows[-1], flush=True)
    return rows


def favano(rounds: int) -> list[dict]:
    rows = []
    for period in (0.025, 0.05, 0.1):
        began = time.perf_counter()
        result = run(None, [*COMMON, f"rounds={rounds}", "mode=asynchronous", "asynchronous.algorithm=favano",
                            "asynchronous.clients_per_update=10", f"asynchronous.period_s={period}"])
        rows.append(_row(f"FAVANO (s=10, a wake every {period} s)", result, time.perf_counter() - began))
        print(rows[-1], flush=True)
    return rows


def _blobs(n_clients: int) -> Path:
    """A generated npz of 20 examples a client (20 features, 10 Gaussian classes), cached."""
    import numpy as np

    path = Path(__file__).parent / ".cache" / f"clock_blobs_{n_clients}.npz"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        y = rng.integers(0, 10, 25 * n_clients)
        x = (rng.normal(size=(10, 20))[y] + rng.normal(size=(len(y), 20))).astype(np.float32)
        np.savez(path, x=x, y=y)
    return path


def cost(rounds: int) -> list[dict]:
    common = ["data.dataset=npz", f"data.options={{path = {str(_blobs(10_000))!r}}}", "data.n_clients=10000",
              "partition.name=iid", "model.name=logistic", "client.epochs=1", "evaluation.every=1000",
              "evaluation.federated=false", "output.save=false", "output.progress=false", "system.profile=sampled",
              "system.speed_spread=10", "engine.name=vectorized", f"rounds={rounds}"]
    runs = {"sync vectorized, 1,000 clients a round": ["sampling.clients_per_round=1000"],
            "async FedBuff, 1,000 concurrent, K=1,000": ["mode=asynchronous", "asynchronous.concurrency=1000",
                                                         "asynchronous.buffer_size=1000"]}
    rows = []
    for name, extra in runs.items():
        began = time.perf_counter()
        result = run(None, [*common, *extra])
        rows.append({"run": name, "client_updates": sum(r["n_sampled"] for r in result.history),
                     "wall_s": time.perf_counter() - began, "load_average": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    rows[1]["wall_ratio_async_over_sync"] = rows[1]["wall_s"] / rows[0]["wall_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["compare", "cost", "favano"])
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    part, default_rounds = {"compare": (compare, 40), "cost": (cost, 3), "favano": (favano, 200)}[args.part]
    rows = part(args.rounds or default_rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"clock_{args.part}.json").write_text(json.dumps(rows, indent=2))
    print(rows_table(rows))


if __name__ == "__main__":
    main()
