"""Secure aggregation over gRPC: the phases of ``fedloom.privacy.secagg`` between ``fedloom server`` and
its ``fedloom client`` processes, with the simulation's own code on both sides.

Server: :func:`secure_round` hands out the round's tasks, then plays ``serve_phases`` (the simulation's
driver) with an exchange that pushes each phase's messages down the clients' subscriptions and gathers
their answers through the coordinator, one deadline (``deploy.round_timeout_s``) a phase. A client that
has not answered at a phase's close has dropped there, and the protocol goes on with the others as in the
paper; below the threshold the round fails and changes nothing. The server's code path receives public
keys, sealed shares, masked vectors y_u and revealed shares only: a client's row never leaves it.

Client: :class:`ClientSession` trains as for a plain task (``Trainer.local_update``: the same local
training and client-side transforms), keeps its row, and answers each phase with
``secagg_round.answer`` and ``encode_row`` (the simulation's functions), so the quantized sum is the
simulation's for the same survivors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import struct
from dataclasses import dataclass

import torch
from cryptography.exceptions import InvalidTag
from torch import Tensor

from fedloom.deploy import deploy_pb2 as pb
from fedloom.deploy.coordinator import Coordinator, Participation, Phase, Task
from fedloom.deploy.messages import byte_chunks
from fedloom.pipeline.base import Context, Pipeline
from fedloom.privacy.secagg import Params, ProtocolAborted, SecAggClient, SecAggServer
from fedloom.privacy.secagg_round import (PHASES, Costs, Outcome, SecureMean, answer, encode_row, graph_seed, phases,
                                          round_params, secure_mean, serve_phases)

log = logging.getLogger("fedloom.deploy")


@dataclass(frozen=True)
class SecureRound:
    """What a secure round needs on the server: the secure mean's settings, the run's seed, the
    public weight bound w_max the clients quantize with, and a phase's deadline."""

    spec: SecureMean
    seed: int
    max_weight: float
    timeout_s: float


def secure_round(coord: Coordinator, setup: SecureRound, round_idx: int, tasks: dict[int, Task],
                 dim: int) -> tuple[Outcome, Participation, dict[int, tuple[float, float]]]:
    """Play one round's four phases with the clients of ``tasks``: the outcome (the survivors' ring sum, or
    the failure), who took part (the summed clients), and each client's reported (examples, loss)."""
    coord.open_round(round_idx, tasks, expected=[])
    params = round_params(setup.spec, len(tasks), dim)
    server = SecAggServer(params, graph_seed(setup.seed, round_idx))
    announce = {"threshold": params.threshold, "max_weight": setup.max_weight}

    def exchange(phase: str, outgoing: dict[int, bytes] | None) -> dict[int, bytes]:
        asked = set(tasks if outgoing is None else outgoing)
        coord.open_phase(Phase(PHASES.index(phase), phase, asked, server.check, server.max_bytes),
                         outgoing or {}, announce)
        return coord.close_phase(setup.timeout_s)

    outcome = serve_phases(server, exchange, Costs(clients_timed=False, played=phases(params)))
    if outcome.total is None:
        log.warning("round %d: secure aggregation failed (%s); the model stays as it was", round_idx,
                    outcome.failure)
    participation, reports = coord.end_secure_round(outcome.summed, outcome.total is None)
    return outcome, participation, reports


def deployed_pipeline(server_side: Pipeline, spec: SecureMean, extra_metrics, outcome_of) -> Pipeline:
    """The server's pipeline in a secure deployment: ``aggregate:secagg`` reads the protocol's outcome
    (``outcome_of()``, the engine's for the round) instead of running it, and ``validate`` goes: the
    server has no rows to check (the engine hands it a matrix without columns)."""
    deployed = secure_mean(spec, extra_metrics, protocol=lambda spec, U, w, ctx: outcome_of())
    steps = [deployed if t.name.startswith("aggregate:secagg") else t for t in server_side.transforms
             if t.name != "validate"]
    return Pipeline(tuple(steps))


@dataclass
class ClientSession:
    """One client's side of one round's secure aggregation: its trained row stays here; only the
    protocol's messages leave."""

    client_id: int
    task: pb.TaskHeader
    spec: SecureMean
    row: Tensor
    weight: float
    ctx: Context
    protocol: SecAggClient | None = None

    def advertise(self, train_loss: float) -> list:
        """Phase 0's messages: the header (with the example count and loss the metrics report), the keys."""
        params = Params(self.spec.quantizer.bits, self.row.numel() + 1, 1, consistency=self.spec.consistency)
        self.protocol = SecAggClient(self.client_id, params)
        return self._messages(0, answer(self.protocol, "advertise", None, None), num_examples=self.weight,
                              train_loss=train_loss)

    def respond(self, header: pb.SecAggHeader, payload: bytes) -> list:
        """The answer to the server's message of a phase after the first."""
        if not 1 <= header.phase < len(PHASES):
            raise ValueError(f"phase {header.phase} is not one the server asks a client for")
        phase = PHASES[header.phase]
        if phase == "share_keys":
            self._take_parameters(header)
        x = encode_row(self.spec, self.row, self.weight, self.ctx, self.client_id) if phase == "masked_input" else None
        return self._messages(header.phase, answer(self.protocol, phase, payload, x))

    def _take_parameters(self, header: pb.SecAggHeader) -> None:
        """The round's threshold and w_max, announced with phase 1."""
        if not (math.isfinite(header.max_weight) and header.max_weight > 0) or header.threshold < 1:
            raise ValueError(f"threshold {header.threshold} and max_weight {header.max_weight}: a threshold of "
                             "at least 1 and a positive, finite weight bound are needed")
        self.spec = dataclasses.replace(self.spec, max_weight=header.max_weight)
        self.protocol = dataclasses.replace(self.protocol, params=dataclasses.replace(
            self.protocol.params, threshold=header.threshold))

    def _messages(self, phase: int, payload: bytes, **report: float) -> list:
        head = pb.SecAggHeader(round=self.task.round, task_id=self.task.task_id, client_id=self.client_id,
                               phase=phase, length=len(payload), **report)
        return [pb.ClientMessage(secagg=head), *byte_chunks(payload)]


def client_step(sessions: dict[str, ClientSession], header: pb.SecAggHeader, payload: bytes) -> list | None:
    """A deployed client's answer to a phase message, or None (logged) when it cannot take part: no
    session for that task, or the protocol aborts (a group below the threshold, shares that do not open)."""
    session = sessions.get(header.task_id)
    if session is None or header.round != session.task.round:
        log.warning("client: a secure-aggregation message for a task it does not hold (round %d)", header.round)
        return None
    try:
        return session.respond(header, payload)
    except (ProtocolAborted, ValueError, KeyError, InvalidTag, struct.error) as err:  # wire bytes that do not fit
        log.warning("client %d: round %d's secure aggregation stops here: %s", session.client_id, header.round,
                    err or type(err).__name__)
        del sessions[header.task_id]
        return None


def no_rows(n: int) -> Tensor:
    """The rows a secure round hands the server's pipeline: ``n`` rows without columns."""
    return torch.zeros(n, 0)
