"""Golden runs: configs whose metrics were recorded before the runner/pipeline
redesign (``python -m tests.golden.record``); tests/test_golden.py replays them
and asks for the same records, time fields aside."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent

SMALL = ["rounds=3", "data.n_clients=20", "sampling.clients_per_round=6", "client.epochs=1",
         "output.save=false", "output.progress=false", "model.name=logistic"]
NODES = ["mode=decentralized", "rounds=3", "data.n_clients=12", "client.epochs=1", "output.save=false",
         "output.progress=false", "model.name=logistic"]

GOLDEN: dict[str, list[str]] = {
    "fedavg_vectorized": [*SMALL, "engine.name=vectorized"],
    "fedavg_serial": [*SMALL, "engine.name=serial"],
    "fedavg_ray": [*SMALL, "engine.name=ray", "engine.ray_workers=2"],
    "fedprox": [*SMALL, "algorithm.name=fedprox", "algorithm.options.mu=0.1"],
    "scaffold": [*SMALL, "algorithm.name=scaffold", "client.lr=0.05"],
    "fedadam": [*SMALL, "algorithm.name=fedadam"],
    "fedyogi": [*SMALL, "algorithm.name=fedyogi"],
    "median_signflip": [*SMALL, "server.aggregator.name=median", "attack.name=signflip", "attack.f=2"],
    "topk_ef": [*SMALL, "compression.name=topk", "compression.options={k = 0.05}", "compression.feedback=ef"],
    "downlink_topk": [*SMALL, "compression.downlink=topk", "compression.downlink_options={k = 0.1}"],
    "dsgd": [*NODES, "topology.name=ring"],
    "gradient_tracking": [*NODES, "decentralized.algorithm=gradient_tracking", "client.lr=0.05"],
    "choco": [*NODES, "decentralized.algorithm=choco", "compression.name=topk", "compression.options={k = 0.1}"],
    "clipped_gossip": [*NODES, "topology.name=torus", "decentralized.gossip=clipped", "attack.name=signflip",
                       "attack.f=2"],
}

TIME_FIELDS = ("round_seconds", "wall_seconds")


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in records]


def path_of(name: str) -> Path:
    return HERE / f"{name}.jsonl"
