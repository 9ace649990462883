"""A producer process's purse under the run budget (see :mod:`art_ray_metrics.core.budget`).

Pure; not thread-safe (``spend/admission.py`` holds the lock). Admission reserves a call's
upper-bound estimate from the balance (no round trip); settling replaces it by the real cost;
the real cost of admitted calls waits in :attr:`LocalLease.admitted` until a batch carries it.
"""

from __future__ import annotations

from decimal import Decimal

from art_ray_metrics.core.rollup import ZERO

__all__ = ["LocalLease"]


class LocalLease:
    """A producer incarnation's purse (one per process). Not thread-safe: the caller holds
    its lock (``spend/admission.py``).

    Invariant: everything granted is in exactly one place: ``balance`` (unreserved),
    ``open`` (reserved by calls in flight), ``admitted`` (real cost settled, not yet in a
    batch), ``unpriced`` (reservations of paid calls that could not be priced), shipped in a
    batch, or given back. So :attr:`held` equals the aggregator's outstanding lease of this
    incarnation, less what batches in flight carry.
    """

    __slots__ = ("admitted", "balance", "granted", "open", "reservations", "unpriced")

    def __init__(self) -> None:
        self.balance = ZERO
        """Granted and not reserved (negative after a call that cost more than reserved)."""
        self.open = ZERO
        """Reservations of calls in flight."""
        self.granted = ZERO
        """Everything the aggregator granted this incarnation."""
        self.admitted = ZERO
        """Real cost of settled calls that no batch carried yet (:meth:`take_admitted`)."""
        self.reservations = 0
        """Calls in flight."""
        self.unpriced = ZERO
        """Reservations of paid calls that could not be priced (never shipped)."""

    @property
    def held(self) -> Decimal:
        """What of its leases this incarnation holds: not shipped in a batch, not given back."""
        return self.balance + self.open + self.admitted + self.unpriced

    def try_reserve(self, estimate: Decimal) -> bool:
        """Reserve ``estimate`` from the balance; False (and nothing changed) if it is short."""
        if estimate > self.balance:
            return False
        self.balance -= estimate
        self.open += estimate
        self.reservations += 1
        return True

    def settle(self, estimate: Decimal, real: Decimal | None) -> None:
        """A reserved call ended: ``real`` is its cost (0 if nothing was paid). ``None``: it
        was paid but could not be priced; its reservation is kept as spent and is never
        shipped, so the aggregator keeps it outstanding (in the unreconciled bound once this
        incarnation is gone) instead of counting it in no place."""
        self.open -= estimate
        self.reservations -= 1
        if real is None:
            self.unpriced += estimate
            return
        self.balance += estimate - real
        self.admitted += real

    def add_grant(self, amount: Decimal) -> None:
        """Take in a grant."""
        self.balance += amount
        self.granted += amount

    def take_admitted(self) -> Decimal:
        """The admitted real cost to put in the next batch (reset to zero)."""
        out, self.admitted = self.admitted, ZERO
        return out

    def give_back(self) -> Decimal:
        """The whole balance, to return when idle (nothing in flight or unshipped); zero
        otherwise."""
        if self.reservations or self.admitted or self.balance <= 0:
            return ZERO
        out, self.balance = self.balance, ZERO
        return out
