"""The aggregator shell under faults, without Ray (issue 12): one close per barrier, poison
refused at the door, supervised loops, back-pressure, and ``read_run`` agreeing with the actor.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgpack
import pytest

from art_ray_metrics import AggregatorConfig
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.distributed.actor import MetricsAggregator
from art_ray_metrics.distributed.handle import AggregatorHandle
from art_ray_metrics.durable.restore import read_run
from art_ray_metrics.durable.storage import InMemoryStore
from art_ray_metrics.errors import (
    BackPressureError,
    FencedError,
    InvalidMetricError,
    WireFormatError,
)
from art_ray_metrics.testing import make_batch
from tests.faults import install


def _config(**fields: Any) -> AggregatorConfig:
    return AggregatorConfig(
        storage_uri=f"memory://{uuid.uuid4().hex}", wandb_mode="disabled", **fields
    )


def _actor(cfg: AggregatorConfig) -> MetricsAggregator:
    return MetricsAggregator(cfg.model_dump_json())


def _batch(producer: str, seq: int, step: int, **kw: Any) -> bytes:
    return encode_batch(make_batch(producer, seq, step, **kw))


async def _stop(agg: MetricsAggregator) -> None:
    for task in agg.tasks:
        task.cancel()
    await asyncio.gather(*agg.tasks, return_exceptions=True)


class TestOneClosePerBarrier:
    def test_concurrent_duplicate_log_returns_the_same_row(self) -> None:
        """A retried log while the first still waits for producers: one close, one row."""
        cfg = _config()
        agg = _actor(cfg)

        async def run() -> tuple[dict[str, float], dict[str, float]]:
            first = asyncio.ensure_future(agg.log(0, expect_producers=1, timeout_s=5))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(agg.log(0, expect_producers=1, timeout_s=5))
            await asyncio.sleep(0.05)
            await agg.ingest(_batch("w", 1, 0, leaves={"costs/train/judge": 0.25}), True)
            rows = await asyncio.gather(first, second)
            await _stop(agg)
            return rows[0], rows[1]

        a, b = asyncio.run(run())
        assert a == b
        assert a["costs/train/judge"] == 0.25
        assert agg.state.counters["rows"] == 1
        history = list(agg.history.read())
        assert [(r["step"], r["costs/train/judge"]) for r in history] == [(0, 0.25)]


class TestPoisonAtTheDoor:
    def test_bad_step_or_split_raises_and_the_run_goes_on(self) -> None:
        """log() checks step and split first; later barriers, rewinds and checkpoints work."""
        agg = _actor(_config())

        async def run() -> dict[str, float]:
            await agg.ingest(_batch("w", 1, 0, leaves={"costs/train/judge": 0.5}))
            for step, split in ((1, "val-hard"), (10**12, "train"), (1, "a\\b"), (True, "train")):
                with pytest.raises(InvalidMetricError):
                    await agg.log(step, split)
            with pytest.raises(InvalidMetricError):
                await agg.log(0, metrics={"loss/train": float("nan")})
            row = await agg.log(0)
            await agg.rewind(0)
            assert (await agg.checkpoint())["fenced"] is None
            await _stop(agg)
            return row

        assert asyncio.run(run())["costs/cum/all"] == 0.5
        assert agg.state.meta.outbox == []

    def test_values_that_overflow_when_summed_never_reach_a_row(self) -> None:
        """Two producers each sending a huge value under one key: refused at ingest, so the
        barrier, the history and the next steps keep working."""
        agg = _actor(_config())

        def raw(producer: str) -> bytes:
            group = [0, "train", {"reward/x": "1e308"}, [], b""]
            return msgpack.packb(["arm-batch", 1, producer, 1, [group]], use_bin_type=True)

        async def run() -> list[dict[str, float]]:
            for producer in ("a", "b"):
                with pytest.raises(WireFormatError):
                    await agg.ingest(raw(producer))
            rows = [await agg.log(0), await agg.log(1)]
            await _stop(agg)
            return rows

        rows = asyncio.run(run())
        assert "reward/x" not in rows[0]
        assert agg.state.counters["rejected_batches"] == 2
        assert [r["step"] for r in agg.history.read()] == [0, 1]

    def test_handle_checks_before_calling(self) -> None:
        """The trainer's handle refuses an unstorable step or split before any remote call."""
        handle = AggregatorHandle(object(), AggregatorConfig())
        with pytest.raises(InvalidMetricError, match="step"):
            handle.log(10**12)
        with pytest.raises(InvalidMetricError, match="split"):
            handle.log(1, "val-hard")


class TestSupervisedLoops:
    def test_a_loop_that_dies_is_restarted_and_counted(self) -> None:
        """The checkpoint loop raising once does not stop checkpoints for good."""
        agg = _actor(_config(checkpoint_interval_s=0.02, wal_interval_s=0.02))
        real = agg.committer.persist
        calls = {"n": 0}

        async def flaky() -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            await real()

        agg.committer.persist = flaky  # type: ignore[method-assign]

        async def run() -> None:
            await agg.ingest(_batch("w", 1, 0, leaves={"reward/x": 1}))
            for _ in range(200):
                await asyncio.sleep(0.02)
                if agg.health.checkpoints:
                    break
            await _stop(agg)

        asyncio.run(run())
        assert agg.health.loop_restarts == 1
        assert agg.health.checkpoints >= 1


class TestBackPressure:
    def test_wal_queue_is_bounded_during_an_outage(self) -> None:
        """Storage down: the WAL queue stops at max_wal_queue_bytes and producers are told to
        resend; nothing refused is applied; once storage returns the queue drains."""
        agg = _actor(_config(max_wal_queue_bytes=2000, wal_interval_s=3600))
        faulty = install(agg)
        faulty.down = True
        data = [_batch("w", i, 0, leaves={"reward/x": 1}) for i in range(1, 200)]

        async def run() -> None:
            refused = 0
            for d in data:
                try:
                    await agg.ingest(d, True)
                except BackPressureError:
                    refused += 1
            assert refused > 0
            assert agg.wal.queue_bytes <= 2000 + len(data[0])
            assert agg.health.backpressure == refused
            applied = agg.state.counters["batches"]
            assert applied == len(data) - refused
            faulty.down = False
            await agg.checkpoint()
            assert agg.wal.queue == []
            assert agg.wal.queue_bytes == 0
            for d in data:  # the client's resend
                await agg.ingest(d, True)
            await _stop(agg)

        asyncio.run(run())
        assert agg.state.counters["batches"] == len(data)

    def test_a_fenced_actor_accepts_nothing(self) -> None:
        """Once a newer aggregator owns the storage, ingest raises and the queue stays empty."""
        cfg = _config()
        old = _actor(cfg)

        async def run() -> None:
            await old.ingest(_batch("w", 1, 0, leaves={"reward/x": 1}))
            _actor(cfg)  # a newer instance claims the storage
            await old.checkpoint()
            assert old.fenced
            for i in range(2, 50):
                with pytest.raises(FencedError):
                    await old.ingest(_batch("w", i, 0, leaves={"reward/x": 1}))
            await _stop(old)

        asyncio.run(run())
        assert old.wal.queue == []


class TestOneRestorePath:
    def test_read_run_after_a_rewind_agrees_with_the_actor(self) -> None:
        """inspect/demo --resume read the same unique count as the actor after a rewind."""
        cfg = _config()
        agg = _actor(cfg)

        async def run() -> None:
            for step in range(4):
                ids = [f"s{step}-{i}" for i in range(2)] + ["shared"]
                await agg.ingest(
                    _batch("w", step + 1, step, leaves={"costs/train/x": 0.5}, scenario_ids=ids)
                )
                await agg.log(step)
            await agg.rewind(1)
            await _stop(agg)

        asyncio.run(run())
        assert len(agg.state.cum.scenarios) == 5
        name = (cfg.storage_uri or "").split("://", 1)[1]
        info = read_run(cfg.storage_uri or "", InMemoryStore.named(name))
        assert info is not None
        assert info.unique_scenarios == 5
        assert info.totals["costs/cum/all"] == 1.0
        restarted = _actor(cfg)
        assert len(restarted.state.cum.scenarios) == 5
