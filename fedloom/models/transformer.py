"""A small causal transformer language model: GPT-2 style (Radford et al. 2019,
"Language Models are Unsupervised Multitask Learners"), pre-LayerNorm blocks
over the attention of Vaswani et al. 2017, "Attention Is All You Need".

Attention is written with matmul, masked_fill and softmax rather than
nn.MultiheadAttention / scaled_dot_product_attention so that the model runs
under torch.func.vmap with functional_call (the vectorized engine); no dropout
and no buffers (the causal mask is made in the forward pass), for the same reason.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only the positions before it."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        # [B, T, 3D] -> three [B, heads, T, D / heads]
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x)) with a 4x GELU MLP."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d_model), CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, a final LayerNorm and a
    linear head: [B, T] int64 token ids -> [B, T, vocab] next-token logits."""

    def __init__(self, vocab: int, max_len: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        T = tokens.shape[-1]
        if T > self.max_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's max length {self.max_len}")
        x = self.tokens(tokens) + self.positions(torch.arange(T, device=tokens.device))
        return self.head(self.ln(self.blocks(x)))


def transformer(input_shape: tuple[int, ...], n_classes: int, d_model: int = 64, heads: int = 4,
                layers: int = 2) -> nn.Module:
    """A small GPT-style causal transformer (Radford et al. 2019); n_classes is the
    vocabulary, input_shape = (T,) the maximum sequence length."""
    if len(input_shape) != 1:
        raise ValueError(f"transformer takes token sequences [T], got shape {list(input_shape)}")
    if d_model < 1 or heads < 1 or layers < 1 or d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be a positive multiple of heads ({heads}), layers >= 1")
    return CausalTransformer(n_classes, input_shape[0], d_model, heads, layers)
