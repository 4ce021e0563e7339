"""Full decentralized training rounds on 1,000 nodes (or --nodes N): seconds per round, where
they go, and peak memory.

    python bench/decentralized_scale.py [--rounds 8] [--graphs ring,exponential] [--algorithms dsgd,gradient_tracking]
                                        [--threads 1] [--profile] [--out bench/results/decentralized_scale]
                                        [--nodes 10000 --no-evaluation]

Issue #5's scale target: 1,000 nodes, multinomial logistic regression on
Synthetic(1, 1) (1,000 natural clients, one per node), ring and exponential
graphs, vectorized engine: under 0.5 s per round and under 4 GiB. A round is
what ``fedloom run`` does in a decentralized round: 5 local SGD steps of batch 16
(lr 0.05) on every node in the vectorized engine, the gossip step, consensus
distance and byte counts. Evaluating all 1,000 node models on the 71,598 test
examples costs far more than that round, so ``evaluation.every = rounds`` keeps it
to the last round and it is reported on its own ("evaluation s"); ``--no-evaluation``
leaves it out (at 10,000 nodes it scores 10,000 models on every test example: the run
asks for one more round than it plays, so no played round evaluates).

Each configuration runs in a fresh process (its peak RSS, from getrusage, is its
own) with one torch thread by default, as in the W benchmarks (``--threads 2``
to use both cores). Reported: build
seconds (data, model, engine, graph), first round, steady seconds per round
(median of rounds 2 .. rounds-1, the rounds without evaluation) and the CPU
seconds the process used in them (steadier than wall time when other processes
load the machine), split into local training (``engine.run_round``), W (the
round's mixing matrix), gossip (``algorithm.mix``) and the rest; one evaluation;
peak RSS. Writes bench/results/decentralized_scale.json and .md (``--out``) and prints
the table; ``--profile`` adds a cProfile of one more round of each configuration.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import json
import os
import resource
import pstats
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_NODES, TARGET_SECONDS, TARGET_GIB = 1000, 0.5, 4.0
PARTS = {"train": ("engine", "run_round"), "W": ("topology", "mixing"), "gossip": ("algorithm", "mix"),
         "evaluation": ("round_", "evaluate")}


def overrides(graph: str, algorithm: str, rounds: int, nodes: int = 1000, evaluate: bool = True) -> list[str]:
    planned = rounds if evaluate else rounds + 1
    return ['mode="decentralized"', "output.save=false", "output.progress=false", f"rounds={planned}",
            f"evaluation.every={planned}", "evaluation.federated=false",
            'data.dataset="synthetic"', f"data.options.n_clients={nodes}", f"data.n_clients={nodes}",
            "data.client_test_fraction=0", "partition.name=natural", "model.name=logistic", "engine.name=vectorized",
            "client.steps=5", "client.batch_size=16", "client.lr=0.05",
            f"topology.name={graph}", f"decentralized.algorithm={algorithm}"]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _time_calls(owner, method: str, seconds: list[float]) -> None:
    """Replace ``owner.method`` by a wrapper adding each call's wall time to ``seconds[-1]``."""
    inner = getattr(owner, method)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[-1] += time.perf_counter() - start

    setattr(owner, method, timed)


def _timed_rounds(exp, rounds: int) -> tuple[list[dict], list[float], dict[str, list[float]], float]:
    """Run the rounds: their records, CPU seconds, seconds per part, and peak RSS before
    the last round (the one that evaluates)."""
    parts: dict[str, list[float]] = defaultdict(list)
    for part, (owner, method) in PARTS.items():
        _time_calls(getattr(exp, owner), method, parts[part])
    records, cpu_s = [], []
    for r in range(1, rounds + 1):
        if r == rounds:
            rss_before_evaluation = _peak_rss_mib()
        for seconds in parts.values():
            seconds.append(0.0)
        cpu_start = time.process_time()
        records.append(exp.round(r))
        cpu_s.append(time.process_time() - cpu_start)
    return records, cpu_s, parts, rss_before_evaluation


def _profile_round(exp, round_idx: int, path: Path) -> None:
    """cProfile of one more round (past the last, so it does not evaluate), by own time."""
    profiler = cProfile.Profile()
    profiler.runcall(exp.round, round_idx)
    with path.open("w") as out:
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)


def measure(graph: str, algorithm: str, rounds: int, threads: int, profile: bool, nodes: int = 1000,
            evaluate: bool = True) -> dict:
    torch.set_num_threads(threads)
    from fedloom.config import load_config  # imported here: the spawned process pays its own imports
    from fedloom.rounds.decentralized import DecentralizedRound
    from fedloom.runner import Stepper

    cfg = load_config(None, overrides(graph, algorithm, rounds, nodes, evaluate))
    start = time.perf_counter()
    exp = Stepper(DecentralizedRound(cfg))
    build_s = time.perf_counter() - start
    rss_built = _peak_rss_mib()
    records, cpu_s, parts, rss_before_evaluation = _timed_rounds(exp, rounds)
    rss_end = _peak_rss_mib()
    if profile:
        _profile_round(exp, rounds + 1, RESULTS / f"decentralized_scale-profile-{graph}-{algorithm}.txt")
    steady = slice(1, rounds - 1)  # not the first round (warm-up), not the last (evaluation)
    round_s = [rec["round_seconds"] for rec in records]
    split = {part: statistics.median(s[steady]) for part, s in parts.items() if part != "evaluation"}
    steady_s = statistics.median(round_s[steady])
    return {"graph": graph, "algorithm": algorithm, "n": exp.data.n_clients, "d": exp.spec.dim,
            "examples": len(exp.data.y), "test_examples": len(exp.data.y_test), "rounds": rounds,
            "threads": threads, "build_s": build_s, "first_round_s": round_s[0], "steady_s": steady_s,
            "steady_cpu_s": statistics.median(cpu_s[steady]), "round_s": round_s, "round_cpu_s": cpu_s,
            **{f"{part}_s": s for part, s in split.items()}, "other_s": steady_s - sum(split.values()),
            "evaluation_s": parts["evaluation"][-1] if evaluate else None, "evaluation_round_cpu_s": cpu_s[-1],
            "peak_rss_built_mib": rss_built, "peak_rss_before_evaluation_mib": rss_before_evaluation,
            "peak_rss_mib": rss_end, "spectral_gap": exp.describe(exp.state)["spectral_gap"],
            **{k: records[-1].get(k) for k in ("xbar_accuracy", "node_accuracy_mean", "consensus_distance")}}


def source_state() -> dict:
    """The commit measured and which fedloom files differ from it (others edit this checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS.parent.parent).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": git("diff", "--name-only", "HEAD", "--", "fedloom").split()}


def verdict(r: dict) -> str:
    if r["n"] != TARGET_NODES:
        return f"(the targets are for {TARGET_NODES:,} nodes)"
    fast = r["steady_s"] < TARGET_SECONDS
    small = r["peak_rss_mib"] / 1024 < TARGET_GIB
    return ("both targets reached" if fast and small else
            "; ".join(([] if fast else [f"steady {r['steady_s']:.2f} s/round, target {TARGET_SECONDS} s"])
                      + ([] if small else [f"peak {r['peak_rss_mib'] / 1024:.1f} GiB, target {TARGET_GIB} GiB"])))


def _number(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: list[dict], meta: dict) -> str:
    first = results[0]
    dirty = f" + uncommitted changes to {len(meta['modified'])} files (listed in the JSON)" if meta["modified"] else ""
    lines = [f"**decentralized-scale** (`{meta['command']}`): Synthetic(1,1), {first['n']:,} nodes "
             f"({first['examples']:,} training examples, {first['test_examples']:,} test examples), logistic "
             f"regression (d = {first['d']}), vectorized engine, 5 local steps of batch 16, lr 0.05, "
             f"{meta['rounds']} rounds, {first['threads']} torch thread(s) — {meta['date']}, torch {meta['torch']}, "
             f"fedloom {meta['commit']}{dirty}; load average before/after "
             f"{meta['loadavg_before'][0]:.2f}/{meta['loadavg_after'][0]:.2f}", "",
             "| graph | algorithm | spectral gap | build s | first round s | steady s/round | steady CPU s/round | "
             "train s | W s | gossip s | other s | evaluation s (once) | "
             "peak RSS MiB (built / before eval / end) | x_bar acc | target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(
            f"| {r['graph']} | {r['algorithm']} | {r['spectral_gap']:.2g} | {r['build_s']:.2f} | "
            f"{r['first_round_s']:.3f} | **{r['steady_s']:.3f}** | {r['steady_cpu_s']:.3f} | {r['train_s']:.3f} | "
            f"{r['W_s']:.4f} | {r['gossip_s']:.4f} | {r['other_s']:.4f} | {_number(r['evaluation_s'], 2)} | "
            f"{r['peak_rss_built_mib']:.0f} / {r['peak_rss_before_evaluation_mib']:.0f} / {r['peak_rss_mib']:.0f} | "
            f"{_number(r['xbar_accuracy'], 3)} | {verdict(r)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="at least 3: steady rounds are 2 .. rounds-1")
    parser.add_argument("--graphs", default="ring,exponential")
    parser.add_argument("--algorithms", default="dsgd,gradient_tracking")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=1000, help="nodes, one Synthetic(1,1) client each")
    parser.add_argument("--no-evaluation", action="store_true", help="no round evaluates (see above)")
    parser.add_argument("--out", type=Path, default=RESULTS / "decentralized_scale",
                        help="writes OUT.json and OUT.md")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one more round of each configuration into results/")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (the first round warms up, the last one evaluates)")
    load_before = os.getloadavg()
    results = []
    for graph in args.graphs.split(","):
        for algorithm in args.algorithms.split(","):
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                results.append(pool.submit(measure, graph, algorithm, args.rounds, args.threads, args.profile,
                                           args.nodes, not args.no_evaluation).result())
    meta = {"command": " ".join(["python", f"bench/{Path(__file__).name}", *sys.argv[1:]]),
            "rounds": args.rounds, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cpus": os.cpu_count(), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), **source_state(),
            "overrides_example": overrides("ring", "dsgd", args.rounds, args.nodes, not args.no_evaluation)}
    text = markdown(results, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
