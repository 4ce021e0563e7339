"""What SecAgg costs in a deployment: `fedloom server` with --clients client threads on loopback
(fedloom/deploy/secagg.py), plain FedAvg against SecAgg, SecAgg with the consistency check and SecAgg+,
side by side in one process, the same model and data.

    python bench/deploy_secagg.py [--clients 8] [--rounds 3] [--hidden 32]

Per protocol: the mean round's wall seconds (training included, the same in every protocol), its ratio
to plain's, and the bytes on the wire up and down per round. The clients share this process's GIL with
the server, so seconds are an upper bound of what separate machines would see. The load average before
and after is printed: on a shared machine only the ratios measured side by side mean anything.
Writes bench/results/deploy_secagg.json.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from fedloom.builders import build_data
from fedloom.config import load_config
from fedloom.deploy.client import run_client
from fedloom.deploy.server import serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_json  # noqa: E402

PROTOCOLS = {"plain": {}, "secagg": {"protocol": "secagg"},
             "secagg + consistency": {"protocol": "secagg", "consistency_check": True},
             "secagg+": {"protocol": "secagg+", "neighbours": 4}}


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def run_deployed(config: dict, n: int, tmp: Path) -> list[dict]:
    """One deployed run with ``n`` client threads: its records."""
    data = build_data(load_config(config))
    tokens = {k: secrets.token_hex(16) for k in range(n)}
    address, threads = _free_address(), []
    for k in range(n):
        np.savez(tmp / f"client{k}.npz", x=data.x[data.train_idx[k]].numpy(), y=data.y[data.train_idx[k]].numpy())
        threads.append(threading.Thread(target=run_client, args=(address, tmp / f"client{k}.npz", k, tokens[k]),
                                        kwargs={"patience_s": 30}, daemon=True))
        threads[-1].start()
    result = serve(config, address, tokens)
    for thread in threads:
        thread.join(30)
    return result.history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=32)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    for name, secure in PROTOCOLS.items():
        with tempfile.TemporaryDirectory() as tmp:
            config = {"rounds": args.rounds, "data": {"dataset": "digits", "n_clients": args.clients},
                      "model": {"name": "mlp", "options": {"hidden": [args.hidden]}},
                      "client": {"epochs": 1, "batch_size": 32}, "sampling": {"clients_per_round": args.clients},
                      "engine": {"name": "serial"}, "secure_aggregation": secure, "deploy": {"round_timeout_s": 60},
                      "output": {"dir": str(Path(tmp) / "runs"), "progress": False}}
            history = run_deployed(config, args.clients, Path(tmp))
        rows.append({"protocol": name, "round_s": float(np.mean([r["round_seconds"] for r in history])),
                     "wire_up": float(np.mean([r["wire_bytes_up"] for r in history])),
                     "wire_down": float(np.mean([r["wire_bytes_down"] for r in history])),
                     "accuracy": history[-1].get("central_accuracy")})
    load_after = os.getloadavg()
    plain = rows[0]["round_s"]
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}; {args.clients} clients, "
          f"{args.rounds} rounds")
    print("| protocol | round s | x plain | wire up B/round | wire down B/round | accuracy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['protocol']} | {r['round_s']:.3f} | {r['round_s'] / plain:.2f} | {r['wire_up']:.0f} | "
              f"{r['wire_down']:.0f} | {r['accuracy']:.4f} |")
    write_json(RESULTS / "deploy_secagg.json", {"load_before": load_before, "load_after": load_after,
                                                "clients": args.clients, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
