"""Reading a run's checkpoints: the pointer, the newest loadable commit and the WAL after it.

:class:`CheckpointReader` only reads (no epoch is claimed); the
:class:`~art_ray_metrics.durable.checkpoint.CheckpointManager` reads through it before it writes.
A corrupt commit falls back to the previous one; a corrupt WAL record is skipped and logged (see
``docs/design.md``, "The commit protocol").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from art_ray_metrics import errors
from art_ray_metrics.durable.layout import (
    KIND_NAMES,
    KIND_SHARD,
    KIND_STATE,
    KIND_WAL,
    MANIFEST_KEY,
    POINTER_KEY,
    WAL_KEY,
    Manifest,
    Pointer,
    decode_blob,
    decode_manifest,
    decode_pointer,
    key_epoch,
)

if TYPE_CHECKING:
    from art_ray_metrics.durable.stores.base import ObjectStore

__all__ = ["CheckpointReader", "LoadedCheckpoint"]

log = logging.getLogger(__name__)


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


class CheckpointReader:
    """Reads the checkpoints under one store.

    Args:
        store: Where checkpoints live.
        retention: How many manifests the retention chain of a load holds, >= 1.
    """

    def __init__(self, store: ObjectStore, retention: int) -> None:
        self.store = store
        self.retention = retention

    @property
    def uri(self) -> str:
        """The store URI."""
        return self.store.uri

    def read_pointer(self) -> tuple[Pointer | None, str | None]:
        """Return (pointer or None if missing/corrupt, version token or None if missing)."""
        try:
            data, version = self.store.get_versioned(POINTER_KEY)
        except errors.ObjectNotFoundError:
            return None, None
        try:
            return decode_pointer(data), version
        except errors.CheckpointCorruptError as exc:
            log.warning(
                "checkpoint pointer in %s is unreadable, scanning manifests: %s", self.uri, exc
            )
            return None, version

    def manifest_keys(self) -> list[str]:
        return [k for k in self.store.list("manifests/") if MANIFEST_KEY.match(k)]

    def read_manifest(self, key: str) -> Manifest:
        try:
            return decode_manifest(key, self.store.get(key))
        except errors.ObjectNotFoundError as exc:
            raise errors.CheckpointCorruptError(
                f"Expected manifest {key!r} in {self.uri} but it is missing"
            ) from exc

    def read_payload(self, key: str, kind: int) -> bytes:
        try:
            return decode_blob(key, kind, self.store.get(key))
        except errors.ObjectNotFoundError as exc:
            raise errors.CheckpointCorruptError(
                f"Expected {KIND_NAMES[kind]} object {key!r} in {self.uri} but it is missing"
            ) from exc

    def load(self, pointer: Pointer | None) -> tuple[LoadedCheckpoint | None, list[Manifest]]:
        """Load the newest loadable checkpoint; return it and its retention chain.

        Candidates: the pointer's manifest, then older manifest keys, newest first. Without a
        readable pointer, every manifest key is a candidate; a pointer naming no manifest means
        nothing was committed yet.
        """
        chosen = self._newest_loadable(self._candidates(pointer))
        chain = self._chain(chosen[0]) if chosen is not None else []
        wal = self.load_wal(chosen[0] if chosen is not None else None)
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

    def _candidates(self, pointer: Pointer | None) -> list[str]:
        if pointer is not None and pointer.manifest is None:
            return []
        keys = sorted(self.manifest_keys(), reverse=True)
        if pointer is not None and pointer.manifest is not None:
            newest = pointer.manifest
            return [newest] + [k for k in keys if k < newest]
        return keys

    def _newest_loadable(
        self, candidates: list[str]
    ) -> tuple[Manifest, bytes, dict[str, bytes]] | None:
        """The first candidate whose manifest, state and shards all read back."""
        for key in candidates:
            try:
                manifest = self.read_manifest(key)
                state = self.read_payload(manifest.state, KIND_STATE)
                shards = {
                    family: b"".join(self.read_payload(k, KIND_SHARD) for k in keys_)
                    for family, keys_ in manifest.shards.items()
                }
            except errors.CheckpointCorruptError as exc:
                log.warning(
                    "checkpoint %s in %s is not loadable, trying the previous one: %s",
                    key,
                    self.uri,
                    exc,
                )
                continue
            return manifest, state, shards
        if candidates:
            raise errors.CheckpointCorruptError(
                f"Expected a loadable checkpoint among {len(candidates)} manifests in "
                f"{self.uri} but every one is corrupt or incomplete"
            )
        return None

    def _chain(self, newest: Manifest) -> list[Manifest]:
        """``newest`` and the manifests before it, up to ``retention`` (fewer if pruned)."""
        chain = [newest]
        while len(chain) < self.retention and chain[-1].prev is not None:
            try:
                chain.append(self.read_manifest(chain[-1].prev))
            except errors.CheckpointCorruptError as exc:
                pruned = isinstance(exc.__cause__, errors.ObjectNotFoundError)
                report = log.debug if pruned else log.warning
                report("retention chain of %s ends early: %s", self.uri, exc)
                break
        return chain

    def load_wal(self, manifest: Manifest | None) -> list[bytes]:
        entries: list[tuple[int, int, str]] = []
        for key in self.store.list("wal/"):
            match = WAL_KEY.match(key)
            if match is None:
                log.warning("ignoring unexpected object %s in %s", key, self.uri)
                continue
            epoch, counter = int(match.group(1)), int(match.group(2))
            if manifest is None or not manifest.covers(epoch, counter):
                entries.append((epoch, counter, key))
        records: list[bytes] = []
        for _epoch, _counter, key in sorted(entries):
            try:
                records.append(decode_blob(key, KIND_WAL, self.store.get(key)))
            except errors.ObjectNotFoundError:
                continue  # pruned by a concurrent writer after we listed it: covered
            except errors.CheckpointCorruptError as exc:
                log.error("skipping corrupt WAL record in %s: %s", self.uri, exc)
        return records

    def key_floors(self) -> tuple[int, int]:
        """Largest epoch in any manifest/WAL key and largest manifest seq."""
        epoch, seq = 0, 0
        for key in self.manifest_keys():
            match = MANIFEST_KEY.match(key)
            assert match is not None
            epoch, seq = max(epoch, int(match.group(1))), max(seq, int(match.group(2)))
        for prefix in ("wal/", "state/", "shards/"):
            for key in self.store.list(prefix):
                found = key_epoch(key)
                if found is not None:
                    epoch = max(epoch, found)
        return epoch, seq
