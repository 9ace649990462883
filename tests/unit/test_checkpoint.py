"""Tests for the checkpoint commit protocol in art_ray_metrics.durable.checkpoint.

Mostly over InMemoryStore; the main path also runs on a local directory and on S3 (moto).
Shard payloads are built from 8-byte big-endian counters so that "every byte exactly once"
is checked as a multiset of records.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from art_ray_metrics import errors
from art_ray_metrics.durable.checkpoint import (
    KIND_MANIFEST,
    KIND_SHARD,
    KIND_STATE,
    KIND_WAL,
    POINTER_KEY,
    CheckpointManager,
    CheckpointParts,
    LoadedCheckpoint,
    decode_blob,
    encode_blob,
)
from art_ray_metrics.durable.storage import InMemoryStore, ObjectStore, open_store
from tests import s3server
from tests.hypothesis_profiles import examples


def recs(*numbers: int) -> bytes:
    """Concatenated 8-byte records: a valid, concatenable shard payload."""
    return b"".join(struct.pack(">Q", n) for n in numbers)


def records_of(shard: bytes) -> Counter[int]:
    """The multiset of 8-byte records in a shard payload."""
    assert len(shard) % 8 == 0
    return Counter(struct.unpack(f">{len(shard) // 8}Q", shard))


class FaultyStore:
    """Wraps a store; write number ``fail_at`` (0-based) raises, after landing if ``land``."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.writes = 0
        self.fail_at: int | None = None
        self.land = False
        self.fail_deletes = False
        self.fail_get_prefix: str | None = None

    def _write(self, fn: Callable[[], str]) -> str:
        n = self.writes
        self.writes += 1
        if self.fail_at is not None and n == self.fail_at:
            if self.land:
                fn()
            raise errors.StorageError(f"injected failure at write {n} of {self.uri}")
        return fn()

    def get(self, key: str) -> bytes:
        if self.fail_get_prefix is not None and key.startswith(self.fail_get_prefix):
            raise errors.StorageError(f"injected outage reading {key!r}")
        return self.inner.get(key)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        return self.inner.get_versioned(key)

    def put(self, key: str, data: bytes) -> str:
        return self._write(lambda: self.inner.put(key, data))

    def put_if_absent(self, key: str, data: bytes) -> str:
        return self._write(lambda: self.inner.put_if_absent(key, data))

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        return self._write(lambda: self.inner.put_if_version(key, data, version))

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        if self.fail_deletes:
            raise errors.StorageError(f"injected delete failure for {key!r}")
        self.inner.delete(key)


@pytest.fixture
def store() -> InMemoryStore:
    """A fresh in-memory store."""
    return InMemoryStore()


def acquired(store: ObjectStore, **kwargs: int) -> CheckpointManager:
    """A manager that has claimed an epoch."""
    manager = CheckpointManager(store, **kwargs)
    manager.acquire()
    return manager


def flip_byte(store: ObjectStore, key: str, offset: int = -1) -> None:
    """Corrupt one byte of an object in place."""
    data = bytearray(store.get(key))
    data[offset] ^= 0xFF
    store.put(key, bytes(data))


def manifest_refs(store: ObjectStore) -> set[str]:
    """Every key referenced by the manifests in the store (manifests included)."""
    refs: set[str] = set()
    for key in store.list("manifests/"):
        obj = msgpack.unpackb(decode_blob(key, KIND_MANIFEST, store.get(key)))
        refs.add(key)
        refs.add(obj["state"])
        for keys in obj["shards"].values():
            refs.update(keys)
    return refs


def must_load(manager: CheckpointManager) -> LoadedCheckpoint:
    """load_latest that is known to find something."""
    loaded = manager.load_latest()
    assert loaded is not None
    return loaded


class TestRoundTrip:
    """Commit then load."""

    def test_empty_store_loads_nothing(self, store: InMemoryStore) -> None:
        """acquire and load_latest on an empty store return None."""
        manager = CheckpointManager(store)
        assert manager.load_latest() is None
        assert manager.acquire() is None
        assert manager.epoch == 1

    def test_state_and_shards_round_trip(self, store: InMemoryStore) -> None:
        """A new manager loads exactly what the last commit stored."""
        writer = acquired(store)
        writer.commit(CheckpointParts(b"s1", {"ids": recs(1, 2), "costs": recs(9)}))
        info = writer.commit(CheckpointParts(b"s2", {"ids": recs(3)}))
        loaded = CheckpointManager(store).acquire()
        assert loaded is not None
        assert loaded.state == b"s2"
        assert records_of(loaded.shards["ids"]) == Counter([1, 2, 3])
        assert loaded.shards["costs"] == recs(9)
        assert (loaded.epoch, loaded.seq, loaded.wal) == (1, info.seq, [])
        assert loaded.committed
        assert loaded.manifest == info.manifest

    def test_load_latest_does_not_claim(self, store: InMemoryStore) -> None:
        """load_latest reads without bumping the epoch, so the writer keeps writing."""
        writer = acquired(store)
        writer.commit(CheckpointParts(b"s1"))
        reader = CheckpointManager(store)
        assert must_load(reader).state == b"s1"
        assert reader.epoch == 0
        writer.commit(CheckpointParts(b"s2"))
        assert must_load(reader).state == b"s2"

    def test_family_with_no_bytes_is_present_and_empty(self, store: InMemoryStore) -> None:
        """A family committed with empty bytes loads as b''; no shard object is written."""
        writer = acquired(store)
        writer.commit(CheckpointParts(b"s", {"empty": b""}))
        assert must_load(writer).shards == {"empty": b""}
        assert store.list("shards/") == []

    def test_commit_info_counts_objects_and_bytes(self, store: InMemoryStore) -> None:
        """CommitInfo counts state, shard, manifest and pointer objects and their bytes."""
        writer = acquired(store)
        before = {k: len(store.get(k)) for k in store.list()}
        info = writer.commit(CheckpointParts(b"state", {"ids": recs(1)}))
        after = {k: len(store.get(k)) for k in store.list()}
        new_keys = set(after) - set(before)
        assert info.objects_written == len(new_keys) + 1 == 4  # + the rewritten pointer
        assert info.bytes_written == sum(after[k] for k in new_keys) + after[POINTER_KEY]
        assert (info.epoch, info.seq) == (1, 1)
        assert info.seconds >= 0.0


class TestIncrementalShards:
    """Each commit writes only new bytes."""

    def test_bytes_per_commit_do_not_grow_with_history(self, store: InMemoryStore) -> None:
        """A non-merging commit after 200 commits writes about what the second one wrote."""
        writer = acquired(store, shard_fanout=4, retention=2)
        delta = 125  # records of 8 bytes: 1000 bytes per commit
        sizes = []
        for i in range(200):
            info = writer.commit(
                CheckpointParts(b"s" * 100, {"ids": recs(*range(i * delta, (i + 1) * delta))})
            )
            sizes.append(info.bytes_written)
        # commits 2 and 198 (1-based) merge nothing with fanout 4
        assert sizes[197] - sizes[1] < 400
        assert sizes[1] < 100 + 1000 + 400

    def test_total_bytes_are_amortised_logarithmic(self, store: InMemoryStore) -> None:
        """Over n commits each shard byte is rewritten at most log_fanout(n) times."""
        writer = acquired(store, shard_fanout=4, retention=1)
        n, payload = 256, 800
        total = 0
        for i in range(n):
            info = writer.commit(
                CheckpointParts(b"", {"ids": recs(*range(i * 100, i * 100 + 100))})
            )
            total += info.bytes_written
        levels = math.log(n, 4) + 1
        overhead_per_commit = 600
        assert total <= n * payload * levels + n * overhead_per_commit
        assert total >= n * payload * 2  # merges did happen


class TestCompaction:
    """Tiered merging keeps the shard count logarithmic and preserves every byte once."""

    @pytest.mark.parametrize("fanout", [2, 3, 8])
    def test_every_record_exactly_once_and_few_shards(
        self, store: InMemoryStore, fanout: int
    ) -> None:
        """After 100 commits every record is loaded once and shard count is O(log n)."""
        writer = acquired(store, shard_fanout=fanout, retention=1)
        for i in range(100):
            writer.commit(CheckpointParts(b"s", {"ids": recs(3 * i, 3 * i + 1, 3 * i + 2)}))
        loaded = CheckpointManager(store).acquire()
        assert loaded is not None
        assert records_of(loaded.shards["ids"]) == Counter(range(300))
        shard_keys = store.list("shards/ids/")
        assert len(shard_keys) <= (fanout - 1) * (math.floor(math.log(100, fanout)) + 1)
        assert set(shard_keys) <= manifest_refs(store)

    def test_merged_shard_has_next_level(self, store: InMemoryStore) -> None:
        """fanout level-0 shards become one level-1 shard."""
        writer = acquired(store, shard_fanout=3, retention=1)
        for i in range(3):
            writer.commit(CheckpointParts(b"s", {"ids": recs(i)}))
        (key,) = store.list("shards/ids/")
        assert key.endswith("-L01.bin")
        assert records_of(decode_blob(key, KIND_SHARD, store.get(key))) == Counter([0, 1, 2])

    @settings(max_examples=examples(40), deadline=None)
    @given(
        fanout=st.integers(2, 5),
        deltas=st.lists(
            st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 4)), max_size=30
        ),
    )
    def test_random_histories_preserve_records(
        self, fanout: int, deltas: list[dict[str, int]]
    ) -> None:
        """Any sequence of commits loads the union of all deltas, per family, exactly once."""
        store = InMemoryStore()
        writer = acquired(store, shard_fanout=fanout, retention=2)
        expected: dict[str, Counter[int]] = {}
        next_id = 0
        for delta in deltas:
            new: dict[str, bytes] = {}
            for family, count in delta.items():
                ids = list(range(next_id, next_id + count))
                next_id += count
                new[family] = recs(*ids)
                expected.setdefault(family, Counter()).update(ids)
            writer.commit(CheckpointParts(b"s", new))
        loaded = CheckpointManager(store).load_latest()
        if not deltas:
            assert loaded is None
            return
        assert loaded is not None
        assert {f: records_of(b) for f, b in loaded.shards.items()} == expected


class TestCrashDuringCommit:
    """A failure at any write of a commit leaves the previous checkpoint loadable."""

    def _setup(self) -> tuple[FaultyStore, CheckpointManager]:
        faulty = FaultyStore(InMemoryStore())
        writer = acquired(faulty, shard_fanout=2, retention=2)
        writer.commit(CheckpointParts(b"s1", {"a": recs(1), "b": recs(100)}))
        writer.append_wal(b"w1")
        return faulty, writer

    def test_every_write_position(self) -> None:
        """For each write of a merging commit: it fails, the old checkpoint loads, a retry works."""
        faulty, reference = self._setup()
        start = faulty.writes
        reference.commit(CheckpointParts(b"s2", {"a": recs(2), "b": recs(101)}))
        writes_per_commit = faulty.writes - start
        assert writes_per_commit == 5  # state, a/L01 (merged), b/L01 (merged), manifest, pointer
        for land in (False, True):
            for offset in range(writes_per_commit):
                faulty, writer = self._setup()
                faulty.fail_at = faulty.writes + offset
                faulty.land = land
                with pytest.raises(errors.StorageError, match="injected"):
                    writer.commit(CheckpointParts(b"s2", {"a": recs(2), "b": recs(101)}))
                landed_pointer = land and offset == writes_per_commit - 1
                seen = must_load(CheckpointManager(faulty.inner))
                if landed_pointer:
                    assert seen.state == b"s2"
                else:
                    assert (seen.state, seen.wal) == (b"s1", [b"w1"]), (land, offset)
                    assert seen.shards == {"a": recs(1), "b": recs(100)}
                # The caller resends the failed commit's bytes with the next ones.
                writer.commit(CheckpointParts(b"s3", {"a": recs(2, 3), "b": recs(101)}))
                final = CheckpointManager(faulty.inner).acquire()
                assert final is not None
                assert final.state == b"s3", (land, offset)
                assert records_of(final.shards["a"]) == Counter([1, 2, 3]), (land, offset)
                assert records_of(final.shards["b"]) == Counter([100, 101]), (land, offset)
                assert final.wal == []

    def test_leftovers_of_a_failed_commit_are_pruned(self) -> None:
        """Blobs written by a commit that never reached the pointer go at the next commit."""
        faulty, writer = self._setup()
        faulty.fail_at = faulty.writes + 3  # state and both shards land, the manifest fails
        with pytest.raises(errors.StorageError):
            writer.commit(CheckpointParts(b"s2", {"a": recs(2), "b": recs(101)}))
        leftovers = set(faulty.inner.list()) - manifest_refs(faulty.inner) - {POINTER_KEY}
        assert {k for k in leftovers if not k.startswith("wal/")}  # there is garbage
        writer.commit(CheckpointParts(b"s3", {"a": recs(2), "b": recs(101)}))
        garbage = set(faulty.inner.list()) - manifest_refs(faulty.inner) - {POINTER_KEY}
        assert {k for k in garbage if not k.startswith("wal/")} == set()


class TestCorruption:
    """Corrupt or missing blobs fall back to the previous retained checkpoint."""

    def _two_commits(self, store: InMemoryStore) -> tuple[CheckpointManager, str]:
        writer = acquired(store, retention=3)
        writer.commit(CheckpointParts(b"s1", {"ids": recs(1)}))
        writer.append_wal(b"after-1")
        info = writer.commit(CheckpointParts(b"s2", {"ids": recs(2)}))
        writer.append_wal(b"after-2")
        return writer, info.manifest

    @pytest.mark.parametrize(
        "damage",
        [
            pytest.param(lambda s, m: flip_byte(s, m.replace("manifests", "state")), id="state-crc"),
            pytest.param(lambda s, m: s.put(m, s.get(m)[:-3]), id="manifest-truncated"),
            pytest.param(lambda s, m: s.put(m, s.get(m)[:10]), id="manifest-short"),
            pytest.param(lambda s, m: s.delete(m.replace("manifests", "state")), id="state-missing"),
            pytest.param(
                lambda s, m: flip_byte(s, s.list("shards/ids/")[-1], 0), id="shard-magic"
            ),
        ],
    )  # fmt: skip
    def test_damaged_latest_falls_back_to_previous(
        self,
        store: InMemoryStore,
        damage: Callable[[InMemoryStore, str], None],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """The previous checkpoint loads, with the WAL written since it, and a warning."""
        _writer, latest = self._two_commits(store)
        damage(store, latest)
        with caplog.at_level(logging.WARNING, logger="art_ray_metrics.durable.reader"):
            loaded = must_load(CheckpointManager(store))
        assert loaded.state == b"s1"
        assert loaded.shards == {"ids": recs(1)}
        assert loaded.wal == [b"after-1", b"after-2"]
        assert latest.split("/")[1] in caplog.text or "shards/ids" in caplog.text
        assert {r.name for r in caplog.records} == {"art_ray_metrics.durable.reader"}

    def test_acquire_after_fallback_repoints_and_continues(self, store: InMemoryStore) -> None:
        """A new writer builds on the fallback; the corrupt checkpoint is never loaded again."""
        _writer, latest = self._two_commits(store)
        flip_byte(store, latest.replace("manifests", "state"))
        writer = CheckpointManager(store)
        loaded = writer.acquire()
        assert loaded is not None
        assert loaded.state == b"s1"
        writer.commit(CheckpointParts(b"s2-again", {"ids": recs(2)}))
        again = must_load(CheckpointManager(store))
        assert again.state == b"s2-again"
        assert records_of(again.shards["ids"]) == Counter([1, 2])
        assert latest not in store.list("manifests/")

    def test_corrupt_pointer_scans_manifests(self, store: InMemoryStore) -> None:
        """A garbage pointer: the newest manifest is found and acquire rewrites the pointer."""
        _writer, latest = self._two_commits(store)
        store.put(POINTER_KEY, b"garbage")
        assert must_load(CheckpointManager(store)).state == b"s2"
        writer = CheckpointManager(store)
        loaded = writer.acquire()
        assert loaded is not None
        assert loaded.manifest == latest
        assert writer.epoch == 2
        # Even if this writer dies now, the pointer names the checkpoint again.
        pointer = msgpack.unpackb(decode_blob(POINTER_KEY, 1, store.get(POINTER_KEY)))
        assert pointer["manifest"] == latest

    def test_every_manifest_corrupt_raises(self, store: InMemoryStore) -> None:
        """With nothing loadable, CheckpointCorruptError is raised (never a silent fresh start)."""
        self._two_commits(store)
        for key in store.list("manifests/"):
            flip_byte(store, key)
        with pytest.raises(errors.CheckpointCorruptError, match="every one is corrupt"):
            CheckpointManager(store).load_latest()

    def test_outage_is_not_treated_as_corruption(self, store: InMemoryStore) -> None:
        """A StorageError while reading is raised, not answered with an older checkpoint."""
        self._two_commits(store)
        faulty = FaultyStore(store)
        faulty.fail_get_prefix = "state/"
        with pytest.raises(errors.StorageError, match="injected outage") as info:
            CheckpointManager(faulty).load_latest()
        assert not isinstance(info.value, errors.CheckpointCorruptError)

    def test_corrupt_wal_record_is_skipped_with_error(
        self, store: InMemoryStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A damaged WAL record is logged and skipped; the others replay."""
        writer = acquired(store)
        for record in (b"r0", b"r1", b"r2"):
            writer.append_wal(record)
        flip_byte(store, store.list("wal/")[1])
        with caplog.at_level(logging.ERROR, logger="art_ray_metrics.durable.reader"):
            loaded = must_load(CheckpointManager(store))
        assert loaded.wal == [b"r0", b"r2"]
        assert "corrupt WAL record" in caplog.text
        assert {r.name for r in caplog.records} == {"art_ray_metrics.durable.reader"}


class TestBlobFraming:
    """The 20-byte header."""

    def test_round_trip(self) -> None:
        """decode(encode(x)) == x for each kind."""
        for kind in (KIND_STATE, KIND_SHARD, KIND_WAL):
            assert decode_blob("k", kind, encode_blob(kind, b"payload")) == b"payload"

    @pytest.mark.parametrize(
        ("mutate", "message"),
        [
            (lambda b: b[:5], "at least 20 bytes"),
            (lambda b: b"XXXX" + b[4:], "magic"),
            (lambda b: b[:4] + b"\x00\x09" + b[6:], "format version"),
            (lambda b: b[:6] + bytes([KIND_SHARD]) + b[7:], "kind"),
            (lambda b: b[:-1], "truncated"),
            (lambda b: b + b"x", "truncated or overlong"),
            (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "CRC-32"),
        ],
        ids=["short", "magic", "version", "kind", "truncated", "overlong", "crc"],
    )
    def test_damage_is_detected_naming_the_key(
        self, mutate: Callable[[bytes], bytes], message: str
    ) -> None:
        """Each kind of damage raises CheckpointCorruptError naming the key."""
        blob = encode_blob(KIND_STATE, b"some state bytes")
        with pytest.raises(errors.CheckpointCorruptError, match=message) as info:
            decode_blob("state/x.bin", KIND_STATE, mutate(blob))
        assert "state/x.bin" in str(info.value)


class TestFencing:
    """A newer writer epoch stops an older one."""

    def test_older_writer_is_fenced_on_commit_and_wal(self, store: InMemoryStore) -> None:
        """After a second acquire, the first manager's commit and append raise FencedError."""
        old = acquired(store)
        old.commit(CheckpointParts(b"old"))
        new = acquired(store)
        assert (old.epoch, new.epoch) == (1, 2)
        message = (
            rf"a newer writer \(epoch 2\) owns {store.uri}; "
            rf"this aggregator \(epoch 1\) stops writing"
        )
        with pytest.raises(errors.FencedError, match=message):
            old.commit(CheckpointParts(b"stale"))
        assert old.fenced
        with pytest.raises(errors.FencedError, match=message):
            old.append_wal(b"stale record")
        assert must_load(new).state == b"old"
        new.commit(CheckpointParts(b"new"))
        assert must_load(new).state == b"new"

    def test_wal_append_detects_fence_before_any_commit(self, store: InMemoryStore) -> None:
        """An append after a newer acquire raises even if the old writer never commits."""
        old = acquired(store)
        acquired(store)
        with pytest.raises(errors.FencedError):
            old.append_wal(b"x")

    def test_fenced_manager_writes_nothing_more(self) -> None:
        """Once fenced, commit and append_wal fail before touching the store."""
        faulty = FaultyStore(InMemoryStore())
        old = acquired(faulty)
        acquired(faulty)
        with pytest.raises(errors.FencedError):
            old.commit(CheckpointParts(b"stale", {"ids": recs(1)}))
        writes = faulty.writes
        with pytest.raises(errors.FencedError):
            old.commit(CheckpointParts(b"stale"))
        with pytest.raises(errors.FencedError):
            old.append_wal(b"stale")
        assert faulty.writes == writes

    def test_returned_appends_survive_a_takeover(self, store: InMemoryStore) -> None:
        """Records whose append returned are replayed by the next writer; fenced ones are not."""
        old = acquired(store)
        old.append_wal(b"acked-1")
        old.append_wal(b"acked-2")
        new = CheckpointManager(store)
        loaded = new.acquire()
        assert loaded is not None
        assert loaded.wal == [b"acked-1", b"acked-2"]
        assert not loaded.committed
        with pytest.raises(errors.FencedError):
            old.append_wal(b"never-acked")
        new.commit(CheckpointParts(b"state-with-acked"))
        third = CheckpointManager(store).acquire()
        assert third is not None
        assert third.wal == []
        assert store.list("wal/") == []

    def test_concurrent_acquires_get_distinct_epochs(self, store: InMemoryStore) -> None:
        """Racing acquires all succeed with distinct epochs; only the newest can commit."""
        managers = [CheckpointManager(store) for _ in range(4)]
        gate = threading.Barrier(4)

        def claim(m: CheckpointManager) -> None:
            gate.wait()
            m.acquire()

        threads = [threading.Thread(target=claim, args=(m,)) for m in managers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        epochs = sorted(m.epoch for m in managers)
        assert epochs == [1, 2, 3, 4]
        newest = max(managers, key=lambda m: m.epoch)
        for m in managers:
            if m is not newest:
                with pytest.raises(errors.FencedError):
                    m.commit(CheckpointParts(b"x"))
        newest.commit(CheckpointParts(b"winner"))
        assert must_load(newest).state == b"winner"

    def test_lost_pointer_reply_is_recovered_by_the_same_epoch(self) -> None:
        """If a pointer CAS landed but its reply was lost, the next commit still succeeds."""
        faulty = FaultyStore(InMemoryStore())
        writer = acquired(faulty)
        writer.commit(CheckpointParts(b"s1", {"ids": recs(1)}))
        faulty.fail_at, faulty.land = faulty.writes + 2, True  # state, shard, then pointer
        with pytest.raises(errors.StorageError):
            writer.commit(CheckpointParts(b"s2", {"ids": recs(2)}))
        writer.commit(CheckpointParts(b"s3", {"ids": recs(2, 3)}))
        loaded = must_load(writer)
        assert loaded.state == b"s3"
        assert records_of(loaded.shards["ids"]) == Counter([1, 2, 3])


class TestWal:
    """Write-ahead log replay and coverage."""

    def test_replay_order_across_epochs(self, store: InMemoryStore) -> None:
        """Uncommitted records of successive writers replay in write order."""
        first = acquired(store)
        first.append_wal(b"a")
        first.append_wal(b"b")
        second = CheckpointManager(store)
        assert second.acquire() == LoadedCheckpoint(b"", {}, 0, 0, [b"a", b"b"])
        second.append_wal(b"c")
        third = CheckpointManager(store).acquire()
        assert third is not None
        assert third.wal == [b"a", b"b", b"c"]

    def test_order_is_numeric_beyond_ten_records(self, store: InMemoryStore) -> None:
        """Counters are zero-padded so record 10 replays after record 9."""
        writer = acquired(store)
        for i in range(12):
            writer.append_wal(b"%d" % i)
        assert must_load(writer).wal == [b"%d" % i for i in range(12)]

    def test_commit_covers_records_appended_before_it(self, store: InMemoryStore) -> None:
        """Records appended before a commit are not replayed after it; later ones are."""
        writer = acquired(store)
        writer.append_wal(b"before")
        writer.commit(CheckpointParts(b"s"))
        writer.append_wal(b"after")
        assert must_load(writer).wal == [b"after"]

    def test_explicit_wal_next_covers_a_prefix(self, store: InMemoryStore) -> None:
        """commit(wal_next=1) covers only the first record of the epoch."""
        writer = acquired(store)
        writer.append_wal(b"x")
        writer.append_wal(b"y")
        writer.commit(CheckpointParts(b"s"), wal_next=1)
        assert must_load(writer).wal == [b"y"]

    @pytest.mark.parametrize("wal_next", [-1, 3])
    def test_wal_next_out_of_range_is_rejected(self, store: InMemoryStore, wal_next: int) -> None:
        """wal_next must lie between 0 and the records appended so far."""
        writer = acquired(store)
        writer.append_wal(b"x")
        with pytest.raises(errors.ConfigError, match="wal_next"):
            writer.commit(CheckpointParts(b"s"), wal_next=wal_next)

    def test_wal_kept_while_a_retained_checkpoint_needs_it(self, store: InMemoryStore) -> None:
        """With retention 2, records covered only by the newest commit survive one commit."""
        writer = acquired(store, retention=2)
        writer.commit(CheckpointParts(b"s1"))
        writer.append_wal(b"w1")
        writer.commit(CheckpointParts(b"s2"))
        assert len(store.list("wal/")) == 1
        writer.commit(CheckpointParts(b"s3"))
        assert store.list("wal/") == []

    def test_wal_record_framing_is_checked(self, store: InMemoryStore) -> None:
        """WAL objects carry the header of kind WAL."""
        writer = acquired(store)
        writer.append_wal(b"payload")
        (key,) = store.list("wal/")
        assert key == "wal/0000000001-000000000000.bin"
        assert decode_blob(key, KIND_WAL, store.get(key)) == b"payload"


class TestRetention:
    """Pruning after commits."""

    def test_keeps_last_manifests_and_only_what_they_reference(self, store: InMemoryStore) -> None:
        """After many commits: `retention` manifests, no unreferenced state or shard."""
        writer = acquired(store, retention=3, shard_fanout=3)
        for i in range(20):
            writer.commit(CheckpointParts(b"s%d" % i, {"ids": recs(i), "more": recs(1000 + i)}))
        manifests = store.list("manifests/")
        assert [k[-8:-4] for k in manifests] == ["0018", "0019", "0020"]
        stored = {k for k in store.list() if k.split("/")[0] in ("state", "shards", "manifests")}
        assert stored == manifest_refs(store)

    def test_every_retained_checkpoint_is_loadable(self, store: InMemoryStore) -> None:
        """Falling back through all retained checkpoints finds complete data."""
        writer = acquired(store, retention=3, shard_fanout=2)
        for i in range(9):
            writer.commit(CheckpointParts(b"s%d" % i, {"ids": recs(i)}))
        for expected in (8, 7, 6):
            loaded = must_load(CheckpointManager(store))
            assert loaded.state == b"s%d" % expected
            assert records_of(loaded.shards["ids"]) == Counter(range(expected + 1))
            store.delete(str(loaded.manifest))

    def test_newer_epoch_and_foreign_objects_are_not_deleted(self, store: InMemoryStore) -> None:
        """Pruning never touches a newer writer's blobs or files it does not recognise."""
        writer = acquired(store, retention=1)
        newer = "state/0000000009-000000000001.bin"
        store.put(newer, b"newer writer's blob")
        store.put("state/README", b"not ours")
        writer.commit(CheckpointParts(b"s1"))
        writer.commit(CheckpointParts(b"s2"))
        assert newer in store.list("state/")
        assert "state/README" in store.list("state/")

    def test_prune_failure_is_logged_not_raised(self, caplog: pytest.LogCaptureFixture) -> None:
        """A delete failure during pruning leaves the commit successful and logs a warning."""
        faulty = FaultyStore(InMemoryStore())
        writer = acquired(faulty, retention=1)
        writer.commit(CheckpointParts(b"s1"))
        faulty.fail_deletes = True
        with caplog.at_level(logging.WARNING, logger="art_ray_metrics.durable.prune"):
            info = writer.commit(CheckpointParts(b"s2"))
        assert info.seq == 2
        assert "pruning" in caplog.text
        assert must_load(writer).state == b"s2"


class TestConfig:
    """Argument checks."""

    @pytest.mark.parametrize(
        "kwargs",
        [{"retention": 0}, {"shard_fanout": 1}, {"retention": True}],
        ids=["retention-0", "fanout-1", "retention-bool"],
    )
    def test_bad_settings_raise(self, store: InMemoryStore, kwargs: dict[str, int]) -> None:
        """retention < 1 or shard_fanout < 2 fail fast."""
        with pytest.raises(errors.ConfigError, match="Expected"):
            CheckpointManager(store, **kwargs)

    @pytest.mark.parametrize("family", ["", "a/b", ".hidden", "x" * 65])
    def test_bad_family_names_raise_before_writing(self, store: InMemoryStore, family: str) -> None:
        """A family that is not a safe key segment is rejected and nothing is written."""
        writer = acquired(store)
        before = store.list()
        with pytest.raises(errors.ConfigError, match="shard family"):
            writer.commit(CheckpointParts(b"s", {family: b"x"}))
        assert store.list() == before

    def test_writes_need_acquire(self, store: InMemoryStore) -> None:
        """commit and append_wal before acquire raise StorageError."""
        manager = CheckpointManager(store)
        with pytest.raises(errors.StorageError, match="acquire"):
            manager.commit(CheckpointParts(b"s"))
        with pytest.raises(errors.StorageError, match="acquire"):
            manager.append_wal(b"r")


@pytest.fixture(
    params=[pytest.param("local", id="local"), pytest.param("s3", id="s3", marks=pytest.mark.s3)]
)
def real_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """A local directory or an S3 bucket prefix on the moto server."""
    if request.param == "local":
        yield open_store(str(tmp_path / "ckpt"))
    else:
        with s3server.s3_env():
            yield open_store(f"{s3server.make_bucket()}/run/ckpt", timeout_s=5.0)


class TestRealBackends:
    """The main path on a local directory and on S3."""

    def test_main_path(self, real_store: ObjectStore) -> None:
        """Commit, WAL, compaction, takeover, fencing and pruning on a real store."""
        first = CheckpointManager(real_store, retention=2, shard_fanout=2)
        assert first.acquire() is None
        for i in range(5):
            first.append_wal(b"w%d" % i)
            first.commit(CheckpointParts(b"s%d" % i, {"ids": recs(i)}))
        first.append_wal(b"tail")
        second = CheckpointManager(real_store, retention=2, shard_fanout=2)
        loaded = second.acquire()
        assert loaded is not None
        assert (loaded.state, loaded.wal, loaded.epoch, loaded.seq) == (b"s4", [b"tail"], 1, 5)
        assert records_of(loaded.shards["ids"]) == Counter(range(5))
        with pytest.raises(errors.FencedError):
            first.commit(CheckpointParts(b"stale"))
        with pytest.raises(errors.FencedError):
            first.append_wal(b"stale")
        second.commit(CheckpointParts(b"s5", {"ids": recs(5)}))
        final = must_load(CheckpointManager(real_store))
        assert (final.state, final.wal, final.epoch) == (b"s5", [], 2)
        assert records_of(final.shards["ids"]) == Counter(range(6))
        assert len(real_store.list("manifests/")) == 2
        stored = {k for k in real_store.list() if not k.startswith(("wal/", POINTER_KEY))}
        assert stored == manifest_refs(real_store)


class TestPruneEvery:
    def test_pruning_runs_every_nth_commit(self) -> None:
        """With prune_every=3 old blobs linger for two commits and go on the third."""
        store = InMemoryStore()
        manager = CheckpointManager(store, retention=1, prune_every=3)
        assert manager.acquire() is None
        counts = []
        for i in range(6):
            manager.commit(CheckpointParts(f"state-{i}".encode(), {"s": b"x" * 16}))
            counts.append(len(store.list("manifests/")))
        assert counts == [1, 2, 1, 2, 3, 1]
        loaded = CheckpointManager(store).load_latest()
        assert loaded is not None
        assert loaded.state == b"state-5"
        assert loaded.shards["s"] == b"x" * 16 * 6

    def test_prune_every_must_be_positive(self) -> None:
        """A bad prune_every is a ConfigError."""
        with pytest.raises(errors.ConfigError, match="prune_every"):
            CheckpointManager(InMemoryStore(), prune_every=0)


class _ConcurrentStore(FaultyStore):
    """A :class:`FaultyStore` that says it takes concurrent writes and records, per write, the
    key and how many writes were in flight when it started (each write sleeps a little, so
    writes started together overlap)."""

    concurrent_writes = True

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.log: list[tuple[str, int]] = []
        self._guard = threading.Lock()
        self._active = 0

    def _write(self, fn: Callable[[], str]) -> str:
        with self._guard:
            self._active += 1
            active = self._active
        try:
            import time

            time.sleep(0.02)
            return super()._write(fn)
        finally:
            with self._guard:
                self._active -= 1
            self.log.append(("", active))

    def put(self, key: str, data: bytes) -> str:
        out = super().put(key, data)
        self.log[-1] = (key, self.log[-1][1])
        return out

    def put_if_absent(self, key: str, data: bytes) -> str:
        out = super().put_if_absent(key, data)
        self.log[-1] = (key, self.log[-1][1])
        return out

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        out = super().put_if_version(key, data, version)
        self.log[-1] = (key, self.log[-1][1])
        return out


class TestConcurrentCommit:
    """On a store that takes concurrent writes a commit writes in three phases: the state, new
    shards and named objects together; then the manifest; then the pointer."""

    def test_objects_go_together_manifest_after_pointer_last(self) -> None:
        store = _ConcurrentStore(InMemoryStore())
        writer = acquired(store)
        store.log.clear()
        info = writer.commit(
            CheckpointParts(b"s1", {"ids": recs(1), "more": recs(2)}),
            named={"rewind/a.bin": b"A", "rewind/b.bin": b"B"},
        )
        keys = [k for k, _ in store.log]
        assert keys[-2:] == [info.manifest, POINTER_KEY]
        assert set(keys[:-2]) == {
            "rewind/a.bin",
            "rewind/b.bin",
            "state/0000000001-000000000001.bin",
            "shards/ids/0000000001-000000000001-L00.bin",
            "shards/more/0000000001-000000000001-L00.bin",
        }
        assert max(active for _, active in store.log[:-2]) > 1  # they overlapped
        assert [active for _, active in store.log[-2:]] == [1, 1]  # nothing else in flight
        assert info.objects_written == 7
        assert store.inner.get("rewind/a.bin") == b"A"
        loaded = must_load(CheckpointManager(store.inner))
        assert (loaded.state, records_of(loaded.shards["more"])) == (b"s1", Counter([2]))

    def test_a_failed_object_stops_the_commit_before_its_manifest(self) -> None:
        store = _ConcurrentStore(InMemoryStore())
        writer = acquired(store)
        writer.commit(CheckpointParts(b"s1", {"ids": recs(1)}))
        store.fail_at = store.writes + 1  # one of the parallel objects
        with pytest.raises(errors.StorageError, match="injected"):
            writer.commit(CheckpointParts(b"s2", {"ids": recs(2)}), named={"rewind/x.bin": b"x"})
        assert len(store.inner.list("manifests/")) == 1  # no manifest of the failed commit
        assert must_load(CheckpointManager(store.inner)).state == b"s1"
        store.fail_at = None
        writer.commit(CheckpointParts(b"s3", {"ids": recs(2, 3)}))
        loaded = must_load(CheckpointManager(store.inner))
        assert (loaded.state, records_of(loaded.shards["ids"])) == (b"s3", Counter([1, 2, 3]))

    def test_plain_stores_write_in_order(self, store: InMemoryStore) -> None:
        """A store that does not say it takes concurrent writes gets them one at a time."""
        faulty = FaultyStore(store)
        writer = acquired(faulty)
        assert not writer.concurrent
        before = faulty.writes
        faulty.fail_at = before  # the first write of the commit: nothing else is tried
        with pytest.raises(errors.StorageError):
            writer.commit(CheckpointParts(b"s1", {"ids": recs(1)}), named={"rewind/a": b"a"})
        assert faulty.writes == before + 1
        assert store.list("rewind/") == store.list("state/") == store.list("shards/") == []


class TestDeferredPrune:
    def test_deferred_prune_deletes_what_an_inline_one_would(self, tmp_path: Path) -> None:
        """``defer_prune`` on a store that takes concurrent writes: the commit leaves the
        garbage, ``prune_deferred`` deletes exactly what an inline pruning deletes."""
        inline_store = open_store(str(tmp_path / "inline"))
        deferred_store = open_store(str(tmp_path / "deferred"))
        inline = acquired(inline_store, retention=2, prune_every=2)
        deferred = acquired(deferred_store, retention=2, prune_every=2)
        assert deferred.concurrent
        for i in range(6):
            for manager in (inline, deferred):
                manager.append_wal(b"w%d" % i)
            inline.commit(CheckpointParts(b"s%d" % i, {"ids": recs(i)}))
            deferred.commit(CheckpointParts(b"s%d" % i, {"ids": recs(i)}), defer_prune=True)
            if i % 2 == 1:
                assert deferred.prune_due
                left = set(deferred_store.list())
                assert left > set(inline_store.list())  # the garbage is still there
                deferred.prune_deferred()
                assert not deferred.prune_due
            assert inline_store.list() == deferred_store.list()
        loaded = must_load(CheckpointManager(deferred_store))
        assert (loaded.state, records_of(loaded.shards["ids"])) == (b"s5", Counter(range(6)))

    def test_a_commit_between_listing_and_pruning_is_kept(self, tmp_path: Path) -> None:
        """Garbage listed before a later commit never includes that commit's objects."""
        st = open_store(str(tmp_path / "ckpt"))
        manager = acquired(st, retention=1, prune_every=1)
        manager.commit(CheckpointParts(b"s1", {"ids": recs(1)}), defer_prune=True)
        manager.commit(CheckpointParts(b"s2", {"ids": recs(2)}), defer_prune=True)
        manager.commit(CheckpointParts(b"s3", {"ids": recs(3)}), defer_prune=True)
        manager.prune_deferred()
        stored = {k for k in st.list() if not k.startswith(("wal/", POINTER_KEY))}
        assert stored == manifest_refs(st)
        loaded = must_load(CheckpointManager(st))
        assert (loaded.state, records_of(loaded.shards["ids"])) == (b"s3", Counter([1, 2, 3]))
