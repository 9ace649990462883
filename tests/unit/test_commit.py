"""The commit stage on its own: the WAL writer's group commit and the committer's persist order,
on in-memory storage and a real state, without the actor or Ray."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from art_ray_metrics.core.meta import Health, OutboxEntry
from art_ray_metrics.core.records import IngestResult
from art_ray_metrics.core.replies import IngestAck
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.durable.checkpoint import CheckpointManager
from art_ray_metrics.durable.commit import Committer
from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.restore import REFUSED_INVALID, rebuild_state
from art_ray_metrics.durable.storage import InMemoryStore
from art_ray_metrics.durable.wal_writer import Fence, WalWriter
from art_ray_metrics.errors import FencedError, StorageError
from art_ray_metrics.export.sink import HistorySink
from art_ray_metrics.testing import make_batch


class FakeLog:
    """Stands in for the checkpoint manager's ``append_wal``: records, blocks or fails."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.fail: BaseException | None = None
        self.gate: threading.Event | None = None  # set: the append may finish

    def append_wal(self, record: bytes) -> None:
        if self.gate is not None:
            self.gate.wait(5.0)
        if self.fail is not None:
            raise self.fail
        self.records.append(record)


def _writer(
    log: Any, state: AggregatorState, *, max_queue_bytes: int = 10**6
) -> tuple[WalWriter, Health, Fence, list[str]]:
    health, fence, observed = Health(), Fence(), []
    wal = WalWriter(
        log,
        health,
        fence,
        state.producers,
        max_queue_bytes=max_queue_bytes,
        observe=lambda name, _s: observed.append(name),
    )
    return wal, health, fence, observed


def _applied(state: AggregatorState, seq: int, producer: str = "w") -> tuple[bytes, IngestResult]:
    data = encode_batch(make_batch(producer, seq, 0, leaves={"reward/x": 1.0}))
    return data, state.ingest_bytes(data)


def _run(body: Callable[[], Any]) -> Any:
    return asyncio.run(body())


class TestWalWriter:
    def test_ingests_that_arrive_during_a_write_go_out_together_in_the_next(self) -> None:
        """Group commit: one write in flight, three more durable ingests: two records in all."""
        log = FakeLog()
        state = AggregatorState()
        wal, health, _, observed = _writer(log, state)

        async def body() -> list[IngestAck]:
            wal.start()
            writer = asyncio.create_task(wal.run(3600.0, lambda: None))
            results = []
            data, first = _applied(state, 1)
            wal.log_applied(data, first)
            log.gate = threading.Event()
            waiting = [asyncio.create_task(wal.await_durable(("w", first.incarnation), 1))]
            await asyncio.sleep(0.05)  # the first write is in flight, blocked
            for seq in (2, 3, 4):
                data, result = _applied(state, seq)
                wal.log_applied(data, result)
                results.append(result)
                waiting.append(
                    asyncio.create_task(wal.await_durable(("w", result.incarnation), seq))
                )
            log.gate.set()
            await asyncio.wait_for(asyncio.gather(*waiting), 5.0)
            writer.cancel()
            return [wal.ack(r) for r in [first, *results]]

        acks = _run(body)
        assert len(log.records) == 2  # the first alone, then 2, 3 and 4 together
        assert health.wal_writes == 2
        assert observed == ["wal_commit_seconds"] * 2
        assert all(a.durable for a in acks)
        assert acks[-1].durable_upto == 4
        assert wal.queue == []
        assert wal.queue_bytes == 0

    def test_a_failed_append_keeps_the_queue_and_nothing_is_durable(self) -> None:
        log = FakeLog()
        state = AggregatorState()
        wal, health, _, _ = _writer(log, state)
        data, result = _applied(state, 1)

        async def body() -> tuple[bool, bool]:
            wal.start()
            wal.log_applied(data, result)
            log.fail = StorageError("bucket unreachable")
            await wal.write()
            before = wal.ack(result).durable
            log.fail = None
            await wal.write()
            return before, wal.ack(result).durable

        before, after = _run(body)
        assert (before, after) == (False, True)
        assert health.wal_failures == 1
        assert health.last_storage_error == "bucket unreachable"
        assert len(log.records) == 1  # the kept batch, written once storage came back

    def test_fenced_append_drops_the_queue_and_wakes_the_waiters(self) -> None:
        log = FakeLog()
        state = AggregatorState()
        wal, _, fence, _ = _writer(log, state)
        tripped: list[bool] = []
        fence.listen(lambda: tripped.append(True))
        data, result = _applied(state, 1)
        log.fail = FencedError("a newer writer owns the run")

        async def body() -> None:
            wal.start()
            writer = asyncio.create_task(wal.run(3600.0, lambda: None))
            wal.log_applied(data, result)
            await asyncio.wait_for(wal.await_durable(("w", result.incarnation), 1), 5.0)
            writer.cancel()

        _run(body)
        assert fence.reason == "a newer writer owns the run"
        assert tripped == [True]
        assert wal.queue == []
        assert wal.queue_bytes == 0
        assert not wal.ack(result).durable

    def test_full_only_with_something_queued(self) -> None:
        state = AggregatorState()
        wal, _, _, _ = _writer(FakeLog(), state, max_queue_bytes=10)
        data, result = _applied(state, 1)
        assert not wal.full(len(data))  # an empty queue takes any batch
        wal.log_applied(data, result)
        assert wal.queue_bytes == len(data)
        assert wal.full(1)

    def test_a_duplicate_is_not_queued_again(self) -> None:
        state = AggregatorState()
        wal, _, _, _ = _writer(FakeLog(), state)
        data, result = _applied(state, 1)
        wal.log_applied(data, result)
        again = state.ingest_bytes(data)
        assert again.duplicate
        wal.log_applied(data, again)
        assert len(wal.queue) == 1
        assert wal.take_covered() == [(("w", result.incarnation), 1)]

    def test_a_malformed_batch_with_an_identity_is_logged_refused(self) -> None:
        wal, _, _, _ = _writer(FakeLog(), AggregatorState())
        data = encode_batch(make_batch("w", 7, 0, leaves={"reward/x": 1.0}))
        logged = wal.log_refused(data, REFUSED_INVALID)
        assert logged is not None
        assert logged[1] == 7
        assert wal.queue[0][3] == REFUSED_INVALID
        assert wal.log_refused(b"not msgpack at all", REFUSED_INVALID) is None


class Recorder(InMemoryStore):
    """An in-memory store that records the order of writes and can fail them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.fail_prefix: str | None = None

    def _write(self, key: str) -> None:
        if self.fail_prefix is not None and key.startswith(self.fail_prefix):
            raise StorageError(f"put {key} failed")
        self.writes.append(key)

    def put(self, key: str, data: bytes) -> str:
        self._write(key)
        return super().put(key, data)

    def put_if_absent(self, key: str, data: bytes) -> str:
        self._write(key)
        return super().put_if_absent(key, data)

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        self._write(key)
        return super().put_if_version(key, data, version)


def _committer(store: InMemoryStore) -> tuple[Committer, WalWriter, AggregatorState, Health]:
    ckpt = CheckpointManager(store)
    ckpt.acquire()
    state, health, fence = AggregatorState(), Health(), Fence()
    wal = WalWriter(
        ckpt, health, fence, state.producers, max_queue_bytes=10**6, observe=lambda *_: None
    )
    history = HistoryStore(store)
    rows = HistorySink(history, epoch=lambda: ckpt.epoch)
    committer = Committer(
        store, ckpt, history, rows.log, state, wal, health, fence, lambda *_: None
    )
    return committer, wal, state, health


class TestCommitter:
    def test_persist_order_rewind_objects_then_checkpoint_then_history(self) -> None:
        store = Recorder()
        committer, wal, state, health = _committer(store)
        data, result = _applied(state, 1)
        wal.log_applied(data, result)
        row = state.close_step(0, "train", {}).row
        state.meta.outbox.append(OutboxEntry(0, "train", row, "2026-01-01T00:00:00+00:00"))
        committer.rewind_queue["rewind/obj-1"] = b"state after close 1"

        async def body() -> None:
            committer.start()
            store.writes.clear()
            await committer.persist()

        _run(body)
        rewind = store.writes.index("rewind/obj-1")
        history = next(i for i, k in enumerate(store.writes) if k.startswith("history/"))
        commit = [i for i, k in enumerate(store.writes) if rewind < i < history]
        assert commit, store.writes  # the checkpoint's objects between the two
        assert health.checkpoints == 1
        assert committer.rewind_queue == {}
        assert state.meta.outbox == []
        assert wal.ack(result).durable  # covered by the checkpoint
        assert wal.queue == []
        assert wal.since_ckpt == []
        assert [r["step"] for r in committer.history.read()] == [0]
        restored, _ = rebuild_state(CheckpointManager(store).load_latest())  # type: ignore[arg-type]
        assert restored.counters["rows"] == 1

    def test_a_failed_commit_gives_back_what_it_covered(self) -> None:
        store = Recorder()
        committer, wal, state, health = _committer(store)
        data, result = _applied(state, 1)
        wal.log_applied(data, result)
        committer.rewind_queue["rewind/obj-1"] = b"x"
        store.fail_prefix = "rewind/"

        async def body() -> None:
            committer.start()
            await committer.persist()

        _run(body)
        assert health.checkpoint_failures == 1
        assert health.checkpoints == 0
        assert health.last_storage_error == "put rewind/obj-1 failed"
        assert wal.since_ckpt == [(("w", result.incarnation), 1)]  # the next one covers it
        assert "rewind/obj-1" in committer.rewind_queue
        assert not wal.ack(result).durable

        store.fail_prefix = None
        _run(body)
        assert health.checkpoints == 1
        assert wal.ack(result).durable

    def test_forget_rewind_objects_unqueues_or_schedules_a_delete(self) -> None:
        committer, _, state, _ = _committer(InMemoryStore())
        committer.rewind_queue["rewind/a"] = b"a"
        committer.forget_rewind_objects(["rewind/a", "rewind/b"])
        assert committer.rewind_queue == {}
        assert state.meta.rewind_drop == ["rewind/b"]  # written earlier: deleted after a commit

    def test_unreadable_rewind_object_is_a_storage_error(self) -> None:
        committer, _, _, _ = _committer(InMemoryStore())
        committer.rewind_queue["rewind/bad"] = b"garbage"
        with pytest.raises(StorageError, match="Unreadable rewind object"):
            committer.read_rewind("rewind/bad")

    def test_a_fenced_committer_writes_nothing(self) -> None:
        store = Recorder()
        committer, _, state, health = _committer(store)
        committer.fence.trip(FencedError("newer " + uuid.uuid4().hex))
        state.meta.outbox.append(OutboxEntry(0, "train", {"a": 1.0}, "2026-01-01T00:00:00+00:00"))

        async def body() -> None:
            committer.start()
            store.writes.clear()
            await committer.persist()

        _run(body)
        assert store.writes == []
        assert health.checkpoints == 0


class _Concurrent(Recorder):
    """A recording store that says it takes concurrent writes."""

    concurrent_writes = True


def test_pruning_runs_after_the_persist_and_an_explicit_settle_waits_for_it() -> None:
    """On a store that takes concurrent writes, a commit that makes pruning due leaves it to
    a background task started after the history rows: ``persist`` returns before the deletions,
    and ``settled`` waits for them."""
    store = _Concurrent()
    committer, wal, state, _ = _committer(store)
    assert committer.ckpt.concurrent
    deleted: list[str] = []
    real_delete = store.delete

    def delete(key: str) -> None:
        deleted.append(key)
        real_delete(key)

    store.delete = delete  # type: ignore[method-assign]

    async def body() -> None:
        committer.start()
        wal.start()
        for seq in range(1, 6):  # five commits: two manifests leave the retention of 3
            data, result = _applied(state, seq)
            wal.log_applied(data, result)
            await wal.write()
            await committer.persist()
            if committer.pruning is not None:
                assert not committer.pruning.done()  # persist did not wait for it
        await committer.settled()

    _run(body)
    assert any(k.startswith("wal/") for k in deleted)  # records the checkpoints cover
    assert any(k.startswith("manifests/") for k in deleted)  # beyond the retention
    kept = set(store.list())
    assert not kept & set(deleted)
    assert len(store.list("manifests/")) == 3  # the default retention
    loaded = CheckpointManager(store).load_latest()
    assert loaded is not None
    assert loaded.wal == []
    restored, _ = rebuild_state(loaded)
    assert restored.counters == state.counters
