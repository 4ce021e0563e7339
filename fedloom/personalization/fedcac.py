"""FedCAC: Wu et al. 2023, "Bold but Cautious: Unlocking the Potential of Personalized Federated
Learning through Cautiously Aggressive Collaboration" (ICCV 2023).

Each sampled client trains the whole model from its own start (below) for the run's local
epochs. It then marks its *critical* parameters: per parameter tensor, the ``fedcac_tau``
fraction with the largest sensitivity |(theta - theta_start) * theta| (the first-order change
of the loss were the parameter zeroed, with the local update standing in for the gradient);
when that fraction reaches into parameters that did not move, only those that moved count.
The client sends its model (the row, as in FedAvg) and its mask (one bit a parameter, counted
in the uplink bytes).

The server measures how far client i's critical set overlaps client j's,
o_ij = 1 - |m_i - m_j|_1 / (2 |m_i|_1), and in round t lets i collaborate with the j whose
o_ij reaches mean(o) + (t / fedcac_beta) (max(o) - mean(o)) (over the round's pairs
i != j): bold early, when many overlap enough, cautious later, when the bar
passes the largest overlap and each client keeps its critical parameters to itself. Client i's
customized global model is the plain mean of its collaborators' models and its own; the global
model is the server pipeline's aggregate of every row. A client's next start (and its
personalized model) takes its critical parameters from its customized model and the others
from the global one. The customized model and the mask are client state; a client not sampled
yet starts from, and is evaluated with, the global model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedloom.core.params import ParamSpec
from fedloom.core.store import ClientStore
from fedloom.engines.base import RoundResult
from fedloom.personalization.base import LocalModels, Setting, train_pass, uplink

CUSTOMIZED, CRITICAL = "customized", "critical"  # the client state's keys
UNMOVED = 1e-10  # a top-tau cut at or below this sensitivity falls among parameters that did not move


def critical_mask(spec: ParamSpec, start: Tensor, trained: Tensor, tau: float) -> Tensor:
    """``[n, d]`` True at each client's critical parameters: per parameter tensor, the ``tau`` fraction
    (rounded down) with the largest |(trained - start) * trained|, ties at the cut included; a cut at
    an unmoved parameter's zero keeps only the moved ones."""
    sensitivity = ((trained - start) * trained).abs()
    pieces = []
    for values in torch.split(sensitivity, spec.sizes, dim=-1):
        k = int(tau * values.shape[-1])
        if k == 0:
            pieces.append(torch.zeros_like(values, dtype=torch.bool))
            continue
        cut = values.topk(k, dim=-1).values[..., -1:]
        pieces.append(torch.where(cut > UNMOVED, values >= cut, values > 0))
    return torch.cat(pieces, dim=-1)


def overlaps(masks: Tensor) -> Tensor:
    """``[n, n]``: o_ij = 1 - |m_i - m_j|_1 / (2 |m_i|_1), the share of i's critical set j shares."""
    m = masks.float()
    differ = torch.cdist(m, m, p=1)
    return 1 - differ / (2 * m.sum(-1, keepdim=True).clamp(min=1))


def collaborators(o: Tensor, round_idx: int, beta: int) -> Tensor:
    """``[n, n]`` True where client i averages client j's critical parameters (always itself): o_ij at
    or above mean + (round / beta) (max - mean) of the off-diagonal overlaps."""
    n = len(o)
    others = ~torch.eye(n, dtype=torch.bool, device=o.device)
    if n < 2:
        return ~others
    pairs = o[others]
    bar = pairs.mean() + round_idx / beta * (pairs.max() - pairs.mean())
    return (o >= bar) | ~others


def customized_models(models: Tensor, together: Tensor) -> Tensor:
    """``[n, d]``: each client's mean of its collaborators' models (``together[i]``, itself included)."""
    weights = together.to(models.dtype)
    return weights @ models / weights.sum(-1, keepdim=True)


class FedCAC:
    """FedCAC (Wu et al., "Bold but Cautious: Unlocking the Potential of Personalized Federated Learning
    through Cautiously Aggressive Collaboration", 2023): critical parameters averaged only among clients
    whose critical sets overlap enough, the others with everyone."""
    name = "fedcac"
    splits = False  # every parameter is shared; what differs per client is which are averaged with whom

    def __init__(self, setting: Setting, fedcac_tau: float = 0.5, fedcac_beta: int = 100):
        self.s, self.tau, self.beta = setting, fedcac_tau, fedcac_beta

    def starts(self, x: Tensor, clients: list[int], store: ClientStore) -> Tensor:
        """Each client's model ``[n, d]``: critical parameters from its customized model, the others global."""
        rows = []
        for c in clients:
            state = store.states.get(c)
            rows.append(x if state is None else torch.where(state[CRITICAL].to(x.device),
                                                            state[CUSTOMIZED].to(x.device, x.dtype), x))
        return torch.stack(rows)

    def train(self, engine, algorithm, x: Tensor, sent: dict[str, Tensor], clients: list[int], round_idx: int,
              store: ClientStore) -> RoundResult:
        """Local training from each client's customized start, its critical mask, and the customized models."""
        starts = self.starts(x, clients, store)
        trained = train_pass(engine, LocalModels(algorithm), starts, sent, clients, round_idx, self.s.local)
        local = trained.U
        masks = critical_mask(self.s.split.spec, starts.to(local.device), local, self.tau)
        together = collaborators(overlaps(masks), round_idx, self.beta)
        for c, model, mask in zip(clients, customized_models(local, together), masks):
            store.put(c, {CUSTOMIZED: model.detach().cpu().clone(), CRITICAL: mask.cpu().clone()})
        return uplink(self.s.split, x, trained)

    def side_bytes(self, n_sent: int) -> int:
        """The critical masks' uplink bytes: one bit a parameter, for each of ``n_sent`` clients."""
        return n_sent * math.ceil(self.s.split.spec.dim / 8)

    def client_models(self, engine, x: Tensor, clients: list[int], store: ClientStore) -> Tensor:
        """Each client's model: its critical parameters from its customized model, the rest global."""
        return self.starts(x, clients, store)
