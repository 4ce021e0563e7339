"""The golden runs recorded before the runner/pipeline redesign give the same
records now (time fields aside): every FedAvg-family algorithm, a robust
aggregator under attack, compression with feedback and on the downlink, the
decentralized algorithms, and the serial, vectorized and Ray engines."""

import json

import pytest

from fedloom import run
from golden.configs import GOLDEN, path_of, without_time


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_run_is_unchanged(name):
    ray = pytest.importorskip("ray") if name.endswith("_ray") else None
    expected = [json.loads(line) for line in path_of(name).read_text().splitlines()]
    try:
        assert without_time(run(None, GOLDEN[name]).history) == expected
    finally:
        if ray is not None:
            ray.shutdown()  # the run started a local Ray; other tests in this process start their own
