"""The vectorized engine: every sampled client trains at once.

Client parameters are stacked ``[n, d]``; torch.func's functional_call and
vmap run the forward pass of all clients in one batched call and autograd
gives every client's gradient, so hundreds of small models train for about
the cost of one large batch. Each client sees exactly the batches the serial
engine would give it. Clients train longest first: at each step only those
still training are computed, and a short batch is masked, so a client stops
exactly where it would alone. Clients run in chunks that keep memory under a
budget; the results come back in the caller's client order.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fedloom.core.params import ParamSpec
from fedloom.core.store import ClientStore
from fedloom.data.federated import FederatedData
from fedloom.engines.base import (LocalTraining, RoundResult, batch_plan, block_offsets, block_starts, client_objective,
                                  concatenate, large_batch, local_steps, projected, rows_of, starts_of, two_point)
from fedloom.engines.device import DATA_ON_DEVICE, DeviceData, free_memory, moved
from fedloom.engines.fused import fused_step
from fedloom.tasks import Task, mean_loss

DEFAULT_MEMORY_BUDGET = 2 * 2**30


class UnsupportedModel(ValueError):
    """A model the vectorized engine cannot run exactly."""


def check_vectorizable(model: nn.Module) -> None:
    """Refuse models whose training the stacked computation would get wrong or cannot run:
    buffers updated in place (BatchNorm running stats), random layers (dropout), whose
    per-client randomness would differ from the serial engine, and recurrent layers, whose
    fused kernels torch.func.vmap does not batch."""
    recurrent = [name for name, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    if recurrent:
        raise UnsupportedModel(f"the vectorized engine cannot run recurrent layers ({recurrent[0]!r} is a "
                               f"{type(model.get_submodule(recurrent[0])).__name__}: torch.func.vmap does not "
                               "batch its kernel); use engine.name = \"serial\"")
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise UnsupportedModel(f"the vectorized engine does not support models with buffers ({', '.join(buffers[:3])}"
                               f"{', ...' if len(buffers) > 3 else ''}, e.g. BatchNorm); use engine.name = \"serial\"")
    random_layers = [name for name, m in model.named_modules()
                     if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if random_layers:
        raise UnsupportedModel(f"the vectorized engine does not support dropout (layer {random_layers[0]!r}); "
                               "use engine.name = \"serial\"")


def why_not_vectorize(model: nn.Module, device: torch.device = torch.device("cpu")) -> str | None:
    """What ``engine = "auto"`` asks: None when the model is vectorizable and faster that way, else why
    not. vmap turns a convolution into one grouped convolution, which on CPU is slower than running
    the clients one after another (bench W3: 3.14 vs 2.19 s a round), so conv nets go serial there."""
    try:
        check_vectorizable(model)
    except UnsupportedModel as err:
        return str(err).split(";")[0]
    if device.type == "cpu" and any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        return "convolutions train faster one client after another on the CPU"
    return None


def activation_floats(model: nn.Module, example: Tensor) -> int:
    """Floats the forward pass of one example produces (measured with hooks);
    backward needs about as many again."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(_floats(o))) for m in model.modules()
             if not list(m.children())]
    try:
        with torch.no_grad():
            model(example[None])
    finally:
        for h in hooks:
            h.remove()
    return sum(sizes)


def _floats(output) -> int:
    """Elements of a layer's output: a tensor, or the tensors of a tuple (an attention layer's)."""
    if isinstance(output, Tensor):
        return output.numel()
    return sum(_floats(o) for o in output) if isinstance(output, (tuple, list)) else 0


FUSED_MODES = ("auto", "off")


class VectorizedEngine:
    """All sampled clients at once: parameters stacked ``[n, d]``, ``torch.func.functional_call`` under ``vmap``,
    clients in chunks that fit ``memory_budget`` bytes."""

    name = "vectorized"

    def __init__(self, model: nn.Module, data: FederatedData, local: LocalTraining, task: Task,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, device: torch.device = torch.device("cpu"),
                 data_on_device: int = DATA_ON_DEVICE, fused: str = "auto"):
        check_vectorizable(model)
        if fused not in FUSED_MODES:
            raise ValueError(f"engine.fused = {fused!r}: expected one of {', '.join(FUSED_MODES)}")
        self.device = device
        self.model = model.to(device)
        self.spec = ParamSpec.of(model)
        self.data = data
        self.examples = DeviceData(data.x, data.y, device, data_on_device)
        self.local = local
        self.task = task
        self.sizes = data.client_sizes()
        # every client's training indices in one array, so a round's batch plan is one gather
        self._own, self._own_start = torch.cat(list(data.train_idx)), torch.from_numpy(block_starts(self.sizes))
        free = free_memory(device)
        self.chunk_size = self._clients_per_chunk(memory_budget if free is None else min(memory_budget, free * 9 // 10))
        self._losses = vmap(self._masked_loss)
        # engine.fused = "auto": the hand-written step where it computes the same gradients, else the general one
        fast = fused_step(model, task, self.spec, data.x[0]) if fused == "auto" else None
        self.step_kind = "fused" if fast else "vmap"
        self._step = fast or self._general_step

    def _general_step(self, X: Tensor, xb: Tensor, yb: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Every client's gradient and loss of the model's own objective (the step the fused one replaces)."""
        return self._gradients((self._masked_loss, self._losses), X, xb, yb, valid)

    def _gradients(self, objective, X: Tensor, xb: Tensor, yb: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Every client's gradient and loss (``objective``: one client's loss and its vmapped form). Plain
        autograd through the vmapped forward: the clients' losses depend on their own rows of X only, so
        the gradient of their sum is the stack of their gradients, at less overhead per call than
        torch.func's grad transform (which counts when few clients are left training)."""
        single, batched = objective
        X = X.detach().requires_grad_()
        if len(X) == 1:  # the long tail of a chunk: one client left, and vmap would only cost time
            losses = single(X[0], xb[0], yb[0], valid[0])[None]
        else:
            losses = batched(X, xb, yb, valid)
        (g,) = torch.autograd.grad(losses.sum(), X)
        return g, losses.detach()

    def _objective(self, algorithm):
        """One client's loss and its vmapped form: the model's, or the client rule's own objective."""
        single = client_objective(algorithm, self._masked_loss)
        return (self._masked_loss, self._losses) if single == self._masked_loss else (single, vmap(single))

    def _masked_loss(self, flat: Tensor, xb: Tensor, yb: Tensor, valid: Tensor) -> Tensor:
        """The task's mean loss over the real examples of a padded batch."""
        return mean_loss(self.task, functional_call(self.model, self.spec.unflatten(flat), (xb,)), yb, valid)

    def _direction(self, algorithm, g: Tensor, X: Tensor, starts: Tensor, sent: dict[str, Tensor],
                   state: dict[str, Tensor], lstate: dict[str, Tensor] | None, batch: tuple[Tensor, Tensor, Tensor]):
        """The step's direction: the corrected gradient or, for a two-point algorithm, its direction from
        the gradients at X and at its previous points ``lstate["x_prev"]`` on the same batches."""
        if lstate is None:
            return algorithm.correct_grad(g, X, starts, sent, state), None
        g_prev, _ = self._step(lstate["x_prev"], *batch)
        return algorithm.local_direction(g, g_prev, X, lstate)

    def gradients(self, x: Tensor, client_ids: list[int], batch_size: int, round_idx: int) -> Tensor:
        """Each client's gradient at ``x`` on one large batch (``engines.base.large_batch``), ``[n, d]``
        on the CPU, in chunks of about as many examples as a training chunk's batches; a client
        without examples gives zeros."""
        self.model.train()
        x = x.to(self.device)
        own = [self.data.train_idx[c] for c in client_ids]
        index = [idx[torch.from_numpy(large_batch(len(idx), batch_size, self.local.seed, round_idx, c))]
                 for c, idx in zip(client_ids, own)]
        per_chunk = max(1, self.chunk_size * self.local.batch_size // max((len(i) for i in index), default=1))
        parts = [self._large_batch_grads(x, index[i:i + per_chunk]) for i in range(0, len(index), per_chunk)]
        return torch.cat(parts).cpu() if parts else torch.zeros(0, x.shape[-1])

    def _large_batch_grads(self, x: Tensor, index: list[Tensor]) -> Tensor:
        """The gradients at x of clients on their (padded) large batches."""
        padded = torch.nn.utils.rnn.pad_sequence([i.long() for i in index], batch_first=True, padding_value=-1)
        if padded.shape[1] == 0:
            return torch.zeros(len(index), x.shape[-1], device=x.device)
        valid = (padded >= 0).float().to(self.device)
        g, _ = self._step(x.expand(len(index), -1), *self.examples.batch(padded.clamp(min=0)), valid)
        return torch.where(valid.sum(dim=1, keepdim=True) > 0, g, torch.zeros_like(g))

    def _clients_per_chunk(self, budget: int) -> int:
        """How many clients fit the memory budget: parameters, gradient,
        optimizer and client state (about 8 copies of d), plus activations."""
        per_example = activation_floats(self.model, self.data.x[0].to(self.device))
        per_client = 4 * (8 * self.spec.dim + 3 * self.local.batch_size * per_example)
        return max(1, budget // per_client)

    def run_round(self, algorithm, x0: Tensor, sent: dict[str, Tensor], client_ids: list[int],
                  round_idx: int, store: ClientStore) -> RoundResult:
        """Train the round's clients in chunks, longest first, masking clients whose local training has ended."""
        self.model.train()
        x0, sent = x0.to(self.device), moved(sent, self.device)
        steps = local_steps(self.sizes[client_ids], self.local)
        # longest training first: clients of like length share a chunk, and in a chunk
        # the clients still training at any step are a prefix, the only rows computed
        order = np.argsort(-steps, kind="stable")
        chunks = [torch.from_numpy(order[i:i + self.chunk_size]) for i in range(0, len(order), self.chunk_size)]
        parts = [self._train_chunk(algorithm, starts_of(x0, c), sent, [client_ids[i] for i in c], round_idx, store)
                 for c in chunks]
        result = parts[0] if len(parts) == 1 else concatenate(parts)
        if np.all(order[1:] > order[:-1]):  # already the caller's order (e.g. clients of equal length)
            return result
        return rows_of(result, torch.from_numpy(np.argsort(order)))

    def _batch_plan(self, client_ids: list[int], round_idx: int) -> tuple[Tensor, Tensor]:
        """Global example indices of the clients' batches, ``[total steps, batch_size]``
        step after step: the rows of step t are the clients still training at t, in
        order (-1 pads a short batch); and each client's number of steps. The clients
        must come longest training first."""
        sizes = self.sizes[client_ids]
        positions, steps = batch_plan(sizes, np.asarray(client_ids), self.local, round_idx)
        client, t = (torch.from_numpy(a) for a in block_offsets(steps))
        first = self._own_start[client_ids]
        positions = torch.from_numpy(positions)
        index = self._own[(first[client, None] + positions).clamp(min=0)].masked_fill_(positions < 0, -1)
        return index[torch.argsort(t * len(client_ids) + client)], torch.from_numpy(steps)

    def _train_chunk(self, algorithm, x0: Tensor, sent: dict[str, Tensor], client_ids: list[int],
                     round_idx: int, store: ClientStore) -> RoundResult:
        """Local training of clients sorted longest first: at each step only the
        first k rows, the clients still training, are computed; a finished client's
        parameters are set aside, exactly as if it had trained alone."""
        plan, steps = self._batch_plan(client_ids, round_idx)
        cstate = moved(_stacked_states(algorithm, store, client_ids, x0.shape[-1]), self.device)
        opt, objective = self.local.optimizer, self._objective(algorithm)
        # the fused or general step for the model's own objective; a client rule's own (APFL) takes autograd
        step = self._step if objective[0] == self._masked_loss else partial(self._gradients, objective)
        # x0 is one model [d] or each client's own [n, d]; a row is copied only when its client finishes first
        X = x0.expand(len(client_ids), -1)
        final, opt_state, state, starts = None, opt.init(X), cstate, x0
        lstate = algorithm.local_init(X, sent, cstate) if two_point(algorithm) else None
        loss_sum = torch.zeros(len(client_ids), device=self.device)
        examples, valid = plan.clamp(min=0), (plan >= 0).float().to(self.device)
        row = 0
        for k, width in _schedule(plan, steps):
            if k < len(X):  # clients k.. have finished
                final = torch.empty_like(X) if final is None else final  # no client has finished before
                final[k:len(X)] = X[k:]
                X, opt_state, state, lstate = _first_rows((X, opt_state, state, lstate), k)
                starts = starts[:k] if starts.dim() == 2 else starts
            batch = examples[row:row + k, :width]  # no work on padding past the step's longest real batch
            xb, yb = self.examples.batch(batch)
            vb = valid[row:row + k, :width]
            g, loss = step(X, xb, yb, vb)
            row += k
            direction, lstate = self._direction(algorithm, g, X, starts, sent, state, lstate, (xb, yb, vb))
            X, opt_state = opt.step(X, direction, opt_state)
            X = projected(algorithm, X)
            loss_sum[:k] += loss.detach()
        if final is None:  # every client trained to the last step
            final = X
        else:
            final[:len(X)] = X
        rows, aux, new_state = algorithm.client_result(x0, final, steps, opt.lr, sent, cstate)
        for i, cid in enumerate(client_ids):
            store.put(cid, {k: v[i].to("cpu", copy=True) for k, v in new_state.items()})
        weights = torch.from_numpy(self.sizes[client_ids]).float()
        return RoundResult(list(client_ids), rows.detach().cpu(), weights, moved(aux, torch.device("cpu")),
                           loss_sum.cpu() / steps.clamp(min=1))



def _stacked_states(algorithm, store: ClientStore, client_ids: list[int], d: int) -> dict[str, Tensor]:
    states = [store.get(cid, lambda: algorithm.client_init(d)) for cid in client_ids]
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def _schedule(plan: Tensor, steps: Tensor) -> list[tuple[int, int]]:
    """For each step of a chunk whose clients come longest first: how many clients
    still train (the plan's rows for the step), and their longest real batch."""
    steps = steps.numpy()
    training = np.searchsorted(-steps, -np.arange(steps.max(initial=0)), side="left")  # clients with more than t steps
    widths = np.maximum.reduceat((plan >= 0).sum(dim=1).numpy(), np.cumsum(training) - training) if len(plan) else []
    return list(zip(training.tolist(), np.asarray(widths).tolist()))


def _first_rows(tree, k: int):
    """The first k rows of every tensor in a tuple / dict of client-stacked tensors
    (optimizer states also hold step counters, left as they are)."""
    if isinstance(tree, Tensor):
        return tree[:k]
    if isinstance(tree, tuple):
        return tuple(_first_rows(v, k) for v in tree)
    if isinstance(tree, dict):
        return {name: _first_rows(v, k) for name, v in tree.items()}
    return tree
