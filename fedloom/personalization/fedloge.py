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

The paper trains the three on each batch at once (features detached for the two heads); here they
are three passes of the engine over the same batches (the run's batch orders), the heads after the
backbone. GLA-FR realigns the auxiliary head at evaluation. Global: each class's weight row scaled
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
from fedloom.core.store import ClientStore
from fedloom.engines.base import RoundResult
from fedloom.personalization.base import LocalModels, Setting, keep, train_pass, uplink
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
        """The backbone under SSE-C, then the auxiliary and the local heads on the new backbone."""
        head, local = self.head, self.s.local
        under_sse_c = head.with_personal(x, self.sse_c.expand(len(clients), -1))
        backbones = train_pass(engine, LocalModels(algorithm, ~head.mask), under_sse_c, sent, clients, round_idx,
                               local)
        auxiliary = train_pass(engine, LocalModels(algorithm, head.mask),
                               head.with_personal(backbones.U, head.personal_part(x).expand(len(clients), -1)),
                               sent, clients, round_idx, local)
        local_heads = train_pass(engine, LocalModels(algorithm, head.mask),
                                 head.with_personal(backbones.U, self.local_heads(x, clients, store)), sent, clients,
                                 round_idx, local).U
        keep(store, clients, LOCAL_HEAD, head.personal_part(local_heads))
        # the round's train_loss is the backbone's, under SSE-C
        return replace(uplink(self.s.split, x, auxiliary), train_loss=backbones.train_loss)

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
