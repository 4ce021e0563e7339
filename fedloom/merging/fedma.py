"""FedMA: Wang, Yurochkin, Sun, Papailiopoulos and Khazaeni 2020, "Federated Learning with Matched Averaging".

Layer by layer from the input, the clients' neurons (a neuron: its incoming weights and bias) are matched to
global neurons by the Bayesian-nonparametric matching of PFNM (Yurochkin, Agarwal, Ghosh, Greenewald, Hoang
and Khazaeni 2019, "Bayesian Nonparametric Federated Learning of Neural Networks"), the matched neurons are
averaged into the global layer, and the clients retrain the layers above it with it frozen; the output layer
is then averaged. A client's neuron may open a new global neuron, so a layer can grow (up to ``max_growth``
of its width).

PFNM's model: global neurons theta_i ~ N(mu0, sigma0^2 I) drawn by a Beta-Bernoulli (Indian buffet) process
of mass gamma0 over J clients; a client's neuron v ~ N(theta_i, sigma^2 I). Matching client j given the
others, whose neurons S_i (m_i of them) sit on global neuron i, maximizes the summed posterior gain; with the
natural parameters N_i = mu0 / sigma0^2 + sum(S_i) / sigma^2 and precision P_i = 1 / sigma0^2 + m_i / sigma^2:

    existing i:  ||N_i + v / sigma^2||^2 / (P_i + 1 / sigma^2) - ||N_i||^2 / P_i + 2 log(m_i / (J - m_i))
    k-th new:    ||mu0 / sigma0^2 + v / sigma^2||^2 / (1 / sigma0^2 + 1 / sigma^2) - ||mu0||^2 / sigma0^2
                 - 2 log k + 2 log(gamma0 / J)

one linear assignment (``scipy.optimize.linear_sum_assignment``) over the existing columns and the new ones.
Clients are matched in a random order (``Stream.MERGING``), then ``iterations`` passes re-match each client
given the others (global neurons left with none are dropped). The global neuron is the mean of its matched
neurons weighted by the clients' examples (FedMA's matched average). The client's next layer is spread
onto the global width: its inputs from global neurons it has no neuron on are zero.

``rounds > 1`` is FedMA with communication: the matched global model goes back to every client, which trains
it whole and the layer-wise matching runs again. Sequential MLPs and CNNs (Linear/Conv2d, elementwise
layers, pooling, Flatten) are supported; BatchNorm and residual networks are not.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from fedloom.algorithms.base import PlainClient
from fedloom.config import ExperimentConfig, load_config
from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, torch_generator
from fedloom.core.store import ClientStore
from fedloom.merging.merge import State, mean_state
from fedloom.merging.one_shot import client_starts, states_of_rows
from fedloom.merging.runs import Evaluator
from fedloom.merging.spec import SpecError, spec_for

MATCH_KEY = 3  # the merging stream's key for FedMA's matching order (0..2: activation batch, sweeps, inits)


@dataclass(frozen=True)
class Prior:
    """PFNM's hyperparameters (module docstring)."""
    sigma: float = 1.0  # a client's neuron around its global neuron
    sigma0: float = 1.0  # global neurons around mu0
    gamma0: float = 1.0  # the Indian buffet process' mass: how readily a new global neuron opens
    mu0: float = 0.0


def assignment_costs(v: Tensor, sums: Tensor, counts: Tensor, n_clients: int, prior: Prior,
                     n_new: int) -> np.ndarray:
    """The gain of putting each of a client's neurons v [Lj, D] on each global neuron (given the others'
    neuron sums [L, D] and counts [L]) and on each of ``n_new`` new ones: [Lj, L + n_new] (module docstring)."""
    s2, s02 = prior.sigma ** 2, prior.sigma0 ** 2
    v, sums, counts = v.double(), sums.double(), counts.double()
    natural = prior.mu0 / s02 + sums / s2  # [L, D]
    precision = 1 / s02 + counts / s2
    scaled = v / s2
    natural_sq = natural.square().sum(1)
    joined = natural_sq[None] + 2 * scaled @ natural.T + scaled.square().sum(1)[:, None]
    match = (joined / (precision + 1 / s2)[None] - (natural_sq / precision)[None]
             + 2 * torch.log(counts / (n_clients - counts))[None])
    fresh = ((prior.mu0 / s02 + scaled).square().sum(1) / (1 / s02 + 1 / s2)
             - v.shape[1] * prior.mu0 ** 2 / s02)
    k = torch.arange(1, n_new + 1, dtype=torch.float64)
    new = fresh[:, None] - 2 * torch.log(k)[None] + 2 * math.log(prior.gamma0 / n_clients)
    return torch.cat([match, new], 1).numpy()


def _totals(neurons: list[Tensor], assign: list[Tensor | None], width: int) -> tuple[Tensor, Tensor]:
    """The sums [width, D] and counts [width] of the neurons on each global neuron (unassigned clients left out)."""
    sums = torch.zeros(width, neurons[0].shape[1], dtype=torch.float64)
    counts = torch.zeros(width, dtype=torch.float64)
    for v, a in zip(neurons, assign):
        if a is not None:
            sums.index_add_(0, a, v.double())
            counts.index_add_(0, a, torch.ones(len(a), dtype=torch.float64))
    return sums, counts


def _compact(assign: list[Tensor | None], width: int) -> tuple[list[Tensor | None], int]:
    """Global neurons no client sits on dropped, the others renumbered in order."""
    used = torch.zeros(width, dtype=torch.bool)
    for a in assign:
        if a is not None:
            used[a] = True
    renumber = torch.cumsum(used.long(), 0) - 1
    return [None if a is None else renumber[a] for a in assign], int(used.sum())


def _match_client(j: int, neurons: list[Tensor], assign: list[Tensor | None], width: int, prior: Prior,
                  cap: int) -> tuple[Tensor, int]:
    """Client j's neurons put on the others' global neurons or on new ones: (its assignment, the new width)."""
    sums, counts = _totals(neurons, assign, width)
    own = len(neurons[j])
    n_new = max(min(own, cap - width), own - width, 0)  # bounded growth, but room for all of j's neurons
    cost = assignment_costs(neurons[j], sums, counts, len(neurons), prior, n_new)
    rows, cols = linear_sum_assignment(cost, maximize=True)
    cols = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
    opened = cols >= width
    ranks = torch.argsort(torch.argsort(cols[opened]))  # new neurons numbered in their columns' order
    cols[opened] = width + ranks
    return cols, width + int(opened.sum())


def match_layer(neurons: list[Tensor], prior: Prior, cap: int, generator: torch.Generator,
                iterations: int = 5) -> tuple[list[Tensor], int]:
    """PFNM's matching of the clients' neurons ([Lj, D] each): each client's assignment to global neurons
    (a neuron index per client neuron) and the global width (at most ``cap`` unless a client has more)."""
    order = torch.randperm(len(neurons), generator=generator).tolist()
    assign: list[Tensor | None] = [None] * len(neurons)
    assign[order[0]], width = torch.arange(len(neurons[order[0]])), len(neurons[order[0]])
    for j in order[1:]:
        assign[j], width = _match_client(j, neurons, assign, width, prior, cap)
    for _ in range(iterations):
        for j in torch.randperm(len(neurons), generator=generator).tolist():
            assign[j] = None
            assign, width = _compact(assign, width)
            assign[j], width = _match_client(j, neurons, assign, width, prior, cap)
    return assign, width


def matched_average(neurons: list[Tensor], assign: list[Tensor], width: int, weights: Tensor) -> Tensor:
    """Each global neuron: the mean of the neurons matched to it, weighted by their clients' weights [width, D]."""
    total = torch.zeros(width, neurons[0].shape[1], dtype=torch.float64)
    mass = torch.zeros(width, dtype=torch.float64)
    for v, a, w in zip(neurons, assign, weights.tolist()):
        total.index_add_(0, a, w * v.double())
        mass.index_add_(0, a, torch.full((len(a),), w, dtype=torch.float64))
    return (total / mass[:, None]).to(neurons[0].dtype)


# ---- the layers of a sequential model, grown ----------------------------------------------------------

class FedMAError(ValueError):
    """FedMA cannot run on this model or config (the message names the module or key)."""


@dataclass(frozen=True)
class Layer:
    """One matched layer: its module's name and its inputs per unit of the layer below."""
    name: str  # the Linear/Conv2d module
    inner: int  # its inputs per unit of the layer below (a Linear after Flatten: height x width)


def layers_of(model: nn.Module) -> list[Layer]:
    """The model's weight layers from the input, each with its inputs per unit below."""
    try:
        spec = spec_for(model)
    except SpecError as err:
        raise FedMAError(f"FedMA: {err}") from None
    normed = sorted({k.rsplit(".", 1)[0] for k in spec.axes if k.endswith("running_mean")})
    if normed:
        raise FedMAError(f"FedMA: module {normed[0]!r} is a BatchNorm; FedMA matches Linear/Conv2d layers "
                         "without normalization (a model with norm layers has no FedMA here)")
    weighted = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    grouped = [n for n in weighted if isinstance(model.get_submodule(n), nn.Conv2d)
               and model.get_submodule(n).groups != 1]
    if grouped:
        raise FedMAError(f"FedMA: module {grouped[0]!r} is a grouped convolution; FedMA needs groups = 1")
    return [Layer(n, spec.axes[f"{n}.weight"][1].inner if k else 1) for k, n in enumerate(weighted)]


def _resized(module: nn.Module, n_in: int, n_out: int) -> nn.Module:
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        return nn.Linear(n_in, n_out, bias=bias)
    return nn.Conv2d(n_in, n_out, module.kernel_size, module.stride, module.padding, module.dilation,
                     bias=bias, padding_mode=module.padding_mode)


def _units(module: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a Linear or Conv2d."""
    return ((module.in_features, module.out_features) if isinstance(module, nn.Linear)
            else (module.in_channels, module.out_channels))


def model_of(template: nn.Module, layers: list[Layer], widths: dict[str, int]) -> nn.Module:
    """A copy of ``template`` whose hidden layers have ``widths`` units (others as in the template)."""
    model = copy.deepcopy(template)
    for k, layer in enumerate(layers):
        module = model.get_submodule(layer.name)
        n_in, n_out = _units(module)
        n_in = n_in if k == 0 else widths.get(layers[k - 1].name, n_in // layer.inner) * layer.inner
        parent, _, child = layer.name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                _resized(module, n_in, widths.get(layer.name, n_out)))
    return model


def neurons_of(state: State, layer: Layer) -> Tensor:
    """The layer's neurons: incoming weights and bias, one row a unit [units, D]."""
    weight = state[f"{layer.name}.weight"]
    parts = [weight.flatten(1)] + ([state[f"{layer.name}.bias"][:, None]] if f"{layer.name}.bias" in state else [])
    return torch.cat(parts, 1)


def with_neurons(state: State, layer: Layer, neurons: Tensor, shape: torch.Size) -> State:
    """``state`` with the layer's weights (of ``shape`` past the units axis) and bias set from ``neurons``."""
    out = dict(state)
    fan_in = math.prod(shape)
    out[f"{layer.name}.weight"] = neurons[:, :fan_in].reshape(len(neurons), *shape).contiguous()
    if f"{layer.name}.bias" in state:
        out[f"{layer.name}.bias"] = neurons[:, fan_in].contiguous()
    return out


def spread_inputs(weight: Tensor, assign: Tensor, width: int) -> Tensor:
    """A layer's weight over its client's units below (axis 1: those units, each a block of inputs), spread
    onto the ``width`` global units: the inputs from global units the client has none on are zero."""
    units = weight.unflatten(1, (len(assign), -1))
    spread = units.new_zeros(units.shape[0], width, *units.shape[2:])
    spread[:, assign] = units
    return spread.flatten(1, 2)


# ---- the procedure --------------------------------------------------------------------------------------

class FrozenBelow(PlainClient):
    """Local training of only the coordinates ``mask`` marks (FedMA's retraining above the matched layers):
    the others' gradients are zeroed, so plain SGD (and Adam, momentum) leave them exactly as they are."""

    def __init__(self, mask: Tensor):
        self.mask = mask

    def correct_grad(self, g: Tensor, x: Tensor, x0: Tensor, sent: dict[str, Tensor], cstate) -> Tensor:
        return g * self.mask.to(g)


@dataclass(frozen=True)
class FedMAResult:
    """What ``fedma`` measured: each client model's test metrics, the naive average's, FedMA's, its
    widths, and FedMA's model."""
    clients: list[dict[str, float]]  # each client's model after its first local training: test metrics
    average: dict[str, float]  # those client models averaged coordinate by coordinate (the naive merge)
    fedma: dict[str, float]  # FedMA's global model
    widths: dict[str, int]  # its hidden layers' widths
    model: nn.Module  # FedMA's global model, weights loaded

    def table(self) -> dict[str, Any]:
        """The clients' mean metrics beside the naive average's and FedMA's, and the widths."""
        mean = {k: sum(c[k] for c in self.clients) / len(self.clients) for k in self.clients[0]}
        return {"client_mean": mean, "average": self.average, "fedma": self.fedma, "widths": self.widths}

    def write(self, out: str | Path) -> list[Path]:
        """``fedma.json`` (the table and each client's metrics) and ``model.safetensors`` (FedMA's global
        model, its grown widths in the json) into the directory ``out``; the paths written."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        table, model = out / "fedma.json", out / "model.safetensors"
        table.write_text(json.dumps({**self.table(), "clients": self.clients}, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, str(model))
        return [table, model]


@dataclass(frozen=True)
class Matching:
    """What FedMA's layer-wise matching reads: the model's layers, the clients' weights, the prior, the
    widths a layer may grow to, and where its random order comes from."""
    template: nn.Module
    layers: list[Layer]
    weights: Tensor  # each client's weight in the matched averages (its examples)
    prior: Prior
    caps: dict[str, int]  # each hidden layer's largest global width
    seed: int
    iterations: int = 5

    @classmethod
    def of(cls, template: nn.Module, weights: Tensor, prior: Prior = Prior(), max_growth: float = 0.5,
           seed: int = 0, iterations: int = 5) -> "Matching":
        """The matching for ``template``'s layers: the clients' ``weights``, the PFNM prior, each hidden
        layer's width cap ((1 + max_growth) x its width), the seed of the clients' order and the passes."""
        layers = layers_of(template)
        caps = {layer.name: math.floor(_units(template.get_submodule(layer.name))[1] * (1 + max_growth))
                for layer in layers[:-1]}
        return cls(template, layers, torch.as_tensor(weights, dtype=torch.float64), prior, caps, seed, iterations)

    def widths(self) -> dict[str, int]:
        """The hidden layers' current widths."""
        return {layer.name: _units(self.template.get_submodule(layer.name))[1] for layer in self.layers[:-1]}


Retrain = Callable[[nn.Module, list[State], int, int], list[State]]  # (model, states, trainable_from, stage)


def layerwise(m: Matching, states: list[State], widths: dict[str, int], r: int = 0,
              retrain: Retrain | None = None) -> tuple[State, dict[str, int]]:
    """One FedMA pass over the clients' state dicts: each hidden layer matched and averaged, and, with
    ``retrain``, frozen while the clients retrain the layers above it; then the output layer averaged
    (without ``retrain``: PFNM's one-shot matching of every layer). (The global state, its widths.)"""
    for k, layer in enumerate(m.layers[:-1]):
        neurons = [neurons_of(s, layer) for s in states]
        generator = torch_generator(m.seed, Stream.MERGING, MATCH_KEY, r, k)
        assign, width = match_layer(neurons, m.prior, m.caps[layer.name], generator, m.iterations)
        atoms, widths = matched_average(neurons, assign, width, m.weights), {**widths, layer.name: width}
        shape, above = states[0][f"{layer.name}.weight"].shape[1:], f"{m.layers[k + 1].name}.weight"
        states = [{**with_neurons(s, layer, atoms, shape), above: spread_inputs(s[above], a, width)}
                  for s, a in zip(states, assign)]
        if retrain is not None:
            states = retrain(model_of(m.template, m.layers, widths), states, k + 1, r * len(m.layers) + k + 1)
    output = [key for key in states[0] if key.rsplit(".", 1)[0] == m.layers[-1].name]
    share = (m.weights / m.weights.sum()).tolist()
    averaged = {key: sum(w * s[key].double() for w, s in zip(share, states)).to(states[0][key].dtype)
                for key in output}
    return {**states[0], **averaged}, widths


def fedma(config: str | Path | dict | ExperimentConfig | None = None, overrides: list[str] = ()) -> FedMAResult:
    """FedMA on ``config``'s clients (every one of them), with its ``[fedma]`` keys (module docstring)."""
    from fedloom.builders import build_data, build_model_for, build_task_for, sized_to

    cfg = load_config(config, list(overrides))
    if cfg.client.weight_decay:
        raise FedMAError(f"FedMA freezes the matched layers; client.weight_decay = {cfg.client.weight_decay:g} "
                         "would still move them: set it to 0")
    data = build_data(cfg)
    cfg, f = sized_to(cfg, data), cfg.fedma
    template = build_model_for(cfg, data).cpu()
    m = Matching.of(template, data.client_sizes(), Prior(f.sigma, f.sigma0, f.gamma0, f.mu0), f.max_growth,
                    cfg.seed, f.iterations)
    retrain = partial(_train, cfg, data, m.layers)
    starts = client_starts(cfg, data, ParamSpec.of(template), template, list(range(data.n_clients)), f.same_init)
    states = retrain(template, states_of_rows(template, ParamSpec.of(template), starts), 0, 0)
    evaluate, task = Evaluator(template, data, build_task_for(cfg, data)), build_task_for(cfg, data)
    first, average, widths = [evaluate(s) for s in states], evaluate(mean_state(states)), m.widths()
    global_state, widths = layerwise(m, states, widths, 0, retrain)
    for r in range(1, f.rounds):  # FedMA with communication: every client trains the matched global model whole
        states = retrain(model_of(template, m.layers, widths), [global_state] * data.n_clients, 0, r * len(m.layers))
        global_state, widths = layerwise(m, states, widths, r, retrain)
    model = model_of(template, m.layers, widths)
    model.load_state_dict(global_state)
    return FedMAResult(first, average, Evaluator(model, data, task)(global_state), widths, model)


def _train(cfg: ExperimentConfig, data, layers: list[Layer], model: nn.Module, states: list[State],
           trainable_from: int, stage: int) -> list[State]:
    """Every client trains ``model`` from its state (the config's local training), the layers below
    ``trainable_from`` frozen; their state dicts after it."""
    from fedloom.builders import build_engine

    flat = ParamSpec.of(model)
    trainable = {layer.name for layer in layers[trainable_from:]}
    mask = torch.cat([torch.full((math.prod(shape),), float(name.rsplit(".", 1)[0] in trainable))
                      for name, shape in zip(flat.names, flat.shapes)])
    starts = torch.stack([torch.cat([s[n].reshape(-1).float() for n in flat.names]) for s in states])
    engine = build_engine(cfg, copy.deepcopy(model), data)
    result = engine.run_round(FrozenBelow(mask), starts, {}, list(range(data.n_clients)), stage + 1, ClientStore())
    return states_of_rows(model, flat, starts - result.U.to(starts))
