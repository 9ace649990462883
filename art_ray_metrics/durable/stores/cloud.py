"""S3 and GCS buckets through obstore: the store both backends share, and their client options.

``timeout_s`` bounds each request and its retries, so an outage surfaces within seconds. A
store's credentials can be replaced in memory (:meth:`ObstoreStore.use_env`). The backends
themselves are :mod:`~art_ray_metrics.durable.stores.s3` and
:mod:`~art_ray_metrics.durable.stores.gcs`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from art_ray_metrics import errors
from art_ray_metrics.core.backoff import STORAGE_REQUEST
from art_ray_metrics.durable.stores.base import check_key, check_prefix, first_line, redact

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

__all__ = [
    "ObstoreStore",
    "client_options",
    "env_lookup",
    "obstore_config",
    "open_bucket",
    "retry_config",
    "split_bucket",
]


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


class ObstoreStore:
    """An S3 or GCS bucket prefix through obstore (use :func:`open_store` to build one).

    Args:
        store: An ``obstore.store.S3Store`` or ``GCSStore``.
        uri: The credential-free URI it was opened from.
        rebuild: Builds a new client from variables overriding the environment.
    """

    concurrent_writes = True
    """Requests from several threads are safe and overlap (a checkpoint writes its objects in
    parallel: see ``CheckpointManager.commit``)."""

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

        message = f"{op} of key {key!r} in {self.uri} failed: {first_line(exc)}"
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

        check_prefix(self.uri, prefix)
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


def client_options(timeout_s: float, *, allow_http: bool) -> ClientConfig:
    """obstore client options: each request phase bounded by ``timeout_s``."""
    options: ClientConfig = {
        "connect_timeout": timedelta(seconds=timeout_s),
        "read_timeout": timedelta(seconds=timeout_s),
        # Whole-request bound: generous so one large shard upload fits, finite so nothing hangs.
        "timeout": timedelta(seconds=timeout_s * 6),
    }
    if allow_http:
        options["allow_http"] = True
    return options


def retry_config(timeout_s: float) -> RetryConfig:
    """obstore's own retries: two, within ``timeout_s``."""
    return {
        "max_retries": 2,
        "retry_timeout": timedelta(seconds=timeout_s),
        "backoff": {
            "init_backoff": timedelta(seconds=STORAGE_REQUEST.initial),
            "max_backoff": timedelta(seconds=STORAGE_REQUEST.cap),
            "base": STORAGE_REQUEST.factor,
        },
    }


def split_bucket(uri: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``scheme://bucket/prefix`` (user info dropped).

    Raises:
        ConfigError: The URI names no bucket.
    """
    parts = urlsplit(uri)
    bucket = parts.netloc.rsplit("@", 1)[-1]
    prefix = parts.path.strip("/")
    if not bucket:
        raise errors.ConfigError(f"Expected a bucket name in storage URI but got {uri!r}")
    return bucket, prefix


def env_lookup(env: Mapping[str, str], name: str) -> str | None:
    """``env`` first (credentials held in memory), then the process environment."""
    value = env.get(name)
    return value if value else os.environ.get(name)


def obstore_config(env: Mapping[str, str], names: Mapping[str, str]) -> dict[str, str]:
    """obstore config entries for the variables of ``names`` present in ``env`` (overrides)."""
    return {key: env[var] for var, key in names.items() if env.get(var)}


def open_bucket(
    uri: str,
    label: str,
    env: Mapping[str, str],
    make: Callable[[str, str, Mapping[str, str]], Any],
) -> ObstoreStore:
    """Open a bucket store whose client ``make(bucket, prefix, env)`` builds.

    The store keeps ``make`` to rebuild its client when credentials change
    (:meth:`ObstoreStore.use_env`).

    Raises:
        ConfigError: No bucket in ``uri``, or ``make`` failed (named by ``label``, e.g. "S3").
    """
    bucket, prefix = split_bucket(uri)

    def build(env: Mapping[str, str]) -> Any:
        try:
            return make(bucket, prefix, env)
        except Exception as exc:
            raise errors.ConfigError(
                f"Expected a usable {label} configuration for {redact(uri)!r} but got: "
                f"{first_line(exc)}"
            ) from exc

    return ObstoreStore(build(env), redact(uri), build)
