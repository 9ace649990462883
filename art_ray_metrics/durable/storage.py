"""Object stores addressed by URI, with the two conditional writes the commit protocol needs.

:class:`ObjectStore` offers plain reads and writes plus **create-only** and
**compare-and-swap** over a local directory, S3, GCS and memory (``docs/design.md`` has the
table). Every failure is a :class:`~art_ray_metrics.errors.StorageError` naming the store and
key, never credentials. ``timeout_s`` bounds each request and its retries, so an outage
surfaces within seconds. S3 settings come from the standard ``AWS_*`` environment variables.

The local store is ours because obstore's local store has no compare-and-swap: writes go to a
fsynced temporary file renamed into place; create-only publishes with ``os.link``; the version
token is the content's sha256; overwrites, swaps and deletes hold an ``fcntl.flock`` on
``<root>/.arm-store.lock`` (names starting with ``.arm-`` are reserved).

Back ends live in a registry (:data:`BACKENDS`): one :class:`Backend` entry per scheme names the
opener and the environment variables it reads, split into non-secret ``settings`` and
``secrets``; adding a back end is one :func:`register_backend` call. ``open_store(..., env=...)``
overrides the environment with credentials held in memory and :meth:`ObstoreStore.use_env`
swaps them later. :func:`check_conditional_writes` probes that a store really refuses losing
conditional writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from art_ray_metrics import errors

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

__all__ = [
    "BACKENDS",
    "Backend",
    "InMemoryStore",
    "LocalDirStore",
    "ObjectStore",
    "ObstoreStore",
    "backend_for",
    "check_conditional_writes",
    "open_store",
    "register_backend",
]

_RESERVED_PREFIX = ".arm-"
_LOCK_NAME = ".arm-store.lock"
_TMP_PREFIX = ".arm-tmp-"


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
            if segment in ("", ".", "..") or segment.startswith(_RESERVED_PREFIX):
                ok = False
                break
    if not ok:
        raise errors.StorageError(
            f"Expected a relative object key of non-empty segments (no '.', '..', "
            f"'{_RESERVED_PREFIX}*') in {uri} but got {key!r}"
        )
    return key


def _check_prefix(uri: str, prefix: str) -> str:
    if not isinstance(prefix, str) or prefix.startswith("/") or "\x00" in prefix:
        raise errors.StorageError(
            f"Expected a relative key prefix for listing {uri} but got {prefix!r}"
        )
    return prefix


def _redact(uri: str) -> str:
    """Drop user info, query and fragment from a URI so it never shows credentials."""
    parts = urlsplit(uri)
    if parts.scheme == "":
        return uri
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# --------------------------------------------------------------------------------------------
# In-memory store
# --------------------------------------------------------------------------------------------


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
        _check_prefix(self.uri, prefix)
        with self._lock:
            return sorted(k for k in self._objects if k.startswith(prefix))

    def delete(self, key: str) -> None:
        """Delete the object; a missing object is fine."""
        check_key(self.uri, key)
        with self._lock:
            self._objects.pop(key, None)


# --------------------------------------------------------------------------------------------
# Local directory store
# --------------------------------------------------------------------------------------------

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
        _check_prefix(self.uri, prefix)
        start_dir = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = os.path.join(self._root, *start_dir.split("/")) if start_dir else self._root
        keys: list[str] = []
        try:
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if not d.startswith(_RESERVED_PREFIX)]
                rel_dir = os.path.relpath(dirpath, self._root)
                for name in filenames:
                    if name.startswith(_RESERVED_PREFIX):
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


# --------------------------------------------------------------------------------------------
# S3 and GCS through obstore
# --------------------------------------------------------------------------------------------


def _token(e_tag: str | None, version: str | None) -> str:
    """Pack obstore's (e_tag, version) pair into one opaque string token."""
    if version is None and e_tag is not None and not e_tag.startswith("v:"):
        return e_tag
    return f"v:{e_tag or ''}\x1f{version or ''}"


def _untoken(token: str) -> dict[str, str]:
    if not token.startswith("v:"):
        return {"e_tag": token}
    e_tag, _, version = token[2:].partition("\x1f")
    update: dict[str, str] = {}
    if e_tag:
        update["e_tag"] = e_tag
    if version:
        update["version"] = version
    return update


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "…"


class ObstoreStore:
    """An S3 or GCS bucket prefix through obstore (use :func:`open_store` to build one).

    Args:
        store: An ``obstore.store.S3Store`` or ``GCSStore``.
        uri: The credential-free URI it was opened from.
        rebuild: Builds a new client from variables overriding the environment.
    """

    def __init__(
        self, store: Any, uri: str, rebuild: Callable[[Mapping[str, str]], Any] | None = None
    ) -> None:
        self._store = store
        self.uri = uri
        self._rebuild = rebuild

    def use_env(self, env: Mapping[str, str]) -> None:
        """Rebuild the client with ``env`` overriding the process environment (new credentials).

        Requests already running finish on the old client.
        """
        if self._rebuild is not None:
            self._store = self._rebuild(env)

    def _wrap(self, op: str, key: str, exc: Exception) -> errors.StorageError:
        from obstore import exceptions as obx

        message = f"{op} of key {key!r} in {self.uri} failed: {_first_line(exc)}"
        if isinstance(exc, obx.NotFoundError | FileNotFoundError):
            return errors.ObjectNotFoundError(f"No object at key {key!r} in {self.uri}")
        if isinstance(exc, obx.AlreadyExistsError):
            return errors.PreconditionFailedError(
                f"Expected no object at key {key!r} in {self.uri} but one exists"
            )
        if isinstance(exc, obx.PreconditionError):
            return errors.PreconditionFailedError(message)
        return errors.StorageError(message)

    def get(self, key: str) -> bytes:
        """Return the object's bytes; raise ObjectNotFoundError if absent."""
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Return the object's bytes and its (ETag, generation) token from one GET."""
        import obstore

        check_key(self.uri, key)
        try:
            result = obstore.get(self._store, key)
            data = bytes(result.bytes())
            meta = result.meta
        except Exception as exc:
            raise self._wrap("get", key, exc) from exc
        return data, _token(meta.get("e_tag"), meta.get("version"))

    def _put(self, op: str, key: str, data: bytes, mode: Any) -> str:
        import obstore

        check_key(self.uri, key)
        try:
            result = obstore.put(self._store, key, bytes(data), mode=mode, use_multipart=False)
        except Exception as exc:
            wrapped = self._wrap(op, key, exc)
            if op == "put_if_version" and isinstance(wrapped, errors.ObjectNotFoundError):
                wrapped = errors.PreconditionFailedError(
                    f"Expected an object to compare-and-swap at key {key!r} in {self.uri} "
                    f"but it is missing"
                )
            raise wrapped from exc
        e_tag, version = result.get("e_tag"), result.get("version")
        if e_tag is None and version is None:
            return self.get_versioned(key)[1]
        return _token(e_tag, version)

    def put(self, key: str, data: bytes) -> str:
        """Overwrite unconditionally; return the new version token."""
        return self._put("put", key, data, "overwrite")

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create the object (``If-None-Match: *``); PreconditionFailedError if it exists."""
        return self._put("put_if_absent", key, data, "create")

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        """Overwrite only if the object still has ``version`` (``If-Match``)."""
        return self._put("put_if_version", key, data, _untoken(version))

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys starting with ``prefix``."""
        import obstore

        _check_prefix(self.uri, prefix)
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else None
        try:
            metas = obstore.list(self._store, prefix=directory).collect()
        except Exception as exc:
            raise self._wrap("list", prefix, exc) from exc
        return sorted(str(m["path"]) for m in metas if str(m["path"]).startswith(prefix))

    def delete(self, key: str) -> None:
        """Delete the object; a missing object is fine."""
        import obstore

        check_key(self.uri, key)
        try:
            obstore.delete(self._store, key)
        except Exception as exc:
            wrapped = self._wrap("delete", key, exc)
            if isinstance(wrapped, errors.ObjectNotFoundError):
                return
            raise wrapped from exc


def _client_options(timeout_s: float, *, allow_http: bool) -> ClientConfig:
    options: ClientConfig = {
        "connect_timeout": timedelta(seconds=timeout_s),
        "read_timeout": timedelta(seconds=timeout_s),
        # Whole-request bound: generous so one large shard upload fits, finite so nothing hangs.
        "timeout": timedelta(seconds=timeout_s * 6),
    }
    if allow_http:
        options["allow_http"] = True
    return options


def _retry_config(timeout_s: float) -> RetryConfig:
    return {
        "max_retries": 2,
        "retry_timeout": timedelta(seconds=timeout_s),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=1),
            "base": 2,
        },
    }


def _split_bucket(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    bucket = parts.netloc.rsplit("@", 1)[-1]
    prefix = parts.path.strip("/")
    if not bucket:
        raise errors.ConfigError(f"Expected a bucket name in storage URI but got {uri!r}")
    return bucket, prefix


def _lookup(env: Mapping[str, str], name: str) -> str | None:
    """``env`` first (credentials held in memory), then the process environment."""
    value = env.get(name)
    return value if value else os.environ.get(name)


def _obstore_config(env: Mapping[str, str], names: Mapping[str, str]) -> dict[str, str]:
    """obstore config entries for the variables of ``names`` present in ``env`` (overrides)."""
    return {key: env[var] for var, key in names.items() if env.get(var)}


_S3_ENV_KEYS = {
    "AWS_ACCESS_KEY_ID": "access_key_id",
    "AWS_SECRET_ACCESS_KEY": "secret_access_key",
    "AWS_SESSION_TOKEN": "session_token",
}


def _open_s3(uri: str, timeout_s: float, env: Mapping[str, str]) -> ObstoreStore:
    bucket, prefix = _split_bucket(uri)

    def build(env: Mapping[str, str]) -> Any:
        from obstore.store import S3Store

        endpoint = _lookup(env, "AWS_ENDPOINT_URL_S3") or _lookup(env, "AWS_ENDPOINT_URL")
        region = _lookup(env, "AWS_REGION") or _lookup(env, "AWS_DEFAULT_REGION")
        kwargs: dict[str, Any] = {}
        if endpoint:
            kwargs["endpoint"] = endpoint
        if region:
            kwargs["region"] = region
        allow_http = bool(endpoint) and str(endpoint).lower().startswith("http://")
        try:
            return S3Store(
                bucket,
                prefix=prefix or None,
                config=_obstore_config(env, _S3_ENV_KEYS),  # type: ignore[arg-type]
                client_options=_client_options(timeout_s, allow_http=allow_http),
                retry_config=_retry_config(timeout_s),
                **kwargs,
            )
        except Exception as exc:
            raise errors.ConfigError(
                f"Expected a usable S3 configuration for {_redact(uri)!r} but got: "
                f"{_first_line(exc)}"
            ) from exc

    return ObstoreStore(build(env), _redact(uri), build)


_GCS_ENV_KEYS = {
    "GOOGLE_SERVICE_ACCOUNT_KEY": "service_account_key",
    "GOOGLE_SERVICE_ACCOUNT": "service_account",
    "GOOGLE_APPLICATION_CREDENTIALS": "application_credentials",
}


def _open_gcs(uri: str, timeout_s: float, env: Mapping[str, str]) -> ObstoreStore:
    bucket, prefix = _split_bucket(uri)

    def build(env: Mapping[str, str]) -> Any:
        from obstore.store import GCSStore

        base_url = _lookup(env, "GOOGLE_BASE_URL") or ""
        try:
            return GCSStore(
                bucket,
                prefix=prefix or None,
                config=_obstore_config(env, _GCS_ENV_KEYS),  # type: ignore[arg-type]
                client_options=_client_options(
                    timeout_s, allow_http=base_url.lower().startswith("http://")
                ),
                retry_config=_retry_config(timeout_s),
            )
        except Exception as exc:
            raise errors.ConfigError(
                f"Expected a usable GCS configuration for {_redact(uri)!r} but got: "
                f"{_first_line(exc)}"
            ) from exc

    return ObstoreStore(build(env), _redact(uri), build)


def _open_local(uri: str, timeout_s: float, env: Mapping[str, str]) -> LocalDirStore:
    if "://" not in uri:
        return LocalDirStore(uri)
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost") or not parts.path:
        raise errors.ConfigError(
            f"Expected a local file URI like 'file:///abs/dir' but got {_redact(uri)!r}"
        )
    return LocalDirStore(parts.path, uri=f"file://{parts.path}")


def _open_memory(uri: str, timeout_s: float, env: Mapping[str, str]) -> InMemoryStore:
    name = uri.split("://", 1)[1]
    if not name:
        raise errors.ConfigError(f"Expected a store name in 'memory://<name>' but got {uri!r}")
    return InMemoryStore.named(name)


# --------------------------------------------------------------------------------------------
# The registry of back ends
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One storage back end: its URI schemes, how to open it, and the environment it reads.

    Attributes:
        schemes: URI schemes it serves (``""`` is a plain directory path).
        open: ``open(uri, timeout_s, env)``; ``env`` overrides the process environment for
            the variables below (credentials the aggregator holds in memory).
        settings: Environment variables that configure it and are not secret (endpoints,
            regions); the aggregator's runtime environment may carry them.
        secrets: Environment variables holding credentials; they are only ever handed to
            the aggregator in memory, never through Ray's runtime environment.
    """

    schemes: tuple[str, ...]
    open: Callable[[str, float, Mapping[str, str]], ObjectStore]
    settings: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()


BACKENDS: dict[str, Backend] = {}
"""Back ends by URI scheme; add one with :func:`register_backend`."""


def register_backend(backend: Backend) -> Backend:
    """Serve ``backend.schemes`` with ``backend`` (replacing an earlier entry); return it."""
    for scheme in backend.schemes:
        BACKENDS[scheme.lower()] = backend
    return backend


register_backend(Backend(("", "file"), _open_local))
register_backend(Backend(("memory",), _open_memory))
register_backend(
    Backend(
        ("s3", "s3a"),
        _open_s3,
        settings=(
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AWS_ALLOW_HTTP",
            "AWS_REQUEST_CHECKSUM_CALCULATION",
            "AWS_RESPONSE_CHECKSUM_VALIDATION",
        ),
        secrets=tuple(_S3_ENV_KEYS),
    )
)
register_backend(
    Backend(
        ("gs",),
        _open_gcs,
        settings=("GOOGLE_BASE_URL", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT"),
        secrets=("GOOGLE_SERVICE_ACCOUNT_KEY",),
    )
)


def _scheme(uri: str) -> str:
    return urlsplit(uri).scheme.lower() if "://" in uri else ""


def backend_for(uri: str) -> Backend:
    """The registered back end serving ``uri``.

    Raises:
        ConfigError: No back end serves its scheme.
    """
    backend = BACKENDS.get(_scheme(uri))
    if backend is None:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS) if s) or "none"
        raise errors.ConfigError(
            f"Expected a storage URI with a known scheme ({known}) or a plain path "
            f"but got {_redact(uri)!r}"
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
