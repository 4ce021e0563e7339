"""The gRPC face of the coordinator: authenticate every call, stream tasks out,
take updates in, and refuse (with a logged reason) anything that is not a
finite update of the expected layout for the caller's open task.

An update streams straight into the client's row of the round's matrix, so the
server copies its bytes once; fedloom.aggregation.validate.reject_invalid
still sees every row before aggregation (Experiment.round).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator

import grpc

from fedloom.deploy import deploy_pb2 as pb
from fedloom.deploy import deploy_pb2_grpc as pb_grpc
from fedloom.deploy.codec import Data, Malformed, decoder, encode, encoded_size
from fedloom.deploy.coordinator import DONE, REPLACED, Coordinator, Outgoing, Task, Update
from fedloom.deploy.messages import (FLOAT32_MAX, ByteReceiver, Receiver, Refused, byte_chunks, chunks, fits_float32,
                                     layout)
from fedloom.deploy.security import Gate, Refusal, authenticate

log = logging.getLogger("fedloom.deploy")

POLL_S = 1.0  # how often an idle subscription checks that its client is still there
READ_TIMEOUT_S = 30.0  # the longest a started call may keep the server waiting for its next message


def add_to_server(servicer: "Servicer", server: grpc.Server) -> None:
    """Register the Coordinator service, as the generated add_CoordinatorServicer_to_server does,
    but with fedloom.deploy.codec's (de)serializers, and Subscribe as a stream handler: its one
    request is then read under the servicer's read deadline (gRPC waits for a unary request without one)."""
    handlers = {
        "Subscribe": grpc.stream_stream_rpc_method_handler(
            servicer.Subscribe, request_deserializer=decoder(pb.SubscribeRequest.FromString),
            response_serializer=encode),
        "Submit": grpc.stream_unary_rpc_method_handler(
            servicer.Submit, request_deserializer=decoder(pb.ClientMessage.FromString),
            response_serializer=encode),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fedloom.deploy.Coordinator", handlers),))


def within(messages: Iterable, context, timeout_s: float) -> Iterator:
    """The call's incoming messages; the call is cancelled when the peer keeps the next one waiting
    over ``timeout_s`` (gRPC's reads have no deadline, and a waiting read holds a worker thread)."""
    messages = iter(messages)
    while True:
        watchdog = threading.Timer(timeout_s, context.cancel)
        watchdog.daemon = True
        watchdog.start()
        try:
            msg = next(messages, None)
        finally:
            watchdog.cancel()
        if msg is None:
            return
        yield msg


class _Counted:
    """Iterates over incoming messages as headers or Data, adding up their sizes on the wire and
    refusing malformed ones."""

    def __init__(self, messages):
        self.messages = iter(messages)
        self.bytes = 0

    def __iter__(self):
        return self

    def __next__(self) -> pb.ClientMessage | Data:
        msg = next(self.messages)
        if isinstance(msg, Malformed):
            self.bytes += msg.size
            raise Refused(f"a malformed message of {msg.size} bytes ({msg.error})")
        if isinstance(msg, pb.ClientMessage) and msg.WhichOneof("kind") == "data":  # not sent by codec.encode
            msg = Data(memoryview(msg.data), msg.ByteSize())
        self.bytes += msg.size if isinstance(msg, Data) else msg.ByteSize()
        return msg


class Servicer(pb_grpc.CoordinatorServicer):
    """Serve it behind ``gate`` (start_grpc does): the gate turns strangers away before they hold a
    thread; the servicer checks the token again, so it is closed on a server without the gate too."""

    def __init__(self, coordinator: Coordinator, tokens: dict[int, str], read_timeout_s: float = READ_TIMEOUT_S):
        self.coord = coordinator
        self.tokens = tokens
        self.gate = Gate(tokens)
        self.read_timeout_s = read_timeout_s

    def _authenticate(self, context) -> int:
        verdict = authenticate(self.tokens, context.invocation_metadata())
        if isinstance(verdict, Refusal):
            log.warning("refused a call from %s: %s", context.peer(), verdict.reason)
            context.abort(verdict.code, verdict.reason)
        return verdict

    def Subscribe(self, requests, context):
        client_id = self._authenticate(context)
        request = next(within(requests, context, self.read_timeout_s), None)
        if not isinstance(request, pb.SubscribeRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a SubscribeRequest "
                          f"within {self.read_timeout_s:g} s, got {'none' if request is None else 'a malformed one'}")
        if request.client_id != client_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the token is client {client_id}'s")
        handle = self.coord.connect(client_id)
        if not context.add_callback(lambda: self.coord.disconnect(client_id, handle)):
            self.coord.disconnect(client_id, handle)
            return
        log.info("client %d connected from %s", client_id, context.peer())
        sent: set[str] = set()  # the task ids and phase messages this subscription sent
        while context.is_active():
            item = self.coord.wait_for_task(client_id, handle, sent, POLL_S)
            if item is DONE:
                yield pb.ServerMessage(done=pb.Done(reason=self.coord.finish_reason))
                return
            if item is REPLACED:
                return
            if isinstance(item, Task):
                sent.add(item.header.task_id)
                yield from self._send(pb.ServerMessage(task=item.header), chunks(item.tensors))
            elif isinstance(item, Outgoing):
                sent.add(item.key)
                yield from self._send(pb.ServerMessage(secagg=item.header), byte_chunks(item.payload))

    def _send(self, head: pb.ServerMessage, pieces):
        self.coord.count(down=head.ByteSize())
        yield head
        for piece in pieces:
            self.coord.count(down=encoded_size(piece))
            yield piece

    def Submit(self, request_iterator, context) -> pb.SubmitReply:
        client_id = self._authenticate(context)
        messages = _Counted(within(request_iterator, context, self.read_timeout_s))
        slot, what = None, "an update"
        try:
            first = next(messages, None)
            if isinstance(first, pb.ClientMessage) and first.WhichOneof("kind") == "secagg":
                what = "a secure-aggregation message"
                self._receive_phase(client_id, first.secagg, messages)
                return pb.SubmitReply(accepted=True)
            header, slot = self._claim(client_id, first)
            self.coord.accept(slot, self._receive(header, slot, messages))
        except (Refused, grpc.RpcError) as err:
            reason = str(err) if isinstance(err, Refused) else "the stream broke"
            log.warning("refused %s from client %d (%s): %s", what, client_id, context.peer(), reason)
            self.coord.note_refused(client_id)
            return pb.SubmitReply(accepted=False, reason=reason)
        finally:
            if slot is not None:
                self.coord.release(slot)
            self.coord.count(up=messages.bytes)
        log.info("round %d: update from client %d accepted", header.round, client_id)
        return pb.SubmitReply(accepted=True)

    def _claim(self, client_id: int, first):
        """The header (the stream's first message), checked against the client's task, and the claim on its
        answer row."""
        if not isinstance(first, pb.ClientMessage) or first.WhichOneof("kind") != "header":
            raise Refused("the first message must be the update header or a secure-aggregation phase header")
        header = first.header
        check_report(header)
        slot = self.coord.claim(client_id, header)
        if layout(header.buffers) != slot.expected:
            self.coord.release(slot)
            raise Refused(f"buffers {layout(header.buffers)} are not the expected {slot.expected}")
        return header, slot

    def _receive_phase(self, client_id: int, header: pb.SecAggHeader, messages: _Counted) -> None:
        """A secure-aggregation phase message: claimed for its open phase (which bounds its announced
        length), its bytes gathered, checked by the protocol, handed to the phase."""
        if header.phase == 0:
            check_report(header)
        phase = self.coord.claim_phase(client_id, header)
        receiver = ByteReceiver(header.length, header.length)
        try:
            for msg in messages:
                if not isinstance(msg, Data):
                    raise Refused("a second header inside one message")
                receiver.add(msg.payload)
            if not receiver.complete:
                raise Refused(f"truncated: {len(receiver.data)} of the {header.length} bytes announced arrived")
        except Refused as err:
            self.coord.abandon(client_id, phase)
            raise Refused(f"client {client_id}, phase {phase.name}: {err}") from None
        except BaseException:
            self.coord.abandon(client_id, phase)
            raise
        self.coord.deliver(client_id, phase, header, receiver.tensors())
        log.info("round %d: client %d sent %s", header.round, client_id, phase.name)

    def _receive(self, header: pb.UpdateHeader, slot, messages: _Counted) -> Update:
        """Stream the data into the answer row; the Receiver refuses NaN/Inf, overflow and truncation."""
        receiver = Receiver(header.buffers, into=slot.answer)
        for msg in messages:
            if not isinstance(msg, Data):
                raise Refused("a second header inside one update")
            receiver.add(msg.payload)
        receiver.tensors()
        return Update(slot.client_id, header.num_examples, header.train_loss)


def check_report(header: pb.UpdateHeader | pb.SecAggHeader) -> None:
    """The example count and loss a client reports: finite float32s, at least one example."""
    if not (fits_float32(header.num_examples) and header.num_examples >= 1):
        raise Refused(f"num_examples must be a number from 1 to {FLOAT32_MAX:g} (a float32), "
                      f"got {header.num_examples}")
    if not fits_float32(header.train_loss):
        raise Refused(f"train_loss must be a finite float32 (at most {FLOAT32_MAX:g} in size), "
                      f"got {header.train_loss}")
