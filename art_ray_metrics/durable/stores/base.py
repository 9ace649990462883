"""What every object store offers, and the checks all of them share.

:class:`ObjectStore` is the protocol: plain reads and writes plus **create-only** and
**compare-and-swap** (``docs/design.md``, "The commit protocol", has the table of how each
backend provides them). Every failure is a :class:`~art_ray_metrics.errors.StorageError` naming
the store and key, never credentials. :class:`Backend` is one registry entry (see
:mod:`art_ray_metrics.durable.stores`); :func:`check_conditional_writes` probes that a store
really refuses losing conditional writes.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from art_ray_metrics import errors

__all__ = [
    "RESERVED_PREFIX",
    "Backend",
    "ObjectStore",
    "check_conditional_writes",
    "check_key",
    "check_prefix",
    "first_line",
    "redact",
]

RESERVED_PREFIX = ".arm-"
"""Key segments starting with this are the stores' own (lock and temporary files)."""


@runtime_checkable
class ObjectStore(Protocol):
    """A flat key → bytes store with create-only and compare-and-swap writes."""

    uri: str

    def get(self, key: str) -> bytes:
        """Return the object's bytes; raise ObjectNotFoundError if absent."""
        ...

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Return the object's bytes and its opaque version token, read atomically."""
        ...

    def put(self, key: str, data: bytes) -> str:
        """Overwrite unconditionally; return the new version token."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create the object; raise PreconditionFailedError if it exists."""
        ...

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        """Overwrite only if the current version is ``version``; else PreconditionFailedError."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys that start with ``prefix``."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object; a missing object is not an error."""
        ...


def check_key(uri: str, key: str) -> str:
    """Validate an object key and return it.

    Args:
        uri: The store URI, named in the error.
        key: A relative, ``/``-separated key.

    Returns:
        The key unchanged.

    Raises:
        StorageError: The key is empty, absolute, has empty, ``.``, ``..`` or reserved segments.

    >>> check_key("memory://x", "wal/0001.bin")
    'wal/0001.bin'
    """
    ok = isinstance(key, str) and key != "" and "\\" not in key and "\x00" not in key
    if ok:
        for segment in key.split("/"):
            if segment in ("", ".", "..") or segment.startswith(RESERVED_PREFIX):
                ok = False
                break
    if not ok:
        raise errors.StorageError(
            f"Expected a relative object key of non-empty segments (no '.', '..', "
            f"'{RESERVED_PREFIX}*') in {uri} but got {key!r}"
        )
    return key


def check_prefix(uri: str, prefix: str) -> str:
    """Validate a listing prefix (relative, no NUL) and return it.

    Raises:
        StorageError: The prefix is absolute or not a string.
    """
    if not isinstance(prefix, str) or prefix.startswith("/") or "\x00" in prefix:
        raise errors.StorageError(
            f"Expected a relative key prefix for listing {uri} but got {prefix!r}"
        )
    return prefix


def redact(uri: str) -> str:
    """Drop user info, query and fragment from a URI so it never shows credentials."""
    parts = urlsplit(uri)
    if parts.scheme == "":
        return uri
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most ``limit`` characters."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "…"


@dataclass(frozen=True)
class Backend:
    """One storage back end: its URI schemes, how to open it, and the environment it reads.

    Attributes:
        schemes: URI schemes it serves (``""`` is a plain directory path).
        open: ``open(uri, timeout_s, env)``; ``env`` overrides the process environment for
            the variables below (credentials the aggregator holds in memory).
        settings: Environment variables that configure it and are not secret (endpoints,
            regions); the aggregator's constructor carries the driver's values.
        secrets: Environment variables holding credentials; they are only ever handed to
            the aggregator in memory, never through Ray's runtime environment.
    """

    schemes: tuple[str, ...]
    open: Callable[[str, float, Mapping[str, str]], ObjectStore]
    settings: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()


def check_conditional_writes(store: ObjectStore) -> None:
    """Check that ``store`` honours create-only and compare-and-swap writes (fencing needs both).

    Creates a probe object twice (the second must fail), swaps it against its version, then
    against that now stale version (must fail), and deletes it.

    Raises:
        ConditionalWritesUnsupportedError: The store accepted a write it had to refuse.
        StorageError: The store failed.
    """
    key = f"fencing-probe/{uuid.uuid4().hex}"
    try:
        first = store.put_if_absent(key, b"probe-1")
        failures = []
        try:
            store.put_if_absent(key, b"probe-2")
            failures.append("a second create-only write (If-None-Match: *) succeeded")
        except errors.PreconditionFailedError:
            pass
        current = store.get_versioned(key)[1]
        if current != first:  # the second create overwrote the object: swap from what is there
            first = current
        store.put_if_version(key, b"probe-3", first)
        try:
            store.put_if_version(key, b"probe-4", first)
            failures.append("a compare-and-swap write against a stale version (If-Match) succeeded")
        except errors.PreconditionFailedError:
            pass
    finally:
        with contextlib.suppress(errors.StorageError):
            store.delete(key)
    if failures:
        raise errors.ConditionalWritesUnsupportedError(
            f"Expected {store.uri} to refuse conditional writes that lose, but "
            f"{' and '.join(failures)}: a stale aggregator could not be fenced off. Use storage "
            "that honours If-None-Match/If-Match, or set "
            "AggregatorConfig(require_conditional_writes=False) to run unfenced at your own risk"
        )
