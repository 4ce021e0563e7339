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

Epsilon is a pure function of the rounds played, so a resumed run needs no
accountant state. Supported: ``rdp`` for every case; ``pld`` only without
sampling (central with every client each round, or local): the library's PLD
accountant has no sampling without replacement.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import dp_accounting
from dp_accounting import DpEvent, GaussianDpEvent, NeighboringRelation, SelfComposedDpEvent
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

Mechanism = Literal["central", "local"]
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
        if self.accountant == "pld" and self.sampled:
            return ("privacy.accountant = 'pld': dp_accounting's PLD accountant has no fixed-size sampling without "
                    "replacement (fedloom's sampler); use accountant = 'rdp', or sample every client "
                    "(sampling.clients_per_round = data.n_clients)")
        return None

    def event(self, noise_multiplier: float, rounds: int) -> DpEvent:
        """The mechanism of ``rounds`` rounds; ``noise_multiplier / 2`` because replacing a client moves the
        clipped sum by up to twice the clip."""
        gaussian = GaussianDpEvent(noise_multiplier / 2)
        one_round = (dp_accounting.SampledWithoutReplacementDpEvent(self.n_clients, self.sample_size, gaussian)
                     if self.sampled else gaussian)
        return SelfComposedDpEvent(one_round, rounds)

    def new_accountant(self) -> dp_accounting.PrivacyAccountant:
        if self.accountant == "pld":
            # an unsampled Gaussian: add/remove with the sensitivity in the noise multiplier is the same pair of
            # distributions (the library's PLD REPLACE_ONE would double the sensitivity a second time)
            return PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
        return RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)

    def epsilon(self, noise_multiplier: float, rounds: int) -> float:
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
