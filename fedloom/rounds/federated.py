"""A federated round: sample clients, send them the model (through the downlink
compressor if any), train them on the engine, run the server pipeline on their
rows, and let the algorithm's server rule read its side matrices.

The state tree of a federated run:

    x          the global model [d]
    algorithm  the algorithm's server state (SCAFFOLD's c)
    pipeline   one state per pipeline transform (compressor memories, aggregator and optimizer states)
    clients    client id -> the algorithm's persistent client state
    downlink   the downlink rule's state, or None
    counters   running byte totals
    late       with system.late = "stale": last round's late updates (a RoundResult's fields), or None

With a system model (``[system]``, ``fedloom.systems``) a round is timed: only clients online at its
virtual start are sampled (over-selected by ``system.over_selection``), each client's virtual time is
its compute plus its payloads over its links, and the round closes at the clients_per_round-th finisher
or at ``system.deadline_s``; clients cancelled or dropped are not trained at all.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from fedloom import evaluation
from fedloom.builders import (GivenParts, build_adversary, build_algorithm, build_data, build_engine, build_model_for,
                              build_participation, build_task_for, check_model_runs, engine_notes, local_training,
                              model_device,
                              sized_to)
from fedloom.compression.downlink import Downlink
from fedloom.config import ConfigError, ExperimentConfig
from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, numpy_generator
from fedloom.core.store import ClientStore
from fedloom.data import FederatedData
from fedloom.engines.base import RoundResult, concatenate, functional_loss, rows_of
from fedloom.participation import bernoulli_participants
from fedloom.pipeline.base import Context, ServerData
from fedloom.personalization import Split, build_personalization
from fedloom.personalization.base import generic_model, side_bytes
from fedloom.personalization.evaluate import personal_evaluation
from fedloom.pipeline.build import build_pipeline
from fedloom.rounds.base import State
from fedloom.systems import build_system
from fedloom.systems.rounds import IDLE_WAIT_S, Cut, cut, examples_processed, sample_available, uplink_row_bytes

BYTES_PER_FLOAT = 4
PER_CLIENT_MAX = 10_000  # the summary lists each client's final metric up to this many clients
TOTALS = ("bytes_up", "bytes_down", "wire_bytes_up", "wire_bytes_down")  # per-round counts that also get a _total


def sample_clients(n_clients: int, k: int, seed: int, round_idx: int, once_per_epoch: bool = False) -> list[int]:
    """Uniform sampling without replacement, from the round's own stream; ``once_per_epoch`` (DP-FTRL):
    round r's slice of its epoch's permutation instead, so each client comes at most once per n // k rounds."""
    if once_per_epoch:
        return epoch_clients(n_clients, k, seed, round_idx)
    rng = numpy_generator(seed, Stream.SAMPLING, round_idx)
    return sorted(rng.choice(n_clients, size=k, replace=False).tolist())


def epoch_clients(n_clients: int, k: int, seed: int, round_idx: int) -> list[int]:
    """Epoch e (rounds e E + 1 .. (e + 1) E, E = n // k) shuffles the clients on its own stream (key
    (e + 1, k, n): never a round's); round r takes the next k of them (the n mod k left over sit it out)."""
    epoch, position = divmod(round_idx - 1, n_clients // k)
    order = numpy_generator(seed, Stream.SAMPLING, epoch + 1, k, n_clients).permutation(n_clients)
    return sorted(order[position * k:(position + 1) * k].tolist())


class FederatedRound:
    """A federated round: sample clients, send them the model (compressed downlink), train them on the engine,
    run their rows through the server pipeline and step the algorithm's server rule."""

    def __init__(self, cfg: ExperimentConfig, make_engine: Callable[[nn.Module, FederatedData], Any] | None = None,
                 given: GivenParts = GivenParts()):
        self.data = build_data(cfg, given)
        self.cfg = cfg = sized_to(cfg, self.data)
        self.adversary = build_adversary(cfg, self.data)
        self.model = build_model_for(cfg, self.data, given)
        check_model_runs(cfg, self.model, self.data)
        self.spec = ParamSpec.of(self.model)
        self.algorithm = build_algorithm(cfg)
        self.engine = (make_engine or partial(build_engine, cfg))(self.model, self.data)
        self.engine_name = self.engine.name
        if hasattr(self.algorithm, "anchor_group") and not hasattr(self.engine, "gradients"):
            raise ConfigError(f"algorithm.name = {cfg.algorithm.name!r} needs its anchors' large-batch gradients, "
                              f"which the {self.engine.name} engine does not compute (use vectorized or serial)")
        # evaluation runs where the engine put the model (the CPU for Ray actors' and remote clients' runs)
        self.task, self.device = build_task_for(cfg, self.data), model_device(self.model)
        # personalization: personal coordinates stay with the clients, the pipeline works on the shared ones
        self.personal = build_personalization(cfg, self.spec, local_training(cfg))
        self.split = self.personal.s.split if self.personal else Split(self.spec)
        server_data = ServerData(self.data, functional_loss(self.model, self.spec, self.task), cfg.seed, self.device)
        self.pipeline = build_pipeline(cfg, self.adversary, self.split.shared_shapes,
                                       max_weight=float(self.data.client_sizes().max()), model=self.model,
                                       data=self.data, server_data=server_data)
        compressor = cfg.compression.build_downlink(self.spec.shapes)
        self.downlink = Downlink(compressor, cfg.seed) if compressor else None
        self.system = build_system(cfg, self.data.n_clients, self.model, self.data.x[0].to(self.device))
        if self.system is not None:
            self.examples = examples_processed(self.data.client_sizes(), local_training(cfg))  # per client
            self.row_bytes = uplink_row_bytes(cfg.compression.build(self.split.shared_shapes), cfg.seed,
                                              self.split.shared_dim)
        self.participation = build_participation(cfg, self.data)  # p_i per client, or None: uniform sampling

    def init_state(self) -> State:
        """The state tree: the global model, the algorithm's and the pipeline's states, client states, the downlink
        and the byte counters."""
        x0 = self.spec.flatten(self.model).detach().cpu().clone()
        state = {"x": x0, "algorithm": self.algorithm.server_init(x0),
                 "pipeline": self.pipeline.init(self.split.shared_dim),
                 "clients": {}, "downlink": self.downlink.init(x0) if self.downlink else None,
                 "counters": {k: 0 for k in TOTALS}, "late": None}
        if getattr(self.algorithm, "warm_start", False):  # FedAMD: every client's anchor gradient at x0 (round 0)
            store = ClientStore()
            grads = self.engine.gradients(x0, list(range(self.data.n_clients)), self.algorithm.anchor_batch_size, 0)
            state["algorithm"] = self.algorithm.anchor_step(state["algorithm"], list(range(self.data.n_clients)),
                                                            grads, store, self.data.n_clients)
            state["clients"] = store.states
        return state

    def _sample(self, state: State, round_idx: int) -> list[int]:
        """This round's clients: uniform, each on its own probability (bernoulli participation), or, with a
        system model, from those online at its virtual start."""
        if self.participation is not None:  # each client on its own probability
            return bernoulli_participants(self.participation, self.cfg.seed, round_idx)
        k = self.cfg.clients_per_round()
        if self.system is None:
            return sample_clients(self.data.n_clients, k, self.cfg.seed, round_idx,
                                  once_per_epoch=self.cfg.privacy.mechanism == "ftrl")
        online = self.system.available(state.get("virtual_seconds", 0.0))
        return sample_available(online, k, self.cfg.system.over_selection, self.cfg.seed, round_idx)

    def _timed(self, clients: list[int], down_bytes: Tensor, sent: dict[str, Tensor]) -> Cut:
        """Who of ``clients`` is kept, who is late, and the round's virtual seconds (system model only)."""
        if self.system is None:
            return Cut(np.arange(len(clients)), np.zeros(0, dtype=np.int64), 0.0)
        sent_bytes = BYTES_PER_FLOAT * sum(t.numel() for t in sent.values())
        seconds = self.system.seconds(clients, self.examples[clients], np.full(len(clients), self.row_bytes),
                                      down_bytes.numpy() + sent_bytes)
        return cut(seconds, self.closing_count(), self.cfg.system.deadline_s)

    def closing_count(self) -> int:
        """The finisher whose arrival closes a timed round: the clients_per_round-th."""
        return self.cfg.clients_per_round()

    def _train(self, state: State, clients: list[int], timed: Cut, start: Tensor, sent: dict[str, Tensor],
               round_idx: int, store: ClientStore) -> tuple[RoundResult, Any]:
        """Train the kept clients (and the late ones when they count next round): (the rows this round
        aggregates, last round's late ones first; the late rows to keep for the next round, or None)."""
        if self.system is None:
            return self._run_clients(start, sent, clients, round_idx, store), None
        stale = self.cfg.system.late == "stale"
        trained = np.sort(np.concatenate([timed.on_time, timed.late])) if stale else timed.on_time
        if len(trained) == 0:  # nobody made the deadline: nothing to train
            result = RoundResult([], torch.zeros(0, self.split.shared_dim), torch.zeros(0), {}, torch.zeros(0))
        else:
            result = self._run_clients(start, sent, [clients[i] for i in trained], round_idx, store)
        late_rows = torch.as_tensor(np.isin(trained, timed.late)).nonzero().flatten()
        on_time = rows_of(result, torch.as_tensor(np.isin(trained, timed.on_time)).nonzero().flatten())
        if state.get("late") is not None:
            on_time = concatenate([RoundResult(**state["late"]), on_time])
        return on_time, (vars(rows_of(result, late_rows)) if stale and len(late_rows) else None)

    def play(self, state: State, round_idx: int) -> tuple[State, dict[str, Any]]:
        """One round on the state tree; returns the new state and the round's metrics."""
        clients = self._sample(state, round_idx)
        if not clients:  # nobody online (system model) or nobody took part (bernoulli): the model stays
            return self._no_participant(state, round_idx)
        sent = self.algorithm.broadcast(state["algorithm"])
        store = ClientStore(state["clients"])
        clients, state, anchors = self._anchors(state, clients, round_idx, store)
        if not clients:  # FedAMD: every participant was an anchor, none trains
            return self._no_participant({**state, "clients": store.states}, round_idx, anchors)
        start, down_bytes, downlink = self._model_for_clients(state, clients, round_idx)
        model_bytes = int(down_bytes.sum())
        timed = self._timed(clients, down_bytes, sent)
        result, late = self._train(state, clients, timed, start, sent, round_idx, store)
        ctx = Context(round_idx, self.cfg.seed, list(result.client_ids), self.split.shared(state["x"]),
                      dict(result.aux), n_clients=self.data.n_clients)
        U, _, pipeline_states, metrics = self.pipeline.apply(result.U, result.weights, state["pipeline"], ctx)
        new = {**state, "pipeline": pipeline_states, "clients": store.states, "downlink": downlink, "late": late}
        model_rejected = len(U) > 0 and not bool(torch.isfinite(U[0]).all())
        if len(U) and not model_rejected:  # else no usable update, or a non-finite model: it stays as it was
            new["x"] = self.split.merged(state["x"], U[0])
            new["algorithm"] = self.algorithm.server_step(state["algorithm"], ctx.aux, self.data.n_clients)
        record = self._record(round_idx, len(clients), result, ctx, metrics, sent, model_bytes)
        if self.system is not None:
            record.update(round_virtual_seconds=timed.seconds, n_late=len(timed.late),
                          n_cancelled=len(clients) - len(timed.on_time) - len(timed.late))
        if model_rejected:
            record["model_rejected"] = "the aggregated model held NaN/Inf; the previous one is kept"
        _count_anchors(record, anchors, self.spec.dim)
        new["counters"] = _add_totals(state["counters"], record)
        return new, record

    def _no_participant(self, state: State, round_idx: int, anchors: list[int] | None = None
                        ) -> tuple[State, dict[str, Any]]:
        """A round without clients training: no update; on the virtual clock it waits IDLE_WAIT_S for clients
        to come online (FedAMD: its anchors' gradients are in ``state`` already)."""
        record = {"round": round_idx, "train_loss": float("nan"), "n_sampled": 0, "n_rejected": 0,
                  "n_byzantine": 0, "bytes_up": 0, "bytes_down": 0}
        if self.system is not None:
            record["round_virtual_seconds"] = IDLE_WAIT_S
        _count_anchors(record, anchors, self.spec.dim)
        return {**state, "counters": _add_totals(state["counters"], record)}, record

    def _anchors(self, state: State, clients: list[int], round_idx: int, store: ClientStore
                 ) -> tuple[list[int], State, list[int] | None]:
        """FedAMD's anchor group (an algorithm with ``anchor_group``): those of ``clients`` it picks compute a
        large-batch gradient at the global model, which the algorithm keeps in their client states and its
        server state; the rest (the miners) train. Returns (the miners, the state, the anchors or None)."""
        if not hasattr(self.algorithm, "anchor_group"):
            return clients, state, None
        anchors = self.algorithm.anchor_group(clients, self.cfg.seed, round_idx)
        grads = self.engine.gradients(state["x"], anchors, self.algorithm.anchor_batch_size, round_idx)
        algorithm = self.algorithm.anchor_step(state["algorithm"], anchors, grads, store, self.data.n_clients)
        chosen = set(anchors)
        return [c for c in clients if c not in chosen], {**state, "algorithm": algorithm}, anchors

    def _run_clients(self, start: Tensor, sent: dict[str, Tensor], clients: list[int], round_idx: int,
                     store: ClientStore) -> RoundResult:
        """The clients' rows: the engine's, or the personalization method's (shared coordinates only)."""
        if self.personal:
            return self.personal.train(self.engine, self.algorithm, start, sent, clients, round_idx, store)
        return self.engine.run_round(self.algorithm, start, sent, clients, round_idx, store)

    def _model_for_clients(self, state: State, clients: list[int], round_idx: int) -> tuple[Tensor, Tensor, Any]:
        """The model the sampled clients train from, its downlink bytes per client (the shared coordinates),
        and the downlink's new state: the fp32 global model, or the downlink compressor's copy of it
        (``compression/downlink.py``)."""
        if self.downlink is None:
            nbytes = BYTES_PER_FLOAT * self.split.shared_dim
            return state["x"], torch.full((len(clients),), nbytes, dtype=torch.long), None
        return self.downlink.send(state["downlink"], state["x"], clients, round_idx)

    def _record(self, round_idx: int, n_sampled: int, result: RoundResult, ctx: Context, metrics: dict,
                sent: dict[str, Tensor], model_bytes: int) -> dict[str, Any]:
        """The round's metrics. Downlink: the model's bytes plus the fp32 broadcast tensors to every
        sampled client; uplink: the rows' payloads plus the algorithm's fp32 side tensors."""
        kept = ctx.kept
        payload = metrics.pop("uplink_bytes", BYTES_PER_FLOAT * self.split.shared_dim * int(kept.sum()))
        payload += side_bytes(self.personal, int(kept.sum()))
        record = {"round": round_idx, "train_loss": _weighted(result.train_loss[kept], result.weights[kept]),
                  "n_sampled": n_sampled, "n_rejected": 0, "n_byzantine": 0, **metrics,
                  "bytes_up": payload + BYTES_PER_FLOAT * sum(t.numel() for t in ctx.aux.values()),
                  "bytes_down": model_bytes + n_sampled * BYTES_PER_FLOAT * sum(t.numel() for t in sent.values())}
        if hasattr(self.engine, "round_record"):  # a remote engine: participation and real wire bytes
            record.update(self.engine.round_record())
        return record

    def evaluate(self, state: State) -> dict[str, float]:
        """The global model's central metrics and, with ``evaluation.federated``, the clients' own tests
        (personalized models where a method runs)."""
        x = self.final_params(state).to(self.device)
        metrics = evaluation.central(self.model, self.spec, x, self.data, self.task)
        if self.cfg.evaluation.federated:
            metrics.update(evaluation.federated(self.model, self.spec, x, self.data, self.task))
        if self.personal and self.cfg.evaluation.federated:
            metrics.update(self._personal_evaluation(state)[0])
        return metrics

    def _personal_evaluation(self, state: State) -> tuple[dict[str, float], dict[str, list]]:
        return personal_evaluation(self.personal, self.engine, self.model, self.spec, state["x"], self.data,
                                   self.task, state["clients"])

    def final_params(self, state: State) -> Tensor:
        """The global model's flat parameters (a method's generic model where it has one: FedLoGe)."""
        return generic_model(self.personal, state["x"])

    def final_model(self, state: State) -> nn.Module:
        """The model holding the global parameters."""
        self.spec.load_into(self.model, self.final_params(state))
        return self.model

    def describe(self, state: State) -> dict[str, Any]:
        """The summary's facts: data sizes, the pipeline's steps, engine notes and, for up to PER_CLIENT_MAX
        clients, each client's final metric."""
        described = {**self.data.size(), "pipeline": self.pipeline.steps(),
                     **engine_notes(self.cfg, self.model, self.engine)}
        if self.personal:
            described["personalization"] = self.personal.name
        if self.cfg.evaluation.federated and self.data.n_clients <= PER_CLIENT_MAX:  # the histograms' values
            described[f"per_client_{self.task.primary}"] = (
                self._personal_evaluation(state)[1] if self.personal else
                evaluation.per_client(self.model, self.spec, state["x"].to(self.device), self.data, self.task))
        if self.cfg.privacy.mechanism != "none":  # the noise multiplier run with, calibrated or given
            described["noise_multiplier"] = self.cfg.privacy_noise_multiplier()
        if self.participation is not None:  # the clients' own probabilities, drawn once (bernoulli participation)
            p = self.participation
            described["participation_probability"] = {"mean": float(p.mean()), "min": float(p.min()),
                                                      "max": float(p.max())}
        return described

    def graph_record(self) -> None:
        """A federation has no gossip graph to draw."""
        return None


def _count_anchors(record: dict[str, Any], anchors: list[int] | None, d: int) -> None:
    """FedAMD's anchors in the record: how many, and their bytes (the model down, a gradient up, fp32)."""
    if anchors is None:
        return
    record["n_anchors"] = len(anchors)
    record["bytes_up"] += BYTES_PER_FLOAT * d * len(anchors)
    record["bytes_down"] += BYTES_PER_FLOAT * d * len(anchors)


def _add_totals(counters: dict[str, int], record: dict[str, Any]) -> dict[str, int]:
    """The running totals after this round; the record gets them as ``<key>_total``."""
    totals = dict(counters)
    for key in TOTALS:
        if key in record:
            totals[key] = totals.get(key, 0) + record[key]
            record[f"{key}_total"] = totals[key]
    return totals


def _weighted(values: Tensor, w: Tensor) -> float:
    return float((values * w).sum() / w.sum()) if len(values) else float("nan")
