"""W5, one process: Synthetic(1,1) with 100,000 natural clients (46 million examples, 10.3 GiB of
float32 inputs), 10,000 sampled a round, logistic regression, 10 local steps of batch 8, on the
vectorized engine: build seconds (generating and dealing the data), seconds a round, and the peak
resident memory of the process.

    python bench/w5.py [--clients 100000] [--per-round 10000] [--rounds 3] [--engine vectorized]

Each run is a child process (``fedloom.run``, no run directory) so that its peak memory is its own
(``ru_maxrss`` of the child). Writes bench/results/w5.json and w5.md.

    python bench/w5.py --cluster 2 [--clients 30000 --per-round 3000] [--object-store-gb 4]

starts a Ray cluster of that many nodes on this machine (``fedloom.engines.local_cluster``: ``ray start
--head``, then ``ray start --address``, one CPU each), runs the same experiment on the Ray engine with one
vectorized worker a node, and samples the driver's and each node's memory (proportional set sizes, the
object store counted once) every half second: bench/results/w5_cluster<N>.{json,md}.
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

from fedloom.engines.local_cluster import local_cluster, process_memory, session_memory  # noqa: E402

SAMPLE_S = 0.5  # --cluster: seconds between memory samples

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


def measure(args: argparse.Namespace, cluster=None) -> dict:
    """One child run: its timings, its final metrics and its peak memory (with ``cluster``: the driver's and
    each node's peak proportional set size, sampled every SAMPLE_S)."""
    before = os.getloadavg()[0]
    config = overrides(args.clients, args.per_round, args.rounds, "ray" if cluster else args.engine)
    if cluster:
        config += [f"engine.ray_address={cluster.address}", f"engine.ray_workers={len(cluster.nodes)}"]
    env = {**(cluster.env if cluster else os.environ), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    peaks = _sample_peaks(child, cluster)
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"the W5 run failed (exit {child.returncode}):\n{stderr[-3000:]}")
    record = json.loads(next(text for text in stdout.splitlines() if text.startswith("W5 "))[3:])
    rounds = record["round_seconds"]
    # the last round also evaluates (evaluation.every = rounds): the steady round is the fastest of the others
    return {"config": config, "wall_s": wall, "rounds_s": rounds, "steady_s_per_round": min(rounds[1:-1] or rounds),
            "build_and_evaluation_s": record["total_s"] - sum(rounds), "final": record["final"],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, **peaks,
            "load_before": before, "load_after": os.getloadavg()[0]}


def _sample_peaks(child: subprocess.Popen, cluster) -> dict:
    """Until ``child`` exits: the peak Pss of the driver and of each node's processes (none without a cluster)."""
    if cluster is None:
        return {}
    driver, nodes = 0, [0] * len(cluster.nodes)
    while child.poll() is None:
        driver = max(driver, process_memory(child.pid))
        nodes = [max(peak, session_memory(node.pid)) for peak, node in zip(nodes, cluster.nodes)]
        time.sleep(SAMPLE_S)
    return {"driver_peak_pss_gib": driver / 2**30, "node_peak_pss_gib": [n / 2**30 for n in nodes]}


def table(result: dict, args: argparse.Namespace) -> str:
    rounds = ", ".join(f"{s:.2f}" for s in result["rounds_s"])
    where = (f"Ray engine on {args.cluster} nodes started here, one worker each" if args.cluster
             else f"one process, engine {args.engine}")
    memory = (f"driver {result['driver_peak_pss_gib']:.2f}, nodes "
              + " / ".join(f"{g:.2f}" for g in result["node_peak_pss_gib"]) if args.cluster
              else f"{result['peak_rss_gib']:.2f}")
    return "\n".join([
        f"W5 ({where}): Synthetic(1,1), {args.clients:,} natural clients, {args.per_round:,} a round, logistic, "
        f"10 local steps of 8, {args.rounds} rounds; fedloom {fedloom_commit()}, "
        f"load average before/after {result['load_before']:.2f}/{result['load_after']:.2f}", "",
        "| wall s | build + evaluation s | rounds s (the last holds the one evaluation) | steady s/round | "
        f"peak memory GiB ({'Pss' if args.cluster else 'RSS'}) | central accuracy |",
        "|---|---|---|---|---|---|",
        f"| {result['wall_s']:.1f} | {result['build_and_evaluation_s']:.1f} | {rounds} | "
        f"{result['steady_s_per_round']:.2f} | {memory} | {result['final']['central_accuracy']:.4f} |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--per-round", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine", default="vectorized", choices=["vectorized", "serial"])
    parser.add_argument("--cluster", type=int, default=0, help="run on a Ray cluster of this many nodes started "
                        "here (one CPU and one vectorized worker each)")
    parser.add_argument("--object-store-gb", type=float, default=4.0, help="--cluster: each node's object store")
    args = parser.parse_args()
    name = f"w5_cluster{args.cluster}" if args.cluster else "w5"
    if args.cluster:
        logs = Path(__file__).parent / ".cache" / f"{name}_logs"
        logs.mkdir(parents=True, exist_ok=True)
        with local_cluster(args.cluster, logs, object_store_bytes=int(args.object_store_gb * 2**30)) as cluster:
            result = measure(args, cluster)
    else:
        result = measure(args)
    result = {**result, "machine": machine(), "commit": fedloom_commit()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result, args)
    (RESULTS / f"{name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
