"""The write-ahead log's writer: the queue and group commit of applied batches, and the fence.

Taken out of the actor, which only schedules it (:mod:`art_ray_metrics.distributed.actor`). It
runs on one asyncio event loop with the storage calls in threads and does not know Ray. The
:class:`~art_ray_metrics.durable.commit.Committer` takes what a checkpoint covers from it and
hands that back durable (or uncovered, when the checkpoint failed).

- :class:`WalWriter` queues applied (and refused) batches and appends them to the write-ahead
  log. A write takes everything queued; batches that arrive while it is in flight go out
  together in the next one (group commit), and each write resolves the future of its
  generation, which durable ingests wait on. It moves the durable side of the state's producer
  windows (which seqs are in the log or a checkpoint, ``core/ingest.py``): an acknowledgement's
  ``durable`` and ``durable_upto``.
- :class:`Fence`: once the storage says a newer aggregator owns the run, every writer stops.

The protocol and its failure semantics are described in ``docs/design.md``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from art_ray_metrics.core.ingest import ProducerKey, ProducerWindows
from art_ray_metrics.core.meta import Health
from art_ray_metrics.core.records import IngestResult
from art_ray_metrics.core.replies import IngestAck
from art_ray_metrics.core.wire import batch_identity
from art_ray_metrics.durable.checkpoint import CheckpointManager
from art_ray_metrics.durable.restore import GrantEntry, WalDecision, encode_wal_record
from art_ray_metrics.errors import FencedError, StorageError

__all__ = ["Fence", "Observe", "QueuedBatch", "WalWriter"]

log = logging.getLogger(__name__)

QueuedBatch = tuple[bytes, ProducerKey, int, WalDecision]
"""(batch bytes, producer, seq, decision: None when applied whole, else see ``WalDecision``)."""

Observe = Callable[[str, float], None]
"""Records one latency by histogram name (the actor's Ray telemetry)."""


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
