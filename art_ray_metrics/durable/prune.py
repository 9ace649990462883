"""Pruning a run's checkpoint objects: which ones no retained commit needs, and deleting them.

:func:`list_garbage` names the manifests, state blobs and shards of a writer's epoch or older
that no retained manifest references, and the WAL records the oldest retained manifest covers;
:func:`delete_objects` deletes them. Both log a storage failure and never raise: a failed
pruning leaves garbage for the next one. When and under which lock they run is
:class:`~art_ray_metrics.durable.checkpoint.CheckpointManager`'s; the retention rule is in
``docs/design.md`` ("The commit protocol").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from art_ray_metrics import errors
from art_ray_metrics.durable.layout import WAL_KEY, Manifest, key_epoch

if TYPE_CHECKING:
    from art_ray_metrics.durable.storage import ObjectStore

__all__ = ["delete_objects", "list_garbage"]

log = logging.getLogger(__name__)


def list_garbage(store: ObjectStore, retained: Sequence[Manifest], epoch: int) -> list[str]:
    """The keys of ``epoch`` or older that no manifest of ``retained`` (newest first) needs.

    Nothing while ``retained`` is empty; what was listed so far if listing the store fails
    (logged)."""
    if not retained:
        return []
    keep: set[str] = set()
    for manifest in retained:
        keep |= manifest.referenced()
    oldest = retained[-1]
    garbage: list[str] = []
    try:
        for prefix in ("manifests/", "state/", "shards/"):
            for key in store.list(prefix):
                object_epoch = key_epoch(key)
                if key in keep or object_epoch is None or object_epoch > epoch:
                    continue
                garbage.append(key)
        for key in store.list("wal/"):
            match = WAL_KEY.match(key)
            if match is None:
                continue
            wal_epoch, counter = int(match.group(1)), int(match.group(2))
            if wal_epoch <= epoch and oldest.covers(wal_epoch, counter):
                garbage.append(key)
    except errors.StorageError as exc:
        log.warning("listing old checkpoint objects in %s failed: %s", store.uri, exc)
    return garbage


def delete_objects(store: ObjectStore, keys: Iterable[str]) -> None:
    """Delete ``keys`` in order; stop at the first storage failure (logged, not raised)."""
    deleted = 0
    try:
        for key in keys:
            store.delete(key)
            deleted += 1
    except errors.StorageError as exc:
        log.warning("pruning old checkpoint objects in %s failed: %s", store.uri, exc)
    if deleted:
        log.debug("pruned %d objects in %s", deleted, store.uri)
