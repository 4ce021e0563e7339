"""APFL: Deng, Kamani, Mahdavi 2020, "Adaptive Personalized Federated Learning".

Each client keeps a personal model v and a mixing weight alpha; its personalized model is the
mixture alpha v + (1 - alpha) w of v and the global model w. Every local step, on one batch, updates
all three at the current point:

    w     <- w - lr grad f(w)                                     (the global copy: the run's client rule)
    v     <- v - lr grad_v f(m)      = v - lr alpha grad f(m)     (m = alpha v + (1 - alpha) w)
    alpha <- alpha - alpha_lr grad_alpha f(m) = alpha - alpha_lr <v - w, grad f(m)>, clipped to [0, 1]

The engine trains a row z = [w, v, alpha] of length 2d + 1 on the objective f(w) + f(m), w held
fixed inside m, whose gradient is exactly the three directions above; the alpha coordinate's
gradient is rescaled to alpha_lr (zeroed without ``adaptive_alpha``) and clipped after the step.
The client sends w's change, as in FedAvg, and keeps v and alpha in its client state; v starts as
the first global model it receives, alpha at ``apfl_alpha``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from fedloom.core.store import ClientState, ClientStore
from fedloom.engines.base import RoundResult
from fedloom.personalization.base import Setting, train_pass

V, ALPHA = "v", "alpha"  # the client state's keys: the personal model, the mixing weight


def mixture(Z: Tensor, d: int) -> Tensor:
    """The personalized models alpha v + (1 - alpha) w of rows [w, v, alpha] (``[..., 2d + 1]``)."""
    w, v, alpha = Z[..., :d], Z[..., d:2 * d], Z[..., 2 * d:]
    return alpha * v + (1 - alpha) * w


class MixtureRule:
    """The client rule of APFL's local steps on rows [w, v, alpha]: ``inner``'s correction on w, the
    alpha coordinate's step scaled to ``alpha_lr`` (0: alpha fixed), alpha kept in [0, 1]; the row
    out is the trained [w, v, alpha] itself."""

    plain_sgd_only = False

    def __init__(self, inner, d: int, lr: float, alpha_lr: float):
        self.inner, self.d, self.alpha_scale = inner, d, alpha_lr / lr

    def client_init(self, d: int) -> ClientState:
        """No client state of its own: v and alpha travel in the row."""
        return {}

    def objective(self, loss):
        """APFL's objective of one row [w, v, alpha]: f(w) + f(alpha v + (1 - alpha) w), w held fixed in
        the mixture, so its gradient is the paper's three updates."""
        d = self.d

        def both(z: Tensor, xb: Tensor, yb: Tensor, valid: Tensor | None = None) -> Tensor:
            own = loss(z[:d], xb, yb, valid)
            mixed = loss(mixture(torch.cat([z[:d].detach(), z[d:]]), d), xb, yb, valid)
            # the value is the global copy's loss (train_loss, as in FedAvg); the gradient is both terms'
            return own + (mixed - mixed.detach())

        return both

    def correct_grad(self, g: Tensor, x: Tensor, x0: Tensor, sent: dict[str, Tensor], cstate: ClientState) -> Tensor:
        """The inner algorithm's correction on w only; alpha's gradient rescaled to its own learning rate."""
        d = self.d
        g_w = self.inner.correct_grad(g[..., :d], x[..., :d], x0[..., :d], sent, cstate)
        return torch.cat([g_w, g[..., d:2 * d], g[..., 2 * d:] * self.alpha_scale], dim=-1)

    def project(self, x: Tensor) -> Tensor:
        """alpha clipped to [0, 1] after each step, as in the paper."""
        return torch.cat([x[..., :2 * self.d], x[..., 2 * self.d:].clamp(0, 1)], dim=-1)

    def client_result(self, x0: Tensor, x: Tensor, steps: Tensor, lr: float, sent: dict[str, Tensor],
                      cstate: ClientState) -> tuple[Tensor, dict[str, Tensor], ClientState]:
        """The trained row as it is (APFL splits it into w's update and the personal state)."""
        return x, {}, cstate


class APFL:
    """APFL (Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", 2020): each client keeps
    a personal model v and a mixing weight alpha; every local step trains w, v and alpha together, and the
    client's model is alpha v + (1 - alpha) w."""
    name = "apfl"
    splits = False  # the global model is shared whole; v and alpha are personal

    def __init__(self, setting: Setting, apfl_alpha: float = 0.5, adaptive_alpha: bool = True,
                 alpha_lr: float | None = None):
        self.s, self.alpha = setting, apfl_alpha
        lr = setting.local.optimizer.lr
        self.alpha_lr = (lr if alpha_lr is None else alpha_lr) if adaptive_alpha else 0.0

    def personal(self, x: Tensor, clients: list[int], store: ClientStore) -> Tensor:
        """Each client's [v, alpha] ``[n, d + 1]``; a client not seen yet has v = x and the initial alpha."""
        fresh = lambda: {V: x.clone(), ALPHA: torch.tensor(self.alpha, dtype=x.dtype)}  # noqa: E731
        states = [store.get(c, fresh) for c in clients]
        return torch.cat([torch.stack([s[V] for s in states]), torch.stack([s[ALPHA] for s in states])[:, None]], 1)

    def train(self, engine, algorithm, x: Tensor, sent: dict[str, Tensor], clients: list[int], round_idx: int,
              store: ClientStore) -> RoundResult:
        """The clients' rows [w, v, alpha] trained jointly; w's change goes to the server, v and alpha stay."""
        d = len(x)
        starts = torch.cat([x.expand(len(clients), d), self.personal(x, clients, store)], 1)
        rule = MixtureRule(algorithm, d, self.s.local.optimizer.lr, self.alpha_lr)
        trained = train_pass(engine, rule, starts, sent, clients, round_idx, self.s.local)
        for c, z in zip(clients, trained.U.detach().cpu()):
            store.put(c, {V: z[d:2 * d].clone(), ALPHA: z[2 * d].clone()})
        return replace(trained, U=x.to(trained.U.device) - trained.U[:, :d], aux={})

    def client_models(self, engine, x: Tensor, clients: list[int], store: ClientStore) -> Tensor:
        """Each client's mixture alpha v + (1 - alpha) x with the current global model x."""
        return mixture(torch.cat([x.expand(len(clients), len(x)), self.personal(x, clients, store)], 1), len(x))
