"""Commit: the persist order of a checkpoint, its rewind objects and its history rows.

Taken out of the actor, which only schedules it (:mod:`art_ray_metrics.distributed.actor`).
It runs on one asyncio event loop with the storage calls in threads and does not know Ray. The
write-ahead log's queue and group commit, and the fence every writer stops at, are in
:mod:`art_ray_metrics.durable.wal_writer`.

- :class:`Committer` writes a checkpoint in the persist order: the checkpoint with the rewind
  objects it names (those before its manifest, its pointer fenced and last), then the deletions
  it allows, then the history rows of its outbox; pruning old objects runs after, off the
  caller's path, on stores that take concurrent writes. A failure keeps what was not written
  for the next attempt. What a checkpoint covers comes from the
  :class:`~art_ray_metrics.durable.wal_writer.WalWriter`, which counts it durable once the
  checkpoint commits (and takes it back if it fails).

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
from art_ray_metrics.core.ingest import ProducerKey
from art_ray_metrics.core.meta import Health, OutboxEntry
from art_ray_metrics.core.rewind import TOMBSTONES
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.durable.checkpoint import CheckpointManager, CheckpointParts
from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.storage import ObjectStore
from art_ray_metrics.durable.wal_writer import Fence, Observe, WalWriter
from art_ray_metrics.errors import (
    FencedError,
    InvalidMetricError,
    StorageError,
    WireFormatError,
)

__all__ = ["Committer", "WriteRow"]

log = logging.getLogger(__name__)

WriteRow = Callable[..., None]
"""The durable sink's ``log`` (``export.sink.HistorySink.log``), called as
``write_row(row, step=..., split=..., recorded_at=...)``; raises ``StorageError``,
``FencedError`` or ``InvalidMetricError`` when the row was not stored."""


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
