"""Personalization: the shared/personal split keeps personal coordinates out of the uplink and the
server's matrix, personal state checkpoints and resumes bit-identically, the serial and the vectorized
engines agree, and the FedRep, Ditto and FedBABU rules match hand-computed steps."""

import pytest
import torch

from fedloom.config import ConfigError, load_config
from fedloom.engines.base import functional_loss
from fedloom.personalization import Split
from fedloom.personalization.split import personal_names
from helpers import assert_resumes_bit_identically, make_round, play

TINY = ["data.dataset=digits", "data.n_clients=6", "partition.name=shards", "partition.options={classes_per_client=2}",
        "model.name=mlp", "model.options={hidden=[8]}", "sampling.clients_per_round=3", "client.epochs=1",
        "client.batch_size=32", "client.lr=0.1", "personalization.head_epochs=1"]
BODY, HEAD = ("1.weight", "1.bias"), ("3.weight", "3.bias")  # Flatten, Linear, ReLU, Linear


def _round(method, *more):
    return make_round(*TINY, f"personalization.method={method}", *more)


def test_personal_parameters_by_pattern_or_the_last_layer():
    spec = _round("none").spec
    assert personal_names(spec, "head") == HEAD
    assert personal_names(spec, ["1.*"]) == BODY
    assert personal_names(spec, "3.weight") == ("3.weight",)
    with pytest.raises(ConfigError, match=r"'fc2\.\*' match no parameter.*1\.weight, 1\.bias, 3\.weight, 3\.bias"):
        personal_names(spec, ["3.*", "fc2.*"])
    with pytest.raises(ConfigError, match="every parameter personal"):
        personal_names(spec, ["*"])
    with pytest.raises(ConfigError, match="personal is empty"):
        personal_names(spec, [])
    split = Split(spec, HEAD)
    assert split.shared_dim == 64 * 8 + 8 and split.mask.sum() == 8 * 10 + 10
    assert split.shared_shapes == (torch.Size([8, 64]), torch.Size([8]))


def test_a_model_whose_last_layer_is_all_of_it_is_refused():
    with pytest.raises(ConfigError, match="last layer is all of it"):
        _round("fedper", "model.name=logistic", "model.options={}")


@pytest.mark.parametrize("method", ["fedper", "fedrep", "fedbabu"])
def test_personal_coordinates_never_reach_the_uplink_or_the_server(method):
    round_ = _round(method)
    split, seen = round_.split, []
    apply = round_.pipeline.apply

    def spy(U, w, states, ctx):
        seen.append((U.clone(), ctx.params.clone()))
        return apply(U, w, states, ctx)

    object.__setattr__(round_.pipeline, "apply", spy)
    state0 = round_.init_state()
    state, record = play(round_, 2, state0)
    shared = 64 * 8 + 8
    for U, params in seen:  # the server's matrix and model: shared coordinates only
        assert U.shape == (3, shared) and params.shape == (shared,)
    assert record["bytes_up"] == 4 * shared * 3 and record["bytes_down"] == 4 * shared * 3
    head = split.mask
    assert torch.equal(state["x"][head], state0["x"][head])  # the global head is never written
    assert not torch.equal(state["x"][~head], state0["x"][~head])
    if method != "fedbabu":  # the trained heads are client state
        assert len(state["clients"]) >= 3
        heads = [s["personal"] for s in state["clients"].values()]
        assert all(h.shape == (90,) for h in heads) and not torch.equal(heads[0], state0["x"][head])


@pytest.mark.parametrize("method", ["fedper", "ditto"])
def test_personal_state_checkpoints_and_resumes_bit_identically(tmp_path, method):
    assert_resumes_bit_identically(lambda: _round(method), tmp_path / "ckpt")


@pytest.mark.parametrize("method, chunked", [("finetune", False), ("fedper", False), ("fedrep", False),
                                             ("fedrep", True), ("fedbabu", False), ("ditto", False)])
def test_the_serial_and_the_vectorized_engines_agree(method, chunked):
    results = []
    for engine in ("serial", "vectorized"):  # chunked: one client a chunk, each with its own start
        round_ = _round(method, f"engine.name={engine}", *(["engine.memory_budget_gb=0.00001"] if chunked else []))
        state, record = play(round_, 2)
        results.append((state, round_.evaluate(state)))
    (s, m), (v, n) = results
    torch.testing.assert_close(s["x"], v["x"], rtol=1e-5, atol=1e-6)
    for c in s["clients"]:
        for k in s["clients"][c]:
            torch.testing.assert_close(s["clients"][c][k], v["clients"][c][k], rtol=1e-5, atol=1e-6)
    assert m.keys() == n.keys() and "personal_accuracy" in m and "personal_accuracy_worst10" in m
    for k in m:
        assert m[k] == pytest.approx(n[k], abs=2e-3), k


def _one_client(method, *more):
    """One client a round, its whole data one batch, one epoch: a round is a single SGD step per pass."""
    return _round(method, "sampling.clients_per_round=1", "client.batch_size=1000", "engine.name=serial", *more)


def _full_batch_grad(round_, flat, client):
    idx = round_.data.train_idx[client]
    x, y = round_.data.x[idx], round_.data.y[idx]
    flat = flat.detach().requires_grad_()
    loss = functional_loss(round_.model, round_.spec, round_.task)(flat, x, y)
    return torch.autograd.grad(loss, flat)[0]


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body_with_the_new_head():
    round_ = _one_client("fedrep")
    state0 = round_.init_state()
    state, _ = round_.play(state0, 1)
    (client,) = state["clients"]
    lr, head = 0.1, round_.split.mask
    x0 = state0["x"]
    g = _full_batch_grad(round_, x0, client)
    headed = torch.where(head, x0 - lr * g, x0)  # head step at the old body
    g2 = _full_batch_grad(round_, headed, client)
    trained = torch.where(head, headed, headed - lr * g2)  # body step at the new head
    torch.testing.assert_close(state["clients"][client]["personal"], trained[head], rtol=0, atol=1e-6)
    torch.testing.assert_close(state["x"][~head], trained[~head], rtol=0, atol=1e-6)  # one client: FedAvg = its body
    assert torch.equal(state["x"][head], x0[head])


def test_ditto_personal_step_is_pulled_towards_the_global_model():
    lam, lr = 0.5, 0.1
    round_ = _one_client("ditto", f"personalization.ditto_lambda={lam}", "data.n_clients=3",
                         "partition.name=iid", "partition.options={}", "sampling.clients_per_round=3")
    state0 = round_.init_state()
    state1, _ = round_.play(state0, 1)
    state2, _ = round_.play(state1, 2)
    for c in range(3):
        v1 = state1["clients"][c]["v"]  # v starts at w0, where the pull is zero: a plain step
        torch.testing.assert_close(v1, state0["x"] - lr * _full_batch_grad(round_, state0["x"], c), rtol=0, atol=1e-6)
        w1 = state1["x"]
        expected = v1 - lr * (_full_batch_grad(round_, v1, c) + lam * (v1 - w1))
        torch.testing.assert_close(state2["clients"][c]["v"], expected, rtol=0, atol=1e-6)
    # the global model is FedAvg's: the mean of the clients' plain steps from w1 (equal sizes)
    steps = torch.stack([state1["x"] - lr * _full_batch_grad(round_, state1["x"], c) for c in range(3)])
    sizes = torch.tensor([len(round_.data.train_idx[c]) for c in range(3)], dtype=torch.float32)
    torch.testing.assert_close(state2["x"], (steps * sizes[:, None]).sum(0) / sizes.sum(), rtol=0, atol=1e-6)


def test_fedbabu_keeps_the_head_at_its_init_and_fine_tunes_everything_at_evaluation():
    lr = 0.1
    round_ = _one_client("fedbabu")
    state0 = round_.init_state()
    state, _ = round_.play(state0, 1)
    head, x0 = round_.split.mask, state0["x"]
    client = _sampled(round_, 1)
    body_step = x0 - lr * _full_batch_grad(round_, x0, client)
    torch.testing.assert_close(state["x"][~head], body_step[~head], rtol=0, atol=1e-6)
    assert torch.equal(state["x"][head], x0[head])  # frozen at its init
    models = round_.personal.client_models(round_.engine, state["x"], list(range(6)), None)
    for c in range(6):  # one epoch of one full batch: one step of the whole model from the global one
        expected = state["x"] - lr * _full_batch_grad(round_, state["x"], c)
        torch.testing.assert_close(models[c], expected, rtol=0, atol=1e-6)
    assert not torch.equal(models[0][head], x0[head])


def test_finetune_steps_replace_epochs_at_evaluation():
    lr = 0.1
    round_ = _one_client("finetune", "personalization.finetune_steps=2", "personalization.finetune_epochs=3")
    state, _ = round_.play(round_.init_state(), 1)
    models = round_.personal.client_models(round_.engine, state["x"], [0, 1], None)
    for c in (0, 1):  # two full-batch steps, not three epochs
        once = state["x"] - lr * _full_batch_grad(round_, state["x"], c)
        torch.testing.assert_close(models[c], once - lr * _full_batch_grad(round_, once, c), rtol=0, atol=1e-6)


def _sampled(round_, round_idx):
    from fedloom.rounds.federated import sample_clients

    (client,) = sample_clients(round_.data.n_clients, 1, round_.cfg.seed, round_idx)
    return client


def test_evaluation_records_personal_next_to_global_and_the_summary_the_distribution():
    round_ = _round("fedper")
    state, _ = play(round_, 1)
    metrics = round_.evaluate(state)
    for key in ("federated_accuracy", "personal_accuracy", "personal_accuracy_worst10",
                "personal_accuracy_client_mean", "federated_accuracy_client_mean"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["personal_accuracy_worst10"] <= metrics["personal_accuracy_client_mean"]
    dist = round_.describe(state)["per_client_accuracy"]
    assert len(dist["global"]) == len(dist["personal"]) == len(dist["clients"]) == 6
    assert sum(dist["personal"]) / 6 == pytest.approx(metrics["personal_accuracy_client_mean"])


@pytest.mark.parametrize("overrides, message", [
    (["mode=decentralized"], "federated mode"),
    (["algorithm.name=scaffold"], "client state"),
    (["compression.downlink=topk", "compression.name=topk", "compression.options={k=0.1}"], "downlink"),
    (["engine.name=ray"], "ray"),
    (["personalization.method=fedrep", "client.weight_decay=0.01"], "weight_decay"),
])
def test_combinations_that_do_not_fit_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["personalization.method=fedper", *overrides])


def test_the_report_shows_global_and_personalized_distributions_side_by_side(tmp_path):
    import json

    from fedloom.tracking.report import render_report

    values = {"clients": [0, 1, 2, 3], "global": [0.0, 0.25, 0.5, 0.1], "personal": [0.9, 1.0, 0.75, 0.95]}
    (tmp_path / "summary.json").write_text(json.dumps({"name": "p", "per_client_accuracy": values}))
    (tmp_path / "metrics.jsonl").write_text("")
    page = render_report(tmp_path).read_text()
    assert (tmp_path / "personalization.png").stat().st_size > 10_000
    assert 'alt="personalization plot"' in page and "per_client_accuracy" not in page


@pytest.mark.slow
def test_a_personalized_run_writes_the_distribution_and_its_report(tmp_path):
    from fedloom import run
    from fedloom.tracking.report import render_report

    result = run(None, [*TINY, "personalization.method=fedper", "rounds=1", f"output.dir={str(tmp_path)!r}",
                        "output.progress=false"])
    summary = result.summary["per_client_accuracy"]
    assert len(summary["personal"]) == 6 and result.summary["personalization"] == "fedper"
    assert result.summary["personal_accuracy_client_mean"] == pytest.approx(sum(summary["personal"]) / 6)
    page = render_report(result.run_dir).read_text()
    assert (result.run_dir / "personalization.png").stat().st_size > 10_000
    assert 'alt="personalization plot"' in page and "per_client_accuracy" not in page


def test_the_deployment_server_refuses_personalization():
    from fedloom.deploy.server import _check

    cfg = load_config(None, ["personalization.method=fedper", "data.n_clients=4"])
    with pytest.raises(ConfigError, match="personalization.method = 'fedper'"):
        _check(cfg, {c: "t" for c in range(4)})


SHARDS = ["data.dataset=digits", "data.n_clients=20", "partition.name=shards", "partition.options={classes_per_client=2}",
          "model.name=mlp", "model.options={hidden=[32]}", "sampling.clients_per_round=10", "client.epochs=1",
          "client.lr=0.1", "client.batch_size=16", "rounds=10", "evaluation.every=10", "output.save=false",
          "output.progress=false"]


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_on_two_class_shards_personalized_models_beat_the_global_fedavg_model(seed):
    from fedloom import run

    def final(method):
        return run(None, [*SHARDS, f"seed={seed}", f"personalization.method={method}"]).final

    finetune = final("finetune")  # its training is FedAvg's: its global model is the FedAvg baseline
    fedavg = finetune["federated_accuracy_client_mean"]
    assert fedavg < 0.8
    for method, metrics in [("finetune", finetune), *((m, final(m)) for m in ("fedper", "fedrep", "ditto"))]:
        assert metrics["personal_accuracy_client_mean"] > fedavg + 0.1, method
