"""The server rules of asynchronous FL (mode = "asynchronous"), as pure functions on tensors; the event-driven
rounds run them on the virtual clock (``rounds/asynchronous.py``: arrivals; ``rounds/favano.py``: server wakes).

- FedAsync (Xie, Koyejo, Gupta 2019, "Asynchronous Federated Optimization"): x <- (1 - a) x + a y for every
  arriving local model y, a = alpha * s(staleness).
- FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"): K arriving deltas,
  scaled by s(staleness), averaged and applied by the server optimizer (server.lr is eta_g).
- The general buffered rule of Fraboni, Vidal, Kameni, Lorenzi 2023 ("A General Theory for Federated
  Optimization with Asynchronous and Heterogeneous Clients Updates", JMLR): x <- x - eta_g sum_i w_i Delta_i
  over the K buffered updates. The learning minimises sum_i r_i L_i with r_i proportional to d_i = E[w_i(n)],
  a client's expected weight per server step (its weight times how often its update is aggregated); that is
  the federated objective sum_i p_i L_i when d_i is proportional to p_i. ``identical`` weights w_i = 1/K are
  FedBuff (d_i proportional to how often client i arrives: fast clients win); ``unbiased`` weights
  w_i = p_i / f_i, f_i the share of server steps that aggregated client i, give d_i = p_i (the paper's
  weighted FedBuff; with K = 1 and every client always busy f_i = (1/T_i) / sum_j 1/T_j, its weighted
  asynchronous FedAvg p_i T_i sum_j 1/T_j).
- FAVANO (Leconte et al. 2023, "FAVANO: Federated AVeraging with Asynchronous NOdes"): clients train without
  pause; the server wakes, takes the current (possibly unfinished) local models y_i of s sampled clients and
  sets x <- (x + sum_i y_i) / (s + 1); those clients restart from the new x.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from fedloom.registry import Registry


def staleness_weight(kind: str, tau: int, a: float, b: float) -> float:
    """s(tau) of FedAsync's staleness functions."""
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1 + tau) ** -a)
    return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1)


def fedasync_mix(x: Tensor, local: Tensor, weight: float) -> Tensor:
    """FedAsync's server rule: (1 - a) x + a y."""
    return (1 - weight) * x + weight * local


def fraboni_weights(kind: str, importance: np.ndarray, aggregated: np.ndarray, steps: int) -> np.ndarray:
    """w_i of the buffered clients: ``identical`` 1/K; ``unbiased`` p_i / f_i with f_i = ``aggregated`` (server
    steps that took client i's update, this one included) / ``steps`` (server steps, this one included)."""
    if kind == "identical":
        return np.full(len(importance), 1.0 / len(importance))
    return np.asarray(importance, dtype=np.float64) * steps / np.asarray(aggregated, dtype=np.float64)


def favano_average(x: Tensor, locals_: Tensor) -> Tensor:
    """FAVANO's server rule: the server model and the s sampled clients' current models, averaged equally."""
    return (x + locals_.sum(dim=0)) / (len(locals_) + 1)


def completed_steps(elapsed: np.ndarray, step_seconds: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Local steps a client computing without pause has finished after ``elapsed`` virtual seconds, at most its
    ``full`` round of them (a client done early holds its model until the server takes it)."""
    done = np.floor(np.maximum(elapsed, 0.0) / step_seconds).astype(np.int64)
    return np.minimum(done, full)


ASYNC_RULES = Registry("asynchronous rule", {
    "fedbuff": (staleness_weight, "FedBuff (Nguyen et al. 2022): buffer_size staleness-scaled deltas a server "
                "step through the server pipeline (server.lr)"),
    "fedasync": (fedasync_mix, "FedAsync (Xie, Koyejo, Gupta 2019): every arrival mixed in, x <- (1 - a) x + a y, "
                 "a = alpha s(staleness)"),
    "fraboni": (fraboni_weights, "the general buffered rule (Fraboni et al. 2023): buffer_size deltas weighted "
                "w_i = p_i / f_i (client_weights = 'unbiased') or 1/K ('identical': FedBuff)"),
    "favano": (favano_average, "FAVANO (Leconte et al. 2023): clients train without pause; every period_s the "
               "server averages itself with clients_per_update current local models"),
})

__all__ = ["ASYNC_RULES", "completed_steps", "favano_average", "fedasync_mix", "fraboni_weights",
           "staleness_weight"]
