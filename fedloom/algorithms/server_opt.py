"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization").

The server treats ``x - mean(local models)`` as a gradient and steps a torch.optim
optimizer on the global parameters: FedAvg is SGD with lr 1, FedAvgM adds momentum,
FedAdam and FedYogi follow the paper's Algorithm 2 (``ServerAdam``, ``Yogi`` below:
no bias correction, v starting at tau^2, tau added to sqrt(v)), FedAdagrad is torch's
Adagrad with the paper's tau as eps and tau^2 as the initial accumulator (the paper's
FedAdagrad also keeps a momentum m, which torch's Adagrad has not). torch's own Adam,
with bias correction and v starting at 0, is there as ``torch_adam``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class _Algorithm2(torch.optim.Optimizer):
    """Reddi et al. 2021, Algorithm 2, with g the pseudo-gradient (= -Delta): m <- beta1 m + (1 - beta1) g,
    v <- the subclass's ``second_moment`` rule from v_{-1} = tau^2, x <- x - lr m / (sqrt(v) + tau);
    no bias correction."""

    def __init__(self, params, lr: float = 1e-2, betas=(0.9, 0.99), tau: float = 1e-3):
        super().__init__(params, dict(lr=lr, betas=betas, tau=tau))

    @staticmethod
    def second_moment(v: Tensor, g2: Tensor, beta2: float) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, group["tau"] ** 2)
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                self.second_moment(state["v"], p.grad * p.grad, beta2)
                p.addcdiv_(state["m"], state["v"].sqrt().add_(group["tau"]), value=-group["lr"])


class ServerAdam(_Algorithm2):
    """FedAdam's server step (Reddi et al. 2021, Algorithm 2): v <- beta2 v + (1 - beta2) g^2."""

    @staticmethod
    def second_moment(v: Tensor, g2: Tensor, beta2: float) -> None:
        """Adam's second-moment update, in place: ``v <- beta2 v + (1 - beta2) g2``."""
        v.mul_(beta2).add_(g2, alpha=1 - beta2)


class Yogi(_Algorithm2):
    """Yogi (Zaheer et al. 2018) as in Reddi et al. 2021, Algorithm 2: v <- v - (1 - beta2) g^2 sign(v - g^2)."""

    @staticmethod
    def second_moment(v: Tensor, g2: Tensor, beta2: float) -> None:
        """Yogi's second-moment update, in place: ``v <- v - (1 - beta2) g2 sign(v - g2)``."""
        v.sub_((1 - beta2) * g2 * torch.sign(v - g2))


class ServerSGD:
    """torch.optim.SGD's rule for the server (momentum without dampening, no Nesterov, no weight decay:
    x <- x - lr buf, buf <- momentum buf + g, buf starting at g), with its state_dict's layout, but not a
    torch.optim.Optimizer: a process's first torch.optim optimizer imports torch._dynamo (about 1 s of
    every run's start-up), which FedAvg's server step does not need. Bit-identical to torch's on CPU."""

    def __init__(self, param: nn.Parameter, lr: float, momentum: float = 0.0):
        self.param, self.lr, self.momentum, self.buffer = param, lr, momentum, None

    def load_state_dict(self, state: dict) -> None:
        """Restore the momentum buffer from a ``state_dict()`` (torch.optim.SGD's layout)."""
        self.buffer = state["state"].get(0, {}).get("momentum_buffer")

    def state_dict(self) -> dict:
        """The momentum buffer and hyperparameters in torch.optim.SGD's ``state_dict`` layout."""
        kept = {0: {"momentum_buffer": self.buffer}} if self.buffer is not None else {}
        return {"state": kept, "param_groups": [{"lr": self.lr, "momentum": self.momentum, "params": [0]}]}

    @torch.no_grad()
    def step(self) -> None:
        """One SGD step of the parameter along its ``.grad`` (with momentum when set), in place."""
        grad = self.param.grad
        if self.momentum:
            self.buffer = grad.clone() if self.buffer is None else self.buffer.mul_(self.momentum).add_(grad)
            grad = self.buffer
        self.param.add_(grad, alpha=-self.lr)


OptimizerFactory = Callable[[nn.Parameter], "torch.optim.Optimizer | ServerSGD"]


def server_optimizer(name: str, lr: float, momentum: float = 0.0, beta1: float = 0.9,
                     beta2: float = 0.99, tau: float = 1e-3) -> OptimizerFactory:
    """A factory building the named optimizer over the flat global parameters."""
    makers: dict[str, OptimizerFactory] = {
        "sgd": lambda p: ServerSGD(p, lr=lr, momentum=momentum),
        "adam": lambda p: ServerAdam([p], lr=lr, betas=(beta1, beta2), tau=tau),
        "torch_adam": lambda p: torch.optim.Adam([p], lr=lr, betas=(beta1, beta2), eps=tau),
        "adagrad": lambda p: torch.optim.Adagrad([p], lr=lr, initial_accumulator_value=tau**2, eps=tau),
        "yogi": lambda p: Yogi([p], lr=lr, betas=(beta1, beta2), tau=tau),
    }
    if name not in makers:
        raise ValueError(f"unknown server optimizer {name!r}; available: {', '.join(makers)}")
    return makers[name]


def step_on_pseudo_gradient(optimizer: torch.optim.Optimizer | ServerSGD, params: nn.Parameter, pseudo_grad: Tensor) -> None:
    """One server step: the aggregated ``x - local`` plays the gradient."""
    params.grad = pseudo_grad.to(params.dtype).clone()
    optimizer.step()
    params.grad = None
