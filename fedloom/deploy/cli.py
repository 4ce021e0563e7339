"""The ``server`` and ``client`` subcommands; fedloom.cli adds them with ``add_commands``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


DEFAULT_ADDRESS = "127.0.0.1:8080"


def _server(args: argparse.Namespace) -> int:
    from fedloom.deploy.security import ServerTLS, read_tokens, refuse_plaintext_network
    from fedloom.deploy.server import serve

    if args.resume and (args.config or args.set):
        raise SystemExit("fedloom server: --resume continues with the run directory's own config; "
                         "drop --config and --set")
    tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert or args.tls_key else None
    if tls and not (args.tls_cert and args.tls_key):
        raise SystemExit("fedloom server: TLS needs both --tls-cert and --tls-key")
    refuse_plaintext_network(args.address, tls, args.insecure)
    overrides = [*(args.set or []), *deploy_overrides(args)]
    result = serve(args.config, args.address, read_tokens(args.tokens), tls, args.resume, overrides)
    print(f"run directory: {result.run_dir}")
    return 0 if result.summary["status"] == "completed" else 130


def deploy_overrides(args: argparse.Namespace) -> list[str]:
    """The [deploy] keys given as flags, as config overrides: a flag wins over the config (and over the
    run directory's config on --resume), an absent flag leaves it alone."""
    flags = {"min_clients": args.min_clients, "round_timeout_s": args.round_timeout}
    return [f"deploy.{key}={value}" for key, value in flags.items() if value is not None]


def _client(args: argparse.Namespace) -> int:
    from fedloom.deploy.client import run_client
    from fedloom.deploy.security import ClientTLS

    token = args.token or os.environ.get("FEDLOOM_TOKEN")
    if not token:
        raise SystemExit("fedloom client: give --token or set FEDLOOM_TOKEN")
    tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca or args.tls_cert else None
    return run_client(args.server, args.data, args.client_id, token, tls, args.patience, args.model, args.device)


def client_id(text: str) -> int:
    """A --client-id: the wire carries ids as uint64."""
    from fedloom.deploy import MAX_CLIENT_ID, is_client_id  # no gRPC: parsed before its absence is reported

    if not is_client_id(text):
        raise argparse.ArgumentTypeError(f"{text[:30]!r} is not an integer 0..{MAX_CLIENT_ID}")
    return int(text)


def add_commands(subparsers) -> None:
    """Add ``fedloom server`` and ``fedloom client`` to the command line's subparsers."""
    server = subparsers.add_parser("server", help="coordinate real client processes over gRPC",
                                   description="Run an experiment whose clients are `fedloom client` processes.")
    server.add_argument("--config", help="experiment config, .toml or .yaml (default: built-in defaults)")
    server.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    server.add_argument("--address", default=DEFAULT_ADDRESS,
                        help=f"host:port to listen on (default {DEFAULT_ADDRESS}: this machine only)")
    server.add_argument("--insecure", action="store_true",
                        help="allow listening on a network address without TLS (tokens and models in the clear)")
    server.add_argument("--tokens", required=True, help="file of 'client_id token' lines, one per client")
    server.add_argument("--resume", metavar="RUN_DIR", help="continue a crashed run from its last checkpoint")
    server.add_argument("--tls-cert", help="server certificate (PEM); with --tls-key turns TLS on")
    server.add_argument("--tls-key", help="server private key (PEM)")
    server.add_argument("--tls-client-ca", help="CA for client certificates: requires mutual TLS")
    server.add_argument("--min-clients", type=int,
                        help="updates a round needs before its deadline may close it "
                             "(default: the config's deploy.min_clients, 1)")
    server.add_argument("--round-timeout", type=float, metavar="SECONDS",
                        help="round deadline: who has not submitted by then is left out "
                             "(default: the config's deploy.round_timeout_s, 300)")
    server.set_defaults(func=_reported(_server))

    client = subparsers.add_parser("client", help="take part in a `fedloom server` run with local data",
                                   description="Train on local data for a `fedloom server` run.")
    client.add_argument("--server", required=True, help="host:port of the server")
    client.add_argument("--data", required=True, help=".npz with arrays x [N, ...] and y [N]: this client's data")
    client.add_argument("--client-id", type=client_id, required=True)
    client.add_argument("--model", metavar="PACKAGE.MODULE:NAME",
                        help="the user model this client agrees to build when the server asks for it "
                             "(default: fedloom's own models only; a client never imports a name the server sends)")
    client.add_argument("--token", help="this client's token (default: $FEDLOOM_TOKEN)")
    client.add_argument("--tls-ca", help="CA that signed the server certificate (PEM); turns TLS on")
    client.add_argument("--tls-cert", help="client certificate for mutual TLS (PEM)")
    client.add_argument("--tls-key", help="client private key for mutual TLS (PEM)")
    client.add_argument("--patience", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for an unreachable server before giving up (default 60)")
    client.add_argument("--device", default="cpu", help="where this client trains: cpu (default), cuda, cuda:N, "
                        "mps or auto (CUDA when available)")
    client.set_defaults(func=_reported(_client))


def _reported(command):
    """Log to stderr, and turn the errors a user can fix into one line and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from fedloom.config import ConfigError
        from fedloom.data import DataError
        from fedloom.registry import OptionError
        from fedloom.runner import RunFailed

        try:  # both import grpc, as every deploy module does
            from fedloom.deploy.client import ClientError
            from fedloom.deploy.security import SecurityError
        except ModuleNotFoundError as err:
            if (err.name or "").partition(".")[0] not in ("grpc", "google"):
                raise
            print(f"error: fedloom {args.command} needs gRPC ({err.name} is not installed): "
                  "pip install 'fedloom[deploy]'", file=sys.stderr)
            return 2
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
        try:
            return command(args)
        except RunFailed as failed:
            print(f"failed: {failed}", file=sys.stderr)
            return 1
        except (ConfigError, DataError, SecurityError, ClientError, OptionError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run


def main(argv: list[str]) -> int:
    """``python -m fedloom.deploy.server|client``, without the rest of the fedloom CLI."""
    parser = argparse.ArgumentParser(prog="fedloom")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
