"""The reference a researcher would write with no framework, and the one-big-batch limit.

    python plain_driver.py SPEC.json [--mode plain|bigbatch] [--shuffle-seed 0] [--device cuda] [--curve]

plain: for each sampled client, copy the global model, run torch.optim.SGD over
its tensor batches (no DataLoader; a fresh shuffle per epoch), then average the
state_dicts weighted by examples.

bigbatch: the compute floor of vectorized simulation. One model trains on one
batch of (clients a round x batch size) examples drawn from the round's sampled
clients, for as many steps as the longest local training of the round (its
accuracy is not FedAvg's and is reported only for completeness).

--device cuda: the model and the whole data set on the GPU (copied once), the
batch orders drawn on the CPU as before (the same orders as on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import time

T_START = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from shared import Clock, Curve, accuracy, emit, load_workload, one_thread, shuffle_seed  # noqa: E402


def plain(w, seed: int, rounds: int, curve: Curve) -> tuple[torch.nn.Module, list[float]]:
    spec = w.spec
    global_model = w.model()
    clock = Clock(w.x.device)
    for r in range(rounds):
        clock.start_round()
        total = 0
        summed = {k: torch.zeros_like(v) for k, v in global_model.state_dict().items()}
        for cid in w.sampled[r].tolist():
            local = copy.deepcopy(global_model)
            opt = torch.optim.SGD(local.parameters(), lr=spec["lr"])
            xs, ys = w.client(cid)
            gen = torch.Generator().manual_seed(shuffle_seed(seed, r + 1, cid))
            for _ in range(spec["epochs"]):
                for batch in torch.randperm(len(ys), generator=gen).to(ys.device).split(spec["batch_size"]):
                    opt.zero_grad()
                    F.cross_entropy(local(xs[batch]), ys[batch]).backward()
                    opt.step()
            n = len(ys)
            total += n
            for k, v in local.state_dict().items():
                summed[k] += n * v
        global_model.load_state_dict({k: v / total for k, v in summed.items()})
        clock.end_round()
        curve.point(global_model)
    return global_model, clock.rounds


def bigbatch(w, seed: int, rounds: int, curve: Curve) -> tuple[torch.nn.Module, list[float], list[int]]:
    spec = w.spec
    model = w.model()
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    width = spec["clients_per_round"] * spec["batch_size"]
    clock = Clock(w.x.device)
    steps_per_round = []
    gen = torch.Generator().manual_seed(seed)
    for r in range(rounds):
        clock.start_round()
        ids = w.sampled[r].tolist()
        idx = torch.cat([w.train_idx[c] for c in ids])
        steps = spec["epochs"] * max(-(-len(w.train_idx[c]) // spec["batch_size"]) for c in ids)
        steps_per_round.append(steps)
        for _ in range(steps):
            batch = idx[torch.randint(len(idx), (width,), generator=gen).to(idx.device)]
            opt.zero_grad()
            F.cross_entropy(model(w.x[batch]), w.y[batch]).backward()
            opt.step()
        clock.end_round()
        curve.point(model)
    return model, clock.rounds, steps_per_round


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--mode", choices=["plain", "bigbatch"], default="plain")
    parser.add_argument("--shuffle-seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=None, help="fewer rounds than the workload's")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: where the model and data live")
    parser.add_argument("--curve", action="store_true", help="test accuracy after every round (bench/tta.py)")
    args = parser.parse_args()
    one_thread()
    w = load_workload(args.spec).to(args.device)
    rounds = args.rounds or w.spec["rounds"]
    setup = time.perf_counter() - T_START
    extra, curve = {}, Curve(w, args.curve)
    if args.mode == "plain":
        model, times = plain(w, args.shuffle_seed, rounds, curve)
    else:
        model, times, steps = bigbatch(w, args.shuffle_seed, rounds, curve)
        extra = {"steps_per_round": steps, "batch": w.spec["clients_per_round"] * w.spec["batch_size"]}
    emit({"round_seconds": times, "setup_seconds": setup, "accuracy": accuracy(model, w.x_test, w.y_test),
          "rounds_done": len(times), "device": args.device, **extra, **curve.result()})


if __name__ == "__main__":
    main()
