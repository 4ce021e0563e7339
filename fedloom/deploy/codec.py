"""gRPC (de)serializers with a fast path for data chunks; the bytes on the wire stay plain protobuf.

A chunk message holds only its ``data`` field (number 2 in both ClientMessage and
ServerMessage), so its protobuf encoding is one tag byte, the payload length as a
varint, and the payload. Building and reading that directly copies a payload once;
protobuf's Python path copies it three times on each side (slice, message, serialize;
parse, field access, destination), which at 10^7 parameters costs more than the
network. Any other message goes through protobuf, so stock protobuf clients interoperate.
Bytes that do not parse reach the servicer as :class:`Malformed`, to be refused with a
logged reason (gRPC's own abort on a failed parse can also leave a call that blocks
``server.stop``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)


@dataclass(frozen=True)
class Data:
    """A chunk as received: its payload (a view, not a copy) and its size on the wire."""

    payload: memoryview
    size: int


@dataclass(frozen=True)
class Malformed:
    """Bytes that did not parse as a message: their size and the parser's error, for the servicer to refuse."""

    size: int
    error: str


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None if ``raw`` ends first or the varint is over 10 bytes."""
    value = shift = 0
    for i in range(pos, min(len(raw), pos + 10)):
        value |= (raw[i] & 0x7F) << shift
        shift += 7
        if not raw[i] & 0x80:
            return value, i + 1
    return None


def encoded_size(piece: memoryview | bytes) -> int:
    """Bytes on the wire of a chunk message holding ``piece``."""
    return 1 + len(_varint(len(piece))) + len(piece)


def encode(msg: Message | memoryview | bytes) -> bytes:
    """Serializer: a protobuf message as usual, a raw chunk as a data-only message (one copy)."""
    if isinstance(msg, Message):
        return msg.SerializeToString()
    return b"".join((bytes((DATA_TAG,)), _varint(len(msg)), msg))


def decoder(parse: Callable[[bytes], Message]) -> Callable[[bytes], Message | Data | Malformed]:
    """Deserializer: a data-only message as Data (no copy), else the parsed message, else Malformed."""

    def decode(raw: bytes) -> Message | Data | Malformed:
        if raw[:1] == bytes((DATA_TAG,)):
            header = _read_varint(raw, 1)
            if header is not None and header[1] + header[0] == len(raw):
                return Data(memoryview(raw)[header[1]:], len(raw))
        try:
            return parse(raw)
        except DecodeError as err:
            return Malformed(len(raw), str(err))

    return decode
