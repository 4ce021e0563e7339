"""Every example config in examples/ validates and runs a round."""

from pathlib import Path

import pytest

from fedloom.config import load_config
from fedloom.runner import run

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.*"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, quick):
    assert load_config(path).name
    result = run(path, [*quick, "rounds=1", "evaluation.federated=false"])
    assert 0.0 <= result.final["central_accuracy"] <= 1.0 and result.final["train_loss"] > 0
