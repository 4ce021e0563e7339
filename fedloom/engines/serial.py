"""The serial engine: one client after another, any nn.Module.

The reference the other engines are tested against. Local training is
functional on the flat parameter vector (any module, BatchNorm buffers and
dropout included: dropout draws from the client's own seeded stream), so the algorithm's gradient
correction and the local optimizer are the same code the vectorized engine
runs on stacked clients.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, seed_for
from fedloom.core.store import ClientStore
from fedloom.data.federated import FederatedData
from fedloom.engines.base import (LocalTraining, RoundResult, batch_order, client_objective, functional_loss,
                                  large_batch, projected, starts_of, two_point)
from fedloom.engines.device import DATA_ON_DEVICE, DeviceData, loss_accumulator, moved
from fedloom.tasks import Task


class SerialEngine:
    """One client after another on any ``nn.Module``: the reference engine."""

    name = "serial"

    def __init__(self, model: nn.Module, data: FederatedData, local: LocalTraining, task: Task,
                 device: torch.device = torch.device("cpu"), data_on_device: int = DATA_ON_DEVICE):
        self.device = device
        self.model = model.to(device)
        self.spec = ParamSpec.of(model)
        self.data = data
        self.examples = DeviceData(data.x, data.y, device, data_on_device)
        self.local = local
        self._loss = functional_loss(model, self.spec, task)

    @staticmethod
    def _grad(objective, x: Tensor, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        """Plain autograd rather than torch.func, so modules that update buffers
        in place (BatchNorm) train as they would outside fedloom."""
        x = x.detach().requires_grad_()
        loss = objective(x, xb, yb)
        (g,) = torch.autograd.grad(loss, x)
        return g, loss.detach()

    @contextmanager
    def _client_rng(self, round_idx: int, cid: int, *key: int) -> Iterator[None]:
        """Dropout draws from the client's own stream (torch's global generator, forked)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed_for(self.local.seed, Stream.DROPOUT, round_idx, cid, *key))
            yield

    def _direction(self, algorithm, g: Tensor, x: Tensor, x0: Tensor, sent: dict[str, Tensor], cstate,
                   lstate: dict[str, Tensor] | None, xb: Tensor, yb: Tensor):
        """The step's direction: the corrected gradient or, for a two-point algorithm, its direction from
        the gradients at x and at its previous point ``lstate["x_prev"]`` on the same batch."""
        if lstate is None:
            return algorithm.correct_grad(g, x, x0, sent, cstate), None
        g_prev, _ = self._grad(self._loss, lstate["x_prev"], xb, yb)
        return algorithm.local_direction(g, g_prev, x, lstate)

    def gradients(self, x: Tensor, client_ids: list[int], batch_size: int, round_idx: int) -> Tensor:
        """Each client's gradient at ``x`` on one large batch (``engines.base.large_batch``), ``[n, d]``
        on the CPU; a client without examples gives zeros."""
        self.model.train()
        x = x.to(self.device)
        grads = [self._large_batch_grad(x, cid, batch_size, round_idx) for cid in client_ids]
        return torch.stack(grads).cpu() if grads else torch.zeros(0, x.shape[-1])

    def _large_batch_grad(self, x: Tensor, cid: int, batch_size: int, round_idx: int) -> Tensor:
        idx = self.data.train_idx[cid]
        if len(idx) == 0:
            return torch.zeros_like(x)
        positions = torch.from_numpy(large_batch(len(idx), batch_size, self.local.seed, round_idx, cid))
        with self._client_rng(round_idx, cid, 1):
            return self._grad(self._loss, x, *self.examples.batch(idx[positions]))[0]

    def run_round(self, algorithm, x0: Tensor, sent: dict[str, Tensor], client_ids: list[int],
                  round_idx: int, store: ClientStore) -> RoundResult:
        """Train the clients one by one from ``x0`` (or each client's own row of it) and stack their rows."""
        self.model.train()
        x0, sent = x0.to(self.device), moved(sent, self.device)
        rows, auxes, weights, losses = [], [], [], []
        for i, cid in enumerate(client_ids):
            row, aux, n_examples, loss = self._train_client(algorithm, starts_of(x0, i), sent, cid, round_idx,
                                                               store)
            rows.append(row.cpu())
            auxes.append(moved(aux, torch.device("cpu")))
            weights.append(n_examples)
            losses.append(loss)
        aux = {k: torch.stack([a[k] for a in auxes]) for k in (auxes[0] if auxes else {})}
        return RoundResult(list(client_ids), torch.stack(rows), torch.tensor(weights, dtype=torch.float32), aux,
                           torch.tensor(losses))

    def _train_client(self, algorithm, x0: Tensor, sent: dict[str, Tensor], cid: int, round_idx: int,
                      store: ClientStore):
        idx = self.data.train_idx[cid]
        cstate = moved(store.get(cid, lambda: algorithm.client_init(x0.shape[-1])), self.device)
        opt, objective = self.local.optimizer, client_objective(algorithm, self._loss)
        x, opt_state, steps, loss_sum = x0.clone(), opt.init(x0), 0, loss_accumulator(self.device)
        lstate = algorithm.local_init(x0, sent, cstate) if two_point(algorithm) else None
        with self._client_rng(round_idx, cid):
            for batch in batch_order(len(idx), self.local, round_idx, cid):
                xb, yb = self.examples.batch(idx[batch])
                g, loss = self._grad(objective, x, xb, yb)
                direction, lstate = self._direction(algorithm, g, x, x0, sent, cstate, lstate, xb, yb)
                x, opt_state = opt.step(x, direction, opt_state)
                x = projected(algorithm, x)
                steps += 1
                loss_sum += loss  # summed on the device: no sync per step
        row, aux, new_state = algorithm.client_result(x0, x, torch.tensor(steps), opt.lr, sent, cstate)
        store.put(cid, moved(new_state, torch.device("cpu")))
        return row, aux, len(idx), float(loss_sum) / max(steps, 1)
