"""``fedloom client``: one client process with its own data.

It keeps a subscription to the server open, and for each task it receives
trains with the serial engine's local-training code (the same function, the
same seeded batch order and dropout streams as in simulation) on a one-client
FederatedData made from its .npz, runs the client side of the pipeline on its row
(local DP: clip and noise, the simulation's streams), then streams its update back. When the server
is unreachable, or says it was interrupted, the client keeps reconnecting (with
backoff) until ``patience_s`` pass without a running server, so a server
restarted with ``--resume`` finds its clients again.

A server is not trusted with this machine: a task names its model and
algorithm, and the client builds them only from fedloom's registries or from
the model its own command line names (``--model``). Nothing the wire names is
ever imported.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import torch
from torch import Tensor

from fedloom.config import ConfigError, ExperimentConfig, load_config
from fedloom.registry import OptionError
from fedloom.core.params import ParamSpec
from fedloom.core.store import ClientStore
from fedloom.data import Dataset, FederatedData, load_dataset
from fedloom.deploy import deploy_pb2 as pb
from fedloom.deploy.codec import Data, Malformed, decoder, encode
from fedloom.deploy.coordinator import INTERRUPTED
from fedloom.deploy.messages import (MAX_MESSAGE_BYTES, ByteReceiver, Receiver, Refused, chunks, describe,
                                     local_from_proto, prefixed, result_tensors)
from fedloom.deploy.security import ClientTLS, call_metadata, tls_mismatch
from fedloom.engines.device import DeviceError, resolve_device
from fedloom.engines.base import RoundResult
from fedloom.engines.serial import SerialEngine
from fedloom.builders import build_algorithm, build_model_for, build_task_for
from fedloom.models import MODELS
from fedloom.pipeline.base import Context
from fedloom.pipeline.build import build_pipeline
from fedloom.tasks import TASKS

log = logging.getLogger("fedloom.deploy")

RETRY_S = 0.5  # the first wait before reconnecting; it doubles up to MAX_RETRY_S while the server stays away
MAX_RETRY_S = 8.0
PROBE_S = 3.0  # how long a connection may stay unready before the client checks for a TLS mismatch
FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
TASK_SECTIONS = {"seed", "model", "task", "algorithm", "privacy", "secure_aggregation"}  # server.task_sections
MAX_PHASE_BYTES = 1 << 30  # the most a secure-aggregation message from the server may announce
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000),
                   # a server that stops answering pings (hung, cut off) is noticed within about 10 s
                   ("grpc.keepalive_time_ms", 5_000), ("grpc.keepalive_timeout_ms", 5_000),
                   ("grpc.http2.ping_timeout_ms", 5_000), ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.max_pings_without_data", 0)]


class ClientError(RuntimeError):
    """This client cannot take part (bad data for the server's model, refused credentials, a task it
    will not run)."""


def unusable(err: Exception) -> ClientError:
    """The ClientError for a task this client cannot use, with the reason."""
    return ClientError(f"the server sent an unusable task: {err}")


def task_config(config_json: str, own_model: str | None) -> ExperimentConfig:
    """The model and algorithm a task asks for, refused unless this client builds them from its own
    code: a registry model, or exactly the ``own_model`` its command line names."""
    try:
        raw = json.loads(config_json)
    except json.JSONDecodeError as err:
        raise unusable(f"its config is not JSON ({err})") from None
    stray = sorted(set(raw) - TASK_SECTIONS) if isinstance(raw, dict) else [type(raw).__name__]
    if stray:
        raise unusable(f"its config holds {', '.join(stray)}; a task carries only "
                       f"{', '.join(sorted(TASK_SECTIONS))}")
    _check_model_name(raw.get("model", {}), own_model)  # before validation, which imports a user model
    _check_task_name(raw.get("task", {}))
    try:
        return load_config(raw)
    except ConfigError as err:
        raise unusable(err) from None


def _check_model_name(model: object, own_model: str | None) -> None:
    name = model.get("name", "mlp") if isinstance(model, dict) else model
    if not isinstance(name, str):
        raise unusable(f"its model name is a {type(name).__name__}, not a name")
    if own_model is not None and name != own_model:
        raise ClientError(f"the server's model {name!r} is not this client's --model {own_model!r}")
    if own_model is None and name not in MODELS:
        raise ClientError(f"the server's model {name!r} is not one of fedloom's models ({', '.join(MODELS)}); "
                          "a client builds a user model only when its own --model names it")


def _check_task_name(task: object) -> None:
    """Only fedloom's own tasks: a user task named on the wire would be imported here."""
    name = task.get("name", "auto") if isinstance(task, dict) else task
    if not isinstance(name, str) or name not in TASKS:
        raise ClientError(f"the server's task {name!r} is not one of fedloom's tasks ({', '.join(TASKS)}); "
                          "a client runs no task named by the server's config")


def one_client_data(client_id: int, data: Dataset, n_classes: int) -> FederatedData:
    """This process's examples as client ``client_id`` of a federation: the index tables are keyed
    by the client's real id (a dict where simulation has a list), so the serial engine draws
    the batch order and dropout streams of that id."""
    if data.task == "classification" and int(data.y.max()) >= n_classes:
        raise ClientError(f"{data.name}: label {int(data.y.max())} is out of range for the server's {n_classes} classes")
    everything = torch.arange(len(data))
    return FederatedData(data.x, data.y, {client_id: everything}, {client_id: everything[:0]}, data.x[:0],
                         data.y[:0], n_classes, data.task, data.vocabulary)


class Trainer:
    """Runs tasks for one client: the model and algorithm the task asks for, as task_config allows."""

    def __init__(self, client_id: int, data: Dataset, model: str | None = None,
                 device: torch.device = torch.device("cpu")):
        self.client_id = client_id
        self.device = device
        self.dataset = data
        self.own_model = model  # a user model 'package.module:Name' from this client's command line
        # (config json, n_classes) -> (data, model, algorithm, task, seed, own side, secure mean's settings or None)
        self._built: tuple | None = None

    def _setup(self, header: pb.TaskHeader):
        key = (header.config_json, header.n_classes)
        if self._built is None or self._built[0] != key:
            cfg = task_config(header.config_json, self.own_model)
            data = one_client_data(self.client_id, self.dataset, header.n_classes)
            try:
                self._built = key, (data, build_model_for(cfg, data), build_algorithm(cfg), build_task_for(cfg, data),
                                    cfg.seed, build_pipeline(cfg, None).on("client"), _secure_spec(cfg))
            except (OptionError, ConfigError) as err:
                raise unusable(err) from None
        return self._built[1]

    def secure(self, header: pb.TaskHeader) -> bool:
        """Whether the task's round aggregates securely (this client then sends protocol messages, not its row)."""
        return self._setup(header)[-1] is not None

    def train(self, header: pb.TaskHeader, tensors: dict[str, Tensor]) -> tuple[pb.UpdateHeader, list]:
        """Train on one task (its header and tensors: the model, what the algorithm broadcast, the client's state);
        returns the update's header and its tensors. ClientError when the task does not fit this client."""
        result, row, state = self.local_update(header, tensors)
        named = result_tensors(row, {k: v[0] for k, v in result.aux.items()}, state)
        update = pb.UpdateHeader(round=header.round, task_id=header.task_id, client_id=self.client_id,
                                 num_examples=float(result.weights[0]), train_loss=float(result.train_loss[0]),
                                 buffers=describe(named))
        return update, named

    def start_secure(self, header: pb.TaskHeader, tensors: dict[str, Tensor]):
        """Train, keep the row in a secure-aggregation session, and the session's first messages (its keys)."""
        from fedloom.deploy.secagg import ClientSession

        result, row, _ = self.local_update(header, tensors)
        *_, seed, _, spec = self._setup(header)
        ctx = Context(header.round, seed, [self.client_id], tensors["params"])
        session = ClientSession(self.client_id, header, spec, row, float(result.weights[0]), ctx)
        return session, session.advertise(float(result.train_loss[0]))

    def local_update(self, header: pb.TaskHeader, tensors: dict[str, Tensor]) -> tuple[RoundResult, Tensor, dict]:
        """Local training on the task, then the client side of the pipeline: the result, the row and the
        client's new state."""
        data, model, algorithm, task, seed, own_side, _ = self._setup(header)
        params, dim = tensors["params"].clone(), ParamSpec.of(model).dim
        if params.numel() != dim:
            raise ClientError(f"the server's model has {params.numel()} parameters, the one built for this "
                              f"client's data (input shape {list(data.input_shape)}) has {dim}")
        store = ClientStore()
        state = {k: v.clone() for k, v in prefixed(tensors, "state").items()}
        if state:
            store.put(self.client_id, state)
        try:
            local = local_from_proto(header.local)
        except Refused as err:
            raise unusable(err) from None
        engine = SerialEngine(model, data, local, task, self.device)
        sent = {k: v.clone() for k, v in prefixed(tensors, "sent").items()}
        result = engine.run_round(algorithm, params, sent, [self.client_id], header.round, store)
        ctx = Context(header.round, seed, [self.client_id], params)  # the simulation's streams: same noise
        row = own_side.apply(result.U, result.weights, own_side.init(dim), ctx)[0]  # local DP: clip, noise
        return result, row[0], store.get(self.client_id, dict)


def _secure_spec(cfg: ExperimentConfig):
    """The secure mean's settings when the task aggregates securely (w_max: announced with phase 1)."""
    if cfg.secure_aggregation.protocol == "none":
        return None
    from fedloom.pipeline.build import secure_mean_spec

    return secure_mean_spec(cfg, 1.0)[0]


def receive_tasks(stream) -> Iterator[tuple[pb.TaskHeader, dict[str, Tensor]] | tuple[pb.SecAggHeader, bytes]
                                      | pb.Done]:
    """Whole tasks and secure-aggregation phase messages from the subscription stream (decoded by
    codec.decoder), then the server's Done when it ends the run."""
    header = receiver = None
    try:
        for msg in stream:
            if isinstance(msg, Malformed):
                raise Refused(f"a malformed message ({msg.error})")
            kind = "data" if isinstance(msg, Data) else msg.WhichOneof("kind")
            if kind == "done":
                yield msg.done
                return
            if kind == "task":
                header, receiver = msg.task, Receiver(msg.task.buffers)
            elif kind == "secagg":
                header, receiver = msg.secagg, ByteReceiver(msg.secagg.length, MAX_PHASE_BYTES)
            elif receiver is not None:
                receiver.add(msg.payload if isinstance(msg, Data) else msg.data)
            if receiver is not None and receiver.complete:
                yield header, receiver.tensors()
                receiver = None
    except Refused as err:
        raise unusable(err) from None


def update_messages(header: pb.UpdateHeader, named: list) -> Iterator[pb.ClientMessage | memoryview]:
    """The header, then raw chunks that codec.encode sends as data messages."""
    yield pb.ClientMessage(header=header)
    yield from chunks(named)


class Calls:
    """The Coordinator's two calls on a channel, with codec's (de)serializers (the generated stub
    would serialize every chunk through protobuf)."""

    def __init__(self, channel: grpc.Channel):
        service = "/fedloom.deploy.Coordinator/"
        self.subscribe = channel.unary_stream(service + "Subscribe", request_serializer=encode,
                                              response_deserializer=decoder(pb.ServerMessage.FromString))
        self.submit = channel.stream_unary(service + "Submit", request_serializer=encode,
                                           response_deserializer=pb.SubmitReply.FromString)


def open_channel(server: str, tls: ClientTLS | None) -> grpc.Channel:
    """A gRPC channel to ``server``: TLS when ``tls`` is given, else insecure."""
    if tls is None:
        return grpc.insecure_channel(server, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(server, tls.credentials(), options=CHANNEL_OPTIONS)


class Backoff:
    """The wait before the next reconnection: RETRY_S, doubling up to MAX_RETRY_S, and RETRY_S again
    once a task arrives."""

    def __init__(self) -> None:
        self.delay = RETRY_S

    def next(self) -> float:
        """The wait before this attempt; the next one doubles, up to MAX_RETRY_S."""
        delay, self.delay = self.delay, min(MAX_RETRY_S, 2 * self.delay)
        return delay

    def reset(self) -> None:
        """Start again from RETRY_S (a task arrived)."""
        self.delay = RETRY_S


def wait_for_server(channel: grpc.Channel, server: str, tls_on: bool, give_up_at: float) -> bool:
    """Whether the channel became ready before ``give_up_at``; a TLS mismatch, which no waiting
    cures, is a ClientError."""
    ready = grpc.channel_ready_future(channel)
    try:
        while (left := give_up_at - time.monotonic()) > 0:
            try:
                ready.result(timeout=min(left, PROBE_S))
                return True
            except grpc.FutureTimeoutError:
                mismatch = tls_mismatch(server, tls_on)
                if mismatch:
                    raise ClientError(mismatch) from None
        return False
    finally:
        ready.cancel()


def take_part(calls: Calls, trainer: Trainer, metadata, retry: Backoff) -> str | None:
    """Train on each task of one subscription; the reason the server ended the run with, or None
    when the stream ended without one (a newer connection of this client replaced it)."""
    stream = calls.subscribe(pb.SubscribeRequest(client_id=trainer.client_id), metadata=metadata)
    sessions: dict = {}  # task id -> this client's secure-aggregation session (fedloom.deploy.secagg)
    for task in receive_tasks(stream):
        if isinstance(task, pb.Done):
            return task.reason
        retry.reset()
        header, body = task
        if isinstance(header, pb.SecAggHeader):
            from fedloom.deploy.secagg import client_step

            messages, what = client_step(sessions, header, body), f"secure-aggregation phase {header.phase}"
        elif trainer.secure(header):
            session, messages = trainer.start_secure(header, body)
            sessions, what = {header.task_id: session}, "secure-aggregation keys"  # only the newest round's
        else:
            messages, what = update_messages(*trainer.train(header, body)), "update"
        if messages is not None:
            reply = calls.submit(iter(messages), metadata=metadata)
            log.info("client %d: round %d %s %s", trainer.client_id, header.round, what,
                     "accepted" if reply.accepted else f"refused: {reply.reason}")
    return None


def run_client(server: str, data_path: str | Path, client_id: int, token: str, tls: ClientTLS | None = None,
               patience_s: float = 60.0, model: str | None = None, device: str = "cpu") -> int:
    """Serve tasks until the server says the run finished (0), or ``patience_s`` pass without a
    running server (1): unreachable, or interrupted and not back. ``model`` is the user model
    this client agrees to build ('package.module:Name'); None: fedloom's own models only.
    ``device``: where it trains (``engine.device``'s values)."""
    try:
        on = resolve_device(device)[0]
    except DeviceError as err:
        raise ClientError(str(err).replace("engine.device", "--device")) from None
    trainer = Trainer(client_id, load_dataset("npz", path=data_path)[0], model, on)
    metadata = call_metadata(client_id, token)
    retry = Backoff()
    with open_channel(server, tls) as channel:
        calls = Calls(channel)
        give_up_at = time.monotonic() + patience_s
        while wait_for_server(channel, server, tls is not None, give_up_at):
            try:
                reason = take_part(calls, trainer, metadata, retry)
            except grpc.RpcError as err:
                if err.code() in FATAL:
                    raise ClientError(f"the server refused client {client_id}: {err.details()}") from None
                log.info("client %d: lost the server (%s); reconnecting", client_id, err.code().name)
                reason = None
            if reason not in (None, INTERRUPTED):
                log.info("client %d: the run is over", client_id)
                return 0
            if reason == INTERRUPTED:
                log.info("client %d: the server was interrupted; reconnecting until it is back", client_id)
            give_up_at = time.monotonic() + patience_s  # the server was there until now
            time.sleep(retry.next())
    log.error("client %d: no running server at %s for %.0f s; giving up", client_id, server, patience_s)
    return 1


if __name__ == "__main__":
    from fedloom.deploy.cli import main

    sys.exit(main(["client", *sys.argv[1:]]))
