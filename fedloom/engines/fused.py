"""The fused local step: every stacked client's gradient of a small classifier in a
handful of batched matmuls, with no torch.func or autograd machinery.

The vectorized engine's general step (functional_call under vmap, then autograd)
costs about 0.3-1 ms of framework overhead per call on the CPU whatever the model's
size, and a round calls it once per sequential step of its longest client. For the
models whose backward is short enough to write by hand, ``nn.Sequential`` of an
optional ``Flatten``, ``Linear`` layers and ``ReLU`` between them (logistic
regression and the MLP) under the classification task's cross-entropy, this module
computes the same forward and backward with the same ATen kernels autograd would
call (``addmm`` for one client, ``bmm`` for many, ``_log_softmax_backward_data``,
``threshold_backward``), so on the CPU the gradients and losses are bit-identical
to the general step's (tests/test_fused.py). Anything else is not recognised and
the engine keeps the general step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedloom.core.params import ParamSpec
from fedloom.tasks import Classification, Task

aten = torch.ops.aten


@dataclass(frozen=True)
class Dense:
    """One Linear layer's parameters, by their names in the ParamSpec."""

    weight: str
    bias: str | None


@dataclass(frozen=True)
class FusedStep:
    """The gradient and loss of stacked clients for a chain of Linear layers with ReLU between them."""

    spec: ParamSpec
    layers: tuple[Dense, ...]

    def __call__(self, X: Tensor, xb: Tensor, yb: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Each client's gradient ``[k, d]`` and mean loss ``[k]`` over the real examples of its
        padded batch (``xb [k, B, ...]``, ``yb [k, B]``, ``valid [k, B]`` 1 for real examples)."""
        k, batch = yb.shape
        params = self.spec.unflatten(X)
        single = k == 1  # the general step runs one client without vmap: addmm, not bmm
        inputs = [xb.reshape(k, batch, -1)]
        for i, layer in enumerate(self.layers):
            bias = params[layer.bias] if layer.bias is not None else None
            z = _linear(inputs[-1], params[layer.weight], bias, single)
            inputs.append(z.relu() if i < len(self.layers) - 1 else z)
        logp = inputs.pop().log_softmax(-1)
        target = yb[..., None]
        count = valid.sum(1).clamp(min=1)
        losses = (-logp.gather(-1, target).squeeze(-1) * valid).sum(1) / count
        # d loss / d log p: -1/count at each real example's target class (what autograd of mean_loss gives)
        upstream = torch.zeros_like(logp).scatter_add_(-1, target, (-((1 / count)[:, None] * valid))[..., None])
        dz = aten._log_softmax_backward_data(upstream, logp, -1, logp.dtype)
        grads: dict[str, Tensor] = {}
        for i in reversed(range(len(self.layers))):
            layer, a = self.layers[i], inputs[i]
            dw, db, dx = _linear_backward(dz, a, params[layer.weight], single, need_input=i > 0)
            grads[layer.weight] = dw
            if layer.bias is not None:
                grads[layer.bias] = db
            if i > 0:
                dz = aten.threshold_backward(dx, a, 0)
        # each gradient copied once, into its columns: one cat costs less than a copy per parameter
        return torch.cat([grads[name].reshape(k, -1) for name in self.spec.names], dim=1), losses


def _linear(x: Tensor, w: Tensor, b: Tensor | None, single: bool) -> Tensor:
    """``x @ w^T + b`` for stacked clients, as F.linear runs it alone (addmm) or under vmap (bmm, then add)."""
    if single:
        z = torch.addmm(b[0], x[0], w[0].t()) if b is not None else x[0].mm(w[0].t())
        return z[None]
    z = torch.bmm(x, w.transpose(1, 2))
    return z + b[:, None, :] if b is not None else z


def _linear_backward(dz: Tensor, x: Tensor, w: Tensor, single: bool,
                     need_input: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The weight's, the bias's and (when asked) the input's gradient of :func:`_linear`."""
    if single:
        dz0 = dz[0]
        return dz0.t().mm(x[0])[None], dz0.sum(0)[None], dz0.mm(w[0])[None] if need_input else None
    return x.transpose(1, 2).bmm(dz).transpose(1, 2), dz.sum(1), dz.bmm(w) if need_input else None


def fused_step(model: nn.Module, task: Task, spec: ParamSpec, example: Tensor) -> FusedStep | None:
    """The fused step for ``model`` under ``task``, or None where it does not apply (see :func:`why_not_fused`)."""
    return None if why_not_fused(model, task, spec, example) else FusedStep(spec, _dense_layers(model))


def why_not_fused(model: nn.Module, task: Task, spec: ParamSpec, example: Tensor) -> str | None:
    """None when the fused step computes ``model``'s training exactly, else why not."""
    if type(task) is not Classification:
        return f"the fused step knows the classification task's cross-entropy only, not {task.name!r}"
    if type(model) is not nn.Sequential:
        return f"the fused step knows nn.Sequential models only, not {type(model).__name__}"
    modules = list(model)
    if modules and isinstance(modules[0], nn.Flatten):
        if (modules[0].start_dim, modules[0].end_dim) != (1, -1):
            return "the fused step knows nn.Flatten() with its default dimensions only"
        modules = modules[1:]
    elif example.dim() != 1:
        return "examples that are not vectors need a leading nn.Flatten()"
    kinds = [type(m) for m in modules]
    if not kinds or kinds[::2] != [nn.Linear] * len(kinds[::2]) or kinds[1::2] != [nn.ReLU] * len(kinds[1::2]) \
            or kinds[-1] is not nn.Linear:
        return "the fused step knows Linear layers with ReLU between them only"
    if len(spec.names) != sum(1 for _ in model.parameters()) or not example.is_floating_point():
        return "the fused step needs every parameter trained and floating-point examples"
    return None


def _dense_layers(model: nn.Sequential) -> tuple[Dense, ...]:
    return tuple(Dense(f"{name}.weight", f"{name}.bias" if m.bias is not None else None)
                 for name, m in model.named_children() if isinstance(m, nn.Linear))
