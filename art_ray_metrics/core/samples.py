"""Per-rollout values averaged across a step, as ART averages rewards and trajectory metrics.

``add_metric`` sums (four rollouts logging 0.5 give 2.0); ``add_sample`` records one value per
rollout and the row gets the step's average. Producers cannot ship a mean (means of batches do
not merge), so each key travels as :class:`SampleStats`: the count, the exact sum, the exact sum
of squares, the minimum and the maximum. These merge by addition, in any order and any batching,
and the row is computed once, at the barrier::

    reward/judge_score           mean                       (ART's key for an average)
    reward/judge_score_std_dev   population standard deviation (numpy.std, statistics.pstdev)
    reward/judge_score_count     number of values
    reward/judge_score_min       smallest value
    reward/judge_score_max       largest value

Exactness. A value enters as a float (through its shortest ``repr``, as every leaf), so it has
at most 17 digits and a decimal exponent within the float range. Sums and sums of squares are
kept in a context that never rounds (and raises if it ever would), so merging is exact and
independent of order; the sizes stay bounded because the exponents are. The mean and the
standard deviation are computed from the exact fractions and rounded once to the nearest float
(the standard deviation is the correctly rounded square root of the exact variance).

>>> s = SampleStats.of([0.5, 0.5, 0.25]).merge(SampleStats.of([1.0]))
>>> sorted(sample_row("reward/x", s).items())  # doctest: +NORMALIZE_WHITESPACE
[('reward/x', 0.5625), ('reward/x_count', 4.0), ('reward/x_max', 1.0), ('reward/x_min', 0.25),
 ('reward/x_std_dev', 0.2724311839712921)]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import (
    MAX_EMAX,
    MAX_PREC,
    MIN_EMIN,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    Rounded,
    Underflow,
)
from fractions import Fraction
from math import isqrt
from typing import Any, Final

from art_ray_metrics.core.keys import is_builder_managed
from art_ray_metrics.errors import InvalidMetricError

__all__ = ["SAMPLE_SUFFIXES", "SampleStats", "check_sample_key", "sample_row", "sqrt_fraction"]

SAMPLE_SUFFIXES: Final = ("_std_dev", "_count", "_min", "_max")
"""Row keys derived from a sampled key ``K``: ``K`` itself holds the mean."""

_NEVER_ROUND: Final = Context(
    prec=MAX_PREC,
    Emax=MAX_EMAX,
    Emin=MIN_EMIN,
    traps=[InvalidOperation, DivisionByZero, Overflow, Underflow, Inexact, Rounded],
)
"""Additions and multiplications only; any rounding would raise instead of losing a digit."""

_MAX_DIGITS: Final = 4000
"""Bound on the digits of a sum read from the wire (honest sums of floats stay below ~1400)."""
_MAX_ADJUSTED: Final = 1000
"""Bound on the decimal exponent of a sum read from the wire (float squares stay within ±700)."""


def check_sample_key(key: str) -> str:
    """Refuse keys that the builder sums (costs, step times, step counts): they are not averaged.

    Raises:
        InvalidMetricError: ``key`` is builder-managed.
    """
    if is_builder_managed(key):
        raise InvalidMetricError(
            f"Cannot average {key!r}: costs/, time/step_, data/step_ and throughput/step_ keys "
            "are summed per step; record them with add_metric/add_cost"
        )
    return key


@dataclass(frozen=True, slots=True)
class SampleStats:
    """Exact summary of the values recorded under one key: merges by addition."""

    count: int
    total: Decimal
    total_sq: Decimal
    low: Decimal
    high: Decimal

    @classmethod
    def of(cls, values: Iterable[float | int]) -> SampleStats:
        """Summarise finite values (converted through ``float``; at least one).

        Raises:
            ValueError: no values.
        """
        decimals = [Decimal(repr(float(v))) for v in values]
        if not decimals:
            raise ValueError("SampleStats.of needs at least one value")
        add, mul = _NEVER_ROUND.add, _NEVER_ROUND.multiply
        total = Decimal(0)
        total_sq = Decimal(0)
        for d in decimals:
            total = add(total, d)
            total_sq = add(total_sq, mul(d, d))
        return cls(len(decimals), total, total_sq, min(decimals), max(decimals))

    def merge(self, other: SampleStats) -> SampleStats:
        """The summary of both sets of values."""
        add = _NEVER_ROUND.add
        return SampleStats(
            self.count + other.count,
            add(self.total, other.total),
            add(self.total_sq, other.total_sq),
            min(self.low, other.low),
            max(self.high, other.high),
        )

    def mean(self) -> float:
        """The mean, rounded once to the nearest float."""
        return float(Fraction(self.total) / self.count)

    def std_dev(self) -> float:
        """The population standard deviation (ddof=0), correctly rounded."""
        n = self.count
        total = Fraction(self.total)
        variance = (Fraction(self.total_sq) * n - total * total) / (n * n)
        if variance <= 0:
            return 0.0
        return sqrt_fraction(variance.numerator, variance.denominator)

    def to_wire(self) -> list[Any]:
        """``[count, total, total_sq, min, max]`` with decimal strings."""
        return [self.count, str(self.total), str(self.total_sq), str(self.low), str(self.high)]

    @classmethod
    def from_wire(cls, key: str, raw: object) -> SampleStats:
        """Parse and check :meth:`to_wire` output.

        Raises:
            InvalidMetricError: malformed, out of bounds or inconsistent (naming ``key``).
        """
        if not isinstance(raw, list | tuple) or len(raw) != 5:
            raise InvalidMetricError(
                f"Expected [count, sum, sum_sq, min, max] for {key!r}: {raw!r}"
            )
        count = raw[0]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidMetricError(f"Expected a sample count >= 1 for {key!r} but got {count!r}")
        numbers = []
        for item in raw[1:]:
            if not isinstance(item, str):
                raise InvalidMetricError(f"Expected decimal strings for {key!r} but got {item!r}")
            try:
                d = Decimal(item)
            except InvalidOperation:
                raise InvalidMetricError(
                    f"Expected a decimal for {key!r} but got {item!r}"
                ) from None
            digits = d.as_tuple().digits
            if (
                not d.is_finite()
                or len(digits) > _MAX_DIGITS
                or (d and abs(d.adjusted()) > _MAX_ADJUSTED)
            ):
                raise InvalidMetricError(f"Sample sum out of bounds for {key!r}: {item[:40]!r}")
            numbers.append(d)
        total, total_sq, low, high = numbers
        for bound in (low, high):
            f = float(bound)
            if f - f != 0 or Decimal(repr(f)) != bound:
                raise InvalidMetricError(f"Expected a float min/max for {key!r} but got {bound}")
        n = Fraction(count)
        if (
            low > high
            or total_sq < 0
            or not n * Fraction(low) <= Fraction(total) <= n * Fraction(high)
            or Fraction(total_sq) * n < Fraction(total) ** 2
        ):
            raise InvalidMetricError(f"Inconsistent sample summary for {key!r}: {raw!r}")
        return cls(count, total, total_sq, low, high)


def sample_row(key: str, stats: SampleStats) -> dict[str, float]:
    """The row entries of one sampled key: mean, standard deviation, count, min and max."""
    return {
        key: stats.mean(),
        f"{key}_std_dev": stats.std_dev(),
        f"{key}_count": float(stats.count),
        f"{key}_min": float(stats.low),
        f"{key}_max": float(stats.high),
    }


def sqrt_fraction(numerator: int, denominator: int) -> float:
    """The square root of ``numerator / denominator`` rounded once to the nearest float.

    An integer square root with at least 56 bits plus a sticky bit for a nonzero remainder
    holds enough information to round like the exact root; ``float(Fraction)`` rounds
    correctly.

    >>> sqrt_fraction(2, 1) == 2 ** 0.5, sqrt_fraction(9, 4)
    (True, 1.5)
    """
    if numerator < 0 or denominator <= 0:
        raise ValueError(f"Expected a non-negative fraction but got {numerator}/{denominator}")
    if numerator == 0:
        return 0.0
    magnitude = numerator.bit_length() - denominator.bit_length()
    shift = max(0, (116 - magnitude) // 2 + 1)  # the root gets >= 57 bits before the point
    quotient, remainder = divmod(numerator << (2 * shift), denominator)
    root = isqrt(quotient)
    if remainder == 0 and root * root == quotient:
        return float(Fraction(root, 1 << shift))
    return float(Fraction(2 * root + 1, 1 << (shift + 1)))  # strictly between root and root+1
