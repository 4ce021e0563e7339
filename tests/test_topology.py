import math

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.topology import (
    TIME_VARYING,
    TOPOLOGIES,
    active_subgraph,
    check_connected,
    check_mixing,
    complete,
    consensus_distance,
    draw_graph,
    erdos_renyi,
    exponential,
    exponential_directed,
    gossip,
    make_topology,
    max_degree,
    metropolis_hastings,
    mixing_from_user,
    one_peer_exponential,
    random_matching,
    regular,
    ring,
    small_world,
    spectral_gap,
    star,
    torus,
)

RULES = [metropolis_hastings, max_degree]


def degrees(G):
    return [d for _, d in G.degree]


def assert_valid_graph(G, n):
    assert sorted(G.nodes) == list(range(n))
    assert nx.is_connected(G)


# ---------------------------------------------------------------- builders


@pytest.mark.parametrize("n", [3, 10, 51])
def test_ring_has_degree_two(n):
    G = ring(n)
    assert_valid_graph(G, n)
    assert set(degrees(G)) == {2}


@pytest.mark.parametrize("n", [9, 12, 36, 100])
def test_torus_has_degree_four(n):
    G = torus(n)
    assert_valid_graph(G, n)
    assert set(degrees(G)) == {4}


@pytest.mark.parametrize("n", [7, 14, 2 * 11])
def test_torus_refuses_sizes_without_a_fitting_factorization(n):
    with pytest.raises(ValueError, match=rf"n={n} is not"):
        torus(n)


def test_complete_and_star_degrees():
    assert set(degrees(complete(7))) == {6}
    G = star(10)
    assert_valid_graph(G, 10)
    assert G.degree[0] == 9 and set(degrees(G)[1:]) == {1}


@pytest.mark.parametrize("n", [2, 8, 16, 33, 100, 1000])
def test_exponential_degree_is_about_two_log2_n(n):
    G = exponential(n)
    assert_valid_graph(G, n)
    hops = {h % n for k in range(math.ceil(math.log2(n))) for h in (2**k, -(2**k))}
    assert set(degrees(G)) == {len(hops)}
    assert math.log2(n) <= len(hops) <= 2 * math.ceil(math.log2(n))
    assert G.has_edge(0, 1) and (n < 3 or G.has_edge(0, 2))


@pytest.mark.parametrize("n", [16, 64, 256])
def test_exponential_gap_shrinks_like_1_over_log2_n_and_the_ring_like_1_over_n_squared(n):
    # Metropolis-Hastings gives every edge 1/(2 log2 n) on the exponential graph (n a power of
    # two); the eigenvalue at frequency n/2 is then 1 - 2/log2 n, and it is the second largest.
    assert spectral_gap(metropolis_hastings(exponential(n))) == pytest.approx(2 / math.log2(n), rel=1e-5)
    ring_theory = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n))
    assert spectral_gap(metropolis_hastings(ring(n))) == pytest.approx(ring_theory, rel=1e-3)


@pytest.mark.parametrize("n, k", [(20, 3), (31, 4), (50, 6)])
def test_regular_graph_is_connected_and_k_regular(n, k):
    G = regular(n, k, seed=1)
    assert_valid_graph(G, n)
    assert set(degrees(G)) == {k}
    assert nx.utils.graphs_equal(G, regular(n, k, seed=1))


def test_regular_refuses_odd_degree_sum():
    with pytest.raises(ValueError, match="n \\* k even"):
        regular(11, 3)


def test_erdos_renyi_is_connected_and_seeded():
    G = erdos_renyi(40, 0.15, seed=3)
    assert_valid_graph(G, 40)
    assert nx.utils.graphs_equal(G, erdos_renyi(40, 0.15, seed=3))
    assert not nx.utils.graphs_equal(G, erdos_renyi(40, 0.15, seed=4))


def test_erdos_renyi_below_connectivity_threshold_is_an_error():
    with pytest.raises(ValueError, match=r"no connected graph in 20 draws.*ln\(n\)/n"):
        erdos_renyi(200, 0.005, seed=0, tries=20)


def test_small_world_is_connected_with_k_n_over_2_edges():
    G = small_world(60, k=4, p=0.3, seed=2)
    assert_valid_graph(G, 60)
    assert G.number_of_edges() == 60 * 4 // 2
    with pytest.raises(ValueError, match="k must be even"):
        small_world(10, k=3)


def test_registry_builds_every_topology_with_defaults():
    assert TIME_VARYING <= set(TOPOLOGIES)
    for name, (builder, description) in TOPOLOGIES.items():
        assert description and callable(builder)
        built = make_topology(name, 36)
        G = built if isinstance(built, nx.Graph) else built.graph_at(0)
        assert sorted(G.nodes) == list(range(36)), name


def test_registry_errors_name_what_is_accepted():
    with pytest.raises(ValueError, match="unknown topology 'rng'; available: .*ring"):
        make_topology("rng", 10)
    with pytest.raises(ValueError, match=r"topology 'erdos_renyi' takes no option k \(its options: p, seed, tries\)"):
        make_topology("erdos_renyi", 10, k=3)


# ---------------------------------------------------------------- mixing matrices

GRAPHS = {
    "ring": lambda n, seed: ring(n),
    "torus": lambda n, seed: torus(3 * n),
    "complete": lambda n, seed: complete(n),
    "star": lambda n, seed: star(n),
    "exponential": lambda n, seed: exponential(n),
    "erdos_renyi": lambda n, seed: erdos_renyi(n, 0.5, seed=seed),
    "regular": lambda n, seed: regular(2 * n, 3, seed=seed),
    "small_world": lambda n, seed: small_world(n + 2, 4, 0.2, seed=seed),
    "matching": lambda n, seed: random_matching(n, seed).graph_at(seed),
}


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(GRAPHS)), n=st.integers(3, 40), seed=st.integers(0, 1000), rule=st.sampled_from(RULES)
)
def test_weights_are_symmetric_doubly_stochastic_nonnegative_and_sparse(name, n, seed, rule):
    G = GRAPHS[name](n, seed)
    W = rule(G)
    assert W.is_sparse and W.dtype == torch.float32
    assert W._nnz() == G.number_of_nodes() + 2 * G.number_of_edges()
    D = W.to_dense().double()
    assert torch.allclose(D, D.T, atol=1e-7)
    assert D.min() >= 0
    ones = torch.ones(len(D), dtype=torch.float64)
    assert torch.allclose(D @ ones, ones, atol=1e-6) and torch.allclose(D.T @ ones, ones, atol=1e-6)
    adjacency = torch.as_tensor(nx.to_numpy_array(G, nodelist=range(len(D)))) > 0
    assert torch.equal((D > 0) & ~torch.eye(len(D), dtype=torch.bool), adjacency)
    check_mixing(W)


def test_metropolis_hastings_weights_on_a_star():
    W = metropolis_hastings(star(5)).to_dense()
    assert W[0, 1] == pytest.approx(1 / 5) and W[1, 1] == pytest.approx(4 / 5) and W[0, 0] == pytest.approx(1 / 5)


def valid_dense(n=4):
    return metropolis_hastings(ring(n)).to_dense()


def test_check_mixing_names_the_asymmetric_pair():
    W = valid_dense()
    W[0, 1] += 0.1
    W[0, 0] -= 0.1
    with pytest.raises(ValueError, match=r"not symmetric: W\[(0, 1|1, 0)\]"):
        check_mixing(W)


def test_check_mixing_names_the_negative_entry():
    W = valid_dense()
    W[0, 2] = W[2, 0] = -0.2
    W[0, 0] += 0.2
    W[2, 2] += 0.2
    with pytest.raises(ValueError, match=r"negative entry W\[(0, 2|2, 0)\] = -0.2"):
        check_mixing(W)


def test_check_mixing_names_the_worst_row_sum():
    W = valid_dense()
    W[2, 2] += 0.3
    with pytest.raises(ValueError, match="not doubly stochastic: row 2 sums to 1.3"):
        check_mixing(W)


def test_check_mixing_accepts_the_directed_one_peer_matrix_only_when_asked():
    W = one_peer_exponential(8).mixing_at(0)
    check_mixing(W, symmetric=False)
    with pytest.raises(ValueError, match="not symmetric"):
        check_mixing(W)
    with pytest.raises(ValueError, match="not symmetric"):
        spectral_gap(W)


# ---------------------------------------------------------------- gossip dynamics

RATE_GRAPHS = [ring(12), torus(16), exponential(16), regular(20, 3, seed=0), star(10), small_world(24, 4, 0.2, seed=0)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
@pytest.mark.parametrize("G", RATE_GRAPHS, ids=lambda G: f"n{len(G)}-{G.number_of_edges()}e")
def test_gossip_contracts_at_the_rate_the_spectral_gap_predicts(G, rule):
    W = rule(G)
    rate = (1 - spectral_gap(W)) ** 2
    X = torch.randn(len(G), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    X = X - X.mean(dim=0)
    history = [consensus_distance(X)]
    while history[-1] > 1e-24 * history[0] and len(history) < 3000:
        X = gossip(W, X)
        history.append(consensus_distance(X))
    t = np.arange(len(history))
    assert np.all(np.array(history) <= rate**t * history[0] * (1 + 1e-6) + 1e-300)
    window = 10
    observed = (history[-1] / history[-1 - window]) ** (1 / window)
    assert observed == pytest.approx(rate, rel=1e-3)


def test_spectral_gap_sparse_path_matches_dense_and_theory():
    W = metropolis_hastings(exponential(600))  # Lanczos on the deflated matrix
    dense = torch.linalg.eigvalsh(W.to_dense().double()).abs().sort(descending=True).values
    assert spectral_gap(W) == pytest.approx(float(1 - dense[1]), rel=1e-6)
    n = 2000  # eigenvalues packed near 1: the shift-invert fallback; ring MH gap is known in closed form
    theory = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n))
    assert abs(spectral_gap(metropolis_hastings(ring(n))) - theory) < 1e-7 + 1e-3 * theory


def test_spectral_gap_of_complete_graph_is_one_and_of_bipartite_pairing_zero():
    assert spectral_gap(metropolis_hastings(complete(6))) == pytest.approx(1.0, abs=1e-6)
    swap = mixing_from_user([[0, 1], [1, 0]])  # oscillates forever, never agrees
    assert spectral_gap(swap) == pytest.approx(0.0, abs=1e-6)


MEAN_CASES = {
    "metropolis_hastings": lambda t: metropolis_hastings(regular(30, 4, seed=0)),
    "max_degree": lambda t: max_degree(star(30)),
    "random_matching": random_matching(30, seed=5).mixing_at,
    "one_peer_exponential": one_peer_exponential(30).mixing_at,
    "active_subgraph": lambda t: active_subgraph(ring(30), torch.arange(30) >= 10),
}


@pytest.mark.parametrize("case", sorted(MEAN_CASES))
def test_gossip_preserves_the_mean(case):
    X = 3.0 + torch.randn(30, 50, generator=torch.Generator().manual_seed(1))
    mean = X.mean(dim=0)
    for t in range(40):
        X = gossip(MEAN_CASES[case](t), X)
    torch.testing.assert_close(X.mean(dim=0), mean, atol=1e-5, rtol=1e-5)


def test_one_peer_exponential_averages_exactly_after_log2_n_rounds():
    n = 16
    topology = one_peer_exponential(n)
    product = torch.eye(n)
    for t in range(4):
        product = gossip(topology.mixing_at(t), product)
    torch.testing.assert_close(product, torch.full((n, n), 1 / n))
    assert list(topology.graph_at(5).successors(3)) == [5]  # round 5: hop 2^(5 mod 4) = 2
    X = torch.arange(n, dtype=torch.float32)[:, None]
    assert gossip(topology.mixing_at(5), X)[3, 0] == (3 + 5) / 2  # node i averages with node i + hop


def test_random_matching_pairs_everyone_afresh_each_round_reproducibly():
    topology = random_matching(9, seed=2)
    rounds = [topology.graph_at(t) for t in range(3)]
    for G in rounds:
        assert G.number_of_nodes() == 9 and G.number_of_edges() == 4
        assert max(degrees(G)) == 1
    assert len({frozenset(G.edges) for G in rounds}) == 3
    assert nx.utils.graphs_equal(rounds[1], random_matching(9, seed=2).graph_at(1))
    W = topology.mixing_at(0).to_dense()
    u, v = next(iter(rounds[0].edges))
    assert W[u, v] == W[u, u] == 0.5


# ---------------------------------------------------------------- refusals and user input


def test_disconnected_graph_is_refused_with_the_number_of_components():
    G = nx.disjoint_union(ring(5), ring(4))
    G.add_node(9)
    with pytest.raises(ValueError, match="disconnected: 3 components \\(sizes 5, 4, 1\\)"):
        check_connected(G)
    check_connected(ring(5))


def test_user_matrix_not_doubly_stochastic_is_refused_naming_the_key_and_row():
    with pytest.raises(ValueError, match=r"topology.matrix is not doubly stochastic: row 1 sums to 0.9"):
        mixing_from_user([[0.5, 0.5, 0.0], [0.5, 0.3, 0.1], [0.0, 0.1, 0.9]])


def test_user_matrix_malformed_or_disconnected_is_refused():
    with pytest.raises(ValueError, match="square"):
        mixing_from_user([[1.0, 0.0]])
    with pytest.raises(ValueError, match="matrix of numbers"):
        mixing_from_user([[1.0], [0.5, 0.5]])
    with pytest.raises(ValueError, match="graph of its nonzero entries.*2 components"):
        mixing_from_user(np.kron(np.eye(2), np.full((2, 2), 0.5)), name="decentralized.W")


def test_user_matrix_round_trips_to_sparse():
    D = valid_dense(5)
    W = mixing_from_user(D.tolist())
    assert W.is_sparse and W.dtype == torch.float32
    torch.testing.assert_close(W.to_dense(), D)


def test_active_subgraph_gossips_among_active_nodes_and_freezes_the_rest():
    G = ring(10)
    mask = torch.ones(10, dtype=torch.bool)
    mask[0] = False
    W = active_subgraph(G, mask)
    check_mixing(W)
    path = metropolis_hastings(nx.convert_node_labels_to_integers(nx.path_graph(range(1, 10))))
    torch.testing.assert_close(W.to_dense()[1:, 1:], path.to_dense())
    X = torch.randn(10, 3)
    torch.testing.assert_close(gossip(W, X)[0], X[0])


def test_active_subgraph_refuses_a_split_and_an_empty_selection():
    mask = torch.ones(10, dtype=torch.bool)
    mask[[0, 5]] = False
    with pytest.raises(ValueError, match=r"active subgraph \(8 of 10 nodes\) is disconnected: 2 components"):
        active_subgraph(ring(10), mask)
    with pytest.raises(ValueError, match="selects no node"):
        active_subgraph(ring(10), torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="one entry per node"):
        active_subgraph(ring(10), [True] * 9)


def test_draw_graph_writes_a_png_and_refuses_large_graphs(tmp_path):
    path = draw_graph(torus(16), tmp_path / "torus.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at most 100 nodes, got 101"):
        draw_graph(ring(101), tmp_path / "big.png")


@pytest.mark.parametrize("n", [2, 6, 8, 13])
def test_exponential_directed_is_ying_et_al_static_graph(n):
    # Ying et al. 2021: w_ij = 1/(tau + 1) if log2((j - i) mod n) is an integer or i = j, tau = ceil(log2 n)
    tau = math.ceil(math.log2(n))
    by_hand = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            gap = (j - i) % n
            if gap == 0 or math.log2(gap).is_integer():
                by_hand[i, j] = 1 / (tau + 1)
    W = exponential_directed(n).mixing_at(0)
    np.testing.assert_allclose(W.to_dense().double().numpy(), by_hand, rtol=1e-6, atol=0)
    assert torch.equal(exponential_directed(n).mixing_at(5).to_dense(), W.to_dense())  # static
    check_mixing(W, symmetric=False)  # row- and column-stochastic
    if n > 2:
        assert not np.allclose(by_hand, by_hand.T)


def test_gossip_rules_apply_a_non_symmetric_w_as_w_times_x():
    from fedloom.algorithms.gossip import ClippedGossip, mean_gossip

    W = exponential_directed(6).mixing_at(0)
    X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    expected = W.to_dense() @ X
    torch.testing.assert_close(mean_gossip(W, X, X), expected)
    torch.testing.assert_close(mean_gossip(W, X, X.clone()), expected)  # the neighbour-message path
    torch.testing.assert_close(ClippedGossip(tau=1e9)(W, X, X.clone()), expected)
    torch.testing.assert_close(expected.mean(dim=0), X.mean(dim=0))  # column-stochastic: the mean stays
