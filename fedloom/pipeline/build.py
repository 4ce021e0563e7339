"""The run's server pipeline, built from the config in this one place:

    [attack] -> validate -> [compress] -> [server.transforms...] -> aggregate -> server optimizer

``server.transforms`` are extra transforms, by registry name or a user's
``package.module:factory`` import path, each with its ``options``; they run on
the decoded rows, before aggregation (where norm clipping and privacy noise go).
"""

from __future__ import annotations

from fedloom.aggregation.base import make_aggregator
from fedloom.attacks import Adversary
from fedloom.config import ExperimentConfig, Shapes
from fedloom.pipeline import transforms
from fedloom.pipeline.base import Pipeline, Transform
from fedloom.pipeline.transforms import TRANSFORMS


def build_pipeline(cfg: ExperimentConfig, adversary: Adversary | None, shapes: Shapes | None = None) -> Pipeline:
    """``shapes``: the model's parameter shapes, for compressors that work layer by layer."""
    steps: list[Transform] = []
    if adversary is not None:
        steps.append(transforms.attack(adversary))
    steps.append(transforms.validate())
    if cfg.deploy.max_update_norm is not None:
        steps.append(transforms.reject_longer(cfg.deploy.max_update_norm))
    compressor = cfg.compression.build(shapes)
    if compressor is not None:
        steps.append(transforms.compress(compressor, cfg.seed))
    steps.extend(_user_transform(t.name, t.options) for t in cfg.server.transforms)
    aggregator = cfg.server.aggregator
    steps.append(transforms.aggregate(make_aggregator(aggregator.name, **aggregator.options)))
    name, factory = cfg.server_optimizer()
    steps.append(transforms.server_step(name, factory))
    return Pipeline(tuple(steps))


def _user_transform(name: str, options: dict) -> Transform:
    transform = TRANSFORMS.build(name, options)
    if not isinstance(transform, Transform):
        raise ValueError(f"transform {name!r} returned a {type(transform).__name__}, not a fedloom Transform")
    return transform
