"""GPU time between the last barrier and an aggregator restart is charged once, at the next one."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from art_ray_metrics import AggregatorConfig
from art_ray_metrics.distributed import actor as actor_mod
from art_ray_metrics.distributed.actor import MetricsAggregator

PRICE = 3.6  # USD per GPU-hour: one GPU-second costs a tenth of a cent


def test_the_gap_before_a_restart_is_charged_exactly_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr(actor_mod, "_wall_clock", lambda: clock[0], raising=False)
    cfg = AggregatorConfig(
        storage_uri=f"memory://{uuid.uuid4().hex}",
        wandb_mode="disabled",
        gpu_type="H100",
        gpu_count=1,
        gpu_hourly_usd=PRICE,
    ).model_dump_json()

    first = MetricsAggregator(cfg)
    clock[0] += 100.0
    row0 = asyncio.run(first.log(0))
    assert row0["costs/gpu"] == pytest.approx(0.1)  # 100 s since the start

    clock[0] += 3600.0  # training goes on; the aggregator dies before the next barrier
    restarted = MetricsAggregator(cfg)
    clock[0] += 600.0
    row1 = asyncio.run(restarted.log(1))
    assert row1["costs/gpu"] == pytest.approx(4.2)  # 3,600 s before the restart + 600 s after

    clock[0] += 10.0
    row2 = asyncio.run(restarted.log(2))
    assert row2["costs/gpu"] == pytest.approx(0.01)  # charged once: only the new 10 s
    assert row2["costs/cum/gpu"] == pytest.approx(0.1 + 4.2 + 0.01)

    again = MetricsAggregator(cfg)  # restart right after a barrier: nothing extra
    clock[0] += 5.0
    assert asyncio.run(again.log(3))["costs/gpu"] == pytest.approx(0.005)


def test_real_clock_a_second_before_the_restart_is_charged() -> None:
    """Without any injected clock: the second between barrier 0 and the restart is in row 1."""
    cfg = AggregatorConfig(
        storage_uri=f"memory://{uuid.uuid4().hex}",
        wandb_mode="disabled",
        gpu_type="H100",
        gpu_count=1,
        gpu_hourly_usd=3600.0,  # one USD per GPU-second
    ).model_dump_json()
    asyncio.run(MetricsAggregator(cfg).log(0))
    time.sleep(1.0)
    assert asyncio.run(MetricsAggregator(cfg).log(1))["costs/gpu"] >= 1.0
