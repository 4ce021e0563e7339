"""What secure aggregation costs against n: per-client and server seconds and bytes of SecAgg and
SecAgg+ (fedloom/privacy/secagg*.py), against the plain sum of fp32 rows, and against the dropout rate.

    python bench/secagg.py [--d 10000] [--n 10,30,100,300,1000] [--secagg-max-n 100] [--threshold 0.6]

Every client and the server run in this one process, one after the other (no network): client
seconds are the mean client's compute over the four phases, server seconds the server's. SecAgg
(complete graph, Shamir t-of-n) is run in full up to --secagg-max-n; above it only one client's
Shamir sharing is timed (pycryptodome's GF(2^128) sharing costs O(t n) per 16-byte block, and a
client shares 3 blocks), the cost that makes the full protocol impractical there. Prints markdown
tables and writes bench/results/secagg.json and bench/results/secagg.png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedloom.privacy.secagg import Params, split_secret
from fedloom.privacy.secagg_round import PHASES, run_protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_json  # noqa: E402

BITS = 32
SHARED_BYTES = 48  # b_u (16) and s_u's secret key (32): 3 Shamir blocks


def neighbours_for(n: int) -> int | None:
    k = 2 * math.ceil(math.log2(n))
    return None if k >= n - 1 else k


def threshold(fraction: float, n: int, neighbours: int | None) -> int:
    return max(1, math.ceil(fraction * (n if neighbours is None else neighbours + 1)))


def protocol_row(name: str, n: int, d: int, fraction: float, dropout: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    inputs = {u: rng.integers(0, 2 ** BITS, d, dtype=np.uint64) for u in range(n)}
    neighbours = neighbours_for(n) if name == "secagg+" else None
    params = Params(BITS, d, threshold(fraction, n, neighbours), neighbours)
    dropped = set(rng.choice(n, size=round(dropout * n), replace=False).tolist())
    drops = {phase: (dropped if phase == "masked_input" else set()) for phase in PHASES}
    start = time.perf_counter()
    outcome = run_protocol(inputs, params, seed, drops)
    c = outcome.costs
    return {"protocol": name, "n": n, "d": d, "dropout": dropout, "threshold": params.threshold,
            "neighbours": neighbours, "failure": outcome.failure,
            "client_s": sum(c.client_s.values()), "server_s": sum(c.server_s.values()),
            "client_bytes_up": sum(c.up.values()) / n, "client_bytes_down": sum(c.down.values()) / n,
            "server_s_by_phase": dict(c.server_s), "client_s_by_phase": dict(c.client_s),
            "wall_s": time.perf_counter() - start}


def plain_row(n: int, d: int) -> dict:
    rows = torch.randn(n, d)
    start = time.perf_counter()
    rows.sum(0)
    return {"protocol": "plain sum", "n": n, "d": d, "dropout": 0.0, "client_s": 0.0,
            "server_s": time.perf_counter() - start, "client_bytes_up": 4 * d, "client_bytes_down": 0}


def sharing_only_row(n: int, fraction: float) -> dict:
    """One SecAgg client's Shamir sharing at n (the full protocol is n times this and more)."""
    t = threshold(fraction, n, None)
    start = time.perf_counter()
    split_secret(os.urandom(SHARED_BYTES), t, n)
    return {"protocol": "secagg (one client's sharing only)", "n": n, "threshold": t,
            "client_s": time.perf_counter() - start}


def table(rows: list[dict]) -> str:
    lines = ["| protocol | n | t | dropout | client s | server s | client KB up | client KB down | outcome |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        up = f"{r['client_bytes_up'] / 1e3:.1f}" if "client_bytes_up" in r else "-"
        down = f"{r['client_bytes_down'] / 1e3:.1f}" if "client_bytes_down" in r else "-"
        server = f"{r['server_s']:.4f}" if "server_s" in r else "-"
        lines.append(f"| {r['protocol']} | {r['n']} | {r.get('threshold', '-')} | {r.get('dropout', 0):g} | "
                     f"{r['client_s']:.4f} | {server} | "
                     f"{up} | {down} | {_outcome(r)} |")
    return "\n".join(lines)


def _outcome(row: dict) -> str:
    if "failure" not in row:
        return "-"
    return "summed" if row["failure"] is None else f"failed: {row['failure']}"


def plot(by_n: list[dict], by_dropout: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in [("secagg", "o-"), ("secagg+", "s-"), ("plain sum", "^--")]:
        rows = [r for r in by_n if r["protocol"] == name]
        if name != "plain sum":
            a.plot([r["n"] for r in rows], [r["client_s"] for r in rows], style, label=f"{name}: client")
        a.plot([r["n"] for r in rows], [r["server_s"] for r in rows], style, alpha=0.6, label=f"{name}: server")
    sharing = [r for r in by_n if r["protocol"].startswith("secagg (one")]
    a.plot([r["n"] for r in sharing], [r["client_s"] for r in sharing], "x:", label="secagg: one client's Shamir")
    a.set(xscale="log", yscale="log", xlabel="clients n", ylabel="seconds per round", title="cost against n")
    a.legend(fontsize=7)
    for name, style in [("secagg", "o-"), ("secagg+", "s-")]:  # failed rounds left out: they stop early
        rows = [r for r in by_dropout if r["protocol"] == name and r["failure"] is None]
        b.plot([r["dropout"] for r in rows], [r["server_s"] for r in rows], style, label=f"{name}: server")
        b.plot([r["dropout"] for r in rows], [r["client_s"] for r in rows], style, alpha=0.5, label=f"{name}: client")
    b.set(xlabel="fraction dropping before masked input", ylabel="seconds", title=f"cost against dropouts "
          f"(n = {by_dropout[0]['n']})")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=10_000)
    parser.add_argument("--n", default="10,30,100,300,1000")
    parser.add_argument("--secagg-max-n", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--dropout-n", type=int, default=100)
    parser.add_argument("--dropouts", default="0,0.1,0.2,0.3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    by_n = []
    for n in (int(x) for x in args.n.split(",")):
        by_n.append(plain_row(n, args.d))
        by_n.append(protocol_row("secagg+", n, args.d, args.threshold, 0.0))
        by_n.append(protocol_row("secagg", n, args.d, args.threshold, 0.0) if n <= args.secagg_max_n
                    else sharing_only_row(n, args.threshold))
    by_dropout = [protocol_row(name, args.dropout_n, args.d, args.threshold, float(p))
                  for name in ("secagg", "secagg+") for p in args.dropouts.split(",")]
    print(f"d = {args.d}, threshold fraction {args.threshold}, load average before {load_before}\n")
    print(table(by_n))
    print(f"\nagainst the dropout rate (n = {args.dropout_n}):\n")
    print(table(by_dropout))
    print(f"load average after {os.getloadavg()}")
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "secagg.json", {"by_n": by_n, "by_dropout": by_dropout}, load_average_before=load_before,
               command=" ".join(sys.argv))
    plot(by_n, by_dropout, RESULTS / "secagg.png")


if __name__ == "__main__":
    main()
