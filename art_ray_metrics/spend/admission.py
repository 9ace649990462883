"""Admission of paid calls under a run budget: a local lease, no round trip per call.

One :class:`Admission` per producer process (per incarnation) holds a
:class:`~art_ray_metrics.core.lease.LocalLease`. Before a paid call is sent, :meth:`Admission.
reserve` takes the call's upper-bound estimate (:mod:`art_ray_metrics.spend.estimate`) from the
lease: one lock and three ``Decimal`` operations, no I/O. After the call,
:meth:`Reservation.settle` replaces the reservation by the real cost. When the balance falls
below a few calls' worth, a top-up is requested *asynchronously* (the ``request`` callback
starts it and returns; the answer arrives through :meth:`Admission.on_grant`), so a busy
producer normally never waits. Only a call that finds the lease short waits for the answer
(at most ``wait_s``), and raises :class:`~art_ray_metrics.errors.BudgetExceededError` if the
aggregator refuses: the run's hard limit cannot cover it, and nothing is sent.

The aggregator side of the protocol is :class:`~art_ray_metrics.core.budget.BudgetLedger`;
:class:`LocalBudget` connects the two in one process (the in-process builder, tests).

A batch carries the real cost of the admitted calls it holds (:meth:`Admission.take_admitted`,
taken *before* the tape is drained: a settle records its cost leaf before it counts it, so the
admitted amount of a batch never precedes its leaves). An idle producer gives its balance back
(:meth:`Admission.give_back`) so an idle worker holds no lease and is never taken for a crashed
one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Final

from art_ray_metrics.core.budget import BudgetLedger
from art_ray_metrics.core.budget_terms import Grant
from art_ray_metrics.core.lease import LocalLease
from art_ray_metrics.core.rollup import ZERO
from art_ray_metrics.errors import AggregatorUnavailableError, BudgetExceededError, ConfigError
from art_ray_metrics.spend.estimate import DEFAULT_MAX_TOKENS

__all__ = ["DEFAULT_LEASE_CALLS", "Admission", "LocalBudget", "Request", "Reservation"]

DEFAULT_LEASE_CALLS: Final = 8
"""A lease holds this many of the largest recent estimates; a top-up is asked at half (with a
lease of one call, never ahead: a call short of budget asks, so a process holds at most about
two reservations, and the crash bound is tight within one)."""

_RETRY_S: Final = 0.2
"""Pause before asking again after a failed request."""

Request = Callable[[Decimal, Decimal, Decimal], None]
"""``request(want, need, held)``: start asking the aggregator for budget and return at once;
the answer goes to :meth:`Admission.on_grant` (or :meth:`Admission.on_failure`)."""


class Reservation:
    """One admitted call's reservation; settle it exactly once when the call ended."""

    __slots__ = ("_admission", "estimate", "settled")

    def __init__(self, admission: Admission, estimate: Decimal) -> None:
        self._admission = admission
        self.estimate = estimate
        self.settled = False

    def settle(self, real: Decimal | None) -> None:
        """The call ended: ``real`` is the cost recorded for it (``0`` if nothing was paid or
        the response was recorded before; ``None`` if it was paid but could not be priced).
        A second settle is ignored."""
        if self.settled:
            return
        self.settled = True
        admission = self._admission
        with admission._lock:  # the hot path: Admission's bookkeeping inline, one lock
            admission.lease.settle(self.estimate, real)
            admission._settles += 1
            if admission._waiting:  # a settle that returned budget may admit a waiting call
                admission._cond.notify_all()


class Admission:
    """A producer's admission control: a local lease, refilled asynchronously. Thread-safe."""

    def __init__(
        self,
        request: Request,
        *,
        lease_calls: int = DEFAULT_LEASE_CALLS,
        wait_s: float = 30.0,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create an empty admission (the first call waits for a grant).

        Args:
            request: Starts a request for budget (see :data:`Request`).
            lease_calls: Lease size in calls' worth of the largest estimate seen.
            wait_s: How long a call short of budget waits for an answer before it raises.
            default_max_tokens: Output tokens assumed for a request naming no ``max_tokens``.
            clock: Monotonic seconds (tests pass a fake one).
        """
        if lease_calls < 1:
            raise ConfigError(f"Expected lease_calls >= 1 but got {lease_calls!r}")
        self._request = request
        self.default_max_tokens = default_max_tokens
        self._lease_calls = lease_calls
        self._wait_s = wait_s
        self._clock = clock
        self.lease = LocalLease()
        self._lock = threading.Lock()  # the hot path takes the bare lock (no Python frames)
        self._cond = threading.Condition(self._lock)
        self._waiting = 0  # callers waiting on _cond (a settle notifies only when some wait)
        self._settles = 0
        self._asking = False
        self._answers = 0  # answers received; a waiter knows when its own request was answered
        self._refusal: Grant | None = None
        self._failure: BaseException | None = None
        self._largest = ZERO
        self._low = ZERO
        self._idle_mark = (-1, clock())  # (settles seen, since when) for give_back

    # -- the hot path ------------------------------------------------------------------------

    def reserve(self, estimate: Decimal) -> Reservation:
        """Reserve ``estimate`` dollars before a paid call.

        Raises:
            BudgetExceededError: The aggregator refused: the hard limit cannot cover it.
            AggregatorUnavailableError: No answer within ``wait_s``.
        """
        reservation = self.reserve_nowait(estimate)
        return reservation if reservation is not None else self._reserve_slow(estimate)

    async def areserve(self, estimate: Decimal) -> Reservation:
        """:meth:`reserve` for coroutines: the fast path inline, a wait in a thread."""
        reservation = self.reserve_nowait(estimate)
        if reservation is not None:
            return reservation
        return await asyncio.to_thread(self._reserve_slow, estimate)

    def reserve_nowait(self, estimate: Decimal) -> Reservation | None:
        """:meth:`reserve` from the lease alone: ``None`` if it is short (nothing reserved)."""
        with self._lock:
            if estimate > self._largest:
                self._largest = estimate
                self._low = estimate * (self._lease_calls // 2)  # 1 call: never ahead
            lease = self.lease
            if not lease.try_reserve(estimate):
                return None
            if lease.balance >= self._low or self._asking:
                return Reservation(self, estimate)
            self._asking = True
            top_up = (self._want(estimate), ZERO, lease.held)
        self._ask(*top_up)
        return Reservation(self, estimate)

    def _want(self, estimate: Decimal) -> Decimal:
        return max(estimate, self._largest) * self._lease_calls

    def _reserve_slow(self, estimate: Decimal) -> Reservation:
        deadline = self._clock() + self._wait_s
        with self._cond:
            while True:
                if self.lease.try_reserve(estimate):
                    return Reservation(self, estimate)
                if not self._asking:
                    need = estimate - self.lease.balance
                    ask = (self._want(estimate), need, self.lease.held)
                    self._asking = True
                    answered = self._answers
                    self._cond.release()
                    try:
                        self._ask(*ask)
                    finally:
                        self._cond.acquire()
                    while self._answers == answered:
                        left = deadline - self._clock()
                        if left <= 0:
                            raise AggregatorUnavailableError(
                                f"No budget answer within {self._wait_s:g} s; the paid call "
                                "was not sent"
                            )
                        self._wait(left)
                    if self.lease.try_reserve(estimate):
                        return Reservation(self, estimate)
                    refusal, failure = self._refusal, self._failure
                    if refusal is not None and refusal.exhausted:
                        raise BudgetExceededError(
                            refusal.limit, refusal.spent, estimate, refusal.committed
                        )
                    if failure is not None:
                        left = deadline - self._clock()
                        if left <= 0:
                            raise AggregatorUnavailableError(
                                f"Could not obtain budget within {self._wait_s:g} s: {failure}; "
                                "the paid call was not sent"
                            ) from failure
                        self._wait(min(_RETRY_S, left))  # back off before asking again
                    continue
                left = deadline - self._clock()
                if left <= 0:
                    raise AggregatorUnavailableError(
                        f"No budget answer within {self._wait_s:g} s; the paid call was not sent"
                    )
                self._wait(left)  # another caller's request is in flight

    def _wait(self, timeout: float) -> None:
        self._waiting += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._waiting -= 1

    def _ask(self, want: Decimal, need: Decimal, held: Decimal) -> None:
        try:
            self._request(want, need, held)
        except BaseException as exc:
            self.on_failure(exc)
            if not isinstance(exc, Exception):
                raise

    # -- answers -------------------------------------------------------------------------------

    def on_grant(self, grant: Grant) -> None:
        """The aggregator answered a request (called from any thread)."""
        with self._cond:
            self.lease.add_grant(grant.amount)
            self._refusal = grant
            self._failure = None
            self._asking = False
            self._answers += 1
            self._cond.notify_all()

    def on_failure(self, exc: BaseException) -> None:
        """A request failed (the aggregator is unreachable); waiting callers ask again."""
        with self._cond:
            self._failure = exc
            self._refusal = None
            self._asking = False
            self._answers += 1
            self._cond.notify_all()

    # -- settling and shipping -----------------------------------------------------------------

    def take_admitted(self) -> Decimal:
        """The admitted real cost for the next batch (call before draining the tape)."""
        with self._lock:
            return self.lease.take_admitted()

    def untake(self, amount: Decimal) -> None:
        """A batch that took ``amount`` was not built: the next one carries it."""
        if amount:
            with self._lock:
                self.lease.admitted += amount

    def give_back(self, idle_s: float) -> Decimal:
        """The balance to return if no call settled for ``idle_s`` (as seen by earlier calls
        of this method: call it periodically) and nothing is in flight or unshipped; zero
        otherwise. The caller sends it to the aggregator (:meth:`BudgetLedger.give_back`)."""
        with self._lock:
            now = self._clock()
            seen, since = self._idle_mark
            if seen != self._settles:
                self._idle_mark = (self._settles, now)
                return ZERO
            if self._asking or now - since < idle_s:
                return ZERO
            return self.lease.give_back()


class LocalBudget:
    """A :class:`BudgetLedger` and one :class:`Admission` in one process, answering at once.

    The in-process builder's budget, and the reference for tests of the protocol. Batches are
    applied when the caller says so (:meth:`ship`).
    """

    def __init__(
        self,
        ledger: BudgetLedger,
        *,
        producer: str = "local",
        incarnation: str = "",
        lease_calls: int = DEFAULT_LEASE_CALLS,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        clock: Callable[[], float] = time.monotonic,
        lock: threading.Lock | None = None,
    ) -> None:
        """``lock``: shared by every LocalBudget of one ledger (several producers)."""
        self.ledger = ledger
        self.producer = producer
        self.incarnation = incarnation
        self._clock = clock
        self._lock = lock or threading.Lock()  # the ledger is not thread-safe
        self.admission = Admission(
            self._request,
            lease_calls=lease_calls,
            default_max_tokens=default_max_tokens,
            clock=clock,
        )

    def _request(self, want: Decimal, need: Decimal, held: Decimal) -> None:
        with self._lock:
            grant = self.ledger.grant(
                self.producer, self.incarnation, want=want, need=need, held=held, now=self._clock()
            )
        self.admission.on_grant(grant)

    def ship(self, cost: Decimal) -> None:
        """A batch of ``cost`` dollars of cost leaves was applied, with the admitted part."""
        admitted = self.admission.take_admitted()
        with self._lock:
            self.ledger.on_batch(
                self.producer, self.incarnation, cost=cost, admitted=admitted, now=self._clock()
            )
