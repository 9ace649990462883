"""A fault-injecting object store for tests: wraps any store and fails on demand."""

from __future__ import annotations

from typing import Any

from art_ray_metrics.errors import StorageError


class FaultyStore:
    """Forwards to ``inner``; while ``down`` every call raises :class:`StorageError`.

    ``fail_after`` (when set) lets that many more calls through, then goes down: a crash or an
    outage in the middle of a multi-object commit.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.down = False
        self.fail_after: int | None = None
        self.calls = 0

    def _gate(self, op: str, key: str) -> None:
        self.calls += 1
        if self.fail_after is not None:
            if self.fail_after <= 0:
                self.down = True
                self.fail_after = None
            else:
                self.fail_after -= 1
        if self.down:
            raise StorageError(f"injected outage: {op} {key!r} in {self.uri}")

    def get(self, key: str) -> bytes:
        self._gate("get", key)
        out: bytes = self.inner.get(key)
        return out

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        self._gate("get", key)
        out: tuple[bytes, str] = self.inner.get_versioned(key)
        return out

    def put(self, key: str, data: bytes) -> str:
        self._gate("put", key)
        out: str = self.inner.put(key, data)
        return out

    def put_if_absent(self, key: str, data: bytes) -> str:
        self._gate("put_if_absent", key)
        out: str = self.inner.put_if_absent(key, data)
        return out

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        self._gate("put_if_version", key)
        out: str = self.inner.put_if_version(key, data, version)
        return out

    def list(self, prefix: str = "") -> list[str]:
        self._gate("list", prefix)
        out: list[str] = self.inner.list(prefix)
        return out

    def delete(self, key: str) -> None:
        self._gate("delete", key)
        self.inner.delete(key)


def install(agg: Any) -> FaultyStore:
    """Put a :class:`FaultyStore` under an aggregator built on an in-memory store."""
    faulty = FaultyStore(agg.store)
    agg.store = faulty
    agg.ckpt._store = faulty
    agg.history._store = faulty
    agg.committer.store = faulty
    return faulty
