"""Privacy accounting of DP-FedAvg with the maintained ``dp_accounting`` library (no RDP maths here).

One round releases the sum of the sampled clients' rows, each clipped to L2 norm
``clip``, plus Gaussian noise of std ``z * clip``. fedloom's sampler draws a fixed
number ``m`` of the ``n`` clients without replacement, so ``n`` is public and the
neighbouring relation is *replace one client's data*: the sum moves by at most
``2 * clip``, and the round is a Gaussian mechanism of noise multiplier ``z / 2``
(std over sensitivity), subsampled without replacement (Wang, Balle and
Kasiviswanathan 2019 in the RDP accountant).

``local``: each client adds std ``z * clip`` to its own row. Its guarantee against
everyone, the server included, is the same Gaussian (noise multiplier ``z / 2``)
composed once a round, with no amplification by sampling (the server knows who
was sampled): an upper bound, since a client takes part in at most ``rounds`` rounds.

``ftrl`` (DP-FTRL, Kairouz et al. 2021): the sampler hands every client at most one
round of each epoch of ``n // m`` rounds and the noise tree restarts each epoch, so
a client changes at most one leaf of each tree: a single-epoch tree aggregation
(Gaussian of noise multiplier ``z / 2`` on each of the tree's ``ceil(log2(E + 1))``
levels), composed over the epochs, with no amplification by sampling. dp_accounting
states that event for its ``REPLACE_SPECIAL`` relation (its sensitivity folded in the
noise multiplier), which ``z / 2`` makes the replace-one bound.

Adaptive clipping (Andrew et al. 2021) releases a noised count with the clipped sum
and spends exactly the budget of the plain Gaussian of multiplier ``z``
(:func:`sum_noise_multiplier`), so its event is the plain one.

Epsilon is a pure function of the rounds played, so a resumed run needs no
accountant state. Supported: ``rdp`` for every case; ``pld`` only without
sampling (central with every client each round, or local): the library's PLD
accountant has no sampling without replacement; ``ftrl`` is ``rdp`` only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import dp_accounting
from dp_accounting import (ComposedDpEvent, DpEvent, GaussianDpEvent, NeighboringRelation, SelfComposedDpEvent,
                           SingleEpochTreeAggregationDpEvent)
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

Mechanism = Literal["central", "local", "ftrl"]
Accountant = Literal["rdp", "pld"]
NOISE_MULTIPLIER_RANGE = (1e-2, 1e3)  # where calibration looks; beyond it a run learns nothing or leaks everything
CALIBRATION_TOL = 1e-4


@dataclass(frozen=True)
class Accounting:
    """What the accountant needs to know of a run besides its noise multiplier and rounds."""

    mechanism: Mechanism
    accountant: Accountant
    n_clients: int
    sample_size: int  # clients sampled per round, without replacement
    delta: float

    @property
    def sampled(self) -> bool:
        """Whether the accounted release is amplified by sampling (central, not every client)."""
        return self.mechanism == "central" and self.sample_size < self.n_clients

    def unsupported(self) -> str | None:
        """Why this accountant cannot account this run, or None."""
        if self.accountant == "pld" and self.mechanism == "ftrl":
            return ("privacy.accountant = 'pld': dp_accounting accounts DP-FTRL's tree aggregation in its RDP "
                    "accountant only; use accountant = 'rdp'")
        if self.accountant == "pld" and self.sampled:
            return ("privacy.accountant = 'pld': dp_accounting's PLD accountant has no fixed-size sampling without "
                    "replacement (fedloom's sampler); use accountant = 'rdp', or sample every client "
                    "(sampling.clients_per_round = data.n_clients)")
        return None

    def event(self, noise_multiplier: float, rounds: int) -> DpEvent:
        """The mechanism of ``rounds`` rounds; ``noise_multiplier / 2`` because replacing a client moves the
        clipped sum by up to twice the clip."""
        if self.mechanism == "ftrl":
            return self._tree_event(noise_multiplier, rounds)
        gaussian = GaussianDpEvent(noise_multiplier / 2)
        one_round = (dp_accounting.SampledWithoutReplacementDpEvent(self.n_clients, self.sample_size, gaussian)
                     if self.sampled else gaussian)
        return SelfComposedDpEvent(one_round, rounds)

    @property
    def tree_rounds(self) -> int:
        """DP-FTRL's epoch: the rounds each client takes part in at most once, one noise tree each."""
        return self.n_clients // self.sample_size

    def _tree_event(self, noise_multiplier: float, rounds: int) -> DpEvent:
        """Full epochs, each a tree of ``tree_rounds`` leaves, then the epoch under way."""
        epochs, rest = divmod(rounds, self.tree_rounds)
        tree = lambda steps: SingleEpochTreeAggregationDpEvent(noise_multiplier / 2, steps)  # noqa: E731
        trees = [SelfComposedDpEvent(tree(self.tree_rounds), epochs)] if epochs else []
        return ComposedDpEvent(trees + ([tree(rest)] if rest else []))

    def new_accountant(self) -> dp_accounting.PrivacyAccountant:
        """A fresh dp_accounting accountant for the run's mechanism: RDP, or PLD when ``accountant = "pld"``, with
        the
        neighbouring relation the mechanism's sensitivity is stated for."""
        if self.mechanism == "ftrl":  # the library's tree aggregation event: sensitivity in the noise multiplier
            return RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)
        if self.accountant == "pld":
            # an unsampled Gaussian: add/remove with the sensitivity in the noise multiplier is the same pair of
            # distributions (the library's PLD REPLACE_ONE would double the sensitivity a second time)
            return PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
        return RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)

    def epsilon(self, noise_multiplier: float, rounds: int) -> float:
        """The run's epsilon at its delta after ``rounds`` rounds with ``noise_multiplier``."""
        return _epsilon(self, noise_multiplier, rounds)

    def calibrate(self, target_epsilon: float, rounds: int) -> float:
        """The smallest noise multiplier whose ``rounds`` rounds meet ``target_epsilon`` at ``delta``;
        ValueError when none in NOISE_MULTIPLIER_RANGE does."""
        return _calibrate(self, target_epsilon, rounds)


@functools.lru_cache(maxsize=4096)
def _epsilon(accounting: Accounting, noise_multiplier: float, rounds: int) -> float:
    if rounds == 0:
        return 0.0
    accountant = accounting.new_accountant()
    return float(accountant.compose(accounting.event(noise_multiplier, rounds)).get_epsilon(accounting.delta))


@functools.lru_cache(maxsize=64)
def _calibrate(accounting: Accounting, target_epsilon: float, rounds: int) -> float:
    low, high = NOISE_MULTIPLIER_RANGE
    least = accounting.epsilon(high, rounds)
    if least > target_epsilon:
        raise ValueError(f"no noise multiplier up to {high:g} reaches epsilon {target_epsilon:g} at delta "
                         f"{accounting.delta:g} in {rounds} rounds (the least is {least:.3g})")
    if accounting.epsilon(low, rounds) <= target_epsilon:
        return low
    z = float(dp_accounting.calibrate_dp_mechanism(
        accounting.new_accountant, lambda z: accounting.event(z, rounds), target_epsilon, accounting.delta,
        dp_accounting.ExplicitBracketInterval(low, high), tol=CALIBRATION_TOL))
    # the root is found within the tolerance, on either side: step to the side that meets the target
    return z if accounting.epsilon(z, rounds) <= target_epsilon else z + CALIBRATION_TOL


def sum_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """Adaptive clipping's noise multiplier on the clipped sum, ``(z^-2 - (2 sigma_b)^-2)^-1/2``: replacing a
    client moves the sum by 2C (noise z_sum C) and the count of rows within the clip by 1 (noise sigma_b), the
    pair is one Gaussian of multiplier (4 / z_sum^2 + 1 / sigma_b^2)^-1/2 on the stacked release, and that
    equals the plain round's z / 2 exactly at this z_sum. ValueError when sigma_b <= z / 2 (no z_sum does)."""
    if 2 * count_std <= noise_multiplier:
        raise ValueError(f"count noise {count_std:g} must exceed half the noise multiplier ({noise_multiplier:g} / 2): "
                         "the count alone would spend the whole budget")
    return (noise_multiplier ** -2 - (2 * count_std) ** -2) ** -0.5
