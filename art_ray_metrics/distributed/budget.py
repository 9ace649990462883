"""A worker process's side of the run budget: admission over its client's transport.

One :class:`ClientBudget` per :class:`~art_ray_metrics.distributed.client.MetricsClient`
incarnation. It holds the process's :class:`~art_ray_metrics.spend.admission.Admission` and
asks the aggregator for budget (``budget_grant``) through the client's transport without
waiting: the answer arrives on the transport's completion callback. Whether the run has a budget
is learned from the aggregator's first answer, asked for at the process's first paid call,
which waits for it (at most ``first_wait_s``, ``ClientConfig.budget_first_wait_s``) and is then
admitted under the budget like every later call. When the run has no ``budget_usd``, calls are
not admitted and nothing changes for them. Only if the aggregator does not answer in time (not
found yet, unreachable) do calls go unadmitted until the answer arrives; the process waits only
once, and such calls count in the README's overshoot bound as cost recorded without admission.
Under a budget, each batch carries the real cost of the admitted calls
whose leaves it holds (taken before the tape is drained), and an idle process gives its lease
back from the client's background thread.
"""

from __future__ import annotations

import logging
import threading
import time
from decimal import Decimal
from typing import Any, Final

from art_ray_metrics.core.budget_terms import Grant
from art_ray_metrics.core.rollup import ZERO
from art_ray_metrics.errors import AggregatorUnavailableError
from art_ray_metrics.spend.admission import Admission

__all__ = ["IDLE_RETURN_S", "ClientBudget"]

log = logging.getLogger(__name__)

IDLE_RETURN_S: Final = 5.0
"""A process with no call settled for this long gives its lease back."""


class ClientBudget:
    """The admission of one producer incarnation, over its client's transport."""

    def __init__(
        self,
        transport: Any,
        producer_id: str,
        incarnation: str,
        *,
        lease_calls: int,
        wait_s: float,
        default_max_tokens: int,
        first_wait_s: float = 5.0,
    ) -> None:
        self._transport = transport
        self._first_wait_s = first_wait_s
        self._waited = False  # the first paid call waited for the answer (only once)
        self.producer_id = producer_id
        self.incarnation = incarnation
        self.admission = Admission(
            self._request,
            lease_calls=lease_calls,
            wait_s=wait_s,
            default_max_tokens=default_max_tokens,
        )
        self.enabled: bool | None = None
        """``None`` until the aggregator answered; then whether the run has a hard limit."""
        self._probing = False
        self._lock = threading.Lock()
        self._answered_cond = threading.Condition(self._lock)

    def active(self) -> Admission | None:
        """The admission to reserve from, or ``None`` (no budget). The process's first paid
        call waits for the aggregator to say whether the run has a budget (at most
        ``first_wait_s``); if it has not said in time, this and later calls are not admitted
        (and the aggregator is asked again in the background) until it answers."""
        if self.enabled:
            return self.admission
        if self.enabled is None:
            self._probe()
            if not self._waited:
                self._wait_first()
                if self.enabled:
                    return self.admission
        return None

    def _wait_first(self) -> None:
        """Wait for the first answer, asking again while the aggregator is not found yet."""
        deadline = time.monotonic() + self._first_wait_s
        while self.enabled is None:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "art_ray_metrics: no answer from the aggregator about the run budget in "
                    "%.1f s; paid calls are not admitted until it answers",
                    self._first_wait_s,
                )
                break
            with self._answered_cond:
                if self.enabled is None:
                    self._answered_cond.wait(min(left, 0.05))
            self._probe()  # a no-op while a probe is in flight
        self._waited = True

    def _probe(self) -> None:
        with self._lock:
            if self._probing:
                return
            self._probing = True
        try:
            self._call_probe()
        except Exception as exc:  # not reachable yet: asked again at the next paid call
            log.debug("art_ray_metrics: budget probe failed: %r", exc)
            with self._lock:
                self._probing = False

    def _resolved(self) -> Any:
        transport = self._transport
        if not transport.ready():  # lookups are the background thread's: never here
            raise AggregatorUnavailableError(
                getattr(transport, "lookup_error", None) or "the aggregator is not found yet"
            )
        return transport

    def _call_probe(self) -> None:
        future = self._resolved().call("budget_info")
        future.add_done_callback(self._probed)

    def _probed(self, future: Any) -> None:
        try:
            limit = future.result()
        except Exception:
            with self._lock:
                self._probing = False  # asked again at the next paid call
            return
        with self._answered_cond:
            self.enabled = limit is not None
            self._answered_cond.notify_all()

    def _request(self, want: Decimal, need: Decimal, held: Decimal) -> None:
        future = self._resolved().call(
            "budget_grant", self.producer_id, self.incarnation, str(want), str(need), str(held)
        )
        future.add_done_callback(self._answered)

    def _answered(self, future: Any) -> None:
        try:
            amount, exhausted, limit, spent, committed = future.result()
        except Exception as exc:
            self.admission.on_failure(exc)
            return
        self.admission.on_grant(
            Grant(
                Decimal(amount),
                bool(exhausted),
                None if limit is None else Decimal(limit),
                Decimal(spent),
                Decimal(committed),
            )
        )

    def take_admitted(self) -> Decimal:
        """The admitted real cost for the batch being built (before the tape is drained)."""
        return self.admission.take_admitted() if self.enabled else ZERO

    def untake(self, amount: Decimal) -> None:
        """A batch was not built after all: its admitted cost goes to the next one."""
        self.admission.untake(amount)

    def tick(self) -> None:
        """From the client's background thread: give an idle lease back."""
        if not self.enabled:
            return
        amount = self.admission.give_back(IDLE_RETURN_S)
        if not amount:
            return
        try:
            self._transport.call("budget_return", self.producer_id, self.incarnation, str(amount))
        except Exception as exc:  # kept by the aggregator as outstanding: safe, never lost
            log.debug("art_ray_metrics: could not give %s of budget back: %r", amount, exc)
