"""Attacks and faults from the adversarial review of the deployment, each through real processes or a
real gRPC channel on 127.0.0.1: a server naming code for its clients to run, strangers holding the
server's worker threads, plaintext on the network and TLS mismatches, header numbers that overflow
float32, over-long client ids, clients gone before their round, an interrupted server; and the user
errors of ``fedloom run`` that used to end in a traceback."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tomli_w
import torch

from fedloom.cli import main
from fedloom.deploy import deploy_pb2 as pb
from fedloom.deploy import deploy_pb2_grpc as pb_grpc
from fedloom.deploy.codec import encode
from fedloom.deploy.coordinator import FINISHED, INTERRUPTED, Coordinator, Task, Update
from fedloom.deploy.messages import chunks, describe
from fedloom.deploy.security import call_metadata
from fedloom.deploy.server import serve, start_grpc
from fedloom.deploy.servicer import Servicer
from test_deploy import ENV, free_port
from test_deploy_servicer import CONFIG, LiveRound, pki, simulated_round  # noqa: F401 (fixtures)

SUBSCRIBE = "/fedloom.deploy.Coordinator/Subscribe"
PROCESS_TIMEOUT_S = 90


def client_data(path: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((n, 64), dtype=np.float32), y=rng.integers(0, 10, n))
    return path


def client_process(server: str, data: Path, client_id: int, token: str, *args: str, env=ENV) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedloom.deploy.client", "--server", server, "--data", str(data),
                             "--client-id", str(client_id), "--token", token, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def outcome(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the process did not end within {PROCESS_TIMEOUT_S} s:\n{out[-3000:]}")
    return proc.returncode, out


# -- 1. a server cannot make its clients run code ------------------------------------------------------------
def fake_server(config_json: str) -> tuple[grpc.Server, int]:
    """A server that hands every subscriber one task naming ``config_json``'s model, and holds the stream."""
    params = torch.zeros(650)
    header = pb.TaskHeader(round=1, task_id="t", client_id=0, n_classes=10, config_json=config_json,
                           local=pb.LocalTraining(optimizer="sgd", options={"lr": 0.1}, epochs=1, batch_size=8),
                           buffers=describe([("params", params)]))

    def subscribe(_request, context):
        yield pb.ServerMessage(task=header)
        yield from chunks([("params", params)])
        while context.is_active():
            time.sleep(0.05)

    server = grpc.server(ThreadPoolExecutor(4))
    handler = grpc.unary_stream_rpc_method_handler(subscribe, request_deserializer=pb.SubscribeRequest.FromString,
                                                   response_serializer=encode)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "fedloom.deploy.Coordinator", {"Subscribe": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.mark.parametrize("model, client_args, refusal", [
    ("planted:Net", [], "is not one of fedloom's models"),
    ("os:system", [], "is not one of fedloom's models"),
    ("planted:Net", ["--model", "mine:Net"], "is not this client's --model 'mine:Net'"),
])
def test_a_client_never_imports_the_model_its_server_names(tmp_path, model, client_args, refusal):
    modules = tmp_path / "modules"
    modules.mkdir()
    marker = tmp_path / "imported"
    (modules / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\nNet = None\n")
    config_json = json.dumps({"seed": 0, "model": {"name": model, "command": f"touch {marker}"},
                              "algorithm": {"name": "fedavg"}})
    server, port = fake_server(config_json)
    try:
        proc = client_process(f"127.0.0.1:{port}", client_data(tmp_path / "c.npz"), 0, "t", "--patience", "30",
                              *client_args, env={**ENV, "PYTHONPATH": os.pathsep.join([str(modules), *sys.path])})
        code, out = outcome(proc)
    finally:
        server.stop(None)
    assert code == 2 and refusal in out and "Traceback" not in out, out
    assert not marker.exists(), "the client imported or ran what the server named"


# -- 2. strangers holding connections do not stall the server ------------------------------------------------
class Strangers:
    """Connections without a valid token that send nothing more: raw TCP sockets, and gRPC calls
    that send their headers but never a message."""

    def __init__(self, address: str, n: int):
        host, port = address.rsplit(":", 1)
        self.sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in range(n)]
        self.release = threading.Event()
        self.channels = [grpc.insecure_channel(address) for _ in range(n)]
        never = lambda: iter(lambda: self.release.wait(), True)  # noqa: E731 (blocks until released)
        self.calls = [channel.stream_stream(SUBSCRIBE)(never(), metadata=metadata)
                      for channel, metadata in zip(self.channels, [(), call_metadata(0, "wrong")] * n)]

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()
        for resource in (*self.sockets, *self.channels):
            resource.close()


def test_idle_strangers_do_not_stall_a_run_of_real_processes(tmp_path):
    config = {**CONFIG, "rounds": 2, "data": {"dataset": "digits", "n_clients": 2},
              "output": {"dir": str(tmp_path / "runs"), "progress": False}}
    (tmp_path / "exp.toml").write_text(tomli_w.dumps(config))
    (tmp_path / "tokens.txt").write_text("0 token-zero\n1 token-one\n")
    address = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, "-m", "fedloom.deploy.server", "--config", str(tmp_path / "exp.toml"),
                               "--address", address, "--tokens", str(tmp_path / "tokens.txt")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV, text=True)
    strangers = None
    try:
        give_up = time.monotonic() + PROCESS_TIMEOUT_S
        while strangers is None:  # 24 idle connections: three times the server's 8 worker threads
            try:
                strangers = Strangers(address, 12)
            except OSError:
                assert time.monotonic() < give_up and server.poll() is None, "the server did not start listening"
                time.sleep(0.2)
        clients = [client_process(address, client_data(tmp_path / f"c{k}.npz", 200), k, token, "--patience", "60")
                   for k, token in ((0, "token-zero"), (1, "token-one"))]
        code, out = outcome(server)
        assert code == 0, out[-3000:]
        for proc in clients:
            client_code, client_out = outcome(proc)
            assert client_code == 0, client_out[-2000:]
    finally:
        if strangers is not None:
            strangers.close()
        if server.poll() is None:
            server.kill()
    assert "round 2/2" in out and "refused a call" in out


def test_a_token_holder_gets_three_calls_and_each_read_has_a_deadline():
    live = LiveRound()
    live.servicer.read_timeout_s = 1.0
    server, port = start_grpc(live.servicer, "127.0.0.1:0", None, workers=8)
    release = threading.Event()
    client_id = live.sampled[0]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            calls = [channel.stream_stream(SUBSCRIBE)(iter(lambda: release.wait(), True), timeout=30,
                                                      metadata=live.metadata(client_id)) for _ in range(4)]
            ends = []
            for call in calls:
                with pytest.raises(grpc.RpcError) as err:
                    next(call)
                ends.append(err.value.code())
            # one of the four is refused at once; the three allowed end at the 1 s read deadline
            assert sorted(code.name for code in ends) == ["CANCELLED"] * 3 + ["RESOURCE_EXHAUSTED"], ends
            stub = pb_grpc.CoordinatorStub(channel)
            for c in live.sampled:  # the places came back: the real round completes through the gate
                assert stub.Submit(iter(live.honest[c]), metadata=live.metadata(c), timeout=30).accepted
        live.thread.join(60)
        assert live.record["clients_submitted"] == live.sampled
    finally:
        release.set()
        server.stop(None)


# -- 3. loopback by default, no plaintext on the network, TLS mismatches named --------------------------------
def test_the_server_listens_on_loopback_and_refuses_plaintext_on_the_network(tmp_path):
    import inspect

    from fedloom.cli import build_parser

    (tmp_path / "tokens.txt").write_text("0 t\n")
    assert build_parser().parse_args(["server", "--tokens", "t"]).address.startswith("127.0.0.1:")
    assert inspect.signature(serve).parameters["address"].default.startswith("127.0.0.1:")
    server = subprocess.Popen([sys.executable, "-m", "fedloom.deploy.server", "--address", "0.0.0.0:0", "--tokens",
                               str(tmp_path / "tokens.txt")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=ENV, text=True)
    code, out = outcome(server)
    assert code == 2 and "--address 0.0.0.0:0" in out and "--insecure" in out and "Traceback" not in out, out


@pytest.mark.parametrize("server_tls, client_tls, named", [(True, False, "speaks TLS and this client does not"),
                                                           (False, True, "does not speak TLS")])
def test_a_tls_mismatch_is_named_instead_of_no_server(tmp_path, pki, server_tls, client_tls, named):  # noqa: F811
    from fedloom.deploy.security import ServerTLS

    live = LiveRound()
    tls = ServerTLS(pki / "server.pem", pki / "server.key") if server_tls else None
    server, port = start_grpc(live.servicer, "127.0.0.1:0", tls, workers=8)
    client_id = live.sampled[0]
    data = live.dataset(client_id)
    np.savez(tmp_path / "c.npz", x=data.x.numpy(), y=data.y.numpy())
    try:
        proc = client_process(f"127.0.0.1:{port}", tmp_path / "c.npz", client_id, live.tokens[client_id],
                              "--patience", "60", *(["--tls-ca", str(pki / "ca.pem")] if client_tls else []))
        code, out = outcome(proc)
    finally:
        server.stop(None)
    assert code == 2 and named in out and "no server" not in out, out


# -- 4. numbers that overflow float32, over-long client ids -------------------------------------------------
def test_float32_overflow_and_overlong_client_ids_are_refused_at_the_wire(simulated_round):  # noqa: F811
    live = LiveRound()
    server, port = start_grpc(live.servicer, "127.0.0.1:0", None, workers=8)
    client_id = live.sampled[0]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            submit = channel.stream_unary("/fedloom.deploy.Coordinator/Submit", request_serializer=encode,
                                          response_deserializer=pb.SubmitReply.FromString)
            for field, value in (("num_examples", 1e39), ("train_loss", -3.5e38), ("train_loss", 1e300)):
                header, *data = live.honest[client_id]
                forged = pb.ClientMessage()
                forged.CopyFrom(header)
                setattr(forged.header, field, value)
                reply = submit(iter([forged, *data]), metadata=live.metadata(client_id), timeout=30)
                assert not reply.accepted and field in reply.reason and "float32" in reply.reason, reply
            for raw_id in ("9" * 25, "9" * 5000):
                with pytest.raises(grpc.RpcError) as err:
                    submit(iter(live.honest[client_id]), metadata=(("x-fedloom-client-id", raw_id),
                                                                   ("x-fedloom-token", "x")), timeout=30)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            for c in live.sampled:
                assert submit(iter(live.honest[c]), metadata=live.metadata(c), timeout=30).accepted
        live.thread.join(60)
        torch.testing.assert_close(live.exp.state["x"], simulated_round, rtol=0, atol=1e-6)
    finally:
        server.stop(None)


# -- 5. user errors of `fedloom run` are one line ------------------------------------------------------------
def unwritable_directory(tmp_path: Path) -> str:
    if os.geteuid() == 0:  # root writes anywhere chmod allows; sysfs refuses even root
        return "/sys/fedloom-test-runs"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    return str(locked / "runs")


@pytest.mark.parametrize("case", ["import", "not_a_module", "option_type", "aggregator_option_type", "out_is_a_file",
                                  "read_only_out", "yaml_list"])
def test_user_errors_print_one_clear_line(tmp_path, capsys, case):
    (tmp_path / "afile").write_text("")
    (tmp_path / "list.yaml").write_text("- rounds: 1\n")
    out = ["--out", str(tmp_path / "runs")]
    argv, named = {
        "import": (["--set", "model.name=fedloom_no_such_module:Net", *out], "fedloom_no_such_module"),
        "not_a_module": (["--set", "model.name=collections:Counter", *out], "not a torch.nn.Module"),
        "option_type": (["--set", "model.options.hidden=abc", *out], "hidden = 'abc'"),
        "aggregator_option_type": (["--set", "server.aggregator.name=krum", "--set", "server.aggregator.options.f=abc", *out],
                                   "f = 'abc'"),
        "out_is_a_file": (["--out", str(tmp_path / "afile")], "is a file"),
        "read_only_out": (["--out", unwritable_directory(tmp_path)], unwritable_directory(tmp_path)),
        "yaml_list": ([str(tmp_path / "list.yaml"), *out], "top level is a list"),
    }[case]
    assert main(["run", "--quiet", "--set", "rounds=1", "--set", "data.n_clients=4", *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


# -- 6. liveness and the end of a run -------------------------------------------------------------------------
def _open(coord: Coordinator, index: int, clients: list[int]) -> None:
    coord.open_round(index, {c: Task(pb.TaskHeader(round=index, task_id=f"t{c}", client_id=c), [], torch.zeros(0))
                             for c in clients}, [])


def _submit(coord: Coordinator, index: int, client_id: int) -> None:
    slot = coord.claim(client_id, pb.UpdateHeader(round=index, task_id=f"t{client_id}", client_id=client_id))
    coord.accept(slot, Update(client_id, 1.0, 0.0))


def test_a_client_gone_before_its_round_opens_does_not_cost_the_deadline():
    coord = Coordinator()
    handles = {c: coord.connect(c) for c in (0, 1, 2)}
    coord.disconnect(2, handles[2])  # gone between rounds
    _open(coord, 1, [0, 1, 2])
    _submit(coord, 1, 0)
    _submit(coord, 1, 1)
    closed = []
    closer = threading.Thread(target=lambda: closed.append(coord.close_round(timeout_s=600, min_clients=1)),
                              daemon=True)
    closer.start()
    closer.join(10)
    assert closed, "the round waited out its deadline for a client that was already gone"
    assert closed[0][1].dropped == [2] and closed[0][1].disconnected == [2]

    _open(coord, 2, [0, 3])  # 3 never connected yet: it may still be starting, so the round waits for it
    _submit(coord, 2, 0)
    _, who = coord.close_round(timeout_s=0.5, min_clients=1)
    assert who.dropped == [3] and who.disconnected == []


class CountingCoordinator(Coordinator):
    def __init__(self) -> None:
        super().__init__()
        self.connections = 0

    def connect(self, client_id: int) -> object:
        self.connections += 1
        return super().connect(client_id)


def serve_until_connected(port: int, reason: str) -> None:
    """A server on ``port`` that ends its run with ``reason`` as soon as client 0 has subscribed."""
    coord = CountingCoordinator()
    server, _ = start_grpc(Servicer(coord, {0: "t"}), f"127.0.0.1:{port}", None, workers=8)
    give_up = time.monotonic() + 30
    while not coord.connections:
        assert time.monotonic() < give_up, "client 0 did not (re)connect to this server"
        time.sleep(0.05)
    coord.finish(reason)
    server.stop(grace=5).wait(10)


def client_thread(port: int, tmp_path: Path, patience_s: float, exits: list[int]) -> threading.Thread:
    from fedloom.deploy.client import run_client

    data = client_data(tmp_path / "c.npz")
    thread = threading.Thread(target=lambda: exits.append(run_client(f"127.0.0.1:{port}", data, 0, "t",
                                                                     patience_s=patience_s)))
    thread.start()
    return thread


def test_an_interrupted_server_keeps_its_clients_until_it_is_back(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedloom.deploy")
    port = free_port()
    exits: list[int] = []
    client = client_thread(port, tmp_path, 60, exits)
    serve_until_connected(port, INTERRUPTED)
    serve_until_connected(port, FINISHED)  # the resumed server
    client.join(PROCESS_TIMEOUT_S)
    assert exits == [0] and "the server was interrupted" in caplog.text

    exits.clear()  # interrupted, and nobody comes back: the client gives up after its patience
    client = client_thread(port, tmp_path, 2, exits)
    serve_until_connected(port, INTERRUPTED)
    client.join(PROCESS_TIMEOUT_S)
    assert exits == [1]
