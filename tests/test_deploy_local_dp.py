"""Local DP on deployed clients: the client clips and noises its own row (the simulation's transforms and
streams) before it leaves the process, the server only averages, and the model is the simulation's."""

import json

import torch

from fedloom.config import load_config
from fedloom.core.rng import Stream, torch_generator
from fedloom.deploy.client import Trainer
from fedloom.runner import run
from tests.test_deploy_servicer import CONFIG, LiveRound

LOCAL = {**CONFIG, "privacy": {"mechanism": "local", "clip": 0.5, "noise_multiplier": 1.0}}


def test_deployed_clients_noise_their_own_rows_and_the_model_is_the_simulated_one():
    live = LiveRound(LOCAL)
    assert live.exp.pipeline.steps()[-2:] == ["aggregate:dp_mean (server)", "server_optimizer:sgd (server)"]
    assert not any("client" in step for step in live.exp.pipeline.steps())  # the clients ran those
    for c in live.sampled:
        header, tensors = live.tasks[c]
        assert json.loads(header.config_json)["privacy"] == {"mechanism": "local", "clip": 0.5,
                                                             "noise_multiplier": 1.0}
        row = dict(Trainer(c, live.dataset(c)).train(header, tensors)[1])["update"]
        noise = 1.0 * 0.5 * torch.randn(row.numel(), generator=torch_generator(load_config(LOCAL).seed, Stream.NOISE,
                                                                                1, c))
        assert torch.linalg.vector_norm(row - noise) <= 0.5 * (1 + 1e-5)  # under the noise: the clipped update
        assert torch.linalg.vector_norm(row) > 5 * 0.5  # what the server sees is mostly noise
    record = live.finish_honestly()
    assert record["clients_submitted"] == live.sampled
    torch.testing.assert_close(live.exp.state["x"], run(LOCAL).params, rtol=0, atol=1e-6)


def test_a_plain_task_runs_no_client_side_transform():
    live = LiveRound(CONFIG)
    c = live.sampled[0]
    header, tensors = live.tasks[c]
    assert "privacy" not in json.loads(header.config_json)
    live.finish_honestly()
