"""Flower (flwr[simulation] 1.42.0, the current release, and 1.22.0) on the benchmark workload.

    python flower_driver.py SPEC.json [--rounds N] [--cpus-per-client 1] [--device cuda --gpus-per-client 0.1] [--curve]

run_simulation with a ServerApp (flwr.serverapp.strategy.FedAvg, no federated
evaluation) and the ClientApp of flower_client.py on the Ray backend, one
virtual SuperNode per client. The strategy samples its nodes as usual and
tells each one which client's data to train (the round's client ids, shared by
every contestant). A round's time runs from configure_train to the end of
aggregate_train. Final accuracy: the global model on the global test set.

--device cuda: the ClientApps train on the GPU, each Ray actor asking for
--gpus-per-client of it (0.1: ten actors share one GPU); the server stays on the CPU.
"""

from __future__ import annotations

import argparse
import os
import time

T_START = time.perf_counter()

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from flower_client import app as client_app  # noqa: E402
from shared import Curve, accuracy, emit, load_workload, one_thread  # noqa: E402

OUT: dict = {}


class TimedFedAvg(FedAvg):
    """FedAvg that gives the i-th sampled node of round r the client id sampled[r][i] (and, with a
    curve, tests each round's aggregate on the global test set)."""

    def __init__(self, sampled, curve: Curve, model, **kwargs):
        super().__init__(**kwargs)
        self.sampled, self.curve, self.model = sampled, curve, model
        self.started: dict[int, float] = {}
        self.ended: dict[int, float] = {}

    def configure_train(self, server_round, arrays, config, grid):
        self.started[server_round] = time.perf_counter()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        ids = self.sampled[server_round - 1].tolist()
        assert len(ids) == len(messages), (len(ids), len(messages))
        return [Message(content=RecordDict({self.arrayrecord_key: arrays,
                                            self.configrecord_key: ConfigRecord({**config, "cid": cid})}),
                        message_type=MessageType.TRAIN, dst_node_id=m.metadata.dst_node_id)
                for m, cid in zip(messages, ids)]

    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        self.ended[server_round] = time.perf_counter()
        if self.curve.enabled and out[0] is not None:
            self.model.load_state_dict(out[0].to_torch_state_dict())
            self.curve.point(self.model)
        return out


def make_server(w, spec_path: str, rounds: int, device: str, curve: Curve) -> ServerApp:
    spec = w.spec
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        one_thread()
        k, n = spec["clients_per_round"], w.n_clients
        strategy = TimedFedAvg(w.sampled, curve, w.model(), fraction_train=k / n, min_train_nodes=k,
                               min_available_nodes=n, fraction_evaluate=0.0)
        model = w.model()
        train_config = ConfigRecord({"lr": spec["lr"], "epochs": spec["epochs"], "batch-size": spec["batch_size"],
                                     "seed": 0, "spec": spec_path, "device": device})
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                                train_config=train_config)
        model.load_state_dict(result.arrays.to_torch_state_dict())
        OUT["accuracy"] = accuracy(model, w.x_test, w.y_test)
        OUT["round_seconds"] = [strategy.ended[r] - strategy.started[r] for r in sorted(strategy.ended)]
        OUT.update(curve.result())

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--cpus-per-client", type=float, default=1.0,
                        help="Ray resources per ClientApp actor: 1 gives one actor per core")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where the ClientApps train")
    parser.add_argument("--gpus-per-client", type=float, default=None,
                        help="Ray's GPU share per ClientApp actor (default 0.1 with --device cuda, else 0)")
    parser.add_argument("--curve", action="store_true", help="test accuracy after every round (bench/tta.py)")
    args = parser.parse_args()
    gpus = args.gpus_per_client if args.gpus_per_client is not None else (0.1 if args.device != "cpu" else 0.0)
    if args.device != "cpu" and gpus <= 0:
        # Ray hides the GPUs (CUDA_VISIBLE_DEVICES="") from actors that ask for none
        parser.error("--device cuda needs --gpus-per-client above 0")
    one_thread()
    spec_path = os.path.abspath(args.spec)
    w = load_workload(spec_path)
    rounds = args.rounds or w.spec["rounds"]
    backend_config = {"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": gpus},
                      # a Ray instance of its own (never one another process on this machine started)
                      "init_args": {"address": "local", "include_dashboard": False, "log_to_driver": False,
                                    "_temp_dir": os.path.join(os.path.dirname(spec_path), "ray")}}
    if args.device != "cpu":  # Ray's GPUs said outright, as torch sees them, not left to its own detection
        backend_config["init_args"]["num_gpus"] = torch.cuda.device_count()
    run_simulation(server_app=make_server(w, spec_path, rounds, args.device, Curve(w, args.curve)), client_app=client_app,
                   num_supernodes=w.n_clients, backend_config=backend_config)
    if "round_seconds" not in OUT:
        raise SystemExit("Flower finished without running the rounds (see the log above)")
    emit({"round_seconds": OUT["round_seconds"], "accuracy": OUT["accuracy"], "rounds_done": len(OUT["round_seconds"]),
          "actors": int(min(os.cpu_count() // args.cpus_per_client, int(1 / gpus + 1e-9) if gpus else float("inf"))),
          "flwr_client_resources": args.cpus_per_client, "flwr_client_gpus": gpus, "device": args.device,
          "torch_threads_driver": torch.get_num_threads(), **({"curve": OUT["curve"]} if "curve" in OUT else {})})


if __name__ == "__main__":
    main()
