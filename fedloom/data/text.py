"""Text as next-token data: a tokenizer turns text into ids, and windows of ``seq_len + 1`` ids cut
from them are one example each (inputs, and the targets one token later).

Tokenizers: ``"char"`` (the characters of the training text and the newline that joins rows, sorted,
plus ``<unk>`` for characters only other text has), ``"leaf"`` (LEAF's 80 Shakespeare characters, :data:`fedloom.data.leaf.VOCABULARY`),
or the path of a Hugging Face ``tokenizer.json`` (read with the ``tokenizers`` package, offline).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .datasets import DataError
from .leaf import VOCABULARY, encode

UNKNOWN_TOKEN = "<unk>"
TOKENIZERS = ('"char" (the training text\'s characters)', '"leaf" (LEAF\'s 80 characters)',
              "the path of a Hugging Face tokenizer.json")


@dataclass(frozen=True)
class Tokenizer:
    """A vocabulary (token id -> token) and the function turning text into int64 token ids."""

    vocabulary: tuple[str, ...]  # token id -> token
    encode: Callable[[str], np.ndarray]  # text -> int64 token ids


def windows(ids: np.ndarray, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ids[s : s + seq_len] and targets one token later, for s = 0, stride, ... (whole windows)."""
    if len(ids) <= seq_len:
        return np.empty((0, seq_len), np.int64), np.empty((0, seq_len), np.int64)
    view = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[::stride]
    return view[:, :-1], view[:, 1:]


def tokenizer_for(spec: str | Path, training_text: list[str], where: str) -> Tokenizer:
    """The tokenizer ``spec`` names; "char" takes its characters from ``training_text``."""
    if spec == "leaf":
        return Tokenizer(VOCABULARY, encode)
    if spec == "char":
        return _characters(training_text)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"{where}: tokenizer {str(spec)!r} is neither a known tokenizer nor a file; "
                        f"tokenizer is {', '.join(TOKENIZERS)}")
    return _hugging_face(path)


def _characters(texts: list[str]) -> Tokenizer:
    chars = sorted(set("\n").union(*map(set, texts)))  # a newline joins rows
    lookup = {c: i for i, c in enumerate(chars)}
    unknown = len(chars)

    def encode_chars(text: str) -> np.ndarray:
        return np.fromiter((lookup.get(c, unknown) for c in text), np.int64, len(text))

    return Tokenizer((*chars, UNKNOWN_TOKEN), encode_chars)


def _hugging_face(path: Path) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as HfTokenizer
    except ImportError:
        raise DataError(f"tokenizer {path} needs the optional package 'tokenizers': pip install fedloom[hf]") from None
    try:
        loaded = HfTokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises its own exception type for a bad file
        raise DataError(f"{path}: not a Hugging Face tokenizer.json ({err})") from None
    by_id = sorted(loaded.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise DataError(f"{path}: the tokenizer's ids are not 0..{len(by_id) - 1}")

    def encode_tokens(text: str) -> np.ndarray:
        return np.asarray(loaded.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    return Tokenizer(tuple(token for token, _ in by_id), encode_tokens)


def text_windows(texts: list[str], owners: np.ndarray | None, tokenizer: Tokenizer, seq_len: int,
                 stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Each owner's texts, in their order, tokenized as one stream and cut into windows: inputs,
    targets and each window's owner (None without owners: all the text is one stream)."""
    if owners is None:
        x, y = windows(tokenizer.encode("\n".join(texts)), seq_len, stride)
        return x, y, None
    order = np.argsort(owners, kind="stable")  # each owner's texts together, in their own order
    ids, first = np.unique(owners[order], return_index=True)
    streams = [tokenizer.encode("\n".join(texts[i] for i in part)) for part in np.split(order, first[1:])]
    cut = [windows(stream, seq_len, stride) for stream in streams]
    groups = np.repeat(ids, [len(x) for x, _ in cut])
    return np.concatenate([x for x, _ in cut]), np.concatenate([y for _, y in cut]), groups
