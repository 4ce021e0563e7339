"""The reference models of LEAF (Caldas et al. 2018, "LEAF: A Benchmark for
Federated Settings"), as in its models/femnist/cnn.py and
models/shakespeare/stacked_lstm.py."""

from __future__ import annotations

import math

from torch import Tensor, nn


def femnist_cnn(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """LEAF's FEMNIST CNN: conv 5x5 32 'same' + ReLU + max-pool 2, conv 5x5 64
    'same' + ReLU + max-pool 2, dense 2048 + ReLU, dense to the classes; about
    6.6M parameters for 62 classes. Takes [1, 28, 28] or flat [784] (LEAF's own
    layout, reshaped to 28x28); other [C, H, W] sizes work too."""
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side != input_shape[0]:
            raise ValueError(f"femnist_cnn: flat input of {input_shape[0]} values is not a square image")
        image: tuple[int, ...] = (1, side, side)
        layers: list[nn.Module] = [nn.Unflatten(1, image)]
    elif len(input_shape) == 3:
        image, layers = input_shape, []
    else:
        raise ValueError(f"femnist_cnn needs [C, H, W] or flat square input, got shape {list(input_shape)}")
    channels, height, width = image
    layers += [
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (height // 4) * (width // 4), 2048), nn.ReLU(), nn.Linear(2048, n_classes),
    ]
    return nn.Sequential(*layers)


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: embedding of 8, 2-layer LSTM of 256, dense to the
    vocabulary. LEAF predicts only the character after the sequence (the last
    position); as a language model this one gives logits at every position
    ([B, T] int64 -> [B, T, vocabulary]), the last of which is LEAF's prediction.

    nn.LSTM has no vmap batching rule (torch 2.13), so this model trains on the
    serial engine only."""

    def __init__(self, vocab: int, embed: int = 8, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        return self.out(hidden)


def shakespeare_lstm(input_shape: tuple[int, ...], n_classes: int, embed: int = 8, hidden: int = 256,
                     layers: int = 2) -> nn.Module:
    """LEAF's Shakespeare character LSTM (Caldas et al. 2018); n_classes is the vocabulary."""
    if len(input_shape) != 1:
        raise ValueError(f"shakespeare_lstm takes token sequences [T], got shape {list(input_shape)}")
    return CharLSTM(n_classes, embed, hidden, layers)
