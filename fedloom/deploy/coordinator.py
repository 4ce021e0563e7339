"""The round as the server sees it: which client holds which task, who has
submitted, whose connection broke. No gRPC here: the servicer's threads and the
round loop meet on one condition variable.

A round closes when every sampled client has submitted; at its deadline; or,
once at least ``min_clients`` updates are in, when every client still missing
has no connection (it was killed or cut off during the round, or had been
connected before and was gone when the round began; waiting for it helps
nobody). A client never seen yet is waited for: it may still be starting. A
client that reconnects while its round is open gets its task again. A round
that reaches its deadline with fewer than ``min_clients`` updates fails: none
of them is used, the model stays as it was (the runner stops the run after
``max_failed_rounds`` such rounds in a row).

With secure aggregation a round is four phases (fedloom.deploy.secagg drives them): each phase
pushes its message to the clients still in (``open_phase``) and closes (``close_phase``) when
they have all answered, at its own deadline, or when every one still missing has no connection;
a client missing at the close has dropped at that phase. Each answer is checked by the protocol
(``check``) before it is taken: a malformed or oversized one is refused naming the client and phase.

When the run ends every subscription is told why: FINISHED (clients exit) or
INTERRUPTED (clients keep trying to reconnect, for a server resumed with
``--resume``).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from fedloom.deploy import deploy_pb2 as pb
from fedloom.deploy.messages import Refused

log = logging.getLogger("fedloom.deploy")

DONE = "done"  # wait_for_task: the run is over
REPLACED = "replaced"  # wait_for_task: a newer connection of the same client took over
FINISHED = "finished"  # finish(): the run completed
INTERRUPTED = "interrupted"  # finish(): the server stops before the end (Ctrl-C, an error); it may be resumed


@dataclass
class Task:
    """A client's task in a round: the header, the tensors to send and the row its update streams into."""

    header: pb.TaskHeader
    tensors: list[tuple[str, Tensor]]  # params, what the algorithm broadcasts, the client's state
    answer: Tensor  # the client's row of the round's matrix: its update is written there as it streams in


@dataclass
class Update:
    """An accepted answer; its values are in the task's ``answer`` row."""

    client_id: int
    n_examples: float
    train_loss: float


@dataclass
class Slot:
    """A claim on one client's answer row while its update streams in: one stream per client at a time."""

    round: _Round
    client_id: int
    expected: list[tuple[str, str, int]]
    answer: Tensor


@dataclass
class Outgoing:
    """A secure-aggregation phase message to one client: its header, then ``payload`` in data chunks."""

    header: pb.SecAggHeader
    payload: bytes

    @property
    def key(self) -> str:
        """The message's task and phase, one key per pending message."""
        return f"{self.header.task_id}/{self.header.phase}"


@dataclass
class Phase:
    """One open secure-aggregation phase: who is asked, what has come in, and the protocol's checks."""

    index: int
    name: str
    expected: set[int]
    check: Callable[[str, int, bytes], None]  # raises ValueError on a bad message
    max_bytes: Callable[[str, int], int]
    outbox: dict[int, Outgoing] = field(default_factory=dict)
    inbox: dict[int, bytes] = field(default_factory=dict)
    receiving: set[int] = field(default_factory=set)
    closed: bool = False


@dataclass
class Participation:
    """Who took part in a closed round (submitted, dropped, disconnected, refused), the bytes each way, and
    whether it failed."""

    submitted: list[int]
    dropped: list[int]  # sampled but no accepted update when the round closed
    disconnected: list[int]  # of the dropped, those with no connection: it broke during the round or never was
    refused: list[int]  # sent at least one update that was refused
    bytes_up: int
    bytes_down: int
    failed: bool = False  # the deadline passed with fewer than min_clients updates: the round changes nothing

    def record(self) -> dict:
        """The round's participation as metrics (client lists and counts, wire bytes, round_failed)."""
        return {"round_failed": self.failed, "clients_submitted": self.submitted, "clients_dropped": self.dropped,
                "clients_disconnected": self.disconnected, "clients_refused": self.refused,
                "n_submitted": len(self.submitted), "n_dropped": len(self.dropped),
                "wire_bytes_up": self.bytes_up, "wire_bytes_down": self.bytes_down}


@dataclass
class _Round:
    index: int = 0
    tasks: dict[int, Task] = field(default_factory=dict)
    updates: dict[int, Update] = field(default_factory=dict)
    expected: list[tuple[str, str, int]] = field(default_factory=list)  # (name, dtype, length) of a valid update
    lost: set[int] = field(default_factory=set)  # sampled clients without a connection
    streaming: set[int] = field(default_factory=set)  # clients whose update is arriving
    refused: set[int] = field(default_factory=set)
    phase: Phase | None = None  # secure aggregation's current phase
    reports: dict[int, tuple[float, float]] = field(default_factory=dict)  # secagg: (num_examples, train_loss)
    bytes_up: int = 0
    bytes_down: int = 0


class Coordinator:
    """The state of the current round shared by the servicer's threads and the round loop (module docstring):
    live subscriptions, tasks, updates in and the round's closing."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._round = _Round()
        self._live: dict[int, object] = {}  # client id -> its current subscription
        self._seen: set[int] = set()  # clients that have subscribed at least once
        self._finished = False
        self.finish_reason = FINISHED

    # -- connections -------------------------------------------------------------------------------------------
    def connect(self, client_id: int) -> object:
        """Register a subscription; an older one of the same client ends."""
        handle = object()
        with self._cond:
            self._live[client_id] = handle
            self._seen.add(client_id)
            self._round.lost.discard(client_id)
            self._cond.notify_all()
        return handle

    def disconnect(self, client_id: int, handle: object) -> None:
        """A client's subscription ``handle`` ended; if it held a task of the open round it counts as lost."""
        with self._cond:
            if self._live.get(client_id) is not handle:
                return
            del self._live[client_id]
            r = self._round
            if client_id in r.tasks and client_id not in r.updates:
                r.lost.add(client_id)
                log.warning("client %d disconnected during round %d", client_id, r.index)
            self._cond.notify_all()

    def wait_for_task(self, client_id: int, handle: object, sent: set[str], timeout: float):
        """What this subscription has to send next and has not sent (``sent``: the task ids and phase
        messages' keys it sent): the client's open task, or its secure-aggregation phase message; DONE,
        REPLACED, or None on timeout."""
        with self._cond:
            item = self._pending(client_id, handle, sent)
            if item is None:
                self._cond.wait(timeout)
                item = self._pending(client_id, handle, sent)
            return item

    def _pending(self, client_id: int, handle: object, sent: set[str]):
        if self._finished:
            return DONE
        if self._live.get(client_id) is not handle:
            return REPLACED
        r = self._round
        task = r.tasks.get(client_id)
        if task is None or client_id in r.updates:
            return None
        if task.header.task_id not in sent:
            return task
        out = r.phase.outbox.get(client_id) if r.phase is not None else None
        return out if out is not None and out.key not in sent else None

    def finish(self, reason: str = FINISHED) -> None:
        """End every subscription with ``reason``: FINISHED or INTERRUPTED."""
        if reason not in (FINISHED, INTERRUPTED):
            raise ValueError(f"finish reason {reason!r}: use {FINISHED!r} or {INTERRUPTED!r}")
        with self._cond:
            self._finished = True
            self.finish_reason = reason
            self._cond.notify_all()

    # -- rounds ------------------------------------------------------------------------------------------------
    def open_round(self, index: int, tasks: dict[int, Task], expected: list[tuple[str, str, int]]) -> None:
        """Open round ``index`` with a task per sampled client and the update layout expected back."""
        with self._cond:
            absent = (set(tasks) - set(self._live)) & self._seen
            if absent:
                log.warning("round %d: clients %s lost their connection; the round will not wait for them",
                            index, sorted(absent))
            self._round = _Round(index, tasks, expected=expected, lost=absent)
            self._cond.notify_all()

    def close_round(self, timeout_s: float, min_clients: int) -> tuple[list[Update], Participation]:
        """Wait until the round may close (module docstring), then close it: later submissions are stale."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            r = self._round
            while not self._may_close(r, deadline, min_clients):
                self._cond.wait(max(0.05, min(1.0, deadline - time.monotonic())))
            missing = sorted(set(r.tasks) - set(r.updates))
            updates = [r.updates[c] for c in sorted(r.updates)]
            failed = bool(missing) and len(updates) < min_clients  # everyone sampled answering is never a failure
            if failed:
                log.warning("round %d failed: the deadline passed with %d of the %d updates needed; the model "
                            "stays as it was", r.index, len(updates), min_clients)
            return updates, self._end(sorted(r.updates), failed)

    def _end(self, submitted: list[int], failed: bool) -> Participation:
        """Close the round (later messages are stale); who took part, as ``submitted`` says."""
        r = self._round
        missing = sorted(set(r.tasks) - set(submitted))
        self._round = _Round(r.index)
        return Participation(submitted, missing, sorted(r.lost & set(missing)), sorted(r.refused), r.bytes_up,
                             r.bytes_down, failed)

    def end_secure_round(self, summed: list[int], failed: bool) -> tuple[Participation, dict[int, tuple]]:
        """Close a secure-aggregation round: ``summed``, the clients whose inputs the sum holds, took part;
        and the (num_examples, train_loss) each reported."""
        with self._cond:
            reports = dict(self._round.reports)
            return self._end(summed, failed), reports

    # -- secure aggregation's phases ---------------------------------------------------------------------------
    def open_phase(self, phase: Phase, outgoing: dict[int, bytes], announce: dict) -> None:
        """Ask ``phase.expected`` for their messages of ``phase``: send each its ``outgoing`` bytes (none
        for the first phase, which the task itself asks for) under a header with ``announce``'s fields."""
        with self._cond:
            r = self._round
            for c, payload in outgoing.items():
                header = pb.SecAggHeader(round=r.index, task_id=r.tasks[c].header.task_id, client_id=c,
                                         phase=phase.index, length=len(payload), **announce)
                phase.outbox[c] = Outgoing(header, payload)
            r.phase = phase
            self._cond.notify_all()

    def close_phase(self, timeout_s: float) -> dict[int, bytes]:
        """The phase's messages, once every client asked answered, at the deadline, or when all that are
        missing have no connection (a client that reconnects has lost its protocol state: waiting is useless)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            r, phase = self._round, self._round.phase
            while (phase.expected - set(phase.inbox)) - r.lost and time.monotonic() < deadline:
                self._cond.wait(max(0.05, min(1.0, deadline - time.monotonic())))
            phase.closed = True
            dropped = sorted(phase.expected - set(phase.inbox))
            if dropped:
                log.warning("round %d: clients %s dropped at secure aggregation's %s phase", r.index, dropped,
                            phase.name)
            return dict(phase.inbox)

    def claim_phase(self, client_id: int, header: pb.SecAggHeader) -> Phase:
        """Refuse a phase message that does not answer this client's open phase, or announces more bytes than
        the phase allows; else the phase it goes to."""
        with self._cond:
            self._check_task(client_id, header)
            phase = self._round.phase
            name = phase.name if phase is not None and phase.index == header.phase else str(header.phase)
            if phase is None or phase.index != header.phase or phase.closed:
                raise Refused(f"client {client_id}, phase {name}: that phase is not open in round {header.round}")
            if client_id not in phase.expected or client_id in phase.inbox or client_id in phase.receiving:
                raise Refused(f"client {client_id}, phase {name}: not asked, already answered, or answering")
            limit = phase.max_bytes(phase.name, client_id)
            if header.length > limit:
                raise Refused(f"client {client_id}, phase {name}: {header.length} bytes announced, at most {limit}")
            phase.receiving.add(client_id)
            return phase

    def deliver(self, client_id: int, phase: Phase, header: pb.SecAggHeader, payload: bytes) -> None:
        """Take a complete phase message the protocol's check accepts, unless its phase closed meanwhile."""
        with self._cond:
            phase.receiving.discard(client_id)
            if phase.closed or phase is not self._round.phase:
                raise Refused(f"client {client_id}, phase {phase.name}: the phase closed while the message arrived")
            try:
                phase.check(phase.name, client_id, payload)
            except ValueError as err:
                raise Refused(f"client {client_id}, phase {phase.name}: {err}") from None
            phase.inbox[client_id] = payload
            if phase.index == 0:
                self._round.reports[client_id] = (header.num_examples, header.train_loss)
            self._cond.notify_all()

    def abandon(self, client_id: int, phase: Phase) -> None:
        """The client will not answer the phase (its connection is gone): stop waiting for it."""
        with self._cond:
            phase.receiving.discard(client_id)

    @staticmethod
    def _may_close(r: _Round, deadline: float, min_clients: int) -> bool:
        missing = set(r.tasks) - set(r.updates)
        if not missing or time.monotonic() >= deadline:
            return True
        return len(r.updates) >= min_clients and missing <= r.lost

    # -- submissions -------------------------------------------------------------------------------------------
    def claim(self, client_id: int, header: pb.UpdateHeader) -> Slot:
        """Refuse an update that does not answer this client's open task (stale, replayed, foreign,
        unknown, or a second stream at once); else the row its data goes to and the layout it must have."""
        with self._cond:
            task = self._check_task(client_id, header)
            r = self._round
            if client_id in r.streaming:
                raise Refused(f"an update from client {client_id} is already streaming in")
            r.streaming.add(client_id)
            return Slot(r, client_id, list(r.expected), task.answer)

    def _check_task(self, client_id: int, header: pb.UpdateHeader | pb.SecAggHeader) -> Task:
        r = self._round
        if header.client_id != client_id:
            raise Refused(f"header names client {header.client_id}, the connection is client {client_id}")
        if header.round != r.index:
            raise Refused(f"update for round {header.round}, the open round is {r.index}")
        task = r.tasks.get(client_id)
        if task is None:
            raise Refused(f"client {client_id} has no task in round {r.index}")
        if not hmac.compare_digest(header.task_id.encode(), task.header.task_id.encode()):
            raise Refused(f"task id does not match the task client {client_id} was given in round {r.index}")
        if client_id in r.updates:
            raise Refused(f"client {client_id} already submitted for round {r.index} (replay)")
        return task

    def accept(self, slot: Slot, update: Update) -> None:
        """Take a complete, checked update, unless its round closed while it streamed in."""
        with self._cond:
            if slot.round is not self._round:
                raise Refused(f"round {slot.round.index} closed while the update streamed in")
            self._round.updates[update.client_id] = update
            self._cond.notify_all()

    def release(self, slot: Slot) -> None:
        """The update stream holding ``slot`` has ended (accepted or not): the client may stream again."""
        with self._cond:
            slot.round.streaming.discard(slot.client_id)

    def note_refused(self, client_id: int) -> None:
        """Record that the client sent an update the server refused in this round."""
        with self._cond:
            if client_id in self._round.tasks:
                self._round.refused.add(client_id)

    def count(self, up: int = 0, down: int = 0) -> None:
        """Bytes that crossed the wire while the current round was open."""
        with self._cond:
            self._round.bytes_up += up
            self._round.bytes_down += down
