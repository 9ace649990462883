"""Crash-safe checkpoints and a write-ahead log over an :class:`~art_ray_metrics.durable.stores.base.ObjectStore`.

:meth:`CheckpointManager.commit` takes the state as :class:`CheckpointParts`: a small ``state``
blob rewritten every time, plus per shard family the bytes added since the last checkpoint
(concatenable, so shards are incremental and compacted by concatenation). Pure logic: all I/O
goes through the injected store. The object layout, header, commit, fencing, replay, shard
compaction and retention rules are in ``docs/design.md`` ("The commit protocol"); the
aggregator passes ``AggregatorConfig.checkpoint_prune_every`` (default 4) as ``prune_every``.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from art_ray_metrics import errors

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

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
POINTER_KEY = "CHECKPOINT"

_MAGIC = b"ARMC"
_HEADER = struct.Struct(">4sHBBQI")
KIND_POINTER, KIND_MANIFEST, KIND_STATE, KIND_SHARD, KIND_WAL = 1, 2, 3, 4, 5
_KIND_NAMES = {1: "pointer", 2: "manifest", 3: "state", 4: "shard", 5: "WAL record"}

_EPOCH_SEQ = re.compile(r"(\d{10})-(\d{12})")
_MANIFEST_KEY = re.compile(r"^manifests/(\d{10})-(\d{12})\.bin$")
_WAL_KEY = re.compile(r"^wal/(\d{10})-(\d{12})\.bin$")
_SHARD_LEVEL = re.compile(r"-L(\d{2})\.bin$")
_FAMILY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_ACQUIRE_ATTEMPTS = 8
_MAX_LEVEL = 99


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
class LoadedCheckpoint:
    """A committed checkpoint and the WAL records written after it.

    Attributes:
        state: The state blob; ``b""`` when nothing was committed yet (``seq == 0``).
        shards: Per family, all its shards concatenated (order not significant).
        epoch: The writer epoch that committed it (0 if nothing was committed).
        seq: Its commit sequence (0 if nothing was committed).
        wal: WAL records not covered by it, in write order.
        manifest: The manifest key, or None if nothing was committed.
    """

    state: bytes
    shards: dict[str, bytes]
    epoch: int
    seq: int
    wal: list[bytes]
    manifest: str | None = None

    @property
    def committed(self) -> bool:
        """Whether a checkpoint was committed (else only WAL records exist)."""
        return self.manifest is not None


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


@dataclass(frozen=True)
class _Pointer:
    epoch: int
    seq: int
    manifest: str | None


@dataclass(frozen=True)
class _Manifest:
    key: str
    epoch: int
    seq: int
    state: str
    shards: dict[str, list[str]]
    wal_next: int
    prev: str | None

    def covers(self, epoch: int, counter: int) -> bool:
        return epoch < self.epoch or (epoch == self.epoch and counter < self.wal_next)

    def referenced(self) -> set[str]:
        keys = {self.key, self.state}
        for shard_keys in self.shards.values():
            keys.update(shard_keys)
        return keys


# --------------------------------------------------------------------------------------------
# Blob framing
# --------------------------------------------------------------------------------------------


def encode_blob(kind: int, payload: bytes) -> bytes:
    """Prefix ``payload`` with the 20-byte header.

    >>> decode_blob("k", KIND_WAL, encode_blob(KIND_WAL, b"abc"))
    b'abc'
    """
    return _HEADER.pack(_MAGIC, FORMAT_VERSION, kind, 0, len(payload), zlib.crc32(payload)) + (
        payload
    )


def decode_blob(key: str, kind: int, data: bytes) -> bytes:
    """Check the header of an object read from ``key`` and return its payload.

    Raises:
        CheckpointCorruptError: Short, wrong magic/version/kind, wrong length or CRC mismatch.
    """
    what = _KIND_NAMES.get(kind, str(kind))
    if len(data) < _HEADER.size:
        raise errors.CheckpointCorruptError(
            f"Expected a {what} object of at least {_HEADER.size} bytes at key {key!r} "
            f"but got {len(data)} bytes"
        )
    magic, version, got_kind, _reserved, length, crc = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise errors.CheckpointCorruptError(
            f"Expected magic {_MAGIC!r} at key {key!r} but got {magic!r}"
        )
    if version != FORMAT_VERSION:
        raise errors.CheckpointCorruptError(
            f"Expected format version {FORMAT_VERSION} at key {key!r} but got {version!r}"
        )
    if got_kind != kind:
        raise errors.CheckpointCorruptError(
            f"Expected a {what} object at key {key!r} but got kind {got_kind!r}"
        )
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise errors.CheckpointCorruptError(
            f"Expected {length} payload bytes at key {key!r} (truncated or overlong) "
            f"but got {len(payload)}"
        )
    if zlib.crc32(payload) != crc:
        raise errors.CheckpointCorruptError(
            f"Expected CRC-32 {crc:#010x} at key {key!r} but got {zlib.crc32(payload):#010x}"
        )
    return bytes(payload)


def _unpack_map(key: str, payload: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise errors.CheckpointCorruptError(
            f"Expected a msgpack map at key {key!r} but got undecodable bytes: {exc}"
        ) from exc
    if not isinstance(obj, dict):
        raise errors.CheckpointCorruptError(
            f"Expected a msgpack map at key {key!r} but got {type(obj).__name__}"
        )
    if obj.get("format") != FORMAT_VERSION:
        raise errors.CheckpointCorruptError(
            f"Expected format {FORMAT_VERSION} at key {key!r} but got {obj.get('format')!r}"
        )
    return obj


def _field(key: str, obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise errors.CheckpointCorruptError(
            f"Expected field {name!r} of type {kind} at key {key!r} but got {value!r}"
        )
    return value


def _encode_pointer(pointer: _Pointer) -> bytes:
    payload = msgpack.packb(
        {
            "format": FORMAT_VERSION,
            "epoch": pointer.epoch,
            "seq": pointer.seq,
            "manifest": pointer.manifest,
        }
    )
    return encode_blob(KIND_POINTER, payload)


def _decode_pointer(data: bytes) -> _Pointer:
    obj = _unpack_map(POINTER_KEY, decode_blob(POINTER_KEY, KIND_POINTER, data))
    return _Pointer(
        epoch=_field(POINTER_KEY, obj, "epoch", int),
        seq=_field(POINTER_KEY, obj, "seq", int),
        manifest=_field(POINTER_KEY, obj, "manifest", (str, type(None))),
    )


def _encode_manifest(m: _Manifest) -> bytes:
    payload = msgpack.packb(
        {
            "format": FORMAT_VERSION,
            "epoch": m.epoch,
            "seq": m.seq,
            "state": m.state,
            "shards": m.shards,
            "wal_next": m.wal_next,
            "prev": m.prev,
        }
    )
    return encode_blob(KIND_MANIFEST, payload)


def _decode_manifest(key: str, data: bytes) -> _Manifest:
    obj = _unpack_map(key, decode_blob(key, KIND_MANIFEST, data))
    shards_obj = _field(key, obj, "shards", dict)
    shards: dict[str, list[str]] = {}
    for family, keys in shards_obj.items():
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise errors.CheckpointCorruptError(
                f"Expected a list of shard keys for family {family!r} at key {key!r} "
                f"but got {keys!r}"
            )
        shards[str(family)] = list(keys)
    return _Manifest(
        key=key,
        epoch=_field(key, obj, "epoch", int),
        seq=_field(key, obj, "seq", int),
        state=_field(key, obj, "state", str),
        shards=shards,
        wal_next=_field(key, obj, "wal_next", int),
        prev=_field(key, obj, "prev", (str, type(None))),
    )


def _key_epoch(key: str) -> int | None:
    match = _EPOCH_SEQ.search(key)
    return int(match.group(1)) if match else None


def _shard_level(key: str) -> int:
    match = _SHARD_LEVEL.search(key)
    if match is None:
        raise errors.CheckpointCorruptError(
            f"Expected a shard key ending in '-L<level>.bin' but got {key!r}"
        )
    return int(match.group(1))


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    level: int
    key: str | None  # None until written
    payload: bytes | None  # in memory when not yet written


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
        self._retention = retention
        self._fanout = shard_fanout
        self._lock = threading.Lock()
        self._epoch = 0
        self._seq = 0
        self._wal_next = 0
        self._pointer_version: str | None = None
        self._fenced_by: int | None = None
        self._ready = False  # an epoch is claimed and the checkpoint it builds on is loaded
        self._retained: list[_Manifest] = []  # newest first; [0] is the base of the next commit

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

    def _read_pointer(self) -> tuple[_Pointer | None, str | None]:
        """Return (pointer or None if missing/corrupt, version token or None if missing)."""
        try:
            data, version = self._store.get_versioned(POINTER_KEY)
        except errors.ObjectNotFoundError:
            return None, None
        try:
            return _decode_pointer(data), version
        except errors.CheckpointCorruptError as exc:
            logger.warning(
                "checkpoint pointer in %s is unreadable, scanning manifests: %s", self.uri, exc
            )
            return None, version

    def _manifest_keys(self) -> list[str]:
        return [k for k in self._store.list("manifests/") if _MANIFEST_KEY.match(k)]

    def _read_manifest(self, key: str) -> _Manifest:
        try:
            return _decode_manifest(key, self._store.get(key))
        except errors.ObjectNotFoundError as exc:
            raise errors.CheckpointCorruptError(
                f"Expected manifest {key!r} in {self.uri} but it is missing"
            ) from exc

    def _read_payload(self, key: str, kind: int) -> bytes:
        try:
            return decode_blob(key, kind, self._store.get(key))
        except errors.ObjectNotFoundError as exc:
            raise errors.CheckpointCorruptError(
                f"Expected {_KIND_NAMES[kind]} object {key!r} in {self.uri} but it is missing"
            ) from exc

    def _load(self, pointer: _Pointer | None) -> tuple[LoadedCheckpoint | None, list[_Manifest]]:
        """Load the newest loadable checkpoint; return it and its retention chain.

        Candidates: the pointer's manifest, then older manifest keys, newest first. Without a
        readable pointer, every manifest key is a candidate; a pointer naming no manifest means
        nothing was committed yet.
        """
        if pointer is not None and pointer.manifest is None:
            candidates: list[str] = []
        else:
            keys = sorted(self._manifest_keys(), reverse=True)
            if pointer is not None and pointer.manifest is not None:
                newest = pointer.manifest
                candidates = [newest] + [k for k in keys if k < newest]
            else:
                candidates = keys
        chosen: tuple[_Manifest, bytes, dict[str, bytes]] | None = None
        for key in candidates:
            try:
                manifest = self._read_manifest(key)
                state = self._read_payload(manifest.state, KIND_STATE)
                shards = {
                    family: b"".join(self._read_payload(k, KIND_SHARD) for k in keys_)
                    for family, keys_ in manifest.shards.items()
                }
            except errors.CheckpointCorruptError as exc:
                logger.warning(
                    "checkpoint %s in %s is not loadable, trying the previous one: %s",
                    key,
                    self.uri,
                    exc,
                )
                continue
            chosen = (manifest, state, shards)
            break
        if candidates and chosen is None:
            raise errors.CheckpointCorruptError(
                f"Expected a loadable checkpoint among {len(candidates)} manifests in "
                f"{self.uri} but every one is corrupt or incomplete"
            )
        chain: list[_Manifest] = []
        if chosen is not None:
            chain.append(chosen[0])
            while len(chain) < self._retention and chain[-1].prev is not None:
                try:
                    chain.append(self._read_manifest(chain[-1].prev))
                except errors.CheckpointCorruptError as exc:
                    pruned = isinstance(exc.__cause__, errors.ObjectNotFoundError)
                    log = logger.debug if pruned else logger.warning
                    log("retention chain of %s ends early: %s", self.uri, exc)
                    break
        wal = self._load_wal(chosen[0] if chosen is not None else None)
        if chosen is None and not wal:
            return None, chain
        if chosen is None:
            return LoadedCheckpoint(state=b"", shards={}, epoch=0, seq=0, wal=wal), chain
        manifest, state, shards = chosen
        loaded = LoadedCheckpoint(
            state=state,
            shards=shards,
            epoch=manifest.epoch,
            seq=manifest.seq,
            wal=wal,
            manifest=manifest.key,
        )
        return loaded, chain

    def _load_wal(self, manifest: _Manifest | None) -> list[bytes]:
        entries: list[tuple[int, int, str]] = []
        for key in self._store.list("wal/"):
            match = _WAL_KEY.match(key)
            if match is None:
                logger.warning("ignoring unexpected object %s in %s", key, self.uri)
                continue
            epoch, counter = int(match.group(1)), int(match.group(2))
            if manifest is None or not manifest.covers(epoch, counter):
                entries.append((epoch, counter, key))
        records: list[bytes] = []
        for _epoch, _counter, key in sorted(entries):
            try:
                records.append(decode_blob(key, KIND_WAL, self._store.get(key)))
            except errors.ObjectNotFoundError:
                continue  # pruned by a concurrent writer after we listed it: covered
            except errors.CheckpointCorruptError as exc:
                logger.error("skipping corrupt WAL record in %s: %s", self.uri, exc)
        return records

    def load_latest(self) -> LoadedCheckpoint | None:
        """Load the latest committed checkpoint and its WAL without claiming an epoch.

        Returns:
            The checkpoint, or None if the store holds neither a checkpoint nor WAL records.

        Raises:
            CheckpointCorruptError: Every manifest is corrupt or incomplete.
            StorageError: The store failed.
        """
        pointer, _version = self._read_pointer()
        loaded, _chain = self._load(pointer)
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
                pointer, version = self._read_pointer()
                epoch_floor, seq_floor = self._key_floors()
                if pointer is not None:
                    epoch_floor = max(epoch_floor, pointer.epoch)
                    seq_floor = max(seq_floor, pointer.seq)
                claimed = _Pointer(
                    epoch=epoch_floor + 1,
                    seq=pointer.seq if pointer is not None else seq_floor,
                    manifest=pointer.manifest if pointer is not None else None,
                )
                data = _encode_pointer(claimed)
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
            # List and load only after the claim: see the WAL guarantee in the module docstring.
            loaded, chain = self._load(claimed if pointer is not None else None)
            loaded_key = loaded.manifest if loaded is not None else None
            if loaded_key != claimed.manifest:
                # The pointer was unreadable or named a corrupt manifest: re-point it at the one
                # loaded, so a crash before our first commit does not hide it.
                self._swap_pointer(
                    _encode_pointer(_Pointer(epoch=self._epoch, seq=self._seq, manifest=loaded_key))
                )
            self._retained = chain
            self._ready = True
            logger.info("claimed writer epoch %d of %s", self._epoch, self.uri)
            return loaded

    def _key_floors(self) -> tuple[int, int]:
        """Largest epoch in any manifest/WAL key and largest manifest seq."""
        epoch, seq = 0, 0
        for key in self._manifest_keys():
            match = _MANIFEST_KEY.match(key)
            assert match is not None
            epoch, seq = max(epoch, int(match.group(1))), max(seq, int(match.group(2)))
        for prefix in ("wal/", "state/", "shards/"):
            for key in self._store.list(prefix):
                key_epoch = _key_epoch(key)
                if key_epoch is not None:
                    epoch = max(epoch, key_epoch)
        return epoch, seq

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

    def _fence_if_newer(self, pointer: _Pointer | None, version: str | None) -> None:
        if pointer is None:
            raise errors.CheckpointCorruptError(
                f"Expected a readable {POINTER_KEY!r} in {self.uri} but it is "
                f"{'missing' if version is None else 'corrupt'}"
            )
        if pointer.epoch > self._epoch:
            self._fenced_by = pointer.epoch
            logger.error("%s", self._fenced_error(pointer.epoch))
            raise self._fenced_error(pointer.epoch)

    def append_wal(self, record: bytes) -> None:
        """Durably store one WAL record of this epoch; it is replayed until a commit covers it.

        Returns only after the record is stored and the pointer still names this epoch, so a
        returned append is never lost (see the module docstring).

        Raises:
            FencedError: A newer writer owns the store (the record must not be acknowledged).
            StorageError: The store failed (the record must not be acknowledged).
        """
        with self._lock:
            self._check_writable()
            counter = self._wal_next
            self._wal_next += 1
            key = f"wal/{self._epoch:010d}-{counter:012d}.bin"
            self._store.put_if_absent(key, encode_blob(KIND_WAL, bytes(record)))
            pointer, version = self._read_pointer()
            self._fence_if_newer(pointer, version)

    def commit(self, parts: CheckpointParts, *, wal_next: int | None = None) -> CommitInfo:
        """Write a checkpoint: immutable blobs first, the pointer by compare-and-swap last.

        Args:
            parts: The state and the shard bytes added since the last successful commit.
            wal_next: WAL records of this epoch with a lower counter are covered by ``parts``;
                defaults to every record appended so far (:attr:`wal_next`).

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
            families = set(base.shards) if base is not None else set()
            families.update(parts.new_shards)
            for family in families:
                if not _FAMILY.match(family):
                    raise errors.ConfigError(
                        f"Expected a shard family name matching {_FAMILY.pattern} "
                        f"but got {family!r}"
                    )
            self._seq += 1
            seq, epoch = self._seq, self._epoch
            stamp = f"{epoch:010d}-{seq:012d}"
            written = [0, 0]

            def put(key: str, data: bytes) -> None:
                self._store.put_if_absent(key, data)
                written[0] += len(data)
                written[1] += 1

            state_key = f"state/{stamp}.bin"
            put(state_key, encode_blob(KIND_STATE, bytes(parts.state)))
            shards: dict[str, list[str]] = {}
            for family in sorted(families):
                old = base.shards.get(family, []) if base is not None else []
                new = bytes(parts.new_shards.get(family, b""))
                shards[family] = self._compact(family, old, new, stamp, put)
            manifest = _Manifest(
                key=f"manifests/{stamp}.bin",
                epoch=epoch,
                seq=seq,
                state=state_key,
                shards=shards,
                wal_next=covered,
                prev=base.key if base is not None else None,
            )
            put(manifest.key, _encode_manifest(manifest))
            pointer_bytes = _encode_pointer(_Pointer(epoch=epoch, seq=seq, manifest=manifest.key))
            self._swap_pointer(pointer_bytes)
            written[0] += len(pointer_bytes)
            written[1] += 1
            self._retained = [manifest, *self._retained][: self._retention]
            self._commits_unpruned += 1
            if self._commits_unpruned >= self._prune_every:  # listing costs requests: batch it
                self._commits_unpruned = 0
                self._prune()
            return CommitInfo(
                epoch=epoch,
                seq=seq,
                bytes_written=written[0],
                objects_written=written[1],
                seconds=time.monotonic() - start,
                manifest=manifest.key,
            )

    def _swap_pointer(self, data: bytes) -> None:
        version = self._pointer_version
        for _attempt in range(3):
            assert version is not None
            try:
                self._pointer_version = self._store.put_if_version(POINTER_KEY, data, version)
                return
            except errors.PreconditionFailedError:
                pointer, version = self._read_pointer()
                self._fence_if_newer(pointer, version)
                # Same epoch: only this manager writes it, so an earlier write of ours landed
                # without us seeing the reply. Our manifest is built on our last known base,
                # so swapping over it is correct.
        raise errors.PreconditionFailedError(
            f"Expected to swap {POINTER_KEY!r} in {self.uri} but its version kept changing"
        )

    def _compact(
        self,
        family: str,
        old_keys: list[str],
        new: bytes,
        stamp: str,
        put: Callable[[str, bytes], None],
    ) -> list[str]:
        """Add ``new`` as a level-0 shard, merge full levels, write what is new; return keys."""
        entries = [_Pending(_shard_level(k), k, None) for k in old_keys]
        if new:
            entries.append(_Pending(0, None, new))
        while True:
            counts: dict[int, int] = {}
            for entry in entries:
                counts[entry.level] = counts.get(entry.level, 0) + 1
            full = sorted(level for level, n in counts.items() if n >= self._fanout)
            if not full or full[0] >= _MAX_LEVEL:
                break
            level = full[0]
            group = [e for e in entries if e.level == level]
            merged = b"".join(
                e.payload if e.payload is not None else self._read_payload(str(e.key), KIND_SHARD)
                for e in group
            )
            entries = [e for e in entries if e.level != level]
            entries.append(_Pending(level + 1, None, merged))
        keys: list[str] = []
        for entry in entries:
            if entry.key is None:
                assert entry.payload is not None
                entry.key = f"shards/{family}/{stamp}-L{entry.level:02d}.bin"
                put(entry.key, encode_blob(KIND_SHARD, entry.payload))
            keys.append(entry.key)
        return keys

    def _prune(self) -> None:
        """Delete what no retained manifest references; log, never raise."""
        if not self._retained:
            return
        keep: set[str] = set()
        for manifest in self._retained:
            keep |= manifest.referenced()
        oldest = self._retained[-1]
        deleted = 0
        try:
            for prefix in ("manifests/", "state/", "shards/"):
                for key in self._store.list(prefix):
                    epoch = _key_epoch(key)
                    if key in keep or epoch is None or epoch > self._epoch:
                        continue
                    self._store.delete(key)
                    deleted += 1
            for key in self._store.list("wal/"):
                match = _WAL_KEY.match(key)
                if match is None:
                    continue
                epoch, counter = int(match.group(1)), int(match.group(2))
                if epoch <= self._epoch and oldest.covers(epoch, counter):
                    self._store.delete(key)
                    deleted += 1
        except errors.StorageError as exc:
            logger.warning("pruning old checkpoint objects in %s failed: %s", self.uri, exc)
        if deleted:
            logger.debug("pruned %d objects in %s", deleted, self.uri)
