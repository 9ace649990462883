"""The storage backends, one module each, behind a registry keyed by URI scheme.

Adding a backend: write ``stores/<name>.py`` with its store class and ending in
``BACKEND = Backend(...)`` (see :class:`~art_ray_metrics.durable.stores.base.Backend`: the
schemes it serves, its opener, and the environment variables it reads, split into non-secret
``settings`` and ``secrets``), and add it to :data:`BUILTIN`. A store of another package can
be added at run time with :func:`register_backend`.

``open_store(..., env=...)`` overrides the environment with credentials held in memory and
:meth:`~art_ray_metrics.durable.stores.cloud.ObstoreStore.use_env` swaps them later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

from art_ray_metrics import errors
from art_ray_metrics.durable.stores import gcs, local, memory, s3
from art_ray_metrics.durable.stores.base import Backend, ObjectStore, redact

__all__ = ["BACKENDS", "BUILTIN", "backend_for", "open_store", "register_backend"]

BUILTIN: Final[tuple[Backend, ...]] = (local.BACKEND, memory.BACKEND, s3.BACKEND, gcs.BACKEND)
"""The backends every process has."""

BACKENDS: dict[str, Backend] = {}
"""Backends by URI scheme; add one with :func:`register_backend`."""


def register_backend(backend: Backend) -> Backend:
    """Serve ``backend.schemes`` with ``backend`` (replacing an earlier entry); return it."""
    for scheme in backend.schemes:
        BACKENDS[scheme.lower()] = backend
    return backend


for _builtin in BUILTIN:
    register_backend(_builtin)


def _scheme(uri: str) -> str:
    return urlsplit(uri).scheme.lower() if "://" in uri else ""


def backend_for(uri: str) -> Backend:
    """The registered backend serving ``uri``.

    Raises:
        ConfigError: No backend serves its scheme.
    """
    backend = BACKENDS.get(_scheme(uri))
    if backend is None:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS) if s) or "none"
        raise errors.ConfigError(
            f"Expected a storage URI with a known scheme ({known}) or a plain path "
            f"but got {redact(uri)!r}"
        )
    return backend


def open_store(
    uri: str, *, timeout_s: float = 10.0, env: Mapping[str, str] | None = None
) -> ObjectStore:
    """Open the object store a URI names.

    Args:
        uri: A plain directory path (relative or absolute), ``file:///dir``,
            ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``memory://name`` or any scheme
            added with :func:`register_backend`.
        timeout_s: Bound on each request phase and on retrying (S3 and GCS only).
        env: Variables that override the process environment (credentials held in memory).

    Returns:
        The store; its ``uri`` is credential-free.

    Raises:
        ConfigError: Unknown scheme, missing bucket or name, or an unusable S3/GCS config.
        StorageError: A local directory cannot be created.

    >>> open_store("memory://doc-example").uri
    'memory://doc-example'
    """
    if not isinstance(uri, str) or uri.strip() == "":
        raise errors.ConfigError(f"Expected a storage URI or directory path but got {uri!r}")
    if not (timeout_s > 0):
        raise errors.ConfigError(f"Expected timeout_s > 0 but got {timeout_s!r}")
    return backend_for(uri).open(uri, timeout_s, dict(env or {}))
