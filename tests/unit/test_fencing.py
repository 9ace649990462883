"""Complete fencing: the storage check at start, and every write a stale aggregator could make.

Two aggregators share one store the way a stale and a new instance would: the second start
claims a newer writer epoch. Hooks in a wrapping store let the newer one act in the middle of
the older one's write, the race that plain overwrites lose.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from art_ray_metrics import AggregatorConfig
from art_ray_metrics.core import rewind as R
from art_ray_metrics.distributed.actor import MetricsAggregator
from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.storage import (
    BACKENDS,
    Backend,
    InMemoryStore,
    ObjectStore,
    backend_for,
    check_conditional_writes,
    open_store,
    register_backend,
)
from art_ray_metrics.errors import (
    ConditionalWritesUnsupportedError,
    ConfigError,
    FencedError,
)
from tests import s3server
from tests.wandb_env import forget_wandb_settings


class ConditionIgnoringStore:
    """An in-memory store that drops the conditions: every write is a plain overwrite."""

    def __init__(self, inner: ObjectStore, uri: str | None = None) -> None:
        self.inner = inner
        self.uri = uri or inner.uri

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        return self.inner.get_versioned(key)

    def put(self, key: str, data: bytes) -> str:
        return self.inner.put(key, data)

    def put_if_absent(self, key: str, data: bytes) -> str:
        return self.inner.put(key, data)

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        return self.inner.put(key, data)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


class HookStore(ConditionIgnoringStore):
    """A store that runs ``hook`` once, before the first access to a key under ``prefix``."""

    def __init__(self, inner: ObjectStore, prefix: str) -> None:
        super().__init__(inner)
        self.prefix = prefix
        self.hook: Callable[[], None] | None = None

    def _maybe(self, key: str) -> None:
        if key.startswith(self.prefix) and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        self._maybe(key)
        return self.inner.get_versioned(key)

    def put(self, key: str, data: bytes) -> str:
        self._maybe(key)
        return self.inner.put(key, data)

    def put_if_absent(self, key: str, data: bytes) -> str:
        self._maybe(key)
        return self.inner.put_if_absent(key, data)

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        self._maybe(key)
        return self.inner.put_if_version(key, data, version)


_hooks: dict[str, HookStore] = {}


def _open_lax(uri: str, timeout_s: float, env: Mapping[str, str]) -> ObjectStore:
    return ConditionIgnoringStore(InMemoryStore.named("lax-" + uri.split("://", 1)[1]), uri)


def _open_hook(uri: str, timeout_s: float, env: Mapping[str, str]) -> ObjectStore:
    return _hooks[uri]


@pytest.fixture
def test_backends() -> Iterator[None]:
    """Register the two test back ends (one registry entry each), then remove them."""
    register_backend(Backend(("lax",), _open_lax))
    register_backend(Backend(("hook",), _open_hook))
    try:
        yield
    finally:
        BACKENDS.pop("lax", None)
        BACKENDS.pop("hook", None)
        _hooks.clear()


def _cfg(uri: str, **fields: object) -> str:
    return AggregatorConfig(storage_uri=uri, wandb_mode="disabled", **fields).model_dump_json()


class TestConditionalWriteCheck:
    @pytest.mark.parametrize("kind", ["memory", "local", pytest.param("s3", marks=pytest.mark.s3)])
    def test_honest_stores_pass(self, kind: str, tmp_path: Path) -> None:
        """Memory, a local directory and a real S3 server (moto) refuse losing writes."""
        if kind == "memory":
            store: ObjectStore = InMemoryStore()
            check_conditional_writes(store)
        elif kind == "local":
            store = open_store(str(tmp_path / "s"))
            check_conditional_writes(store)
        else:
            with s3server.s3_env():
                store = open_store(f"{s3server.make_bucket()}/p", timeout_s=5.0)
                check_conditional_writes(store)
        assert store.list() == []  # the probe cleans up

    def test_a_store_that_ignores_conditions_is_refused(self) -> None:
        """Create twice succeeding and a stale If-Match succeeding are both named."""
        store = ConditionIgnoringStore(InMemoryStore())
        with pytest.raises(ConditionalWritesUnsupportedError) as info:
            check_conditional_writes(store)
        message = str(info.value)
        assert "create-only" in message
        assert "stale version" in message
        assert "require_conditional_writes=False" in message
        assert isinstance(info.value, ConfigError)

    def test_the_aggregator_refuses_to_start_unless_the_user_opts_out(
        self, test_backends: None
    ) -> None:
        """A backend that ignores conditions stops the start; the documented flag allows it."""
        uri = f"lax://{uuid.uuid4().hex}"
        with pytest.raises(ConditionalWritesUnsupportedError, match="lax://"):
            MetricsAggregator(_cfg(uri))
        agg = MetricsAggregator(_cfg(uri, require_conditional_writes=False))
        assert asyncio.run(agg.log(0, metrics={"loss/x": 1.0}))["loss/x"] == 1.0


class TestRegistry:
    def test_adding_a_backend_is_one_entry(self, test_backends: None) -> None:
        """open_store serves a registered scheme; unknown schemes list the known ones."""
        assert isinstance(open_store("lax://r"), ConditionIgnoringStore)
        with pytest.raises(ConfigError, match=r"lax://.*s3://"):
            open_store("nope://x")

    def test_backends_declare_their_secrets_apart_from_settings(self) -> None:
        """The S3 secret keys are secrets; the endpoint is a setting; local has none."""
        s3 = backend_for("s3://b/p")
        assert "AWS_SECRET_ACCESS_KEY" in s3.secrets
        assert "AWS_SESSION_TOKEN" in s3.secrets
        assert "AWS_ENDPOINT_URL" in s3.settings
        assert not set(s3.secrets) & set(s3.settings)
        assert backend_for("/tmp/x").secrets == () == backend_for("memory://x").secrets

    @pytest.mark.s3
    def test_env_overrides_the_process_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Variables passed in memory win over a wrong process environment."""
        with s3server.s3_env() as endpoint:
            bucket = s3server.make_bucket()
            monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens
            store = open_store(bucket, timeout_s=3.0, env={"AWS_ENDPOINT_URL": endpoint})
            store.put("k", b"v")
            assert store.get("k") == b"v"


class TestStaleWritesAreFenced:
    def test_history_row_of_a_newer_writer_is_never_replaced(self) -> None:
        """A fenced write or discard by an older epoch raises and leaves the row alone."""
        history = HistoryStore(InMemoryStore())
        history.write(1, "train", {"loss/x": 2.0}, epoch=2)
        with pytest.raises(FencedError, match="epoch 2"):
            history.write(1, "train", {"loss/x": 1.0}, epoch=1)
        with pytest.raises(FencedError):
            history.discard(1, "train", epoch=1)
        assert [r["loss/x"] for r in history.read()] == [2.0]
        assert "writer_epoch" not in next(history.read())  # bookkeeping, not part of the row
        history.discard(1, "train", epoch=3)
        assert list(history.read()) == []
        assert history.last_step() is None

    def test_stale_history_write_racing_a_newer_aggregator(
        self, test_backends: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The newer aggregator rewrites step 1 between the stale one's commit and its history
        write: the stored row stays the newer one's, the stale one is fenced and stops W&B."""
        forget_wandb_settings()  # an earlier test's, so the environment below is what counts
        for var, value in {
            "WANDB_MODE": "offline",  # W&B keeps process-wide settings: isolate them
            "WANDB_SILENT": "true",
            "WANDB_DIR": str(tmp_path),
            "WANDB_CONFIG_DIR": str(tmp_path / "config"),
            "WANDB_CACHE_DIR": str(tmp_path / "cache"),
            "WANDB_DATA_DIR": str(tmp_path / "data"),
        }.items():
            monkeypatch.setenv(var, value)
        name = uuid.uuid4().hex
        inner = InMemoryStore.named(name)
        uri = f"hook://{name}"
        _hooks[uri] = hook_store = HookStore(inner, "history/000000000001")
        old = MetricsAggregator(
            AggregatorConfig(
                storage_uri=uri, wandb_mode="offline", wandb_dir=str(tmp_path)
            ).model_dump_json()
        )
        sink = old.wandb
        assert sink is not None
        asyncio.run(old.log(0, metrics={"loss/x": 0.0}))
        rows_from_new: list[float] = []

        def newer_takes_over() -> None:
            new = MetricsAggregator(_cfg(f"memory://{name}"))

            async def run() -> None:
                await new.rewind(0)
                row = await new.log(1, metrics={"loss/x": 2.0})
                rows_from_new.append(row["loss/x"])

            asyncio.run(run())

        hook_store.hook = newer_takes_over
        asyncio.run(old.log(1, metrics={"loss/x": 1.0}))
        assert rows_from_new == [2.0]
        rows = {r["step"]: r["loss/x"] for r in HistoryStore(inner).read()}
        assert rows == {0: 0.0, 1: 2.0}
        assert old.fenced
        assert old.wandb is None  # stopped: one W&B run never gets two writers
        asyncio.run(old.log(2, metrics={"loss/x": 3.0}))
        assert sink.logged == 1  # step 0 only: not the fenced row 1, nothing after
        sink.close()
        forget_wandb_settings()  # this test's process-wide W&B settings

    def test_rewind_objects_of_two_epochs_never_share_a_key(self) -> None:
        """A stale close cannot overwrite the rewind object a newer aggregator names."""
        name = uuid.uuid4().hex
        store = InMemoryStore.named(name)
        old = MetricsAggregator(_cfg(f"memory://{name}"))
        asyncio.run(old.log(0, metrics={"costs/train/x": 1.0}))
        new = MetricsAggregator(_cfg(f"memory://{name}"))
        asyncio.run(new.log(1, metrics={"costs/train/x": 2.0}))
        asyncio.run(old.log(1, metrics={"costs/train/x": 50.0}))  # fenced at its commit
        assert old.fenced
        key = new.state.meta.rewind[-1].key
        record = R.decode_record(store.get(key))
        assert float(record.cum["costs/cum/all"]) == pytest.approx(3.0)
