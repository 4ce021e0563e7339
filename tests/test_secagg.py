"""Secure aggregation (SecAgg, SecAgg+): exact sums under dropouts, clean failure below the threshold,
masked vectors that look uniform to the server, training equal to FedAvg up to quantization, the
distributed DP noise, and the refused combinations."""

import copy

import numpy as np
import pytest
import torch
from scipy import stats

import fedloom
from fedloom.config import ConfigError, load_config
from fedloom.pipeline.base import Context
from fedloom.privacy import secagg
from fedloom.privacy.secagg import Params, SecAggServer
from fedloom.privacy.secagg_quantize import Quantizer, needed_bits
from fedloom.privacy.secagg_round import PHASES, SecureMean, draw_drops, run_protocol, secure_mean
from fedloom.privacy.transforms import local_noise
from fedloom.rounds.federated import FederatedRound
from fedloom.runner import RunFailed

IDS = list(range(100, 120))  # 20 clients, ids that are not positions


def _quantized_updates(d: int, seed: int = 0) -> dict[int, np.ndarray]:
    q, gen = Quantizer(bits=32, value_bits=16, clip=1.0, stochastic=True), torch.Generator().manual_seed(seed)
    return {u: q.encode(torch.randn(d, generator=gen) * 0.3, q.levels, gen) for u in IDS}


def _no_drops() -> dict[str, set[int]]:
    return {phase: set() for phase in PHASES}


@pytest.mark.parametrize("neighbours", [None, 8])
def test_the_sum_is_exact_with_a_third_dropping_before_masked_input_and_some_at_unmask(neighbours):
    inputs, mask = _quantized_updates(500), (1 << 32) - 1
    drops = {**_no_drops(), "masked_input": set(IDS[::3][:7]), "unmask": {IDS[1], IDS[5]}}
    params = Params(bits=32, dim=501, threshold=3 if neighbours else 11, neighbours=neighbours)
    outcome = run_protocol(inputs, params, graph_seed=7, drops=drops)
    assert outcome.failure is None
    survivors = sorted(set(IDS) - drops["masked_input"])
    assert outcome.summed == survivors and len(survivors) == 13
    expected = np.zeros(501, dtype=np.uint64)
    for u in survivors:  # the unmask-phase dropouts sent y_u: their inputs are in the sum
        expected = (expected + inputs[u]) & np.uint64(mask)
    assert np.array_equal(outcome.total, expected)
    assert outcome.costs.survivors == {"advertise": 20, "share_keys": 20, "masked_input": 13, "unmask": 11}


def test_secagg_plus_shares_with_few_neighbours_and_sums_the_same():
    graph = secagg.sharing_graph(IDS, 6, seed=3)
    assert all(len(group) == 7 and u in group for u, group in graph.items())
    assert all(u in graph[v] for u, group in graph.items() for v in group)  # symmetric pairs cancel
    inputs = _quantized_updates(200, seed=1)
    drops = {**_no_drops(), "share_keys": {IDS[0]}, "masked_input": {IDS[4], IDS[9]}}
    full = run_protocol(inputs, Params(32, 201, 11), 3, drops)
    plus = run_protocol(inputs, Params(32, 201, 4, neighbours=6), 3, drops)
    assert plus.failure is None and np.array_equal(plus.total, full.total)
    assert plus.costs.up["share_keys"] < full.costs.up["share_keys"] / 2
    key_bytes = 4 + 3 * secagg.KEY_BYTES  # id, two X25519 keys and the Ed25519 verification key
    assert plus.costs.down["advertise"] == 20 * (4 + 7 * key_bytes)  # each client gets its group's keys only
    assert full.costs.down["advertise"] == 20 * (4 + 20 * key_bytes)


def test_fewer_than_t_survivors_fail_the_aggregation_cleanly():
    inputs = _quantized_updates(50)
    drops = {**_no_drops(), "masked_input": set(IDS[:9]), "unmask": set(IDS[9:12])}
    outcome = run_protocol(inputs, Params(32, 51, threshold=10), 1, drops)
    assert outcome.total is None and outcome.summed == []
    assert "8 clients unmasking responses, fewer than the threshold 10" in outcome.failure
    # SecAgg+: a dropped client's key needs t shares from its own neighbourhood
    drops = {**_no_drops(), "masked_input": set(IDS[:10])}
    outcome = run_protocol(inputs, Params(32, 51, threshold=5, neighbours=4), 1, drops)
    assert outcome.total is None and "shares of client" in outcome.failure


def _base(**secure) -> dict:
    return {"data": {"dataset": "digits", "n_clients": 20}, "sampling": {"clients_per_round": 20}, "rounds": 1,
            "output": {"save": False, "progress": False}, "evaluation": {"federated": False},
            "secure_aggregation": secure}


def test_a_run_whose_rounds_lack_survivors_keeps_its_model():
    raw = {**_base(protocol="secagg", threshold=0.9, dropout_masked_input=0.2), "rounds": 2, "max_failed_rounds": 3}
    cfg = load_config(raw)
    x0 = FederatedRound(cfg).init_state()["x"]
    result = fedloom.run(cfg)
    assert torch.equal(result.params, x0)
    assert all(r["round_failed"] and "threshold 18" in r["secagg_failure"] for r in result.history)
    with pytest.raises(RunFailed, match="no update was usable"):
        fedloom.run(load_config({**raw, "max_failed_rounds": 2}))


def _capture_server_inputs(monkeypatch) -> dict[str, list]:
    """Everything the server's four methods receive."""
    seen: dict[str, list] = {}
    for name in ("collect_keys", "route_shares", "collect_masked", "unmask"):
        original = getattr(SecAggServer, name)

        def spy(self, messages, original=original, name=name):
            seen.setdefault(name, []).append(messages)
            return original(self, messages)

        monkeypatch.setattr(SecAggServer, name, spy)
    return seen


def test_the_server_gets_only_bytes_and_masked_vectors_look_uniform(monkeypatch):
    seen = _capture_server_inputs(monkeypatch)
    d, bits = 20_000, 16
    q = Quantizer(bits, value_bits=8, clip=1.0, stochastic=False)
    gen = torch.Generator().manual_seed(0)
    rows = {u: torch.linspace(-0.5, 0.5, d) * (1 + i % 3) + 0.01 * torch.randn(d, generator=gen)
            for i, u in enumerate(IDS[:10])}  # structured inputs: far from uniform
    inputs = {u: q.encode(r, q.levels, None) for u, r in rows.items()}
    outcome = run_protocol(inputs, Params(bits, d + 1, 6), 5, _no_drops())
    assert np.array_equal(outcome.total, sum(inputs.values()) & np.uint64((1 << bits) - 1))

    [adverts], [shares], [masked], [reveals] = (seen[k] for k in ("collect_keys", "route_shares", "collect_masked",
                                                                   "unmask"))
    assert all(isinstance(m, bytes) for m in [*adverts, *shares.values(), *masked.values(), *reveals.values()])
    for u, message in masked.items():
        y = np.frombuffer(message, dtype=">u2").astype(np.int64)
        counts = np.bincount(y >> 12, minlength=16)  # the top 4 bits: 16 bins of 1250 expected
        assert stats.chisquare(counts).pvalue > 1e-3, u
        x = inputs[u].astype(np.int64)
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.05, u
        assert stats.chisquare(np.bincount(x >> 12, minlength=16)).pvalue < 1e-10  # the input itself is not


def _round(U: torch.Tensor, w: torch.Tensor, spec: SecureMean, seed: int = 0) -> tuple[torch.Tensor, dict]:
    ctx = Context(1, seed, list(range(len(U))), torch.zeros(U.shape[1]))
    row, _, _, metrics = secure_mean(spec).apply(U, w, None, ctx)
    return row, metrics


def _spec(q: Quantizer, max_weight: float, **kw) -> SecureMean:
    return SecureMean(lambda n: (n + 1) // 2, lambda n: None, q, {}, max_weight, **kw)


@pytest.mark.parametrize("stochastic", [False, True])
def test_the_secure_mean_is_the_weighted_mean_within_the_quantization_bound(stochastic):
    gen = torch.Generator().manual_seed(2)
    U, w = torch.randn(12, 300, generator=gen) * 0.2, torch.randint(20, 60, (12,), generator=gen).float()
    q = Quantizer(32, 12, clip=1.0, stochastic=stochastic)
    row, metrics = _round(U, w, _spec(q, max_weight=60.0))
    p_hat = torch.tensor([q.weight(x, 60.0) for x in w.tolist()], dtype=torch.float64) / q.levels
    exact = (p_hat / p_hat.sum()) @ U.double()
    step = q.clip / q.levels
    bound = (step if stochastic else step / 2) / p_hat.mean()
    assert (row[0].double() - exact).abs().max() <= bound
    plain = (w / w.sum()).double() @ U.double()  # the example-weighted mean, weights rounded to 1/Q steps of w_max
    weight_error = (p_hat / p_hat.sum() - w / w.sum()).abs().sum() * U.abs().max()
    assert (row[0] - plain).abs().max() <= bound + weight_error
    assert metrics["secagg_summed"] == 12 and metrics["uplink_bytes"] > 12 * 301 * 4


def test_distributed_noise_sums_to_the_central_noise():
    m, d, z, clip = 16, 40_000, 1.5, 0.5
    U, w = torch.zeros(m, d), torch.ones(m)
    ctx = Context(3, 0, list(range(m)), torch.zeros(d))
    U, w, _, _ = local_noise(z * clip / m ** 0.5).apply(U, w, None, ctx)
    q = Quantizer(32, 20, clip=4.0, stochastic=True)
    row, _, _, _ = secure_mean(_spec(q, 1.0, denominator=m)).apply(U, w, None, ctx)
    assert row[0].std().item() == pytest.approx(z * clip / m, rel=0.02)  # dp_mean's central std
    assert abs(row[0].mean().item()) < 5 * z * clip / m / d ** 0.5


def test_draw_drops_is_seeded_and_takes_the_fraction_of_the_round():
    fractions = {"masked_input": 1 / 3, "unmask": 0.1}
    drops = draw_drops(IDS, fractions, seed=4, round_idx=2)
    assert drops == draw_drops(IDS, fractions, seed=4, round_idx=2)
    assert len(drops["masked_input"]) == 7 and len(drops["unmask"]) == 2 and not drops["masked_input"] & drops["unmask"]
    assert drops != draw_drops(IDS, fractions, seed=4, round_idx=3)


@pytest.mark.slow
def test_training_with_secagg_equals_fedavg_up_to_quantization_and_secagg_plus_equals_secagg():
    secure = dict(rounding="deterministic", clip=4.0, value_bits=20, bits=32)
    plain = fedloom.run(load_config({**_base(), "rounds": 3}))
    one = fedloom.run(load_config({**_base(protocol="secagg", **secure), "rounds": 1}))
    first = fedloom.run(load_config({**_base(), "rounds": 1}))
    # one round, FedAvg's server step (SGD, lr 1): the model moves by the aggregate, off by at most
    # step / 2 / mean(p) plus the weights' rounding (p = examples / the largest client's, to 1/Q)
    cfg = load_config(_base(protocol="secagg", **secure))
    q, sizes = Quantizer(32, 20, 4.0, False), FederatedRound(cfg).data.client_sizes()
    p_hat = torch.tensor([q.weight(s, sizes.max()) for s in sizes.tolist()]) / q.levels
    p = torch.tensor(sizes / sizes.sum())
    bound = (q.clip / q.levels) / 2 / p_hat.mean() + (p_hat / p_hat.sum() - p).abs().sum() * q.clip
    bound += 1e-6  # float32 rounding of the two models (values below 1, spacing under 1.2e-7)
    assert (one.params - first.params).abs().max() <= bound
    three = fedloom.run(load_config({**_base(protocol="secagg", dropout_unmask=0.1, **secure), "rounds": 3}))
    assert (three.params - plain.params).abs().max() < 1e-4  # the per-round bound, carried through training
    plus = fedloom.run(load_config({**_base(protocol="secagg+", neighbours=6, threshold=0.5, dropout_unmask=0.1,
                                            **secure), "rounds": 3}))
    assert torch.equal(plus.params, three.params)  # the same survivors' integers: the same exact sum
    assert three.history[-1]["secagg_survivors_unmask"] == 18


@pytest.mark.slow
def test_distributed_dp_runs_under_secagg_and_reports_epsilon():
    raw = {**_base(protocol="secagg+", clip=2.0), "rounds": 2,
           "privacy": {"mechanism": "distributed", "noise_multiplier": 1.0, "clip": 1.0}}
    result = fedloom.run(load_config(raw))
    central = load_config({**_base(), "rounds": 2, "privacy": {"mechanism": "central", "noise_multiplier": 1.0}})
    assert result.history[-1]["epsilon"] == pytest.approx(central.privacy_accounting().epsilon(1.0, 2))
    assert "dp_local_noise (client)" in result.summary["pipeline"]


REFUSED = [
    ({"server": {"aggregator": {"name": "median"}}}, "server.aggregator = 'median'"),
    ({"server": {"transforms": [{"name": "clip", "options": {"max_norm": 1.0}}]}}, "server.transforms"),
    ({"attack": {"name": "signflip", "f": 2}}, "attack.name = 'signflip'"),
    ({"compression": {"name": "topk", "options": {"k": 0.1}}}, "compression.name = 'topk'"),
    ({"mode": "decentralized"}, "federated mode"),
    ({"algorithm": {"name": "scaffold"}}, "algorithm.name = 'scaffold'"),
    ({"privacy": {"mechanism": "central", "noise_multiplier": 1.0}}, "privacy.mechanism = 'distributed'"),
    ({"deploy": {"max_update_norm": 5.0}}, "deploy.max_update_norm"),
    ({"secure_aggregation": {"protocol": "secagg", "bits": 20}}, "bits = 20 is too few: the sum of 20 clients"),
    ({"secure_aggregation": {"protocol": "secagg+", "neighbours": 5}}, "neighbours = 5: an even number"),
    ({"secure_aggregation": {"protocol": "secagg", "threshold": 21}}, "threshold = 21 is more than a sharing group"),
    ({"secure_aggregation": {"protocol": "secagg", "threshold": 1.5}}, "a fraction is at most 1.0"),
    ({"secure_aggregation": {"protocol": "none"}, "privacy": {"mechanism": "distributed", "noise_multiplier": 1.0}},
     "set secure_aggregation.protocol"),
]


@pytest.mark.parametrize("extra, message", REFUSED)
def test_combinations_that_need_individual_rows_are_refused(extra, message):
    raw = copy.deepcopy(_base(protocol="secagg"))
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match="secure_aggregation|privacy") as err:
        load_config(raw)
    assert message in str(err.value)


def test_a_missing_crypto_library_is_named_at_load(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "Crypto" else real(name, *a))
    with pytest.raises(ConfigError, match=r"missing: Crypto\): pip install 'fedloom\[secagg\]'"):
        load_config(_base(protocol="secagg"))


def test_needed_bits_is_the_smallest_ring_that_holds_the_sum():
    for clients, value_bits in [(1, 2), (20, 16), (1000, 16), (7, 9)]:
        bits, top = needed_bits(clients, value_bits), clients * (2 ** (value_bits - 1) - 1)
        assert -(2 ** (bits - 1)) <= -top and top < 2 ** (bits - 1) and top >= 2 ** (bits - 2)
