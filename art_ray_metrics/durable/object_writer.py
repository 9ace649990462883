"""Writing the objects of one checkpoint commit, in parallel where the store allows it.

:class:`ObjectWriter` puts a commit's objects and counts the bytes and objects it wrote (for
:class:`~art_ray_metrics.durable.checkpoint.CommitInfo`). Given a pool from :func:`write_pool`
(on a store that takes concurrent writes), :meth:`ObjectWriter.put_all` writes one phase's
objects at once, so a commit waits for one storage round trip per phase instead of one per
object. Which objects a commit writes, and in which phases, is
:meth:`~art_ray_metrics.durable.checkpoint.CheckpointManager.commit`'s; see ``docs/design.md``
("The commit protocol").
"""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from art_ray_metrics.durable.storage import ObjectStore

__all__ = ["ObjectWriter", "write_pool"]

_WRITE_THREADS = 8
"""Objects of one commit written at once at most (on a store that takes concurrent writes)."""


def write_pool() -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool for :class:`ObjectWriter`, for a store that takes concurrent writes."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=_WRITE_THREADS, thread_name_prefix="arm-ckpt-write"
    )


class ObjectWriter:
    """Creates the objects of one commit and counts what it wrote.

    ``pool``: when given (a store that takes concurrent writes, see
    :attr:`~art_ray_metrics.durable.checkpoint.CheckpointManager.concurrent`),
    :meth:`put_all` writes its objects in parallel, so a commit waits for one storage round trip
    (one fsync, one request) per phase instead of one per object."""

    def __init__(
        self, store: ObjectStore, pool: concurrent.futures.ThreadPoolExecutor | None = None
    ) -> None:
        self._store = store
        self._pool = pool
        self.bytes_written = 0
        self.objects_written = 0

    def put(self, key: str, data: bytes) -> None:
        """Create one object (create-only) and count it."""
        self._store.put_if_absent(key, data)
        self.count(data)

    def put_all(self, objects: list[tuple[str, bytes, bool]]) -> None:
        """Write ``(key, data, create_only)`` objects, none named by a pointer yet: in any
        order, in parallel when a pool is given. Raises the first failure (in list order) once
        every write has ended."""

        def one(key: str, data: bytes, create_only: bool) -> None:
            if create_only:
                self._store.put_if_absent(key, data)
            else:
                self._store.put(key, data)

        if self._pool is None or len(objects) < 2:
            for key, data, create_only in objects:
                one(key, data, create_only)
                self.count(data)
            return
        futures = [self._pool.submit(one, *obj) for obj in objects]
        concurrent.futures.wait(futures)
        for future, (_key, data, _create) in zip(futures, objects, strict=True):
            if future.exception() is None:
                self.count(data)
        for future in futures:
            exc = future.exception()
            if exc is not None:
                raise exc

    def count(self, data: bytes) -> None:
        """Count ``data`` as one object written (also for a write made elsewhere: the pointer)."""
        self.bytes_written += len(data)
        self.objects_written += 1
