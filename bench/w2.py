"""W2: W1's model and data (digits, 64-32-10 MLP, SGD lr 0.05, batch 16, 1 epoch, IID)
with 100 clients (about 14 training examples each), 10 a round, 20 rounds.

    python bench/w2.py [--only fedloom-vectorized,plain] [--rounds N] [--timeout S]
"""

from common import Workload, cli, ratio_lines, run_workload, save

W2 = Workload(name="w2", title="digits, MLP 64-32-10, IID, 100 clients, 10 a round, 1 epoch, batch 16, lr 0.05",
              dataset="digits", model="mlp", hidden=[32], n_clients=100, clients_per_round=10, rounds=20,
              lr=0.05, batch_size=16, epochs=1, partition={"name": "iid"})

if __name__ == "__main__":
    args = cli(__doc__, W2.rounds, ["fedloom-vectorized", "fedloom-serial", "plain", "flower", "flower-1.22", "pfl",
                                    "plain-seed1", "plain-seed2"])
    record = run_workload(W2, args.only, args.rounds, args.timeout)
    print(save(record, ratio_lines(record, [("fedloom-vectorized", "flower", None), ("fedloom-vectorized", "flower-1.22", None),
                                            ("fedloom-vectorized", "plain", None),
                                            ("fedloom-vectorized", "pfl", None),
                                            ("fedloom-vectorized", "fedloom-serial", None)])))
