"""Barriers: closing a row of ``(step, split)`` and resuming from an older step, one at a time.

The row math is the pure core's (``AggregatorState.close_step``, :mod:`art_ray_metrics.core.rewind`);
this class schedules around it on the actor's event loop: wait for the expected producers,
charge the GPU time since the last train barrier, record the close for rewinds, commit (the
row is in the checkpoint before anyone sees it), then hand the row to the best-effort sinks (W&B). A retried call
returns the same row; a second call while one is in flight waits for it. Rewinds and closes
hold one lock, so a barrier closes before or after a rewind, never in between. Used by the
actor (:mod:`art_ray_metrics.distributed.actor`); no Ray here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from art_ray_metrics.config import AggregatorConfig
from art_ray_metrics.core import counters
from art_ray_metrics.core import keys as K
from art_ray_metrics.core import rewind as R
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.meta import Health, LastRow, OutboxEntry
from art_ray_metrics.core.outcome import FateTable
from art_ray_metrics.core.state import AggregatorState, split_trainer_metrics
from art_ray_metrics.distributed.telemetry import AggregatorTelemetry
from art_ray_metrics.durable.commit import Committer
from art_ray_metrics.errors import (
    BarrierTimeoutError,
    InvalidMetricError,
    StorageError,
    WireFormatError,
)
from art_ray_metrics.export.sink import Sink
from art_ray_metrics.spend.gpu_meter import GpuMeter

__all__ = ["Barriers"]

log = logging.getLogger(__name__)


class Barriers:
    """The actor's barriers and rewinds.

    Args:
        config: The aggregator's configuration (rewind window, barrier timeout, row telemetry).
        state: The aggregator's state.
        committer: Commits each close (and rewind) before it is answered.
        gpu: Charges ``costs/gpu`` on train barriers.
        health: Counts barrier timeouts and refused implicit rewinds.
        telemetry: Records ``barrier_seconds``.
        gauges: The actor's gauges for a row's ``telemetry/*`` keys.
        row_sinks: The best-effort sinks a closed row goes to after its commit (none once
            fenced: two writers must never log to one W&B run).
        published: Pushes the Ray metrics once a row closed.
        clock: The wall clock (epoch seconds) GPU time is charged on.

    Call :meth:`start` on the event loop before the first call.
    """

    def __init__(
        self,
        config: AggregatorConfig,
        state: AggregatorState,
        committer: Committer,
        gpu: GpuMeter,
        health: Health,
        telemetry: AggregatorTelemetry,
        *,
        gauges: Callable[[], dict[str, float]],
        row_sinks: Callable[[], list[Sink]],
        published: Callable[[], None],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.state = state
        self.committer = committer
        self.gpu = gpu
        self.health = health
        self.telemetry = telemetry
        self.gauges = gauges
        self.row_sinks = row_sinks
        self.published = published
        self.clock = clock
        self.closing: dict[tuple[int, str], asyncio.Future[dict[str, float]]] = {}
        self.lock: asyncio.Lock | None = None  # rewinds and closes, one at a time

    def start(self) -> None:
        """Create the loop's primitives (on the running event loop)."""
        self.lock = asyncio.Lock()

    async def close(
        self,
        step: int,
        split: str,
        metrics: Mapping[str, float] | None,
        expect_producers: int | list[str] | None,
        timeout_s: float | None,
        on_timeout: str,
        group_fates: Mapping[str, str] | None = None,
        derived_fates: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """Close ``(step, split)`` and return its row; see :meth:`AggregatorHandle.log`."""
        V.check_step(step)
        V.check_split(split)
        split_trainer_metrics(metrics)  # invalid metrics raise before anything happens
        FateTable.from_trainer(group_fates)  # and so do invalid fates
        FateTable.from_trainer(derived_fates)
        last = self.state.meta.last_rows.get(split)
        if last is not None and last.step == step:
            return dict(last.row)  # a retried barrier call: same row, nothing closed twice
        running = self.closing.get((step, split))
        if running is not None:  # the same barrier still in flight (a retried call)
            return dict(await asyncio.shield(running))
        future: asyncio.Future[dict[str, float]] = asyncio.get_running_loop().create_future()
        self.closing[(step, split)] = future
        try:
            row = await self._close(
                step,
                split,
                metrics,
                expect_producers,
                timeout_s,
                on_timeout == "raise",
                group_fates,
                derived_fates,
            )
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without a waiter
            raise
        finally:
            del self.closing[(step, split)]
        future.set_result(row)
        return dict(row)

    async def _close(
        self,
        step: int,
        split: str,
        metrics: Mapping[str, float] | None,
        expect_producers: int | list[str] | None,
        timeout_s: float | None,
        strict: bool = False,
        group_fates: Mapping[str, str] | None = None,
        derived_fates: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        started = time.monotonic()
        assert self.lock is not None
        async with self.lock:  # decided after any rewind in flight has applied
            last = self.state.meta.last_rows.get(split)
            if last is not None and last.step == step:  # a retry: a rewind kept this close
                return dict(last.row)
            # a resume: this split closes a step at or below its own last one (another split
            # of the same scope at the same step, e.g. test after val, is not one)
            closed = self.state.last_closed_split.get(split)
            if closed is not None and 0 <= step <= closed and self.config.rewind_window > 0:
                await self._implicit_rewind(step, split)
        if expect_producers is not None:
            missing = await self._wait_for(step, split, expect_producers, timeout_s)
            if missing is not None and strict:  # nothing closed: the step stays open
                raise BarrierTimeoutError(
                    f"Step {step} ({split}) is still open: expected producers {missing} did not "
                    "report in time; call log() again to wait longer, or with on_timeout='close'"
                )
        metrics = dict(metrics or {})
        now = self.clock()
        if split == "train":
            gpu = self.gpu.charge(now)
            if gpu is not None and "costs/gpu" not in metrics:
                metrics["costs/gpu"] = gpu
        async with self.lock:  # never while a rewind reads its records
            return await self._close_now(
                step, split, metrics, started, now, group_fates, derived_fates
            )

    async def _close_now(
        self,
        step: int,
        split: str,
        metrics: dict[str, float],
        started: float,
        now: float,
        group_fates: Mapping[str, str] | None = None,
        derived_fates: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """Close, record and commit; the state changes in one synchronous stretch."""
        ledgers = (self.state.cum.scenarios, self.state.cum.cost_ids)
        before = [len(ledger.journal_bytes()) for ledger in ledgers]
        for producer, incarnation in self.state.budget.sweep(time.monotonic()):
            log.warning(
                "art_ray_metrics: producer %s (incarnation %s) went silent holding budget: "
                "its lease is reported as costs/unreconciled",
                producer,
                incarnation,
            )
        report = self.state.close_step(  # raises InvalidMetricError
            step, split, metrics, group_fates, derived_fates
        )
        if self.config.rewind_window > 0:
            added = [ledger.journal_bytes()[n:] for ledger, n in zip(ledgers, before, strict=True)]
            key, data, evicted = R.record_close(
                self.state, step, split, added[0], added[1], window=self.config.rewind_window
            )
            self.committer.rewind_queue[key] = data
            self.committer.forget_rewind_objects(evicted)
        if split == "train":
            self.gpu.since = now  # committed with the row that charged up to it
        row = report.row
        if self.config.telemetry_in_rows:
            row.update(self.state.telemetry())
            row.update(self.gauges())
            in_row = {
                "late_leaves_in_row": report.late_leaves,
                "lost_leaves_in_row": report.lost_leaves,
                "conflicts_in_row": len(report.conflicts),
                "producers_in_row": len(report.producers),
            }
            row.update(counters.row_values("close", in_row, K.TELEMETRY_PREFIX))
        if self.state.budget.cross_soft():
            self._soft_limit_crossed()
        recorded_at = datetime.now(UTC).isoformat()
        self.state.meta.outbox.append(OutboxEntry(step, split, row, recorded_at))
        self.state.meta.last_rows[split] = LastRow(step, row)
        await self.committer.persist()
        for sink in self.row_sinks():
            sink.log(row, step=step, split=split)
        self.telemetry.observe("barrier_seconds", time.monotonic() - started)
        self.published()
        return row

    def _soft_limit_crossed(self) -> None:
        """One log line and one W&B alert when the spend first reaches the soft limit."""
        budget = self.state.budget
        text = (
            f"Run {self.config.run_name!r} spent ${budget.spent:.2f} of its ${budget.limit} "
            f"budget (soft limit {budget.soft:%}); calls are refused past the limit"
        )
        log.warning("art_ray_metrics: %s", text)
        for sink in self.row_sinks():
            alert = getattr(sink, "alert", None)
            if alert is not None:
                alert("art_ray_metrics: budget soft limit", text)

    async def _implicit_rewind(self, step: int, split: str) -> None:
        try:
            await self._rewind(step - 1, keep_late=True)
        except InvalidMetricError as exc:
            self.health.rewind_refused += 1
            log.warning("art_ray_metrics: %s; step %s/%s is folded in as late", exc, step, split)
        except StorageError as exc:
            self.health.rewind_refused += 1
            self.health.storage_failed(exc)
            log.warning("art_ray_metrics: rewind failed (%s); step %s/%s is late", exc, step, split)

    async def rewind(self, step: int) -> dict[str, Any]:
        """The trainer resumed from its checkpoint of ``step``: go back to right after it."""
        if isinstance(step, bool) or not isinstance(step, int) or step < -1:
            raise InvalidMetricError(f"Expected a step >= -1 to rewind to but got {step!r}")
        assert self.lock is not None
        async with self.lock:  # a barrier closes before or after, never in between
            result = await self._rewind(step, keep_late=False)
        await self.committer.persist()
        return result

    async def _rewind(self, step: int, *, keep_late: bool) -> dict[str, Any]:
        """Go back to the state right after the last close of a step <= ``step``."""
        plan = R.plan_rewind(
            self.state, step, keep_late=keep_late, window=self.config.rewind_window
        )  # raises InvalidMetricError
        if plan is None:
            return {"discarded_steps": 0}
        names = ([plan.base_key] if plan.base_key else []) + list(plan.keys)
        read = self.committer.read_rewind
        loaded = await asyncio.to_thread(lambda: [read(k) for k in names])
        base = loaded[0] if plan.base_key else None
        records = loaded[1:] if plan.base_key else loaded
        # -- from here on no await: the state changes in one synchronous stretch
        result = R.apply_rewind(self.state, plan, base, records, keep_late=keep_late)
        for family, removed in result.tombstones.items():
            self.committer.tombstones[family] += removed
        self.committer.forget_rewind_objects(result.dropped_keys)
        # kept closes, recorded on the new base
        self.committer.rewind_queue.update(result.rewritten)
        log.warning(
            "art_ray_metrics: rewound to step %s: discarded %d closed steps and %d pending "
            "buffers (%s USD of their spend leaves the totals)",
            step,
            result.discarded_steps,
            result.discarded_buffers,
            result.costs_usd,
        )
        await self._restore_last_rows()
        return result.summary()

    async def _restore_last_rows(self) -> None:
        """Give each split whose last row a rewind discarded the row of its last kept close
        (:func:`~art_ray_metrics.core.rewind.forgotten_last_rows`; read back from the history
        when the outbox no longer holds it). A row the history cannot give back (storage
        down) leaves the split as before, with a warning."""
        for split, step, row in R.forgotten_last_rows(self.state):
            if row is None:
                try:
                    row = await asyncio.to_thread(self.committer.history.row, step, split)
                except (StorageError, WireFormatError) as exc:
                    log.warning(
                        "art_ray_metrics: the kept row of step %s/%s could not be read back "
                        "after the rewind (%s); a retried barrier of it is taken for a resume",
                        step,
                        split,
                        exc,
                    )
                    continue
            if row is not None and split not in self.state.meta.last_rows:
                self.state.meta.last_rows[split] = LastRow(step, dict(row))

    async def _wait_for(
        self, step: int, split: str, expect: int | list[str], timeout_s: float | None
    ) -> str | None:
        """Wait for the expected producers; return None, or a description of who is missing."""
        deadline = time.monotonic() + (timeout_s or self.config.barrier_timeout_s)
        while True:
            seen = self.state.producers_reported(step, split)
            ok = len(seen) >= expect if isinstance(expect, int) else set(expect) <= seen
            if ok:
                return None
            if time.monotonic() >= deadline:
                self.health.barrier_timeouts += 1
                missing = (
                    expect - len(seen) if isinstance(expect, int) else sorted(set(expect) - seen)
                )
                log.warning(
                    "art_ray_metrics: step %s/%s: %s expected producers did not report",
                    step,
                    split,
                    missing,
                )
                return f"{missing} of {expect}" if isinstance(expect, int) else str(missing)
            await asyncio.sleep(0.01)
