"""Who may talk to the server: a token per client id, and TLS for the channel.

Tokens live in a file the operator writes, one ``client_id token`` pair a line
(``#`` starts a comment). They are compared in constant time. :class:`Gate`
checks them from a call's metadata before the call gets a worker thread, so a
caller without a token never holds one. TLS uses gRPC's own credentials; giving
the server a client CA turns on mutual TLS. Without TLS the server listens only
on a loopback address unless the operator says ``--insecure``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedloom.deploy import MAX_CLIENT_ID, MAX_ID_DIGITS, is_client_id

log = logging.getLogger("fedloom.deploy")

CLIENT_ID_KEY = "x-fedloom-client-id"
TOKEN_KEY = "x-fedloom-token"
CALLS_PER_CLIENT = 3  # a subscription and a submission, and room for one replacing a broken one


class SecurityError(ValueError):
    """A tokens or certificate file that cannot be used; the message names it."""


def read_tokens(path: str | Path) -> dict[int, str]:
    """The tokens file: one ``client_id token`` per line (``#`` comments); SecurityError naming the file and line
    of a bad entry."""
    path = Path(path)
    if not path.is_file():
        raise SecurityError(f"tokens file not found: {path}")
    tokens: dict[int, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not is_client_id(parts[0]):
            raise SecurityError(f"{path}:{number}: expected 'client_id token' (an integer id 0..{MAX_CLIENT_ID} "
                                "and one word)")
        client_id = int(parts[0])
        if client_id in tokens:
            raise SecurityError(f"{path}:{number}: client {client_id} has a token already")
        tokens[client_id] = parts[1]
    if not tokens:
        raise SecurityError(f"{path}: no tokens; write one 'client_id token' line per client")
    return tokens


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused: the gRPC status code and the reason sent to the client."""

    code: grpc.StatusCode
    reason: str


WRONG_TOKEN = Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown client id or wrong token")


def authenticate(tokens: dict[int, str], metadata) -> int | Refusal:
    """The client id whose token the call carries, or why the call is refused."""
    values = dict(metadata or ())
    raw_id, token = values.get(CLIENT_ID_KEY, ""), values.get(TOKEN_KEY, "")
    if not (isinstance(raw_id, str) and isinstance(token, str)):
        return WRONG_TOKEN
    if raw_id and not is_client_id(raw_id):
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f"{CLIENT_ID_KEY} must be an integer 0..{MAX_CLIENT_ID}, got {raw_id[:MAX_ID_DIGITS + 1]!r}"
                       + ("..." if len(raw_id) > MAX_ID_DIGITS + 1 else ""))
    expected = tokens.get(int(raw_id)) if raw_id else None
    if expected is None or not hmac.compare_digest(expected.encode(), token.encode()):
        return WRONG_TOKEN
    return int(raw_id)


def _refuse(refusal: Refusal) -> grpc.RpcMethodHandler:
    """A handler that ends the call at once: a stream handler, so gRPC does not first wait for a
    request message that an attacker need never send."""

    def abort(_requests, context):
        log.warning("refused a call from %s: %s", context.peer(), refusal.reason)
        context.abort(refusal.code, refusal.reason)

    return grpc.stream_stream_rpc_method_handler(abort)


HANDLER_KINDS = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary",
                 (True, True): "stream_stream"}  # (request streaming, response streaming) -> the handler's field


class Gate(grpc.ServerInterceptor):
    """Authenticates every call from its metadata, which gRPC has before it picks a handler, and
    allows a client at most ``per_client`` calls at once: neither a stranger nor one token holder
    can take the worker threads the other clients need."""

    def __init__(self, tokens: dict[int, str], per_client: int = CALLS_PER_CLIENT):
        self.tokens = tokens
        self.per_client = per_client
        self._open: Counter[int] = Counter()
        self._lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        verdict = authenticate(self.tokens, handler_call_details.invocation_metadata)
        if isinstance(verdict, Refusal):
            return _refuse(verdict)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if not self._enter(verdict):
            return _refuse(Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"client {verdict} has {self.per_client} calls open already"))
        return self._counted(handler, verdict)

    def _enter(self, client_id: int) -> bool:
        with self._lock:
            if self._open[client_id] >= self.per_client:
                return False
            self._open[client_id] += 1
            return True

    def _leave(self, client_id: int) -> None:
        with self._lock:
            self._open[client_id] -= 1

    def _counted(self, handler: grpc.RpcMethodHandler, client_id: int) -> grpc.RpcMethodHandler:
        """The handler, giving the client's place back when its call ends however it ends."""
        kind = HANDLER_KINDS[handler.request_streaming, handler.response_streaming]
        behaviour = getattr(handler, kind)

        def counted(request, context):
            if not context.add_callback(lambda: self._leave(client_id)):
                self._leave(client_id)
            return behaviour(request, context)

        return handler._replace(**{kind: counted})


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_plaintext_network(address: str, tls: ServerTLS | None, insecure: bool) -> None:
    """Without TLS tokens and models cross the network readable and forgeable: only on loopback,
    or when the operator says so."""
    if tls is None and not insecure and not is_loopback(address):
        raise SecurityError(f"--address {address} is reachable from other machines and TLS is off: tokens and "
                            "models would cross the network in the clear; give --tls-cert and --tls-key, listen on "
                            "127.0.0.1, or pass --insecure to accept that")


def tls_mismatch(address: str, tls_on: bool, timeout_s: float = 5.0) -> str | None:
    """Why a server that takes TCP connections at ``address`` does not answer: it speaks TLS and
    this client does not, or the reverse; None when that is not the reason."""
    host, _, port = address.rpartition(":")
    try:
        raw = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    except (OSError, ValueError):
        return None  # nobody listens, or not a host:port: not a TLS question
    probe = ssl.create_default_context()
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE  # only asks whether TLS is spoken; sends nothing
    with raw:
        try:
            with probe.wrap_socket(raw, server_hostname=host.strip("[]")):
                speaks_tls = True
        except (ssl.SSLError, OSError):
            speaks_tls = False
    if speaks_tls and not tls_on:
        return f"the server at {address} speaks TLS and this client does not: give --tls-ca (the CA of its certificate)"
    if tls_on and not speaks_tls:
        return (f"the server at {address} does not speak TLS (it runs without --tls-cert) and this client does: "
                "drop --tls-ca, --tls-cert and --tls-key, or start the server with TLS")
    return None


def call_metadata(client_id: int, token: str) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata a client sends to authenticate: its id and token."""
    return (CLIENT_ID_KEY, str(client_id)), (TOKEN_KEY, token)


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise SecurityError(f"{what} file not found: {path}")
    return path.read_bytes()


@dataclass(frozen=True)
class ServerTLS:
    """The server's TLS certificate and key, and the CA whose client certificates it requires (mutual TLS)."""

    cert: str | Path
    key: str | Path
    client_ca: str | Path | None = None  # set: clients must show a certificate it signed (mutual TLS)

    def credentials(self) -> grpc.ServerCredentials:
        """The gRPC server credentials; SecurityError naming a file that cannot be read."""
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        ca = _read(self.client_ca, "client CA")
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientTLS:
    """The client's TLS settings: the CA that signed the server's certificate and, for mutual TLS, its own
    certificate and key."""

    ca: str | Path | None = None  # the CA that signed the server's certificate (None: the system's roots)
    cert: str | Path | None = None  # this client's certificate and key, for mutual TLS
    key: str | Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials; SecurityError when only one of cert and key is given or a file is
        unreadable."""
        if (self.cert is None) != (self.key is None):
            raise SecurityError("mutual TLS needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(_read(self.ca, "TLS CA"), _read(self.key, "TLS key"),
                                            _read(self.cert, "TLS certificate"))
