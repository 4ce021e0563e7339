"""From a validated config to the objects a run is made of: data, the Byzantine
clients, model, algorithm, local training and engine (the server pipeline is
built in ``fedloom.pipeline.build``). Shared by federated and decentralized
rounds and by the deployment server."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fedloom import participation
from fedloom.algorithms import ALGORITHMS, FedAvg
from fedloom.attacks import Adversary
from fedloom.config import ConfigError, ExperimentConfig, load_config
from fedloom.core.local_optim import LOCAL_OPTIMIZERS
from fedloom.core.rng import Stream, seed_for
from fedloom.data import DATASETS, Dataset, FederatedData, federate, load_dataset
from fedloom.engines.base import LocalTraining
from fedloom.engines.ray_engine import RayEngine
from fedloom.engines.serial import SerialEngine
from fedloom.engines.device import DeviceError, resolve_device
from fedloom.engines.memory import keep_freed_memory
from fedloom.engines.vectorized import UnsupportedModel, VectorizedEngine, why_not_vectorize
from fedloom.models import build_given_model, build_model
from fedloom.registry import OptionError, Registry
from fedloom.tasks import Task, build_task


@dataclass(frozen=True)
class GivenParts:
    """What ``fedloom.run(data=..., model=...)`` hands over from Python instead of naming it in the config."""

    datasets: tuple[Dataset, Dataset | None] | None = None
    model: Callable[..., nn.Module] | None = None


def build_data(cfg: ExperimentConfig, given: GivenParts = GivenParts()) -> FederatedData:
    """The federated data of the config: the dataset (or the user's ``given`` datasets) split among clients by
    the partition."""
    options = cfg.data.options
    if cfg.partition.name == "natural" and cfg.data.n_clients is not None and "n_clients" in inspect.signature(
            DATASETS.factory(cfg.data.dataset)).parameters:
        options = {"n_clients": cfg.data.n_clients, **options}  # a loader that makes its clients (synthetic)
    train, test = given.datasets or load_dataset(cfg.data.dataset, **options)
    return federate(train, test, cfg.partition.name, cfg.data.n_clients, cfg.seed,
                    test_fraction=cfg.data.test_fraction, client_test_fraction=cfg.data.client_test_fraction,
                    consume=not given.datasets, **cfg.partition.options)  # a user's own Dataset stays as it was


def sized_to(cfg: ExperimentConfig, data: FederatedData) -> ExperimentConfig:
    """``cfg`` with data.n_clients set to the number of clients ``data`` has where it was left out (a natural
    partition: the data's own clients), checked again with it; the run directory saves this one."""
    if cfg.data.n_clients is not None:
        return cfg
    return load_config(cfg, [f"data.n_clients={data.n_clients}"])


def build_adversary(cfg: ExperimentConfig, data: FederatedData) -> Adversary | None:
    """The run's Byzantine clients, or None; data attacks poison ``data`` here, before any
    engine copies it."""
    attack = cfg.attack
    if attack.name == "none":
        return None
    adversary = Adversary(attack.name, data.n_clients, attack.n_byzantine(data.n_clients), cfg.seed,
                          attack.redraw, attack.omniscient, attack.options)
    adversary.poison(data.y, data.train_idx, data.n_classes)
    return adversary


def build_participation(cfg: ExperimentConfig, data: FederatedData) -> np.ndarray | None:
    """Every client's participation probability (``participation.mode = "bernoulli"``), else None."""
    p = cfg.participation
    if p.mode != "bernoulli":
        return None
    if p.distribution == "classes" and data.task != "classification":
        raise ConfigError(f"participation.distribution = 'classes' sets each client's probability from its labels; "
                          f"dataset {cfg.data.dataset!r} is {data.task} data (use uniform, beta or given)")
    try:
        probabilities = participation.client_probabilities(p, data, cfg.seed)
    except ValueError as err:  # a file that was not checked at load (a natural partition's count comes later)
        raise ConfigError(str(err)) from None
    if len(probabilities) != data.n_clients:
        raise ConfigError(f"participation: {len(probabilities)} probabilities given for the data's "
                          f"{data.n_clients} clients (one per client)")
    return probabilities


def build_model_for(cfg: ExperimentConfig, data: FederatedData, given: GivenParts = GivenParts()) -> nn.Module:
    """The initial model for the data's input shape and classes (the user's ``given`` model when set), its
    weights drawn from the seeded ``INIT`` stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(cfg.seed, Stream.INIT))
        if given.model is not None:
            return build_given_model(given.model, data.input_shape, data.n_classes, cfg.model.options)
        return build_model(cfg.model.name, data.input_shape, data.n_classes, **cfg.model.options)


def check_model_runs(cfg: ExperimentConfig, model: nn.Module, data: FederatedData) -> None:
    """One forward pass on two training examples, so a model that does not fit the data fails before
    the run with one message naming both, not with a traceback in round 1."""
    try:
        with torch.no_grad():
            model(data.x[:2])
    except Exception as err:  # a user's model may fail in any way
        raise ConfigError(f"model {cfg.model.name!r} cannot run on dataset {cfg.data.dataset!r}, whose inputs are "
                          f"{data.x.dtype} of shape {list(data.input_shape)}: {type(err).__name__}: {err}") from None


def build_task_for(cfg: ExperimentConfig, data: FederatedData) -> Task:
    """The configured task (``[task]``; "auto": the dataset's own)."""
    try:
        return build_task(cfg.task.name, cfg.task.options, data.task, data.n_classes, cfg.data.dataset)
    except OptionError as err:
        raise ConfigError(f"task: {err}") from None


def device_for(cfg: ExperimentConfig) -> tuple[torch.device, str | None]:
    """``engine.device`` as a torch device, and a note when "auto" settled for the CPU."""
    try:
        return resolve_device(cfg.engine.device)
    except DeviceError as err:
        raise ConfigError(str(err)) from None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (an engine moves the model to its device)."""
    return next(model.parameters(), torch.zeros(0)).device


def engine_notes(cfg: ExperimentConfig, model: nn.Module, engine: Any) -> dict[str, Any]:
    """What the summary says about where the run trained: the device, why "auto" chose what it did,
    and where an engine that spreads over machines placed its workers (``engine.placement()``)."""
    device, note = device_for(cfg)
    notes = {"device": str(device)} | ({"device_note": note} if note else {})
    if cfg.engine.name == "auto" and engine.name == "serial":
        notes["engine_note"] = f"engine = auto runs serial: {why_not_vectorize(model, device)}"
    if hasattr(engine, "step_kind"):  # the vectorized engine's local step: fused or the general vmap one
        notes["local_step"] = engine.step_kind
    return notes | (engine.placement() if hasattr(engine, "placement") else {})


def build_algorithm(cfg: ExperimentConfig) -> FedAvg:
    """The federated algorithm's client and server rules (its hyperparameters only; no state)."""
    return ALGORITHMS.build(cfg.algorithm.name, cfg.algorithm.options)


def local_training(cfg: ExperimentConfig) -> LocalTraining:
    """The clients' local training of the config: optimizer, epochs or steps, batch size and seed."""
    c = cfg.client
    opt_options = {"lr": c.lr, "weight_decay": c.weight_decay}
    if c.optimizer == "sgd":
        opt_options["momentum"] = c.momentum
    return LocalTraining(LOCAL_OPTIMIZERS[c.optimizer](**opt_options), c.epochs, c.batch_size, cfg.seed, c.steps)


def build_engine(cfg: ExperimentConfig, model: nn.Module, data: FederatedData):
    """The configured engine (``ENGINES``)."""
    return ENGINES.factory(cfg.engine.name)(cfg, model, data)


def _auto(cfg: ExperimentConfig, model: nn.Module, data: FederatedData):
    """The vectorized engine when the model allows it and it is faster (not convolutions on CPU), else serial."""
    return (_serial if why_not_vectorize(model, device_for(cfg)[0]) else _vectorized)(cfg, model, data)


def _serial(cfg: ExperimentConfig, model: nn.Module, data: FederatedData):
    return SerialEngine(model, data, local_training(cfg), build_task_for(cfg, data), device_for(cfg)[0],
                        _gb(cfg.engine.data_on_device_gb))


def _vectorized(cfg: ExperimentConfig, model: nn.Module, data: FederatedData):
    # glibc keeps freed memory for the rounds' fresh stacked tensors (engines/memory.py); not for the serial
    # engine, whose convolutions it slowed (W3: 0.58-0.60 s a round against 0.68-0.77)
    if cfg.engine.keep_freed_memory:
        keep_freed_memory()
    try:
        return VectorizedEngine(model, data, local_training(cfg), build_task_for(cfg, data),
                                _gb(cfg.engine.memory_budget_gb), device_for(cfg)[0],
                                _gb(cfg.engine.data_on_device_gb), cfg.engine.fused)
    except UnsupportedModel as err:
        raise ConfigError(f"engine.name: {err}") from None


def _ray(cfg: ExperimentConfig, model: nn.Module, data: FederatedData):
    try:
        return RayEngine(model, data, local_training(cfg), build_task_for(cfg, data), address=cfg.engine.ray_address,
                         workers=cfg.engine.ray_workers, memory_budget=_gb(cfg.engine.memory_budget_gb),
                         gpus_per_worker=cfg.engine.ray_gpus_per_worker, keep_memory=cfg.engine.keep_freed_memory)
    except ImportError as err:
        raise ConfigError(f'engine.name = "ray": {err}') from None
    except ConnectionError as err:
        raise ConfigError(f"engine.ray_address: {err}") from None


def _gb(gigabytes: float) -> int:
    return int(gigabytes * 2**30)


# factories (cfg, model, data) -> engine; engine.name names one
ENGINES = Registry("engine", {
    "auto": (_auto, "vectorized when the model allows it (not conv nets), else serial (the default)"),
    "vectorized": (_vectorized, "all sampled clients in one batched torch.func call"),
    "serial": (_serial, "one client after another, any nn.Module (the reference)"),
    "ray": (_ray, "clients on Ray actors (engine.ray_address, engine.ray_workers); pip install fedloom[ray]"),
})