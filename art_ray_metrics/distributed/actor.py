"""The aggregator: a named, detached Ray actor that is a thin shell over ``AggregatorState``.

It owns no policy: ingest, barriers and rewinds are the pure core's (:mod:`~art_ray_metrics.core`);
this module schedules the I/O around them (write-ahead log, checkpoints, history, W&B) on one
asyncio event loop, with slow I/O in threads. The remote methods, the commit protocol and the
failure semantics are described once, in ``docs/design.md``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgpack

from art_ray_metrics.config import AggregatorConfig
from art_ray_metrics.core import keys as K
from art_ray_metrics.core import rewind as R
from art_ray_metrics.core.rewind import TOMBSTONES
from art_ray_metrics.core.state import AggregatorState, ProducerKey, _Window
from art_ray_metrics.core.wire import batch_identity
from art_ray_metrics.durable.checkpoint import CheckpointManager, CheckpointParts
from art_ray_metrics.durable.history import HistoryStore, history_row_metrics
from art_ray_metrics.durable.restore import rebuild_state
from art_ray_metrics.durable.storage import open_store
from art_ray_metrics.errors import (
    ConfigMismatchError,
    FencedError,
    InvalidMetricError,
    StorageError,
    WireFormatError,
)
from art_ray_metrics.export.wandb_sink import WandbSink, WandbSinkConfig

__all__ = ["AggregatorHandle", "MetricsAggregator", "start_aggregator"]

log = logging.getLogger(__name__)

CREDENTIAL_ENV = (
    "WANDB_API_KEY",
    "WANDB_BASE_URL",
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_SILENT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ALLOW_HTTP",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_SERVICE_ACCOUNT",
)
"""Environment variables forwarded to the actor through Ray's runtime env (never persisted)."""


class MetricsAggregator:
    """The actor class (wrapped with ``ray.remote`` by :func:`start_aggregator`)."""

    def __init__(self, config_json: str) -> None:
        self.config = AggregatorConfig.model_validate_json(config_json)
        self.started_at = time.time()
        self.store = open_store(
            self.config.storage_uri or "", timeout_s=self.config.storage_timeout_s
        )
        self.ckpt = CheckpointManager(
            self.store,
            retention=self.config.checkpoint_retention,
            prune_every=self.config.checkpoint_prune_every,
        )
        self.history = HistoryStore(self.store)
        self.state, replayed = self._restore()
        meta = self.state.meta
        meta.setdefault("outbox", [])
        meta.setdefault("last_rows", {})
        # every start claims the next writer epoch, durably, before anything else: so epoch - 1
        # counts the restarts even when an instance died before its first checkpoint
        meta["restarts"] = max(meta.get("restarts", -1) + 1, self.ckpt.epoch - 1)
        R.ensure_meta(meta)
        self.rewind_queue: dict[str, bytes] = {}  # rewind objects not yet written
        self.tombstones: dict[str, bytes] = dict.fromkeys(TOMBSTONES.values(), b"")
        self.restarted = meta["restarts"] > 0 or replayed > 0
        self.durable: dict[ProducerKey, _Window] = {
            p: _Window(w.watermark, w.above or ()) for p, w in self.state.producers.items()
        }
        self.wal_queue: list[tuple[bytes, ProducerKey, int]] = []
        self.since_ckpt: list[tuple[ProducerKey, int]] = []
        # group commit: batches queued while a write is in flight go out together in the next
        # one; each write resolves the future of its generation
        self.wal_gen = 0
        self.wal_done: dict[int, asyncio.Future[None]] = {}
        self.wal_wake: asyncio.Event | None = None
        self.fenced: str | None = None
        self.health: dict[str, Any] = {
            "wal_writes": 0,
            "wal_failures": 0,
            "checkpoints": 0,
            "checkpoint_failures": 0,
            "history_failures": 0,
            "replayed_batches": replayed,
            "last_storage_error": None,
            "barrier_timeouts": 0,
            "rewind_refused": 0,
        }
        self.ingest_times: deque[float] = deque(maxlen=4096)
        self.inflight = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.wal_lock: asyncio.Lock | None = None
        self.persist_lock: asyncio.Lock | None = None
        self.last_train_barrier = time.monotonic()
        self.gpus: dict[str, int] | None = None
        self.wandb = self._make_wandb()

    # -- start-up ---------------------------------------------------------------------------

    def _restore(self) -> tuple[AggregatorState, int]:
        delay, attempts = 0.5, 0
        while True:
            try:
                loaded = self.ckpt.acquire()
                break
            except FencedError:
                raise
            except StorageError as exc:
                attempts += 1
                if attempts >= 6:
                    raise
                log.warning("art_ray_metrics: storage not ready (%s); retrying", exc)
                time.sleep(delay)
                delay *= 2
        if loaded is None:
            return AggregatorState(), 0
        state, replayed = rebuild_state(loaded)
        if replayed:
            log.warning("art_ray_metrics: replayed %d batches from the write-ahead log", replayed)
        return state, replayed

    def _make_wandb(self) -> WandbSink | None:
        mode = self.config.wandb_enabled_mode()
        if mode == "disabled":
            return None
        meta = self.state.meta
        sink = WandbSink(
            WandbSinkConfig(
                project=self.config.wandb_project,
                entity=self.config.wandb_entity,
                run_name=self.config.run_name,
                run_id=meta.get("wandb_run_id"),
                mode=mode,
                dir=self.config.wandb_dir,
                config={"art_ray_metrics": self.config.model_dump(mode="json")},
            )
        )
        meta["wandb_run_id"] = sink.run_id
        sink.start()
        if self.restarted:
            # W&B buffers rows in its own process until finish(); a killed actor may have lost
            # some. Re-log every row since the last clean finish: twice is fine, never zero.
            since = int(meta.get("wandb_finished_upto", -1))
            rows = {
                (int(r["step"]), str(r["split"])): history_row_metrics(r)
                for r in self.history.read(start_step=since + 1)
            }
            # committed rows whose history write had not happened yet
            for step, split, row, _recorded_at in meta["outbox"]:
                if int(step) > since:
                    rows[(int(step), str(split))] = {**row, "training_step": float(step)}
            sink.relog(rows[k] for k in sorted(rows))
        return sink

    def _ensure_tasks(self) -> None:
        if self.tasks:
            return
        self.wal_lock = asyncio.Lock()
        self.persist_lock = asyncio.Lock()
        self.wal_wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._wal_loop()), loop.create_task(self._ckpt_loop())]

    # -- ingest -----------------------------------------------------------------------------

    async def ingest(self, data: bytes, durable: bool = False) -> dict[str, Any]:
        """Apply one batch (idempotent on ``(producer_id, incarnation, seq)``); with ``durable``,
        answer once it is in the write-ahead log (group commit: one storage write for every
        batch that arrived meanwhile). A refused batch is logged too, so the producer's window
        moves past it for good, then :class:`WireFormatError` is raised to the producer."""
        self._ensure_tasks()
        self.ingest_times.append(time.monotonic())
        try:
            result = self.state.ingest_bytes(data)  # raises WireFormatError: counted
        except WireFormatError:
            ident = batch_identity(data)
            if ident is not None:
                key = (ident[0], ident[1])
                if key not in self.durable:
                    self.durable[key] = _Window(ident[3])
                self.wal_queue.append((data, key, ident[2]))
                self.since_ckpt.append((key, ident[2]))
                await self._await_wal(key, ident[2])
            raise
        key = (result.producer_id, result.incarnation)
        if key not in self.durable:  # new, or back after confirm dropped its window
            self.durable[key] = _Window(result.acked_upto)
        if not result.duplicate:
            self.wal_queue.append((data, key, result.seq))
            self.since_ckpt.append((key, result.seq))
        if durable:
            await self._await_wal(key, result.seq)
        window = self.durable.get(key)
        return {
            "producer_id": result.producer_id,
            "seq": result.seq,
            "duplicate": result.duplicate,
            "durable": window is not None and window.seen(result.seq),
            "durable_upto": window.watermark if window is not None else 0,
            "late_leaves": result.late_leaves,
            "conflicts": [list(c) for c in result.conflicts],
        }

    async def confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
        """A producer holds durable acknowledgements up to ``acked_upto``: forget its window
        when nothing above it was applied (see ``AggregatorState.confirm``)."""
        window = self.durable.get((producer_id, incarnation))
        if window is not None and (window.above is not None or window.watermark > acked_upto):
            return False
        if self.state.confirm(producer_id, incarnation, int(acked_upto)):
            self.durable.pop((producer_id, incarnation), None)
            return True
        return False

    async def _await_wal(self, key: ProducerKey, seq: int) -> None:
        """Wait until ``seq`` is durable or a write that should have covered it failed."""
        for _ in range(2):  # the write in flight may predate the batch: then the next one
            window = self.durable.get(key)
            if (window is not None and window.seen(seq)) or self.fenced:
                return
            self.inflight += 1
            try:
                await asyncio.shield(self._wal_future())
            finally:
                self.inflight -= 1

    def _wal_future(self) -> asyncio.Future[None]:
        """The future of the next write (the one that will take what is queued now)."""
        fut = self.wal_done.get(self.wal_gen)
        if fut is None:
            fut = self.wal_done[self.wal_gen] = asyncio.get_running_loop().create_future()
        assert self.wal_wake is not None
        self.wal_wake.set()
        return fut

    def _mark_durable(self, items: list[tuple[ProducerKey, int]]) -> None:
        for key, seq in items:
            window = self.durable.get(key)
            if window is not None:  # None: the producer confirmed and its window was dropped
                window.mark(seq)

    async def _write_wal(self) -> None:
        assert self.wal_lock is not None
        async with self.wal_lock:
            gen = self.wal_gen
            self.wal_gen += 1  # batches arriving during this write wait for the next one
            try:
                await self._write_wal_locked()
            finally:
                fut = self.wal_done.pop(gen, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def _write_wal_locked(self) -> None:
        if not self.wal_queue or self.fenced:
            return
        batch, self.wal_queue = self.wal_queue, []
        record = msgpack.packb([d for d, _, _ in batch], use_bin_type=True)
        try:
            await asyncio.to_thread(self.ckpt.append_wal, record)
        except FencedError as exc:
            self._fence(exc)
            return
        except StorageError as exc:
            self.wal_queue[:0] = batch  # keep for the next attempt or the next checkpoint
            self.health["wal_failures"] += 1
            self.health["last_storage_error"] = str(exc)[:300]
            return
        self.health["wal_writes"] += 1
        self._mark_durable([(p, s) for _, p, s in batch])

    async def _wal_loop(self) -> None:
        """Write at once when woken by a durable ingest; else every ``wal_interval_s``."""
        assert self.wal_wake is not None
        while True:
            try:
                await asyncio.wait_for(self.wal_wake.wait(), self.config.wal_interval_s)
            except TimeoutError:
                pass
            self.wal_wake.clear()
            if self.wal_queue or self.wal_done:
                await self._write_wal()

    async def _ckpt_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_interval_s)
            if self.since_ckpt or self.state.meta["outbox"]:
                await self._persist()

    def _fence(self, exc: FencedError) -> None:
        if not self.fenced:
            log.error("art_ray_metrics: %s", exc)
        self.fenced = str(exc)
        self.wal_queue.clear()

    # -- barrier ----------------------------------------------------------------------------

    async def log(
        self,
        step: int,
        split: str = "train",
        metrics: Mapping[str, float] | None = None,
        expect_producers: int | list[str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, float]:
        """Close ``(step, split)`` and return its row; see :meth:`AggregatorHandle.log`."""
        self._ensure_tasks()
        last = self.state.meta["last_rows"].get(split)
        if last is not None and last[0] == step:
            return dict(last[1])  # a retried barrier call: same row, nothing closed twice
        scope = K.scope_for_split(split)
        closed = self.state.last_closed.get(scope)
        if (
            isinstance(step, int)
            and closed is not None
            and 0 <= step <= closed
            and self.config.rewind_window > 0
        ):
            await self._implicit_rewind(step, split)
        if expect_producers is not None:
            await self._wait_for(step, split, expect_producers, timeout_s)
        metrics = dict(metrics or {})
        if split == "train":
            now = time.monotonic()
            gpu = self._gpu_cost(now - self.last_train_barrier)
            if gpu is not None and "costs/gpu" not in metrics:
                metrics["costs/gpu"] = gpu
        ledgers = (self.state.cum.scenarios, self.state.cum.cost_ids)
        before = [len(ledger.journal_bytes()) for ledger in ledgers]
        report = self.state.close_step(step, split, metrics)  # raises InvalidMetricError
        if self.config.rewind_window > 0:
            added = [ledger.journal_bytes()[n:] for ledger, n in zip(ledgers, before, strict=True)]
            key, data, evicted = R.record_close(
                self.state, step, split, added[0], added[1], window=self.config.rewind_window
            )
            self.rewind_queue[key] = data
            self._forget_rewind_objects(evicted)
        if split == "train":
            self.last_train_barrier = time.monotonic()
        row = report.row
        if self.config.telemetry_in_rows:
            row.update(self.state.telemetry())
            row.update(self._gauges())
            row[f"{K.TELEMETRY_PREFIX}late_leaves_in_row"] = float(report.late_leaves)
            row[f"{K.TELEMETRY_PREFIX}conflicts_in_row"] = float(len(report.conflicts))
            row[f"{K.TELEMETRY_PREFIX}producers_in_row"] = float(len(report.producers))
        recorded_at = datetime.now(UTC).isoformat()
        self.state.meta["outbox"].append([step, split, row, recorded_at])
        self.state.meta["last_rows"][split] = [step, row]
        await self._persist()
        if self.wandb is not None:
            self.wandb.log(row, step=step, split=split)
        return row

    # -- resume from an older step ----------------------------------------------------------

    def _forget_rewind_objects(self, keys: Iterable[str]) -> None:
        """Unqueue rewind objects not written yet; delete the others after the next commit."""
        for key in keys:
            if self.rewind_queue.pop(key, None) is None:
                self.state.meta["rewind_drop"].append(key)

    def _read_rewind(self, key: str) -> R.RewindRecord:
        """One rewind object, from the queue or the store (runs in a thread)."""
        data = self.rewind_queue.get(key)
        if data is None:
            data = self.store.get(key)
        try:
            return R.decode_record(data)
        except WireFormatError as exc:
            raise StorageError(f"Unreadable rewind object at {key!r}: {exc}") from exc

    async def _implicit_rewind(self, step: int, split: str) -> None:
        try:
            await self._rewind(step - 1, keep_late=True)
        except InvalidMetricError as exc:
            self.health["rewind_refused"] += 1
            log.warning("art_ray_metrics: %s; step %s/%s is folded in as late", exc, step, split)
        except StorageError as exc:
            self.health["rewind_refused"] += 1
            self.health["last_storage_error"] = str(exc)[:300]
            log.warning("art_ray_metrics: rewind failed (%s); step %s/%s is late", exc, step, split)

    async def rewind(self, step: int) -> dict[str, Any]:
        """The trainer resumed from its checkpoint of ``step``; see the module docstring."""
        self._ensure_tasks()
        if isinstance(step, bool) or not isinstance(step, int) or step < -1:
            raise InvalidMetricError(f"Expected a step >= -1 to rewind to but got {step!r}")
        result = await self._rewind(step, keep_late=False)
        await self._persist()
        return result

    async def _rewind(self, step: int, *, keep_late: bool) -> dict[str, Any]:
        """Go back to the state right after the last close of a step <= ``step``."""
        plan = R.plan_rewind(
            self.state, step, keep_late=keep_late, window=self.config.rewind_window
        )  # raises InvalidMetricError
        if plan is None:
            return {"discarded_steps": 0}
        names = ([plan.base_key] if plan.base_key else []) + list(plan.keys)
        loaded = await asyncio.to_thread(lambda: [self._read_rewind(k) for k in names])
        base = loaded[0] if plan.base_key else None
        records = loaded[1:] if plan.base_key else loaded
        # -- from here on no await: the state changes in one synchronous stretch
        result = R.apply_rewind(self.state, plan, base, records, keep_late=keep_late)
        for family, removed in result.tombstones.items():
            self.tombstones[family] += removed
        self._forget_rewind_objects(result.dropped_keys)
        log.warning(
            "art_ray_metrics: rewound to step %s: discarded %d closed steps and %d pending "
            "buffers (%s USD of their spend leaves the totals)",
            step,
            result.discarded_steps,
            result.discarded_buffers,
            result.costs_usd,
        )
        return result.summary()

    def _gpu_cost(self, wall_s: float) -> float | None:
        """``costs/gpu`` for ``wall_s`` seconds of the configured (or detected) GPUs."""
        cfg = self.config
        if not cfg.gpu_type:
            return None
        if self.gpus is None:  # resolved once: the cluster's GPUs do not change per step
            from art_ray_metrics.spend.gpu import detect_gpus

            detected = detect_gpus() if cfg.gpu_count is None else {}
            if cfg.gpu_type == "auto":
                self.gpus = detected
            else:
                count = cfg.gpu_count if cfg.gpu_count is not None else sum(detected.values())
                self.gpus = {cfg.gpu_type: count} if count else {}
            if not self.gpus:
                log.warning("art_ray_metrics: gpu_type=%r but no GPUs to charge", cfg.gpu_type)
        if not self.gpus:
            return None
        from art_ray_metrics.spend.gpu import gpus_cost_usd

        price = cfg.gpu_hourly_usd
        overrides = {t: price for t in self.gpus} if price is not None else None
        cost = gpus_cost_usd(wall_s, self.gpus, overrides)
        return float(cost) if cost is not None else None

    async def _wait_for(
        self, step: int, split: str, expect: int | list[str], timeout_s: float | None
    ) -> None:
        deadline = time.monotonic() + (timeout_s or self.config.barrier_timeout_s)
        while True:
            seen = self.state.producers_reported(step, split)
            ok = len(seen) >= expect if isinstance(expect, int) else set(expect) <= seen
            if ok:
                return
            if time.monotonic() >= deadline:
                self.health["barrier_timeouts"] += 1
                missing = (
                    expect - len(seen) if isinstance(expect, int) else sorted(set(expect) - seen)
                )
                log.warning(
                    "art_ray_metrics: step %s/%s closed without %s expected producers",
                    step,
                    split,
                    missing,
                )
                return
            await asyncio.sleep(0.01)

    async def _persist(self) -> None:
        """Checkpoint, then write the outbox to the history. Bounded; never raises."""
        assert self.persist_lock is not None
        async with self.persist_lock:
            if self.fenced:
                return
            state_blob, shards, token = self.state.checkpoint_parts()
            tombstones = {f: b for f, b in self.tombstones.items() if b}
            shards.update(tombstones)
            rewind_objects = dict(self.rewind_queue)
            meta = self.state.meta
            rewind_drop, history_drop = list(meta["rewind_drop"]), list(meta["history_drop"])
            wal_next = self.ckpt.wal_next
            covered, self.since_ckpt = self.since_ckpt, []
            outbox = list(meta["outbox"])
            try:
                for key, data in rewind_objects.items():  # before the commit that names them
                    await asyncio.to_thread(self.store.put, key, data)
                await asyncio.to_thread(
                    self.ckpt.commit, CheckpointParts(state_blob, shards), wal_next=wal_next
                )
            except FencedError as exc:
                self._fence(exc)
                return
            except StorageError as exc:
                self.since_ckpt[:0] = covered
                self.health["checkpoint_failures"] += 1
                self.health["last_storage_error"] = str(exc)[:300]
                log.warning("art_ray_metrics: checkpoint failed, will retry: %s", exc)
                return
            self.state.checkpoint_committed(token)
            for family, data in tombstones.items():
                self.tombstones[family] = self.tombstones[family][len(data) :]
            for key in rewind_objects:
                self.rewind_queue.pop(key, None)
            self.health["checkpoints"] += 1
            self._mark_durable(covered)
            done = set(covered)
            self.wal_queue = [item for item in self.wal_queue if (item[1], item[2]) not in done]
            await self._drop_objects(rewind_drop, history_drop)
            written = []
            for step, split, row, recorded_at in outbox:
                try:
                    await asyncio.to_thread(
                        self.history.write, step, split, row, datetime.fromisoformat(recorded_at)
                    )
                    written.append((step, split))
                except StorageError as exc:
                    self.health["history_failures"] += 1
                    self.health["last_storage_error"] = str(exc)[:300]
                    break
            if written:
                box = self.state.meta["outbox"]
                self.state.meta["outbox"] = [e for e in box if (e[0], e[1]) not in set(written)]

    async def _drop_objects(self, rewind_keys: list[str], history_rows: list[list[Any]]) -> None:
        """Delete rewind objects that left the window and history rows of discarded steps."""
        if not rewind_keys and not history_rows:
            return
        keys = list(rewind_keys) + [
            self.history.key_for(int(st), str(sp)) for st, sp in history_rows
        ]

        def delete() -> None:
            for key in keys:
                self.store.delete(key)

        try:
            await asyncio.to_thread(delete)
        except StorageError as exc:
            self.health["last_storage_error"] = str(exc)[:300]
            return  # retried after the next commit
        meta = self.state.meta
        meta["rewind_drop"] = [k for k in meta["rewind_drop"] if k not in set(rewind_keys)]
        done = {(int(st), str(sp)) for st, sp in history_rows}
        meta["history_drop"] = [
            e for e in meta["history_drop"] if (int(e[0]), str(e[1])) not in done
        ]

    # -- operations -------------------------------------------------------------------------

    def _gauges(self) -> dict[str, float]:
        now = time.monotonic()
        recent = sum(1 for t in self.ingest_times if now - t <= 10.0)
        p = K.TELEMETRY_PREFIX
        return {
            f"{p}ingest_batches_per_s": recent / 10.0,
            f"{p}wal_queue": float(len(self.wal_queue)),
            f"{p}inflight_durable_calls": float(self.inflight),
            f"{p}checkpoint_failures": float(self.health["checkpoint_failures"]),
            f"{p}restarts": float(self.state.meta.get("restarts", 0)),
        }

    async def stats(self) -> dict[str, Any]:
        """Counters, rates, queue depths, storage and W&B health."""
        return {
            "name": self.config.name,
            "namespace": self.config.namespace,
            "run_name": self.config.run_name,
            "storage_uri": self.store.uri,
            "epoch": self.ckpt.epoch,
            "fenced": self.fenced,
            "counters": dict(self.state.counters),
            "conflicts_by_key": dict(self.state.conflict_names),
            "pending_steps": sorted([s, sc] for s, sc in self.state.pending),
            "last_closed": dict(self.state.last_closed),
            "producers": len(self.state.producers),
            "gauges": self._gauges(),
            "health": dict(self.health),
            "wandb": self.wandb.stats() if self.wandb is not None else None,
            "wandb_run_id": self.state.meta.get("wandb_run_id"),
            "unique_scenarios": len(self.state.cum.scenarios),
            "rewound": dict(self.state.meta["rewound"]),
            "cum": {k: float(v) for k, v in self.state.cum.values.items()},
            "uptime_s": time.time() - self.started_at,
            "pid": os.getpid(),
            "node_id": _node_id(),
        }

    async def checkpoint(self) -> dict[str, Any]:
        """Commit a checkpoint now (and flush the WAL and the history outbox)."""
        self._ensure_tasks()
        await self._write_wal()
        await self._persist()
        return {"checkpoints": self.health["checkpoints"], "fenced": self.fenced}

    async def config_fingerprint(self) -> str:
        """The hash of the configuration this actor runs with."""
        return self.config.fingerprint()

    async def shutdown(self, exit_code: int = 0) -> None:
        """Final checkpoint and W&B finish; call before ``ray.kill``."""
        self._ensure_tasks()
        last = max((int(v[0]) for v in self.state.meta["last_rows"].values()), default=-1)
        self.state.meta["wandb_finished_upto"] = last
        await self.checkpoint()
        if self.wandb is not None:
            await asyncio.to_thread(self.wandb.close, exit_code)


def _node_id() -> str | None:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return None


class AggregatorHandle:
    """The trainer's handle on the aggregator actor."""

    def __init__(self, actor: Any, config: AggregatorConfig) -> None:
        self.actor = actor
        self.config = config

    def log(
        self,
        step: int,
        split: str = "train",
        metrics: Mapping[str, float] | None = None,
        *,
        expect_producers: int | list[str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, float]:
        """The step barrier: close ``(step, split)``, merge ``metrics``, return the logged row.

        ``expect_producers`` waits (up to ``timeout_s``) until that many producers, or that set
        of producer ids, reported for the step. Retried on an actor restart; a retried call for
        the step just closed returns the same row. Invalid ``metrics`` raise
        :class:`~art_ray_metrics.errors.InvalidMetricError`.
        """
        row: dict[str, float] = self._call(
            "log", step, split, dict(metrics or {}), expect_producers, timeout_s
        )
        return row

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """Call a remote method; retry while the actor restarts (about 50 s at most)."""
        import ray

        attempts = 0
        while True:
            try:
                return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                attempts += 1
                if attempts > 30:
                    raise
                time.sleep(min(0.2 * attempts, 2.0))

    async def alog(
        self,
        step: int,
        split: str = "train",
        metrics: Mapping[str, float] | None = None,
        *,
        expect_producers: int | list[str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, float]:
        """:meth:`log` for asyncio trainers."""
        return await asyncio.to_thread(
            self.log, step, split, metrics, expect_producers=expect_producers, timeout_s=timeout_s
        )

    def rewind(self, step: int) -> dict[str, Any]:
        """The trainer restored its checkpoint of ``step``: discard every step closed after it.

        Call it after restoring the trainer's checkpoint and before rollouts of the next step
        start. Cumulative values, unique ids and the history go back to right after ``step``
        (``-1``: before the first step), so the rows that follow equal those of a run without
        the failure. Returns ``{"discarded_steps", "discarded_buffers", "costs_usd"}``.

        Raises:
            InvalidMetricError: ``step`` is older than the ``rewind_window`` closes kept.
        """
        out: dict[str, Any] = self._call("rewind", step)
        return out

    def stats(self) -> dict[str, Any]:
        """The actor's :meth:`MetricsAggregator.stats` (retried while the actor restarts)."""
        out: dict[str, Any] = self._call("stats")
        return out

    def checkpoint(self) -> dict[str, Any]:
        """Commit a checkpoint now (retried while the actor restarts)."""
        out: dict[str, Any] = self._call("checkpoint")
        return out

    def shutdown(self, exit_code: int = 0, *, kill: bool = True) -> None:
        """Final checkpoint, finish W&B, then kill the detached actor (frees the name)."""
        import ray

        try:
            self._call("shutdown", exit_code, timeout_s=120)
        finally:
            if kill:
                ray.kill(self.actor, no_restart=True)


def _runtime_env() -> dict[str, Any]:
    env = {k: os.environ[k] for k in CREDENTIAL_ENV if k in os.environ}
    return {"env_vars": env} if env else {}


def start_aggregator(config: AggregatorConfig | None = None, **fields: Any) -> AggregatorHandle:
    """Get or create the named aggregator actor (run by the trainer/driver).

    ``fields`` override ``config`` fields. Initialises Ray locally if needed. An actor of that
    name already running with a different configuration raises
    :class:`~art_ray_metrics.errors.ConfigMismatchError` instead of being reused silently.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    base = config or AggregatorConfig()
    cfg = AggregatorConfig.model_validate({**base.model_dump(), **fields}).resolved()
    if not ray.is_initialized():
        ray.init(namespace=cfg.namespace)
    fingerprint = cfg.fingerprint()

    def attach() -> AggregatorHandle | None:
        try:
            actor = ray.get_actor(cfg.name, namespace=cfg.namespace)
        except ValueError:
            return None
        running: str = ray.get(actor.config_fingerprint.remote())  # type: ignore[assignment]
        if running != fingerprint:
            raise ConfigMismatchError(
                f"An aggregator named {cfg.name!r} (namespace {cfg.namespace!r}) already runs with "
                f"a different configuration (fingerprint {running} != {fingerprint}); shut it "
                "down first (AggregatorHandle.shutdown or ray.kill) or use another name"
            )
        return AggregatorHandle(actor, cfg)

    handle = attach()
    if handle is not None:
        return handle
    options: dict[str, Any] = {
        "name": cfg.name,
        "namespace": cfg.namespace,
        "lifetime": "detached",
        "max_restarts": cfg.max_restarts,
        "max_task_retries": 0,
        "num_cpus": 0,
        "max_concurrency": 1000,
        "runtime_env": _runtime_env(),
    }
    if cfg.actor_resources:
        options["resources"] = dict(cfg.actor_resources)
    if cfg.on_driver_node and not cfg.actor_resources:
        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
    try:
        actor: Any = ray.remote(MetricsAggregator).options(**options).remote(cfg.model_dump_json())
    except ValueError:  # created concurrently by another driver
        handle = attach()
        if handle is None:
            raise
        return handle
    ray.get(actor.config_fingerprint.remote())  # wait until restored and ready
    return AggregatorHandle(actor, cfg)
