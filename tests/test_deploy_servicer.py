"""The server's gRPC servicer in one process: fuzzed, malformed, replayed and stale updates are
refused and never reach the model; tokens and TLS; models over 4 MB cross in chunks."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import math
import secrets
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloom.config import load_config
from fedloom.data import Dataset
from fedloom.deploy import deploy_pb2 as pb
from fedloom.deploy import deploy_pb2_grpc as pb_grpc
from fedloom.deploy.client import Trainer, receive_tasks, run_client
from fedloom.deploy.codec import decoder, encode
from fedloom.deploy.coordinator import Coordinator, Task, Update
from fedloom.deploy.messages import CHUNK_BYTES, MAX_MESSAGE_BYTES, chunks
from fedloom.deploy.security import ClientTLS, ServerTLS, call_metadata
from fedloom.deploy.server import remote_round, start_grpc
from fedloom.deploy.servicer import Servicer
from fedloom.rounds.federated import sample_clients
from fedloom.runner import run
from fedloom.runner import Stepper

CONFIG = {"rounds": 1, "data": {"dataset": "digits", "n_clients": 4}, "model": {"name": "logistic"},
          "client": {"epochs": 1, "batch_size": 32}, "sampling": {"clients_per_round": 2},
          "engine": {"name": "serial"}, "deploy": {"min_clients": 2, "round_timeout_s": 600},
          "output": {"save": False, "progress": False}}
SUBMIT = "/fedloom.deploy.Coordinator/Submit"
DECODE = decoder(pb.ClientMessage.FromString)  # what the server's gRPC layer hands the servicer


class Aborted(Exception):
    pass


class Context:
    """The parts of grpc.ServicerContext the servicer uses."""

    def __init__(self, metadata=()):
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata

    def peer(self) -> str:
        return "in-process"

    def abort(self, code, details):
        raise Aborted(code, details)

    def is_active(self) -> bool:
        return True

    def add_callback(self, callback) -> bool:
        return True

    def cancel(self) -> None:
        raise AssertionError("the servicer cancelled an in-process call: a read timed out")


class LiveRound:
    """Round 1 of CONFIG open on a server, its round loop waiting in a thread for the updates,
    and for each sampled client the task it received and the honest update it would send."""

    def __init__(self, config: dict = CONFIG):
        self.cfg = load_config(config)
        self.coord = Coordinator()
        self.exp = Stepper(remote_round(self.cfg, self.coord))
        self.tokens = {k: secrets.token_hex(8) for k in range(self.cfg.data.n_clients)}
        self.servicer = Servicer(self.coord, self.tokens)
        self.record: dict | None = None
        self.thread = threading.Thread(target=self._round, daemon=True)
        self.thread.start()
        self.sampled = sample_clients(self.cfg.data.n_clients, self.cfg.clients_per_round(), self.cfg.seed, 1)
        self.tasks = {c: self._receive_task(c) for c in self.sampled}
        self.honest = {c: self._honest_update(c) for c in self.sampled}

    def _honest_update(self, client_id: int) -> list[pb.ClientMessage]:
        """The client's update as plain protobuf messages (what any protobuf client would send)."""
        header, named = Trainer(client_id, self.dataset(client_id)).train(*self.tasks[client_id])
        return [pb.ClientMessage(header=header), *[pb.ClientMessage(data=bytes(p)) for p in chunks(named)]]

    def _round(self) -> None:
        self.record = self.exp.round(1)

    def metadata(self, client_id: int):
        return call_metadata(client_id, self.tokens[client_id])

    def dataset(self, client_id: int) -> Dataset:
        idx = self.exp.data.train_idx[client_id]
        return Dataset(self.exp.data.x[idx], self.exp.data.y[idx], self.exp.data.n_classes, f"client{client_id}")

    def _receive_task(self, client_id: int):
        stream = self.servicer.Subscribe(iter([pb.SubscribeRequest(client_id=client_id)]),
                                         Context(self.metadata(client_id)))
        return next(receive_tasks(decoder(pb.ServerMessage.FromString)(encode(m)) for m in stream))

    def submit(self, messages, metadata) -> bool:
        """Submit protobuf messages as they arrive from the wire; True when the servicer accepted
        the update (refused and aborted calls are False)."""
        return self.submit_raw([m.SerializeToString() for m in messages], metadata)

    def submit_raw(self, raw: list[bytes], metadata) -> bool:
        try:
            return self.servicer.Submit(iter(map(DECODE, raw)), Context(metadata)).accepted
        except Aborted:
            return False

    def finish_honestly(self) -> dict:
        """Send every sampled client's honest update, let the round close, and return its record."""
        for c in self.sampled:
            assert self.submit(self.honest[c], self.metadata(c)), f"client {c}'s honest update was refused"
        self.thread.join(60)
        return self.record


@pytest.fixture(scope="module")
def simulated_round():
    return run(CONFIG).params


def assert_model_is_the_simulated_one(live: LiveRound, simulated_params) -> None:
    record = live.finish_honestly()
    assert record["clients_submitted"] == live.sampled
    torch.testing.assert_close(live.exp.state["x"], simulated_params, rtol=0, atol=1e-6)


# -- fuzzing -------------------------------------------------------------------------------------------------
floats = st.floats(allow_nan=True, allow_infinity=True)
buffers = st.lists(st.builds(pb.Buffer, name=st.sampled_from(["update", "aux/delta_c", "state/c", "params", ""]),
                             dtype=st.sampled_from(["float32", "float64", "int8", ""]),
                             length=st.one_of(st.just(650), st.integers(0, 2**64 - 1))), max_size=3)
headers = st.builds(pb.UpdateHeader, round=st.integers(0, 2**64 - 1), task_id=st.text(max_size=40),
                    client_id=st.integers(0, 2**64 - 1), num_examples=floats, train_loss=floats, buffers=buffers)
messages = st.one_of(st.builds(pb.ClientMessage, header=headers), st.builds(pb.ClientMessage, data=st.binary(max_size=3000)))


def metadata_strategy(live: LiveRound):
    """Real credentials of sampled clients, and wrong, partial or foreign ones."""
    real = [live.metadata(c) for c in live.sampled]
    forged = st.tuples(st.tuples(st.just("x-fedloom-client-id"), st.text(max_size=5)),
                       st.tuples(st.just("x-fedloom-token"), st.text(max_size=20)))
    return st.one_of(st.sampled_from(real), forged, st.just(()))


def mutate(live: LiveRound, client_id: int, draw) -> list[pb.ClientMessage]:
    """The client's honest update with one change that must get it refused."""
    msgs = [pb.ClientMessage() for _ in live.honest[client_id]]
    for copy, original in zip(msgs, live.honest[client_id]):
        copy.CopyFrom(original)
    header, data = msgs[0].header, msgs[1:]
    kind = draw(st.sampled_from(["nan", "truncate", "extend", "round", "task", "client", "examples", "loss",
                                 "length", "dtype", "name", "drop_buffer", "add_buffer", "no_header",
                                 "header_twice", "data_first"]))
    if kind == "nan":
        chunk = draw(st.integers(0, len(data) - 1))
        values = np.frombuffer(data[chunk].data, dtype=np.float32).copy()
        values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        data[chunk].data = values.tobytes()
    elif kind == "truncate":
        data[-1].data = data[-1].data[:-draw(st.integers(1, len(data[-1].data)))]
    elif kind == "extend":
        msgs.append(pb.ClientMessage(data=draw(st.binary(min_size=1, max_size=64))))
    elif kind == "round":
        header.round = draw(st.integers(0, 2**64 - 1).filter(lambda r: r != 1))
    elif kind == "task":
        header.task_id = draw(st.text(max_size=40).filter(lambda t: t != header.task_id))
    elif kind == "client":
        header.client_id = draw(st.integers(0, 2**64 - 1).filter(lambda c: c != client_id))
    elif kind == "examples":
        header.num_examples = draw(st.sampled_from([0.0, -1.0, 0.5, math.nan, math.inf, -math.inf]))
    elif kind == "loss":
        header.train_loss = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif kind == "length":
        header.buffers[0].length = draw(st.integers(0, 2**64 - 1).filter(lambda n: n != header.buffers[0].length))
    elif kind == "dtype":
        header.buffers[0].dtype = draw(st.sampled_from(["float64", "float16", "int32", ""]))
    elif kind == "name":
        header.buffers[0].name = draw(st.text(max_size=10).filter(lambda n: n != "update"))
    elif kind == "drop_buffer":
        del header.buffers[0]
    elif kind == "add_buffer":
        header.buffers.add(name="aux/extra", dtype="float32", length=draw(st.integers(0, 100)))
    elif kind == "no_header":
        msgs = msgs[1:]
    elif kind == "header_twice":
        msgs.insert(draw(st.integers(1, len(msgs))), msgs[0])
    elif kind == "data_first":
        msgs = [*msgs[1:2], msgs[0], *msgs[2:]]
    return msgs


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def test_thousands_of_random_and_mutated_messages_leave_the_model_alone(simulated_round, caplog):
    caplog.set_level(logging.CRITICAL, logger="fedloom.deploy")  # thousands of refusals
    live = LiveRound()

    @fuzz(1500)
    @given(stream=st.lists(messages, max_size=6), metadata=metadata_strategy(live))
    def random_streams(stream, metadata):
        assert not live.submit(stream, metadata)

    @fuzz(1000)
    @given(data=st.data())
    def mutated_honest_updates(data):
        client_id = data.draw(st.sampled_from(live.sampled))
        assert not live.submit(mutate(live, client_id, data.draw), live.metadata(client_id))

    @fuzz(1000)
    @given(raw=st.lists(st.binary(max_size=200), min_size=1, max_size=4), client_id=st.sampled_from(live.sampled))
    def random_bytes(raw, client_id):
        assert not live.submit_raw(raw, live.metadata(client_id))

    random_streams()
    mutated_honest_updates()
    random_bytes()
    assert live.thread.is_alive()  # the round is still waiting: nothing of the above counted
    assert_model_is_the_simulated_one(live, simulated_round)


def test_refusals_are_logged_with_their_reason(caplog):
    live = LiveRound()
    client_id = live.sampled[0]
    bad = [pb.ClientMessage(header=live.honest[client_id][0].header),
           pb.ClientMessage(data=np.full(650, np.nan, dtype=np.float32).tobytes())]
    with caplog.at_level(logging.WARNING, logger="fedloom.deploy"):
        assert not live.submit(bad, live.metadata(client_id))
        assert not live.submit(live.honest[client_id], call_metadata(client_id, "not-the-token"))
    assert f"refused an update from client {client_id}" in caplog.text and "NaN" in caplog.text
    assert "wrong token" in caplog.text


def test_replayed_and_stale_updates_are_refused(simulated_round):
    live = LiveRound()
    first, second = live.sampled
    assert live.submit(live.honest[first], live.metadata(first))
    assert not live.submit(live.honest[first], live.metadata(first))  # replay within the round
    assert not live.submit(live.honest[second], live.metadata(first))  # another client's update
    assert live.submit(live.honest[second], live.metadata(second))
    live.thread.join(60)
    torch.testing.assert_close(live.exp.state["x"], simulated_round, rtol=0, atol=1e-6)
    for c in live.sampled:  # the round is closed: the same updates are now stale
        assert not live.submit(live.honest[c], live.metadata(c))


def test_malformed_and_oversized_messages_over_a_real_channel(simulated_round):
    live = LiveRound()
    server, port = start_grpc(live.servicer, "127.0.0.1:0", None, workers=8)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            raw_submit = channel.stream_unary(SUBMIT, request_serializer=lambda b: b,
                                              response_deserializer=pb.SubmitReply.FromString)
            client_id = live.sampled[0]
            for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05abc"):  # a bad tag; a header cut short
                reply = raw_submit(iter([garbage]), metadata=live.metadata(client_id), timeout=10)
                assert not reply.accepted and "malformed" in reply.reason
            huge = pb.ClientMessage(data=bytes(MAX_MESSAGE_BYTES + 1)).SerializeToString()
            with pytest.raises(grpc.RpcError) as err:
                raw_submit(iter([huge]), metadata=live.metadata(client_id), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stub = pb_grpc.CoordinatorStub(channel)
            over_chunk = [live.honest[client_id][0], pb.ClientMessage(data=bytes(CHUNK_BYTES + 1))]
            reply = stub.Submit(iter(over_chunk), metadata=live.metadata(client_id), timeout=10)
            assert not reply.accepted and "limit" in reply.reason
            with pytest.raises(grpc.RpcError) as err:
                stub.Submit(iter(live.honest[client_id]), metadata=call_metadata(client_id, "x"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for c in live.sampled:  # still serving: the honest updates go through the same channel
                assert stub.Submit(iter(live.honest[c]), metadata=live.metadata(c), timeout=30).accepted
        live.thread.join(60)
        torch.testing.assert_close(live.exp.state["x"], simulated_round, rtol=0, atol=1e-6)
    finally:
        server.stop(None)


def test_a_round_closes_at_its_deadline_or_when_the_missing_clients_are_gone():
    coord = Coordinator()
    header = lambda c: pb.TaskHeader(round=1, task_id=f"t{c}", client_id=c)  # noqa: E731
    tasks = lambda: {c: Task(header(c), [], torch.zeros(0)) for c in (0, 1, 2)}  # noqa: E731
    submit = lambda c, r: coord.accept(coord.claim(c, pb.UpdateHeader(round=r, task_id=f"t{c}", client_id=c)),  # noqa: E731
                                       Update(c, 1.0, 0.0))
    handles = {c: coord.connect(c) for c in (0, 1, 2)}
    coord.open_round(1, tasks(), [])
    submit(0, 1)
    began = time.monotonic()
    updates, who = coord.close_round(timeout_s=0.3, min_clients=1)
    assert time.monotonic() - began >= 0.3 and [u.client_id for u in updates] == [0]
    assert who.dropped == [1, 2] and who.disconnected == []

    coord.open_round(2, tasks(), [])
    submit(1, 2)
    coord.disconnect(0, handles[0])
    coord.disconnect(2, handles[2])
    began = time.monotonic()
    updates, who = coord.close_round(timeout_s=60, min_clients=1)
    assert time.monotonic() - began < 5 and who.submitted == [1] and who.disconnected == [0, 2]


def test_the_server_closes_rounds_as_its_deploy_config_says():
    """[deploy] min_clients = 1 and round_timeout_s = 0.5: one of the two sampled clients answers, the other
    stays connected and silent, and the round closes at the deadline without it (not after the default 300 s)."""
    live = LiveRound({**CONFIG, "deploy": {"min_clients": 1, "round_timeout_s": 0.5}})
    answering, silent = live.sampled
    assert live.submit(live.honest[answering], live.metadata(answering))
    live.thread.join(10)
    assert not live.thread.is_alive(), "the round did not close at its 0.5 s deadline"
    assert live.record["clients_submitted"] == [answering] and live.record["clients_dropped"] == [silent]
    assert live.record["clients_disconnected"] == []


# -- TLS and tokens ------------------------------------------------------------------------------------------
def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool = False, san=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM files."""
    out = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certs = {"ca": (_certificate("fedloom test CA", ca_key, "fedloom test CA", ca_key, ca=True), ca_key),
             "server": (_certificate("localhost", server_key, "fedloom test CA", ca_key, san=san), server_key),
             "client": (_certificate("client 0", client_key, "fedloom test CA", ca_key), client_key)}
    for name, (cert, key) in certs.items():
        (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    return out


def _first_message(channel: grpc.Channel, client_id: int, token: str) -> pb.ServerMessage:
    stream = pb_grpc.CoordinatorStub(channel).Subscribe(pb.SubscribeRequest(client_id=client_id),
                                                        metadata=call_metadata(client_id, token), timeout=10)
    return next(stream)


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_refuses_wrong_tokens_and_plaintext_clients(pki, mutual):
    live = LiveRound()
    tls = ServerTLS(pki / "server.pem", pki / "server.key", pki / "ca.pem" if mutual else None)
    server, port = start_grpc(live.servicer, "127.0.0.1:0", tls, workers=8)
    address = f"127.0.0.1:{port}"
    cert = dict(cert=pki / "client.pem", key=pki / "client.key") if mutual else {}
    client_id = live.sampled[0]
    try:
        with grpc.secure_channel(address, ClientTLS(pki / "ca.pem", **cert).credentials()) as channel:
            assert _first_message(channel, client_id, live.tokens[client_id]).task.round == 1
            with pytest.raises(grpc.RpcError) as err:
                _first_message(channel, client_id, "wrong-token")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            _first_message(channel, client_id, live.tokens[client_id])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        if mutual:  # TLS without a client certificate is refused too
            with grpc.secure_channel(address, ClientTLS(pki / "ca.pem").credentials()) as channel, \
                    pytest.raises(grpc.RpcError) as err:
                _first_message(channel, client_id, live.tokens[client_id])
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_a_model_over_4_mb_crosses_in_chunks(tmp_path):
    config = {**CONFIG, "data": {"dataset": "digits", "n_clients": 2}, "sampling": {"clients_per_round": 1},
              "model": {"name": "mlp", "options": {"hidden": [20000]}}}  # 1.5 M parameters, 6 MB
    live = LiveRound(config)
    server, port = start_grpc(live.servicer, "127.0.0.1:0", None, workers=8)
    try:
        (client_id,) = live.sampled
        data = live.dataset(client_id)
        np.savez(tmp_path / "mine.npz", x=data.x.numpy(), y=data.y.numpy())
        done = []
        client = threading.Thread(target=lambda: done.append(run_client(
            f"127.0.0.1:{port}", tmp_path / "mine.npz", client_id, live.tokens[client_id], patience_s=30)))
        client.start()
        live.thread.join(120)
        live.coord.finish()
        client.join(30)
        assert done == [0]
        assert live.record["wire_bytes_up"] > 4 * live.exp.spec.dim > 4 * 2**20
        torch.testing.assert_close(live.exp.state["x"], run(config).params, rtol=0, atol=1e-6)
    finally:
        server.stop(None)


# -- clients that lie about their weight or send huge updates ------------------------------------------------
def _claiming(live: LiveRound, client_id: int, n_examples: float) -> list[pb.ClientMessage]:
    """The client's honest update with another example count in its header."""
    header = pb.UpdateHeader()
    header.CopyFrom(live.honest[client_id][0].header)
    header.num_examples = n_examples
    return [pb.ClientMessage(header=header), *live.honest[client_id][1:]]


def _finish_with(live: LiveRound, updates: dict[int, list[pb.ClientMessage]]) -> dict:
    for c in live.sampled:
        assert live.submit(updates.get(c, live.honest[c]), live.metadata(c))
    live.thread.join(60)
    return live.record


def test_a_client_claiming_1e18_examples_gets_only_the_capped_weight():
    liar = LiveRound()
    c = liar.sampled[0]
    cap = int(liar.exp.data.client_sizes().max())  # the default cap: the federation's largest client
    record = _finish_with(liar, {c: _claiming(liar, c, 1e18)})
    assert record["reported_examples"][liar.sampled.index(c)] == 1e18 and record["n_examples_capped"] == 1
    at_cap = LiveRound()
    _finish_with(at_cap, {c: _claiming(at_cap, c, float(cap))})
    assert torch.equal(liar.exp.state["x"], at_cap.exp.state["x"])  # the lie bought nothing beyond the cap
    honest = LiveRound()
    _finish_with(honest, {})
    other = liar.sampled[1]
    share = cap / (cap + float(honest.honest[other][0].header.num_examples))
    assert share < 0.9  # the liar holds a bounded share, not 1 - 1e-15


def test_uniform_weighting_ignores_the_claimed_counts():
    config = {**CONFIG, "deploy": {**CONFIG["deploy"], "weighting": "uniform"}}
    liar, honest = LiveRound(config), LiveRound(config)
    c = liar.sampled[0]
    _finish_with(liar, {c: _claiming(liar, c, 1e18)})
    _finish_with(honest, {})
    assert torch.equal(liar.exp.state["x"], honest.exp.state["x"])


def _huge(live: LiveRound, client_id: int) -> list[pb.ClientMessage]:
    """A finite update that would poison the model: 3e38 in one coordinate."""
    header = live.honest[client_id][0].header
    row = np.frombuffer(b"".join(m.data for m in live.honest[client_id][1:]), dtype=np.float32).copy()
    row[0] = 3e38
    return [pb.ClientMessage(header=header), *[pb.ClientMessage(data=bytes(p)) for p in chunks([("row", torch.from_numpy(row))])]]


def test_max_update_norm_rejects_a_huge_finite_update():
    bounded = LiveRound({**CONFIG, "deploy": {**CONFIG["deploy"], "max_update_norm": 1e6}})
    c = bounded.sampled[0]
    before = bounded.exp.state["x"].clone()
    record = _finish_with(bounded, {c: _huge(bounded, c)})
    assert record["n_too_long"] == 1 and torch.isfinite(bounded.exp.state["x"]).all()
    assert float((bounded.exp.state["x"] - before).abs().max()) < 10  # the other client's step only
    unbounded = LiveRound()
    _finish_with(unbounded, {c: _huge(unbounded, c)})
    assert float(unbounded.exp.state["x"].abs().max()) > 1e36  # what the bound prevents
