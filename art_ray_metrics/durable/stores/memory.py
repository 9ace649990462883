"""``memory://name``: a thread-safe in-process store for tests (versions are a generation counter)."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Mapping
from typing import ClassVar

from art_ray_metrics import errors
from art_ray_metrics.durable.stores.base import Backend, check_key, check_prefix

__all__ = ["BACKEND", "InMemoryStore"]


class InMemoryStore:
    """A thread-safe in-process store for tests; versions are a per-store generation counter.

    ``open_store("memory://name")`` returns the same instance for the same name for the life of
    the process; a directly constructed store is private to its creator.

    Args:
        name: A label for ``uri``; a random one when omitted.
    """

    _registry: ClassVar[dict[str, InMemoryStore]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str | None = None) -> None:
        self.uri = f"memory://{name if name is not None else uuid.uuid4().hex}"
        self._lock = threading.Lock()
        self._objects: dict[str, tuple[bytes, str]] = {}
        self._generation = itertools.count(1)

    @classmethod
    def named(cls, name: str) -> InMemoryStore:
        """Return the process-wide store registered under ``name``, creating it if needed."""
        with cls._registry_lock:
            store = cls._registry.get(name)
            if store is None:
                store = cls(name)
                cls._registry[name] = store
            return store

    @classmethod
    def forget(cls, name: str) -> None:
        """Drop the registered store ``name`` (a missing name is fine)."""
        with cls._registry_lock:
            cls._registry.pop(name, None)

    def _next_version(self) -> str:
        return f"g{next(self._generation)}"

    def _missing(self, key: str) -> errors.ObjectNotFoundError:
        return errors.ObjectNotFoundError(f"No object at key {key!r} in {self.uri}")

    def get(self, key: str) -> bytes:
        """Return the object's bytes; raise ObjectNotFoundError if absent."""
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Return the object's bytes and version token."""
        check_key(self.uri, key)
        with self._lock:
            found = self._objects.get(key)
        if found is None:
            raise self._missing(key)
        return found

    def put(self, key: str, data: bytes) -> str:
        """Overwrite unconditionally; return the new version token."""
        check_key(self.uri, key)
        payload = bytes(data)
        with self._lock:
            version = self._next_version()
            self._objects[key] = (payload, version)
        return version

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create the object; raise PreconditionFailedError if it exists."""
        check_key(self.uri, key)
        payload = bytes(data)
        with self._lock:
            if key in self._objects:
                raise errors.PreconditionFailedError(
                    f"Expected no object at key {key!r} in {self.uri} but one exists"
                )
            version = self._next_version()
            self._objects[key] = (payload, version)
        return version

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        """Overwrite only if the current version is ``version``."""
        check_key(self.uri, key)
        payload = bytes(data)
        with self._lock:
            found = self._objects.get(key)
            current = None if found is None else found[1]
            if current != version:
                raise errors.PreconditionFailedError(
                    f"Expected version {version!r} at key {key!r} in {self.uri} but got {current!r}"
                )
            new_version = self._next_version()
            self._objects[key] = (payload, new_version)
        return new_version

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys starting with ``prefix``."""
        check_prefix(self.uri, prefix)
        with self._lock:
            return sorted(k for k in self._objects if k.startswith(prefix))

    def delete(self, key: str) -> None:
        """Delete the object; a missing object is fine."""
        check_key(self.uri, key)
        with self._lock:
            self._objects.pop(key, None)


def open_memory(uri: str, timeout_s: float, env: Mapping[str, str]) -> InMemoryStore:
    """Open ``memory://<name>``: the process-wide store of that name."""
    name = uri.split("://", 1)[1]
    if not name:
        raise errors.ConfigError(f"Expected a store name in 'memory://<name>' but got {uri!r}")
    return InMemoryStore.named(name)


BACKEND = Backend(("memory",), open_memory)
