"""CIFAR ResNets: ResNet-20 (He et al. 2016, "Deep Residual Learning for Image
Recognition", section 4.2) and the CIFAR variant of ResNet-18.

The normalization defaults to GroupNorm with 2 groups, as in Hsieh et al. 2020,
"The Non-IID Data Quagmire of Decentralized Machine Learning": BatchNorm's running
statistics are buffers (the vectorized engine refuses them) and its batch
statistics mix poorly across non-IID clients. ``norm="batch"`` is there for the
serial engine; ``norm="none"`` gives the convolutions biases instead.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["group", "batch", "none"]


def norm_layer(norm: Norm, groups: int) -> Callable[[int], nn.Module]:
    """A factory ``channels -> normalization layer`` for the ``norm`` option."""
    if norm == "group":
        if groups < 1:
            raise ValueError(f"groups must be at least 1, got {groups}")
        return lambda channels: nn.GroupNorm(groups, channels)
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"norm must be 'group', 'batch' or 'none', got {norm!r}")


def conv3x3(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Conv2d:
    """A 3x3 convolution with padding 1."""
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by the stride and zero-pad the new channels,
    no parameters (what section 4.2 uses for the CIFAR ResNets)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.extra, self.stride = c_out - c_in, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[..., ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # pads dim -3, the channels


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection. Where the shape changes the
    shortcut is either ``"pad"`` (option A) or ``"conv"`` (option B: a 1x1
    convolution and normalization)."""

    def __init__(self, c_in: int, c_out: int, stride: int, make_norm: Callable[[int], nn.Module],
                 bias: bool, shortcut: Literal["pad", "conv"]):
        super().__init__()
        self.conv1, self.norm1 = conv3x3(c_in, c_out, stride, bias), make_norm(c_out)
        self.conv2, self.norm2 = conv3x3(c_out, c_out, 1, bias), make_norm(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = PadShortcut(c_in, c_out, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), make_norm(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, stages of basic blocks (the first block of each later stage halves
    the resolution), global average pooling, one linear layer. No max-pool: CIFAR's
    32x32 images are small already."""

    def __init__(self, in_channels: int, n_classes: int, widths: tuple[int, ...], blocks: int,
                 norm: Norm, groups: int, shortcut: Literal["pad", "conv"]):
        super().__init__()
        make_norm = norm_layer(norm, groups)
        if norm == "group":
            bad = [w for w in widths if w % groups]
            if bad:
                raise ValueError(f"groups = {groups} does not divide the channel counts {bad}")
        bias = norm == "none"  # a normalization layer's shift makes a conv bias redundant
        self.stem = conv3x3(in_channels, widths[0], 1, bias)
        self.stem_norm = make_norm(widths[0])
        layers, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(c_in, width, stride, make_norm, bias, shortcut))
                c_in = width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.stem_norm(self.stem(x))))
        return self.fc(x.mean(dim=(-2, -1)))  # global average pool over any input size


def _channels(name: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image input [channels, height, width], got shape {list(input_shape)}")
    return input_shape[0]


def resnet20(input_shape: tuple[int, ...], n_classes: int, norm: Norm = "group", groups: int = 2) -> nn.Module:
    """ResNet-20 of He et al. 2016 section 4.2 (n = 3): 3 stages of 3 basic blocks,
    16/32/64 channels, option-A (zero-padding) shortcuts; about 0.27M parameters."""
    return CifarResNet(_channels("resnet20", input_shape), n_classes, (16, 32, 64), 3, norm, groups, "pad")


def resnet18(input_shape: tuple[int, ...], n_classes: int, norm: Norm = "group", groups: int = 2) -> nn.Module:
    """ResNet-18 (He et al. 2016) in its CIFAR variant: 3x3 stem, no max-pool, 4
    stages of 2 basic blocks, 64/128/256/512 channels, 1x1 projection shortcuts
    (option B) where the shape changes; about 11.2M parameters."""
    return CifarResNet(_channels("resnet18", input_shape), n_classes, (64, 128, 256, 512), 2, norm, groups, "conv")
