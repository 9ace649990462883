"""The cold formats of the commit protocol, declared once: object keys, the blob header, the
``CHECKPOINT`` pointer and the manifests.

Every binary object starts with a 20-byte header (:func:`encode_blob` / :func:`decode_blob`):
magic ``ARMC``, format version, kind, a reserved byte, payload length and CRC-32. The pointer
and a manifest are msgpack maps ``{"format": 1, ...}`` declared by the pydantic models
:class:`Pointer` and :class:`Manifest` (strict: a field of the wrong type, ``True`` for an int
included, is refused); their field order is the byte order on disk, so fields are only ever
appended. The key layout is in ``docs/design.md`` ("The commit protocol"). Decoding goes through
:func:`art_ray_metrics.core.wire.decode_envelope`; every failure is a
:class:`~art_ray_metrics.errors.CheckpointCorruptError` naming the key.
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Any

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from art_ray_metrics import errors
from art_ray_metrics.core.wire import decode_envelope

__all__ = [
    "FAMILY",
    "FORMAT_VERSION",
    "KIND_MANIFEST",
    "KIND_NAMES",
    "KIND_POINTER",
    "KIND_SHARD",
    "KIND_STATE",
    "KIND_WAL",
    "MANIFEST_KEY",
    "POINTER_KEY",
    "WAL_KEY",
    "Manifest",
    "Pointer",
    "decode_blob",
    "decode_manifest",
    "decode_pointer",
    "encode_blob",
    "encode_manifest",
    "encode_pointer",
    "key_epoch",
    "shard_key",
    "shard_level",
    "stamp",
    "wal_key",
]

FORMAT_VERSION = 1
POINTER_KEY = "CHECKPOINT"

_MAGIC = b"ARMC"
_HEADER = struct.Struct(">4sHBBQI")
KIND_POINTER, KIND_MANIFEST, KIND_STATE, KIND_SHARD, KIND_WAL = 1, 2, 3, 4, 5
KIND_NAMES = {1: "pointer", 2: "manifest", 3: "state", 4: "shard", 5: "WAL record"}

_EPOCH_SEQ = re.compile(r"(\d{10})-(\d{12})")
MANIFEST_KEY = re.compile(r"^manifests/(\d{10})-(\d{12})\.bin$")
WAL_KEY = re.compile(r"^wal/(\d{10})-(\d{12})\.bin$")
_SHARD_LEVEL = re.compile(r"-L(\d{2})\.bin$")
FAMILY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
"""What a shard family may be called."""


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def stamp(epoch: int, seq: int) -> str:
    """``EEEEEEEEEE-SSSSSSSSSSSS``: the part of a commit's keys that names it."""
    return f"{epoch:010d}-{seq:012d}"


def wal_key(epoch: int, counter: int) -> str:
    """The key of one write-ahead-log record."""
    return f"wal/{stamp(epoch, counter)}.bin"


def shard_key(family: str, commit_stamp: str, level: int) -> str:
    """The key of one shard of ``family`` written by the commit ``commit_stamp``."""
    return f"shards/{family}/{commit_stamp}-L{level:02d}.bin"


def key_epoch(key: str) -> int | None:
    """The writer epoch in a manifest, state, shard or WAL key (None: no stamp in it)."""
    match = _EPOCH_SEQ.search(key)
    return int(match.group(1)) if match else None


def shard_level(key: str) -> int:
    """The compaction level of a shard key.

    Raises:
        CheckpointCorruptError: The key does not end in ``-L<level>.bin``.
    """
    match = _SHARD_LEVEL.search(key)
    if match is None:
        raise errors.CheckpointCorruptError(
            f"Expected a shard key ending in '-L<level>.bin' but got {key!r}"
        )
    return int(match.group(1))


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
    what = KIND_NAMES.get(kind, str(kind))
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


# --------------------------------------------------------------------------------------------
# Pointer and manifest
# --------------------------------------------------------------------------------------------

_STRICT = ConfigDict(strict=True, frozen=True)


class Pointer(BaseModel):
    """The ``CHECKPOINT`` object: the writer epoch that owns the store and its last commit.

    Attributes:
        epoch: The writer epoch.
        seq: The commit sequence of ``manifest``.
        manifest: The key of the committed manifest; None until the first commit.
    """

    model_config = _STRICT

    format: int = FORMAT_VERSION
    epoch: int
    seq: int
    manifest: str | None = None


class Manifest(BaseModel):
    """One commit: its state blob, its shards per family, and the WAL records it covers.

    Attributes:
        key: Where the manifest is stored (not part of its bytes).
        epoch: The writer epoch of the commit.
        seq: Its commit sequence.
        state: The key of its state blob.
        shards: Per shard family, the keys of its shards.
        wal_next: WAL records of ``epoch`` with a lower counter (and of every older epoch)
            are covered by this commit.
        prev: The previous commit's manifest key (None for the first).
    """

    model_config = _STRICT

    key: str = Field(exclude=True)
    format: int = FORMAT_VERSION
    epoch: int
    seq: int
    state: str
    shards: dict[str, list[str]]
    wal_next: int
    prev: str | None = None

    def covers(self, epoch: int, counter: int) -> bool:
        """Whether the WAL record ``(epoch, counter)`` is in this commit."""
        return epoch < self.epoch or (epoch == self.epoch and counter < self.wal_next)

    def referenced(self) -> set[str]:
        """Every key this commit needs: itself, its state and its shards."""
        keys = {self.key, self.state}
        for shard_keys in self.shards.values():
            keys.update(shard_keys)
        return keys


def _read_map(key: str, kind: int, data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = decode_envelope(
        decode_blob(key, kind, data),
        what=f"the {KIND_NAMES[kind]} at key {key!r}",
        versions=(FORMAT_VERSION,),
        error=errors.CheckpointCorruptError,
    )
    return obj


def _invalid(key: str, exc: ValidationError) -> errors.CheckpointCorruptError:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    return errors.CheckpointCorruptError(
        f"Expected field {field!r} at key {key!r} to be valid but got "
        f"{first.get('input')!r}: {first['msg']}"
    )


def encode_pointer(pointer: Pointer) -> bytes:
    """The bytes of the ``CHECKPOINT`` object."""
    return encode_blob(KIND_POINTER, msgpack.packb(pointer.model_dump()))


def decode_pointer(data: bytes) -> Pointer:
    """Parse the ``CHECKPOINT`` object.

    Raises:
        CheckpointCorruptError: Bad header, undecodable, unknown format or a bad field.
    """
    obj = _read_map(POINTER_KEY, KIND_POINTER, data)
    try:
        return Pointer.model_validate(obj)
    except ValidationError as exc:
        raise _invalid(POINTER_KEY, exc) from None


def encode_manifest(manifest: Manifest) -> bytes:
    """The bytes of a manifest object."""
    return encode_blob(KIND_MANIFEST, msgpack.packb(manifest.model_dump()))


def decode_manifest(key: str, data: bytes) -> Manifest:
    """Parse the manifest read from ``key``.

    Raises:
        CheckpointCorruptError: Bad header, undecodable, unknown format or a bad field.
    """
    obj = _read_map(key, KIND_MANIFEST, data)
    try:
        return Manifest.model_validate({**obj, "key": key})
    except ValidationError as exc:
        raise _invalid(key, exc) from None
