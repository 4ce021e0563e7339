"""Every example config in examples/ validates and runs a round."""

from pathlib import Path

import pytest

from fedloom.config import load_config
from fedloom.data.cifar import CIFAR10
from fedloom.runner import run
from test_loaders import write_cifar

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.*"))


def _data_for(path: Path, tmp_path: Path) -> list[str]:
    """Examples that read data from disk get small files written in exactly the real layout; the
    Shakespeare one keeps 10 roles (its 20-round run is tests/test_shakespeare_training.py)."""
    dataset = load_config(path).data.dataset
    if dataset == "shakespeare":
        return ["data.options.max_clients=10", "data.n_clients=10", "client.steps=2"]
    if dataset != "cifar10":
        return []
    folder, _ = write_cifar(tmp_path, CIFAR10, per_file=40)  # 200 training images for 100 clients
    return [f"data.options.path={str(folder)!r}"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, quick, tmp_path):
    assert load_config(path).name
    result = run(path, [*quick, "rounds=1", "evaluation.federated=false", *_data_for(path, tmp_path)])
    assert 0.0 <= result.final["central_accuracy"] <= 1.0 and result.final["train_loss"] > 0
