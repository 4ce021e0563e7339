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

When the run ends every subscription is told why: FINISHED (clients exit) or
INTERRUPTED (clients keep trying to reconnect, for a server resumed with
``--resume``).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
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

    def wait_for_task(self, client_id: int, handle: object, last_task_id: str | None, timeout: float):
        """The client's open task if this subscription has not sent it yet, DONE, REPLACED, or None on timeout."""
        with self._cond:
            task = self._pending_task(client_id, handle, last_task_id)
            if task is None:
                self._cond.wait(timeout)
                task = self._pending_task(client_id, handle, last_task_id)
            return task

    def _pending_task(self, client_id: int, handle: object, last_task_id: str | None):
        if self._finished:
            return DONE
        if self._live.get(client_id) is not handle:
            return REPLACED
        task = self._round.tasks.get(client_id)
        if task is None or client_id in self._round.updates or task.header.task_id == last_task_id:
            return None
        return task

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
            self._round = _Round(r.index)
            updates = [r.updates[c] for c in sorted(r.updates)]
            failed = bool(missing) and len(updates) < min_clients  # everyone sampled answering is never a failure
            if failed:
                log.warning("round %d failed: the deadline passed with %d of the %d updates needed; the model "
                            "stays as it was", r.index, len(updates), min_clients)
            return updates, Participation(sorted(r.updates), missing, sorted(r.lost & set(missing)),
                                          sorted(r.refused), r.bytes_up, r.bytes_down, failed)

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

    def _check_task(self, client_id: int, header: pb.UpdateHeader) -> Task:
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
