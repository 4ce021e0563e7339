"""Flower 1.22 ClientApp for the benchmark (message API, the `flwr new` PyTorch template's shape).

A module of its own, not the driver's __main__, so the Ray actors import it by
name and keep the workload arrays loaded between messages (one load per actor).
The server tells each sampled node which client's data to train on (config
"cid"), so Flower trains exactly the clients every other contestant trains, and
on which device (config "device": on a GPU each actor holds the data there,
copied once, and returns its weights on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared import load_workload, one_thread, shuffle_seed

_WORKLOADS: dict = {}


def workload(spec_path: str, device: str = "cpu"):
    if (spec_path, device) not in _WORKLOADS:
        one_thread()
        _WORKLOADS[spec_path, device] = load_workload(spec_path).to(device)
    return _WORKLOADS[spec_path, device]


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    w = workload(str(config["spec"]), str(config.get("device", "cpu")))
    cid, server_round = int(config["cid"]), int(config["server-round"])
    model = w.model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    xs, ys = w.client(cid)
    gen = torch.Generator().manual_seed(shuffle_seed(int(config["seed"]), server_round, cid))
    for _ in range(int(config["epochs"])):
        for batch in torch.randperm(len(ys), generator=gen).to(ys.device).split(int(config["batch-size"])):
            opt.zero_grad()
            F.cross_entropy(model(xs[batch]), ys[batch]).backward()
            opt.step()
    weights = {k: v.cpu() for k, v in model.state_dict().items()}  # no copy on the CPU
    content = RecordDict({"arrays": ArrayRecord(weights),
                          "metrics": MetricRecord({"num-examples": len(ys)})})
    return Message(content=content, reply_to=msg)
