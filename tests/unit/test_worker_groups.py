"""Workers tag their cost leaves with the rollout's trajectory group (``connect(group=...)``,
``WorkerBuilder.set_group``, or the scenario id of ``add_data``); the barrier's fates split the
spend into ``costs/outcome/<fate>``, exactly, with the aggregator in this process (no Ray)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core.active import reset_active_builder, set_active_builder
from art_ray_metrics.core.outcome import FATES, group_digest
from art_ray_metrics.core.wire import FORMAT_VERSION, SPEND_VERSION, decode_batch
from art_ray_metrics.distributed.client import MetricsClient
from art_ray_metrics.distributed.record import WorkerBuilder
from art_ray_metrics.spend.track import track_api_cost
from art_ray_metrics.testing import InProcessAggregator

D = Decimal


@pytest.fixture
def agg() -> Iterator[InProcessAggregator]:
    a = InProcessAggregator(name=f"unit-{uuid.uuid4().hex[:8]}", wal_interval_s=0.02)
    yield a
    a.close()


def _client(agg: InProcessAggregator, producer: str) -> MetricsClient:
    config = ClientConfig(name=agg.name, namespace=agg.namespace, flush_interval_s=0.05)
    return agg.client(producer_id=producer, config=config)


@track_api_cost(
    source="judge",
    provider="openai",
    model_name="m",
    prompt_price_per_million=1000,
    completion_price_per_million=1000,
)
def judge(response_id: str, tokens: int) -> dict[str, Any]:
    return {"id": response_id, "usage": {"prompt_tokens": 0, "completion_tokens": tokens}}


def _outcomes(row: dict[str, float]) -> dict[str, D]:
    return {f: D(repr(row[f"costs/outcome/{f}"])) for f in FATES}


def test_worker_groups_split_the_spend_by_fate_exactly(agg: InProcessAggregator) -> None:
    clients = [_client(agg, "w1"), _client(agg, "w2")]
    try:
        a = WorkerBuilder(clients[0], 1, "train", "train").set_group("g-a")
        a.add_cost("train/tool", 0.1)
        token = set_active_builder(a)
        try:
            judge("resp-1", 20)  # $0.02, keyed: applied once per response id
        finally:
            reset_active_builder(token)
        b = WorkerBuilder(clients[1], 1, "train", "train")
        b.add_data(scenario_ids=["g-b"])  # the scenario id is the default group
        b.add_cost("train/tool", 0.2)
        token = set_active_builder(b)
        try:
            judge("resp-1", 20)  # the same response again: neither cost nor group spend twice
            judge("resp-2", 30)
        finally:
            reset_active_builder(token)
        b.for_cost_context("eval", buffer_scope="train").add_cost("eval/x", 0.05)  # a view
        untagged = WorkerBuilder(clients[1], 1, "train", "train")
        untagged.add_cost("train/tool", 0.4)
        for builder in (a, b, untagged):
            assert builder.flush(timeout_s=10).ok
        fates = {"g-a": "trained", "g-b": "zero_variance"}
        row = agg.log(1, metrics={"costs/gpu": 1.0}, group_fates=fates)
        outcomes = _outcomes(row)
        assert outcomes["trained"] == D("0.12")
        assert outcomes["zero_variance"] == D("0.28")
        assert outcomes["unknown"] == D("1.4")  # untagged leaves and the trainer's GPU
        assert sum(outcomes.values()) == D(repr(row["costs/all"])) == D("1.8")
        assert row["costs/per_trainable_group"] == pytest.approx(1.8)
    finally:
        for client in clients:
            client.close(timeout_s=2)


def test_connect_names_the_group_and_a_named_group_beats_the_scenario(
    agg: InProcessAggregator,
) -> None:
    builder = agg.connect(0, producer_id="w-connect", group="named")
    client = builder.client
    try:
        builder.add_data(scenario_ids=["s-1"])  # a default never replaces a named group
        builder.add_cost("train/tool", 0.5)
        later = WorkerBuilder(client, 0, "train", "train")
        later.add_data(scenario_ids=["s-2"])
        later.set_group("renamed")  # a named group replaces the default
        later.add_cost("train/tool", 0.25)
        with client._lock:
            client._drain()
            pending = client._pending[(0, "train")]
            assert pending.group_sums() == {
                group_digest("named"): D("0.5"),
                group_digest("renamed"): D("0.25"),
            }
        assert builder.flush(timeout_s=10).ok
        row = agg.log(0, group_fates={"named": "errored", "renamed": "stale"})
        assert row["costs/outcome/errored"] == 0.5
        assert row["costs/outcome/stale"] == 0.25
        assert row["costs/cum/outcome/errored"] == 0.5
    finally:
        client.close(timeout_s=2)


@pytest.mark.parametrize("shipped_between", [False, True], ids=["on-tape", "shipped"])
def test_a_group_covers_exactly_the_leaves_recorded_after_it(
    agg: InProcessAggregator, shipped_between: bool
) -> None:
    """A cost recorded before the rollout's group is set stays ungrouped whether or not a
    background ship drained it in between: the outcome split must not depend on timing."""
    client = _client(agg, f"w-order-{shipped_between}")
    try:
        builder = WorkerBuilder(client, 0, "train", "train")
        builder.add_cost("train/tool", 0.2)  # before any group
        if shipped_between:
            client.ship()
        builder.add_data(scenario_ids=["g"])  # the default group from here on
        builder.add_cost("train/judge", 0.05)
        assert builder.flush(timeout_s=10).ok
        outcomes = _outcomes(agg.log(0, group_fates={"g": "trained"}))
        assert outcomes["trained"] == D("0.05")
        assert outcomes["unknown"] == D("0.2")
    finally:
        client.close(timeout_s=2)


def test_batches_carry_group_spend_only_when_tagged(agg: InProcessAggregator) -> None:
    client = _client(agg, "w")
    sent: list[bytes] = []
    transport = client._transport
    original = transport.send

    def spy(data: bytes, durable: bool) -> Any:
        sent.append(data)
        return original(data, durable)

    transport.send = spy  # type: ignore[method-assign]
    try:
        plain = WorkerBuilder(client, 0, "train", "train")
        plain.add_cost("train/tool", 0.5)
        assert plain.flush(timeout_s=10).ok
        tagged = WorkerBuilder(client, 0, "train", "train").set_group("g")
        tagged.add_cost("train/tool", 0.5)
        assert tagged.flush(timeout_s=10).ok
        versions = [decode_batch(d).version for d in sent]
        assert versions[0] == FORMAT_VERSION
        assert versions[-1] == SPEND_VERSION
        assert decode_batch(sent[-1]).groups[0].group_spend == {group_digest("g"): D("0.5")}
    finally:
        client.close(timeout_s=2)
