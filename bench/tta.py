"""Time to accuracy: wall seconds from process start to the first round whose global model
reaches a target test accuracy, every contestant on the same clients, examples, initial
weights and sampled clients each round (bench/common.py's workload data).

    python bench/tta.py [--workloads digits,mnist,synthetic] [--only fedloom-vectorized,plain,...]
                        [--timeout S]

Workloads that learn:
- digits: digits, MLP 64, Dirichlet(0.5) over 100 clients, 10 a round, 5 epochs, batch 8,
  lr 0.2 (the default experiment's settings), to 0.90, up to 30 rounds;
- mnist: MNIST-5k, LeNet-5, Dirichlet(0.5) over 100 clients, 20 a round, 5 epochs,
  batch 32, lr 0.1 (W3's settings), to 0.95, up to 70 rounds;
- synthetic: Synthetic(1, 1), logistic regression, its 100 natural clients, 10 a round,
  5 epochs, batch 10, lr 0.05, up to 100 rounds, to its plateau: PLATEAU x the best
  accuracy the plain loop reaches in those rounds (the curve's own level, not a number
  fixed beforehand).

Every driver runs with ``--curve``: after each round it tests the global model on the
global test set and stamps the unix time. The clock starts when the harness starts the
driver's process (interpreter start-up, imports, data loading and, for Flower, starting
Ray are in it) and the evaluations are taken out of it (each contestant pays them only for
this measurement). Every contestant runs all its rounds, so the curves can be compared past
the target too. Writes bench/results/tta-<workload>.{json,md,png} (the PNG: accuracy against
wall seconds, every contestant) and prints the tables.
"""

from __future__ import annotations

from common import (CONTESTANTS, RESULTS, Workload, cli, fmt, report, run_workload)

WORKLOADS = {
    "digits": Workload(name="tta-digits", title="digits, MLP 64, Dirichlet(0.5), 100 clients, 10 a round, 5 epochs, "
                       "batch 8, lr 0.2", dataset="digits", model="mlp", hidden=[64], n_clients=100,
                       clients_per_round=10, rounds=30, lr=0.2, batch_size=8, epochs=5,
                       partition={"name": "dirichlet", "options": {"alpha": 0.5}}),
    "mnist": Workload(name="tta-mnist", title="MNIST-5k, LeNet-5, Dirichlet(0.5), 100 clients, 20 a round, 5 epochs, "
                      "batch 32, lr 0.1", dataset="mnist5k", model="cnn", n_clients=100, clients_per_round=20,
                      rounds=70, lr=0.1, batch_size=32, epochs=5,
                      partition={"name": "dirichlet", "options": {"alpha": 0.5}}),
    "synthetic": Workload(name="tta-synthetic", title="Synthetic(1,1), logistic, 100 natural clients, 10 a round, "
                          "5 epochs, batch 10, lr 0.05", dataset="synthetic", model="logistic", n_clients=100,
                          clients_per_round=10, rounds=100, lr=0.05, batch_size=10, epochs=5,
                          partition={"name": "natural"}, data_options={"n_clients": 100}),
}
TARGETS = {"digits": 0.90, "mnist": 0.95, "synthetic": None}  # None: the plateau
PLATEAU = 0.95
REFERENCE = "fedloom-vectorized"


def clock(result: dict) -> list[tuple[int, float, float]]:
    """(round, seconds since the process started less the evaluations so far, accuracy) per round."""
    out, evaluations = [], 0.0
    for r, (stamp, accuracy, eval_seconds) in enumerate(result.get("curve") or [], start=1):
        evaluations += eval_seconds
        out.append((r, stamp - result["started_unix"] - evaluations, accuracy))
    return out


def reached(result: dict, target: float) -> tuple[int, float] | None:
    """The first round at or above the target, and its time on the clock."""
    return next(((r, t) for r, t, acc in clock(result) if acc >= target), None)


def plateau(record: dict) -> float:
    """PLATEAU x the best accuracy of the plain loop (else of any contestant) over the run."""
    results = [r for r in record["results"] if r.get("curve")]
    plain = [r for r in results if r["name"] == "plain"] or results
    return PLATEAU * max(acc for r in plain for _, _, acc in clock(r))


def add_tta(record: dict, target: float | None) -> None:
    target = plateau(record) if target is None else target
    record["target_accuracy"] = target
    for r in record["results"]:
        hit = reached(r, target)
        r["rounds_to_target"], r["seconds_to_target"] = hit if hit else (None, None)
        r["best_accuracy"] = max((acc for _, _, acc in clock(r)), default=None)
    mine = next((r["seconds_to_target"] for r in record["results"] if r["name"] == REFERENCE), None)
    for r in record["results"]:
        theirs = r["seconds_to_target"]
        r["tta_ratio_vs_reference"] = theirs / mine if mine and theirs else None


def tta_table(record: dict) -> list[str]:
    lines = ["", f"Time to {record['target_accuracy']:.2f} test accuracy (seconds from process start, evaluations "
             f"taken out; ratio: the contestant's time over {REFERENCE}'s):", "",
             "| contestant | rounds to target | seconds to target | x fedloom-vectorized | best accuracy | "
             "evaluation s (all rounds) |", "|---|---:|---:|---:|---:|---:|"]
    for r in record["results"]:
        evaluations = sum(p[2] for p in r.get("curve") or [])
        lines.append(f"| {r['name']} | {fmt(r.get('rounds_to_target'))} | {fmt(r.get('seconds_to_target'))} | "
                     f"{fmt(r.get('tta_ratio_vs_reference'))} | {fmt(r.get('best_accuracy'))} | "
                     f"{fmt(evaluations) if r.get('curve') else '-'} |")
    return lines


def curve_chart(record: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in record["results"]:
        points = clock(r)
        if points:
            ax.plot([t for _, t, _ in points], [acc for _, _, acc in points], marker=".", label=r["name"])
    ax.axhline(record["target_accuracy"], color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xscale("log")
    ax.set_xlabel("seconds since the process started (evaluations taken out, log)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{record['tag']}: {record['workload']['title']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_tta(record: dict) -> str:
    import json

    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = record["tag"]
    (RESULTS / f"{tag}.json").write_text(json.dumps(record, indent=1))
    curve_chart(record, RESULTS / f"{tag}.png")
    md = report(record, tta_table(record))
    (RESULTS / f"{tag}.md").write_text(md + "\n")
    return md


def add_args(parser) -> None:
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS))


if __name__ == "__main__":
    args = cli(__doc__, "each workload's", CONTESTANTS, add_args)
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
        record = run_workload(WORKLOADS[name], args.only, args.rounds, args.timeout,
                              extra_args={c: ["--curve"] for c in args.only})
        add_tta(record, TARGETS[name])
        print(save_tta(record), flush=True)
