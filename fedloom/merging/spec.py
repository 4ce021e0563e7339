"""Permutation specs: which axes of which parameters a hidden unit's permutation acts on.

The "permutation spec" of Ainsworth, Hayase and Srinivasa 2023, "Git Re-Basin: Merging Models modulo
Permutation Symmetries": permuting a layer's output units, and the next layer's input axis the same way,
leaves the function unchanged. A permutation here may cover only a *segment* of an axis, because two
constraints tie units together:

- a residual stream is written by every block of a stage, so one permutation acts on all of them; a
  zero-padding shortcut (ResNet-20's option A) copies the previous stage's stream into the first channels,
  so those channels keep the previous stage's permutation and only the new ones get their own;
- GroupNorm normalizes groups of channels, so a permutation may only move channels within their group.

An axis is ``Axis(segments, inner)``: the axis holds ``length / inner`` units of ``inner`` entries each
(a linear layer after a flattened convolution sees every channel as height x width inputs), and each
segment is a permutation acting on a contiguous range of units. An alignment maps each permutation name to
a 1-D index (``aligned[i] = model[index[i]]``) or a 2-D matrix R (``aligned[i] = sum_j R[i, j] model[j]``,
optimal transport's soft alignment).

Specs are derived for fedloom's sequential MLPs and CNNs (``sequential_spec``) and given for the CIFAR
ResNets (``resnet_spec``); ``spec_for`` picks the right one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedloom.models.resnet import BasicBlock, CifarResNet, PadShortcut


class SpecError(ValueError):
    """No permutation spec can be derived for the model (the message names the module)."""


@dataclass(frozen=True)
class Segment:
    """One permutation ``perm`` acting on ``size`` units of an axis from unit ``start``."""

    perm: str
    start: int  # in units of the axis
    size: int


@dataclass(frozen=True)
class Axis:
    """A permuted axis: its segments and the entries per unit (``inner``)."""

    segments: tuple[Segment, ...]
    inner: int = 1  # entries per unit along the axis


@dataclass(frozen=True)
class Probe:
    """Where activation matching reads a permutation's units: the output of ``module`` (dimension 1),
    the channels ``start .. start + size``."""
    module: str
    start: int


@dataclass
class PermutationSpec:
    """A model's permutations (their sizes), the axes of each state-dict entry they act on, and where their
    activations are probed."""

    sizes: dict[str, int] = field(default_factory=dict)  # permutation -> units, from input to output
    axes: dict[str, dict[int, Axis]] = field(default_factory=dict)  # state-dict key -> permuted axes
    probes: dict[str, Probe] = field(default_factory=dict)

    def add(self, key: str, axis: int, spec: Axis) -> None:
        """Record that axis ``axis`` of the entry ``key`` is permuted as ``spec`` says."""
        self.axes.setdefault(key, {})[axis] = spec

    def uses(self, perm: str) -> list[tuple[str, int, Axis, Segment]]:
        """Every (key, axis, axis spec, segment) that ``perm`` acts on."""
        return [(key, axis, spec, seg) for key, axes in self.axes.items() for axis, spec in axes.items()
                for seg in spec.segments if seg.perm == perm]


Alignment = dict[str, Tensor]


def identity(spec: PermutationSpec) -> Alignment:
    """The alignment leaving every unit in place."""
    return {name: torch.arange(n) for name, n in spec.sizes.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator) -> Alignment:
    """A random permutation of each permutation's units, drawn from ``generator``."""
    return {name: torch.randperm(n, generator=generator) for name, n in spec.sizes.items()}


def align_axis(t: Tensor, axis: int, spec: Axis, alignment: Alignment) -> Tensor:
    """``t`` with the units of ``axis`` moved (an index) or mixed (a matrix) as ``alignment`` says."""
    units = t.shape[axis] // spec.inner
    t = t.unflatten(axis, (units, spec.inner))
    soft = any(alignment[s.perm].dim() == 2 for s in spec.segments)
    if soft:
        full = torch.eye(units, dtype=t.dtype, device=t.device)
        for s in spec.segments:
            full[s.start:s.start + s.size] = 0
            full[s.start:s.start + s.size, s.start:s.start + s.size] = _as_matrix(alignment[s.perm]).to(full)
        t = torch.movedim(torch.movedim(t, axis, -1) @ full.T, -1, axis)
    else:
        index = torch.arange(units)
        for s in spec.segments:
            index[s.start:s.start + s.size] = s.start + alignment[s.perm].cpu()
        t = t.index_select(axis, index.to(t.device))
    return t.flatten(axis, axis + 1)


def _as_matrix(a: Tensor) -> Tensor:
    return a if a.dim() == 2 else torch.eye(len(a))[a]


def apply(spec: PermutationSpec, state: dict[str, Tensor], alignment: Alignment,
          skip: tuple[str, int] | None = None) -> dict[str, Tensor]:
    """``state`` with every permuted axis aligned (``skip``: a (key, axis) left as it is). Keys the spec
    does not name (or the state lacks: a ParamSpec's dict has no buffers) pass through."""
    out = dict(state)
    for key, axes in spec.axes.items():
        if key not in out:
            continue
        t = out[key]
        for axis, axis_spec in axes.items():
            if (key, axis) != skip:
                t = align_axis(t, axis, axis_spec, alignment)
        out[key] = t
    return out


# ---- specs of fedloom's models -------------------------------------------------------------------

ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Identity, nn.Dropout,
               nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


def spec_for(model: nn.Module) -> PermutationSpec:
    """The model's permutation spec: given for the CIFAR ResNets, derived for sequential models."""
    spec = resnet_spec(model) if isinstance(model, CifarResNet) else sequential_spec(model)
    keys = model.state_dict().keys()
    spec.axes = {key: axes for key, axes in spec.axes.items() if key in keys}  # no conv bias under a norm
    return spec


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        children = list(module.children())
        if children and not isinstance(module, nn.Sequential):
            raise SpecError(f"cannot derive a permutation spec: module {name or 'the model'!r} "
                            f"({type(module).__name__}) is not nn.Sequential; only sequential models (mlp, cnn) "
                            "and the CIFAR ResNets have one")
    return [(n, m) for n, m in model.named_modules() if not list(m.children())]


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def sequential_spec(model: nn.Module) -> PermutationSpec:
    """Every hidden Linear/Conv2d layer's outputs are a permutation (named after the layer); the last
    weight layer's outputs are the model's and stay. Elementwise layers, pooling and BatchNorm follow the
    units; Flatten turns channels into blocks of inputs of the next Linear."""
    leaves = _leaves(model)
    weighted = [n for n, m in leaves if isinstance(m, (nn.Linear, nn.Conv2d))]
    spec, current, flattened = PermutationSpec(), None, False
    for name, module in leaves:
        p = _prefix(name)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if current is not None:
                fan_in = module.weight.shape[1]
                inner = fan_in // spec.sizes[current] if flattened else 1
                spec.add(p + "weight", 1, Axis((Segment(current, 0, spec.sizes[current]),), inner))
            current, flattened = (None if name == weighted[-1] else name), False
            if current is not None:
                spec.sizes[name] = module.weight.shape[0]
                whole = Axis((Segment(name, 0, module.weight.shape[0]),))
                spec.add(p + "weight", 0, whole)
                if module.bias is not None:
                    spec.add(p + "bias", 0, whole)
                spec.probes[name] = Probe(name, 0)  # pre-activations: a dead ReLU unit still correlates
        elif isinstance(module, nn.Flatten):
            flattened = True
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and current is not None:
            for key in NORM_KEYS:
                spec.add(p + key, 0, Axis((Segment(current, 0, spec.sizes[current]),)))
        elif not isinstance(module, ELEMENTWISE + (nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d)):
            raise SpecError(f"cannot derive a permutation spec: module {name!r} ({type(module).__name__}) is not "
                            "a Linear, Conv2d, Flatten, BatchNorm, pooling or elementwise layer")
    return spec


def _group_size(model: CifarResNet, width: int) -> int:
    norm = model.stem_norm
    return width // norm.num_groups if isinstance(norm, nn.GroupNorm) else width


def resnet_spec(model: CifarResNet) -> PermutationSpec:
    """The CIFAR ResNets: one permutation per stage's residual stream (channels copied by a padding
    shortcut keep the previous stage's), one inside each block, each split by GroupNorm's groups."""
    _check_shortcuts(list(model.blocks))
    spec = PermutationSpec()
    stream, blocks = _stream(spec, model, "stream0", 0, model.stem.weight.shape[0]), list(model.blocks)
    _conv_out(spec, "stem", "stem_norm", stream)
    spec.probes.update({s.perm: Probe("stem_norm", s.start) for s in stream.segments})
    for k, block in enumerate(blocks):
        width = block.conv2.weight.shape[0]
        if width != stream_width(stream):
            stream = _next_stream(spec, model, k, stream, width)
        inner = _stream(spec, model, f"blocks.{k}.inner", 0, width)
        spec.add(f"blocks.{k}.conv1.weight", 1, _input_stream(spec, k))
        _conv_out(spec, f"blocks.{k}.conv1", f"blocks.{k}.norm1", inner)
        spec.add(f"blocks.{k}.conv2.weight", 1, inner)
        _conv_out(spec, f"blocks.{k}.conv2", f"blocks.{k}.norm2", stream)
        spec.probes.update({s.perm: Probe(f"blocks.{k}.norm1", s.start) for s in inner.segments})
        for s in stream.segments:
            spec.probes[s.perm] = Probe(f"blocks.{k}", s.start)  # the latest block writing the stream
    spec.add("fc.weight", 1, stream)
    return spec


def stream_width(axis: Axis) -> int:
    """The units the axis's segments cover."""
    return sum(s.size for s in axis.segments)


def _stream(spec: PermutationSpec, model: CifarResNet, name: str, start: int, stop: int) -> Axis:
    group = _group_size(model, stop)  # a segment never crosses a normalization group's edge
    edges = sorted({start, stop, *range(group * (start // group + 1), stop, group)})
    segments = tuple(Segment(f"{name}/{i}", a, b - a) for i, (a, b) in enumerate(zip(edges, edges[1:])))
    spec.sizes.update({s.perm: s.size for s in segments})
    return Axis(segments)


def _next_stream(spec: PermutationSpec, model: CifarResNet, k: int, stream: Axis, width: int) -> Axis:
    """A wider stage: the padded shortcut keeps the old stream's channels in front, new ones follow."""
    fresh = _stream(spec, model, f"stream_{k}", stream_width(stream), width)
    return Axis(stream.segments + fresh.segments)


def _input_stream(spec: PermutationSpec, k: int) -> Axis:
    """The stream block k reads: the axis its previous block (or the stem) wrote."""
    source = f"blocks.{k - 1}.conv2.weight" if k else "stem.weight"
    return spec.axes[source][0]


def _conv_out(spec: PermutationSpec, conv: str, norm: str, axis: Axis) -> None:
    spec.add(f"{conv}.weight", 0, axis)
    spec.add(f"{conv}.bias", 0, axis)
    for key in NORM_KEYS:
        spec.add(f"{norm}.{key}", 0, axis)


def _check_shortcuts(blocks: list[BasicBlock]) -> None:
    for k, block in enumerate(blocks):
        if not isinstance(block.shortcut, (nn.Identity, PadShortcut)):
            raise SpecError(f"blocks.{k}: a projection shortcut (1x1 convolution) has no spec here yet; the "
                            "CIFAR ResNets with zero-padding shortcuts (resnet20) have one")
