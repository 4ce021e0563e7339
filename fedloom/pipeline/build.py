"""The run's server pipeline, built from the config in this one place:

    [attack] -> validate -> [compress] -> [server.transforms...] -> aggregate -> server optimizer

With [privacy], DP-FedAvg's transforms take their places (``fedloom/privacy``): local,
each client clips and noises its row before compressing it; central, the server
clips the rows and its noisy fixed-denominator mean replaces ``aggregate``:

    local:   ... validate -> dp_clip -> dp_local_noise -> [compress] -> [server.transforms...] -> dp_mean -> ...
    central: ... validate -> [compress] -> [server.transforms...] -> dp_clip -> dp_mean (noise) -> ...
    adaptive (central): ... -> dp_adaptive_mean (clip, noise, the clip's quantile step) -> ...
    ftrl:    ... validate -> [compress] -> [server.transforms...] -> dp_clip -> dp_ftrl (the model; no optimizer)

With [secure_aggregation], ``aggregate:secagg`` (or ``secagg+``) replaces ``aggregate``: the
server sums masked, quantized rows (``fedloom/privacy/secagg*.py``); with privacy.mechanism =
"distributed", each client clips its row and adds its share of the central noise first:

    secagg:      ... validate -> aggregate:secagg -> ...
    distributed: ... validate -> dp_clip (client) -> dp_local_noise (client, z clip / sqrt(m))
                 -> aggregate:secagg -> ...

``server.transforms`` are extra transforms, by registry name or a user's
``package.module:factory`` import path, each with its ``options``; they run on
the decoded rows, before aggregation (where norm clipping and privacy noise go).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from torch import nn

from fedloom.aggregation.base import make_aggregator
from fedloom.attacks import Adversary

from fedloom.config import ExperimentConfig, Shapes
from fedloom.data import FederatedData
from fedloom.pipeline import transforms
from fedloom.pipeline.base import Pipeline, ServerData, Transform
from fedloom.pipeline.transforms import TRANSFORMS
from fedloom.privacy import transforms as dp
from fedloom.privacy.ftrl import ftrl


def build_pipeline(cfg: ExperimentConfig, adversary: Adversary | None, shapes: Shapes | None = None,
                   max_weight: float = 1.0, model: nn.Module | None = None,
                   data: FederatedData | None = None, server_data: ServerData | None = None) -> Pipeline:
    """``shapes``: the model's parameter shapes, for compressors that work layer by layer; ``max_weight``:
    the largest client's weight (examples), public, for secure aggregation's quantized weights; ``model``
    and ``data``: the run's, for the transforms that take them (matched averaging); ``server_data``: what
    the server holds, for transforms that learn on data (FedLAW)."""
    steps: list[Transform] = []
    if adversary is not None:
        steps.append(transforms.attack(adversary))
    steps.append(transforms.validate())
    if cfg.deploy.max_update_norm is not None:
        steps.append(transforms.reject_longer(cfg.deploy.max_update_norm))
    mechanism = cfg.privacy.mechanism
    if mechanism == "local":
        steps.extend(_local_privacy(cfg))
    compressor = cfg.compression.build(shapes)
    if compressor is not None:
        steps.append(transforms.compress(compressor, cfg.seed))
    steps.extend(_user_transform(t.name, t.options, model=model, data=data, server_data=server_data)
                 for t in cfg.server.transforms)
    if mechanism == "ftrl":  # its model is FTRL's, no server optimizer after it
        return Pipeline(tuple(steps + _ftrl(cfg)))
    if cfg.secure_aggregation.protocol != "none":
        steps.extend(_secure_aggregate(cfg, max_weight))
    elif mechanism == "none":
        aggregator = cfg.server.aggregator
        steps.append(transforms.aggregate(make_aggregator(aggregator.name, **aggregator.options)))
    else:
        steps.extend(_private_aggregate(cfg))
    name, factory = cfg.server_optimizer()
    steps.append(transforms.server_step(name, factory))
    return Pipeline(tuple(steps))


def _local_privacy(cfg: ExperimentConfig) -> list[Transform]:
    """Each client's own clip and noise, std noise_multiplier * clip (accounting.py says what it guarantees)."""
    p = cfg.privacy
    return [dp.dp_clip(p.clip, "client"), dp.local_noise(cfg.privacy_noise_multiplier() * p.clip)]


def _private_aggregate(cfg: ExperimentConfig) -> list[Transform]:
    """The fixed-denominator mean, with the server's clip and noise when central: noise std on the sum
    noise_multiplier * clip, so on the mean noise_multiplier * clip / clients_per_round."""
    p, denominator, epsilon_after = cfg.privacy, cfg.clients_per_round(), _epsilon_after(cfg)
    if p.mechanism == "local":
        return [dp.dp_mean(denominator, 0.0, epsilon_after)]
    if p.adaptive_clip:  # the clip lives in the transform's state
        return [dp.adaptive_dp_mean(denominator, p.clip, cfg.privacy_sum_noise_multiplier(), cfg.privacy_count_noise(),
                                    p.target_quantile, p.clip_lr, epsilon_after)]
    z = cfg.privacy_noise_multiplier()
    return [dp.dp_clip(p.clip, "server"), dp.dp_mean(denominator, z * p.clip / denominator, epsilon_after)]


def _ftrl(cfg: ExperimentConfig) -> list[Transform]:
    """DP-FTRL: the server clips, the tree noises the prefix sums (std noise_multiplier * clip on the sum per
    node), the model is FTRL's with server.lr and server.momentum."""
    p, denominator = cfg.privacy, cfg.clients_per_round()
    _, lr, momentum = cfg.server_choice()
    std = cfg.privacy_noise_multiplier() * p.clip / denominator
    return [dp.dp_clip(p.clip, "server"),
            ftrl(denominator, std, lr, momentum, cfg.privacy_accounting().tree_rounds, _epsilon_after(cfg))]


def _epsilon_after(cfg: ExperimentConfig) -> Callable[[int], float]:
    """Epsilon after a number of rounds, at the run's (calibrated) noise multiplier."""
    z, accounting = cfg.privacy_noise_multiplier(), cfg.privacy_accounting()
    return lambda rounds: accounting.epsilon(z, rounds)


def _secure_aggregate(cfg: ExperimentConfig, max_weight: float) -> list[Transform]:
    """Secure aggregation's mean; with distributed DP each client first clips and adds N(0, z^2 clip^2 / m),
    so the m rows' sum carries the central noise std z clip (dp_mean's, before its division by m)."""
    from fedloom.privacy import secagg_round  # needs the secagg extra (cryptography, pycryptodome)

    spec, extra_metrics = secure_mean_spec(cfg, max_weight)
    if cfg.privacy.mechanism != "distributed":
        return [secagg_round.secure_mean(spec)]
    p, m = cfg.privacy, cfg.clients_per_round()
    return [dp.dp_clip(p.clip, "client"), dp.local_noise(cfg.privacy_noise_multiplier() * p.clip / m ** 0.5),
            secagg_round.secure_mean(spec, extra_metrics)]


def secure_mean_spec(cfg: ExperimentConfig, max_weight: float):
    """The secure mean's settings (``secagg_round.SecureMean``) and its extra metrics (epsilon, with
    distributed DP): the simulation's transform, a deployed server's and its clients' encoding share them."""
    from fedloom.privacy import secagg_round

    s, p = cfg.secure_aggregation, cfg.privacy
    quantizer = secagg_round.Quantizer(s.bits, s.value_bits, s.clip, s.rounding == "stochastic")
    dropouts = {phase: getattr(s, f"dropout_{phase}") for phase in secagg_round.PHASES if phase != "consistency"}
    spec = secagg_round.SecureMean(s.threshold_for, s.neighbours_for, quantizer, dropouts, max_weight,
                                   name=s.protocol, consistency=s.consistency_check)
    if p.mechanism != "distributed":
        return spec, lambda r: {}
    z, accounting = cfg.privacy_noise_multiplier(), cfg.privacy_accounting()
    return replace(spec, denominator=cfg.clients_per_round()), lambda r: {"epsilon": accounting.epsilon(z, r)}


def _user_transform(name: str, options: dict, **supplied) -> Transform:
    transform = TRANSFORMS.build(name, options, **supplied)
    if not isinstance(transform, Transform):
        raise ValueError(f"transform {name!r} returned a {type(transform).__name__}, not a fedloom Transform")
    return transform
