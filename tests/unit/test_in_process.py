"""The in-process aggregator and transport: real clients, the real actor class, real storage,
no Ray. Also the client's lookup rules, which hold for every transport."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import art_ray_metrics
from art_ray_metrics.config import ClientConfig
from art_ray_metrics.distributed.client import MetricsClient
from art_ray_metrics.distributed.clients import reset_clients
from art_ray_metrics.distributed.record import WorkerBuilder
from art_ray_metrics.distributed.transport import InProcessTransport, one_line
from art_ray_metrics.testing import InProcessAggregator


@pytest.fixture
def agg() -> Iterator[InProcessAggregator]:
    a = InProcessAggregator(name=f"unit-{uuid.uuid4().hex[:8]}", wal_interval_s=0.02)
    yield a
    a.close()


def _fast(agg: InProcessAggregator, **fields: Any) -> ClientConfig:
    return ClientConfig(name=agg.name, namespace=agg.namespace, **fields)


class TestInProcessAggregator:
    def test_connect_record_flush_log_gives_the_real_row(self, agg: InProcessAggregator) -> None:
        """Unchanged rollout code: module-level connect() reaches the in-process aggregator."""
        b = art_ray_metrics.connect(0, name=agg.name, namespace=agg.namespace)
        b.add_cost("train/judge", 0.25)
        b.add_cost("train/judge", 0.5)
        b.add_metric("reward/score", 2.0)
        b.add_data(scenario_ids=["a", "b"])
        assert b.flush(timeout_s=10).ok
        v = art_ray_metrics.connect(0, "eval", split="val", name=agg.name, namespace=agg.namespace)
        v.add_cost("eval/judge", 1.0)
        assert v.flush(timeout_s=10).ok
        row = agg.log(0)
        assert row["costs/all"] == 0.75
        assert row["costs/train/judge"] == 0.75
        assert row["data/cum/num_unique_scenarios"] == 2
        val = agg.log(0, "val")
        assert val["costs/eval/judge"] == 1.0
        assert [(r["step"], r["split"]) for r in agg.history()] == [(0, "train"), (0, "val")]

    def test_rows_survive_a_crash_and_a_replacement(self, agg: InProcessAggregator) -> None:
        """A crash restores from storage under the same handle; a replacement is a new actor the
        client must look up again; both keep the run exact and each batch applied once."""
        client = agg.client(config=_fast(agg, flush_interval_s=0.05))
        try:
            for step in range(3):
                b = WorkerBuilder(client, step, "train", "train")
                b.add_cost("train/x", 1.0)
                assert b.flush(timeout_s=10).ok, step
                if step == 0:
                    agg.crash()
                elif step == 1:
                    agg.replace()
                row = agg.log(step)
                assert row["costs/all"] == 1.0, (step, row)
                assert row["costs/cum/all"] == step + 1.0, (step, row)
            assert client.transport.lookups >= 2  # type: ignore[attr-defined]
        finally:
            client.close(timeout_s=2)

    def test_flush_during_a_kill_is_not_ok_then_recovers(self, agg: InProcessAggregator) -> None:
        client = agg.client(config=_fast(agg, flush_interval_s=0.05))
        try:
            b = WorkerBuilder(client, 0, "train", "train")
            b.add_cost("train/x", 2.0)
            assert b.flush(timeout_s=10).ok
            agg.kill()
            c = WorkerBuilder(client, 1, "train", "train")
            c.add_cost("train/x", 3.0)
            started = time.monotonic()
            result = c.flush(timeout_s=0.5)
            assert not result.ok
            assert time.monotonic() - started < 2.0  # its 0.5 s, not a wait for the dead one
            agg.start()  # restored from storage
            assert c.flush(timeout_s=10).ok
            assert agg.log(0)["costs/all"] == 2.0
            assert agg.log(1)["costs/cum/all"] == 5.0
        finally:
            client.close(timeout_s=2)

    def test_aflush_awaits_on_the_loop(self, agg: InProcessAggregator) -> None:
        client = agg.client(config=_fast(agg))

        async def rollouts() -> list[bool]:
            async def one(i: int) -> bool:
                b = WorkerBuilder(client, 0, "train", "train")
                b.add_cost("train/x", 0.01 * i)
                return (await b.aflush(timeout_s=10)).ok

            return await asyncio.gather(*(one(i) for i in range(1, 17)))

        try:
            assert all(asyncio.run(rollouts()))
            assert agg.log(0)["costs/all"] == pytest.approx(1.36)
        finally:
            client.close(timeout_s=2)

    def test_close_gives_connect_back_and_stops_its_clients(self) -> None:
        a = InProcessAggregator(name=f"unit-{uuid.uuid4().hex[:8]}")
        b = a.connect(0)
        b.add_metric("reward/x", 1.0)
        assert b.flush(timeout_s=10).ok
        a.close()
        deadline = time.monotonic() + 2
        while not b.client.stopped.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.client.stopped.is_set()  # the transport's world ended: the client stopped
        assert not isinstance(
            art_ray_metrics.get_client(
                ClientConfig(name=a.name, namespace=a.namespace, lookup_timeout_s=1)
            ).transport,
            InProcessTransport,
        )


class _SlowLookup(InProcessTransport):
    """A transport whose lookups take ``delay`` seconds and find nothing (a GCS that answers
    slowly, an aggregator not started yet)."""

    def __init__(self, agg: InProcessAggregator, delay: float) -> None:
        super().__init__(agg)
        self.delay = delay

    def resolve(self) -> bool:
        if self.ready():
            return True
        if not self.due():
            return False
        self.lookups += 1
        time.sleep(self.delay)
        self.miss("no aggregator (slow lookup)")
        return False


class TestLookupsOffThePath:
    """Defect 4 of issue 19, for any transport: a lookup never runs inside a recording call, a
    flush or an event loop, and a failed one is remembered with back-off."""

    def test_recording_flush_and_aflush_never_wait_for_a_lookup(
        self, agg: InProcessAggregator
    ) -> None:
        # each lookup takes 2 s; the bounds below sit well under it, so a loaded machine's
        # scheduling delays cannot fail them while a lookup on the path still would
        transport = _SlowLookup(agg, delay=2.0)
        client = MetricsClient(_fast(agg, max_batch_leaves=1), transport=transport)
        try:
            b = WorkerBuilder(client, 0, "train", "train")
            started = time.monotonic()
            b.add_metric("reward/x", 1.0)  # fills the batch: ships
            b.add_metric("reward/x", 1.0)
            assert time.monotonic() - started < 0.5
            started = time.monotonic()
            assert not b.flush(timeout_s=0.5).ok
            assert 0.45 <= time.monotonic() - started < 1.5

            async def timed() -> tuple[float, float]:
                gaps: list[float] = []

                async def ticker() -> None:
                    last = time.monotonic()
                    while True:
                        await asyncio.sleep(0.01)
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now

                tick = asyncio.ensure_future(ticker())
                t0 = time.monotonic()
                result = await b.aflush(timeout_s=0.5)
                took = time.monotonic() - t0
                tick.cancel()
                assert not result.ok
                return took, max(gaps)

            took, worst_gap = asyncio.run(timed())
            assert took < 1.5
            assert worst_gap < 1.0  # the loop was never blocked by a lookup (2 s each)
        finally:
            client.close(timeout_s=0.5)

    def test_a_failed_lookup_is_remembered_with_back_off(self, agg: InProcessAggregator) -> None:
        agg.kill()
        transport = agg.transport()
        client = MetricsClient(_fast(agg, flush_interval_s=0.01), transport=transport)
        try:
            b = WorkerBuilder(client, 0, "train", "train")
            for _ in range(50):
                b.add_metric("reward/x", 1.0)
                client.ship()
            time.sleep(1.0)
            # back-off doubles from 50 ms to 2 s: about 5 lookups in a second, not one per send
            assert 2 <= transport.lookups <= 8, transport.lookups
            result = b.flush(timeout_s=0.2)
            assert not result.ok
            assert "no in-process aggregator" in (result.error or "")
            agg.start()
            assert b.flush(timeout_s=10).ok  # found again within the back-off cap
            assert agg.log(0)["reward/x"] == 50.0
        finally:
            client.close(timeout_s=1)


class TestOneLineErrors:
    def test_ray_task_error_is_its_cause_in_one_line(self) -> None:
        ray = pytest.importorskip("ray")
        cause = ValueError("the real reason\nsecond line")
        err = ray.exceptions.RayTaskError(
            "ingest",
            "Traceback (most recent call last):\n  File x\n\x1b[36mray::X\x1b[39m ...",
            cause,
        )
        assert one_line(err) == "ValueError: the real reason"
        assert one_line(RuntimeError("\x1b[31mred\x1b[0m\nmore")) == "RuntimeError: red"


class TestResetClients:
    def test_stopping_at_once_sends_nothing_and_the_next_connect_gets_a_new_client(
        self, agg: InProcessAggregator
    ) -> None:
        """``reset_clients(timeout_s=0)`` (a test's teardown): every client stops without
        flushing and is forgotten; the default closes them, which flushes first."""
        config = _fast(agg, flush_interval_s=3600.0)  # nothing ships on its own
        b = art_ray_metrics.connect(0, config=config)
        old = b.client
        b.add_cost("train/judge", 0.25)
        reset_clients(timeout_s=0)
        assert old.stopped.is_set()
        fresh = art_ray_metrics.connect(0, config=config)
        assert fresh.client is not old
        fresh.add_cost("train/judge", 1.0)
        reset_clients(timeout_s=10)  # closed: flushed first
        assert fresh.client.stopped.is_set()
        row = agg.log(0)
        assert row["costs/train/judge"] == 1.0  # the stopped client's $0.25 was never sent
