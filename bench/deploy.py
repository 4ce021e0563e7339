"""How fast `fedloom server` ingests client updates over gRPC, against raw gRPC streaming
of the same bytes on the same loopback (the limit here) and against Flower's gRPC deployment.

    python bench/deploy.py [--clients 20] [--params 10000000] [--repeats 3] [--out bench/results/deploy.json]

fedloom: a real server (Experiment + RemoteEngine + Servicer) opens a round of an MLP with
about --params parameters for --clients clients; one sender process subscribes as every client
(receiving its task), then all clients submit their update at once through fedloom's own
client code (header + float32 chunks); the server checks each task id, assembles the chunks
and checks every value is finite. raw: a bare gRPC method whose handler only counts the bytes
of the same chunks. Timed in the sender, from the first byte sent until every reply is back.
flower: flwr 1.22.0 in its own virtual environment (bench/.venvs/flower, made by bench/common.py),
its legacy gRPC server and clients with the same model's arrays (bench/peers/flower_deploy.py says
how it runs and what it times). MB/s = clients * 4 * d / seconds. The best of the repeats is kept
(a shared machine only ever slows a run down). Prints a markdown table and writes
bench/results/deploy.json (or --out); a Flower that cannot be installed or run gets its error there instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from fedloom.deploy import deploy_pb2 as pb
from fedloom.deploy.client import CHANNEL_OPTIONS, Calls, receive_tasks, update_messages
from fedloom.deploy.messages import CHUNK_BYTES, MAX_MESSAGE_BYTES, describe
from fedloom.deploy.security import call_metadata, read_tokens

from common import PEERS, RESULTS, ensure_venv, peer_version

RAW_METHOD = "/bench.Raw/Push"
INPUTS, CLASSES = 64, 10  # digits
KINDS = ("raw", "fedloom", "flower")
PEER_TIMEOUT_S = 600


def hidden_width(params: int) -> int:
    """The MLP hidden width giving about ``params`` parameters on digits (64 -> h -> 10)."""
    return round((params - CLASSES) / (INPUTS + 1 + CLASSES))


def mlp_shapes(params: int) -> list[list[int]]:
    """The MLP's parameter shapes, as torch.nn.Linear holds them: weight [out, in], bias [out]."""
    h = hidden_width(params)
    return [[h, INPUTS], [h], [CLASSES, h], [CLASSES]]


def mlp_params(params: int) -> int:
    return sum(torch.Size(shape).numel() for shape in mlp_shapes(params))


# -- servers (this process) ----------------------------------------------------------------------------------
def raw_server(workers: int) -> tuple[grpc.Server, int]:
    def push(chunks, context):
        return sum(len(c) for c in chunks).to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler("bench.Raw", {"Push": grpc.stream_unary_rpc_method_handler(push)})
    server = grpc.server(ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def fedloom_server(clients: int, params: int, tokens: dict[int, str]):
    """A server with round 1 open for every client, its round loop waiting in a thread."""
    from fedloom.config import load_config
    from fedloom.deploy.coordinator import Coordinator
    from fedloom.deploy.server import remote_round, start_grpc
    from fedloom.deploy.servicer import Servicer
    from fedloom.runner import Stepper

    cfg = load_config({"rounds": 1, "data": {"dataset": "digits", "n_clients": clients},
                       "model": {"name": "mlp", "options": {"hidden": [hidden_width(params)]}},
                       "sampling": {"clients_per_round": clients}, "engine": {"name": "serial"},
                       "deploy": {"min_clients": clients, "round_timeout_s": 600},
                       "evaluation": {"federated": False}, "output": {"save": False, "progress": False}})
    coordinator = Coordinator()
    exp = Stepper(remote_round(cfg, coordinator))
    server, port = start_grpc(Servicer(coordinator, tokens), "127.0.0.1:0", None, workers=2 * clients + 4)
    loop = threading.Thread(target=exp.round, args=(1,), daemon=True)
    loop.start()
    return server, port, loop, exp.spec.dim


def run_sender(kind: str, port: int, clients: int, floats: int, tokens_path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--send", kind, "--port", str(port), "--clients", str(clients),
                          "--floats", str(floats), "--tokens", tokens_path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the {kind} sender failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- senders (a separate process, so they do not share the server's interpreter) -----------------------------
def send_raw(channel: grpc.Channel, clients: int, floats: int) -> float:
    push = channel.stream_unary(RAW_METHOD)
    payload = memoryview(torch.zeros(floats).numpy()).cast("B")

    def one(_):
        pieces = (bytes(payload[s:s + CHUNK_BYTES]) for s in range(0, len(payload), CHUNK_BYTES))
        assert int.from_bytes(push(pieces), "little") == len(payload)

    return _timed(one, range(clients))


def send_fedloom(channel: grpc.Channel, clients: int, floats: int, tokens: dict[int, str]) -> float:
    """Subscribe as every client and take its task (untimed), then submit all updates at once (timed)."""
    calls = Calls(channel)
    streams = {c: calls.subscribe(pb.SubscribeRequest(client_id=c), metadata=call_metadata(c, t))
               for c, t in tokens.items()}
    headers = {c: next(receive_tasks(s))[0] for c, s in streams.items()}
    row = torch.zeros(floats)

    def one(c):
        named = [("update", row)]
        header = pb.UpdateHeader(round=headers[c].round, task_id=headers[c].task_id, client_id=c, num_examples=1.0,
                                 buffers=describe(named))
        reply = calls.submit(update_messages(header, named), metadata=call_metadata(c, tokens[c]))
        assert reply.accepted, reply.reason

    seconds = _timed(one, sorted(tokens))
    for s in streams.values():
        s.cancel()
    return seconds


def _timed(fn, items) -> float:
    items = list(items)
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        began = time.perf_counter()
        list(pool.map(fn, items))
        return time.perf_counter() - began


def sender_main(args: argparse.Namespace) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{args.port}", options=CHANNEL_OPTIONS) as channel:
        if args.send == "raw":
            seconds = send_raw(channel, args.clients, args.floats)
        else:
            seconds = send_fedloom(channel, args.clients, args.floats, read_tokens(args.tokens))
    print(json.dumps({"seconds": seconds}))


# -- Flower (its own processes, in its own virtual environment) --------------------------------------------
def measure_flower(python: str, clients: int, params: int, logs: Path) -> tuple[float, int]:
    """One round of Flower's server and ``clients`` clients (two processes); the server's timing."""
    port = free_port()
    peer = [python, str(PEERS / "flower_deploy.py")]
    flags = ["--port", str(port), "--clients", str(clients)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}  # no calls home: the bench runs offline
    with open(logs / "flower-server.log", "w") as server_log, open(logs / "flower-clients.log", "w") as clients_log:
        server = subprocess.Popen([*peer, "server", *flags], stdout=subprocess.PIPE, stderr=server_log, text=True,
                                  env=env, start_new_session=True)
        try:
            wait_listening(port, server, logs / "flower-server.log")
            senders = subprocess.run([*peer, "clients", *flags, "--shapes", json.dumps(mlp_shapes(params))],
                                     stdout=clients_log, stderr=subprocess.STDOUT, env=env, timeout=PEER_TIMEOUT_S)
            out, _ = server.communicate(timeout=PEER_TIMEOUT_S)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    if server.returncode != 0 or senders.returncode != 0:
        raise RuntimeError(f"Flower failed (server exit {server.returncode}, clients exit {senders.returncode}):\n"
                           f"{(logs / 'flower-server.log').read_text()[-2000:]}\n"
                           f"{(logs / 'flower-clients.log').read_text()[-2000:]}")
    row = json.loads(out.strip().splitlines()[-1])
    return row["seconds"], row["floats_per_update"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Until the server accepts connections (its clients then connect at once, with no retry back-off)."""
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up and server.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"Flower's server is not listening on port {port}:\n{log.read_text()[-2000:]}")


# -- harness -------------------------------------------------------------------------------------------------
def measure(kind: str, clients: int, params: int, tokens_path: str) -> tuple[float, int]:
    """(seconds, floats per update) of one ingest of ``clients`` updates."""
    if kind == "raw":
        server, port = raw_server(workers=clients + 4)
        floats = mlp_params(params)
    else:
        server, port, loop, floats = fedloom_server(clients, params, read_tokens(tokens_path))
    try:
        seconds = run_sender(kind, port, clients, floats, tokens_path)["seconds"]
        if kind == "fedloom":
            loop.join(600)
    finally:
        server.stop(None)
    return seconds, floats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "deploy.json", help="where the JSON results go")
    parser.add_argument("--send", choices=["raw", "fedloom"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floats", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        return sender_main(args)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tokens_path = str(Path(tmp) / "tokens.txt")
        Path(tokens_path).write_text("".join(f"{c} {secrets.token_hex(16)}\n" for c in range(args.clients)))
        rows = {kind: timed_row(kind, args, tokens_path, Path(tmp)) for kind in KINDS}
    ok = {kind: row for kind, row in rows.items() if "mb_per_s" in row}
    ratios = {f"{a}_over_{b}": ok[a]["mb_per_s"] / ok[b]["mb_per_s"]
              for a, b in [("fedloom", "raw"), ("flower", "raw"), ("fedloom", "flower")] if a in ok and b in ok}
    result = {"clients": args.clients, "params": args.params, "chunk_bytes": CHUNK_BYTES, "runs": rows, **ratios,
              "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
              "machine": platform.platform(), "python": platform.python_version(), "grpcio": grpc.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(args.clients, mlp_params(args.params), rows, ratios)


def timed_row(kind: str, args: argparse.Namespace, tokens_path: str, tmp: Path) -> dict:
    """The best of ``args.repeats`` ingests of one contestant, or the error that stopped it."""
    try:
        if kind == "flower":
            python = flower_python()
            runs = [measure_flower(python, args.clients, args.params, tmp) for _ in range(args.repeats)]
        else:
            runs = [measure(kind, args.clients, args.params, tokens_path) for _ in range(args.repeats)]
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        return {"error": str(err)}
    seconds, floats = min(runs)
    mb = args.clients * 4 * floats / 1e6
    row = {"seconds": seconds, "all_seconds": [s for s, _ in runs], "floats_per_update": floats, "megabytes": mb,
           "mb_per_s": mb / seconds}
    if kind == "flower":
        row["flwr"] = peer_version(python, "flower")
        row["path"] = "flwr.server.start_server + flwr.client.start_client (gRPC-bidi, deprecated since 1.13)"
    return row


def flower_python() -> str:
    """The interpreter of bench/.venvs/flower, installed on first use as for the other workloads."""
    python, error = ensure_venv("flower", [])
    if error:
        raise RuntimeError(f"cannot install Flower: {error}")
    return python


def print_table(clients: int, floats: int, rows: dict, ratios: dict) -> None:
    print(f"| ingest of {clients} updates of {floats:,} float32 | seconds | MB/s |")
    print("| --- | --- | --- |")
    for kind, row in rows.items():
        if "error" in row:
            print(f"| {kind} | failed | - |")
        else:
            print(f"| {kind} | {row['seconds']:.2f} | {row['mb_per_s']:.0f} |")
    print()
    for name, ratio in ratios.items():
        print(f"{name.replace('_over_', ' / ')}: {ratio:.0%}")
    for kind, row in rows.items():
        if "error" in row:
            print(f"\n{kind} failed:\n{row['error']}")


if __name__ == "__main__":
    main()
