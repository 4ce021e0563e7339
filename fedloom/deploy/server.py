"""``fedloom server``: the experiment loop of fedloom.experiment with its
clients in other processes.

The server is an :class:`~fedloom.experiment.Experiment` (same data, model,
ParamSpec, algorithm, aggregator, evaluation and run directory) whose engine is
:class:`RemoteEngine`: ``run_round`` hands each sampled client a task over gRPC
and returns the updates that came back as the usual RoundResult. After every
round the server checkpoints atomically into the run directory, so
``--resume RUN_DIR`` continues a crashed run to the same result.
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

from fedloom.config import ConfigError, ExperimentConfig, load_config
from fedloom.core.store import ClientState
from fedloom.deploy import deploy_pb2 as pb
from fedloom.deploy.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fedloom.deploy.coordinator import Coordinator, Participation, Task
from fedloom.deploy.messages import (MAX_MESSAGE_BYTES, describe, layout, local_to_proto, prefixed, result_tensors,
                                     split)
from fedloom.deploy.security import ServerTLS
from fedloom.deploy.servicer import Servicer, add_to_server
from fedloom.engines.base import RoundResult
from fedloom.builders import local_training
from fedloom.experiment import Experiment, RunResult, _summary
from fedloom.tracking import RunDir, read_metrics, render_report
from fedloom.tracking.rundir import CONFIG, METRICS

log = logging.getLogger("fedloom.deploy")


class RemoteEngine:
    """An engine whose clients are other processes; the server holds their state between rounds
    (e.g. SCAFFOLD's control variates), so a restarted client or server loses nothing."""

    name = "grpc"

    def __init__(self, coordinator: Coordinator, cfg: ExperimentConfig, n_classes: int):
        self.coord = coordinator
        self.deploy = cfg.deploy  # when a round closes
        self.local = local_to_proto(local_training(cfg))
        raw = cfg.to_dict()
        self.config_json = json.dumps({k: raw[k] for k in ("seed", "model", "algorithm")})
        self.n_classes = n_classes
        self.client_states: dict[int, ClientState] = {}
        self.participation: Participation | None = None
        self.wire_up_total = self.wire_down_total = 0

    def run_round(self, algorithm, x0: Tensor, sent: dict[str, Tensor], client_ids: list[int],
                  round_idx: int) -> RoundResult:
        shared = [("params", x0.clone()), *[(f"sent/{k}", v.clone()) for k, v in sent.items()]]
        expected = expected_layout(algorithm, x0, sent)
        answers = torch.zeros(len(client_ids), sum(n for _, _, n in expected))  # touched now, not mid-stream
        tasks = {cid: self._task(round_idx, cid, shared, answers[i]) for i, cid in enumerate(client_ids)}
        self.coord.open_round(round_idx, tasks, expected)
        log.info("round %d: tasks out to clients %s", round_idx, client_ids)
        updates, self.participation = self.coord.close_round(self.deploy.round_timeout_s, self.deploy.min_clients)
        self.wire_up_total += self.participation.bytes_up
        self.wire_down_total += self.participation.bytes_down
        ids = [u.client_id for u in updates]
        rows = answers if ids == client_ids else answers[[client_ids.index(c) for c in ids]]
        columns = split(rows, expected)
        for i, cid in enumerate(ids):
            self.client_states[cid] = {k: v[i].clone() for k, v in prefixed(columns, "state").items()}
        return RoundResult(ids, columns["update"], torch.tensor([u.n_examples for u in updates], dtype=torch.float32),
                           prefixed(columns, "aux"), torch.tensor([u.train_loss for u in updates]))

    def _task(self, round_idx: int, client_id: int, shared: list[tuple[str, Tensor]], answer: Tensor) -> Task:
        tensors = shared + [(f"state/{k}", v) for k, v in self.client_states.get(client_id, {}).items()]
        header = pb.TaskHeader(round=round_idx, task_id=secrets.token_hex(16), client_id=client_id,
                               local=self.local, config_json=self.config_json, n_classes=self.n_classes,
                               buffers=describe(tensors))
        return Task(header, tensors, answer)

    def round_record(self) -> dict:
        """Participation and the bytes that really crossed the wire, for the round's metrics."""
        return {**self.participation.record(), "wire_bytes_up_total": self.wire_up_total,
                "wire_bytes_down_total": self.wire_down_total}


def expected_layout(algorithm, x0: Tensor, sent: dict[str, Tensor]) -> list[tuple[str, str, int]]:
    """The buffers a valid answer holds, from a dry run of the algorithm's client_result
    on a client that did not move."""
    row, aux, state = algorithm.client_result(x0, x0, torch.tensor(1), 1.0, sent, algorithm.client_init(x0.numel()))
    return layout(describe(result_tensors(row, aux, state)))


def play_round(exp: Experiment, round_idx: int) -> dict:
    """One round of an experiment whose engine is a RemoteEngine: its metrics record with
    participation and wire bytes."""
    return {**exp.round(round_idx), **exp.engine.round_record()}


def start_grpc(servicer: Servicer, address: str, tls: ServerTLS | None, workers: int) -> tuple[grpc.Server, int]:
    """Listen on ``address``; every subscribed client holds a worker thread, so ``workers``
    must cover them all plus their submissions."""
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), interceptors=[servicer.gate],
                         maximum_concurrent_rpcs=workers,
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.so_reuseport", 0)])
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
    """Run the experiment with remote clients to the end (or to Ctrl-C), like fedloom.experiment.run;
    its ``[deploy]`` section says when a round closes."""
    if not tokens:
        raise ConfigError("the server needs client tokens (--tokens FILE with 'client_id token' lines)")
    cfg = load_config(Path(resume) / CONFIG if resume else config, list(overrides))
    _check(cfg, tokens)
    exp = Experiment(cfg)
    coordinator = Coordinator()
    exp.engine = RemoteEngine(coordinator, cfg, exp.data.n_classes)
    server, port = start_grpc(Servicer(coordinator, tokens), address, tls, workers=2 * len(tokens) + 4)
    try:
        run_dir, start, history = _open_run_dir(cfg, exp, resume)
        log.info("listening on %s (port %d); run directory %s; rounds %d..%d", address, port, run_dir.path, start,
                 cfg.rounds)
        status = _play(exp, run_dir, start, history)
    finally:
        coordinator.finish()
        server.stop(grace=5).wait(10)
    return _finish(cfg, exp, run_dir, history, status)


def _play(exp: Experiment, run_dir: RunDir, start: int, history: list) -> str:
    """Rounds ``start``.. to the end, each checkpointed then recorded; "interrupted" on Ctrl-C."""
    try:
        for r in range(start, exp.cfg.rounds + 1):
            record = play_round(exp, r)
            save_checkpoint(run_dir.path / CHECKPOINT, exp, r, record)
            run_dir.append_metrics(record)
            history.append(record)
            _log_round(record, exp.cfg.rounds)
    except KeyboardInterrupt:
        return "interrupted"
    return "completed"


def _check(cfg: ExperimentConfig, tokens: dict[int, str]) -> None:
    if cfg.mode != "federated":
        raise ConfigError(f"mode = {cfg.mode!r}: the server coordinates federated runs only")
    if cfg.compression.build() is not None or cfg.compression.downlink != "none":
        raise ConfigError("compression: deployed clients send and receive fp32; set compression.name = 'none', "
                          "no compression.feedback and no compression.downlink")
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


def _open_run_dir(cfg: ExperimentConfig, exp: Experiment, resume: str | Path | None) -> tuple[RunDir, int, list]:
    """A new run directory, or the crashed one with the experiment restored from its checkpoint."""
    if resume is None:
        run_dir = RunDir.create(cfg.output.dir, cfg.name)
        run_dir.write_config(cfg.to_dict())
        run_dir.write_partition(exp.data.stats())
        return run_dir, 1, []
    run_dir = RunDir(Path(resume))
    if not (run_dir.path / CHECKPOINT).is_file():
        return run_dir, 1, []
    done, record = load_checkpoint(run_dir.path / CHECKPOINT, exp)
    history = read_metrics(run_dir.path) if (run_dir.path / METRICS).is_file() else []
    if not history or history[-1].get("round") != done:  # crashed between the checkpoint and the metrics line
        run_dir.append_metrics(record)
        history.append(record)
    log.info("resuming %s after round %d", run_dir.path, done)
    return run_dir, done + 1, history


def _log_round(record: dict, rounds: int) -> None:
    accuracy = record.get("central_accuracy")
    log.info("round %d/%d: %d submitted, dropped %s%s", record["round"], rounds, record["n_submitted"],
             record["clients_dropped"] or "none", "" if accuracy is None else f", central accuracy {accuracy:.4f}")


def _finish(cfg: ExperimentConfig, exp: Experiment, run_dir: RunDir, history: list, status: str) -> RunResult:
    """The end of fedloom.experiment.run: final model, summary, report."""
    model = exp.final_model()
    result = RunResult(cfg, model, exp.state.x.clone(), history, run_dir=run_dir.path)
    result.summary = _summary(cfg, result, status, exp.engine.name)
    run_dir.save_model({k: v.detach() for k, v in model.state_dict().items()})
    run_dir.write_summary(result.summary)
    render_report(run_dir.path)
    return result


if __name__ == "__main__":
    import sys

    from fedloom.deploy.cli import main

    sys.exit(main(["server", *sys.argv[1:]]))
