"""Secure aggregation: SecAgg (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning") and SecAgg+ (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead"), honest-but-curious version, as explicit phases
that exchange bytes, so that a deployment can carry the same messages over its own transport.

    0 advertise keys  client -> server: two X25519 public keys (c: share encryption, s: masks)
                      server -> each client: its sharing group's keys (SecAgg: everyone's)
    1 share keys      client -> server: Shamir t-of-k shares of its self-mask seed b_u and of s_u's
                      secret key, one AES-GCM ciphertext per neighbour (server routes them)
    2 masked input    client -> server: y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^bits
    3 unmask          client -> server: for each neighbour v, the share of b_v if v sent y_v,
                      else the share of s_v's secret key; the server removes every mask

SecAgg's graph is complete (every client shares with every other); SecAgg+'s is a random
k-regular one (a circulant graph on a random permutation), so a client's cost grows with
log n instead of n. Primitives come from ``cryptography`` (X25519, HKDF-SHA256, AES-GCM,
ChaCha20 as the PRG) and Shamir sharing from pycryptodome (GF(2^128), 16-byte blocks).
Key material comes from the OS's CSPRNG on purpose (a key drawn from the run's seeded
streams would be known to anyone with the config); the unmasked sum does not depend on it,
so runs stay reproducible.

:class:`SecAggServer` only ever receives bytes: public keys, ciphertexts it cannot open,
masked vectors, and the shares survivors choose to reveal.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KEY_BYTES = 32
BLOCK = 16  # pycryptodome's Shamir shares 16-byte secrets
NONCE_BYTES = 12
SEED_BYTES = BLOCK  # the self-mask seed b_u: one Shamir block
ID = struct.Struct(">I")
SHARE_HEADER = struct.Struct(">IIH")  # sender, recipient, share index
REVEAL = struct.Struct(">IBH")  # whose secret, kind (0: b, 1: s key), share index
B_SHARE, S_SHARE = 0, 1
N_KEYS = 3  # public keys a client advertises: c (share encryption), s (masks), its Ed25519 verification key
ADVERT_BYTES = ID.size + N_KEYS * KEY_BYTES  # a client's id and its public keys
SIGNATURE_BYTES = 64  # Ed25519
SIGNED = b"fedloom-secagg consistency "  # what a client signs: this, then the survivor list it was sent
TAG_BYTES = 16  # AES-GCM's tag
SEALED_SHARE_BYTES = NONCE_BYTES + SHARE_HEADER.size + SEED_BYTES + KEY_BYTES + TAG_BYTES


class ProtocolAborted(Exception):
    """Too few clients left at some phase to reconstruct what the sum needs: the round fails."""


@dataclass(frozen=True)
class Params:
    """The public parameters of one aggregation: ring Z_{2^bits}, vector length, Shamir threshold
    (shares needed of a secret), SecAgg+'s neighbours per client (None: complete graph, SecAgg)."""

    bits: int
    dim: int
    threshold: int
    neighbours: int | None = None
    consistency: bool = False  # Bonawitz et al.'s consistency check before unmasking (malicious server)

    @property
    def mask(self) -> np.uint64:
        """The ring's modulus minus one, ``2^bits - 1``: reduces a uint64 modulo ``2^bits``."""
        return np.uint64((1 << self.bits) - 1)

    @property
    def dtype(self) -> np.dtype:
        """The big-endian unsigned integer type a masked vector is sent in (the smallest holding ``bits``)."""
        return np.dtype(">u2" if self.bits <= 16 else ">u4" if self.bits <= 32 else ">u8")  # bytes on the wire


# ---- primitives (wrappers over cryptography and pycryptodome) ----

def _kdf(secret: bytes, purpose: bytes) -> bytes:
    info = b"fedloom-secagg " + purpose  # one key per use of a secret
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def prg(seed: bytes, params: Params) -> np.ndarray:
    """``dim`` pseudorandom ring elements: ChaCha20's keystream under a key derived from ``seed``."""
    cipher = Cipher(algorithms.ChaCha20(_kdf(seed, b"prg"), bytes(16)), mode=None).encryptor()
    stream = cipher.update(bytes(8 * params.dim))
    return np.frombuffer(stream, dtype=np.uint64) & params.mask


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _agree(secret: X25519PrivateKey, public: bytes) -> bytes:
    return secret.exchange(X25519PublicKey.from_public_bytes(public))


def split_secret(secret: bytes, t: int, n: int) -> list[list[tuple[int, bytes]]]:
    """Shamir t-of-n shares of ``secret`` (a multiple of 16 bytes), block by block: ``[share j][block]``."""
    blocks = [Shamir.split(t, n, secret[i:i + BLOCK]) for i in range(0, len(secret), BLOCK)]
    return [[block[j] for block in blocks] for j in range(n)]


def combine_secret(shares: list[tuple[int, bytes]], t: int) -> bytes:
    """The secret from ``t`` shares (index, the concatenated blocks' shares)."""
    chosen = shares[:t]
    n_blocks = len(chosen[0][1]) // BLOCK
    return b"".join(Shamir.combine([(i, s[b * BLOCK:(b + 1) * BLOCK]) for i, s in chosen]) for b in range(n_blocks))


# ---- the sharing graph ----

def sharing_graph(ids: list[int], neighbours: int | None, seed: int) -> dict[int, list[int]]:
    """Each client's sharing group, itself included, sorted: everyone (SecAgg), or its ``neighbours``
    nearest on a circle of the clients in a random order drawn from ``seed`` (SecAgg+)."""
    ids = sorted(ids)
    if neighbours is None or neighbours >= len(ids) - 1:
        return {u: ids for u in ids}
    order = np.random.default_rng(seed).permutation(ids).tolist()
    n, half = len(order), neighbours // 2
    return {u: sorted({order[(i + o) % n] for o in range(-half, half + 1)}) for i, u in enumerate(order)}


# ---- messages ----

def _pack_ids(ids: list[int]) -> bytes:
    return ID.pack(len(ids)) + b"".join(ID.pack(i) for i in ids)


def _unpack_ids(data: bytes) -> list[int]:
    (n,) = ID.unpack_from(data)
    return [ID.unpack_from(data, 4 + 4 * i)[0] for i in range(n)]


def _pack_keys(keys: dict[int, tuple[bytes, ...]]) -> bytes:
    return ID.pack(len(keys)) + b"".join(ID.pack(u) + b"".join(k) for u, k in sorted(keys.items()))


def _split_keys(data: bytes, at: int) -> tuple[bytes, ...]:
    return tuple(data[at + i * KEY_BYTES:at + (i + 1) * KEY_BYTES] for i in range(N_KEYS))


def _unpack_keys(data: bytes) -> dict[int, tuple[bytes, ...]]:
    (n,) = ID.unpack_from(data)
    keys, at = {}, 4
    for _ in range(n):
        (u,) = ID.unpack_from(data, at)
        keys[u] = _split_keys(data, at + 4)
        at += ADVERT_BYTES
    return keys


def _pack_blobs(blobs: dict[int, bytes]) -> bytes:
    """id -> bytes, length-prefixed."""
    return b"".join(struct.pack(">II", k, len(v)) + v for k, v in sorted(blobs.items()))


def _unpack_blobs(data: bytes) -> dict[int, bytes]:
    """The blobs of _pack_blobs; a truncated or repeated entry is a ValueError (bytes from the wire)."""
    blobs, at = {}, 0
    while at < len(data):
        if at + 8 > len(data):
            raise ValueError(f"a truncated entry header at byte {at}")
        k, n = struct.unpack_from(">II", data, at)
        if k in blobs or at + 8 + n > len(data):
            raise ValueError(f"entry for {k} is {'repeated' if k in blobs else 'truncated'}")
        blobs[k] = data[at + 8:at + 8 + n]
        at += 8 + n
    return blobs


# ---- the client ----

@dataclass
class SecAggClient:
    """One client's side of one aggregation; its secrets never leave it except as encrypted shares."""

    id: int
    params: Params
    c_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    s_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    sign_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    b_seed: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES))
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    group: list[int] = field(default_factory=list)
    received: dict[int, bytes] = field(default_factory=dict)
    maskers: list[int] = field(default_factory=list)
    signed: bytes | None = None  # the survivor list this client signed in the consistency check

    def advertise(self) -> bytes:
        """The client's first message: its id, its two public keys (for encryption and for masks) and its
        Ed25519 verification key (for the consistency check)."""
        verify = self.sign_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return ID.pack(self.id) + _raw_public(self.c_key) + _raw_public(self.s_key) + verify

    def share_keys(self, group_keys: bytes) -> bytes:
        """Shares of b_u and s_u's key, each encrypted for its recipient in u's sharing group (the clients
        whose keys the server sent u: u and its neighbours)."""
        self.keys = _unpack_keys(group_keys)
        self.group = sorted(self.keys)
        if len(self.group) < self.params.threshold:
            raise ProtocolAborted(f"client {self.id}: {len(self.group)} in its group, "
                                  f"threshold {self.params.threshold}")
        shares = split_secret(self.b_seed + _raw_private(self.s_key), self.params.threshold, len(self.group))
        out = {}
        for v, share in zip(self.group, shares):
            index, blocks = share[0][0], b"".join(s for _, s in share)
            out[v] = self._encrypt(v, SHARE_HEADER.pack(self.id, v, index) + blocks)
        return _pack_blobs(out)

    def masked_input(self, routed: bytes, x: np.ndarray) -> bytes:
        """y_u = x_u + PRG(b_u) + sum over neighbours v that shared keys of sign(u, v) PRG(s_uv), mod 2^bits."""
        self.received = _unpack_blobs(routed)
        self.maskers = sorted(self.received)  # the group's members that reached phase 1
        y = (x.astype(np.uint64) + prg(self.b_seed, self.params)) & self.params.mask
        for v in self.maskers:
            if v != self.id:
                y = _add_pair_mask(y, self.id, v, _agree(self.s_key, self.keys[v][1]), self.params)
        return y.astype(self.params.dtype).tobytes()

    def consistency(self, survivors: bytes) -> bytes:
        """Sign the survivor list U3 the server sent, unless it is below the threshold or names clients that
        never shared keys with this one (Bonawitz et al. 2017, the consistency check)."""
        ids = _unpack_ids(survivors)
        if len(ids) < self.params.threshold or not set(ids) <= set(self.maskers) or len(set(ids)) != len(ids):
            raise ProtocolAborted(f"client {self.id}: the survivor list {ids} is below the threshold "
                                  f"{self.params.threshold} or names clients outside its group")
        self.signed = survivors
        return self.sign_key.sign(SIGNED + survivors)

    def unmask(self, incoming: bytes) -> bytes:
        """The share of b_v for each v that sent y_v, of s_v's key for each v that shared keys and did not.
        ``incoming``: the survivor list; with the consistency check, the survivors' signatures of the list
        this client signed, every one checked first (abort on a bad one or fewer than t)."""
        survivors = self._verified(incoming) if self.params.consistency else incoming
        sent_input = set(_unpack_ids(survivors))
        reveals = []
        for v in self.maskers:
            sender, recipient, index = SHARE_HEADER.unpack_from(plain := self._decrypt(v, self.received[v]))
            if (sender, recipient) != (v, self.id):
                raise ValueError(f"client {self.id}: a share from {v} is addressed {sender} -> {recipient}")
            blocks = plain[SHARE_HEADER.size:]
            kind, secret = (B_SHARE, blocks[:SEED_BYTES]) if v in sent_input else (S_SHARE, blocks[SEED_BYTES:])
            reveals.append(REVEAL.pack(v, kind, index) + secret)
        return b"".join(reveals)

    def _verified(self, signatures: bytes) -> bytes:
        """The list this client signed, once the signatures (of its group's members) show every signer was
        sent the same list; a client of SecAgg+ can check only its neighbours' signatures."""
        if self.signed is None:
            raise ProtocolAborted(f"client {self.id}: asked to unmask before the consistency check")
        blobs = _unpack_blobs(signatures)
        if len(blobs) < self.params.threshold or not set(blobs) <= set(_unpack_ids(self.signed)):
            raise ProtocolAborted(f"client {self.id}: {len(blobs)} signatures of the survivor list, from "
                                  f"{sorted(blobs)}: fewer than {self.params.threshold} or not survivors")
        for v, signature in blobs.items():
            if v in self.keys:
                try:
                    Ed25519PublicKey.from_public_bytes(self.keys[v][2]).verify(signature, SIGNED + self.signed)
                except InvalidSignature:
                    raise ProtocolAborted(f"client {self.id}: client {v}'s signature is not of the survivor "
                                          "list this client was sent (the server sent different lists)") from None
        return self.signed

    def _cipher(self, v: int) -> AESGCM:
        return AESGCM(_kdf(_agree(self.c_key, self.keys[v][0]), b"share encryption"))

    def _encrypt(self, v: int, plain: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._cipher(v).encrypt(nonce, plain, ID.pack(self.id) + ID.pack(v))

    def _decrypt(self, v: int, blob: bytes) -> bytes:
        return self._cipher(v).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ID.pack(v) + ID.pack(self.id))


def _add_pair_mask(y: np.ndarray, u: int, v: int, shared: bytes, params: Params, sign: int = 1) -> np.ndarray:
    """Add u's mask for pair (u, v) (``sign`` -1: remove it): +PRG(s_uv) when u < v, -PRG(s_uv) when u > v,
    so the pair's two masks cancel in the sum."""
    mask = prg(shared, params)
    return ((y + mask) if (u < v) == (sign > 0) else (y - mask)) & params.mask


# ---- the server ----

@dataclass
class SecAggServer:
    """The server's side: it routes ciphertexts, adds masked vectors and removes the masks from what
    the survivors reveal. It holds only bytes the clients sent it, and never an individual input."""

    params: Params
    graph_seed: int
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    graph: dict[int, list[int]] = field(default_factory=dict)
    shared: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> recipient -> ciphertext
    total: np.ndarray | None = None
    sent_input: list[int] = field(default_factory=list)

    def collect_keys(self, messages: list[bytes]) -> dict[int, bytes]:
        """Each client's sharing group's public keys (its own included)."""
        for m in messages:
            (u,) = ID.unpack_from(m)
            self.keys[u] = _split_keys(m, ID.size)
        self._enough(len(self.keys), "advertised keys")
        self.graph = sharing_graph(list(self.keys), self.params.neighbours, self.graph_seed)
        return {u: _pack_keys({v: self.keys[v] for v in group}) for u, group in self.graph.items()}

    def route_shares(self, messages: dict[int, bytes]) -> dict[int, bytes]:
        """Each recipient's ciphertexts, from the senders of phase 1 only."""
        self.shared = {u: _unpack_blobs(m) for u, m in messages.items()}
        self._enough(len(self.shared), "shared keys")
        inbox: dict[int, dict[int, bytes]] = {v: {} for v in self.shared}
        for u, blobs in self.shared.items():
            for v, blob in blobs.items():
                if v in inbox:
                    inbox[v][u] = blob
        return {v: _pack_blobs(blobs) for v, blobs in inbox.items()}

    def collect_masked(self, messages: dict[int, bytes]) -> bytes:
        """The masked vectors' sum; the list of who sent one goes back to the survivors."""
        self.sent_input = sorted(messages)
        self._enough(len(self.sent_input), "masked inputs")
        total = np.zeros(self.params.dim, dtype=np.uint64)
        for m in messages.values():
            total = (total + np.frombuffer(m, dtype=self.params.dtype).astype(np.uint64)) & self.params.mask
        self.total = total
        return _pack_ids(self.sent_input)

    def collect_signatures(self, messages: dict[int, bytes]) -> bytes:
        """The survivors' signatures of the list, forwarded to each of them (the consistency check)."""
        self._enough(len(messages), "signatures of the survivor list")
        return _pack_blobs(messages)

    def unmask(self, messages: dict[int, bytes]) -> np.ndarray:
        """The sum of the inputs of the clients that sent y_u, mod 2^bits."""
        self._enough(len(messages), "unmasking responses")
        shares = _revealed(messages)
        total = self.total
        for v in self.sent_input:
            total = (total - prg(self._reconstruct(shares, v, B_SHARE), self.params)) & self.params.mask
        for v in sorted(set(self.shared) - set(self.sent_input)):
            s_key = X25519PrivateKey.from_private_bytes(self._reconstruct(shares, v, S_SHARE))
            for u in self.graph[v]:  # v sent its group shares, so each of them that sent y_u masked with v
                if u != v and u in self.sent_input:
                    total = _add_pair_mask(total, u, v, _agree(s_key, self.keys[u][1]), self.params, sign=-1)
        return total

    def max_bytes(self, phase: str, u: int) -> int:
        """The most bytes client ``u``'s message of ``phase`` may hold (checked before it is received)."""
        group = len(self.graph.get(u, ())) or 1
        return {"advertise": ADVERT_BYTES, "share_keys": group * (8 + SEALED_SHARE_BYTES),
                "masked_input": self.params.dim * self.params.dtype.itemsize, "consistency": SIGNATURE_BYTES,
                "unmask": group * (REVEAL.size + KEY_BYTES)}[phase]

    def check(self, phase: str, u: int, message: bytes) -> None:
        """A ValueError saying what is wrong with client ``u``'s message of ``phase``, if anything: the
        server takes only well-formed messages, from the clients and about the secrets each may send."""
        if phase == "advertise":
            if len(message) != ADVERT_BYTES or ID.unpack_from(message)[0] != u:
                raise ValueError(f"expected {ADVERT_BYTES} bytes starting with its id {u}")
        elif phase == "share_keys":
            blobs = _unpack_blobs(message)
            if sorted(blobs) != self.graph[u] or any(len(b) != SEALED_SHARE_BYTES for b in blobs.values()):
                raise ValueError(f"expected one {SEALED_SHARE_BYTES}-byte share for each of {self.graph[u]}")
        elif phase in ("masked_input", "consistency"):
            if len(message) != self.max_bytes(phase, u):
                raise ValueError(f"expected {self.max_bytes(phase, u)} bytes")
        else:
            self._check_reveals(u, message)

    def _check_reveals(self, u: int, message: bytes) -> None:
        """One share for each group member that shared keys: of b_v if v sent y_v, else of s_v's key."""
        owed = {v: B_SHARE if v in self.sent_input else S_SHARE for v in self.graph[u] if v in self.shared}
        got = {}
        for v, kind, _ in _reveal_entries(message):
            if owed.get(v) != kind or v in got:
                raise ValueError(f"a share of client {v}'s {'seed' if kind == B_SHARE else 'key'} is not one "
                                 f"it may reveal (owed: {owed})")
            got[v] = kind
        if got != owed:
            raise ValueError(f"shares missing for {sorted(set(owed) - set(got))}")

    def _reconstruct(self, shares: dict[tuple[int, int], list[tuple[int, bytes]]], v: int, kind: int) -> bytes:
        got = shares.get((v, kind), [])
        if len(got) < self.params.threshold:
            what = "self-mask seed" if kind == B_SHARE else "mask key"
            raise ProtocolAborted(f"{len(got)} shares of client {v}'s {what} survived, threshold "
                                  f"{self.params.threshold}")
        try:
            return combine_secret(got, self.params.threshold)
        except ValueError as err:  # e.g. two shares of one index, revealed by a client that lies
            raise ProtocolAborted(f"the shares of client {v}'s secret do not combine ({err})") from None

    def _enough(self, n: int, what: str) -> None:
        if n < self.params.threshold:
            raise ProtocolAborted(f"{n} clients {what}, fewer than the threshold {self.params.threshold}")


def _reveal_entries(m: bytes):
    """(whose secret, kind, (share index, its bytes)) for each share in one unmasking response; a
    truncated entry or an unknown kind is a ValueError."""
    at = 0
    while at < len(m):
        if at + REVEAL.size > len(m):
            raise ValueError(f"a truncated share header at byte {at}")
        v, kind, index = REVEAL.unpack_from(m, at)
        if kind not in (B_SHARE, S_SHARE):
            raise ValueError(f"share kind {kind} at byte {at} is neither {B_SHARE} (seed) nor {S_SHARE} (key)")
        size = SEED_BYTES if kind == B_SHARE else KEY_BYTES
        if at + REVEAL.size + size > len(m):
            raise ValueError(f"a truncated share at byte {at}")
        yield v, kind, (index, m[at + REVEAL.size:at + REVEAL.size + size])
        at += REVEAL.size + size


def _revealed(messages: dict[int, bytes]) -> dict[tuple[int, int], list[tuple[int, bytes]]]:
    """(whose secret, kind) -> the revealed shares (index, blocks)."""
    shares: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
    for m in messages.values():
        for v, kind, share in _reveal_entries(m):
            shares.setdefault((v, kind), []).append(share)
    return shares
