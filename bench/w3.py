"""W3: compute dominates. MNIST-5k (5,000 28x28 digits; 4,000 dealt to clients, 1,000 held
out as the global test set), LeNet-5 CNN, Dirichlet(0.5) label skew over 100 clients
(40 examples each), 20 a round, 5 local epochs, batch 32, SGD lr 0.1, 15 rounds.

Also the one-big-batch limit, in the same run: one model trained on batches of
20 x 32 = 640 examples drawn from the round's sampled clients, for as many steps
as the longest local training of the round: the compute floor of training 20
clients at once.

    python bench/w3.py [--only fedloom-vectorized,one-big-batch,plain] [--rounds N] [--timeout S]

Targets: fedloom vectorized within 2x of the one-big-batch limit, and faster than
the plain loop; accuracy equal to the plain loop's within noise (plain-seed1/2
rerun the plain loop with other batch orders to show that noise).
"""

from common import Workload, cli, limit_lines, ratio_lines, run_workload, save

W3 = Workload(name="w3", title="MNIST-5k, LeNet-5, Dirichlet(0.5), 100 clients, 20 a round, 5 epochs, batch 32, "
              "lr 0.1", dataset="mnist5k", model="cnn", n_clients=100, clients_per_round=20, rounds=15, lr=0.1,
              batch_size=32, epochs=5, partition={"name": "dirichlet", "options": {"alpha": 0.5}})
CONTESTANTS = ["fedloom-vectorized", "one-big-batch", "fedloom-serial", "plain", "flower", "flower-1.22", "pfl",
               "plain-seed1",
               "plain-seed2"]

if __name__ == "__main__":
    args = cli(__doc__, W3.rounds, CONTESTANTS)
    record = run_workload(W3, args.only, args.rounds, args.timeout)
    extra = limit_lines(record, 2) + ratio_lines(record, [("fedloom-vectorized", "plain", 1), ("fedloom-vectorized", "flower", None),
                                  ("fedloom-vectorized", "flower-1.22", None), ("fedloom-vectorized", "pfl", None), ("fedloom-vectorized", "fedloom-serial", None)])
    print(save(record, extra))
