"""Compression inside training: real payload bytes in the metrics, per-client
error-feedback memory across rounds, downlink compression of the global model."""

import pytest
import torch

import fedloom
from fedloom.compression import make_compressor, roundtrip
from fedloom.compression.downlink import Downlink
from fedloom.config import ConfigError, load_config
from fedloom.rounds.federated import sample_clients
from helpers import stepper


def _experiment(quick, *overrides):
    return stepper(*quick, "evaluation.federated=false", *overrides)


def test_uplink_bytes_are_the_payload_lengths(quick):
    exp = _experiment(quick, "compression.name=topk", "compression.options.k=0.05")
    record = exp.round(1)
    d = exp.spec.dim
    _, nbytes, _ = roundtrip(make_compressor("topk", k=0.05), torch.randn(1, d))
    assert record["bytes_up"] == 10 * int(nbytes[0])
    assert record["bytes_up"] < 10 * 4 * d / 10  # topk-5% is over 10x smaller than fp32
    plain = _experiment(quick).round(1)
    assert plain["bytes_up"] == 10 * 4 * d


def test_error_feedback_memory_persists_per_client(quick):
    exp = _experiment(quick, "compression.name=topk", "compression.options.k=0.01", "compression.feedback=ef",
                      "data.n_clients=10")
    exp.round(1)
    memory = {c: _memories(exp)[c]["ef.error"].clone() for c in range(10)}
    assert all(m.abs().sum() > 0 for m in memory.values())
    exp.round(2)
    assert all(not torch.equal(_memories(exp)[c]["ef.error"], memory[c]) for c in range(10))


def _memories(exp):
    """The clients' compressor memories: the state of the pipeline's compress transform."""
    (index,) = [i for i, t in enumerate(exp.pipeline.transforms) if t.name.startswith("compress")]
    return exp.state["pipeline"][index]


def test_compression_changes_the_model_and_none_does_not(quick):
    baseline = _experiment(quick)
    baseline.round(1)
    lossless = _experiment(quick, "compression.name=none", "compression.feedback=ef")
    lossless.round(1)
    torch.testing.assert_close(lossless.state["x"], baseline.state["x"])
    lossy = _experiment(quick, "compression.name=sign")
    lossy.round(1)
    assert not torch.allclose(lossy.state["x"], baseline.state["x"])


# --- downlink ----------------------------------------------------------------------


def test_downlink_copy_tracks_the_model_by_error_feedback():
    """EF21-P: w <- w + C(x - w). Top-10% of a fixed gap sends each coordinate once,
    largest first, so the copy equals x after exactly 10 messages."""
    x = torch.randn(100)
    link = Downlink(make_compressor("topk", k=0.1), seed=0)
    state = link.init(torch.zeros(100))
    for _ in range(9):
        copy, _, state = link.send(state, x, [0], 1)
    assert not torch.equal(copy, x)
    copy, _, state = link.send(state, x, [0], 1)
    assert torch.equal(copy, x)


@pytest.mark.parametrize("name, options", [("topk", {"k": 0.05}), ("fp16", {})])
def test_downlink_bytes_are_the_payload_lengths_and_absent_clients_catch_up(quick, name, options):
    """A client that missed rounds gets the missed messages (top-5%: cheaper than the
    model) or the fp32 copy (fp16: two messages already cost more than the model)."""
    exp = _experiment(quick, f"compression.downlink={name}", *[f"compression.downlink_options.{k}={v}"
                                                               for k, v in options.items()],
                      "data.n_clients=10", "sampling.clients_per_round=5")
    d = exp.spec.dim
    _, message, _ = roundtrip(make_compressor(name, **options), torch.randn(1, d))
    last_seen: dict[int, int] = {}
    for r in range(1, 6):
        clients = sample_clients(10, 5, exp.cfg.seed, r)
        # new clients get the fp32 copy; the others every message since they last took part
        expected = sum(4 * d if c not in last_seen else min(4 * d, (r - last_seen[c]) * int(message[0]))
                       for c in clients)
        last_seen.update({c: r for c in clients})
        assert exp.round(r)["bytes_down"] == expected
    assert any(r - seen > 1 for seen in last_seen.values())  # some client did catch up over several rounds


def test_downlink_none_keeps_the_fp32_model_and_its_bytes(quick):
    plain = _experiment(quick)
    record = plain.round(1)
    assert plain.downlink is None
    assert record["bytes_down"] == 10 * 4 * plain.spec.dim
    explicit = _experiment(quick, "compression.downlink=none")
    assert explicit.round(1)["bytes_down"] == record["bytes_down"]
    torch.testing.assert_close(explicit.state["x"], plain.state["x"])


def test_fp16_downlink_trains_to_the_accuracy_of_none_for_half_the_bytes(quick):
    every_round = ["data.n_clients=20", "sampling.clients_per_round=20", "rounds=8"]
    plain = fedloom.run(None, [*quick, *every_round])
    half = fedloom.run(None, [*quick, *every_round, "compression.downlink=fp16"])
    assert abs(half.final["central_accuracy"] - plain.final["central_accuracy"]) <= 0.02
    assert plain.final["central_accuracy"] >= 0.5  # it did learn: the comparison means something
    d = plain.params.numel()
    # round 1 sends the fp32 model, later rounds one fp16 message (2 bytes a coordinate + scale)
    assert half.final["bytes_down_total"] == 20 * (4 * d + 7 * (2 * d + 4))
    assert plain.final["bytes_down_total"] == 20 * 8 * 4 * d
    assert half.final["bytes_up_total"] == plain.final["bytes_up_total"]


@pytest.mark.parametrize("overrides, message", [
    (["compression.downlink=topq"], "compression: downlink: unknown compressor 'topq'; available: .*topk"),
    (["compression.downlink=topk", "compression.downlink_options.kk=3"],
     "compression: downlink: compressor 'topk' takes no option kk"),
    (["compression.downlink_options.k=0.1"], "compression: downlink_options needs a downlink compressor"),
    (["compression.downlinks=fp16"], "unknown key 'compression.downlinks'"),
])
def test_downlink_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_downlink_is_refused_in_decentralized_runs():
    from fedloom.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="decentralized runs have no server"):
        load_config(None, ["mode=decentralized", "compression.downlink=fp16"])


def test_powersgd_uplink_is_layer_by_layer_with_the_models_shapes(quick):
    exp = _experiment(quick, "compression.name=powersgd", "compression.options.rank=2")
    record = exp.round(1)
    # per client: P [rows, 2] and Q [cols, 2] in fp32 for every tensor of 2+ dims (shape[0] x rest),
    # a 1-D tensor (bias) as it is
    per_client = sum(4 * 2 * (s[0] + s.numel() // s[0]) if len(s) > 1 else 4 * s.numel() for s in exp.spec.shapes)
    assert len(exp.spec.shapes) > 1 and record["bytes_up"] == 10 * per_client
