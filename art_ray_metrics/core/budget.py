"""The run budget: a hard limit enforced before each paid call, through leases.

Pure: no I/O, threads, locks, Ray or W&B. The budget has two halves:

* :class:`BudgetLedger` (this module) is the aggregator's book. It knows every dollar the run
  *spent* (cost leaves ingested, and costs the trainer passes at a barrier), and, per producer
  incarnation, the budget it *granted* to it, what that incarnation *returned*, and the real
  cost of its admitted calls it *shipped* in batches. What an incarnation may still spend, or
  may have spent that no row counts, is its **outstanding** lease,
  ``granted - returned - shipped``.
* :class:`~art_ray_metrics.core.lease.LocalLease` is a producer's purse: admission reserves a
  call's upper-bound estimate from the local balance (no round trip), settling replaces it by
  the real cost, and a batch carries the real cost of admitted calls. When the balance runs low
  the producer asks the aggregator for more (asynchronously).

The budget never goes past its hard limit by granting: a grant is at most
``limit - committed`` where ``committed = spent + sum(outstanding leases)``, so as long as every
paid call is admitted and costs at most its reservation, the run's spend stays within the limit.
Two things can go beyond it, and the bound is their sum::

    overshoot <= sum(max(0, real - reservation) over admitted calls)
                 + min(cost recorded without admission after the budget was fully leased,
                       sum of leases outstanding at that time)

(lowering the limit below what is committed is the second term too: outstanding leases stay
spendable). With upper-bound estimates and every paid call admitted, the overshoot is zero.

**Spend lost to crashes.** An incarnation that is gone (declared dead, or silent past the
ledger's timeout while holding an outstanding lease) may have paid for calls whose cost no row
counts: at most its outstanding lease. That is the *unreconciled bound*
(``costs/unreconciled``, cumulative twin ``costs/cum/unreconciled``). A batch of a gone
incarnation that arrives later (a late reconciliation) is an ordinary late leaf: its admitted
cost leaves the bound. A gone incarnation that asks for a grant again was only silent: its lease
is live again. The ledger stays committed to every gone lease, so a wrong guess never lets the
budget be exceeded.

Every amount is an exact :class:`~decimal.Decimal`; the ledger's state is a msgpack-friendly
dict (:meth:`BudgetLedger.to_wire`), kept in the aggregator's checkpoint. The terms it is built
from, the validation of amounts and limits, an incarnation's :class:`LeaseAccount` and the
:class:`Grant` it answers with, are in :mod:`~art_ray_metrics.core.budget_terms` (the public
ones are re-exported here).

>>> ledger = BudgetLedger(limit=Decimal("1.00"))
>>> ledger.grant("w", "i1", want=Decimal("0.40"), need=Decimal("0.10"), now=0.0).amount
Decimal('0.40')
>>> ledger.on_batch("w", "i1", cost=Decimal("0.07"), admitted=Decimal("0.07"), now=1.0)
>>> ledger.committed(), ledger.remaining()
(Decimal('0.40'), Decimal('0.93'))
>>> ledger.declare_gone("w", "i1"), ledger.unreconciled()
(True, Decimal('0.33'))
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final

from art_ray_metrics.core.budget_terms import (
    Grant,
    LeaseAccount,
    check_amount,
    check_limit,
    check_planned,
    check_soft,
)
from art_ray_metrics.core.rollup import EXACT, ZERO
from art_ray_metrics.errors import ConfigError

__all__ = [
    "BUDGET_REMAINING_KEY",
    "DEFAULT_SILENCE_TIMEOUT_S",
    "PROJECTED_TOTAL_KEY",
    "UNRECONCILED_CUM_KEY",
    "UNRECONCILED_KEY",
    "BudgetLedger",
    # re-exported from core.budget_terms, where they live
    "Grant",
    "LeaseAccount",
    "check_limit",
    "check_soft",
]

BUDGET_REMAINING_KEY: Final = "costs/budget_remaining"
PROJECTED_TOTAL_KEY: Final = "costs/projected_total"
UNRECONCILED_KEY: Final = "costs/unreconciled"
UNRECONCILED_CUM_KEY: Final = "costs/cum/unreconciled"
DEFAULT_SILENCE_TIMEOUT_S: Final = 300.0
"""An incarnation silent this long while holding an outstanding lease is taken for gone."""

_add = EXACT.add
_sub = EXACT.subtract
_mul = EXACT.multiply
_div = EXACT.divide


class BudgetLedger:
    """The aggregator's budget: spend, leases per producer incarnation, the soft-limit flag.

    Not thread-safe (the aggregator calls it from its event loop). ``now`` arguments are the
    caller's monotonic clock in seconds; the ledger only compares them with each other.
    """

    __slots__ = (
        "_reported_unreconciled",
        "accounts",
        "closes",
        "grant_seq",
        "limit",
        "live",
        "planned_steps",
        "silence_timeout_s",
        "soft",
        "soft_crossed",
        "spent",
    )

    def __init__(
        self,
        *,
        limit: Decimal | float | int | None = None,
        soft: Decimal | float = Decimal("0.8"),
        silence_timeout_s: float = DEFAULT_SILENCE_TIMEOUT_S,
        planned_steps: int | None = None,
    ) -> None:
        """Create an empty ledger.

        Args:
            limit: Hard limit in dollars; ``None`` grants whatever is asked (leases still
                bound what a crashed producer may have spent).
            soft: Fraction of ``limit`` whose crossing is reported once (:meth:`cross_soft`).
            silence_timeout_s: Silence after which an incarnation holding a lease is gone.
            planned_steps: The run's planned number of train steps, for the projection.

        Raises:
            ConfigError: A negative or non-finite limit, ``soft`` outside ``(0, 1]``, a
                non-positive timeout or planned step count.
        """
        self.limit = check_limit(limit)
        self.soft = check_soft(soft)
        if not silence_timeout_s > 0:
            raise ConfigError(f"Expected a positive silence timeout but got {silence_timeout_s!r}")
        self.silence_timeout_s = float(silence_timeout_s)
        self.planned_steps = check_planned(planned_steps)
        self.spent = ZERO
        self.accounts: dict[tuple[str, str], LeaseAccount] = {}
        self.soft_crossed = False
        self.closes = 0
        """Train rows closed (the projection's denominator)."""
        self.grant_seq = 0
        """Grants decided in the run (each numbered, so a replayed log applies each once)."""
        self._reported_unreconciled = ZERO
        self.live = False
        """The limits were set on the live run (:meth:`set_limit` with ``live``): a restarted
        aggregator keeps them instead of its configuration's."""

    # -- the book ----------------------------------------------------------------------------

    def outstanding(self) -> Decimal:
        """The sum of every incarnation's outstanding lease (gone ones included)."""
        total = ZERO
        for account in self.accounts.values():
            total = _add(total, account.outstanding)
        return total

    def committed(self) -> Decimal:
        """Spend plus every outstanding lease: what the run may have spent at most so far."""
        return _add(self.spent, self.outstanding())

    def unreconciled(self) -> Decimal:
        """Upper bound of what gone incarnations may have spent that no row counts."""
        total = ZERO
        for account in self.accounts.values():
            if account.gone:
                total = _add(total, account.outstanding)
        return total

    def remaining(self) -> Decimal | None:
        """The limit minus the spend and the unreconciled bound (``None`` without a limit);
        negative once the run went past its limit."""
        if self.limit is None:
            return None
        return _sub(_sub(self.limit, self.spent), self.unreconciled())

    def headroom(self) -> Decimal | None:
        """What can still be granted (``None`` without a limit): limit minus committed."""
        if self.limit is None:
            return None
        left = _sub(self.limit, self.committed())
        return left if left > 0 else ZERO

    # -- producers -----------------------------------------------------------------------------

    def _account(self, producer: str, incarnation: str, now: float) -> LeaseAccount:
        key = (producer, incarnation)
        account = self.accounts.get(key)
        if account is None:
            account = self.accounts[key] = LeaseAccount(last_seen=now)
        account.last_seen = max(account.last_seen, now)
        return account

    def grant(
        self,
        producer: str,
        incarnation: str,
        *,
        want: Decimal,
        need: Decimal,
        held: Decimal = ZERO,
        now: float,
    ) -> Grant:
        """Grant up to ``want`` if at least ``need`` fits under the limit, else nothing.

        Args:
            want: The lease the producer would like (several calls' worth); positive.
            need: The least that admits the call it is waiting on (its estimate minus its
                balance); ``0`` for a top-up ahead of need.
            held: What the producer holds of its leases (:attr:`LocalLease.held`). A
                restarted aggregator whose checkpoint predates a grant has a smaller
                outstanding lease for it and takes the producer's figure (only ever upward).
            now: The caller's clock.

        Raises:
            ConfigError: A negative or non-finite amount, ``want`` zero, or ``need > want``.
        """
        want = check_amount(want, "want")
        need = check_amount(need, "need")
        if need > want or want == 0:
            raise ConfigError(f"Expected 0 <= need <= want, want > 0; got {need=}, {want=}")
        account = self._account(producer, incarnation, now)
        account.gone = False  # it asks: it is alive (a silent one's lease is live again)
        self._heal(account, held)
        room = self.headroom()
        if room is None:
            amount = want
        elif room >= need and room > 0:
            amount = min(want, room)
        else:
            amount = ZERO
        account.granted = _add(account.granted, amount)
        seq = 0
        if amount > 0:
            self.grant_seq += 1
            seq = self.grant_seq
        exhausted = amount < need or amount == 0
        return Grant(amount, exhausted, self.limit, self.spent, self.committed(), seq)

    def replay_grant(
        self, producer: str, incarnation: str, amount: Decimal, now: float, seq: int = 0
    ) -> bool:
        """Apply a grant as it was decided (a replayed write-ahead log: the aggregator logs
        each grant before it answers, so a restart never forgets budget it handed out). A
        negative ``amount`` is a give-back (:meth:`give_back`), logged the same way so a
        restart does not count returned budget as still held.

        A numbered entry (``seq``) the ledger already holds (``seq <= grant_seq``: the
        checkpoint it was restored from counts it) is skipped. Returns whether it applied."""
        if seq:
            if seq <= self.grant_seq:
                return False
            self.grant_seq = seq
        if isinstance(amount, Decimal) and amount.is_finite() and amount < 0:
            self._take_back(producer, incarnation, -amount, now)
            return True
        account = self._account(producer, incarnation, now)
        account.gone = False
        account.granted = _add(account.granted, check_amount(amount, "amount"))
        return True

    @staticmethod
    def _heal(account: LeaseAccount, held: Decimal) -> None:
        held = check_amount(held, "held")
        missing = _sub(held, account.balance)
        if missing > 0:
            account.granted = _add(account.granted, missing)

    def give_back(
        self,
        producer: str,
        incarnation: str,
        amount: Decimal,
        *,
        now: float,
    ) -> tuple[Decimal, int]:
        """An incarnation returns unused lease (idle, or closing). Capped at its outstanding
        lease; an account left holding nothing is forgotten.

        Returns:
            ``(returned, seq)``: the amount taken back, and its number in the run's sequence
            of grants (``0`` when nothing was returned). The aggregator logs it as a grant of
            ``-returned`` (:meth:`replay_grant`)."""
        returned = self._take_back(producer, incarnation, check_amount(amount, "amount"), now)
        if not returned:
            return ZERO, 0
        self.grant_seq += 1
        return returned, self.grant_seq

    def _take_back(self, producer: str, incarnation: str, amount: Decimal, now: float) -> Decimal:
        account = self._account(producer, incarnation, now)
        amount = min(amount, account.outstanding)
        account.returned = _add(account.returned, amount)
        if account.outstanding == 0 and not account.gone:
            del self.accounts[(producer, incarnation)]
        return amount

    def on_batch(
        self,
        producer: str,
        incarnation: str,
        *,
        cost: Decimal,
        admitted: Decimal,
        now: float,
    ) -> None:
        """A batch applied: ``cost`` dollars of cost leaves, of which ``admitted`` came from
        calls admitted under this incarnation's lease. A batch of a gone incarnation is a late
        reconciliation: its admitted cost leaves the unreconciled bound (the account stays
        gone)."""
        self.spent = _add(self.spent, cost)
        if admitted or (producer, incarnation) in self.accounts:
            account = self._account(producer, incarnation, now)
            account.shipped = _add(account.shipped, admitted)

    def on_trainer_cost(self, cost: Decimal) -> None:
        """Costs the trainer passed at a barrier (or recorded without a producer)."""
        self.spent = _add(self.spent, cost)

    def declare_gone(self, producer: str, incarnation: str) -> bool:
        """Take an incarnation for gone (its process died). Returns whether it holds an
        outstanding lease (that is, whether the unreconciled bound grew)."""
        account = self.accounts.get((producer, incarnation))
        if account is None or account.outstanding == 0:
            return False
        account.gone = True
        return True

    def sweep(self, now: float) -> list[tuple[str, str]]:
        """Take every incarnation silent past the timeout while holding a lease for gone;
        forget settled ones (nothing outstanding). Returns the newly gone."""
        newly: list[tuple[str, str]] = []
        settled: list[tuple[str, str]] = []
        for key, account in self.accounts.items():
            if account.outstanding == 0:
                settled.append(key)
            elif not account.gone and now - account.last_seen > self.silence_timeout_s:
                account.gone = True
                newly.append(key)
        for key in settled:
            del self.accounts[key]
        return newly

    # -- limits ----------------------------------------------------------------------------

    def set_limit(
        self,
        limit: Decimal | float | int | None,
        soft: Decimal | float | None = None,
        *,
        live: bool = False,
    ) -> None:
        """Change the limits of a live run. A limit raised back above the soft threshold
        re-arms the soft alert; lowering it below what is committed stops grants (leases
        already held stay spendable: the overshoot bound's second term)."""
        self.limit = check_limit(limit)
        if soft is not None:
            self.soft = check_soft(soft)
        self.live = self.live or live
        threshold = self.soft_threshold()
        if threshold is None or self.spent < threshold:
            self.soft_crossed = False

    def soft_threshold(self) -> Decimal | None:
        """``soft × limit`` in dollars (``None`` without a limit)."""
        return None if self.limit is None else _mul(self.soft, self.limit)

    def cross_soft(self) -> bool:
        """True exactly once when the spend (with the unreconciled bound) reaches the soft
        threshold; the flag is in the checkpoint, so a restart does not alert again."""
        threshold = self.soft_threshold()
        if self.soft_crossed or threshold is None:
            return False
        if _add(self.spent, self.unreconciled()) >= threshold:
            self.soft_crossed = True
            return True
        return False

    # -- rows --------------------------------------------------------------------------------

    def row(self, *, train_close: bool) -> dict[str, Decimal]:
        """The budget keys of the row being closed (call once per row, in close order).

        ``costs/unreconciled`` is the change of the bound since the previous row (newly gone
        leases, minus late reconciliations: negative when only the latter happened) and
        ``costs/cum/unreconciled`` the bound now, so the twin adds up the rows as every
        cumulative twin does. Both appear once a bound ever existed. ``costs/budget_remaining``
        needs a limit; ``costs/projected_total`` a planned step count and a train row.
        """
        if train_close:
            self.closes += 1
        out: dict[str, Decimal] = {}
        bound = self.unreconciled()
        if bound or self._reported_unreconciled:
            out[UNRECONCILED_KEY] = _sub(bound, self._reported_unreconciled)
            out[UNRECONCILED_CUM_KEY] = bound
            self._reported_unreconciled = bound
        remaining = self.remaining()
        if remaining is not None:
            out[BUDGET_REMAINING_KEY] = remaining
        projected = self.projection()
        if projected is not None:
            out[PROJECTED_TOTAL_KEY] = projected
        return out

    def projection(self) -> Decimal | None:
        """The run's projected spend: spend per closed train row times the planned steps (the
        spend so far once past them); ``None`` before the first train row or without a plan."""
        if self.planned_steps is None or self.closes == 0:
            return None
        if self.closes >= self.planned_steps:
            return self.spent
        return _div(_mul(self.spent, Decimal(self.planned_steps)), Decimal(self.closes))

    # -- persistence -------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack-able form (amounts as decimal strings)."""
        return {
            "format": 1,
            "limit": None if self.limit is None else str(self.limit),
            "soft": str(self.soft),
            "timeout": self.silence_timeout_s,
            "planned": self.planned_steps,
            "spent": str(self.spent),
            "soft_crossed": self.soft_crossed,
            "closes": self.closes,
            "reported": str(self._reported_unreconciled),
            "live": self.live,
            "grants": self.grant_seq,
            "accounts": [[p, i, a.to_wire()] for (p, i), a in sorted(self.accounts.items())],
        }

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any], *, now: float) -> BudgetLedger:
        """Inverse of :meth:`to_wire`. Every account's silence restarts at ``now`` (the
        restarted aggregator has not heard from anyone yet)."""
        if raw.get("format") != 1:
            raise ConfigError(f"Unknown budget format {raw.get('format')!r}")
        limit = raw["limit"]
        ledger = cls(
            limit=None if limit is None else Decimal(limit),
            soft=Decimal(raw["soft"]),
            silence_timeout_s=float(raw["timeout"]),
            planned_steps=raw["planned"],
        )
        ledger.spent = Decimal(raw["spent"])
        ledger.soft_crossed = bool(raw["soft_crossed"])
        ledger.closes = int(raw["closes"])
        ledger._reported_unreconciled = Decimal(raw["reported"])
        ledger.live = bool(raw.get("live", False))
        ledger.grant_seq = int(raw.get("grants", 0))
        ledger.accounts = {
            (str(p), str(i)): LeaseAccount.from_wire(a, now) for p, i, a in raw["accounts"]
        }
        return ledger

    def configure(
        self,
        *,
        limit: Decimal | float | int | None,
        soft: Decimal | float,
        silence_timeout_s: float,
        planned_steps: int | None,
    ) -> None:
        """Apply the configuration of a (re)started aggregator to a restored ledger: the
        spend and the leases are kept; the limits are the configuration's unless they were
        set on the live run (then the live ones stay)."""
        if not self.live:
            self.set_limit(limit, soft)
        if not silence_timeout_s > 0:
            raise ConfigError(f"Expected a positive silence timeout but got {silence_timeout_s!r}")
        self.silence_timeout_s = float(silence_timeout_s)
        self.planned_steps = check_planned(planned_steps)
