"""Crash-safe checkpoints and a write-ahead log over an :class:`~art_ray_metrics.durable.stores.base.ObjectStore`.

:meth:`CheckpointManager.commit` takes the state as :class:`CheckpointParts`: a small ``state``
blob rewritten every time, plus per shard family the bytes added since the last checkpoint
(concatenable, so shards are incremental and compacted by concatenation). Pure logic: all I/O
goes through the injected store. The formats of what it writes (keys, blob header, pointer,
manifest) are declared in :mod:`~art_ray_metrics.durable.layout`; reading a commit back is
:mod:`~art_ray_metrics.durable.reader`; this module claims epochs, appends the WAL, commits
and decides when to prune. A commit's objects are written by
:mod:`~art_ray_metrics.durable.object_writer`, its shards compacted by
:mod:`~art_ray_metrics.durable.compaction`; what a pruning deletes is
:mod:`~art_ray_metrics.durable.prune`'s. The object layout, header, commit, fencing, replay,
shard compaction and retention rules are in ``docs/design.md`` ("The commit protocol"); the
aggregator passes ``AggregatorConfig.checkpoint_prune_every`` (default 4) as ``prune_every``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from art_ray_metrics import errors
from art_ray_metrics.durable.compaction import compact_family
from art_ray_metrics.durable.layout import (
    FAMILY,
    FORMAT_VERSION,
    KIND_MANIFEST,
    KIND_POINTER,
    KIND_SHARD,
    KIND_STATE,
    KIND_WAL,
    POINTER_KEY,
    Manifest,
    Pointer,
    decode_blob,
    encode_blob,
    encode_manifest,
    encode_pointer,
    stamp,
    wal_key,
)
from art_ray_metrics.durable.object_writer import ObjectWriter, write_pool
from art_ray_metrics.durable.prune import delete_objects, list_garbage
from art_ray_metrics.durable.reader import CheckpointReader, LoadedCheckpoint

if TYPE_CHECKING:
    from art_ray_metrics.durable.storage import ObjectStore

__all__ = [
    "FORMAT_VERSION",
    "KIND_MANIFEST",
    "KIND_POINTER",
    "KIND_SHARD",
    "KIND_STATE",
    "KIND_WAL",
    "POINTER_KEY",
    "CheckpointManager",
    "CheckpointParts",
    "CommitInfo",
    "LoadedCheckpoint",
    "decode_blob",
    "encode_blob",
]

log = logging.getLogger(__name__)

_ACQUIRE_ATTEMPTS = 8


@dataclass(frozen=True)
class CheckpointParts:
    """What one commit stores.

    Attributes:
        state: The small state blob, rewritten every commit.
        new_shards: Per shard family, the bytes added since the last successful commit (plus
            the bytes of any commit since then that raised). Empty bytes write nothing.
    """

    state: bytes
    new_shards: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class CommitInfo:
    """The outcome of one successful commit.

    Attributes:
        epoch: The writer epoch.
        seq: The commit sequence.
        bytes_written: Bytes of every object written, headers and pointer included.
        objects_written: Number of objects written, pointer included.
        seconds: Wall time of the commit, pruning included.
        manifest: The manifest key the pointer now names.
    """

    epoch: int
    seq: int
    bytes_written: int
    objects_written: int
    seconds: float
    manifest: str


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------


class CheckpointManager:
    """Writes and loads checkpoints of one aggregator under one store (see the module docstring).

    Thread-safe: ``acquire``, ``commit`` and ``append_wal`` are serialised by one lock.

    Args:
        store: Where checkpoints live.
        retention: How many committed manifests (and what they reference) to keep, >= 1.
        shard_fanout: Shards of one level that are merged into one of the next level, >= 2.

    Raises:
        ConfigError: ``retention`` or ``shard_fanout`` out of range.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        retention: int = 3,
        shard_fanout: int = 8,
        prune_every: int = 1,
    ) -> None:
        if isinstance(retention, bool) or not isinstance(retention, int) or retention < 1:
            raise errors.ConfigError(f"Expected retention >= 1 but got {retention!r}")
        if isinstance(shard_fanout, bool) or not isinstance(shard_fanout, int) or shard_fanout < 2:
            raise errors.ConfigError(f"Expected shard_fanout >= 2 but got {shard_fanout!r}")
        if isinstance(prune_every, bool) or not isinstance(prune_every, int) or prune_every < 1:
            raise errors.ConfigError(f"Expected prune_every >= 1 but got {prune_every!r}")
        self._prune_every = prune_every
        self._commits_unpruned = 0
        self._store = store
        self._reader = CheckpointReader(store, retention)
        self._retention = retention
        self._fanout = shard_fanout
        self._lock = threading.Lock()
        self._epoch = 0
        self._seq = 0
        self._wal_next = 0
        self._pointer_version: str | None = None
        self._fenced_by: int | None = None
        self._ready = False  # an epoch is claimed and the checkpoint it builds on is loaded
        self._retained: list[Manifest] = []  # newest first; [0] is the base of the next commit
        self.concurrent = bool(getattr(store, "concurrent_writes", False))
        """The store takes concurrent writes (it says so with ``concurrent_writes = True``):
        the objects of one commit are then written in parallel (see :meth:`commit`)."""
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.prune_due = False
        """A commit with ``defer_prune`` left a pruning to :meth:`prune_deferred`."""

    @property
    def uri(self) -> str:
        """The store URI."""
        return self._store.uri

    @property
    def epoch(self) -> int:
        """The claimed writer epoch (0 before :meth:`acquire`)."""
        return self._epoch

    @property
    def wal_next(self) -> int:
        """The counter the next WAL record of this epoch gets."""
        return self._wal_next

    @property
    def fenced(self) -> bool:
        """Whether a newer writer took over; every write now raises FencedError."""
        return self._fenced_by is not None

    # ---------------------------------------------------------------- reading

    def load_latest(self) -> LoadedCheckpoint | None:
        """Load the latest committed checkpoint and its WAL without claiming an epoch.

        Returns:
            The checkpoint, or None if the store holds neither a checkpoint nor WAL records.

        Raises:
            CheckpointCorruptError: Every manifest is corrupt or incomplete.
            StorageError: The store failed.
        """
        pointer, _version = self._reader.read_pointer()
        loaded, _chain = self._reader.load(pointer)
        return loaded

    # ---------------------------------------------------------------- claiming

    def acquire(self) -> LoadedCheckpoint | None:
        """Claim a new writer epoch, then load the latest checkpoint and its WAL.

        Any older writer on the same store is fenced from now on. The caller applies
        ``wal`` of the result (deduplicating) before its first commit.

        Returns:
            The checkpoint, or None if the store was empty.

        Raises:
            PreconditionFailedError: Other writers kept winning the claim.
            CheckpointCorruptError: Every manifest is corrupt or incomplete.
            StorageError: The store failed.
        """
        with self._lock:
            for _attempt in range(_ACQUIRE_ATTEMPTS):
                pointer, version = self._reader.read_pointer()
                epoch_floor, seq_floor = self._reader.key_floors()
                if pointer is not None:
                    epoch_floor = max(epoch_floor, pointer.epoch)
                    seq_floor = max(seq_floor, pointer.seq)
                claimed = Pointer(
                    epoch=epoch_floor + 1,
                    seq=pointer.seq if pointer is not None else seq_floor,
                    manifest=pointer.manifest if pointer is not None else None,
                )
                data = encode_pointer(claimed)
                try:
                    if version is None:
                        new_version = self._store.put_if_absent(POINTER_KEY, data)
                    else:
                        new_version = self._store.put_if_version(POINTER_KEY, data, version)
                except errors.PreconditionFailedError:
                    continue
                break
            else:
                raise errors.PreconditionFailedError(
                    f"Expected to claim a writer epoch in {self.uri} but lost "
                    f"{_ACQUIRE_ATTEMPTS} races for {POINTER_KEY!r}"
                )
            self._ready = False
            self._epoch = claimed.epoch
            self._seq = seq_floor
            self._wal_next = 0
            self._pointer_version = new_version
            self._fenced_by = None
            self._retained = []
            # List and load only after the claim: the WAL guarantee (docs/design.md, "The commit
            # protocol") needs every record appended before the claim to be listed after it.
            loaded, chain = self._reader.load(claimed if pointer is not None else None)
            loaded_key = loaded.manifest if loaded is not None else None
            if loaded_key != claimed.manifest:
                # The pointer was unreadable or named a corrupt manifest: re-point it at the one
                # loaded, so a crash before our first commit does not hide it.
                self._swap_pointer(
                    encode_pointer(Pointer(epoch=self._epoch, seq=self._seq, manifest=loaded_key))
                )
            self._retained = chain
            self._ready = True
            log.info("claimed writer epoch %d of %s", self._epoch, self.uri)
            return loaded

    # ---------------------------------------------------------------- writing

    def _check_writable(self) -> None:
        if self._fenced_by is not None:
            raise self._fenced_error(self._fenced_by)
        if not self._ready:
            raise errors.StorageError(
                f"Expected a successful acquire() before writing to {self.uri} but none completed"
            )

    def _fenced_error(self, newer: int) -> errors.FencedError:
        return errors.FencedError(
            f"a newer writer (epoch {newer}) owns {self.uri}; "
            f"this aggregator (epoch {self._epoch}) stops writing"
        )

    def _fence_if_newer(self, pointer: Pointer | None, version: str | None) -> None:
        if pointer is None:
            raise errors.CheckpointCorruptError(
                f"Expected a readable {POINTER_KEY!r} in {self.uri} but it is "
                f"{'missing' if version is None else 'corrupt'}"
            )
        if pointer.epoch > self._epoch:
            self._fenced_by = pointer.epoch
            log.error("%s", self._fenced_error(pointer.epoch))
            raise self._fenced_error(pointer.epoch)

    def append_wal(self, record: bytes) -> None:
        """Durably store one WAL record of this epoch; it is replayed until a commit covers it.

        Returns only after the record is stored and the pointer still names this epoch, so a
        returned append is never lost (docs/design.md, "The commit protocol").

        Raises:
            FencedError: A newer writer owns the store (the record must not be acknowledged).
            StorageError: The store failed (the record must not be acknowledged).
        """
        with self._lock:
            self._check_writable()
            counter = self._wal_next
            self._wal_next += 1
            key = wal_key(self._epoch, counter)
            self._store.put_if_absent(key, encode_blob(KIND_WAL, bytes(record)))
            pointer, version = self._reader.read_pointer()
            self._fence_if_newer(pointer, version)

    def _writer(self) -> ObjectWriter:
        if self.concurrent and self._pool is None:
            self._pool = write_pool()
        return ObjectWriter(self._store, self._pool)

    def commit(
        self,
        parts: CheckpointParts,
        *,
        wal_next: int | None = None,
        named: Mapping[str, bytes] | None = None,
        defer_prune: bool = False,
    ) -> CommitInfo:
        """Write a checkpoint: immutable blobs first, the pointer by compare-and-swap last.

        Three phases, each waiting for the one before: the state blob, the new shards and the
        ``named`` objects (in parallel on a store that takes concurrent writes); then the
        manifest (so a manifest on storage always has every object it lists); then the
        pointer.

        Args:
            parts: The state and the shard bytes added since the last successful commit.
            wal_next: WAL records of this epoch with a lower counter are covered by ``parts``;
                defaults to every record appended so far (:attr:`wal_next`).
            named: Other objects the state names (the aggregator's rewind records), written
                with a plain ``put`` before the manifest; none is visible through the pointer
                before this commit lands.
            defer_prune: On a store that takes concurrent writes, a due pruning is not run
                here: :attr:`prune_due` is set and the caller runs :meth:`prune_deferred`
                later (deleting ~a hundred objects then holds neither the commit's caller nor
                the write-ahead log, which waits on this manager's lock).

        Returns:
            What was written.

        Raises:
            FencedError: A newer writer owns the store; this manager never writes again.
            CheckpointCorruptError: A shard to merge or the pointer is corrupt.
            StorageError: The store failed; nothing became visible unless the pointer write
                landed unseen, which the next commit detects. Pass these shard bytes again.
        """
        with self._lock:
            self._check_writable()
            start = time.monotonic()
            covered = self._wal_next if wal_next is None else wal_next
            if not 0 <= covered <= self._wal_next:
                raise errors.ConfigError(
                    f"Expected 0 <= wal_next <= {self._wal_next} but got {wal_next!r}"
                )
            base = self._retained[0] if self._retained else None
            families = self._families(base, parts)
            self._seq += 1
            writer = self._writer()
            manifest = self._write_objects(writer, parts, base, families, covered, named or {})
            self._publish(manifest, writer)
            self._prune_every_nth(defer_prune)
            return CommitInfo(
                epoch=manifest.epoch,
                seq=manifest.seq,
                bytes_written=writer.bytes_written,
                objects_written=writer.objects_written,
                seconds=time.monotonic() - start,
                manifest=manifest.key,
            )

    def _publish(self, manifest: Manifest, writer: ObjectWriter) -> None:
        """Swap the pointer to ``manifest`` (the commit becomes visible), count the pointer
        write and retain the manifest as the base of the next commit."""
        pointer_bytes = encode_pointer(
            Pointer(epoch=manifest.epoch, seq=manifest.seq, manifest=manifest.key)
        )
        self._swap_pointer(pointer_bytes)
        writer.count(pointer_bytes)
        self._retained = [manifest, *self._retained][: self._retention]

    def _prune_every_nth(self, defer_prune: bool) -> None:
        """Prune after every ``prune_every``-th commit (listing costs requests: batch it); with
        ``defer_prune`` on a store that takes concurrent writes, only set :attr:`prune_due`."""
        self._commits_unpruned += 1
        if self._commits_unpruned < self._prune_every:
            return
        self._commits_unpruned = 0
        if defer_prune and self.concurrent:
            self.prune_due = True  # the caller runs prune_deferred() off its path
        else:
            self._prune()

    @staticmethod
    def _families(base: Manifest | None, parts: CheckpointParts) -> set[str]:
        """The shard families of the next commit: the base's and the new ones, names checked."""
        families = set(base.shards) if base is not None else set()
        families.update(parts.new_shards)
        for family in families:
            if not FAMILY.match(family):
                raise errors.ConfigError(
                    f"Expected a shard family name matching {FAMILY.pattern} but got {family!r}"
                )
        return families

    def _write_objects(
        self,
        writer: ObjectWriter,
        parts: CheckpointParts,
        base: Manifest | None,
        families: set[str],
        covered: int,
        named: Mapping[str, bytes],
    ) -> Manifest:
        """Write the state blob, the new shards and ``named`` (together), then the manifest
        (create-only); return it."""
        epoch, seq = self._epoch, self._seq
        commit_stamp = stamp(epoch, seq)
        state_key = f"state/{commit_stamp}.bin"
        objects = [(key, bytes(data), False) for key, data in named.items()]
        objects.append((state_key, encode_blob(KIND_STATE, bytes(parts.state)), True))
        shards: dict[str, list[str]] = {}
        for family in sorted(families):
            old = base.shards.get(family, []) if base is not None else []
            new = bytes(parts.new_shards.get(family, b""))
            shards[family] = compact_family(
                family,
                old,
                new,
                commit_stamp,
                fanout=self._fanout,
                reader=self._reader,
                put=lambda k, d: objects.append((k, d, True)),
            )
        writer.put_all(objects)
        manifest = Manifest(
            key=f"manifests/{commit_stamp}.bin",
            epoch=epoch,
            seq=seq,
            state=state_key,
            shards=shards,
            wal_next=covered,
            prev=base.key if base is not None else None,
        )
        writer.put(manifest.key, encode_manifest(manifest))
        return manifest

    def _swap_pointer(self, data: bytes) -> None:
        version = self._pointer_version
        for _attempt in range(3):
            assert version is not None
            try:
                self._pointer_version = self._store.put_if_version(POINTER_KEY, data, version)
                return
            except errors.PreconditionFailedError:
                pointer, version = self._reader.read_pointer()
                self._fence_if_newer(pointer, version)
                # Same epoch: only this manager writes it, so an earlier write of ours landed
                # without us seeing the reply. Our manifest is built on our last known base,
                # so swapping over it is correct.
        raise errors.PreconditionFailedError(
            f"Expected to swap {POINTER_KEY!r} in {self.uri} but its version kept changing"
        )

    def _prune(self) -> None:
        """Delete what no retained manifest references; log, never raise."""
        delete_objects(self._store, list_garbage(self._store, self._retained, self._epoch))

    def prune_deferred(self) -> None:
        """Run the pruning a commit with ``defer_prune`` left due: the garbage is listed under
        the lock, deleted outside it. Safe while later commits and appends run: an object no
        retained manifest references is never referenced again (a commit names its base's
        shards and objects of its own, with keys never used before), and a WAL record a
        retained manifest covers stays covered. Logs, never raises."""
        with self._lock:
            if not self.prune_due or self._fenced_by is not None:
                return
            self.prune_due = False
            garbage = list_garbage(self._store, self._retained, self._epoch)
        delete_objects(self._store, garbage)
