"""FedLoGe: Xiao et al. 2024, "FedLoGe: Joint Local and Generic Federated Learning under Long-tailed
Data" (ICLR 2024).

The model is a shared backbone and a linear head (``personalization.personal``, by default the
last layer: a weight ``[K, F]`` and its bias). Three heads play a part:

- SSE-C, the static sparse equiangular tight frame classifier: a simplex ETF of K unit columns in
  R^F, M = sqrt(K / (K - 1)) P (I - 11^T / K) with P ``[F, K]`` orthonormal (drawn from stream
  PERSONAL), with its ``fedloge_sparsity`` fraction of smallest-magnitude entries set to zero,
  no bias. It is fixed: every sampled client trains the backbone under it.
- the global auxiliary head, in the global model's head slot: each sampled client trains it on
  the features of its newly trained backbone (backbone frozen), and the server aggregates it with
  the backbone (the row is the change of both, as in FedAvg).
- each client's local head, client state, never sent: trained likewise from where it was (first
  from the global auxiliary head).

The three train together, as in the paper: every local step, on one batch, the backbone takes the
gradient of its loss under SSE-C, and the two heads the gradients of their losses on that batch's
features detached from the backbone. The engine trains one row [x, local head] per client on the sum of
the three losses (``JointHeads``), each of whose gradients reaches only its own coordinates (checked
against the authors' released code: features computed once a batch, the heads on ``features.detach()``).
GLA-FR realigns the auxiliary head at evaluation. Global: each class's weight row scaled
to unit norm, undoing the norm bias of frequent classes: the generic model
(``federated_<metric>``, the saved model). Local: client k's head is the auxiliary head with each
class row scaled by the norm of its local head's row, plus its local head (weights and biases
summed: the logits of both), as the authors' released code does: the personalized model.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, torch_generator
from fedloom.core.store import ClientState, ClientStore
from fedloom.engines.base import RoundResult
from fedloom.personalization.base import LocalModels, Setting, keep, train_pass
from fedloom.personalization.split import Split, personal_names

LOCAL_HEAD = "local_head"  # the client state's key: the client's local head (weight and bias, flat)
ETF_KEY = 1000  # the ETF's orthonormal basis: stream PERSONAL keyed by this, far from the passes' small keys


def simplex_etf(features: int, classes: int, generator: torch.Generator) -> Tensor:
    """``[features, classes]``: K unit columns with pairwise inner products -1 / (K - 1)."""
    basis, _ = torch.linalg.qr(torch.randn(features, classes, generator=generator, dtype=torch.float64))
    centred = torch.eye(classes, dtype=torch.float64) - 1 / classes
    return (math.sqrt(classes / (classes - 1)) * basis @ centred).float()


def sparsified(M: Tensor, sparsity: float) -> Tensor:
    """``M`` with its ``sparsity`` fraction (rounded down) of smallest-magnitude entries set to zero."""
    k = int(sparsity * M.numel())
    if k == 0:
        return M.clone()
    flat = M.flatten().clone()
    flat[flat.abs().argsort()[:k]] = 0
    return flat.reshape(M.shape)


def _linear_head(spec: ParamSpec, names: tuple[str, ...]) -> tuple[str, str | None]:
    """The head's weight and bias names: one ``[K, F]`` weight (K >= 2, F >= K) and at most one ``[K]`` bias."""
    from fedloom.config import ConfigError

    shapes = dict(zip(spec.names, spec.shapes))
    weights = [n for n in names if len(shapes[n]) == 2]
    biases = [n for n in names if len(shapes[n]) == 1]
    K = shapes[weights[0]][0] if len(weights) == 1 else 0
    if len(weights) != 1 or len(biases) > 1 or any(shapes[b] != (K,) for b in biases) or len(names) > 2:
        raise ConfigError(f"personalization.method = 'fedloge' needs a linear head (one [K, F] weight, a [K] bias): "
                          f"personalization.personal selects {', '.join(f'{n} {tuple(shapes[n])}' for n in names)}")
    if not 2 <= K <= shapes[weights[0]][1]:
        raise ConfigError(f"personalization.method = 'fedloge': the head {weights[0]} {tuple(shapes[weights[0]])} "
                          "needs 2 <= classes <= features for an equiangular tight frame")
    return weights[0], (biases[0] if biases else None)


class JointHeads(LocalModels):
    """The client rule of FedLoGe's local steps on rows [x, local head] (x: backbone and auxiliary head):
    the objective is the backbone's loss under the fixed SSE-C head plus the auxiliary and the local heads'
    losses on the backbone's features held fixed, so one step moves each part by its own loss's gradient;
    ``inner``'s correction (FedProx's pull, ...) applies to x; like every pass, no client state of its own
    and the trained row itself out (``LocalModels``)."""

    def __init__(self, inner, head_mask: Tensor, sse_c: Tensor):
        super().__init__(inner)
        self.mask, self.d = head_mask, len(head_mask)
        # where each of x's head coordinates sits in a head vector (0 elsewhere: masked out)
        self.at = torch.zeros(self.d, dtype=torch.long)
        self.at[head_mask] = torch.arange(int(head_mask.sum()))
        self.sse_c = sse_c

    def objective(self, loss):
        """The sum of the three losses of one row (class docstring); its value is the backbone's loss
        under SSE-C, the round's train_loss."""
        d = self.d

        def joint(z: Tensor, xb: Tensor, yb: Tensor, valid: Tensor | None = None) -> Tensor:
            x, mask, at = z[:d], self.mask.to(z.device), self.at.to(z.device)
            with_head = lambda base, head: torch.where(mask, head[at], base)  # noqa: E731
            backbone = loss(with_head(x, self.sse_c.to(z)), xb, yb, valid)
            auxiliary = loss(torch.where(mask, x, x.detach()), xb, yb, valid)
            local = loss(with_head(x.detach(), z[d:]), xb, yb, valid)
            return backbone + (auxiliary - auxiliary.detach()) + (local - local.detach())

        return joint

    def correct_grad(self, g: Tensor, x: Tensor, x0: Tensor, sent: dict[str, Tensor], cstate: ClientState) -> Tensor:
        """The inner algorithm's correction on x; the local head's gradient as it is."""
        d = self.d
        return torch.cat([self.inner.correct_grad(g[..., :d], x[..., :d], x0[..., :d], sent, cstate), g[..., d:]], -1)


class FedLoGe:
    """FedLoGe (Xiao et al., "FedLoGe: Joint Local and Generic Federated Learning under Long-tailed
    Data", 2024): a backbone under a fixed sparse ETF head (SSE-C), an aggregated auxiliary head, local
    heads, and GLA-FR's realignment for the generic and the personalized models."""
    name = "fedloge"
    splits = False  # the global model (backbone, auxiliary head) is shared whole; local heads are client state

    def __init__(self, setting: Setting, personal: str | list[str] = "head", fedloge_sparsity: float = 0.6):
        spec = setting.split.spec
        self.s, self.head = setting, Split(spec, personal_names(spec, personal))
        self.weight, self.bias = _linear_head(spec, self.head.personal)
        K, F = dict(zip(spec.names, spec.shapes))[self.weight]
        etf = sparsified(simplex_etf(F, K, torch_generator(setting.seed, Stream.PERSONAL, ETF_KEY)), fedloge_sparsity)
        self.sse_c = self._head_vector(etf.T, torch.zeros(K))  # the fixed head, as the head's coordinates

    def _head_vector(self, weight: Tensor, bias: Tensor) -> Tensor:
        """Heads (weights ``[..., K, F]``, biases ``[..., K]``) as coordinates ``[..., d_head]`` in the order of
        ``self.head.personal`` (the bias left out if the model has none)."""
        parts = {self.weight: weight.flatten(-2), self.bias: bias}
        return torch.cat([parts[n] for n in self.head.personal], dim=-1)

    def _weight_bias(self, heads: Tensor) -> tuple[Tensor, Tensor]:
        """Heads ``[..., d_head]`` as weights ``[..., K, F]`` and biases ``[..., K]`` (zeros if the model has none)."""
        shapes = dict(zip(self.head.spec.names, self.head.spec.shapes))
        names = self.head.personal
        pieces = dict(zip(names, torch.split(heads, [shapes[n].numel() for n in names], dim=-1)))
        weight = pieces[self.weight].reshape(*heads.shape[:-1], *shapes[self.weight])
        if self.bias is None:
            return weight, torch.zeros(weight.shape[:-1], dtype=heads.dtype, device=heads.device)
        return weight, pieces[self.bias]

    def train(self, engine, algorithm, x: Tensor, sent: dict[str, Tensor], clients: list[int], round_idx: int,
              store: ClientStore) -> RoundResult:
        """Each client's row [x, local head] trained jointly (``JointHeads``); the change of x (backbone and
        auxiliary head) goes to the server, the local head stays."""
        d = len(x)
        starts = torch.cat([x.expand(len(clients), d), self.local_heads(x, clients, store)], 1)
        rule = JointHeads(algorithm, self.head.mask, self.sse_c)
        trained = train_pass(engine, rule, starts, sent, clients, round_idx, self.s.local)
        keep(store, clients, LOCAL_HEAD, trained.U[:, d:])
        return replace(trained, U=x.to(trained.U.device) - trained.U[:, :d], aux={})

    def local_heads(self, x: Tensor, clients: list[int], store: ClientStore) -> Tensor:
        """``[n, d_head]``: each client's local head; one not sampled yet has the global auxiliary head."""
        aux = self.head.personal_part(x)
        return torch.stack([store.states[c][LOCAL_HEAD].to(x.device) if c in store else aux for c in clients])

    def generic(self, x: Tensor) -> Tensor:
        """The generic model: ``x`` with its auxiliary head's class rows scaled to unit norm (GLA-FR, global)."""
        weight, bias = self._weight_bias(self.head.personal_part(x))
        unit = weight / weight.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return self.head.with_personal(x, self._head_vector(unit, bias)[None])[0]

    def client_models(self, engine, x: Tensor, clients: list[int], store: ClientStore) -> Tensor:
        """Each client's model: the backbone and, as its head, the auxiliary head with its class rows scaled
        to the norms of the client's local head's rows, plus that local head (GLA-FR, local); a client not
        sampled yet has the generic model."""
        aux_w, aux_b = self._weight_bias(self.head.personal_part(x))
        local_w, local_b = self._weight_bias(self.local_heads(x, clients, store))
        realigned = aux_w * local_w.norm(dim=-1, keepdim=True) + local_w
        models = self.head.with_personal(x, self._head_vector(realigned, aux_b + local_b))
        unseen = torch.tensor([c not in store for c in clients], device=x.device)
        return torch.where(unseen[:, None], self.generic(x), models)
