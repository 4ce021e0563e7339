"""FedLAW: on a two-client quadratic the learned weights and shrinking factor reach the known optimum, in a
run the learned model's proxy loss is below FedAvg's, the proxy set is a seeded fraction of the training
examples, runs resume bit-identically, and misplaced or ill-fitting uses are refused."""

from types import SimpleNamespace

import pytest
import torch

from fedloom import checkpoint
from fedloom.config import ConfigError, load_config
from fedloom.engines.base import functional_loss
from fedloom.pipeline.base import Context, ServerData
from fedloom.pipeline.fedlaw import fedlaw, proxy_examples
from fedloom.registry import OptionError
from helpers import make_round, play

TARGET = torch.tensor([0.6, 0.2])  # = gamma (lambda_1 w_1 + lambda_2 w_2) at gamma 0.8, lambda (0.75, 0.25)


def _quadratic_server(n_examples=50):
    """A server whose proxy loss is ||model - TARGET||^2 whatever the batch."""
    data = SimpleNamespace(x=torch.zeros(n_examples, 1), y=torch.zeros(n_examples),
                           train_idx=[torch.arange(n_examples)])
    loss = lambda flat, xb, yb: ((flat - TARGET) ** 2).sum()  # noqa: E731
    return ServerData(data, loss, seed=0, device=torch.device("cpu"))


def test_two_client_quadratic_reaches_the_known_weights_and_shrinking_factor():
    transform = fedlaw(_quadratic_server(), proxy_fraction=1.0, epochs=20, lr=0.01, batch_size=1)
    x = torch.tensor([2.0, -1.0])
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # the clients' local models
    U, w = x - W, torch.tensor([10.0, 30.0])  # FedAvg would weigh them (0.25, 0.75): the wrong way round
    row, weight, state, metrics = transform.apply(U, w, None, Context(1, 0, [0, 1], x))
    assert row.shape == (1, 2) and weight.tolist() == [1.0] and state is None
    torch.testing.assert_close(x - row[0], TARGET, rtol=0, atol=0.02)  # the next model: gamma sum lambda_i w_i
    assert metrics["fedlaw_gamma"] == pytest.approx(0.8, abs=0.02)
    assert metrics["fedlaw_lambda_max"] == pytest.approx(0.75, abs=0.02)
    assert metrics["fedlaw_proxy_loss"] < 1e-3


def test_the_proxy_set_is_a_seeded_fraction_of_the_training_examples():
    data = SimpleNamespace(train_idx=[torch.arange(0, 60), torch.arange(100, 140)])
    server = ServerData(data, None, seed=3, device=torch.device("cpu"))
    proxy = proxy_examples(server, 0.1)
    assert len(proxy) == 10 and len(set(proxy.tolist())) == 10
    assert set(proxy.tolist()) <= set(range(60)) | set(range(100, 140))
    assert torch.equal(proxy, proxy_examples(server, 0.1))
    assert not torch.equal(proxy, proxy_examples(ServerData(data, None, seed=4, device=torch.device("cpu")), 0.1))
    assert len(proxy_examples(server, 1e-6)) == 1


RUN = ["data.dataset=digits", "data.n_clients=6", "partition.name=shards", "partition.options={classes_per_client=2}",
       "model.name=mlp", "model.options={hidden=[8]}", "sampling.clients_per_round=3", "client.epochs=1",
       "client.batch_size=32", "client.lr=0.1", "server.transforms=[{name='fedlaw', options={proxy_fraction=0.05, "
       "epochs=5, batch_size=100}}]"]


def test_in_a_run_the_learned_model_has_a_lower_proxy_loss_than_fedavgs():
    round_ = make_round(*RUN)
    fedavg = make_round(*[o for o in RUN if not o.startswith("server.transforms")])
    state0 = round_.init_state()
    learned, record = round_.play(state0, 1)
    averaged, _ = fedavg.play(state0, 1)
    server = ServerData(round_.data, _loss(round_), 0, torch.device("cpu"))
    proxy = proxy_examples(server, 0.05)
    xb, yb = server.batch(proxy)
    assert server.loss(learned["x"], xb, yb) < server.loss(averaged["x"], xb, yb)
    assert record["fedlaw_gamma"] > 0 and 1 / 3 <= record["fedlaw_lambda_max"] <= 1
    assert "fedlaw (server)" in round_.pipeline.steps()


def _loss(round_):
    return functional_loss(round_.model, round_.spec, round_.task)


def test_fedlaw_runs_resume_bit_identically(tmp_path):
    whole, _ = play(make_round(*RUN), 3)
    first, _ = play(make_round(*RUN), 2)
    checkpoint.save(tmp_path / "ckpt", first)
    resumed, _ = make_round(*RUN).play(checkpoint.load(tmp_path / "ckpt"), 3)
    assert torch.equal(resumed["x"], whole["x"])


@pytest.mark.parametrize("overrides, message", [
    (["server.transforms=[{name='fedlaw'}, {name='clip', options={max_norm=1.0}}]"], "last transform"),
    (["server.aggregator.name=median"], "aggregator.name = 'mean'"),
    (["privacy.mechanism=central", "privacy.noise_multiplier=1.0"], "privacy.mechanism = 'none'"),
    (["personalization.method=fedper"], "personal layers"),
])
def test_uses_that_do_not_fit_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["server.transforms=[{name='fedlaw'}]", *overrides])


def test_bad_options_are_refused_naming_them():
    with pytest.raises(OptionError, match="proxy_fraction must be in"):
        make_round("server.transforms=[{name='fedlaw', options={proxy_fraction=0.0}}]")
    with pytest.raises(ConfigError, match="takes no option"):
        load_config(None, ["server.transforms=[{name='fedlaw', options={gamma=1.0}}]"])


SHARDS = ["data.dataset=digits", "data.n_clients=20", "partition.name=shards", "partition.options={classes_per_client=2}",
          "model.name=mlp", "model.options={hidden=[32]}", "sampling.clients_per_round=10", "client.epochs=1",
          "client.lr=0.1", "client.batch_size=16", "rounds=10", "evaluation.every=10", "output.save=false",
          "output.progress=false"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_two_class_shards_fedlaw_global_model_beats_fedavgs_and_apfl_beats_both(seed):
    from fedloom import run

    # finetune's training is FedAvg's; its record holds the global model's mean per-client accuracy
    cfg = [*SHARDS, f"seed={seed}", "rounds=20", "evaluation.every=20"]  # bench/personalization.py's rounds
    fedavg = run(None, [*cfg, "personalization.method=finetune"]).final
    fedlaw = run(None, [*cfg, "personalization.method=finetune", "server.transforms=[{name='fedlaw'}]"]).final
    apfl = run(None, [*cfg, "personalization.method=apfl"]).final
    assert fedlaw["federated_accuracy_client_mean"] > fedavg["federated_accuracy_client_mean"]
    assert fedlaw["central_accuracy"] > fedavg["central_accuracy"]
    assert apfl["personal_accuracy_client_mean"] > fedlaw["federated_accuracy_client_mean"] + 0.1
