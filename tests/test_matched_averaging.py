"""Matched averaging selected from the config file (server.transforms), run through fedloom.run."""

from __future__ import annotations

import pytest
import torch

from fedloom.config import ConfigError, load_config
from fedloom.core.params import ParamSpec
from fedloom.merging import apply, random_permutation, spec_for
from fedloom.pipeline.base import Transform
from fedloom.pipeline.transforms import TRANSFORMS
from fedloom.registry import Entry
from fedloom.runner import run

CONFIG = """
rounds = 2
seed = 3
[data]
dataset = "digits"
n_clients = 4
[model]
name = "mlp"
options = {hidden = [16]}
[client]
epochs = 1
[evaluation]
every = 1
[output]
save = false
progress = false
"""
MATCHED = """
[[server.transforms]]
name = "matched_averaging"
options = {method = "weight", reference = "global"}
"""


def permute_clients(model) -> Transform:
    """A test transform: each client's model ``x - row`` replaced by a random permutation of itself (the same
    function), so a plain mean of the rows averages units that do not correspond."""
    spec, flat = spec_for(model), ParamSpec.of(model)

    def apply_(U, w, state, ctx):
        x = ctx.params.to(U)
        rows = []
        for client, row in zip(ctx.client_ids, U):
            moved = apply(spec, flat.unflatten(x - row), random_permutation(spec, ctx.generator(0, client)))
            rows.append(x - torch.cat([moved[n].reshape(-1) for n in flat.names]))
        return torch.stack(rows), w, state, {}

    return Transform("permute_clients", apply_)


def _run(tmp_path, text: str, name: str):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return run(path).summary


def test_matched_averaging_from_the_config_undoes_what_permuted_clients_did_to_fedavg(tmp_path, monkeypatch):
    monkeypatch.setitem(TRANSFORMS, "permute_clients", Entry(permute_clients, "test"))
    permute = '\n[[server.transforms]]\nname = "permute_clients"\n'
    plain = _run(tmp_path, CONFIG, "plain")
    permuted = _run(tmp_path, CONFIG + permute, "permuted")
    matched = _run(tmp_path, CONFIG + permute + MATCHED, "matched")
    assert matched["pipeline"][1:3] == ["permute_clients (server)", "matched_averaging (server)"]
    assert permuted["central_accuracy"] < plain["central_accuracy"] - 0.1  # averaging unmatched units
    assert matched["central_accuracy"] == pytest.approx(plain["central_accuracy"], abs=0.01)
    assert matched["central_loss"] == pytest.approx(plain["central_loss"], rel=1e-3)


def test_from_a_shared_start_matching_to_the_global_model_is_fedavg(tmp_path):
    # one round from one model: the clients' units still correspond, the alignment is the identity
    plain, matched = _run(tmp_path, CONFIG, "plain"), _run(tmp_path, CONFIG + MATCHED, "matched")
    assert matched["central_loss"] == pytest.approx(plain["central_loss"], rel=1e-5)


def test_activation_matching_between_the_clients_runs_from_the_config(tmp_path):
    summary = _run(tmp_path, CONFIG + MATCHED.replace('"weight", reference = "global"',
                                                      '"activation", reference = "clients"'), "act")
    assert summary["pipeline"][1] == "matched_averaging (server)"
    assert 0.3 < summary["central_accuracy"] <= 1


@pytest.mark.parametrize("extra,message", [
    (["privacy.mechanism=central", "privacy.noise_multiplier=1.0"], "privacy.mechanism = 'none'"),
    (["mode=asynchronous", "system.profile=sampled"], "mode = 'federated'"),
    (["server.transforms=[{name='matched_averaging',options={method='nope'}}]"], "method"),
    (["server.transforms=[{name='matched_averaging',options={reference='first'}}]"], "reference"),
])
def test_combinations_matched_averaging_cannot_serve_are_refused_at_config_load(extra, message):
    transforms = [] if any(e.startswith("server.transforms") for e in extra) else [
        "server.transforms=[{name='matched_averaging'}]"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*transforms, *extra])


def test_a_pipeline_built_without_the_model_keeps_a_server_side_stand_in_that_refuses_to_run():
    from fedloom.pipeline.base import Context
    from fedloom.pipeline.build import build_pipeline

    cfg = load_config(None, ["server.transforms=[{name='matched_averaging'}]"])
    pipeline = build_pipeline(cfg, None)  # what a deployed client builds, for its client side only
    assert "matched_averaging (server)" in pipeline.steps()
    assert "matched_averaging" not in [t.name for t in pipeline.on("client").transforms]
    stand_in = next(t for t in pipeline.transforms if t.name == "matched_averaging")
    with pytest.raises(ValueError, match="without the run's model"):
        stand_in.apply(torch.zeros(1, 3), torch.ones(1), None, Context(1, 0, [0], torch.zeros(3)))
