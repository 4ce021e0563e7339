"""Experiment config: TOML or YAML into validated pydantic models.

Every error names the key the user wrote and what is accepted instead.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedloom import participation
from fedloom.aggregation import AGGREGATORS
from fedloom.algorithms import ALGORITHMS, SERVER_PRESETS, ServerPreset, server_optimizer
from fedloom.algorithms.base import NoServerState, PlainClient
from fedloom.algorithms.asynchronous import ASYNC_RULES
from fedloom.algorithms.gossip import DECENTRALIZED, GOSSIP_RULES
from fedloom.algorithms.server_opt import OptimizerFactory
from fedloom.attacks import ATTACK_NAMES, attack_registry
from fedloom.compression import Compressor, make_compressor
from fedloom.data import DATASETS, PARTITIONERS
from fedloom.compression.base import Shapes
from fedloom.models import MODELS
from fedloom.personalization import METHODS as PERSONALIZATION_METHODS
from fedloom.pipeline.transforms import TRANSFORMS
from fedloom.registry import Registry
from fedloom.tasks import TASKS

if TYPE_CHECKING:
    from fedloom.privacy.accounting import Accounting


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


class Section(BaseModel):
    """A config section: unknown keys are refused and defaults validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataConfig(Section):
    """``[data]``: the dataset, the number of clients, the test splits and the loader's options."""

    dataset: str = "digits"
    n_clients: int | None = Field(None, ge=1, description="default 100; partition natural: the data's own clients")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held out as the global test set")
    client_test_fraction: float = Field(0.2, ge=0, lt=1, description="of each client's data, for local tests "
                                        "(natural clients that a test split names: their own test examples)")
    options: dict[str, Any] = Field(default_factory=dict, description="passed to the loader (path, alpha, ...)")

    @model_validator(mode="after")
    def _known_dataset_and_options(self) -> "DataConfig":
        DATASETS.check(self.dataset, self.options)
        return self


class Component(Section):
    """A named part and its own options, checked against its factory's signature when the
    config loads (``fedloom.registry``). Subclasses say which registry and the default name."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict, description="the part's own keyword options")

    registry: ClassVar[Registry]

    @model_validator(mode="after")
    def _known_name_and_options(self) -> "Component":
        self.registry.check(self.name, self.options)
        return self


class PartitionConfig(Component):
    """How the data is dealt to clients: iid | dirichlet (alpha) | shards (classes_per_client) | quantity
    (power, min_size) | natural."""

    name: str = "dirichlet"

    registry: ClassVar[Registry] = PARTITIONERS


class ModelConfig(Component):
    """A registered model or a user's 'package.module:ClassName', with its options (e.g. hidden for the MLP)."""

    name: str = "mlp"

    registry: ClassVar[Registry] = MODELS


class TaskConfig(Component):
    """How a batch becomes a loss and what evaluation reports: auto (the dataset's own task) | classification |
    language_model | regression | a user's 'package.module:Name'. ``task = "regression"`` is short for
    ``[task] name = "regression"``."""

    name: str = "auto"

    registry: ClassVar[Registry] = TASKS

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class AlgorithmConfig(Component):
    """``[algorithm]``: the federated algorithm (client and server rule) and its options."""

    name: Literal[tuple(ALGORITHMS)] = "fedavg"  # type: ignore[valid-type]

    registry: ClassVar[Registry] = ALGORITHMS


class ClientConfig(Section):
    """``[client]``: local training, the optimizer, its learning rate, momentum and weight decay, epochs or steps,
    the batch size."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.2, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(5, ge=1)
    steps: int | None = Field(None, ge=1, description="a fixed number of local steps (batches) instead of epochs")
    batch_size: int = Field(8, ge=1)


class AggregatorConfig(Component):
    """The robust (or plain) aggregator and its options, e.g. f for Krum."""

    name: str = "mean"

    registry: ClassVar[Registry] = AGGREGATORS


class TransformConfig(Component):
    """An extra server transform: a registry name or a user's 'package.module:factory', and its options."""

    registry: ClassVar[Registry] = TRANSFORMS


class ServerConfig(Section):
    """``[server]``: the server optimizer and its hyperparameters (default: the algorithm's), the aggregator and
    the server transforms."""

    optimizer: Literal["sgd", "adam", "torch_adam", "yogi", "adagrad"] | None = Field(
        None, description="default: the algorithm's; adam is Reddi et al.'s (no bias correction), torch_adam torch's")
    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, description="adaptivity of Adam/Yogi/Adagrad")
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)
    transforms: list[TransformConfig] = Field(default_factory=list, description="extra transforms on the rows, "
                                              "before aggregation: [{name = 'clip', options = {max_norm = 1.0}}]")


class CompressionConfig(Section):
    """Uplink compression of every client's row and, optionally, downlink compression
    of the global model (``fedloom list`` names the compressors)."""

    name: str = "none"
    options: dict[str, Any] = Field(default_factory=dict, description="e.g. k = 0.01 for topk")
    feedback: str | None = Field(None, description="error feedback: ef | ef21 | econtrol")
    feedback_options: dict[str, Any] = Field(default_factory=dict)
    downlink: str = Field("none", description="compressor of the model sent to clients (EF21-P rule)")
    downlink_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> "CompressionConfig":
        self.build()
        self.build_downlink()
        return self

    def build(self, shapes: Shapes | None = None) -> Compressor | None:
        """The compressor, or None when rows go uncompressed (fp32). ``shapes``: the model's
        parameter shapes, for the compressors that work layer by layer (PowerSGD, TernGrad)."""
        if self.name == "none" and self.feedback is None:
            return None
        taken = sorted(set(self.options) & {"feedback", "feedback_options", "shapes"})  # make_compressor's own
        if taken:
            raise ValueError(f"compressor {self.name!r} has no option {taken[0]!r} (compression.options)")
        return make_compressor(self.name, feedback=self.feedback, feedback_options=self.feedback_options,
                               shapes=shapes, **self.options)

    def build_downlink(self, shapes: Shapes | None = None) -> Compressor | None:
        """The downlink compressor, or None when the model goes out in fp32."""
        if self.downlink == "none":
            if self.downlink_options:
                raise ValueError("downlink_options needs a downlink compressor, e.g. downlink = 'topk'")
            return None
        try:
            return make_compressor(self.downlink, shapes=shapes, **self.downlink_options)
        except ValueError as err:
            raise ValueError(f"downlink: {err}") from None


class TopologyConfig(Section):
    """The graph of a decentralized run (``fedloom list`` names them)."""

    name: str = "ring"
    options: dict[str, Any] = Field(default_factory=dict, description="e.g. k, p, seed")
    weights: Literal["metropolis_hastings", "max_degree"] = "metropolis_hastings"
    matrix: list[list[float]] | None = Field(None, description="a user's own doubly stochastic mixing matrix")

    @model_validator(mode="after")
    def _known_topology(self) -> "TopologyConfig":
        # the default ring needs no check: federated runs then never load networkx and scipy
        if self.matrix is None and (self.name, self.options) != ("ring", {}):
            from fedloom.topology import TOPOLOGIES

            TOPOLOGIES.check(self.name, self.options)
        return self


class DecentralizedConfig(Section):
    """``[decentralized]``: the gossip algorithm, the order of local steps and gossip, participation, churn,
    the gossip rule and the final merge."""

    algorithm: Literal[tuple(DECENTRALIZED)] = "dsgd"  # type: ignore[valid-type]
    order: Literal["local_then_gossip", "gossip_then_local"] = "local_then_gossip"
    participation: float = Field(1.0, gt=0, le=1, description="fraction of nodes active each round (MoDeST-style)")
    churn: float = Field(0.0, ge=0, lt=1, description="probability a node is offline in a round")
    choco_gamma: float = Field(0.5, gt=0, le=1, description="CHOCO-SGD consensus step size")
    final_merge: Literal["none", "weight", "activation", "ot"] = Field(
        "none", description="at the end, also merge the node models after aligning them (fedloom.merging)")
    dimat_period: int = Field(1, ge=1, description="dimat: rounds between merges (local training only in between)")
    dimat_method: Literal["weight", "activation"] = Field(
        "weight", description="dimat: how a node aligns its neighbours' models to its own")
    own_init: bool = Field(False, description="each node starts from its own random model (else all from one)")
    gossip: Literal[tuple(GOSSIP_RULES)] = Field(  # type: ignore[valid-type]
        "mean", description="clipped: ClippedGossip (He et al. 2023)")
    clip_tau: float | None = Field(None, gt=0, description="clipped: fixed clipping radius; unset: adaptive")
    clip_delta: float = Field(0.2, gt=0, lt=1, description="clipped, adaptive radius: share of each node's "
                              "gossip weight, farthest neighbours first, that is clipped")

    @model_validator(mode="after")
    def _clipping_options_need_clipped_gossip(self) -> "DecentralizedConfig":
        # compare with the defaults, not the keys given: a saved (resolved) config writes every key
        changed = [k for k in ("clip_tau", "clip_delta") if getattr(self, k) != type(self).model_fields[k].default]
        if self.gossip == "mean" and changed:
            raise ValueError(f"{', '.join(changed)} applies to gossip = 'clipped' (gossip is 'mean')")
        if self.gossip == "clipped" and self.algorithm != "dsgd":
            raise ValueError(f"gossip = 'clipped' runs with algorithm = 'dsgd' (got {self.algorithm!r})")
        if self.clip_tau is not None and "clip_delta" in changed:
            raise ValueError("clip_delta sets the adaptive radius; with a fixed clip_tau it has no effect")
        if self.final_merge == "ot" and importlib.util.find_spec("ot") is None:
            raise ValueError("final_merge = 'ot' needs POT (optimal transport): pip install fedloom[merging]")
        dimat = [k for k in ("dimat_period", "dimat_method") if getattr(self, k) != type(self).model_fields[k].default]
        if dimat and self.algorithm != "dimat":
            raise ValueError(f"{', '.join(dimat)} applies to algorithm = 'dimat' (algorithm is {self.algorithm!r})")
        return self


class FedMAConfig(Section):
    """FedMA (``fedloom.merging.fedma``): PFNM's Beta-Bernoulli process prior, its matching passes, growth."""

    sigma: float = Field(1.0, gt=0, description="a client's neuron around its global neuron (std)")
    sigma0: float = Field(1.0, gt=0, description="the global neurons around mu0 (std)")
    gamma0: float = Field(1.0, gt=0, description="the Indian buffet process' mass: how readily a layer grows")
    mu0: float = 0.0
    iterations: int = Field(5, ge=0, description="passes re-matching each client given the others")
    max_growth: float = Field(0.5, ge=0, description="a layer grows to at most (1 + max_growth) x its width")
    rounds: int = Field(1, ge=1, description="layer-wise passes; > 1: FedMA with communication")
    same_init: bool = Field(False, description="clients start from the config's one model (else their own)")


class AttackConfig(Section):
    """Byzantine clients (or nodes): which, how many, and what they send."""

    name: Literal[tuple(["none", *ATTACK_NAMES])] = "none"  # type: ignore[valid-type]
    fraction: float | None = Field(None, gt=0, lt=1, description="of all clients; or give f")
    f: int | None = Field(None, ge=1, description="number of Byzantine clients")
    redraw: bool = Field(False, description="draw new Byzantine clients every round instead of once")
    omniscient: bool = Field(False, description="attackers see the honest updates of the round")
    options: dict[str, Any] = Field(default_factory=dict, description="e.g. scale, std, factor, z, epsilon")

    @model_validator(mode="after")
    def _complete(self) -> "AttackConfig":
        if self.name == "none":
            if self.fraction is not None or self.f is not None:
                raise ValueError("Byzantine clients are set but attack.name is 'none'")
            return self
        if (self.fraction is None) == (self.f is None):
            raise ValueError(f"attack {self.name!r}: give the number of Byzantine clients as f or fraction "
                             "(one of them)")
        if self.name == "label_flip" and self.redraw:
            raise ValueError("attack 'label_flip' poisons the Byzantine clients' data once; it cannot be redrawn")
        attack_registry(self.name).check(self.name, self.options)
        return self

    def n_byzantine(self, n_clients: int) -> int:
        """How many of ``n_clients`` are Byzantine: ``f``, or ``fraction`` of them rounded."""
        return self.f if self.f is not None else round((self.fraction or 0.0) * n_clients)


class SamplingConfig(Section):
    """``[sampling]``: how many clients take part in each round (a count or a fraction)."""

    clients_per_round: int | None = Field(None, ge=1, description="default: 10, or every client if fewer")
    fraction: float | None = Field(None, gt=0, le=1, description="instead of clients_per_round")


class ParticipationConfig(Section):
    """Who takes part in a round. uniform: sampling.clients_per_round clients drawn without replacement;
    bernoulli: each client on its own probability p_i, unknown to the server (Wang and Ji 2024), drawn once
    from ``distribution``: classes (p_i from the client's classes: mean * n_classes * <its label shares, v>,
    v ~ Dirichlet(alpha), at least p_min) | uniform (in [p_min, p_max]) | beta (mean, concentration alpha, at
    least p_min) | given (``probabilities`` or a file ``path``, one a line)."""

    mode: Literal["uniform", "bernoulli"] = "uniform"
    distribution: Literal[participation.DISTRIBUTIONS] = "classes"  # type: ignore[valid-type]
    mean: float = Field(0.1, gt=0, lt=1, description="classes, beta: the mean probability")
    p_min: float = Field(0.02, ge=0, le=1, description="the least probability (uniform: the interval's start)")
    p_max: float = Field(1.0, gt=0, le=1, description="uniform: the interval's end")
    alpha: float = Field(0.1, gt=0, description="classes: the class weights' Dirichlet concentration; beta: a + b")
    probabilities: list[float] = Field(default_factory=list, description="given: one per client")
    path: str | None = Field(None, description="given: a file of probabilities, one a line (relative to the "
                             "config file)")

    @model_validator(mode="after")
    def _consistent(self) -> "ParticipationConfig":
        # compare with the defaults, not the keys given: a saved (resolved) config writes every key
        changed = [k for k in type(self).model_fields if k != "mode" and getattr(self, k) != _default(self, k)]
        if self.mode == "uniform" and changed:
            raise ValueError(f"{', '.join(changed)} applies with participation.mode = 'bernoulli' (mode is "
                             "'uniform': sampling.clients_per_round clients a round)")
        given = self.distribution == "given"
        if given and (not self.probabilities) == (self.path is None):
            raise ValueError("distribution = 'given': give probabilities = [...] or path (one of them)")
        if not given and (self.probabilities or self.path is not None):
            raise ValueError(f"probabilities and path apply with distribution = 'given' (got {self.distribution!r})")
        if any(not 0 < q <= 1 for q in self.probabilities):
            raise ValueError(f"probabilities must lie in (0, 1]; got {self.probabilities}")
        if self.distribution == "uniform" and self.p_min >= self.p_max:
            raise ValueError(f"distribution = 'uniform' draws from [p_min, p_max]: p_min = {self.p_min:g} must be "
                             f"less than p_max = {self.p_max:g}")
        return self


def _accounting() -> Any:
    """fedloom.privacy.accounting, imported only by private runs: dp-accounting is the privacy extra."""
    try:
        from fedloom.privacy import accounting
    except ImportError:
        raise ValueError("privacy.mechanism needs the dp-accounting package for its accountant: "
                         "pip install 'fedloom[privacy]'") from None
    return accounting


def _default(section: BaseModel, key: str) -> Any:
    return type(section).model_fields[key].get_default(call_default_factory=True)


class EvaluationConfig(Section):
    """``[evaluation]``: how often to evaluate, on the clients' own test splits too, the target for time_to_target."""

    every: int = Field(1, ge=1, description="evaluate every k rounds (and always after the last)")
    federated: bool = True
    target_accuracy: float | None = Field(None, gt=0, le=1, description="the summary's time_to_target: the "
                                          "round, wall and virtual seconds central_accuracy first reached it")


class EngineConfig(Section):
    """``[engine]``: where clients train (vectorized, serial, ray), the device and memory budgets."""

    name: Literal["auto", "vectorized", "serial", "ray"] = Field(
        "auto", description="auto: vectorized when the model allows it (not conv nets: slower on CPU), else serial; "
        "ray: clients on Ray actors")
    device: str = Field("auto", description="cpu | cuda | cuda:N | mps | auto (CUDA when available, else CPU): "
                        "where clients train and models are evaluated")
    data_on_device_gb: float = Field(1.0, ge=0, description="the data set is copied to the device once when it "
                                     "fits this; else each batch is copied as it is gathered")
    memory_budget_gb: float = Field(2.0, gt=0, description="vectorized and each ray worker: peak memory (on CUDA "
                                    "also at most 90% of the device's free memory)")
    fused: Literal["auto", "off"] = Field("auto", description="vectorized: auto trains Linear/ReLU classifiers "
                                          "(logistic, MLP) with a hand-written batched step, the same numbers at a "
                                          "fraction of the per-step overhead; off: always torch.func's vmap")
    keep_freed_memory: bool = Field(True, description="vectorized on Linux (glibc): allocations under 64 MB come "
                                    "from malloc's heap and up to 256 MB freed is kept, so a round's fresh tensors do "
                                    "not page-fault again (W1's round 2x faster); false: the C library's own settings")
    ray_address: str | None = Field(None, description='ray: "auto" joins a running cluster, "host:port" a remote '
                                    "one; unset starts a local Ray")
    ray_workers: int = Field(2, ge=1, description="ray: actors (one CPU each); clients split evenly over them")
    ray_gpus_per_worker: float = Field(0.0, ge=0, description="ray: the GPU share of each actor; above 0 the "
                                       "actors train on CUDA")


class DeployConfig(Section):
    """When a `fedloom server` round closes; its --min-clients and --round-timeout flags override these."""

    min_clients: int = Field(1, ge=1, description="updates a round needs before its deadline may close it")
    round_timeout_s: float = Field(300.0, gt=0, description="round deadline: who has not submitted by then "
                                   "is left out")
    weighting: Literal["examples", "uniform"] = Field("examples", description="how the server weighs updates: "
                                                      "by the example counts clients report (capped), or equally")
    max_examples_per_client: int | None = Field(None, ge=1, description="cap on a reported example count; unset: "
                                                "the largest client of the configured federation")
    max_update_norm: float | None = Field(None, gt=0, description="updates with a larger L2 norm are rejected "
                                          "(set it when clients are untrusted)")


class CheckpointConfig(Section):
    """``[checkpoint]``: how often the run's state tree is saved."""

    every: int | None = Field(None, ge=1, description="checkpoint every N rounds; unset: after every round that "
                              "took more than a second, and always at the end and on Ctrl-C")


class PrivacyConfig(Section):
    """User-level differential privacy, DP-FedAvg (McMahan et al. 2018): rows clipped to ``clip``, averaged
    over the clients sampled per round with uniform weights, Gaussian noise of std noise_multiplier * clip
    on the sum (central: the server adds it; local: each client adds it to its own row; ftrl: DP-FTRL's tree
    of noise on the prefix sums, Kairouz et al. 2021). ``adaptive_clip``: the clip follows a quantile of the
    update norms (Andrew et al. 2021), starting at ``clip``."""

    mechanism: Literal["none", "central", "local", "ftrl", "distributed"] = Field(
        "none", description="distributed: each client adds its share of the central noise under secure aggregation")
    clip: float = Field(1.0, gt=0, description="L2 norm every client's row is clipped to (adaptive: the first)")
    adaptive_clip: bool = Field(False, description="the clip follows target_quantile of the update norms (central)")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive: the fraction of rows the clip should keep "
                                   "unclipped")
    clip_lr: float = Field(0.2, gt=0, description="adaptive: the clip's geometric step size")
    count_noise: float | None = Field(None, gt=0, description="adaptive: std of the noise on the count of unclipped "
                                      "rows (default clients_per_round / 20)")
    noise_multiplier: float | None = Field(None, gt=0, description="noise std over clip; or give target_epsilon")
    target_epsilon: float | None = Field(None, gt=0, description="calibrate noise_multiplier to reach this "
                                         "epsilon after all rounds")
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp_accounting's; pld only without sampling")

    @model_validator(mode="after")
    def _noise_given_once(self) -> "PrivacyConfig":
        if self.mechanism == "none":
            # compare with the defaults, not the keys given: a saved (resolved) config writes every key
            changed = [k for k in type(self).model_fields if getattr(self, k) != type(self).model_fields[k].default]
            if changed:
                raise ValueError(f"{', '.join(changed)} applies with privacy.mechanism = 'central', 'local', 'ftrl' "
                                 "or 'distributed' "
                                 "(mechanism is 'none')")
        elif (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(f"privacy.mechanism = {self.mechanism!r}: give noise_multiplier or target_epsilon "
                             "(one of them)")
        return self


class SecureAggregationConfig(Section):
    """Secure aggregation (``fedloom/privacy/secagg*.py``): the server gets masked, quantized rows only and
    sums them; secagg (Bonawitz et al. 2017) or secagg+ (Bell et al. 2020, O(log n) neighbours)."""

    protocol: Literal["none", "secagg", "secagg+"] = "none"
    threshold: int | float = Field(0.6, gt=0, description="Shamir threshold: an integer count, or a fraction "
                                   "(0 < t <= 1.0) of a client's sharing group (all the round's clients; secagg+: "
                                   "its neighbours and itself)")
    bits: int = Field(32, ge=8, le=62, description="the ring Z_{2^bits} the masked rows live in")
    value_bits: int = Field(16, ge=2, le=60, description="a client's coordinate is an integer of this many bits")
    clip: float = Field(1.0, gt=0, description="each weighted coordinate is clamped to [-clip, clip] before "
                        "quantization")
    rounding: Literal["stochastic", "deterministic"] = Field("stochastic", description="quantization rounding")
    neighbours: int | None = Field(None, ge=2, description="secagg+: neighbours per client (even); default "
                                   "2 * ceil(log2 clients_per_round)")
    dropout_advertise: float = Field(0.0, ge=0, lt=1, description="simulated: fraction of the round's clients "
                                     "silent from the advertise-keys phase on")
    dropout_share_keys: float = Field(0.0, ge=0, lt=1, description="... from the share-keys phase on")
    dropout_masked_input: float = Field(0.0, ge=0, lt=1, description="... from the masked-input phase on")
    dropout_unmask: float = Field(0.0, ge=0, lt=1, description="... at the unmask phase (after sending y_u)")
    consistency_check: bool = Field(False, description="Bonawitz et al.'s check against a malicious server: "
                                    "survivors sign the survivor list and abort unless every signature agrees")

    @model_validator(mode="after")
    def _shape(self) -> "SecureAggregationConfig":
        if isinstance(self.threshold, float) and self.threshold > 1:
            raise ValueError(f"secure_aggregation.threshold = {self.threshold}: a fraction is at most 1.0 "
                             "(a count is an integer)")
        if self.neighbours is not None and (self.protocol != "secagg+" or self.neighbours % 2):
            raise ValueError(f"secure_aggregation.neighbours = {self.neighbours}: an even number, with "
                             "protocol = 'secagg+'")
        if self.value_bits >= self.bits:
            raise ValueError(f"secure_aggregation.value_bits = {self.value_bits} must be below bits = {self.bits}")
        return self

    def group_size(self, clients: int) -> int:
        """The clients that hold shares of one client's secrets, itself included."""
        k = self.neighbours_for(clients)
        return clients if k is None else k + 1

    def neighbours_for(self, clients: int) -> int | None:
        """secagg+'s neighbours in a round of ``clients``; None: everyone (secagg, or secagg+ that covers all)."""
        if self.protocol != "secagg+":
            return None
        k = self.neighbours if self.neighbours is not None else 2 * math.ceil(math.log2(max(clients, 2)))
        return None if k >= clients - 1 else k

    def threshold_for(self, clients: int) -> int:
        """The shares needed to reconstruct a secret in a round of ``clients``: an int threshold capped at the group,
        or a fraction of the group rounded up (at least 1)."""
        group = self.group_size(clients)
        if isinstance(self.threshold, int):
            return min(self.threshold, group)  # a round with fewer clients than sampled shares among fewer
        return max(1, math.ceil(self.threshold * group))


class BandwidthClass(Section):
    """One class of client links in ``[system]``: uplink and downlink in Mbit/s and its share of the clients."""

    up_mbps: float = Field(gt=0)
    down_mbps: float = Field(gt=0)
    share: float = Field(1.0, gt=0, description="relative share of the clients in this class")


class SystemConfig(Section):
    """The system model (``fedloom.systems``): client speeds, bandwidths and availability, drawn
    (profile = 'sampled') or read from a CSV trace (profile = 'trace'); and the synchronous round's
    straggler rules. With a system model every record carries virtual_seconds."""

    profile: Literal["none", "sampled", "trace"] = "none"
    trace: str | None = Field(None, description="profile = 'trace': CSV client,speed,up_mbps,down_mbps,available")
    trace_format: Literal["csv", "fedscale"] = Field("csv", description="profile = 'trace': fedloom's CSV "
                                                     "(system.trace) or FedScale's pickles (system.device_file, "
                                                     "system.behavior_file)")
    device_file: str | None = Field(None, description="trace_format = 'fedscale': {id: {'computation': ms per "
                                    "example, 'communication': kbps}}")
    behavior_file: str | None = Field(None, description="trace_format = 'fedscale': {id: {'active': [s], "
                                      "'inactive': [s], 'finish_time': s, ...}}; unset: always online")
    seconds_per_example: float = Field(0.001, gt=0, description="compute time of one example on a speed-1 client")
    device_flops: float | None = Field(None, gt=0, description="FLOP/s of a speed-1 client; set, an example costs "
                                       "the model's measured training FLOPs (3x forward) over it instead")
    speed_spread: float = Field(1.0, ge=1, description="log-normal speeds, median 1: 95th over 5th percentile")
    bandwidth_classes: list[BandwidthClass] = Field(
        default_factory=lambda: [BandwidthClass(up_mbps=10.0, down_mbps=50.0)],
        description="each client draws a class by share: [{up_mbps = 2, down_mbps = 10, share = 0.5}, ...]")
    availability: Literal["always", "markov", "diurnal"] = "always"
    mean_online_s: float = Field(3600.0, gt=0, description="markov: mean online duration")
    mean_offline_s: float = Field(3600.0, gt=0, description="markov: mean offline duration")
    day_s: float = Field(86400.0, gt=0, description="diurnal: the period")
    online_fraction: float = Field(0.5, gt=0, le=1, description="diurnal: share of each day a client is online")
    deadline_s: float | None = Field(None, gt=0, description="synchronous rounds: updates finishing later are late")
    late: Literal["drop", "stale"] = Field("drop", description="late updates: dropped, or applied next round")
    over_selection: float = Field(0.0, ge=0, description="sample this fraction more clients, keep the first "
                                  "clients_per_round to finish")

    @model_validator(mode="after")
    def _profile_complete(self) -> "SystemConfig":
        self._trace_files_given()
        changed = [k for k in ("deadline_s", "over_selection", "speed_spread", "availability")
                   if getattr(self, k) != type(self).model_fields[k].default]
        if self.profile == "none" and changed:
            raise ValueError(f"system.{changed[0]} needs a system model: system.profile = 'sampled' or 'trace'")
        if self.profile == "trace" and [k for k in changed if k in ("speed_spread", "availability")]:
            raise ValueError("system.speed_spread and system.availability are drawn for profile = 'sampled'; "
                             "a trace gives its own speeds and availability")
        if self.late == "stale" and self.deadline_s is None:
            raise ValueError("system.late = 'stale' keeps updates that miss system.deadline_s: set a deadline")
        return self

    def _trace_files_given(self) -> None:
        """system.trace with the CSV format, system.device_file (and optionally behavior_file) with FedScale's."""
        fedscale = self.profile == "trace" and self.trace_format == "fedscale"
        if self.trace_format == "fedscale" and self.profile != "trace":
            raise ValueError("system.trace_format = 'fedscale' reads trace files: set system.profile = 'trace'")
        if (self.profile == "trace" and not fedscale) != (self.trace is not None):
            raise ValueError("give system.trace (a CSV file) exactly when system.profile = 'trace' "
                             "(trace_format = 'csv'); FedScale's pickles go in system.device_file")
        if fedscale != (self.device_file is not None) or (self.behavior_file is not None and not fedscale):
            raise ValueError("give system.device_file (and optionally system.behavior_file) exactly when "
                             "system.trace_format = 'fedscale'")


class AsynchronousConfig(Section):
    """mode = 'asynchronous': event-driven on the virtual clock; one round is one server model update."""

    algorithm: Literal[tuple(ASYNC_RULES)] = Field(  # type: ignore[valid-type]
        "fedbuff", description="fedbuff | fedasync | fraboni | favano (fedloom list asynchronous)")
    concurrency: int = Field(10, ge=1, description="clients training at once")
    buffer_size: int = Field(10, ge=1, description="fedbuff: updates per server step (K)")
    alpha: float = Field(0.6, gt=0, le=1, description="fedasync: the mixing weight")
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        "polynomial", description="s(tau): 1 | (1 + tau)^-a | 1 up to b, then 1 / (a (tau - b) + 1)")
    staleness_a: float = Field(0.5, ge=0, description="polynomial (0.5: FedBuff's 1/sqrt(1 + tau)), hinge")
    staleness_b: float = Field(4.0, ge=0, description="hinge: staleness without discount")
    client_weights: Literal["unbiased", "identical"] = Field(
        "unbiased", description="fraboni: p_i / f_i (f_i: share of server steps taking client i) | 1/K (FedBuff)")
    period_s: float = Field(0.05, gt=0, description="favano: virtual seconds between server wakes (their mean)")
    wake: Literal["fixed", "poisson"] = Field("fixed", description="favano: every period_s, or exponential gaps")
    clients_per_update: int = Field(10, ge=1, description="favano: clients whose current models a wake averages")

    @model_validator(mode="after")
    def _rule_keys(self) -> "AsynchronousConfig":
        own = {"client_weights": "fraboni", "period_s": "favano", "wake": "favano", "clients_per_update": "favano"}
        stray = [k for k, rule in own.items()
                 if rule != self.algorithm and getattr(self, k) != type(self).model_fields[k].default]
        if stray:
            raise ValueError(f"asynchronous.{stray[0]} is a setting of asynchronous.algorithm = {own[stray[0]]!r}, "
                             f"not of {self.algorithm!r}")
        return self


class SimultaneousTask(Section):
    """One task of mode = 'simultaneous': its name and its settings, KEY=VALUE overrides of the experiment's
    (as ``fedloom run --set`` takes them), e.g. ["data.dataset=mnist5k", "model.name=cnn"]."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="the task's name: its metrics are '<name>/...'")
    set: list[str] = Field(default_factory=list, description="the task's own settings over the experiment's")


class SimultaneousConfig(Section):
    """mode = 'simultaneous': several models trained at once on one federation's clients (FedAST, Askin et al.
    2024, or its synchronous baseline); each task is the experiment with its own overrides."""

    algorithm: Literal["fedast", "sync"] = Field(
        "fedast", description="fedast: a buffer per task, asynchronous | sync: Sync-ST, every task a round at once")
    realloc: bool = Field(True, description="fedast: move clients between tasks by their updates' variance")
    buffer_ratio: int = Field(32, ge=1, description="fedast with realloc: a task's buffer is ceil(its active "
                              "clients / buffer_ratio)")
    variance_window: int = Field(8, ge=2, description="fedast realloc: a task's last updates its variance is of")
    realloc_every: int = Field(0, ge=0, description="fedast realloc: arrivals per unfinished task between "
                               "reallocations; 0: 3/4 of the active clients (the authors')")
    tasks: list[SimultaneousTask] = Field(default_factory=list, description="[[simultaneous.tasks]] name, set")


class PersonalizationConfig(Section):
    """Models that differ per client (fedloom.personalization; ``fedloom list personalization``)."""

    method: Literal[("none", *PERSONALIZATION_METHODS)] = "none"  # type: ignore[valid-type]
    personal: str | list[str] = Field("head", description="fedper, fedrep, fedbabu: the personal (fedbabu: "
                                      "frozen) parameters, fnmatch patterns on their names, or \"head\": the "
                                      "model's last layer")
    finetune_epochs: int = Field(1, ge=1, description="finetune, fedbabu: epochs each client fine-tunes the "
                                 "global model at evaluation, on its own training data")
    finetune_steps: int | None = Field(None, ge=1, description="finetune, fedbabu: a fixed number of fine-tuning "
                                       "steps (batches) instead of finetune_epochs")
    head_epochs: int = Field(5, ge=1, description="fedrep: epochs of the head (body frozen) before the body's "
                             "client.epochs")
    ditto_lambda: float = Field(0.1, ge=0, description="ditto: pull lambda (v - w) of the personal model v "
                                "towards the global w")
    fedcac_tau: float = Field(0.5, gt=0, le=1, description="fedcac: the fraction of each parameter tensor a client "
                              "marks critical (largest |update * parameter|)")
    fedcac_beta: int = Field(100, ge=1, description="fedcac: rounds until the overlap a client needs to share its "
                             "critical parameters reaches the largest overlap (it then shares them with none)")
    fedloge_sparsity: float = Field(0.6, ge=0, lt=1, description="fedloge: the fraction of the ETF head's "
                                    "smallest-magnitude entries set to zero (SSE-C)")
    apfl_alpha: float = Field(0.5, ge=0, le=1, description="apfl: each client's initial mixing weight alpha of "
                              "its personalized model alpha v + (1 - alpha) w")
    adaptive_alpha: bool = Field(True, description="apfl: learn alpha by its gradient each local step (false: "
                                 "alpha stays at apfl_alpha)")
    alpha_lr: float | None = Field(None, gt=0, description="apfl: alpha's learning rate; unset: client.lr")


class OutputConfig(Section):
    """``[output]``: the run directory's parent, whether to write one, and the progress display."""

    dir: str = "runs"
    save: bool = Field(True, description="write a run directory")
    progress: bool = Field(True, description="a live bar on a terminal, else a plain line every progress_every rounds")
    progress_every: int | None = Field(None, ge=1, description="rounds between plain progress lines (stdout not a "
                                       "terminal); unset: a tenth of the rounds")


class TrackingConfig(Section):
    """Exporters of each round's record besides metrics.jsonl (runs that write a run directory); each
    library is an extra: pip install 'fedloom[tensorboard]' (or mlflow, wandb; tracking for all three)."""

    csv: bool = Field(True, description="metrics.csv beside metrics.jsonl: a row a round, a column a key")
    tensorboard: bool = Field(False, description="scalars each round and the figures at the end, in "
                              "<run>/tensorboard")
    mlflow: bool = Field(False, description="params (the config), metrics each round, the run directory as "
                         "artifacts at the end")
    mlflow_uri: str | None = Field(None, description="tracking URI; unset: sqlite:///<output.dir>/mlflow.db, "
                                   "artifacts in <output.dir>/mlartifacts")
    mlflow_experiment: str = Field("fedloom", min_length=1)
    wandb: bool = Field(False, description="config, metrics each round and the summary, in <run>/wandb")
    wandb_project: str = Field("fedloom", min_length=1)
    wandb_mode: Literal["offline", "online"] = Field("offline", description="offline: wandb sync uploads later")


class ExperimentConfig(Section):
    """A whole experiment: the top-level keys (name, mode, seed, rounds, ...) and every section; the combination
    rules between sections are checked when it is built."""

    name: str | None = Field(None, description="default: <dataset>-<algorithm> (decentralized: its algorithm), "
                             "e.g. digits-scaffold")
    mode: Literal["federated", "decentralized", "asynchronous", "simultaneous"] = "federated"
    seed: int = 0
    rounds: int = Field(50, ge=1)
    max_failed_rounds: int = Field(3, ge=1, description="rounds in a row in which every update is rejected "
                                   "before the run stops as failed")
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    decentralized: DecentralizedConfig = Field(default_factory=DecentralizedConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    participation: ParticipationConfig = Field(default_factory=ParticipationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)
    system: SystemConfig = Field(default_factory=SystemConfig)
    asynchronous: AsynchronousConfig = Field(default_factory=AsynchronousConfig)
    simultaneous: SimultaneousConfig = Field(default_factory=SimultaneousConfig)
    personalization: PersonalizationConfig = Field(default_factory=PersonalizationConfig)
    fedma: FedMAConfig = Field(default_factory=FedMAConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _default_name(self) -> "ExperimentConfig":
        # from what runs, so that an override of the dataset or algorithm renames the run
        if self.name is None and self.mode == "simultaneous":
            self.name = "-".join([self.simultaneous.algorithm, *(t.name for t in self.simultaneous.tasks)])
        if self.name is None:
            algorithm = self.decentralized.algorithm if self.mode == "decentralized" else self.algorithm.name
            personal = self.personalization.method
            self.name = f"{self.data.dataset}-{algorithm}" + (f"-{personal}" if personal != "none" else "")
        return self

    @model_validator(mode="after")
    def _default_clients(self) -> "ExperimentConfig":
        # a natural partition left unsized takes the data's clients, known once it is loaded (builders.sized_to);
        # till then the checks that need the number wait
        if self.data.n_clients is None and self.partition.name != "natural":
            self.data.n_clients = 100
        return self

    @model_validator(mode="after")
    def _deploy_fits_the_federation(self) -> "ExperimentConfig":
        if self.data.n_clients is not None and self.deploy.min_clients > self.data.n_clients:
            raise ValueError(f"deploy.min_clients = {self.deploy.min_clients} is more than "
                             f"data.n_clients = {self.data.n_clients}: a round could never close")
        return self

    @model_validator(mode="after")
    def _sampling_fits_the_federation(self) -> "ExperimentConfig":
        sampling = self.sampling
        if sampling.fraction is not None and sampling.clients_per_round is not None:
            raise ValueError("sampling: give clients_per_round or fraction, not both")
        if self.data.n_clients is None:
            return self
        if sampling.clients_per_round is not None and sampling.clients_per_round > self.data.n_clients:
            raise ValueError(f"sampling.clients_per_round = {sampling.clients_per_round} is more than "
                             f"data.n_clients = {self.data.n_clients}")
        if self.attack.n_byzantine(self.data.n_clients) > self.data.n_clients:
            raise ValueError(f"attack.f = {self.attack.f} is more than data.n_clients = {self.data.n_clients}")
        return self

    @model_validator(mode="after")
    def _decentralized_rules(self) -> "ExperimentConfig":
        if self.mode != "decentralized":
            return self
        if self.compression.downlink != "none":
            raise ValueError("compression.downlink compresses a server's model; decentralized runs have no server "
                             "(CHOCO-SGD compresses what nodes send: decentralized.algorithm = 'choco')")
        if self.attack.name != "none" and self.attack.redraw:
            raise ValueError("attack.redraw: Byzantine nodes of a decentralized run are fixed; set redraw = false")
        if self.attack.name != "none" and self.decentralized.algorithm != "dsgd":
            raise ValueError(f"[attack] in decentralized mode runs with decentralized.algorithm = 'dsgd' "
                             f"(got {self.decentralized.algorithm!r})")
        if self.server.transforms or self.server.aggregator.name != "mean":
            raise ValueError("server.aggregator and server.transforms are the server's pipeline; decentralized runs "
                             "have no server (robust gossip: decentralized.gossip = 'clipped')")
        if self.decentralized.algorithm == "choco" and self.compression.build() is None:
            raise ValueError("decentralized.algorithm = 'choco' needs a [compression] compressor (e.g. topk)")
        self._topology_fits_the_nodes()
        return self

    def _topology_fits_the_nodes(self) -> None:
        from fedloom.topology import TIME_VARYING

        t, d = self.topology, self.decentralized
        partial = d.participation < 1 or d.churn > 0
        if t.matrix is not None and self.data.n_clients is not None and len(t.matrix) != self.data.n_clients:
            raise ValueError(f"topology.matrix is {len(t.matrix)}x{len(t.matrix)}, but there are "
                             f"{self.data.n_clients} nodes (data.n_clients)")
        if partial and t.matrix is not None:
            raise ValueError("a user-given topology.matrix cannot be used with partial participation or churn "
                             "(decentralized.participation < 1 or decentralized.churn > 0)")
        if partial and t.matrix is None and t.name in TIME_VARYING:
            raise ValueError(f"time-varying topology {t.name!r} cannot be used with partial participation or churn "
                             "(decentralized.participation < 1 or decentralized.churn > 0)")

    @model_validator(mode="after")
    def _local_sgd_for_algorithms_that_assume_it(self) -> "ExperimentConfig":
        from fedloom.algorithms.gossip import GradientTracking

        algorithm = (GradientTracking if self.mode == "decentralized" and self.decentralized.algorithm ==
                     "gradient_tracking" else ALGORITHMS[self.algorithm.name].factory if self.mode == "federated" else None)
        plain = self.client.optimizer == "sgd" and self.client.momentum == 0
        if algorithm is not None and algorithm.plain_sgd_only and not plain:
            raise ValueError(f"{algorithm.name} assumes plain local SGD (its correction divides the model change "
                             f"by steps * lr); set client.optimizer = 'sgd' and client.momentum = 0 (got "
                             f"{self.client.optimizer!r}, momentum {self.client.momentum})")
        return self

    @model_validator(mode="after")
    def _privacy_rules(self) -> "ExperimentConfig":
        if self.privacy.mechanism == "none":
            return self
        if self.mode == "decentralized":
            raise ValueError("privacy.mechanism: differential privacy runs in federated mode (DP-FedAvg); "
                             "decentralized runs have no server aggregate to clip and noise")
        if self.server.aggregator.name != "mean":
            raise ValueError(f"server.aggregator = {self.server.aggregator.name!r} with privacy: the noise is "
                             "calibrated to one client moving the clipped mean by clip / clients_per_round; a robust "
                             "aggregator's output can move further, so the accounted epsilon would not hold "
                             "(privacy aggregates with its own mean; leave aggregator.name = 'mean')")
        if ALGORITHMS[self.algorithm.name].factory.server_step is not NoServerState.server_step:
            raise ValueError(f"algorithm.name = {self.algorithm.name!r} with privacy: its side matrices reach the "
                             "server unclipped and without noise")
        self._private_combinations()
        if self.data.n_clients is None:
            return self
        if (why := self.privacy_accounting().unsupported()) is not None:
            raise ValueError(why)
        if self.privacy.adaptive_clip:
            self.privacy_sum_noise_multiplier()
        else:
            self.privacy_noise_multiplier()
        return self

    def _private_combinations(self) -> None:
        """Adaptive clipping and DP-FTRL's rules (the keys they read, the mechanisms they fit)."""
        p = self.privacy
        if p.adaptive_clip and p.mechanism != "central":
            raise ValueError(f"privacy.adaptive_clip with privacy.mechanism = {p.mechanism!r}: the clip is learnt "
                             "from a count the trusted server noises once (central); local DP would need every "
                             "client to noise its own bit (sqrt(clients_per_round) times the noise) and DP-FTRL's "
                             "tree assumes one clip for all its leaves; use mechanism = 'central'")
        if p.mechanism == "ftrl" and self.server_choice()[0] != "sgd":
            raise ValueError(f"server.optimizer = {self.server_choice()[0]!r} with privacy.mechanism = 'ftrl': "
                             "DP-FTRL's model is the start minus server.lr times the (momentum) noisy prefix sum, "
                             "server SGD; set server.optimizer = 'sgd' (server.momentum is its momentum)")

    @model_validator(mode="after")
    def _secure_aggregation_rules(self) -> "ExperimentConfig":
        s, p = self.secure_aggregation, self.privacy
        if s.protocol == "none":
            if p.mechanism == "distributed":
                raise ValueError("privacy.mechanism = 'distributed' adds the central noise in shares under secure "
                                 "aggregation: set secure_aggregation.protocol = 'secagg' or 'secagg+'")
            return self
        missing = [name for name in ("cryptography", "Crypto") if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"secure_aggregation.protocol = {s.protocol!r} needs the cryptography and pycryptodome "
                             f"packages (missing: {', '.join(missing)}): pip install 'fedloom[secagg]'")
        if (why := self._needs_individual_rows()) is not None:
            raise ValueError(f"secure_aggregation.protocol = {s.protocol!r}: the server sees only the masked sum, "
                             f"so {why}")
        if self.data.n_clients is not None:
            self._secure_aggregation_fits(self.clients_per_round())
        return self

    def _needs_individual_rows(self) -> str | None:
        """What in this config would need a client's own row on the server, if anything."""
        s = self
        if s.mode == "decentralized":
            return "it runs in federated mode (decentralized runs have no server)"
        if s.server.aggregator.name != "mean":
            return f"server.aggregator = {s.server.aggregator.name!r} (it needs individual rows) cannot run; use 'mean'"
        if s.server.transforms:
            return "server.transforms (they act on individual rows) cannot run"
        if s.attack.name != "none":
            return f"attack.name = {s.attack.name!r} (a simulated attack on individual rows) cannot run"
        if s.compression.build() is not None:
            return f"compression.name = {s.compression.name!r} (uplink compression of rows) cannot run"
        if s.deploy.max_update_norm is not None:
            return "deploy.max_update_norm (the server checks each row's norm) cannot run"
        if s.privacy.mechanism in ("central", "local", "ftrl"):
            return (f"privacy.mechanism = {s.privacy.mechanism!r} cannot run (the server clips or noises rows, or "
                    "the clients noise theirs for a server that sees them); use privacy.mechanism = 'distributed'")
        if ALGORITHMS[s.algorithm.name].factory.server_step is not NoServerState.server_step:
            return f"algorithm.name = {s.algorithm.name!r} (its side matrices reach the server unmasked) cannot run"
        return None

    def _secure_aggregation_fits(self, clients: int) -> None:
        from fedloom.privacy.secagg_quantize import needed_bits

        s = self.secure_aggregation
        need = needed_bits(clients, s.value_bits)
        if need > s.bits:
            raise ValueError(f"secure_aggregation.bits = {s.bits} is too few: the sum of {clients} clients' "
                             f"{s.value_bits}-bit values needs {need} bits not to wrap; raise bits or lower "
                             "value_bits (or sampling.clients_per_round)")
        if isinstance(s.threshold, int) and s.threshold > s.group_size(clients):
            raise ValueError(f"secure_aggregation.threshold = {s.threshold} is more than a sharing group "
                             f"({s.group_size(clients)} clients)")

    @model_validator(mode="after")
    def _system_rules(self) -> "ExperimentConfig":
        s = self.system
        if self.mode == "decentralized" and s.profile != "none":
            raise ValueError("[system] times federated and asynchronous rounds; decentralized runs have no clock")
        if self.privacy.mechanism != "none" and (s.availability != "always" or s.over_selection > 0 or
                                                 (s.profile != "none" and self.privacy.mechanism == "ftrl")):
            raise ValueError(f"privacy.mechanism = {self.privacy.mechanism!r} accounts clients sampled uniformly "
                             "from all of them (DP-FTRL: each once an epoch); system.availability (other than "
                             "'always') and system.over_selection choose them by the clock instead, and DP-FTRL "
                             "takes no system model")
        if self.mode == "asynchronous":
            self._asynchronous_rules()
        return self

    def _asynchronous_rules(self) -> None:
        s, a = self.system, self.asynchronous
        if s.profile == "none":
            raise ValueError("mode = 'asynchronous' runs on the virtual clock: set system.profile = 'sampled' or 'trace'")
        if s.deadline_s is not None or s.over_selection > 0:
            raise ValueError("system.deadline_s and system.over_selection are synchronous rules; mode = "
                             "'asynchronous' has no rounds to close")
        if ALGORITHMS[self.algorithm.name].factory.server_step is not NoServerState.server_step:
            raise ValueError(f"algorithm.name = {self.algorithm.name!r} keeps server state (side matrices); "
                             "mode = 'asynchronous' runs client rules without one (fedavg, fedprox, ...)")
        if self.compression.downlink != "none" or self.privacy.mechanism != "none":
            raise ValueError("mode = 'asynchronous' sends clients the fp32 model and has no privacy accounting: "
                             "leave compression.downlink = 'none' and privacy.mechanism = 'none'")
        pipeline = self.compression.build() is not None or self.server.transforms or self.server.aggregator.name != "mean"
        if a.algorithm in ("fedasync", "favano") and pipeline:
            raise ValueError(f"asynchronous.algorithm = {a.algorithm!r} mixes clients' models into the server's: it "
                             "runs no server pipeline (compression, server.transforms, server.aggregator); use "
                             "'fedbuff' or 'fraboni'")
        if a.algorithm == "favano":
            self._favano_rules()
            return
        # a buffered client waits for the flush before it may start again
        busy = a.concurrency + (a.buffer_size - 1 if a.algorithm in ("fedbuff", "fraboni") else 0)
        if self.data.n_clients is not None and busy > self.data.n_clients:
            raise ValueError(f"asynchronous.concurrency = {a.concurrency} (plus buffer_size - 1 for fedbuff and "
                             f"fraboni) is more than data.n_clients = {self.data.n_clients}")

    def _favano_rules(self) -> None:
        a = self.asynchronous
        if self.system.availability != "always":
            raise ValueError("asynchronous.algorithm = 'favano' has every client computing without pause: leave "
                             "system.availability = 'always'")
        if self.data.n_clients is not None and a.clients_per_update > self.data.n_clients:
            raise ValueError(f"asynchronous.clients_per_update = {a.clients_per_update} is more than "
                             f"data.n_clients = {self.data.n_clients}")

    @model_validator(mode="after")
    def _simultaneous_rules(self) -> "ExperimentConfig":
        """mode = 'simultaneous': named tasks, each a valid experiment on the same clients, on the virtual clock."""
        tasks = self.simultaneous.tasks
        if self.mode != "simultaneous":
            if tasks:
                raise ValueError("simultaneous.tasks are the models of mode = 'simultaneous'; set mode to run them")
            return self
        names = [t.name for t in tasks]
        if not names or len(set(names)) != len(names):
            raise ValueError("mode = 'simultaneous' needs [[simultaneous.tasks]], each with its own name "
                             f"(got {names})")
        if self.system.profile == "none":
            raise ValueError("mode = 'simultaneous' runs on the virtual clock: set system.profile = 'sampled' or "
                             "'trace'")
        configs = self.task_configs()
        self._tasks_share_the_clients(configs)
        return self

    def _tasks_share_the_clients(self, configs: dict[str, "ExperimentConfig"]) -> None:
        sizes = {name: cfg.data.n_clients for name, cfg in configs.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"simultaneous.tasks train on one federation's clients: their data.n_clients differ "
                             f"({sizes})")
        active = sum(cfg.asynchronous.concurrency for cfg in configs.values())
        n = next(iter(sizes.values()))
        if n is not None and active > n:
            raise ValueError(f"simultaneous.tasks: their asynchronous.concurrency (active clients) add up to "
                             f"{active}, more than the {n} clients")
        own_cost = {"seconds_per_example", "device_flops"}  # a task's compute cost may differ; the devices may not
        shared = self.system.model_dump(exclude=own_cost)
        for name, cfg in configs.items():
            changed = [k for k, v in cfg.system.model_dump(exclude=own_cost).items() if v != shared[k]]
            if changed:
                raise ValueError(f"simultaneous.tasks {name!r}: system.{changed[0]} differs from the experiment's; "
                                 "the tasks share the clients' devices (a task may set only its own "
                                 "system.seconds_per_example or system.device_flops)")
            if cfg.system.deadline_s is not None or cfg.system.over_selection > 0:
                raise ValueError(f"simultaneous.tasks {name!r}: system.deadline_s and system.over_selection are not "
                                 "rules of simultaneous training (a task's round waits for its clients)")
            if cfg.personalization.method != "none":
                raise ValueError(f"simultaneous.tasks {name!r}: personalization runs in mode = 'federated'")
            if cfg.privacy.mechanism != "none" or cfg.secure_aggregation.protocol != "none":
                raise ValueError(f"simultaneous.tasks {name!r}: privacy and secure aggregation assume clients "
                                 "sampled uniformly for one model; simultaneous training shares them out between "
                                 "tasks (leave privacy.mechanism and secure_aggregation.protocol 'none')")

    def task_configs(self) -> dict[str, "ExperimentConfig"]:
        """mode = 'simultaneous': each task's own experiment, this one with the task's overrides, run as an
        asynchronous FedBuff stream without staleness discount (fedast) or as federated rounds (sync)."""
        base = {**self.to_dict(), "simultaneous": {}}
        own = {"fedast": ["mode=asynchronous", "asynchronous.algorithm=fedbuff", "asynchronous.staleness=constant"],
               "sync": ["mode=federated"]}[self.simultaneous.algorithm]
        configs = {}
        for task in self.simultaneous.tasks:
            try:
                configs[task.name] = load_config({**base, "name": f"{self.name}-{task.name}"}, [*own, *task.set])
            except ConfigError as err:
                detail = str(err).removeprefix("invalid config:").strip()
                raise ValueError(f"simultaneous.tasks {task.name!r}: {detail}") from None
        return configs

    @model_validator(mode="after")
    def _participation_rules(self) -> "ExperimentConfig":
        p = self.participation
        if p.mode == "bernoulli":
            self._bernoulli_fits()
        fedau = [i for i, t in enumerate(self.server.transforms) if t.name == "fedau"]
        if fedau and self.mode == "federated":
            self._fedau_fits(fedau)
        return self

    def _bernoulli_fits(self) -> None:
        if self.mode != "federated":
            raise ValueError(f"participation.mode = 'bernoulli' is for federated runs, not mode = {self.mode!r} "
                             "(decentralized: decentralized.participation and decentralized.churn)")
        if self.system.profile != "none" or self.secure_aggregation.protocol != "none":
            raise ValueError("participation.mode = 'bernoulli' sets who takes part by each client's own probability; "
                             "a system model (its availability) and secure aggregation (its sharing groups of "
                             "clients_per_round) set it otherwise: use one of them")
        if self.privacy.mechanism != "none":
            raise ValueError("participation.mode = 'bernoulli' with privacy: the DP accounting assumes "
                             "sampling.clients_per_round clients drawn without replacement (a fixed, public round "
                             "size); with each client joining on its own probability neither the round size nor the "
                             "sampling amplification holds (use participation.mode = 'uniform')")
        if self.sampling.clients_per_round is not None or self.sampling.fraction is not None:
            raise ValueError("participation.mode = 'bernoulli': each client joins on its own probability; "
                             "sampling.clients_per_round and sampling.fraction do not apply (leave them unset)")
        given = self.participation.distribution == "given"
        if given and self.data.n_clients is not None:
            n = len(participation.given_probabilities(self.participation))
            if n != self.data.n_clients:
                raise ValueError(f"participation: {n} probabilities given for data.n_clients = "
                                 f"{self.data.n_clients} clients (one per client)")

    def _fedau_fits(self, positions: list[int]) -> None:
        """FedAU ends the rows in one (its sum over all clients), so it comes last and a plain mean follows."""
        if positions != [len(self.server.transforms) - 1]:
            raise ValueError("server.transforms: 'fedau' sums the rows into the round's update, so it must be the "
                             "last transform (and appear once)")
        if self.server.aggregator.name != "mean" or self.privacy.mechanism != "none":
            raise ValueError("server.transforms 'fedau' is the aggregate itself: it runs with "
                             "server.aggregator.name = 'mean' and privacy.mechanism = 'none'")

    @model_validator(mode="after")
    def _matched_averaging_rules(self) -> "ExperimentConfig":
        """Matched averaging rebuilds each client's model from its row and the round's global model."""
        if not any(t.name == "matched_averaging" for t in self.server.transforms):
            return self
        given = {"mode": (self.mode, "federated"), "privacy.mechanism": (self.privacy.mechanism, "none"),
                 "secure_aggregation.protocol": (self.secure_aggregation.protocol, "none"),
                 "personalization.method": (self.personalization.method, "none")}
        for key, (value, needed) in given.items():
            if value != needed:
                raise ValueError(f"server.transforms 'matched_averaging' aligns whole client models, x_global - row, "
                                 f"so it needs {key} = {needed!r} (got {value!r}): a noised, masked or partial row "
                                 "(or a stale one) is not a client model")
        return self

    @model_validator(mode="after")
    def _anchor_sampling_rules(self) -> "ExperimentConfig":
        """FedAMD: its options' ranges, and the parts its anchors (gradients that bypass the pipeline) and
        its server state do not combine with."""
        if self.algorithm.name != "fedamd" or self.mode == "decentralized":
            return self
        options = self.algorithm.options
        p, batch = options.get("anchor_probability", 0.2), options.get("anchor_batch_size", 0)
        if not 0 <= p < 1:
            raise ValueError(f"algorithm.options.anchor_probability = {p}: a participant is an anchor with this "
                             "probability; give a value in [0, 1) (1 would leave no miner to move the model)")
        if batch < 0:
            raise ValueError(f"algorithm.options.anchor_batch_size = {batch}: give examples per anchor batch, or 0 "
                             "for all of a client's examples")
        refused = {"mode = 'asynchronous'": self.mode == "asynchronous",
                   "engine.name = 'ray'": self.engine.name == "ray",
                   "compression.downlink": self.compression.downlink != "none",
                   "a system model (system.profile)": self.system.profile != "none",
                   "privacy.mechanism": self.privacy.mechanism != "none",
                   "secure_aggregation.protocol": self.secure_aggregation.protocol != "none",
                   "server.transforms 'fedau'": any(t.name == "fedau" for t in self.server.transforms)}
        clash = next((name for name, on in refused.items() if on), None)
        if clash is not None:
            raise ValueError(f"algorithm.name = 'fedamd' with {clash}: its anchors' gradients skip the server "
                             "pipeline and are not timed, compressed, noised or masked; FedAMD runs without it")
        return self

    @model_validator(mode="after")
    def _personalization_rules(self) -> "ExperimentConfig":
        method = self.personalization.method
        if method == "none":
            return self
        if self.mode != "federated":
            raise ValueError(f"personalization.method = {method!r} runs in federated mode, not mode = "
                             f"{self.mode!r} (decentralized nodes keep their own models already)")
        if self.secure_aggregation.protocol != "none":
            raise ValueError(f"personalization.method = {method!r} with secure_aggregation.protocol = "
                             f"{self.secure_aggregation.protocol!r}: the two are not combined yet; use one")
        if ALGORITHMS[self.algorithm.name].factory.client_init is not PlainClient.client_init:
            raise ValueError(f"personalization.method = {method!r} with algorithm.name = {self.algorithm.name!r}: "
                             "its client state is not kept apart from the personal one; use fedavg, fedprox or a "
                             "server-optimizer preset")
        if self.compression.downlink != "none":
            raise ValueError(f"personalization.method = {method!r} with compression.downlink: the downlink "
                             "would compress personal coordinates the clients never receive")
        if self.engine.name == "ray":
            raise ValueError(f"personalization.method = {method!r} trains on the serial or vectorized engine "
                             "(engine.name = 'ray' is not supported)")
        if method == "apfl" and (self.client.optimizer != "sgd" or self.client.weight_decay):
            raise ValueError("personalization.method = 'apfl' steps alpha by SGD at its own alpha_lr: it needs "
                             "client.optimizer = 'sgd' (Adam would ignore alpha_lr) and client.weight_decay = 0 "
                             f"(got {self.client.optimizer!r}, {self.client.weight_decay:g})")
        if method in ("fedrep", "fedbabu", "fedloge") and self.client.weight_decay:
            raise ValueError(f"personalization.method = {method!r} freezes parameters; client.weight_decay = "
                             f"{self.client.weight_decay:g} would still move them: set it to 0")
        return self

    @model_validator(mode="after")
    def _fedcac_rules(self) -> "ExperimentConfig":
        """FedCAC's customized models average the clients' raw local models outside the server pipeline:
        no stage of it (compression, privacy, a robust aggregator, an attack) would act on them."""
        if self.personalization.method != "fedcac":
            return self
        stages = {"compression.name": self.compression.name, "privacy.mechanism": self.privacy.mechanism,
                  "attack.name": self.attack.name}
        for key, value in stages.items():
            if value != "none":
                raise ValueError(f"personalization.method = 'fedcac' with {key} = {value!r}: its customized models "
                                 "average the raw local models beside the server pipeline; set it to 'none'")
        if self.server.aggregator.name != "mean":
            raise ValueError(f"personalization.method = 'fedcac' with server.aggregator.name = "
                             f"{self.server.aggregator.name!r}: its customized models are plain means; use 'mean'")
        return self

    @model_validator(mode="after")
    def _fedlaw_rules(self) -> "ExperimentConfig":
        """FedLAW ends the rows in one, the model it learns on the server's proxy set, so it comes last, a
        plain mean follows, and the server's model must be the whole model (no personal layers)."""
        positions = [i for i, t in enumerate(self.server.transforms) if t.name == "fedlaw"]
        if not positions:
            return self
        if positions != [len(self.server.transforms) - 1]:
            raise ValueError("server.transforms: 'fedlaw' learns the round's model from the clients' rows, so it "
                             "must be the last transform (and appear once)")
        if self.server.aggregator.name != "mean" or self.privacy.mechanism != "none":
            raise ValueError("server.transforms 'fedlaw' is the aggregate itself: it runs with server.aggregator.name "
                             f"= 'mean' and privacy.mechanism = 'none' (got {self.server.aggregator.name!r}, "
                             f"{self.privacy.mechanism!r})")
        method = self.personalization.method
        if method != "none" and PERSONALIZATION_METHODS.factory(method).splits:
            raise ValueError(f"server.transforms 'fedlaw' with personalization.method = {method!r}: the server's "
                             "model lacks the clients' personal layers, so it has no proxy loss; use finetune, "
                             "ditto or apfl")
        return self

    def privacy_accounting(self) -> Accounting | None:
        """What the accountant needs of this run, or None when privacy is off."""
        p = self.privacy
        if p.mechanism == "none":
            return None
        mechanism = "central" if p.mechanism == "distributed" else p.mechanism  # the sum carries central noise
        return _accounting().Accounting(mechanism, p.accountant, self.data.n_clients, self.clients_per_round(),
                                        p.delta)

    def privacy_noise_multiplier(self) -> float:
        """privacy.noise_multiplier, or the one calibrated to privacy.target_epsilon for the planned rounds."""
        p = self.privacy
        if p.noise_multiplier is not None:
            return p.noise_multiplier
        try:
            return self.privacy_accounting().calibrate(p.target_epsilon, self.rounds)
        except ValueError as err:
            raise ValueError(f"privacy.target_epsilon = {p.target_epsilon:g} cannot be reached: {err}; raise "
                             "privacy.target_epsilon or privacy.delta, or lower rounds") from None

    def privacy_count_noise(self) -> float:
        """Adaptive clipping's sigma_b: privacy.count_noise, else clients_per_round / 20 (Andrew et al.)."""
        count_noise = self.privacy.count_noise
        return count_noise if count_noise is not None else self.clients_per_round() / 20

    def privacy_sum_noise_multiplier(self) -> float:
        """Adaptive clipping's noise multiplier on the clipped sum, derived from the (calibrated) one."""
        z, count_std = self.privacy_noise_multiplier(), self.privacy_count_noise()
        try:
            return _accounting().sum_noise_multiplier(z, count_std)
        except ValueError as err:
            raise ValueError(f"privacy.count_noise: {err}; raise privacy.count_noise (default clients_per_round / "
                             "20) above noise_multiplier / 2, or lower the noise multiplier") from None

    def server_choice(self) -> tuple[str, float, float]:
        """The server optimizer's name, lr and momentum: [server] where given, else the algorithm's preset."""
        preset, server = SERVER_PRESETS.get(self.algorithm.name, ServerPreset()), self.server
        return (server.optimizer or preset.optimizer, server.lr if server.lr is not None else preset.lr,
                server.momentum if server.momentum is not None else preset.momentum)

    def server_optimizer(self) -> tuple[str, OptimizerFactory]:
        """The server optimizer's name and factory (:meth:`server_choice`)."""
        name, lr, momentum = self.server_choice()
        server = self.server
        return name, server_optimizer(name, lr=lr, momentum=momentum, beta1=server.beta1, beta2=server.beta2,
                                      tau=server.tau)

    def clients_per_round(self) -> int:
        """As configured; by default 10 clients a round (all of them when there are fewer)."""
        if self.sampling.fraction is not None:
            return max(1, round(self.sampling.fraction * self.data.n_clients))
        if self.sampling.clients_per_round is not None:
            return self.sampling.clients_per_round
        return min(10, self.data.n_clients)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, loadable again."""
        return self.model_dump(mode="json")


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r}" + _allowed_near(error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("value_error", "assertion_error") or "input" not in error:
        return f"{key}: {message}"
    return f"{key}: {message} (got {error['input']!r})"


def _allowed_near(loc: tuple) -> str:
    """The keys accepted where an unknown key stands, as a hint."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    return f"; allowed here: {', '.join(model.model_fields)}"


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    """The ``ExperimentConfig`` of a raw mapping; ConfigError listing each invalid key and what it accepts."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(e) for e in err.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def read_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a ``.toml``, ``.yaml`` or ``.yml`` config file; ConfigError naming the file if it is
    missing or does not parse."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            return _table(path, yaml.safe_load(text) or {})
        if path.suffix == ".toml":
            return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path} is not valid {path.suffix[1:].upper()}: {err}") from None
    raise ConfigError(f"{path}: config files are .toml, .yaml or .yml")


def _table(path: Path, loaded: Any) -> dict[str, Any]:
    """A YAML document's top level, which must map keys to values as a TOML file always does."""
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level is a {type(loaded).__name__}; a config is a mapping of keys "
                          "such as 'rounds: 50' and 'model: {name: mlp}'")
    return loaded


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (numbers, booleans, lists),
    else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to the nested dict ``raw`` in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {assignment!r} is not of the form key=value (e.g. algorithm.name=fedprox)")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is a value, not a table")
        node = child
    node[leaf] = parse_value(value.strip())


PATH_OPTIONS = ("path",)  # the data.options naming local files (every loader's: npz, csv, cifar, femnist, hf)


def _absolute_data_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative data paths in ``raw`` (and participation.path) made absolute against ``base``, in place, so
    that the config saved in the run directory reads the same files from any directory."""
    options = raw.get("data", {}).get("options") if isinstance(raw.get("data"), dict) else None
    for key in PATH_OPTIONS if isinstance(options, dict) else ():
        _make_absolute(options, key, base)
    if isinstance(raw.get("participation"), dict):
        _make_absolute(raw["participation"], "path", base)


def _make_absolute(table: dict[str, Any], key: str, base: Path) -> None:
    if isinstance(table.get(key), (str, os.PathLike)) and str(table[key]):
        path = Path(table[key]).expanduser()
        table[key] = str(path if path.is_absolute() else Path(os.path.abspath(base / path)))


def load_config(source: str | Path | dict[str, Any] | ExperimentConfig | None = None,
                overrides: list[str] = ()) -> ExperimentConfig:
    """A validated config from a file, a dict or nothing (the defaults), with
    dotted ``key=value`` overrides applied on top. Relative data paths (data.options.path) are
    made absolute: a file's against the file's directory, the others' against the current one."""
    if isinstance(source, ExperimentConfig):
        raw = source.to_dict()
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)  # overrides must not reach into the caller's tables
    elif source is None:
        raw = {}
    else:
        raw = read_file(source)
        _absolute_data_paths(raw, Path(source).absolute().parent)
    for assignment in overrides:
        apply_override(raw, assignment)
    _absolute_data_paths(raw, Path.cwd())
    return validate(raw)
