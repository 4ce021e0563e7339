"""Byzantine-robust aggregators: pure functions of the update matrix ``U [n, d]``.

Each rule is one vectorized computation over ``U``; Python loops run only over a
few iterations or over the n clients of a selection step, never over coordinates,
so every rule handles d = 10^6 and more on a CPU. ``f`` is the number of Byzantine
clients a rule must tolerate; rules that need more clients than they get raise a
ValueError naming the requirement.

Weights are client-reported example counts. Rules that select or rank clients
(median, trimmed mean, Krum, Bulyan) count clients and ignore them, so a Byzantine
client cannot buy influence by claiming many examples. Rules whose result is an
average (multikrum, geomed, centered clipping, norm clipping, flag) use them, and
are then only as robust as the weights are trustworthy.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from fedloom.aggregation.base import Aggregator, register, stateless, weighted_mean

_BLOCK = 4096  # coordinates per sorted block: a few MB, near the cache; 1024 to 16384 time the same


def _normalized(w: Tensor, like: Tensor) -> Tensor:
    w = w.to(like)
    return w / w.sum()


def _need(name: str, n: int, f: int, minimum: int, rule: str) -> None:
    if n < minimum:
        raise ValueError(f"{name} with f={f} needs n >= {rule} = {minimum} clients; got n={n}")


def _sorted_reduce(U: Tensor, reduce: Callable[[Tensor], Tensor], rows: Tensor | None = None) -> Tensor:
    """``reduce(S)`` over all coordinates, where ``S [block, n]`` holds each coordinate's n values
    (of the given rows only, if any) sorted.

    On CPU, numpy's vectorized sort of small contiguous rows on column blocks, spread
    over torch's threads, is several times faster than ``torch.median``/``sort`` along dim 0.
    """
    if U.device.type != "cpu" or U.dtype == torch.bfloat16:
        return reduce((U if rows is None else U[rows]).T.sort(dim=1).values)
    A = U.detach().numpy()
    take = slice(None) if rows is None else rows.numpy()

    def block(start: int) -> Tensor:
        S = np.ascontiguousarray(A[take, start : start + _BLOCK].T)
        S.sort(axis=1)
        return reduce(torch.from_numpy(S))

    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        return torch.cat(list(pool.map(block, range(0, U.shape[1], _BLOCK))))


def _middle(S: Tensor) -> Tensor:
    n = S.shape[1]
    return 0.5 * (S[:, (n - 1) // 2] + S[:, n // 2])


@register("median")
def median() -> Aggregator:
    """Coordinate-wise median (Yin et al. 2018): breakdown point 1/2 in every coordinate.

    Averages the two middle values for even n. Unweighted (see the module docstring).
    """
    return stateless("median", lambda U, w: _sorted_reduce(U, _middle))


@register("trimmed_mean")
def trimmed_mean(beta: float = 0.1) -> Aggregator:
    """Coordinate-wise trimmed mean (Yin et al. 2018): the mean of each coordinate's middle values.

    Drops the floor(beta * n) largest and smallest values of each coordinate, so it tolerates
    f <= floor(beta * n). Ignores the weights: which values go depends on order, not weight.
    """
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean: beta is the fraction trimmed at each end, in [0, 0.5); got {beta}")

    def fn(U: Tensor, w: Tensor) -> Tensor:
        n = U.shape[0]
        k = math.floor(beta * n)
        if n - 2 * k < 1:
            raise ValueError(f"trimmed_mean with beta={beta} trims every one of n={n} rows")
        return _sorted_reduce(U, lambda S: S[:, k : n - k].mean(dim=1))

    return stateless("trimmed_mean", fn)


def _scaled_gram(U: Tensor) -> tuple[Tensor, Tensor]:
    """(Gs, s) in float64 with U U^T = s_i s_j Gs_ij. When the plain product overflows (finite but
    huge updates), the rows are first scaled by powers of two to norm below 1, which is exact."""
    G = U @ U.T
    if torch.isfinite(G).all():
        return G.double(), torch.ones(len(U), dtype=torch.float64, device=U.device)
    s = torch.exp2(torch.frexp(torch.linalg.vector_norm(U, dim=1, dtype=torch.float64))[1].double())
    X = U * s.reciprocal().to(U.dtype)[:, None]
    return (X @ X.T).double(), s


_GRAM_COLUMNS = 1 << 16  # columns per float64 block of the centred Gram product: n x 512 KB at a time


def _centred_gram(U: Tensor) -> Tensor:
    """(U - mean) (U - mean)^T in float64, accumulated over column blocks so no float64 copy of U
    is ever whole. Centring drops the part all rows share, which float32 products would keep and
    round: rows that differ by 1e-4 of their norm keep their digits."""
    centre = U.mean(dim=0, dtype=torch.float64)
    G = torch.zeros(len(U), len(U), dtype=torch.float64, device=U.device)
    for start in range(0, U.shape[1], _GRAM_COLUMNS):
        C = U[:, start : start + _GRAM_COLUMNS].double() - centre[start : start + _GRAM_COLUMNS]
        G += C @ C.T
    return G


def _sq_dists(U: Tensor) -> Tensor:
    """Squared distances between rows by the Gram trick on the centred rows (one [n, n] float64
    product), exactly symmetric; a distance too large for float64 is inf, never NaN."""
    G = _centred_gram(U)
    sq = G.diagonal()
    D = (sq[:, None] + sq[None, :] - 2 * G).clamp_min(0).nan_to_num(nan=math.inf)
    return (D + D.T).fill_diagonal_(0) / 2


def _krum_order(D: Tensor, f: int) -> Tensor:
    """Rows from best to worst Krum score (Blanchard et al.: summed squared distance to the
    n - f - 2 nearest other rows); equal scores, as two mutual nearest neighbours have, go by
    total distance, so the choice does not depend on the rows' order. The neighbour count is
    kept in [1, n - 1] for the shrinking sets of Bulyan's selection.
    """
    n = D.shape[0]
    k = min(max(n - f - 2, 1), n - 1)
    score = D.clone().fill_diagonal_(math.inf).topk(k, largest=False).values.sum(dim=1)
    by_total = D.sum(dim=1).argsort(stable=True)
    return by_total[score[by_total].argsort(stable=True)]


@register("krum")
def krum(f: int) -> Aggregator:
    """Krum (Blanchard et al. 2017): the update whose n - f - 2 nearest neighbours are closest.

    Needs n >= 2f + 3. Returns one client's update as sent; weights unused.
    """

    def fn(U: Tensor, w: Tensor) -> Tensor:
        _need("krum", U.shape[0], f, 2 * f + 3, "2f + 3")
        return U[_krum_order(_sq_dists(U), f)[0]].clone()

    return stateless("krum", fn)


@register("multikrum")
def multikrum(f: int, m: int | None = None) -> Aggregator:
    """Multi-Krum (Blanchard et al. 2017): example-weighted mean (paper: uniform) of the m best-scored updates.

    m = n - f by default; averaging lowers the variance of Krum's single pick. Needs n >= 2f + 3.
    A deliberate difference: the paper averages the m picks uniformly; here they keep their
    example-count weights (zero for the rest), as every averaging rule in this module does.
    """

    def fn(U: Tensor, w: Tensor) -> Tensor:
        n = U.shape[0]
        _need("multikrum", n, f, 2 * f + 3, "2f + 3")
        keep = n - f if m is None else m
        if not 1 <= keep <= n:
            raise ValueError(f"multikrum: m must be in [1, n={n}]; got m={m}")
        best = _krum_order(_sq_dists(U), f)[:keep]
        chosen = torch.zeros_like(w).index_copy_(0, best, w[best])  # zero weight for the rest: no row copies
        return weighted_mean(U, chosen)

    return stateless("multikrum", fn)


def _closest_to_middle_mean(S: Tensor, beta: int) -> Tensor:
    """Mean of the beta values of each sorted row nearest its median (El Mhamdi et al. 2018).

    Values tied at the beta-th distance share the slots left for them equally, which is the
    expected result of breaking the tie uniformly at random: deterministic, independent of the
    rows' order, and not pulled towards repeated values on one side (ALIE sends identical rows).
    """
    dist = (S - _middle(S)[:, None]).abs()
    edge = dist.kthvalue(beta, dim=1, keepdim=True).values
    inside, tied = dist < edge, dist == edge
    left = beta - inside.sum(dim=1)  # slots for the tied values, at least 1
    tied_mean = (S * tied).sum(dim=1) / tied.sum(dim=1)
    return ((S * inside).sum(dim=1) + left * tied_mean) / beta


@register("bulyan")
def bulyan(f: int) -> Aggregator:
    """Bulyan (El Mhamdi et al. 2018): Krum selection, then a coordinate-wise mean around the median.

    Krum, applied repeatedly, picks theta = n - 2f updates (each pick leaves the pool); then each
    coordinate averages the beta = theta - 2f selected values closest to its median, so no single
    coordinate can be pushed far (Krum alone bounds only whole-vector distances); values tied at
    the beta-th distance share the remaining slots equally (``_closest_to_middle_mean``). Needs
    n >= 4f + 3. Unweighted (a selection rule).
    """

    def fn(U: Tensor, w: Tensor) -> Tensor:
        n = U.shape[0]
        _need("bulyan", n, f, 4 * f + 3, "4f + 3")
        D = _sq_dists(U)
        pool = torch.arange(n, device=D.device)
        chosen = []
        for _ in range(n - 2 * f):
            pick = int(_krum_order(D[pool][:, pool], f)[0])
            chosen.append(pool[pick])
            pool = torch.cat([pool[:pick], pool[pick + 1 :]])
        return _sorted_reduce(U, lambda S: _closest_to_middle_mean(S, n - 4 * f), rows=torch.stack(chosen))

    return stateless("bulyan", fn)


def _row_dists(U: Tensor, v: Tensor) -> Tensor:
    """``||u_i - v||`` computed directly: no Gram-trick cancellation, no [n, d] temporary."""
    return torch.cdist(U, v[None], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]


@register("geomed")
def geomed(nu: float = 1e-6, max_iter: int = 100, tol: float = 1e-6) -> Aggregator:
    """Weighted geometric median by smoothed Weiszfeld, as RFA (Pillutla, Kakade, Harchaoui 2022).

    Minimizes sum_i a_i ||v - u_i|| (a = normalized weights), each step
    v <- sum_i b_i u_i / sum_i b_i with b_i = a_i / max(nu, ||v - u_i||); nu keeps a step
    finite when v reaches a row. Breakdown point 1/2. Starts from the weighted mean of the
    updates clipped to the median norm (RFA starts from the mean, which a huge update drags
    arbitrarily far); stops after max_iter steps or once a step moves v by less than tol times
    the median distance to the rows (a scale the honest majority sets, so far outliers cannot
    stop it early).
    """

    def fn(U: Tensor, w: Tensor) -> Tensor:
        a = _normalized(w, U)
        norm = torch.linalg.vector_norm(U, dim=1)
        v = (a * (norm.median() / norm).clamp(max=1)) @ U
        for _ in range(max_iter):
            dist = _row_dists(U, v)
            b = a / dist.clamp_min(nu)
            v, previous = (b / b.sum()) @ U, v
            if torch.linalg.vector_norm(v - previous) <= tol * dist.median():
                break
        return v

    return stateless("geomed", fn)


@register("centered_clipping")
def centered_clipping(tau: float, iterations: int = 1, momentum: float = 0.9) -> Aggregator:
    """Centered clipping (Karimireddy, He, Jaggi 2021, Algorithm 2), the server's last aggregate as momentum.

    Each client's momentum m_i = momentum * v + (1 - momentum) * u_i is clipped to radius tau
    around the centre c, starting from the previous aggregate v, and the centre moves by the
    weighted mean of the clipped differences, ``iterations`` times. One client moves the result
    by at most tau times its weight share. In FL a sampled client keeps no momentum of its own,
    so every m_i builds on the server's previous aggregate v, which is the state (zeros at
    first; ``state=None`` means that too). A deliberate difference: the paper's clients keep their
    own momenta; here the one shared v stands in for them. Returns the new momentum, which is also
    the new state.
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"centered_clipping: momentum must be in [0, 1); got {momentum}")
    if tau <= 0 or iterations < 1:
        raise ValueError(f"centered_clipping: need tau > 0 and iterations >= 1; got tau={tau}, iterations={iterations}")

    def apply(U: Tensor, w: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        a = _normalized(w, U)
        v = torch.zeros_like(U[0]) if state is None else state.to(U)
        c = v
        for _ in range(iterations):
            shift = momentum * v - c  # m_i - c = (1 - momentum) * u_i + shift
            norms = (1 - momentum) * _row_dists(U, -shift / (1 - momentum))
            s = a * (tau / norms).clamp(max=1)
            c = c + (1 - momentum) * (s @ U) + s.sum() * shift
        return c, c

    return Aggregator("centered_clipping", init=lambda d: torch.zeros(d), apply=apply)


@register("norm_clip")
def norm_clip(max_norm: float) -> Aggregator:
    """Norm bounding (Sun et al. 2019): clip every update to norm max_norm, then the weighted mean.

    A client moves the result by at most max_norm times its weight share.
    """
    if max_norm <= 0:
        raise ValueError(f"norm_clip: max_norm must be > 0; got {max_norm}")

    def fn(U: Tensor, w: Tensor) -> Tensor:
        scale = (max_norm / torch.linalg.vector_norm(U, dim=1)).clamp(max=1)
        return (_normalized(w, U) * scale) @ U

    return stateless("norm_clip", fn)


def _flag_weights(a: Tensor, unexplained: Tensor, pair_residual: Tensor, lam: float, eps: float) -> Tensor:
    """IRLS matrix P for the flag objective, each square-rooted term weighted by 1 / its current root.

    Unary terms give diag(a_i / sqrt(s_i)); pair terms b_ij = lam a_i a_j / Z / sqrt(r_ij) give
    the scatter of the differences u_i - u_j, i.e. 2 * (graph Laplacian of b).
    """
    b = lam * torch.outer(a, a) / (1 - a.square().sum()).clamp_min(eps) / (pair_residual + eps).sqrt()
    b.fill_diagonal_(0)
    return torch.diag(a / (unexplained + eps).sqrt() + 2 * b.sum(dim=1)) - 2 * b


def _flag_basis(K: Tensor, P: Tensor, m: int) -> Tensor:
    """B [n, m] with Y = G^T B: the top-m eigenvectors of the weighted scatter G^T P G of the unit
    rows G (Gram K), found from the [n, n] problem P^1/2 K P^1/2, so Y^T Y = I and Y is never formed."""
    e, Q = torch.linalg.eigh(P)
    R = (Q * e.clamp_min(0).sqrt()) @ Q.T
    lam, V = torch.linalg.eigh(R @ K @ R)
    lam, V = lam[-m:], V[:, -m:]
    keep = lam > 1e-12 * lam[-1].clamp_min(1e-300)
    return (R @ V) * torch.where(keep, lam.clamp_min(1e-300).rsqrt(), 0.0)


@register("flag")
def flag(m: int = 1, lam: float = 0.0, iterations: int = 4, eps: float = 1e-8) -> Aggregator:
    """Flag Aggregator (Almasi et al., ICLR 2024): the mean direction projected on a robust subspace.

    Y is a robust m-dimensional subspace of the unit-normalized updates g_i (authors: Almasi,
    Mishra, Vamanan, Ravi); the result is their mean direction projected onto Y.

    Y minimizes sum_i a_i sqrt(1 - ||Y^T g_i||^2) (the flag median: sine of each update's angle to
    Y) + lam * sum_{i!=j} a_i a_j ||(I - YY^T)(g_i - g_j)|| / Z (favouring a Y that preserves the
    pairs' differences; Z makes it an average over pairs). We could not read the paper's text; this follows
    its abstract and the authors' code: IRLS (FlagIRLS, Mankovich et al. 2022) from the flag mean
    (PCA of the g_i), each round reweighting every term by 1 / its current square root and taking
    the weighted scatter's top-m eigenvectors. Ours differs in: (1) the pair residual above is the
    norm lost by projecting the difference (the authors' code uses |1 - ||Y^T(g_i - g_j)||^2|);
    (2) everything runs on the [n, n] Gram matrix, so cost is one [n, d] Gram product plus one
    matvec; (3) the result Y Y^T sum_i a_i g_i is scaled by the median update norm (the authors'
    code returns sum_i Y Y^T g_i / m, which drops the scale), so identical updates give that update
    and a few huge updates cannot set the step size.
    """
    if m < 1 or iterations < 0 or lam < 0:
        raise ValueError(f"flag: need m >= 1, iterations >= 0, lam >= 0; got m={m}, iterations={iterations}, lam={lam}")

    def fn(U: Tensor, w: Tensor) -> Tensor:
        Gs, s = _scaled_gram(U)
        root = Gs.diagonal().sqrt()
        inv = torch.where(root > 0, root.reciprocal(), 0.0)
        K = Gs * inv[:, None] * inv[None, :]
        norm = s * root
        a = _normalized(w, K)
        unit_dist = K.diagonal()[:, None] + K.diagonal()[None, :] - 2 * K
        P = _flag_weights(a, torch.ones_like(a), torch.ones_like(K), lam, eps)
        for _ in range(iterations):
            C = _flag_basis(K, P, m).T @ K  # [m, n]: coordinates of the g_i in Y
            H = C.T @ C
            projected = H.diagonal()[:, None] + H.diagonal()[None, :] - 2 * H
            P = _flag_weights(a, (1 - H.diagonal()).clamp_min(0), (unit_dist - projected).clamp_min(0), lam, eps)
        B = _flag_basis(K, P, m)
        coef = B @ (B.T @ (K @ a)) * inv / s
        return norm.median().to(U.dtype) * (coef.to(U.dtype) @ U)

    return stateless("flag", fn)
