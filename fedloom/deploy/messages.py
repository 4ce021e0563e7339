"""Tensors to and from the wire: one header naming the buffers, then their raw
float32 bytes in chunks (docs/architecture.md: an update is a row, so bytes are exact).

Both directions use the same three pieces: ``describe`` writes the header's
buffer list, ``chunks`` cuts the bytes, ``Receiver`` puts them back together
into one preallocated buffer and refuses anything that does not fit it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from fedloom.core.local_optim import LOCAL_OPTIMIZERS
from fedloom.deploy import deploy_pb2 as pb
from fedloom.engines.base import LocalTraining

CHUNK_BYTES = 1 << 21  # data per message: well under gRPC's 4 MB default, large enough to amortise each call
HEADER_SLACK = 1 << 16  # room for a header beside a chunk in the receive limit
MAX_MESSAGE_BYTES = CHUNK_BYTES + HEADER_SLACK
DTYPE = "float32"
ITEM_BYTES = 4
FLOAT32_MAX = float(np.finfo(np.float32).max)  # header numbers are doubles on the wire, float32 in the round


class Refused(ValueError):
    """A message the receiver will not take; the text is the logged reason."""


def as_bytes(t: Tensor) -> memoryview:
    """The tensor's float32 bytes, without a copy when it is already contiguous float32."""
    return memoryview(t.detach().to(torch.float32).contiguous().reshape(-1).numpy()).cast("B")


def fits_float32(x: float) -> bool:
    """Finite, and still finite as the float32 the round holds it in."""
    return math.isfinite(x) and abs(x) <= FLOAT32_MAX


def describe(named: Sequence[tuple[str, Tensor]]) -> list[pb.Buffer]:
    """The wire buffers (name, dtype, length) announcing these named tensors."""
    return [pb.Buffer(name=name, dtype=DTYPE, length=t.numel()) for name, t in named]


def layout(buffers: Sequence[pb.Buffer]) -> list[tuple[str, str, int]]:
    """``(name, dtype, length)`` of each buffer, to compare a message's layout with the expected one."""
    return [(b.name, b.dtype, b.length) for b in buffers]


def chunks(named: Sequence[tuple[str, Tensor]], chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """The buffers' bytes in order, cut into views of at most ``chunk_bytes`` (sent as data messages
    by fedloom.deploy.codec.encode)."""
    for _, t in named:
        view = as_bytes(t)
        for start in range(0, len(view), chunk_bytes):
            yield view[start:start + chunk_bytes]


def byte_chunks(payload: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """Opaque bytes (a secure-aggregation message) cut into views of at most ``chunk_bytes``."""
    view = memoryview(payload)
    for start in range(0, len(view), chunk_bytes):
        yield view[start:start + chunk_bytes]


class ByteReceiver:
    """Gathers the ``length`` opaque bytes announced by a secure-aggregation header (at most ``limit``)."""

    def __init__(self, length: int, limit: int, chunk_bytes: int = CHUNK_BYTES):
        if length > limit:
            raise Refused(f"a secure-aggregation message of {length} bytes is over the {limit}-byte limit")
        self.length, self.data, self.chunk_bytes = length, bytearray(), chunk_bytes

    @property
    def complete(self) -> bool:
        """Whether every announced byte has arrived."""
        return len(self.data) == self.length

    def add(self, piece: bytes | memoryview) -> None:
        """Append one chunk; Refused past the announced length or over the chunk size."""
        if len(piece) > self.chunk_bytes or len(self.data) + len(piece) > self.length:
            raise Refused(f"more than the {self.length} bytes announced, or a chunk over {self.chunk_bytes} bytes")
        self.data += piece

    def tensors(self) -> bytes:
        """The message's bytes (named as Receiver's result, so both are read alike)."""
        return bytes(self.data)


class Receiver:
    """Writes the data announced by a header into ``into`` (a contiguous float32 vector of exactly
    that size; a fresh one by default) as it arrives, and refuses NaN and Inf as soon as they come."""

    def __init__(self, buffers: Sequence[pb.Buffer], into: Tensor | None = None, chunk_bytes: int = CHUNK_BYTES):
        wrong = [b.name for b in buffers if b.dtype != DTYPE]
        if wrong:
            raise Refused(f"buffers {wrong} are not {DTYPE}")
        self.layout = layout(buffers)
        total = sum(b.length for b in buffers)
        self.values = torch.empty(total) if into is None else into
        if self.values.numel() != total:
            raise Refused(f"the header announces {total} values, {self.values.numel()} are expected")
        self._floats = self.values.numpy()
        self._bytes = self._floats.view(np.uint8)
        self.filled = self.checked = 0  # bytes written, values checked
        self.chunk_bytes = chunk_bytes

    @property
    def complete(self) -> bool:
        """Every announced byte has arrived."""
        return self.filled == len(self._bytes)

    def add(self, piece: bytes | memoryview) -> None:
        """Write the next data chunk; Refused when it is over the chunk limit, past the announced size, or holds
        NaN or Inf."""
        if len(piece) > self.chunk_bytes:
            raise Refused(f"a data chunk of {len(piece)} bytes is over the {self.chunk_bytes}-byte limit")
        end = self.filled + len(piece)
        if end > len(self._bytes):
            raise Refused(f"more data than the header announced ({len(self._bytes)} bytes)")
        self._bytes[self.filled:end] = np.frombuffer(piece, dtype=np.uint8)
        self.filled = end
        whole = end // ITEM_BYTES
        if not np.isfinite(self._floats[self.checked:whole]).all():
            raise Refused(f"values {self.checked}..{whole - 1} hold NaN or Inf")
        self.checked = whole

    def tensors(self) -> dict[str, Tensor]:
        """Name -> 1-D view into the received values, once every announced byte has arrived."""
        if not self.complete:
            raise Refused(f"truncated: {self.filled} of the {len(self._bytes)} announced bytes arrived")
        return split(self.values, self.layout)


def split(values: Tensor, buffers: Sequence[tuple[str, str, int]]) -> dict[str, Tensor]:
    """Name -> the buffer's slice of the last dimension: of one message's values ``[total]``, or of
    a round's matrix ``[n, total]`` (then a column block, one row per client)."""
    return dict(zip([name for name, _, _ in buffers], torch.split(values, [n for _, _, n in buffers], dim=-1)))


def local_to_proto(local: LocalTraining) -> pb.LocalTraining:
    """The local training settings as the task message carries them."""
    name = next(k for k, cls in LOCAL_OPTIMIZERS.items() if isinstance(local.optimizer, cls))
    return pb.LocalTraining(optimizer=name, options=dataclasses.asdict(local.optimizer), epochs=local.epochs,
                            batch_size=local.batch_size, seed=local.seed, steps=local.steps or 0)


def local_from_proto(msg: pb.LocalTraining) -> LocalTraining:
    """The local-training settings of a task, from the registry's optimizers and their own fields only."""
    if msg.optimizer not in LOCAL_OPTIMIZERS:
        raise Refused(f"unknown local optimizer {msg.optimizer!r}; known: {', '.join(LOCAL_OPTIMIZERS)}")
    fields = {f.name for f in dataclasses.fields(LOCAL_OPTIMIZERS[msg.optimizer])}
    stray = sorted(set(msg.options) - fields)
    if stray:
        raise Refused(f"local optimizer {msg.optimizer!r} takes no option {', '.join(stray)} "
                      f"(its options: {', '.join(sorted(fields))})")
    return LocalTraining(LOCAL_OPTIMIZERS[msg.optimizer](**dict(msg.options)), msg.epochs, msg.batch_size, msg.seed,
                         msg.steps or None)


def result_tensors(row: Tensor, aux: dict[str, Tensor], state: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    """A client's answer as named buffers, in the one order both sides use: the row, aux tensors, new state."""
    return [("update", row), *[(f"aux/{k}", v) for k, v in aux.items()], *[(f"state/{k}", v) for k, v in state.items()]]


def prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The buffers named ``prefix/...``, under their names without it."""
    return {k.removeprefix(prefix + "/"): v for k, v in tensors.items() if k.startswith(prefix + "/")}
