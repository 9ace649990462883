"""The run budget end to end on the real aggregator in this process (no Ray): admission before
the call from several producers at once, refusals, rows, restarts, raising the limit live."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core.active import reset_active_builder, set_active_builder
from art_ray_metrics.distributed.client import MetricsClient
from art_ray_metrics.distributed.record import WorkerBuilder
from art_ray_metrics.errors import BudgetExceededError
from art_ray_metrics.spend.track import track_api_cost
from art_ray_metrics.testing import InProcessAggregator

PRICE = 1000  # dollars per million tokens, in and out: 10 output tokens cost $0.01


@pytest.fixture
def agg() -> Iterator[InProcessAggregator]:
    a = InProcessAggregator(
        name=f"unit-{uuid.uuid4().hex[:8]}", wal_interval_s=0.02, budget_usd=1.0
    )
    yield a
    a.close()


def _client(agg: InProcessAggregator, producer: str) -> MetricsClient:
    config = ClientConfig(
        name=agg.name, namespace=agg.namespace, flush_interval_s=0.05, budget_lease_calls=2
    )
    return agg.client(producer_id=producer, config=config)


sent: list[str] = []
sent_lock = threading.Lock()


@track_api_cost(
    source="judge",
    provider="openai",
    model_name="gpt-4o-mini",  # known to genai-prices: an unknown name would import LiteLLM
    prompt_price_per_million=PRICE,
    completion_price_per_million=PRICE,
    max_cost_usd=0.03,
)
def judge(producer: str) -> dict[str, Any]:
    with sent_lock:
        sent.append(producer)
    return {"usage": {"prompt_tokens": 0, "completion_tokens": 30}}  # costs its bound


def _wait_enabled(client: MetricsClient) -> None:
    client.budget.active()  # asks whether the run has a budget
    deadline = time.monotonic() + 10
    while client.budget.enabled is None and time.monotonic() < deadline:
        client.budget.active()
        time.sleep(0.02)
    assert client.budget.enabled


def test_concurrent_producers_are_admitted_before_the_call_and_stop_at_the_limit(
    agg: InProcessAggregator,
) -> None:
    sent.clear()
    clients = [_client(agg, f"w{i}") for i in range(3)]
    refused: list[BudgetExceededError] = []
    try:
        for client in clients:
            _wait_enabled(client)

        def rollouts(client: MetricsClient) -> None:
            builder = WorkerBuilder(client, 0, "train", "train")
            token = set_active_builder(builder)
            try:
                for _ in range(30):
                    try:
                        judge(client.producer_id)
                    except BudgetExceededError as exc:
                        refused.append(exc)
                assert builder.flush(timeout_s=10).ok
            finally:
                reset_active_builder(token)

        threads = [threading.Thread(target=rollouts, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(sent) * Decimal("0.03") <= Decimal(1)  # nothing sent past the limit
        assert len(sent) >= 30  # and the budget was used: leases move between producers
        assert refused
        assert all(e.budget == Decimal(1) and e.estimate == Decimal("0.03") for e in refused)
        row = agg.log(0)
        assert row["costs/all"] == pytest.approx(len(sent) * 0.03)
        assert row["costs/budget_remaining"] == pytest.approx(1 - len(sent) * 0.03)
        assert "costs/outcome/unknown" not in row  # no group ids: no outcome keys
        # raised on the live run: calls go through again, and the limit survives a restart
        assert agg.set_budget(2.0)["limit"] == 2.0
        agg.crash()
        assert agg.budget()["limit"] == 2.0
        assert agg.budget()["spent"] == pytest.approx(len(sent) * 0.03)
    finally:
        for client in clients:
            client.close(timeout_s=2)


def test_without_a_budget_calls_are_not_admitted() -> None:
    a = InProcessAggregator(name=f"unit-{uuid.uuid4().hex[:8]}", wal_interval_s=0.02)
    client = _client(a, "w")
    try:
        client.budget.active()
        deadline = time.monotonic() + 10
        while client.budget.enabled is None and time.monotonic() < deadline:
            client.budget.active()
            time.sleep(0.02)
        assert client.budget.enabled is False
        builder = WorkerBuilder(client, 0, "train", "train")
        token = set_active_builder(builder)
        try:
            for _ in range(50):  # $1.50, no limit
                judge("w")
        finally:
            reset_active_builder(token)
        assert builder.flush(timeout_s=10).ok
        row = a.log(0)
        assert row["costs/all"] == pytest.approx(1.5)
        assert "costs/budget_remaining" not in row
    finally:
        client.close(timeout_s=2)
        a.close()


def test_group_fates_split_the_row(agg: InProcessAggregator) -> None:
    client = _client(agg, "w")
    try:
        builder = WorkerBuilder(client, 0, "train", "train")
        builder.add_cost("train/judge", 0.25)
        assert builder.flush(timeout_s=10).ok
        row = agg.log(0, group_fates={"g": "trained"})
        assert row["costs/outcome/unknown"] == 0.25  # no leaf carried a group id
        assert "costs/per_trainable_group" in row
    finally:
        client.close(timeout_s=2)


def _no_checkpoints() -> InProcessAggregator:
    """A $1 run whose state after a crash comes from the write-ahead log alone (no periodic
    checkpoint)."""
    return InProcessAggregator(
        name=f"unit-{uuid.uuid4().hex[:8]}",
        wal_interval_s=0.02,
        checkpoint_interval_s=3600,
        budget_usd=1.0,
    )


def test_grants_are_logged_before_the_answer_so_a_restart_never_grants_twice() -> None:
    """No checkpoint between a grant and a crash: the restarted aggregator replays the grant
    from the write-ahead log, so the budget it hands out over both lives stays within the
    limit (and a checkpoint that already counts a grant does not count it again)."""
    a = _no_checkpoints()
    try:
        first = a._call("budget_grant", "w1", "i1", "0.6", "0.6", "0")
        assert Decimal(first[0]) == Decimal("0.6")
        a.crash()
        assert a.budget()["committed"] == pytest.approx(0.6)
        refused = a._call("budget_grant", "w2", "i2", "0.5", "0.5", "0")
        assert Decimal(refused[0]) == 0  # only $0.40 left: nothing granted
        assert refused[1]
        second = a._call("budget_grant", "w2", "i2", "0.4", "0.4", "0")
        assert Decimal(second[0]) == Decimal("0.4")
        a.checkpoint()
        a.crash()  # the checkpoint counts both; the log's copies are skipped
        assert a.budget()["committed"] == pytest.approx(1.0)
        assert Decimal(a._call("budget_grant", "w3", "i3", "0.1", "0.1", "0")[0]) == 0
    finally:
        a.close()


def test_a_give_back_is_logged_so_a_restart_does_not_count_it_as_held() -> None:
    """Budget an idle producer gave back is free again after a crash with no checkpoint in
    between: the give-back is in the write-ahead log, so the restarted aggregator neither
    holds it against the limit nor would report it as unreconciled."""
    a = _no_checkpoints()
    try:
        assert Decimal(a._call("budget_grant", "w1", "i1", "0.6", "0.6", "0")[0]) == Decimal("0.6")
        a._call("budget_return", "w1", "i1", "0.6")
        # a grant is durable before its answer, and the give-back was queued before it
        assert Decimal(a._call("budget_grant", "w2", "i2", "0.1", "0.1", "0")[0]) == Decimal("0.1")
        a.crash()
        figures = a.budget()
        assert figures["committed"] == pytest.approx(0.1)
        assert figures["leases"] == 1
        granted = a._call("budget_grant", "w3", "i3", "0.9", "0.9", "0")
        assert Decimal(granted[0]) == Decimal("0.9")
    finally:
        a.close()


def test_a_processs_first_paid_call_waits_for_the_answer_and_is_admitted(
    agg: InProcessAggregator,
) -> None:
    sent.clear()
    client = _client(agg, "first")
    try:
        assert client.budget.enabled is None  # nobody asked yet
        builder = WorkerBuilder(client, 0, "train", "train")
        token = set_active_builder(builder)
        try:
            judge("first")  # the very first call: admitted under a lease
        finally:
            reset_active_builder(token)
        assert builder.flush(timeout_s=10).ok
        figures = agg.budget()
        assert figures["leases"] == 1
        assert figures["spent"] == pytest.approx(0.03)
        assert figures["committed"] > figures["spent"]  # the lease it holds
    finally:
        client.close(timeout_s=2)


class _Unreachable:
    lookup_error = "not found"

    def ready(self) -> bool:
        return False


def test_the_first_wait_is_bounded_and_happens_once() -> None:
    from art_ray_metrics.distributed.budget import ClientBudget

    budget = ClientBudget(
        _Unreachable(),
        "w",
        "i",
        lease_calls=2,
        wait_s=1.0,
        default_max_tokens=16,
        first_wait_s=0.2,
    )
    started = time.monotonic()
    assert budget.active() is None  # no answer in time: not admitted
    assert 0.2 <= time.monotonic() - started < 2.0
    started = time.monotonic()
    assert budget.active() is None
    assert time.monotonic() - started < 0.1  # the process waits once


def test_a_rewind_keeps_the_spend_it_discards_in_the_budget(agg: InProcessAggregator) -> None:
    """A rewind removes the discarded steps' rows and totals, not their spend from the budget:
    the money was paid (and the re-run of those steps is paid again)."""
    sent.clear()
    client = _client(agg, "rewound")
    try:
        for step in (0, 1):
            builder = WorkerBuilder(client, step, "train", "train")
            token = set_active_builder(builder)
            try:
                judge("rewound")  # $0.03, admitted under the budget
            finally:
                reset_active_builder(token)
            assert builder.flush(timeout_s=10).ok
            agg.log(step)
        assert agg.budget()["spent"] == pytest.approx(0.06)
        agg.rewind(0)
        assert agg.history()[-1]["costs/cum/all"] == pytest.approx(0.03)  # step 1 is gone
        assert agg.budget()["spent"] == pytest.approx(0.06)  # its $0.03 was still paid
    finally:
        client.close(timeout_s=2)
