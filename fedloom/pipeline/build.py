"""The run's server pipeline, built from the config in this one place:

    [attack] -> validate -> [compress] -> [server.transforms...] -> aggregate -> server optimizer

With [privacy], DP-FedAvg's transforms take their places (``fedloom/privacy``): local,
each client clips and noises its row before compressing it; central, the server
clips the rows and its noisy fixed-denominator mean replaces ``aggregate``:

    local:   ... validate -> dp_clip -> dp_local_noise -> [compress] -> [server.transforms...] -> dp_mean -> ...
    central: ... validate -> [compress] -> [server.transforms...] -> dp_clip -> dp_mean (noise) -> ...
    adaptive (central): ... -> dp_adaptive_mean (clip, noise, the clip's quantile step) -> ...
    ftrl:    ... validate -> [compress] -> [server.transforms...] -> dp_clip -> dp_ftrl (the model; no optimizer)

``server.transforms`` are extra transforms, by registry name or a user's
``package.module:factory`` import path, each with its ``options``; they run on
the decoded rows, before aggregation (where norm clipping and privacy noise go).
"""

from __future__ import annotations

from typing import Callable

from fedloom.aggregation.base import make_aggregator
from fedloom.attacks import Adversary
from fedloom.config import ExperimentConfig, Shapes
from fedloom.pipeline import transforms
from fedloom.pipeline.base import Pipeline, Transform
from fedloom.pipeline.transforms import TRANSFORMS
from fedloom.privacy import transforms as dp
from fedloom.privacy.ftrl import ftrl


def build_pipeline(cfg: ExperimentConfig, adversary: Adversary | None, shapes: Shapes | None = None) -> Pipeline:
    """``shapes``: the model's parameter shapes, for compressors that work layer by layer."""
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
    steps.extend(_user_transform(t.name, t.options) for t in cfg.server.transforms)
    if mechanism == "ftrl":  # its model is FTRL's, no server optimizer after it
        return Pipeline(tuple(steps + _ftrl(cfg)))
    if mechanism == "none":
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


def _user_transform(name: str, options: dict) -> Transform:
    transform = TRANSFORMS.build(name, options)
    if not isinstance(transform, Transform):
        raise ValueError(f"transform {name!r} returned a {type(transform).__name__}, not a fedloom Transform")
    return transform
