"""``fedloom client``: one client process with its own data.

It keeps a subscription to the server open, and for each task it receives
trains with the serial engine's local-training code (the same function, the
same seeded batch order and dropout streams as in simulation) on a one-client
FederatedData made from its .npz, then streams its update back. When the server
is unreachable it retries until ``patience_s`` pass without progress, so a
server restarted with ``--resume`` finds its clients again.
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

from fedloom.config import load_config
from fedloom.core.params import ParamSpec
from fedloom.core.store import ClientStore
from fedloom.data import Dataset, FederatedData, load_dataset
from fedloom.deploy import deploy_pb2 as pb
from fedloom.deploy.codec import Data, Malformed, decoder, encode
from fedloom.deploy.messages import (MAX_MESSAGE_BYTES, Receiver, Refused, chunks, describe, local_from_proto, prefixed,
                                     result_tensors)
from fedloom.deploy.security import ClientTLS, call_metadata
from fedloom.engines.serial import SerialEngine
from fedloom.builders import build_algorithm, build_model_for

log = logging.getLogger("fedloom.deploy")

RETRY_S = 0.5
FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]


class ClientError(RuntimeError):
    """This client cannot take part (bad data for the server's model, refused credentials)."""


def one_client_data(client_id: int, data: Dataset, n_classes: int) -> FederatedData:
    """This process's examples as client ``client_id`` of a federation: the index tables are keyed
    by the client's real id (a dict where simulation has a list), so the serial engine draws
    the batch order and dropout streams of that id."""
    if int(data.y.max()) >= n_classes:
        raise ClientError(f"{data.name}: label {int(data.y.max())} is out of range for the server's {n_classes} classes")
    everything = torch.arange(len(data))
    return FederatedData(data.x, data.y, {client_id: everything}, {client_id: everything[:0]}, data.x[:0],
                         data.y[:0], n_classes)


class Trainer:
    """Runs tasks for one client: the model and algorithm come from the config in the task."""

    def __init__(self, client_id: int, data: Dataset):
        self.client_id = client_id
        self.dataset = data
        self._built: tuple | None = None  # (config json, n_classes) -> (data, model, algorithm)

    def _setup(self, header: pb.TaskHeader):
        key = (header.config_json, header.n_classes)
        if self._built is None or self._built[0] != key:
            cfg = load_config(json.loads(header.config_json))
            data = one_client_data(self.client_id, self.dataset, header.n_classes)
            self._built = key, (data, build_model_for(cfg, data), build_algorithm(cfg))
        return self._built[1]

    def train(self, header: pb.TaskHeader, tensors: dict[str, Tensor]) -> tuple[pb.UpdateHeader, list]:
        data, model, algorithm = self._setup(header)
        params, dim = tensors["params"].clone(), ParamSpec.of(model).dim
        if params.numel() != dim:
            raise ClientError(f"the server's model has {params.numel()} parameters, the one built for this "
                              f"client's data (input shape {list(data.input_shape)}) has {dim}")
        store = ClientStore()
        state = {k: v.clone() for k, v in prefixed(tensors, "state").items()}
        if state:
            store.put(self.client_id, state)
        engine = SerialEngine(model, data, local_from_proto(header.local))
        sent = {k: v.clone() for k, v in prefixed(tensors, "sent").items()}
        result = engine.run_round(algorithm, params, sent, [self.client_id], header.round, store)
        named = result_tensors(result.U[0], {k: v[0] for k, v in result.aux.items()},
                               store.get(self.client_id, dict))
        update = pb.UpdateHeader(round=header.round, task_id=header.task_id, client_id=self.client_id,
                                 num_examples=float(result.weights[0]), train_loss=float(result.train_loss[0]),
                                 buffers=describe(named))
        return update, named


def receive_tasks(stream) -> Iterator[tuple[pb.TaskHeader, dict[str, Tensor]] | None]:
    """Whole tasks from the subscription stream (decoded by codec.decoder); None when the server
    says the run is over."""
    header = receiver = None
    try:
        for msg in stream:
            if isinstance(msg, Malformed):
                raise Refused(f"a malformed message ({msg.error})")
            kind = "data" if isinstance(msg, Data) else msg.WhichOneof("kind")
            if kind == "done":
                yield None
                return
            if kind == "task":
                header, receiver = msg.task, Receiver(msg.task.buffers)
            elif receiver is not None:
                receiver.add(msg.payload if isinstance(msg, Data) else msg.data)
            if receiver is not None and receiver.complete:
                yield header, receiver.tensors()
                receiver = None
    except Refused as err:
        raise ClientError(f"the server sent an unusable task: {err}") from None


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
    if tls is None:
        return grpc.insecure_channel(server, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(server, tls.credentials(), options=CHANNEL_OPTIONS)


def run_client(server: str, data_path: str | Path, client_id: int, token: str, tls: ClientTLS | None = None,
               patience_s: float = 60.0) -> int:
    """Serve tasks until the server says the run is over (0), or cannot be reached for ``patience_s`` (1)."""
    trainer = Trainer(client_id, load_dataset("npz", path=data_path)[0])
    metadata = call_metadata(client_id, token)
    with open_channel(server, tls) as channel:
        calls = Calls(channel)
        while True:
            try:
                grpc.channel_ready_future(channel).result(timeout=patience_s)
            except grpc.FutureTimeoutError:
                log.error("client %d: no server at %s for %.0f s; giving up", client_id, server, patience_s)
                return 1
            try:
                for task in receive_tasks(calls.subscribe(pb.SubscribeRequest(client_id=client_id), metadata=metadata)):
                    if task is None:
                        log.info("client %d: the run is over", client_id)
                        return 0
                    reply = calls.submit(update_messages(*trainer.train(*task)), metadata=metadata)
                    log.info("client %d: round %d update %s", client_id, task[0].round,
                             "accepted" if reply.accepted else f"refused: {reply.reason}")
            except grpc.RpcError as err:
                if err.code() in FATAL:
                    raise ClientError(f"the server refused client {client_id}: {err.details()}") from None
                log.info("client %d: lost the server (%s); reconnecting", client_id, err.code().name)
            time.sleep(RETRY_S)


if __name__ == "__main__":
    from fedloom.deploy.cli import main

    sys.exit(main(["client", *sys.argv[1:]]))
