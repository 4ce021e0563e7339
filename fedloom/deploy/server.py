"""``fedloom server``: the runner's loop with its clients in other processes.

The server plays a :class:`~fedloom.rounds.federated.FederatedRound` (same data,
model, ParamSpec, algorithm, pipeline, evaluation and run directory as a
simulation) whose engine is :class:`RemoteEngine`: ``run_round`` hands each
sampled client a task over gRPC and returns the updates that came back as the
usual RoundResult. The runner checkpoints the state tree after every round
(``checkpoint.every`` defaults to 1 here: a deployed round costs real clients'
work), so ``--resume RUN_DIR`` continues a crashed run to the same result.
"""

from __future__ import annotations

import json
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from torch import Tensor

from fedloom.builders import local_training
from fedloom.config import ConfigError, ExperimentConfig, load_config
from fedloom.core.store import ClientStore
from fedloom.deploy import deploy_pb2 as pb
from fedloom.deploy.coordinator import FINISHED, INTERRUPTED, Coordinator, Participation, Task
from fedloom.deploy.messages import (MAX_MESSAGE_BYTES, describe, layout, local_to_proto, prefixed, result_tensors,
                                     split)
from fedloom.deploy.security import ServerTLS
from fedloom.deploy.servicer import Servicer, add_to_server
from fedloom.engines.base import RoundResult
from fedloom.rounds.federated import FederatedRound
from fedloom.runner import RunResult, drive
from fedloom.tracking.rundir import CONFIG

log = logging.getLogger("fedloom.deploy")


class RemoteEngine:
    """An engine whose clients are other processes. The clients' persistent states (e.g. SCAFFOLD's
    control variates) stay in the server's state tree (the ``store`` of each round), so a restarted
    client or server loses nothing."""

    name = "grpc"

    def __init__(self, coordinator: Coordinator, cfg: ExperimentConfig, n_classes: int, max_examples: int):
        self.coord = coordinator
        self.deploy = cfg.deploy  # when a round closes
        self.local = local_to_proto(local_training(cfg))
        self.config_json = json.dumps(task_sections(cfg))
        self.n_classes = n_classes
        self.max_examples = float(max_examples)
        self.secure = None  # fedloom.deploy.secagg.SecureRound: the clients send masked inputs, not rows
        self.outcome = None  # the last secure round's protocol outcome, for the pipeline's aggregate:secagg
        self.participation: Participation | None = None
        self.reported: list[float] = []

    def run_round(self, algorithm, x0: Tensor, sent: dict[str, Tensor], client_ids: list[int],
                  round_idx: int, store: ClientStore) -> RoundResult:
        """Send the round's tasks to the connected clients, wait for the round to close (deadline, min_clients) and
        return the accepted updates as the round's result."""
        shared = [("params", x0.clone()), *[(f"sent/{k}", v.clone()) for k, v in sent.items()]]
        if self.secure is not None:
            return self._secure_round(x0, shared, client_ids, round_idx, store)
        expected = expected_layout(algorithm, x0, sent)
        answers = torch.zeros(len(client_ids), sum(n for _, _, n in expected))  # touched now, not mid-stream
        tasks = {cid: self._task(round_idx, cid, shared, answers[i], store) for i, cid in enumerate(client_ids)}
        self.coord.open_round(round_idx, tasks, expected)
        log.info("round %d: tasks out to clients %s", round_idx, client_ids)
        updates, self.participation = self.coord.close_round(self.deploy.round_timeout_s, self.deploy.min_clients)
        if self.participation.failed:  # too few: none of them is used, so the model and the client states stay
            updates = []
        ids = [u.client_id for u in updates]
        rows = answers if ids == client_ids else answers[[client_ids.index(c) for c in ids]]
        columns = split(rows, expected)
        for i, cid in enumerate(ids):
            store.put(cid, {k: v[i].clone() for k, v in prefixed(columns, "state").items()})
        self.reported = [u.n_examples for u in updates]
        return RoundResult(ids, columns["update"], self._weights(self.reported), prefixed(columns, "aux"),
                           torch.tensor([u.train_loss for u in updates]))

    def _secure_round(self, x0: Tensor, shared: list[tuple[str, Tensor]], client_ids: list[int], round_idx: int,
                      store: ClientStore) -> RoundResult:
        """The round's secure aggregation (fedloom.deploy.secagg): the server gets the survivors' sum, and
        the pipeline rows without columns, one per summed client."""
        from fedloom.deploy.secagg import no_rows, secure_round

        tasks = {cid: self._task(round_idx, cid, shared, torch.zeros(0), store) for cid in client_ids}
        log.info("round %d: tasks out to clients %s", round_idx, client_ids)
        self.outcome, self.participation, reports = secure_round(self.coord, self.secure, round_idx, tasks,
                                                                 x0.numel())
        ids = self.outcome.summed if self.outcome.total is not None else []
        self.reported = [reports[c][0] for c in ids]
        return RoundResult(ids, no_rows(len(ids)), self._weights(self.reported), {},
                           torch.tensor([reports[c][1] for c in ids]))

    def _weights(self, reported: list[float]) -> Tensor:
        """A client's example count is its own claim: capped (one client claiming 1e18 examples must not
        own the average), or ignored with deploy.weighting = "uniform"."""
        if self.deploy.weighting == "uniform":
            return torch.ones(len(reported))
        return torch.tensor(reported, dtype=torch.float32).clamp(max=self.max_examples)

    def _task(self, round_idx: int, client_id: int, shared: list[tuple[str, Tensor]], answer: Tensor,
              store: ClientStore) -> Task:
        state = store.states.get(client_id, {})
        tensors = shared + [(f"state/{k}", v) for k, v in state.items()]
        header = pb.TaskHeader(round=round_idx, task_id=secrets.token_hex(16), client_id=client_id,
                               local=self.local, config_json=self.config_json, n_classes=self.n_classes,
                               buffers=describe(tensors))
        return Task(header, tensors, answer)

    def round_record(self) -> dict:
        """Participation, the example counts clients reported (and how many were capped), and the bytes
        that really crossed the wire, for the round's metrics."""
        return {**self.participation.record(), "reported_examples": self.reported,
                "n_examples_capped": sum(n > self.max_examples for n in self.reported)}


def task_sections(cfg: ExperimentConfig) -> dict:
    """The config a task carries: what a client builds its model, training and own transforms from."""
    raw = cfg.to_dict()
    task = {k: raw[k] for k in ("seed", "model", "task", "algorithm")}
    if cfg.privacy.mechanism in ("local", "distributed"):  # the client clips and noises its own row: resolved
        task["privacy"] = {"mechanism": cfg.privacy.mechanism, "clip": cfg.privacy.clip,
                           "noise_multiplier": cfg.privacy_noise_multiplier()}
    if cfg.secure_aggregation.protocol != "none":  # the client quantizes and masks its row
        task["secure_aggregation"] = raw["secure_aggregation"]
    return task


def expected_layout(algorithm, x0: Tensor, sent: dict[str, Tensor]) -> list[tuple[str, str, int]]:
    """The buffers a valid answer holds, from a dry run of the algorithm's client_result
    on a client that did not move."""
    row, aux, state = algorithm.client_result(x0, x0, torch.tensor(1), 1.0, sent, algorithm.client_init(x0.numel()))
    return layout(describe(result_tensors(row, aux, state)))


def remote_round(cfg: ExperimentConfig, coordinator: Coordinator) -> FederatedRound:
    """The federated round of ``cfg`` with its clients behind ``coordinator``."""
    def engine(model, data):
        cap = cfg.deploy.max_examples_per_client or int(data.client_sizes().max())
        return RemoteEngine(coordinator, cfg, data.n_classes, cap)

    round_ = FederatedRound(cfg, make_engine=engine)
    round_.pipeline = round_.pipeline.on("server")  # the clients ran their side (local DP) before sending
    if cfg.secure_aggregation.protocol != "none":
        _secure(round_, cfg)
    return round_


def _secure(round_: FederatedRound, cfg: ExperimentConfig) -> None:
    """Make ``round_`` a secure deployment: its engine plays the protocol with the clients, its pipeline's
    aggregate reads the outcome. w_max is the largest client's size, as in simulation (1 with
    deploy.weighting = "uniform": every client's weight is then the bound, p = 1)."""
    from fedloom.deploy.secagg import SecureRound, deployed_pipeline
    from fedloom.pipeline.build import secure_mean_spec

    max_weight = float(round_.data.client_sizes().max())
    spec, extra_metrics = secure_mean_spec(cfg, max_weight)
    bound = 1.0 if cfg.deploy.weighting == "uniform" else max_weight
    round_.engine.secure = SecureRound(spec, cfg.seed, bound, cfg.deploy.round_timeout_s)
    round_.pipeline = deployed_pipeline(round_.pipeline, spec, extra_metrics, lambda: round_.engine.outcome)


# a peer that stops answering pings (hung, cut off) has its streams closed within about 10 s, so its
# round stops waiting for it (grpc.http2.ping_timeout_ms, not keepalive_timeout_ms, bounds the wait
# for a ping's answer: 60 s by default)
KEEPALIVE = [("grpc.keepalive_time_ms", 5_000), ("grpc.keepalive_timeout_ms", 5_000),
             ("grpc.http2.ping_timeout_ms", 5_000),
             ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
             ("grpc.http2.min_recv_ping_interval_without_data_ms", 4_000)]


def start_grpc(servicer: Servicer, address: str, tls: ServerTLS | None, workers: int) -> tuple[grpc.Server, int]:
    """Listen on ``address``; every subscribed client holds a worker thread, so ``workers``
    must cover them all plus their submissions."""
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), interceptors=[servicer.gate],
                         maximum_concurrent_rpcs=workers,
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.so_reuseport", 0), *KEEPALIVE])
    add_to_server(servicer, server)
    try:
        port = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"cannot listen on {address}: {err}") from None
    if tls is None:
        log.warning("serving without TLS on %s: tokens and models cross the network in the clear", address)
    server.start()
    return server, port


def serve(config=None, address: str = "127.0.0.1:8080", tokens: dict[int, str] | None = None,
          tls: ServerTLS | None = None, resume: str | Path | None = None, overrides: list[str] = ()) -> RunResult:
    """Run the experiment with remote clients to the end (or to Ctrl-C), like fedloom.runner.run;
    its ``[deploy]`` section says when a round closes."""
    if not tokens:
        raise ConfigError("the server needs client tokens (--tokens FILE with 'client_id token' lines)")
    cfg = load_config(Path(resume) / CONFIG if resume else config, list(overrides))
    if cfg.checkpoint.every is None:
        cfg = load_config(cfg, ["checkpoint.every=1"])
    _check(cfg, tokens)
    coordinator = Coordinator()
    round_ = remote_round(cfg, coordinator)
    server, port = start_grpc(Servicer(coordinator, tokens), address, tls, workers=2 * len(tokens) + 4)
    reason = INTERRUPTED  # what clients are told unless the run completes: stay, the server may come back
    try:
        log.info("listening on %s (port %d); rounds up to %d%s", address, port, cfg.rounds,
                 f", resuming {resume}" if resume else "")
        result = drive(round_, resume, on_round=lambda record: _log_round(record, cfg.rounds))
        if result.summary["status"] == "completed":
            reason = FINISHED
        return result
    finally:
        coordinator.finish(reason)
        server.stop(grace=5).wait(10)


def _check(cfg: ExperimentConfig, tokens: dict[int, str]) -> None:
    if cfg.mode != "federated":
        raise ConfigError(f"mode = {cfg.mode!r}: the server coordinates federated runs only")
    if cfg.data.n_clients is None:
        raise ConfigError("data.n_clients: the server's clients take ids 0..n_clients-1; set it (a natural "
                          "partition's number of clients)")
    if cfg.compression.build() is not None or cfg.compression.downlink != "none":
        raise ConfigError("compression: deployed clients send and receive fp32; set compression.name = 'none', "
                          "no compression.feedback and no compression.downlink")
    if cfg.personalization.method != "none":
        raise ConfigError(f"personalization.method = {cfg.personalization.method!r}: deployed clients keep no "
                          "personal parameters yet; personalization runs in simulation (fedloom run)")
    if cfg.attack.name != "none":
        raise ConfigError("attack: simulated Byzantine clients belong to simulations; a deployment's clients "
                          "are real (remove the [attack] table)")
    if not cfg.output.save:
        raise ConfigError("output.save = false: the server keeps its checkpoints in the run directory")
    if cfg.deploy.min_clients > cfg.clients_per_round():
        raise ConfigError(f"deploy.min_clients = {cfg.deploy.min_clients} is more than the "
                          f"{cfg.clients_per_round()} clients sampled a round (sampling.clients_per_round)")
    stray = sorted(c for c in tokens if c >= cfg.data.n_clients)
    if stray:
        raise ConfigError(f"tokens for client ids {stray}, but data.n_clients = {cfg.data.n_clients} "
                          f"(ids 0..{cfg.data.n_clients - 1})")


def _log_round(record: dict, rounds: int) -> None:
    accuracy = record.get("central_accuracy")
    log.info("round %d/%d: %d submitted, dropped %s%s", record["round"], rounds, record["n_submitted"],
             record["clients_dropped"] or "none", "" if accuracy is None else f", central accuracy {accuracy:.4f}")


if __name__ == "__main__":
    import sys

    from fedloom.deploy.cli import main

    sys.exit(main(["server", *sys.argv[1:]]))
