"""Commit: the aggregator's write-ahead log (group commit) and the persist order of a checkpoint.

Taken out of the actor, which only schedules them (:mod:`art_ray_metrics.distributed.actor`).
Both run on one asyncio event loop with the storage calls in threads; neither knows Ray.

- :class:`WalWriter` queues applied (and refused) batches and appends them to the write-ahead
  log. A write takes everything queued; batches that arrive while it is in flight go out
  together in the next one (group commit), and each write resolves the future of its
  generation, which durable ingests wait on. It moves the durable side of the state's producer
  windows (which seqs are in the log or a checkpoint, ``core/ingest.py``): an acknowledgement's
  ``durable`` and ``durable_upto``.
- :class:`Committer` writes a checkpoint in the persist order: the checkpoint with the rewind
  objects it names (those before its manifest, its pointer fenced and last), then the deletions
  it allows, then the history rows of its outbox; pruning old objects runs after, off the
  caller's path, on stores that take concurrent writes. A failure keeps what was not written
  for the next attempt.
- :class:`Fence`: once the storage says a newer aggregator owns the run, every writer stops.

The protocol and its failure semantics are described in ``docs/design.md``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from art_ray_metrics.core import rewind as R
from art_ray_metrics.core.ingest import ProducerKey, ProducerWindows
from art_ray_metrics.core.meta import Health, OutboxEntry
from art_ray_metrics.core.records import IngestResult
from art_ray_metrics.core.replies import IngestAck
from art_ray_metrics.core.rewind import TOMBSTONES
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.core.wire import batch_identity
from art_ray_metrics.durable.checkpoint import CheckpointManager, CheckpointParts
from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.restore import GrantEntry, WalDecision, encode_wal_record
from art_ray_metrics.durable.storage import ObjectStore
from art_ray_metrics.errors import (
    FencedError,
    InvalidMetricError,
    StorageError,
    WireFormatError,
)

__all__ = ["Committer", "Fence", "QueuedBatch", "WalWriter", "WriteRow"]

log = logging.getLogger(__name__)

QueuedBatch = tuple[bytes, ProducerKey, int, WalDecision]
"""(batch bytes, producer, seq, decision: None when applied whole, else see ``WalDecision``)."""

Observe = Callable[[str, float], None]
"""Records one latency by histogram name (the actor's Ray telemetry)."""


WriteRow = Callable[..., None]
"""The durable sink's ``log`` (``export.sink.HistorySink.log``), called as
``write_row(row, step=..., split=..., recorded_at=...)``; raises ``StorageError``,
``FencedError`` or ``InvalidMetricError`` when the row was not stored."""


class Fence:
    """Whether a newer aggregator owns the storage; once tripped, every writer stops.

    ``reason`` is the error's text (``stats()["fenced"]``). Listeners run at every trip (they
    are idempotent): the WAL writer drops its queue, the actor stops W&B.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._listeners: list[Callable[[], None]] = []

    def __bool__(self) -> bool:
        return self.reason is not None

    def listen(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever the fence trips."""
        self._listeners.append(listener)

    def trip(self, exc: FencedError) -> None:
        """A newer aggregator owns the storage: stop every write."""
        if not self.reason:
            log.error("art_ray_metrics: %s", exc)
        self.reason = str(exc)
        for listener in self._listeners:
            listener()


class WalWriter:
    """The write-ahead log's queue and group commit; moves the producers' durable windows.

    Args:
        ckpt: The checkpoint manager whose log is appended to.
        health: The actor's health counters (writes, failures, last storage error).
        fence: Trips on a fenced append; the queue is dropped then.
        windows: The state's producer windows, whose durable side this writer moves.
        max_queue_bytes: Above this, :meth:`full` tells ingest to push back.
        observe: Records ``wal_commit_seconds``.

    Call :meth:`start` on the event loop before the first write.
    """

    def __init__(
        self,
        ckpt: CheckpointManager,
        health: Health,
        fence: Fence,
        windows: ProducerWindows,
        *,
        max_queue_bytes: int,
        observe: Observe,
    ) -> None:
        self.ckpt = ckpt
        self.health = health
        self.fence = fence
        self.max_queue_bytes = max_queue_bytes
        self.observe = observe
        self.windows = windows
        self.queue: list[QueuedBatch] = []
        self.queue_bytes = 0
        self.since_ckpt: list[tuple[ProducerKey, int]] = []  # logged since the last checkpoint
        # group commit: batches queued while a write is in flight go out together in the next
        # one; each write resolves the future of its generation
        self.gen = 0
        self.done: dict[int, asyncio.Future[None]] = {}
        self.wake: asyncio.Event | None = None
        self.lock: asyncio.Lock | None = None
        self.inflight = 0  # durable calls waiting for a write
        self.grants: list[GrantEntry] = []  # run-budget grants to log (before their answer)
        self.grants_durable = 0  # the newest grant seq a write logged
        fence.listen(self.clear)

    def start(self) -> None:
        """Create the loop's primitives (on the running event loop)."""
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()

    # -- queueing ---------------------------------------------------------------------------

    def full(self, size: int) -> bool:
        """A batch of ``size`` bytes would overflow the queue (an empty queue takes any)."""
        return self.queue_bytes + size > self.max_queue_bytes and bool(self.queue)

    def log_refused(self, data: bytes, decision: WalDecision) -> tuple[ProducerKey, int] | None:
        """Queue a malformed batch as refused, so a replay refuses it again whatever the
        limits of the restarted aggregator; its ``(producer, seq)`` (None: no identity)."""
        ident = batch_identity(data)
        if ident is None:
            return None
        key = (ident[0], ident[1])
        self.queue.append((data, key, ident[2], decision))
        self.queue_bytes += len(data)
        self.since_ckpt.append((key, ident[2]))
        return key, ident[2]

    def log_applied(self, data: bytes, result: IngestResult) -> None:
        """Queue a batch the state answered (not a copy its retired window settled)."""
        key = (result.producer_id, result.incarnation)
        if not result.duplicate:
            decided = (result.limit, result.refused) if result.refused else None
            self.queue.append((data, key, result.seq, decided))
            self.queue_bytes += len(data)
            self.since_ckpt.append((key, result.seq))
            self.windows.logged(key, result.seq, result.acked_upto)

    def log_grant(self, grant: GrantEntry) -> None:
        """Queue a run-budget grant; the aggregator answers it once :meth:`await_grant`
        returns (so a restart replays every grant a producer may hold)."""
        self.grants.append(grant)

    async def await_grant(self, seq: int) -> bool:
        """Wait until grant ``seq`` is in the log (or a write that should have logged it
        failed, or the writer is fenced). Returns whether it is logged."""
        for _ in range(2):  # the write in flight may predate the grant: then the next one
            if self.grants_durable >= seq or self.fence:
                break
            self.inflight += 1
            try:
                await asyncio.shield(self._future())
            finally:
                self.inflight -= 1
        return self.grants_durable >= seq

    def ack(self, result: IngestResult) -> IngestAck:
        """The answer to a batch, with what its producer's durable window says now."""
        key = (result.producer_id, result.incarnation)
        return IngestAck(
            producer_id=result.producer_id,
            seq=result.seq,
            duplicate=result.duplicate,
            durable=self.windows.durable_seen(key, result.seq),
            durable_upto=self.windows.durable_upto(key),
            late_leaves=result.late_leaves,
            conflicts=result.conflicts,
            refused=result.refused,
        )

    def count_bytes(self) -> None:
        self.queue_bytes = sum(len(item[0]) for item in self.queue)

    def clear(self) -> None:
        """Drop the queue (fenced: nothing more is written)."""
        self.queue.clear()
        self.grants.clear()
        self.queue_bytes = 0

    # -- durability -------------------------------------------------------------------------

    async def await_durable(self, key: ProducerKey, seq: int) -> None:
        """Wait until ``seq`` is durable or a write that should have covered it failed."""
        for _ in range(2):  # the write in flight may predate the batch: then the next one
            if self.windows.durable_seen(key, seq) or self.fence:
                return
            self.inflight += 1
            try:
                await asyncio.shield(self._future())
            finally:
                self.inflight -= 1

    def _future(self) -> asyncio.Future[None]:
        """The future of the next write (the one that will take what is queued now)."""
        fut = self.done.get(self.gen)
        if fut is None:
            fut = self.done[self.gen] = asyncio.get_running_loop().create_future()
        assert self.wake is not None
        self.wake.set()
        return fut

    def mark_durable(self, items: list[tuple[ProducerKey, int]]) -> None:
        self.windows.made_durable(items)

    def take_covered(self) -> list[tuple[ProducerKey, int]]:
        """What a checkpoint taken now covers (given back with :meth:`uncovered` if it fails)."""
        covered, self.since_ckpt = self.since_ckpt, []
        return covered

    def uncovered(self, covered: list[tuple[ProducerKey, int]]) -> None:
        """A checkpoint failed: what it covered waits for the next one."""
        self.since_ckpt[:0] = covered

    def checkpointed(self, covered: list[tuple[ProducerKey, int]]) -> None:
        """A checkpoint holds ``covered``: durable, and no longer queued for the log."""
        self.mark_durable(covered)
        done = set(covered)
        self.queue = [item for item in self.queue if (item[1], item[2]) not in done]
        self.count_bytes()

    # -- writing ----------------------------------------------------------------------------

    async def write(self) -> None:
        """Append everything queued as one record; resolve the futures of this generation."""
        assert self.lock is not None
        async with self.lock:
            gen = self.gen
            self.gen += 1  # batches arriving during this write wait for the next one
            try:
                await self._write_locked()
            finally:
                fut = self.done.pop(gen, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def _write_locked(self) -> None:
        if not (self.queue or self.grants) or self.fence:
            return
        batch, self.queue = self.queue, []
        grants, self.grants = self.grants, []
        self.queue_bytes = 0
        record = encode_wal_record([(d, refused) for d, _, _, refused in batch], grants)
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.ckpt.append_wal, record)
        except FencedError as exc:
            self.fence.trip(exc)
            return
        except StorageError as exc:
            self.queue[:0] = batch  # keep for the next attempt or the next checkpoint
            self.grants[:0] = grants
            self.count_bytes()
            self.health.wal_failures += 1
            self.health.storage_failed(exc)
            return
        self.health.wal_writes += 1
        self.observe("wal_commit_seconds", time.monotonic() - started)
        if grants:
            self.grants_durable = max(self.grants_durable, max(g[3] for g in grants))
        self.mark_durable([(p, s) for _, p, s, _ in batch])

    async def run(self, interval_s: float, tick: Callable[[], None]) -> None:
        """Write at once when woken by a durable ingest; else every ``interval_s`` (calling
        ``tick`` at each wake-up)."""
        assert self.wake is not None
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), interval_s)
            except TimeoutError:
                pass
            self.wake.clear()
            tick()
            if self.queue or self.grants or self.done:
                await self.write()


@dataclass(slots=True)
class _Snapshot:
    """What one checkpoint writes, taken in one synchronous stretch."""

    parts: CheckpointParts
    token: tuple[int, int]
    tombstones: dict[str, bytes]
    rewind_objects: dict[str, bytes]
    rewind_drop: list[str]
    history_drop: list[tuple[int, str]]
    wal_next: int
    covered: list[tuple[ProducerKey, int]]
    outbox: list[OutboxEntry]


class Committer:
    """Checkpoints in the persist order, and the rewind objects and tombstones they name.

    Args:
        store: The run's object store (rewind objects).
        ckpt: The checkpoint manager (fenced commits).
        history: The JSONL history (rows of discarded steps are marked there).
        write_row: Writes one outbox row to the durable sink (the history's).
        state: The aggregator's state (checkpointed, its outbox emptied).
        wal: The WAL writer (what a checkpoint covers becomes durable).
        health: The actor's health counters.
        fence: Trips on a fenced write.
        observe: Records ``checkpoint_commit_seconds``.

    Call :meth:`start` on the event loop before the first :meth:`persist`.
    """

    def __init__(
        self,
        store: ObjectStore,
        ckpt: CheckpointManager,
        history: HistoryStore,
        write_row: WriteRow,
        state: AggregatorState,
        wal: WalWriter,
        health: Health,
        fence: Fence,
        observe: Observe,
    ) -> None:
        self.store = store
        self.ckpt = ckpt
        self.history = history
        self.write_row = write_row
        self.state = state
        self.wal = wal
        self.health = health
        self.fence = fence
        self.observe = observe
        self.rewind_queue: dict[str, bytes] = {}  # rewind objects not yet written
        self.tombstones: dict[str, bytes] = dict.fromkeys(TOMBSTONES.values(), b"")
        self.lock: asyncio.Lock | None = None
        self.pruning: asyncio.Task[None] | None = None  # a deferred pruning in a thread

    def start(self) -> None:
        """Create the loop's primitives (on the running event loop)."""
        self.lock = asyncio.Lock()

    # -- rewind objects ---------------------------------------------------------------------

    def forget_rewind_objects(self, keys: Iterable[str]) -> None:
        """Unqueue rewind objects not written yet; delete the others after the next commit."""
        for key in keys:
            if self.rewind_queue.pop(key, None) is None:
                self.state.meta.rewind_drop.append(key)

    def read_rewind(self, key: str) -> R.RewindRecord:
        """One rewind object, from the queue or the store (runs in a thread)."""
        data = self.rewind_queue.get(key)
        if data is None:
            data = self.store.get(key)
        try:
            return R.decode_record(data)
        except WireFormatError as exc:
            raise StorageError(f"Unreadable rewind object at {key!r}: {exc}") from exc

    # -- the persist order ------------------------------------------------------------------

    async def persist(self) -> None:
        """Checkpoint, then write the outbox to the history. Bounded; never raises."""
        assert self.lock is not None
        async with self.lock:
            if self.fence:
                return
            snap = self._snapshot()
            if not await self._commit(snap):
                return
            self._committed(snap)
            await self._drop_objects(snap.rewind_drop, snap.history_drop)
            await self._write_history(snap.outbox)
            if self.ckpt.prune_due and (self.pruning is None or self.pruning.done()):
                # garbage collection: never on a barrier's path (see prune_deferred)
                self.pruning = asyncio.get_running_loop().create_task(self._prune())

    async def settled(self) -> None:
        """Wait for a deferred pruning still running (an explicit checkpoint, a shutdown)."""
        if self.pruning is not None:
            await self.pruning

    async def _prune(self) -> None:
        try:
            await asyncio.to_thread(self.ckpt.prune_deferred)
        except Exception as exc:  # it logs and never raises; a surprise must not go unseen
            log.warning("art_ray_metrics: pruning old checkpoint objects failed: %r", exc)

    def _snapshot(self) -> _Snapshot:
        state_blob, shards, token = self.state.checkpoint_parts()
        tombstones = {f: b for f, b in self.tombstones.items() if b}
        shards.update(tombstones)
        meta = self.state.meta
        return _Snapshot(
            parts=CheckpointParts(state_blob, shards),
            token=token,
            tombstones=tombstones,
            rewind_objects=dict(self.rewind_queue),
            rewind_drop=list(meta.rewind_drop),
            history_drop=list(meta.history_drop),
            wal_next=self.ckpt.wal_next,
            covered=self.wal.take_covered(),
            outbox=list(meta.outbox),
        )

    async def _commit(self, snap: _Snapshot) -> bool:
        """The checkpoint with the rewind objects it names (written before its manifest, see
        ``CheckpointManager.commit``); False if it did not commit."""
        try:
            started = time.monotonic()  # the rewind objects go before the manifest naming them
            await asyncio.to_thread(
                self.ckpt.commit,
                snap.parts,
                wal_next=snap.wal_next,
                named=snap.rewind_objects,
                defer_prune=True,
            )
            self.observe("checkpoint_commit_seconds", time.monotonic() - started)
        except FencedError as exc:
            self.fence.trip(exc)
            return False
        except StorageError as exc:
            self.wal.uncovered(snap.covered)
            self.health.checkpoint_failures += 1
            self.health.storage_failed(exc)
            log.warning("art_ray_metrics: checkpoint failed, will retry: %s", exc)
            return False
        return True

    def _committed(self, snap: _Snapshot) -> None:
        self.state.checkpoint_committed(snap.token)
        for family, data in snap.tombstones.items():
            self.tombstones[family] = self.tombstones[family][len(data) :]
        for key in snap.rewind_objects:
            self.rewind_queue.pop(key, None)
        self.health.checkpoints += 1
        self.wal.checkpointed(snap.covered)

    async def _write_history(self, outbox: list[OutboxEntry]) -> None:
        """The committed rows, in order, until a storage failure (retried at the next one)."""
        written = []
        for entry in outbox:
            try:
                await asyncio.to_thread(
                    self.write_row,
                    entry.row,
                    step=entry.step,
                    split=entry.split,
                    recorded_at=datetime.fromisoformat(entry.recorded_at),
                )
                written.append((entry.step, entry.split))
            except InvalidMetricError as exc:  # cannot happen for our rows; never blocks
                self.health.history_rejected += 1
                log.error(
                    "art_ray_metrics: history refused row %s/%s: %s",
                    entry.step,
                    entry.split,
                    exc,
                )
                written.append((entry.step, entry.split))
            except FencedError as exc:
                self.fence.trip(exc)
                return
            except StorageError as exc:
                self.health.history_failures += 1
                self.health.storage_failed(exc)
                break
        if written:
            box = self.state.meta.outbox
            self.state.meta.outbox = [e for e in box if (e.step, e.split) not in set(written)]

    async def _drop_objects(
        self, rewind_keys: list[str], history_rows: list[tuple[int, str]]
    ) -> None:
        """Delete rewind objects that left the window; mark history rows of discarded steps.

        Both are safe from a stale aggregator: the rewind objects were dropped by a commit that
        succeeded, so any newer aggregator restored that commit and dropped them too; history
        rows are replaced by a fenced marker (a plain delete could remove a newer row).
        """
        if not rewind_keys and not history_rows:
            return
        epoch = self.ckpt.epoch

        def delete() -> None:
            for key in rewind_keys:
                self.store.delete(key)
            for st, sp in history_rows:
                self.history.discard(st, sp, epoch=epoch)

        try:
            await asyncio.to_thread(delete)
        except FencedError as exc:
            self.fence.trip(exc)
            return
        except StorageError as exc:
            self.health.storage_failed(exc)
            return  # retried after the next commit
        meta = self.state.meta
        meta.rewind_drop = [k for k in meta.rewind_drop if k not in set(rewind_keys)]
        done = set(history_rows)
        meta.history_drop = [e for e in meta.history_drop if e not in done]

    async def run(self, interval_s: float) -> None:
        """Checkpoint every ``interval_s`` when something was logged or a row is unwritten."""
        while True:
            await asyncio.sleep(interval_s)
            if self.wal.since_ckpt or self.state.meta.outbox:
                await self.persist()
