"""The federated algorithms checked against their definitions."""

import copy

import torch
import torch.nn.functional as F

from fedloom.algorithms import FedAvg, Scaffold
from fedloom.core.local_optim import SGD
from fedloom.core.store import ClientStore
from fedloom.data import FederatedData, load_dataset
from fedloom.engines.base import LocalTraining, batch_order
from fedloom.engines.serial import SerialEngine
from fedloom.models import build_model
from fedloom.runner import run
from fedloom.tasks import Classification
from fedloom.rounds.federated import sample_clients
from helpers import make_round, play, stepper, train_once


def _one_client_data(n=200):
    train, _ = load_dataset("digits")
    x, y = train.x[:n], train.y[:n]
    return FederatedData(x, y, [torch.arange(n)], [torch.arange(0)], train.x[n:], train.y[n:], 10)


def test_fedavg_with_one_client_and_one_epoch_is_centralized_sgd():
    data = _one_client_data()
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, 10)
    reference = copy.deepcopy(model)
    local = LocalTraining(SGD(lr=0.1, momentum=0.5), epochs=1, batch_size=16, seed=7)
    engine = SerialEngine(model, data, local, Classification(10))
    x0 = engine.spec.flatten(model)
    result = engine.run_round(FedAvg(), x0, {}, [0], 1, ClientStore())

    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.5)
    steps = 0
    for batch in batch_order(len(data.y), local, 1, 0):
        opt.zero_grad()
        F.cross_entropy(reference(data.x[batch]), data.y[batch]).backward()
        opt.step()
        steps += 1
    assert steps == 13
    torch.testing.assert_close(x0 - result.U[0], engine.spec.flatten(reference), rtol=1e-5, atol=1e-6)


def test_fedprox_with_mu_zero_is_fedavg_exactly(quick):
    common = ["rounds=3", "evaluation.federated=false"]
    fedavg = run(None, [*quick, *common])
    fedprox = run(None, [*quick, *common, "algorithm.name=fedprox", "algorithm.options.mu=0.0"])
    assert torch.equal(fedavg.params, fedprox.params)
    assert [r["central_accuracy"] for r in fedavg.history] == [r["central_accuracy"] for r in fedprox.history]


def test_fedprox_reduces_client_drift(quick):
    def drift(mu):
        round_ = make_round(*quick, "algorithm.name=fedprox", f"algorithm.options.mu={mu}", "client.epochs=10")
        result = train_once(round_, round_.init_state()["x"], range(10))
        return result.U.norm(dim=1).mean().item()  # distance of client models to the global model

    assert drift(1.0) < 0.8 * drift(0.0)
    assert drift(0.1) < drift(0.0)


def test_scaffold_beats_fedavg_on_two_class_shards(quick):
    common = ["partition.name=shards", "partition.options.classes_per_client=2", "data.n_clients=20",
              "sampling.clients_per_round=10", "rounds=15", "evaluation.federated=false", "model.name=logistic"]
    fedavg = run(None, [*quick, *common])
    scaffold = run(None, [*quick, *common, "algorithm.name=scaffold"])
    assert scaffold.final["central_accuracy"] > fedavg.final["central_accuracy"] + 0.03


def test_scaffold_control_variates_average_to_server_variate(quick):
    round_ = make_round(*quick, "algorithm.name=scaffold", "data.n_clients=10", "sampling.clients_per_round=10")
    state, _ = play(round_, 2)
    # full participation: c is the mean of the client variates (c_i start at 0 and c = mean of c_i is kept)
    client_c = torch.stack([state["clients"][i]["c"] for i in range(10)])
    torch.testing.assert_close(state["algorithm"]["c"], client_c.mean(0), rtol=1e-4, atol=1e-6)


def test_scaffold_moves_c_by_the_uniform_mean_of_the_sampled_deltas():
    # Karimireddy et al. 2020, Algorithm 1: c <- c + |S|/N * (1/|S|) sum_i delta_c_i, whatever the clients' sizes
    state = Scaffold().server_step({"c": torch.zeros(2)}, {"delta_c": torch.tensor([[1.0, 0.0], [3.0, 4.0]])}, 4)
    assert torch.equal(state["c"], torch.tensor([1.0, 1.0]))  # 2/4 * ((1 + 3)/2, (0 + 4)/2)


def test_scaffold_round_uses_the_uniform_mean_even_with_unequal_clients(quick):
    round_ = stepper(*quick, "algorithm.name=scaffold", "data.n_clients=20", "sampling.clients_per_round=10",
                     "partition.name=quantity", "client.lr=0.05")
    clients = sample_clients(20, 10, 0, 1)
    sizes = round_.data.client_sizes()[clients]
    assert sizes.max() > 2 * sizes.min()  # example weights would differ from the uniform mean
    delta_c = train_once(round_, round_.state["x"], clients, round_.algorithm.broadcast(round_.state["algorithm"]))
    round_.round(1)
    torch.testing.assert_close(round_.state["algorithm"]["c"], 10 / 20 * delta_c.aux["delta_c"].mean(0))
