"""pfl-research (pfl, PyTorch backend) on the benchmark workload.

    python pfl_driver.py SPEC.json [--rounds N] [--curve]

FederatedAveraging with a SimulatedBackend over a FederatedDataset whose user
sampler yields the round's client ids (shared by every contestant), examples
weighted by datapoints (WeightByDatapoints), local torch.optim.SGD, central
SGD with lr 1 (plain FedAvg averaging). pfl iterates a user's data in order;
make_dataset_fn shuffles each user once per round. A round's time is between
consecutive after_central_iteration callbacks (the first from on_train_begin).
Final accuracy: the global model on the global test set.
"""

from __future__ import annotations

import argparse
import time

T_START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402  (pfl wants its model module imported first)
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.aggregate.weighting import WeightByDatapoints  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics, Weighted  # noqa: E402

from shared import Curve, accuracy, emit, load_workload, one_thread, shuffle_seed  # noqa: E402


class PflNet(torch.nn.Module):
    """pfl's PyTorch models carry their own ``loss`` and ``metrics``."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def loss(self, x, y):
        return F.cross_entropy(self.net(x), y)

    @torch.no_grad()
    def metrics(self, x, y):
        logits = self.net(x)
        n = len(y)
        return {"loss": Weighted(float(F.cross_entropy(logits, y, reduction="sum")), n),
                "accuracy": Weighted(float((logits.argmax(1) == y).sum()), n)}


class RoundTimer(TrainingProcessCallback):
    """Round boundaries, and the test accuracy after each round when a curve is asked for."""

    def __init__(self, net: torch.nn.Module, curve: Curve):
        self.marks: list[float] = []
        self.net, self.curve = net, curve

    def on_train_begin(self, *, model):
        self.marks.append(time.perf_counter())
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.marks.append(time.perf_counter())
        self.curve.point(self.net)
        return False, Metrics()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--curve", action="store_true", help="test accuracy after every round (bench/tta.py)")
    args = parser.parse_args()
    one_thread()
    w = load_workload(args.spec)
    spec = w.spec
    rounds = args.rounds or spec["rounds"]

    order = iter(np.asarray(w.sampled[:rounds]).reshape(-1).tolist())
    draws: dict[int, int] = {}

    def make_dataset(cid):
        # one fresh shuffle each time the user is drawn (pfl iterates a dataset in order)
        r = draws[cid] = draws.get(cid, 0) + 1
        xs, ys = w.client(cid)
        perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(shuffle_seed(0, r, cid)))
        return Dataset(raw_data=(xs[perm], ys[perm]), user_id=str(cid))

    train_data = FederatedDataset(make_dataset, user_sampler=lambda: next(order))
    val_data = FederatedDataset(make_dataset, user_sampler=lambda: 0)
    net = PflNet(w.model())
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    backend = SimulatedBackend(training_data=train_data, val_data=val_data, postprocessors=[WeightByDatapoints()])
    algorithm_params = NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds + 1,
                                         train_cohort_size=spec["clients_per_round"], val_cohort_size=0)
    train_params = NNTrainHyperParams(local_num_epochs=spec["epochs"], local_learning_rate=spec["lr"],
                                      local_batch_size=spec["batch_size"])
    eval_params = NNEvalHyperParams(local_batch_size=1024)
    timer = RoundTimer(net.net, Curve(w, args.curve))
    FederatedAveraging().run(algorithm_params=algorithm_params, backend=backend, model=model,
                             model_train_params=train_params, model_eval_params=eval_params, callbacks=[timer])
    times = list(np.diff(timer.marks))
    emit({"round_seconds": times, "accuracy": accuracy(net.net, w.x_test, w.y_test), "rounds_done": len(times),
          **timer.curve.result()})


if __name__ == "__main__":
    main()
