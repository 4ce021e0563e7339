"""Model merging (fedloom.merging): a table a part, each from fedloom's own runs and functions.

    python bench/merging.py [--seeds 0,1] [--epochs 10] [--widths 16,64,256]
                            [--only rebasin,one_shot,decentralized,fedma,dimat,dimat_own_init]

1. rebasin: two MLPs trained from different initializations on the same data (MNIST-5k, one client,
   every example, ``--epochs`` passes of SGD), for several hidden widths: the loss barrier on the straight
   path between them, plain and after weight matching, activation matching and OT fusion (Git Re-Basin's
   headline; its gains grow with the width, so two hidden layers of 16, 64 and 256 units).
2. one_shot: ten clients of digits on Dirichlet(0.5) trained apart (``fedloom.merging.one_shot``), merged
   once by averaging and by each alignment; clients from their own random initializations, and from one
   shared initialization.
3. decentralized: D-SGD on a ring of 16 nodes, digits on Dirichlet(0.5): the mean node accuracy against the
   single final merge x_bar and the aligned merge (``decentralized.final_merge = "weight"``).
4. fedma: ten clients of digits on Dirichlet(0.5), each from its own random initialization, trained apart
   (``--epochs``): the clients' models averaged coordinate by coordinate against FedMA
   (``fedloom.merging.fedma``, one layer-wise pass, then with ``fedma.rounds = 2``) and its hidden width.
5. dimat: the ring of part 3 (16 nodes, digits on Dirichlet(0.5), 30 rounds of one local epoch), D-SGD against
   DIMAT (weight matching with the neighbours every round, and every 5 rounds); ``dimat_own_init``: the same
   with every node from its own random initialization (``decentralized.own_init``), D-SGD against DIMAT.

Prints markdown tables with the load average and writes bench/results/merging.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from fedloom.merging import fedma, merge_runs, one_shot
from fedloom.runner import run

RESULTS = Path(__file__).parent / "results"
WIDTHS = (16, 64, 256)
QUIET = ["output.progress=false", "evaluation.every=1000"]


def rebasin(seeds: list[int], epochs: int, widths: tuple[int, ...] = WIDTHS) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in widths:
            dirs = []
            for seed in seeds[:2] if len(seeds) >= 2 else (0, 1):
                cfg = [*QUIET, "data.dataset=mnist5k", "data.n_clients=1", "partition.name=iid", "rounds=1",
                       f"client.epochs={epochs}", "client.lr=0.05", "client.batch_size=32", "model.name=mlp",
                       f"model.options={{hidden=[{width},{width}]}}", f"seed={seed}", f"name=w{width}s{seed}"]
                dirs.append(run(None, cfg, into=Path(tmp) / f"w{width}-s{seed}").run_dir)
            row = {"width": width}
            for method in ("weight", "activation", "ot"):
                report = merge_runs(dirs, method, out=Path(tmp) / f"m{width}{method}")
                pair = report["pairs"][0]
                row.update({"barrier_plain": pair["barrier_plain"], f"barrier_{method}": pair["barrier_aligned"],
                            "ends_accuracy": [e["accuracy"] for e in report["ends"]],
                            "average_accuracy": report["average"]["accuracy"],
                            f"{method}_merged_accuracy": report["merged"]["accuracy"]})
            rows.append(row)
            print(row, flush=True)
    return rows


ONE_SHOT = ["data.dataset=digits", "data.n_clients=10", "partition.name=dirichlet",
            "partition.options={alpha=0.5}", "model.name=mlp", "model.options={hidden=[128]}", "client.lr=0.05"]


def one_shot_table(seeds: list[int], epochs: int) -> list[dict]:
    rows = []
    for same_init in (False, True):
        for seed in seeds:
            result = one_shot(None, [*ONE_SHOT, f"client.epochs={epochs}", f"seed={seed}"],
                              methods=("average", "weight", "activation", "ot"), same_init=same_init)
            table = result.table()
            row = {"same_init": same_init, "seed": seed, "client_mean": table["client_mean"]["accuracy"],
                   **{m: table[m]["accuracy"] for m in ("average", "weight", "activation", "ot")}}
            rows.append(row)
            print(row, flush=True)
    return rows


def decentralized(seeds: list[int], rounds: int = 30) -> list[dict]:
    rows = []
    for seed in seeds:
        cfg = [*QUIET, "mode=decentralized", "data.dataset=digits", "data.n_clients=16", "partition.name=dirichlet",
               "partition.options={alpha=0.5}", "topology.name=ring", f"rounds={rounds}", "client.epochs=1",
               "model.name=mlp", "model.options={hidden=[128]}", "decentralized.final_merge=weight",
               "output.save=false", f"seed={seed}"]
        s = run(None, cfg).summary
        row = {"seed": seed, "node_accuracy_mean": s["node_accuracy_mean"], "node_accuracy_min": s["node_accuracy_min"],
               "xbar_accuracy": s["xbar_accuracy"], "final_merge_accuracy": s["final_merge_accuracy"]}
        rows.append(row)
        print(row, flush=True)
    return rows


def fedma_table(seeds: list[int], epochs: int) -> list[dict]:
    rows = []
    for seed in seeds:
        for rounds in (1, 2):
            result = fedma(None, [*ONE_SHOT, "client.lr=0.2", f"client.epochs={epochs}", f"fedma.rounds={rounds}",
                                  f"seed={seed}"])
            table = result.table()
            row = {"seed": seed, "fedma_rounds": rounds, "client_mean": table["client_mean"]["accuracy"],
                   "average": table["average"]["accuracy"], "fedma": table["fedma"]["accuracy"],
                   "fedma_loss": table["fedma"]["loss"], "width": result.widths["1"]}
            rows.append(row)
            print(row, flush=True)
    return rows


RING = [*QUIET, "mode=decentralized", "data.dataset=digits", "data.n_clients=16", "partition.name=dirichlet",
        "partition.options={alpha=0.5}", "topology.name=ring", "client.epochs=1", "model.name=mlp",
        "model.options={hidden=[128]}", "output.save=false"]


SHARED_INIT = {"dsgd": ["decentralized.algorithm=dsgd"], "dimat": ["decentralized.algorithm=dimat"],
               "dimat_every_5": ["decentralized.algorithm=dimat", "decentralized.dimat_period=5"]}
OWN_INIT = {f"{rule}_own_init": ["decentralized.own_init=true", f"decentralized.algorithm={rule}"]
            for rule in ("dsgd", "dimat")}


def dimat_table(seeds: list[int], rules: dict[str, list[str]], rounds: int = 30) -> list[dict]:
    rows = []
    for seed in seeds:
        for name, extra in rules.items():
            started = time.time()
            s = run(None, [*RING, *extra, f"rounds={rounds}", f"seed={seed}"]).summary
            row = {"seed": seed, "rule": name, "node_accuracy_mean": s["node_accuracy_mean"],
                   "node_accuracy_min": s["node_accuracy_min"], "xbar_accuracy": s["xbar_accuracy"],
                   "bytes_per_node_total": s.get("bytes_per_node_total", float("nan")), "wall_s": time.time() - started}
            rows.append(row)
            print(row, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else (  # noqa: E731
        "/".join(f"{x:.3f}" for x in v) if isinstance(v, list) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--only", default="rebasin,one_shot,decentralized,fedma,dimat,dimat_own_init")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="rebasin: hidden widths")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    widths = tuple(int(w) for w in args.widths.split(","))
    parts = {"rebasin": lambda: rebasin(seeds, args.epochs, widths), "one_shot": lambda: one_shot_table(seeds, args.epochs),
             "decentralized": lambda: decentralized(seeds), "fedma": lambda: fedma_table(seeds, args.epochs),
             "dimat": lambda: dimat_table(seeds, SHARED_INIT),
             "dimat_own_init": lambda: dimat_table(seeds, OWN_INIT)}
    RESULTS.mkdir(exist_ok=True)
    written = RESULTS / "merging.json"  # the parts run now replace their own entries, the others stay
    results = json.loads(written.read_text()) if written.exists() else {}
    for name in args.only.split(","):
        load, started = os.getloadavg(), time.time()
        rows = parts[name]()
        results[name] = {"rows": rows, "load_average_start": load, "load_average_end": os.getloadavg(),
                         "wall_s": time.time() - started, "machine": platform.platform(), "seeds": seeds,
                         "epochs": args.epochs}
        print(f"\n## {name}\n\n{markdown(rows)}\n\nload average {load} -> {os.getloadavg()}, "
              f"{time.time() - started:.0f} s", flush=True)
        written.write_text(json.dumps(results, indent=2))
    print(f"written {written}")


if __name__ == "__main__":
    main()
