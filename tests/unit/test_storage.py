"""Contract tests for art_ray_metrics.durable.storage, run against every back end.

The same behaviour is checked on the in-memory store, a local directory and S3 (a real moto
server over HTTP on 127.0.0.1, see tests/s3server.py).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from art_ray_metrics import errors
from art_ray_metrics.durable.storage import (
    InMemoryStore,
    LocalDirStore,
    ObjectStore,
    ObstoreStore,
    open_store,
)
from tests import s3server
from tests.s3server import s3_bucket_uri  # noqa: F401  (fixture)

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("local", id="local"),
    pytest.param("s3", id="s3", marks=pytest.mark.s3),
]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """One empty store per back end."""
    kind = request.param
    if kind == "memory":
        yield InMemoryStore()
    elif kind == "local":
        yield open_store(str(tmp_path / "store"))
    else:
        with s3server.s3_env():
            bucket = s3server.make_bucket()
            yield open_store(f"{bucket}/some/prefix", timeout_s=5.0)


class TestReadWrite:
    """Plain get/put/delete."""

    def test_put_then_get_returns_the_bytes(self, store: ObjectStore) -> None:
        """What was put is what is read, including empty and binary payloads."""
        store.put("a.bin", b"\x00\xffhello")
        store.put("dir/sub/empty.bin", b"")
        assert store.get("a.bin") == b"\x00\xffhello"
        assert store.get("dir/sub/empty.bin") == b""

    def test_get_missing_raises_not_found_naming_key_and_uri(self, store: ObjectStore) -> None:
        """A missing key raises ObjectNotFoundError (a KeyError) naming the key and the URI."""
        with pytest.raises(errors.ObjectNotFoundError) as info:
            store.get("nope/x.bin")
        assert isinstance(info.value, KeyError)
        assert "nope/x.bin" in str(info.value)
        assert store.uri in str(info.value)

    def test_versioned_read_matches_put_version(self, store: ObjectStore) -> None:
        """get_versioned returns the token that put returned."""
        version = store.put("k", b"one")
        assert store.get_versioned("k") == (b"one", version)

    def test_overwrite_changes_content_and_version(self, store: ObjectStore) -> None:
        """put overwrites unconditionally and the version changes with the content."""
        v1 = store.put("k", b"one")
        v2 = store.put("k", b"two")
        assert v1 != v2
        assert store.get_versioned("k") == (b"two", v2)

    def test_delete_removes_and_missing_is_fine(self, store: ObjectStore) -> None:
        """delete removes the object; deleting a missing key is not an error."""
        store.put("k", b"x")
        store.delete("k")
        store.delete("k")
        with pytest.raises(errors.ObjectNotFoundError):
            store.get("k")


class TestCreateOnly:
    """put_if_absent."""

    def test_creates_when_absent(self, store: ObjectStore) -> None:
        """The first create wins and returns the object's version."""
        version = store.put_if_absent("c/k", b"first")
        assert store.get_versioned("c/k") == (b"first", version)

    def test_second_create_fails_and_keeps_the_first(self, store: ObjectStore) -> None:
        """A create on an existing key raises PreconditionFailedError and changes nothing."""
        store.put_if_absent("c/k", b"first")
        with pytest.raises(errors.PreconditionFailedError, match="c/k"):
            store.put_if_absent("c/k", b"second")
        assert store.get("c/k") == b"first"

    def test_concurrent_creates_have_one_winner(self, store: ObjectStore) -> None:
        """Of eight racing creates exactly one succeeds and its bytes are stored."""
        barrier = threading.Barrier(8)

        def create(i: int) -> bytes | None:
            barrier.wait()
            try:
                store.put_if_absent("race/create", b"writer-%d" % i)
            except errors.PreconditionFailedError:
                return None
            return b"writer-%d" % i

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(create, range(8)))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        assert store.get("race/create") == winners[0]


class TestCompareAndSwap:
    """put_if_version."""

    def test_matching_version_swaps(self, store: ObjectStore) -> None:
        """A CAS with the current version writes and returns the new version."""
        v1 = store.put("ptr", b"one")
        v2 = store.put_if_version("ptr", b"two", v1)
        assert store.get_versioned("ptr") == (b"two", v2)

    def test_stale_version_fails_and_changes_nothing(self, store: ObjectStore) -> None:
        """A CAS with an outdated version raises PreconditionFailedError."""
        v1 = store.put("ptr", b"one")
        store.put_if_version("ptr", b"two", v1)
        with pytest.raises(errors.PreconditionFailedError, match="ptr"):
            store.put_if_version("ptr", b"three", v1)
        assert store.get("ptr") == b"two"

    def test_missing_object_fails(self, store: ObjectStore) -> None:
        """A CAS on a missing key raises PreconditionFailedError and creates nothing."""
        version = store.put("other", b"x")
        with pytest.raises(errors.PreconditionFailedError):
            store.put_if_version("missing", b"y", version)
        with pytest.raises(errors.ObjectNotFoundError):
            store.get("missing")

    def test_deleted_object_fails(self, store: ObjectStore) -> None:
        """A CAS against the version of a deleted object fails."""
        version = store.put("ptr", b"x")
        store.delete("ptr")
        with pytest.raises(errors.PreconditionFailedError):
            store.put_if_version("ptr", b"y", version)

    def test_two_writers_same_version_exactly_one_wins(self, store: ObjectStore) -> None:
        """Writers racing with the same version: exactly one wins, the rest fail, per round."""
        version = store.put("ptr", b"start")
        for round_no in range(5):
            barrier = threading.Barrier(4)

            def swap(
                i: int,
                base: str = version,
                rnd: int = round_no,
                gate: threading.Barrier = barrier,
            ) -> str | None:
                gate.wait()
                try:
                    return store.put_if_version("ptr", b"r%d-w%d" % (rnd, i), base)
                except errors.PreconditionFailedError:
                    return None

            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(swap, range(4)))
            winners = [(i, v) for i, v in enumerate(results) if v is not None]
            assert len(winners) == 1
            winner, version = winners[0]
            assert store.get_versioned("ptr") == (b"r%d-w%d" % (round_no, winner), version)


class TestList:
    """list(prefix)."""

    def test_lists_sorted_relative_keys(self, store: ObjectStore) -> None:
        """Keys come back sorted and relative to the store root."""
        for key in ["b/2", "a/1", "b/1", "c"]:
            store.put(key, b"x")
        assert store.list() == ["a/1", "b/1", "b/2", "c"]

    def test_prefix_is_a_plain_string_prefix(self, store: ObjectStore) -> None:
        """A prefix may end mid-segment or at a separator."""
        for key in ["wal/0001.bin", "wal/0002.bin", "wal/1000.bin", "walrus", "shards/x/1"]:
            store.put(key, b"x")
        assert store.list("wal/0") == ["wal/0001.bin", "wal/0002.bin"]
        assert store.list("wal/") == ["wal/0001.bin", "wal/0002.bin", "wal/1000.bin"]
        assert store.list("wal") == ["wal/0001.bin", "wal/0002.bin", "wal/1000.bin", "walrus"]
        assert store.list("sha") == ["shards/x/1"]
        assert store.list("zzz/") == []

    def test_deleted_keys_disappear(self, store: ObjectStore) -> None:
        """A deleted key is no longer listed."""
        store.put("a", b"x")
        store.put("b", b"x")
        store.delete("a")
        assert store.list() == ["b"]


class TestKeys:
    """Key validation."""

    @pytest.mark.parametrize(
        "key",
        ["", "/abs", "a//b", "a/", "../x", "a/./b", ".arm-lock", "a/.arm-tmp-1", "a\\b"],
        ids=["empty", "absolute", "empty-seg", "trailing", "dotdot", "dot", "reserved",
             "reserved-nested", "backslash"],
    )  # fmt: skip
    def test_invalid_keys_are_rejected(self, store: ObjectStore, key: str) -> None:
        """Keys that could escape the root or clash with internal files raise StorageError."""
        with pytest.raises(errors.StorageError, match="Expected a relative object key"):
            store.put(key, b"x")


class TestOpenStore:
    """open_store URI handling."""

    def test_relative_path_is_a_local_store(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A relative path opens a directory relative to the working directory."""
        monkeypatch.chdir(tmp_path)
        store = open_store("runs/ckpt")
        store.put("k", b"v")
        assert isinstance(store, LocalDirStore)
        assert (tmp_path / "runs" / "ckpt" / "k").read_bytes() == b"v"
        assert store.uri == (tmp_path / "runs" / "ckpt").as_uri()

    def test_file_uri_and_absolute_path_open_the_same_directory(self, tmp_path: Path) -> None:
        """file:///dir and /dir name the same store."""
        open_store(f"file://{tmp_path}/d").put("k", b"v")
        assert open_store(str(tmp_path / "d")).get("k") == b"v"

    def test_memory_uri_reopens_the_same_store(self) -> None:
        """memory://name is a process-wide registry."""
        name = f"t-{uuid.uuid4().hex}"
        open_store(f"memory://{name}").put("k", b"v")
        try:
            assert open_store(f"memory://{name}").get("k") == b"v"
        finally:
            InMemoryStore.forget(name)
        assert open_store(f"memory://{name}").list() == []

    @pytest.mark.parametrize(
        "uri", ["ftp://host/x", "hdfs://nn/path", "memory://", "s3://", "file://remote/x"]
    )
    def test_bad_uris_raise_config_error_naming_them(self, uri: str) -> None:
        """Unknown schemes and URIs without a bucket or name fail fast."""
        with pytest.raises(errors.ConfigError, match=r"but got"):
            open_store(uri)

    def test_unknown_scheme_message_names_the_uri(self) -> None:
        """The ConfigError message carries the URI."""
        with pytest.raises(errors.ConfigError, match="ftp://host/x"):
            open_store("ftp://host/x")

    def test_gs_uri_opens_without_network(self) -> None:
        """gs:// builds an obstore GCS store lazily (no request at open)."""
        store = open_store("gs://some-bucket/run/1")
        assert isinstance(store, ObstoreStore)
        assert store.uri == "gs://some-bucket/run/1"

    def test_credentials_never_appear_in_uri(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """User info in an s3 URI is dropped from .uri."""
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        store = open_store("s3://AKIAFAKE:supersecret@bucket-x/p?token=zzz")
        assert store.uri == "s3://bucket-x/p"

    @pytest.mark.parametrize("timeout_s", [0.0, -1.0])
    def test_non_positive_timeout_is_rejected(self, timeout_s: float) -> None:
        """timeout_s must be positive."""
        with pytest.raises(errors.ConfigError, match="timeout_s"):
            open_store("memory://x", timeout_s=timeout_s)


class TestLocalDirStore:
    """Details of the local directory implementation."""

    def test_no_temporary_files_remain(self, tmp_path: Path) -> None:
        """Successful and failed writes leave only the published objects (and the lock)."""
        store = LocalDirStore(tmp_path)
        v = store.put("a/k", b"1")
        store.put_if_absent("a/c", b"1")
        with pytest.raises(errors.PreconditionFailedError):
            store.put_if_absent("a/c", b"2")
        with pytest.raises(errors.PreconditionFailedError):
            store.put_if_version("a/k", b"2", "sha256:bogus")
        store.put_if_version("a/k", b"3", v)
        names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
        assert names == [".arm-store.lock", "c", "k"]
        assert store.list() == ["a/c", "a/k"]

    def test_version_is_content_sha256(self, tmp_path: Path) -> None:
        """The local version token is the sha256 of the content."""
        import hashlib

        store = LocalDirStore(tmp_path)
        assert store.put("k", b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()

    @pytest.mark.slow  # three interpreters importing the package: seconds of CPU
    def test_cas_race_across_processes_has_one_winner(self, tmp_path: Path) -> None:
        """Three processes racing a CAS with one version: exactly one wins."""
        root = tmp_path / "store"
        version = LocalDirStore(root).put("ptr", b"base")
        go = tmp_path / "go"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _CAS_WORKER, str(root), version, str(i), str(go)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=_REPO_ROOT,
            )
            for i in range(3)
        ]
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("go.ready-*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        go.write_bytes(b"")  # release all three together, once each has imported and is waiting
        outcomes = [proc.communicate(timeout=30)[0].strip() for proc in procs]
        assert sorted(outcomes) == ["lost", "lost", "won"]
        assert LocalDirStore(root).get("ptr") == b"proc-%d" % outcomes.index("won")

    def test_unwritable_root_raises_storage_error(self, tmp_path: Path) -> None:
        """A root that cannot be created raises StorageError naming the URI."""
        blocker = tmp_path / "file"
        blocker.write_bytes(b"")
        with pytest.raises(errors.StorageError, match="file"):
            LocalDirStore(blocker / "sub")


_REPO_ROOT = str(Path(__file__).resolve().parents[2])
_CAS_WORKER = """
import os, sys, time
from art_ray_metrics import errors
from art_ray_metrics.durable.storage import LocalDirStore
root, version, i, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
store = LocalDirStore(root)
open(go + f".ready-{i}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
try:
    store.put_if_version("ptr", b"proc-%d" % i, version)
    print("won")
except errors.PreconditionFailedError:
    print("lost")
"""


@pytest.mark.s3
class TestS3:
    """S3-specific behaviour against the moto server."""

    def test_prefixes_isolate_stores_in_one_bucket(self, s3_bucket_uri: str) -> None:  # noqa: F811
        """Two prefixes of one bucket do not see each other's keys."""
        a = open_store(f"{s3_bucket_uri}/run-a")
        b = open_store(f"{s3_bucket_uri}/run-a2")
        a.put("k", b"a")
        b.put("k", b"b")
        assert a.list() == ["k"]
        assert (a.get("k"), b.get("k")) == (b"a", b"b")

    def test_bucket_root_store(self, s3_bucket_uri: str) -> None:  # noqa: F811
        """A URI without a prefix uses the bucket root."""
        store = open_store(s3_bucket_uri)
        store.put("x/y", b"1")
        assert store.list() == ["x/y"]
        assert store.uri == s3_bucket_uri

    def test_missing_bucket_is_a_storage_error(self) -> None:
        """Talking to a bucket that does not exist raises StorageError naming the key."""
        with s3server.s3_env():
            store = open_store("s3://no-such-bucket-arm/p", timeout_s=3.0)
            with pytest.raises(errors.StorageError, match="k1"):
                store.put("k1", b"x")

    def test_outage_surfaces_quickly_and_recovers(self, owned_s3: s3server.OwnedS3) -> None:
        """With the server stopped a read fails within seconds; after restart it works again."""
        uri = owned_s3.bucket()
        store = open_store(uri, timeout_s=2.0)
        store.put("k", b"before")
        owned_s3.stop()
        try:
            started = time.monotonic()
            with pytest.raises(errors.StorageError) as info:
                store.get("k")
            elapsed = time.monotonic() - started
        finally:
            owned_s3.start()
        assert elapsed < 5.0
        assert not isinstance(info.value, errors.ObjectNotFoundError)
        assert "'k'" in str(info.value)
        assert uri in str(info.value)
        assert "testing" not in str(info.value)  # the fake secret key never leaks
        assert store.get("k") == b"before"


def test_protocol_is_satisfied_by_every_backend(tmp_path: Path) -> None:
    """InMemoryStore, LocalDirStore and ObstoreStore satisfy the ObjectStore protocol."""
    stores = [InMemoryStore(), LocalDirStore(tmp_path), open_store("gs://b/p")]
    assert all(isinstance(s, ObjectStore) for s in stores)
