"""Defect 4 of issue 19 at the Ray boundary, without a cluster: ``ray.get_actor`` is replaced by
one that takes 0.2 s and finds nothing (no aggregator started yet), with Ray reported as
initialized. No recording call, flush or event loop may wait for it, and failed lookups are
remembered with back-off. (tests/integration/test_transport_ray.py does the same on real Ray.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from art_ray_metrics.config import ClientConfig
from art_ray_metrics.distributed.client import MetricsClient
from art_ray_metrics.distributed.record import WorkerBuilder

ray = pytest.importorskip("ray")


_MADE: list[MetricsClient] = []


class _Calls(list[float]):
    delay = 0.2  # seconds each lookup takes
    name = "nobody"  # only lookups of this name count: clients other tests left running in
    # this process look their own aggregator up through the same patched ``ray.get_actor``


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Calls]:
    """The lookups made; the clients' threads are stopped before ``ray`` is restored."""
    calls = _Calls()

    def get_actor(name: str, namespace: str | None = None) -> Any:
        if name == calls.name:
            calls.append(time.monotonic())
        time.sleep(calls.delay)
        raise ValueError(f"Failed to look up actor with name '{name}'")

    monkeypatch.setattr(ray, "get_actor", get_actor)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    yield calls
    while _MADE:
        made = _MADE.pop()
        made.stopped.set()
        made._thread.join(timeout=5)


def _client(**fields: Any) -> MetricsClient:
    client = MetricsClient(ClientConfig(name="nobody", lookup_timeout_s=5.0, **fields))
    _MADE.append(client)
    return client


def test_a_batch_that_fills_never_waits_for_a_lookup(lookups: _Calls) -> None:
    lookups.delay = 1.0  # far above the bound: a loaded machine cannot fail it, a wait would
    client = _client(max_batch_leaves=1)
    try:
        b = WorkerBuilder(client, 0, "train", "train")
        worst = 0.0
        for i in range(20):
            started = time.monotonic()
            b.add_metric("reward/x", float(i))  # every one fills a batch and ships it
            worst = max(worst, time.monotonic() - started)
        assert worst < 0.5, f"a recording call took {worst:.3f} s"
    finally:
        client.stopped.set()


def test_flush_returns_within_its_timeout(lookups: _Calls) -> None:
    client = _client()
    try:
        b = WorkerBuilder(client, 0, "train", "train")
        b.add_metric("reward/x", 1.0)
        started = time.monotonic()
        result = b.flush(timeout_s=0.5)
        took = time.monotonic() - started
        assert not result.ok
        # lookups repeated inside the flush took 3.2 s here (5 s lookup timeout)
        assert took < 2.0, f"flush(timeout_s=0.5) took {took:.3f} s"
        assert "no aggregator actor 'nobody'" in (result.error or "")
    finally:
        client.stopped.set()


def test_aflush_keeps_its_timeout_and_the_loop_runs(lookups: _Calls) -> None:
    lookups.delay = 1.5  # a lookup on the event loop would stall it this long
    client = _client()
    b = WorkerBuilder(client, 0, "train", "train")
    b.add_metric("reward/x", 1.0)

    async def main() -> tuple[float, float]:
        gaps = [0.0]

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.ensure_future(ticker())
        started = time.monotonic()
        result = await b.aflush(timeout_s=1.0)
        took = time.monotonic() - started
        tick.cancel()
        assert not result.ok
        return took, max(gaps)

    try:
        took, worst_gap = asyncio.run(main())
        assert took < 2.0, f"aflush(timeout_s=1) took {took:.3f} s"
        assert worst_gap < 1.0, f"the event loop stalled {worst_gap:.3f} s"
    finally:
        client.stopped.set()


def test_failed_lookups_back_off(lookups: _Calls) -> None:
    client = _client(flush_interval_s=0.01)
    try:
        b = WorkerBuilder(client, 0, "train", "train")
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            b.add_metric("reward/x", 1.0)
            client.ship()
            time.sleep(0.02)
        # 0.2 s per lookup plus back-off doubling from 50 ms (cap 2 s): a handful in 2 s
        assert 2 <= len(lookups) <= 7, len(lookups)
    finally:
        client.stopped.set()


def test_flush_error_is_one_line_without_the_remote_traceback() -> None:
    """Minor of issue 19: a Ray task error reaches FlushResult.error as its cause, one line."""
    client = MetricsClient(ClientConfig(flush_interval_s=1e6))
    client.stopped.set()
    client._thread.join()
    trace = (
        'Traceback (most recent call last):\n  File "actor.py", line 1, in ingest\n'
        "\x1b[36mray::MetricsAggregator.ingest()\x1b[39m (pid=1, ip=127.0.0.1)\n"
    )
    cause = RuntimeError("storage is down\nsecond line of detail")
    client._failed(ray.exceptions.RayTaskError("ingest", trace, cause))
    error = client._result(False).error or ""
    assert error == "RuntimeError: storage is down"


def test_back_off_leaves_the_global_random_state_alone() -> None:
    """Was: the jitter of resends and lookups drew from the ``random`` module, so a client's
    background thread moved a seeded experiment's (or hypothesis's) global random state."""
    import random

    from art_ray_metrics.distributed.transport import RayTransport

    random.seed(1234)
    before = random.getstate()
    client = MetricsClient(ClientConfig(flush_interval_s=1e6), transport=RayTransport("x", "y"))
    try:
        for _ in range(5):
            client._failed(RuntimeError("down"))
            client._transport.miss("no aggregator")  # type: ignore[attr-defined]
    finally:
        client.close(timeout_s=0.1)
    assert random.getstate() == before
