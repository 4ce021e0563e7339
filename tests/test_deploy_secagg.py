"""Secure aggregation over gRPC. In one process: the servicer gets only masked vectors (uniform over the
ring) while the model equals the simulation's; malformed and oversized phase messages are refused naming
the client and phase. With real processes (slow): ten clients, three killed mid-protocol, the model equals
the simulation of the survivors; with too few left the round fails and the model stays."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import torch
from scipy import stats
from test_deploy import RUN_TIMEOUT_S, federation, final_params  # noqa: F401 (a fixture)
from test_deploy import CONFIG as DEPLOY_CONFIG
from test_deploy_servicer import Context, LiveRound

from fedloom.config import ConfigError, load_config
from fedloom.deploy import deploy_pb2 as pb
from fedloom.deploy import secagg as deployed
from fedloom.deploy.client import Trainer, receive_tasks
from fedloom.deploy.codec import decoder, encode
from fedloom.deploy.coordinator import Coordinator
from fedloom.deploy.server import serve
from fedloom.privacy.secagg import ADVERT_BYTES
from fedloom.rounds import build_round
from fedloom.runner import run
from fedloom.tracking import read_metrics

BITS = 32
SECURE = {"rounds": 1, "data": {"dataset": "digits", "n_clients": 4},
          "model": {"name": "mlp", "options": {"hidden": [32]}},
          "client": {"epochs": 1, "batch_size": 32}, "sampling": {"clients_per_round": 4}, "engine": {"name": "serial"},
          "secure_aggregation": {"protocol": "secagg", "bits": BITS}, "deploy": {"round_timeout_s": 60},
          "output": {"save": False, "progress": False}}


def _plain(messages) -> list[pb.ClientMessage]:
    """A session's messages as protobuf messages (its data chunks are raw views for codec.encode)."""
    return [m if isinstance(m, pb.ClientMessage) else pb.ClientMessage(data=bytes(m)) for m in messages]


class SecureClients:
    """The sampled clients of a LiveRound, each with its own subscription, answering the phases by hand."""

    def __init__(self, live: LiveRound):
        self.live = live
        self.streams = {c: self._subscribe(c) for c in live.sampled}
        self.sessions = {}
        for c in live.sampled:
            header, tensors = next(self.streams[c])
            self.sessions[c] = Trainer(c, live.dataset(c)).start_secure(header, tensors)

    def _subscribe(self, c: int):
        stream = self.live.servicer.Subscribe(iter([pb.SubscribeRequest(client_id=c)]), Context(self.live.metadata(c)))
        return receive_tasks(decoder(pb.ServerMessage.FromString)(encode(m)) for m in stream)

    def submit(self, c: int, messages) -> pb.SubmitReply:
        raw = [m.SerializeToString() for m in _plain(messages)]
        return self.live.servicer.Submit(iter(map(decoder(pb.ClientMessage.FromString), raw)),
                                         Context(self.live.metadata(c)))

    def advertise(self) -> None:
        for c, (_, messages) in self.sessions.items():
            assert self.submit(c, messages).accepted

    def next_phase(self) -> dict[int, tuple[pb.SecAggHeader, bytes]]:
        """Each client's incoming message of the next phase."""
        return {c: next(stream) for c, stream in self.streams.items()}

    def answer(self, incoming: dict[int, tuple[pb.SecAggHeader, bytes]]) -> None:
        for c, (header, payload) in incoming.items():
            session = self.sessions[c][0]
            assert self.submit(c, session.respond(header, payload)).accepted, c


def _spy(monkeypatch) -> tuple[dict, dict]:
    """What the coordinator takes in, by phase and client; and each client's ring vector x_u."""
    received, inputs = {}, {}
    deliver, encode_row = Coordinator.deliver, deployed.encode_row

    def spy_deliver(self, client_id, phase, header, payload):
        deliver(self, client_id, phase, header, payload)
        received.setdefault(phase.name, {})[client_id] = payload

    def spy_encode(spec, row, weight, ctx, client):
        inputs[client] = encode_row(spec, row, weight, ctx, client)
        return inputs[client]

    monkeypatch.setattr(Coordinator, "deliver", spy_deliver)
    monkeypatch.setattr(Coordinator, "accept", lambda *a: pytest.fail("a plain update reached a secure round"))
    monkeypatch.setattr(deployed, "encode_row", spy_encode)
    return received, inputs


def test_the_deployed_server_gets_only_masked_vectors_and_the_model_equals_the_simulation(monkeypatch):
    received, inputs = _spy(monkeypatch)
    live = LiveRound(SECURE)
    clients = SecureClients(live)
    clients.advertise()
    for _ in range(3):  # share keys, masked input, unmask
        clients.answer(clients.next_phase())
    live.thread.join(60)

    assert live.record["secagg_summed"] == 4 and live.record["round_failed"] is False
    assert all(isinstance(m, bytes) for phase in received.values() for m in phase.values())
    assert sorted(received) == ["advertise", "masked_input", "share_keys", "unmask"]
    for c, message in received["masked_input"].items():
        y = np.frombuffer(message, dtype=">u4").astype(np.int64)
        x = inputs[c].astype(np.int64)
        assert len(y) == len(x) == live.exp.spec.dim + 1
        assert stats.chisquare(np.bincount(y >> (BITS - 4), minlength=16)).pvalue > 1e-4, c  # top 4 bits uniform
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.1, c
        assert stats.chisquare(np.bincount(x >> (BITS - 4), minlength=16)).pvalue < 1e-10  # the input is not
    simulated = run(SECURE)
    torch.testing.assert_close(live.exp.final_params(live.exp.state), simulated.params, rtol=0, atol=0)


def _phase_header(c: int, task: pb.TaskHeader, phase: int, length: int, **fields) -> pb.SecAggHeader:
    return pb.SecAggHeader(round=1, task_id=task.task_id, client_id=c, phase=phase, length=length, **fields)


def test_malformed_and_oversized_phase_messages_are_refused_naming_client_and_phase(monkeypatch, caplog):
    live = LiveRound(SECURE)
    clients = SecureClients(live)
    c = live.sampled[0]
    task = clients.sessions[c][0].task
    report = {"num_examples": 10.0, "train_loss": 1.0}
    bad = {  # message -> what the refusal says
        (0, 10**6, b""): f"client {c}, phase advertise: 1000000 bytes announced, at most {ADVERT_BYTES}",
        (0, ADVERT_BYTES, (c + 1).to_bytes(4, "big") + bytes(ADVERT_BYTES - 4)):
            f"client {c}, phase advertise: expected {ADVERT_BYTES} bytes starting with its id {c}",
        (0, 8, b"\x00" * 12): f"client {c}, phase advertise: more than the 8 bytes announced",
        (2, 4, b"abcd"): f"client {c}, phase 2: that phase is not open",
    }
    for (phase, length, payload), reason in bad.items():
        header = _phase_header(c, task, phase, length, **report)
        reply = clients.submit(c, [pb.ClientMessage(secagg=header), pb.ClientMessage(data=payload)])
        assert not reply.accepted and reason in reply.reason, reply.reason
    clients.advertise()
    incoming = clients.next_phase()
    garbage = b"\x00\x00\x00\x07\x00\x00\x00\x05hello"  # a share for client 7, which is not in the round
    reply = clients.submit(c, [pb.ClientMessage(secagg=_phase_header(c, task, 1, len(garbage))),
                               pb.ClientMessage(data=garbage)])
    assert not reply.accepted and f"client {c}, phase share_keys: expected one" in reply.reason
    clients.answer(incoming)  # the honest answers still count: the round goes on and completes
    for _ in range(2):
        clients.answer(clients.next_phase())
    live.thread.join(60)
    assert live.record["secagg_summed"] == 4 and live.record["clients_refused"] == [c]
    torch.testing.assert_close(live.exp.final_params(live.exp.state), run(SECURE).params, rtol=0, atol=0)


@pytest.mark.parametrize("extra, message", [
    ({"server": {"aggregator": {"name": "median"}}}, "it needs individual rows"),
    ({"attack": {"name": "signflip", "f": 2}}, "a simulated attack on individual rows"),
])
def test_deployed_secure_aggregation_keeps_the_config_refusals(extra, message):
    with pytest.raises(ConfigError, match=message):
        serve({**SECURE, **extra, "output": {"save": True}}, "127.0.0.1:0", {0: "t"})


# ---- ten client processes --------------------------------------------------------------------------------------

TEN = {**DEPLOY_CONFIG, "rounds": 2, "secure_aggregation": {"protocol": "secagg"},
       "deploy": {"round_timeout_s": 60}}


def _kill_when_sent(fed, victims: dict[int, str], round_idx: int) -> None:
    """SIGKILL each victim as soon as the server logs its message of the given phase in ``round_idx``."""
    left = dict(victims)
    give_up = time.monotonic() + RUN_TIMEOUT_S
    while left:
        log = fed.log()
        for k, phase in list(left.items()):
            if f"round {round_idx}: client {k} sent {phase}" in log:
                fed.clients[k].send_signal(signal.SIGKILL)
                del left[k]
        assert time.monotonic() < give_up and fed.server.poll() is None, log[-3000:]
        time.sleep(0.02)


def _simulated_survivors(config: dict, survivors: list[int]):
    """The simulation's round 1 with only ``survivors`` training: the same secure sum of their rows."""
    sim = build_round(load_config({**config, "output": {"save": False, "progress": False}}))
    engine = sim.engine

    class Survivors:
        name = engine.name

        def run_round(self, algorithm, x0, sent, client_ids, round_idx, store):
            return engine.run_round(algorithm, x0, sent, survivors, round_idx, store)

    sim.engine = Survivors()
    state, record = sim.play(sim.init_state(), 1)
    return sim.final_model(state).state_dict(), record


@pytest.mark.slow
def test_ten_processes_three_killed_mid_protocol_then_too_many(federation):  # noqa: F811 (the fixture)
    """Round 1: clients 2 and 5 killed once they advertised keys, 7 once it sent its masked input; the round
    sums the survivors (7 included: its self mask is rebuilt from the others' shares). Round 2: four more
    killed after advertising, three left of the threshold six: the round fails, the model stays."""
    fed = federation(TEN)
    fed.start_server("--config", str(fed.dir / "exp.toml"))
    for k in range(10):
        fed.start_client(k)
    _kill_when_sent(fed, {2: "advertise", 5: "advertise", 7: "masked_input"}, 1)
    _kill_when_sent(fed, {0: "advertise", 3: "advertise", 8: "advertise", 9: "advertise"}, 2)
    assert fed.server.wait(RUN_TIMEOUT_S) == 0, fed.log()[-3000:]
    (run_dir,) = (fed.dir / "runs").iterdir()
    first, second = read_metrics(run_dir)

    summed = first["clients_submitted"]
    assert 7 in summed and not {2, 5} & set(summed) and len(summed) == 8, first
    assert first["secagg_summed"] == 8 and first["round_failed"] is False
    assert first["secagg_survivors_advertise"] == 10 and first["secagg_survivors_masked_input"] == 8
    assert second["round_failed"] is True and "fewer than the threshold 6" in second["secagg_failure"]
    expected, _ = _simulated_survivors(TEN, summed)
    for name, value in final_params(run_dir).items():  # the failed round 2 left round 1's model
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
    assert second["central_accuracy"] == first["central_accuracy"]
