"""A directory on a local or shared POSIX filesystem: plain paths and ``file:///dir``.

The local store is ours because obstore's local store has no compare-and-swap: writes go to a
fsynced temporary file renamed into place; create-only publishes with ``os.link``; the version
token is the content's sha256; overwrites, swaps and deletes hold an ``fcntl.flock`` on
``<root>/.arm-store.lock`` (names starting with ``.arm-`` are reserved).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from art_ray_metrics import errors
from art_ray_metrics.durable.stores.base import (
    RESERVED_PREFIX,
    Backend,
    check_key,
    check_prefix,
    redact,
)

__all__ = ["BACKEND", "LocalDirStore"]

_LOCK_NAME = ".arm-store.lock"
_TMP_PREFIX = ".arm-tmp-"

_local_thread_locks: dict[str, threading.Lock] = {}
_local_thread_locks_guard = threading.Lock()


def _thread_lock_for(root: str) -> threading.Lock:
    with _local_thread_locks_guard:
        lock = _local_thread_locks.get(root)
        if lock is None:
            lock = threading.Lock()
            _local_thread_locks[root] = lock
        return lock


def _content_version(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDirStore:
    """A directory on a local or shared POSIX filesystem (see the module docstring).

    Args:
        root: The directory; created (with parents) if missing.
        uri: The URI to report; defaults to ``file://<absolute root>``.
    """

    concurrent_writes = True
    """Writes from several threads are safe, and their fsyncs overlap (a checkpoint writes its
    objects in parallel: see ``CheckpointManager.commit``)."""

    def __init__(self, root: str | os.PathLike[str], *, uri: str | None = None) -> None:
        self._root = os.path.abspath(os.fspath(root))
        self.uri = uri if uri is not None else Path(self._root).as_uri()
        try:
            os.makedirs(self._root, exist_ok=True)
        except OSError as exc:
            raise errors.StorageError(
                f"Cannot create the store directory of {self.uri}: {exc.strerror or exc}"
            ) from exc
        self._thread_lock = _thread_lock_for(os.path.realpath(self._root))

    def _path(self, key: str) -> str:
        return os.path.join(self._root, *check_key(self.uri, key).split("/"))

    def _error(self, op: str, key: str, exc: OSError) -> errors.StorageError:
        return errors.StorageError(
            f"{op} of key {key!r} in {self.uri} failed: {exc.strerror or exc}"
        )

    @contextlib.contextmanager
    def _exclusive(self, key: str) -> Iterator[None]:
        with self._thread_lock:
            try:
                fd = os.open(os.path.join(self._root, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise self._error("locking", key, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing the descriptor releases the flock

    def _read(self, key: str) -> tuple[bytes, str] | None:
        try:
            with open(self._path(key), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            return None
        except OSError as exc:
            raise self._error("get", key, exc) from exc
        return data, _content_version(data)

    def _write_temp(self, key: str, data: bytes) -> tuple[str, str]:
        """Write ``data`` to a fsynced temporary file next to ``key``; return (tmp, final)."""
        final = self._path(key)
        directory = os.path.dirname(final)
        try:
            self._makedirs(directory)
            tmp = os.path.join(directory, f"{_TMP_PREFIX}{uuid.uuid4().hex}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error("put", key, exc) from exc
        return tmp, final

    def _makedirs(self, directory: str) -> None:
        missing: list[str] = []
        current = directory
        while not os.path.isdir(current) and current != self._root:
            missing.append(current)
            current = os.path.dirname(current)
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            _fsync_dir(os.path.dirname(path))

    def _publish(self, key: str, tmp: str, final: str) -> None:
        try:
            os.replace(tmp, final)
            _fsync_dir(os.path.dirname(final))
        except OSError as exc:
            _unlink_quietly(tmp)
            raise self._error("put", key, exc) from exc

    def get(self, key: str) -> bytes:
        """Return the object's bytes; raise ObjectNotFoundError if absent."""
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Return the object's bytes and ``sha256:`` version token."""
        found = self._read(key)
        if found is None:
            raise errors.ObjectNotFoundError(f"No object at key {key!r} in {self.uri}")
        return found

    def put(self, key: str, data: bytes) -> str:
        """Atomically overwrite; return the new version token."""
        payload = bytes(data)
        tmp, final = self._write_temp(key, payload)
        with self._exclusive(key):
            self._publish(key, tmp, final)
        return _content_version(payload)

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Atomically create; raise PreconditionFailedError if the key exists."""
        payload = bytes(data)
        tmp, final = self._write_temp(key, payload)
        try:
            os.link(tmp, final)
        except FileExistsError as exc:
            raise errors.PreconditionFailedError(
                f"Expected no object at key {key!r} in {self.uri} but one exists"
            ) from exc
        except OSError as exc:
            raise self._error("put_if_absent", key, exc) from exc
        finally:
            _unlink_quietly(tmp)
        try:
            _fsync_dir(os.path.dirname(final))
        except OSError as exc:
            raise self._error("put_if_absent", key, exc) from exc
        return _content_version(payload)

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        """Atomically overwrite if the content still has ``version``."""
        payload = bytes(data)
        tmp, final = self._write_temp(key, payload)
        try:
            with self._exclusive(key):
                found = self._read(key)
                current = None if found is None else found[1]
                if current != version:
                    raise errors.PreconditionFailedError(
                        f"Expected version {version!r} at key {key!r} in {self.uri} "
                        f"but got {current!r}"
                    )
                self._publish(key, tmp, final)
        finally:
            _unlink_quietly(tmp)
        return _content_version(payload)

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys starting with ``prefix`` (temporary and lock files hidden)."""
        check_prefix(self.uri, prefix)
        start_dir = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = os.path.join(self._root, *start_dir.split("/")) if start_dir else self._root
        keys: list[str] = []
        try:
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
                rel_dir = os.path.relpath(dirpath, self._root)
                for name in filenames:
                    if name.startswith(RESERVED_PREFIX):
                        continue
                    key = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                    if key.startswith(prefix):
                        keys.append(key)
        except OSError as exc:
            raise self._error("list", prefix, exc) from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Delete the object; a missing object is fine."""
        path = self._path(key)
        with self._exclusive(key):
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            except OSError as exc:
                raise self._error("delete", key, exc) from exc


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - only on a broken filesystem
        if exc.errno != errno.ENOENT:
            raise


def open_local(uri: str, timeout_s: float, env: Mapping[str, str]) -> LocalDirStore:
    """Open a plain directory path or a ``file://`` URI."""
    if "://" not in uri:
        return LocalDirStore(uri)
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost") or not parts.path:
        raise errors.ConfigError(
            f"Expected a local file URI like 'file:///abs/dir' but got {redact(uri)!r}"
        )
    return LocalDirStore(parts.path, uri=f"file://{parts.path}")


BACKEND = Backend(("", "file"), open_local)
