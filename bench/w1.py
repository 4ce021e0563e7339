"""W1: framework overhead. digits, 64-32-10 MLP, SGD lr 0.05, batch 16, 1 local epoch,
IID over 1,000 clients (about 1.4 training examples each), 100 a round, 5 rounds.

Also the one-big-batch limit, in the same run (as in W3): one model trained on one batch of
100 x 16 examples drawn from the round's sampled clients, as many steps as the round's longest
local training (here one): the compute floor of training the round's clients at once; and
fedloom-vmap, the vectorized engine with its general vmap step (engine.fused = "off").

    python bench/w1.py [--only fedloom-vectorized,one-big-batch,plain] [--rounds N] [--timeout S]

Targets: fedloom vectorized's steady round >= 100x faster than Flower and >= 10x
faster than the plain PyTorch loop, and within 3x of the one-big-batch limit.
"""

from common import CONTESTANTS, Workload, cli, limit_lines, ratio_lines, run_workload, save

W1 = Workload(name="w1", title="digits, MLP 64-32-10, IID, 1,000 clients, 100 a round, 1 epoch, batch 16, lr 0.05",
              dataset="digits", model="mlp", hidden=[32], n_clients=1000, clients_per_round=100, rounds=5,
              lr=0.05, batch_size=16, epochs=1, partition={"name": "iid"})


if __name__ == "__main__":
    args = cli(__doc__, W1.rounds, [*CONTESTANTS, "one-big-batch", "fedloom-vmap"])
    record = run_workload(W1, args.only, args.rounds, args.timeout)
    print(save(record, limit_lines(record, 3) + ratio_lines(record, [
        ("fedloom-vectorized", "fedloom-vmap", None), ("fedloom-vectorized", "flower", 100),
        ("fedloom-vectorized", "flower-1.22", 100), ("fedloom-vectorized", "plain", 10),
        ("fedloom-vectorized", "pfl", None), ("fedloom-vectorized", "fedloom-serial", None)])))
