"""Object stores addressed by URI: the import path the rest of the package, tests and docs use.

The stores live in :mod:`art_ray_metrics.durable.stores`, one backend per module (local
directory, memory, S3, GCS) behind a registry: :class:`ObjectStore` (plain reads and writes plus
**create-only** and **compare-and-swap**), :func:`open_store`, :func:`backend_for`,
:func:`register_backend` and :func:`check_conditional_writes` are re-exported here unchanged.
"""

from __future__ import annotations

from art_ray_metrics.durable.stores import BACKENDS, backend_for, open_store, register_backend
from art_ray_metrics.durable.stores.base import (
    Backend,
    ObjectStore,
    check_conditional_writes,
    check_key,
)
from art_ray_metrics.durable.stores.cloud import ObstoreStore
from art_ray_metrics.durable.stores.local import LocalDirStore
from art_ray_metrics.durable.stores.memory import InMemoryStore

__all__ = [
    "BACKENDS",
    "Backend",
    "InMemoryStore",
    "LocalDirStore",
    "ObjectStore",
    "ObstoreStore",
    "backend_for",
    "check_conditional_writes",
    "check_key",
    "open_store",
    "register_backend",
]
