"""The run budget's terms: validated amounts and limits, a producer's account, a grant.

Pure value types and checks that :class:`~art_ray_metrics.core.budget.BudgetLedger` (the
state machine, see :mod:`art_ray_metrics.core.budget`) is built from. Every amount is an exact
:class:`~decimal.Decimal`; a float enters through its shortest ``repr``.

* :func:`check_amount`, :func:`check_limit`, :func:`check_soft` and :func:`check_planned`
  validate what a configuration or a producer passes (:class:`~art_ray_metrics.errors.ConfigError`
  otherwise).
* :class:`LeaseAccount` is the aggregator's book of one producer incarnation (granted,
  returned, shipped), kept in the checkpoint as a list (:meth:`LeaseAccount.to_wire`).
* :class:`Grant` is the aggregator's answer to a request for budget.

>>> account = LeaseAccount(granted=check_amount(0.40, "want"))
>>> account.shipped = check_amount("0.07", "cost")
>>> account.outstanding, account.to_wire()
(Decimal('0.33'), ['0.4', '0', '0.07', False])
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from art_ray_metrics.core.rollup import EXACT, ZERO
from art_ray_metrics.errors import ConfigError

__all__ = [
    "Grant",
    "LeaseAccount",
    "check_amount",
    "check_limit",
    "check_planned",
    "check_soft",
]

_sub = EXACT.subtract


def check_amount(value: object, what: str) -> Decimal:
    """A non-negative finite amount as Decimal (floats through their shortest repr).

    ``what`` names the amount in the error.

    >>> check_amount(0.1, "want"), check_amount("2", "need")
    (Decimal('0.1'), Decimal('2'))

    Raises:
        ConfigError: Not a number (a bool is not one), negative, or not finite.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise ConfigError(f"Expected a non-negative amount for {what} but got {value!r}")
    try:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except ArithmeticError:
        raise ConfigError(f"Expected a non-negative amount for {what} but got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ConfigError(f"Expected a non-negative finite amount for {what} but got {value!r}")
    return amount


def check_limit(limit: object) -> Decimal | None:
    """Validate a hard limit in dollars (``None``: no limit).

    >>> check_limit(12.5), check_limit(None)
    (Decimal('12.5'), None)
    """
    return None if limit is None else check_amount(limit, "budget_usd")


def check_soft(soft: object) -> Decimal:
    """Validate the soft limit, a fraction of the hard limit in ``(0, 1]``.

    >>> check_soft(0.8)
    Decimal('0.8')
    """
    fraction = check_amount(soft, "budget_soft")
    if not 0 < fraction <= 1:
        raise ConfigError(f"Expected budget_soft in (0, 1] but got {soft!r}")
    return fraction


def check_planned(planned: object) -> int | None:
    """Validate the run's planned number of train steps (``None``: no plan).

    >>> check_planned(100), check_planned(None)
    (100, None)

    Raises:
        ConfigError: Not a positive int (a bool is not one).
    """
    if planned is None:
        return None
    if isinstance(planned, bool) or not isinstance(planned, int) or planned < 1:
        raise ConfigError(f"Expected a positive planned step count but got {planned!r}")
    return planned


@dataclass(slots=True)
class LeaseAccount:
    """The aggregator's book of one producer incarnation.

    Attributes:
        granted: Budget granted to it, in total (raised when the producer holds more than
            this book says, after a restart lost a grant:
            :meth:`~art_ray_metrics.core.budget.BudgetLedger.grant`).
        returned: Unused lease it gave back, in total.
        shipped: Real cost of its admitted calls carried by batches the aggregator applied.
        last_seen: When it last sent a batch or asked for budget (the caller's clock).
        gone: Taken for gone (dead, or silent past the timeout).
    """

    granted: Decimal = ZERO
    returned: Decimal = ZERO
    shipped: Decimal = ZERO
    last_seen: float = 0.0
    gone: bool = False

    @property
    def balance(self) -> Decimal:
        """``granted - returned - shipped``: negative when calls cost more than reserved, or
        when a restart lost grants that batches then shipped (until the producer asks again)."""
        return _sub(_sub(self.granted, self.returned), self.shipped)

    @property
    def outstanding(self) -> Decimal:
        """What it may still spend, or may have spent that no row counts (never negative)."""
        left = self.balance
        return left if left > 0 else ZERO

    def to_wire(self) -> list[Any]:
        return [str(self.granted), str(self.returned), str(self.shipped), self.gone]

    @classmethod
    def from_wire(cls, raw: list[Any], now: float) -> LeaseAccount:
        granted, returned, shipped, gone = raw
        return cls(Decimal(granted), Decimal(returned), Decimal(shipped), now, bool(gone))


@dataclass(frozen=True, slots=True)
class Grant:
    """The aggregator's answer to a request for budget.

    Attributes:
        amount: Budget granted now (0 when refused).
        exhausted: The request's ``need`` did not fit: the producer must refuse the call.
        limit: The hard limit (``None``: no limit).
        spent: The run's spend so far.
        committed: Spend plus every outstanding lease, after this grant.
        seq: The grant's number in the run (``0`` when nothing was granted): the aggregator
            logs a grant under it before answering
            (:meth:`~art_ray_metrics.core.budget.BudgetLedger.replay_grant`).
    """

    amount: Decimal
    exhausted: bool
    limit: Decimal | None
    spent: Decimal
    committed: Decimal
    seq: int = 0
