"""The worker client's protocol edges without a Ray cluster: refusal at the call, encoding
before a seq is consumed, retained-cap overflow reported in the next batch, exit without Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from art_ray_metrics import InvalidMetricError
from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core.wire import decode_batch
from art_ray_metrics.distributed import client as client_mod
from art_ray_metrics.distributed.client import MetricsClient
from art_ray_metrics.distributed.record import WorkerBuilder


class _Method:
    def __init__(self, sent: list[Any]) -> None:
        self.sent = sent

    def remote(self, *args: Any) -> object:
        self.sent.append(args)
        return object()  # a ref that never completes


class _FakeActor:
    """Records what the client sends; never answers."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.ingest = _Method(self.sent)
        self.confirm = _Method(self.sent)


@pytest.fixture
def client() -> Iterator[MetricsClient]:
    c = MetricsClient(
        ClientConfig(
            flush_interval_s=1e6,
            max_batch_leaves=10**9,
            max_in_flight=1000,
            max_retained_batches=2,
        ),
        actor=_FakeActor(),
    )
    c.stopped.set()  # no background thread: it would ray.wait on the fake refs
    c._thread.join()
    yield c
    c.stopped.set()


class TestRefusedAtTheCall:
    @pytest.mark.parametrize(
        ("call", "named"),
        [
            (lambda b: b.add_metric("reward/judge\udce9", 1.0), "reward/judge"),
            (lambda b: b.add_metric("time/step_x_s", 10**400), "time/step_x_s"),
            (lambda b: b.add_metric("time/step_x_s", -(10**400)), "time/step_x_s"),
            (lambda b: b.add_cost("train/x", 10**400), "costs/train/x"),
            (lambda b: b.add_data(scenario_ids=["\udce9"]), "scenario"),
            (lambda b: b.for_step(-1), "-1"),
            (lambda b: b.for_cost_context("ev\udce9l"), "cost_context"),
        ],
    )
    def test_refused_and_nothing_pending_changes(
        self, client: MetricsClient, call: Any, named: str
    ) -> None:
        b = WorkerBuilder(client, 0, "train", "train")
        b.add_metric("reward/ok", 1.0)
        with pytest.raises(InvalidMetricError) as info:
            call(b)
        assert named in str(info.value)
        assert client._pending_now()[(0, "train")].sums() == {"reward/ok": 1}
        assert client.ship() == 1
        assert decode_batch(client._retained[1]).groups[0].sums == {"reward/ok": 1}

    def test_a_sum_that_would_overflow_is_refused_at_the_second_leaf(
        self, client: MetricsClient
    ) -> None:
        """Also across batches: the first large value was shipped already. The bound is the
        aggregator's (+-1e300 for a leaf and for a pending sum), so 1e308 is refused at once."""
        b = WorkerBuilder(client, 0, "train", "train")
        with pytest.raises(InvalidMetricError, match="time/step_big_s"):
            b.add_metric("time/step_big_s", 1e308)
        b.add_metric("time/step_big_s", 6e299)
        with pytest.raises(InvalidMetricError, match="time/step_big_s"):
            b.add_metric("time/step_big_s", 6e299)
        client.ship()
        with pytest.raises(InvalidMetricError, match="time/step_big_s"):
            b.add_metric("time/step_big_s", 6e299)
        b.add_metric("time/step_big_s", -6e299)  # brings the sum back: fine
        b.add_metric("time/step_big_s", 6e299)


class TestShipping:
    def test_encoding_failure_consumes_no_seq(
        self, client: MetricsClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        b = WorkerBuilder(client, 0, "train", "train")
        b.add_metric("reward/a", 1.0)
        real = client_mod.encode_batch

        def broken(batch: Any) -> bytes:
            raise TypeError("boom")

        monkeypatch.setattr(client_mod, "encode_batch", broken)
        assert client.ship() is None
        assert client._seq == 0
        monkeypatch.setattr(client_mod, "encode_batch", real)
        b.add_metric("reward/b", 1.0)
        assert client.ship() == 1
        result = client._result(True)
        assert not result.ok
        assert result.error is not None
        assert "boom" in result.error
        assert client._result(True).ok  # reported once

    def test_retained_cap_overflow_is_reported_in_the_next_batch(
        self, client: MetricsClient
    ) -> None:
        b = WorkerBuilder(client, 0, "train", "train")
        for i in range(4):
            b.add_metric("reward/a", float(i))
            client.ship()
        assert client.counters["dropped_retained"] == 2
        last = decode_batch(client._retained[4])
        assert last.dropped == 1  # batch 4 displaced batch 2 and says so
        assert last.incarnation == client.incarnation
        assert last.acked_upto == 2  # batches 1 and 2 were dropped: never resent
        assert last.lost == ((1, 0, "train", 1), (2, 0, "train", 1))  # until acknowledged

    def test_each_flush_covers_its_own_rollout(self, client: MetricsClient) -> None:
        """Builders track the batches their leaves went into."""
        a = WorkerBuilder(client, 0, "train", "train")
        a.add_metric("reward/a", 1.0)
        client.ship()
        b = WorkerBuilder(client, 0, "train", "train")
        b.add_metric("reward/b", 1.0)
        view = b.for_cost_context("eval")
        view.add_cost("eval/x", 0.5)
        assert client.rollout_range(a._ctx) == (1, 1)
        assert client.rollout_range(b._ctx) == (2, 2)
        assert view._rollout == b._rollout
        client.ship()
        c = WorkerBuilder(client, 0, "train", "train")  # records nothing: still reported
        c.add_metric("reward/a", 1.0)
        assert client.rollout_range(c._ctx) == (3, 3)
        assert client.rollout_range(a._ctx) == (1, 1)  # later batches are not a's


class TestExit:
    @pytest.mark.slow  # a fresh interpreter that imports Ray
    def test_close_without_ray_never_starts_ray(self) -> None:
        """In a fresh process (this one may have joined the session's cluster): closing a client
        with pending leaves, and interpreter exit, leave Ray uninitialised."""
        code = (
            "import atexit, ray\n"
            "# registered first, so it runs last: after the client's own exit handler\n"
            "atexit.register(lambda: print('ray_initialized_at_exit', ray.is_initialized()))\n"
            "from art_ray_metrics.config import ClientConfig\n"
            "from art_ray_metrics.distributed.client import MetricsClient\n"
            "from art_ray_metrics.distributed.record import WorkerBuilder\n"
            "c = MetricsClient(ClientConfig(lookup_timeout_s=1.0))\n"
            "WorkerBuilder(c, 0, 'train', 'train').add_metric('reward/a', 1.0)\n"
            "c.close()\n"
            "assert not ray.is_initialized()\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
        )
        assert proc.returncode == 0, proc.stderr
        assert "ray_initialized_at_exit False" in proc.stdout


class _SlowSendTransport:
    """A transport whose first send blocks until released; every send answers durable."""

    lookup_error = None

    def __init__(self) -> None:
        import concurrent.futures
        import threading

        self.sends: list[int] = []
        self.first_started = threading.Event()
        self.release = threading.Event()
        self._futures = concurrent.futures

    def ready(self) -> bool:
        return True

    def gone(self) -> bool:
        return False

    def resolve(self) -> bool:
        return True

    def send(self, data: bytes, durable: bool) -> Any:
        from art_ray_metrics.core.replies import IngestAck
        from art_ray_metrics.core.wire import batch_identity

        ident = batch_identity(data)
        assert ident is not None
        self.sends.append(ident[2])
        if len(self.sends) == 1:
            self.first_started.set()
            assert self.release.wait(5)
        fut: Any = self._futures.Future()
        fut.set_result(IngestAck(ident[0], ident[2], False, True, ident[2]))
        return fut

    def confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
        return True

    def wait(self, calls: list[Any], num_returns: int, timeout_s: float) -> list[Any]:
        from art_ray_metrics.distributed.transport import wait_futures

        return wait_futures(calls, num_returns, timeout_s)

    def outcome(self, call: Any) -> Any:
        return call.result()

    def failed(self, exc: BaseException) -> None:
        pass

    def after_fork(self) -> Any:
        return self


def test_a_batch_being_sent_is_never_sent_again_by_another_flush() -> None:
    """A flush whose batch another thread is still sending (built, its call not in flight yet)
    waits for that call: it used to send a copy (a wasted actor call per flushing thread)."""
    import threading

    transport = _SlowSendTransport()
    c = MetricsClient(ClientConfig(flush_interval_s=1e6), transport=transport)
    try:
        b = WorkerBuilder(c, 0, "train", "train")
        b.add_metric("reward/x", 1.0)
        first = threading.Thread(target=lambda: b.flush(timeout_s=5))
        first.start()
        assert transport.first_started.wait(5)  # batch 1 built, its send under way
        results: list[Any] = []
        second = threading.Thread(target=lambda: results.append(c.flush_range(1, 1, 5)))
        second.start()
        second.join(0.2)
        assert second.is_alive()  # waiting for the call being sent, not sending a copy
        transport.release.set()
        first.join(5)
        second.join(5)
        assert results[0].ok
        assert transport.sends == [1]
    finally:
        c.stopped.set()
