"""Shard compaction: how a commit adds a shard family's new bytes and merges full levels.

A commit adds a family's new bytes as one level-0 shard; whenever ``fanout`` shards share a
level they are concatenated into one shard of the next level (shard payloads are
concatenable), so bytes per commit do not grow with history except on amortised merges.
:func:`compact_family` computes a family's shard list for the next manifest and hands the new
shards to a ``put`` callback; the manager writes them with the rest of the commit. The key and
level format are :mod:`~art_ray_metrics.durable.layout`'s; the rule is in ``docs/design.md``
("The commit protocol").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from art_ray_metrics.durable.layout import KIND_SHARD, encode_blob, shard_key, shard_level

if TYPE_CHECKING:
    from art_ray_metrics.durable.reader import CheckpointReader

__all__ = ["compact_family"]

_MAX_LEVEL = 99  # a shard key holds the level in two digits


@dataclass
class _Pending:
    level: int
    key: str | None  # None until written
    payload: bytes | None  # in memory when not yet written


def compact_family(
    family: str,
    old_keys: list[str],
    new: bytes,
    commit_stamp: str,
    *,
    fanout: int,
    reader: CheckpointReader,
    put: Callable[[str, bytes], None],
) -> list[str]:
    """Add ``new`` as a level-0 shard, merge full levels, write what is new; return keys.

    ``old_keys`` are the family's shards in the base manifest; a merged one is read through
    ``reader``. Each new shard is handed to ``put`` as ``(key, blob)``, keyed by
    ``commit_stamp``.

    Raises:
        CheckpointCorruptError: A shard to merge is missing or corrupt, or an old key names
            no level.
        StorageError: Reading a shard to merge failed.
    """
    entries = [_Pending(shard_level(k), k, None) for k in old_keys]
    if new:
        entries.append(_Pending(0, None, new))
    while True:
        counts: dict[int, int] = {}
        for entry in entries:
            counts[entry.level] = counts.get(entry.level, 0) + 1
        full = sorted(level for level, n in counts.items() if n >= fanout)
        if not full or full[0] >= _MAX_LEVEL:
            break
        level = full[0]
        group = [e for e in entries if e.level == level]
        merged = b"".join(
            e.payload if e.payload is not None else reader.read_payload(str(e.key), KIND_SHARD)
            for e in group
        )
        entries = [e for e in entries if e.level != level]
        entries.append(_Pending(level + 1, None, merged))
    keys: list[str] = []
    for entry in entries:
        if entry.key is None:
            assert entry.payload is not None
            entry.key = shard_key(family, commit_stamp, entry.level)
            put(entry.key, encode_blob(KIND_SHARD, entry.payload))
        keys.append(entry.key)
    return keys
