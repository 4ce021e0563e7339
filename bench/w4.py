"""W4: scale. Synthetic(1, 1) data with 10,000 natural clients (lognormal sizes, about
4.2 million examples), 1,000 a round, SGD lr 0.05, batch 16, 1 local epoch, for
multinomial logistic regression and the 60-32-10 MLP: seconds per round and peak
resident memory of fedloom's vectorized engine, and the plain PyTorch loop for
comparison (two rounds by default, which is what fits the time budget), and fedloom-vmap:
the vectorized engine with its general vmap step (engine.fused = "off"), side by side.

    python bench/w4.py [--model logistic,mlp] [--only fedloom-vectorized,plain] [--rounds N] [--plain-rounds 1]

Targets: under 0.5 s per round (issue #20; it was 1 s), peak memory under 4 GiB.
"""

import argparse

from common import Workload, ratio_lines, run_workload, save

BASE = dict(dataset="synthetic", data_options={"n_clients": 10000}, n_clients=10000, clients_per_round=1000,
            rounds=3, lr=0.05, batch_size=16, epochs=1, partition={"name": "natural"})
W4_LOGISTIC = Workload(name="w4-logistic", model="logistic", title="synthetic(1,1), 10,000 natural clients, "
                       "1,000 a round, logistic regression, 1 epoch, batch 16, lr 0.05", **BASE)
W4_MLP = Workload(name="w4-mlp", model="mlp", hidden=[32], title="synthetic(1,1), 10,000 natural clients, "
                  "1,000 a round, MLP 60-32-10, 1 epoch, batch 16, lr 0.05", **BASE)
CONTESTANTS = ["fedloom-vectorized", "fedloom-vmap", "fedloom-serial", "plain"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="logistic,mlp")
    parser.add_argument("--only", default=",".join(CONTESTANTS), help=f"from {CONTESTANTS}")
    parser.add_argument("--rounds", type=int, default=None, help="fedloom-vectorized rounds (default 3: steady = median of rounds 2-3)")
    parser.add_argument("--plain-rounds", type=int, default=2, help="rounds for plain and fedloom-serial (default 2)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    for name in args.model.split(","):
        w = {"logistic": W4_LOGISTIC, "mlp": W4_MLP}[name.strip()]
        slow = ["--rounds", str(args.plain_rounds)]
        record = run_workload(w, only, args.rounds, args.timeout, extra_args={"plain": slow, "fedloom-serial": slow})
        print(save(record, ratio_lines(record, [("fedloom-vectorized", "fedloom-vmap", None),
                                                ("fedloom-vectorized", "plain", None),
                                                ("fedloom-vectorized", "fedloom-serial", None)])))
        print()
