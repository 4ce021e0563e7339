"""FedLAW: Li, Lin, Shang, Wu 2023, "Revisiting Weighted Aggregation in Federated Learning with Neural
Networks" (ICML).

The server learns the round's aggregation weights lambda = softmax(l) over the clients' local models
w_i and a global weight shrinking factor gamma = exp(g) on a small proxy dataset it holds: the global
model is gamma * sum_i lambda_i w_i, and (l, g) minimize its proxy loss by Adam (betas 0.5, 0.999, the
lr halved every 20 epochs, as in the authors' code) over ``epochs`` epochs of minibatches. Each round
starts from FedAvg's weights (l = log of the rows' weights normalized) and gamma = 1, so the transform
keeps no state. The proxy set is a ``proxy_fraction`` of the pooled training examples, drawn once from
stream PERSONAL; its batch orders are keyed by round and epoch.

The transform ends the rows in one, x - gamma sum_i lambda_i w_i (w_i = x - U_i): the plain mean and the
server's SGD at lr 1 after it make the next global model FedLAW's.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from fedloom.core.local_optim import Adam
from fedloom.core.rng import Stream, numpy_generator
from fedloom.pipeline.base import Context, ServerData, Transform

PROXY_KEY = 100  # stream PERSONAL keyed by this: the proxy examples, then (round, this, epoch) their batch orders
LR_HALVED_EVERY = 20  # epochs


def proxy_examples(server: ServerData, fraction: float) -> Tensor:
    """Indices of the server's proxy examples: ``fraction`` of the pooled training examples (at least one)."""
    pool = torch.cat(list(server.data.train_idx))
    k = min(len(pool), max(1, round(fraction * len(pool))))
    chosen = numpy_generator(server.seed, Stream.PERSONAL, PROXY_KEY).choice(len(pool), size=k, replace=False)
    return pool[torch.from_numpy(chosen)]


def shrunk_mixture(theta: Tensor, W: Tensor) -> Tensor:
    """gamma * sum_i lambda_i W_i for theta = [l_1 .. l_n, g]: lambda = softmax(l), gamma = exp(g)."""
    return theta[-1].exp() * (torch.softmax(theta[:-1], 0) @ W)


def learn_weights(server: ServerData, proxy: Tensor, W: Tensor, weights: Tensor, ctx: Context, epochs: int,
                  lr: float, batch_size: int) -> tuple[Tensor, float]:
    """FedLAW's (l, g) after ``epochs`` epochs of Adam on the proxy loss of the shrunk mixture of ``W``,
    and the loss of the last batch."""
    theta = torch.cat([(weights / weights.sum()).log(), torch.zeros(1)]).to(W.device, W.dtype)
    adam = Adam(lr, beta1=0.5, beta2=0.999)
    state, loss = adam.init(theta), torch.tensor(float("nan"))
    for epoch in range(epochs):
        step = replace(adam, lr=lr * 0.5 ** (epoch // LR_HALVED_EVERY))
        order = proxy[torch.randperm(len(proxy), generator=ctx.generator(Stream.PERSONAL, PROXY_KEY, epoch))]
        for batch in order.split(batch_size):
            theta = theta.detach().requires_grad_()
            loss = server.loss(shrunk_mixture(theta, W), *server.batch(batch))
            (g,) = torch.autograd.grad(loss, theta)
            theta, state = step.step(theta.detach(), g, state)
    return theta.detach(), float(loss.detach())


def fedlaw(server_data: ServerData | None = None, proxy_fraction: float = 0.02, epochs: int = 10, lr: float = 0.01,
           batch_size: int = 64) -> Transform:
    """FedLAW's learned aggregation (options proxy_fraction, epochs, lr, batch_size); it comes last of
    server.transforms, before the plain mean."""
    if not 0 < proxy_fraction <= 1:
        raise ValueError(f"fedlaw: proxy_fraction must be in (0, 1]; got {proxy_fraction!r}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"fedlaw: epochs and batch_size must be >= 1 and lr > 0; got {epochs}, {batch_size}, {lr}")
    proxy = proxy_examples(server_data, proxy_fraction) if server_data is not None else None

    def apply(U: Tensor, w: Tensor, state: None, ctx: Context):
        if server_data is None:
            raise ValueError("fedlaw: this pipeline was built without the server's data (its proxy set)")
        x = ctx.params.to(server_data.device, U.dtype)
        W = x - U.to(server_data.device)  # the clients' local models
        theta, proxy_loss = learn_weights(server_data, proxy, W, w.to(U.dtype), ctx, epochs, lr, batch_size)
        row = (x - shrunk_mixture(theta, W)).to(U.device)
        lam = torch.softmax(theta[:-1], 0)
        return row[None], torch.ones(1, dtype=w.dtype), state, {
            "fedlaw_gamma": float(theta[-1].exp()), "fedlaw_lambda_max": float(lam.max()),
            "fedlaw_proxy_loss": proxy_loss}

    return Transform("fedlaw", apply)
