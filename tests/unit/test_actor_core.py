"""The actor class without Ray: constructed directly on in-memory storage."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from art_ray_metrics import AggregatorConfig
from art_ray_metrics.distributed.actor import MetricsAggregator


def _actor(**fields: object) -> MetricsAggregator:
    cfg = AggregatorConfig(
        storage_uri=f"memory://{uuid.uuid4().hex}", wandb_mode="disabled", **fields
    )
    return MetricsAggregator(cfg.model_dump_json())


class TestGpuCost:
    def test_configured_gpus_are_charged_per_train_barrier(self) -> None:
        """costs/gpu = wall seconds x hourly price x count / 3600, in costs/all and costs/cum."""
        agg = _actor(gpu_type="H100", gpu_count=2, gpu_hourly_usd=3.0)
        assert agg._gpu_cost(1800.0) == pytest.approx(3.0)

        async def steps() -> dict[str, float]:
            await agg.log(0)
            agg.last_train_barrier -= 3600.0  # an hour of training
            return await agg.log(1, metrics={"costs/train/judge": 1.0})

        row = asyncio.run(steps())
        assert row["costs/gpu"] == pytest.approx(6.0, rel=1e-3)
        assert row["costs/all"] == pytest.approx(7.0, rel=1e-3)
        assert row["costs/cum/gpu"] >= row["costs/gpu"]

    def test_price_table_and_unknown_hardware(self) -> None:
        """The table prices known types; unknown hardware gives no cost."""
        assert _actor(gpu_type="H100", gpu_count=1)._gpu_cost(3600.0) == pytest.approx(2.99)
        assert _actor(gpu_type="TPUv9", gpu_count=4)._gpu_cost(3600.0) is None

    def test_auto_without_ray_charges_nothing(self) -> None:
        """gpu_type='auto' with no Ray GPUs detected: no cost, no error."""
        assert _actor(gpu_type="auto")._gpu_cost(3600.0) is None
        assert _actor()._gpu_cost(3600.0) is None


class TestRestarts:
    def test_counted_even_when_an_instance_dies_before_its_first_checkpoint(self) -> None:
        """Each start claims a writer epoch at once, so uncheckpointed starts still count."""
        cfg = AggregatorConfig(
            storage_uri=f"memory://{uuid.uuid4().hex}", wandb_mode="disabled"
        ).model_dump_json()
        first = MetricsAggregator(cfg)
        assert first.state.meta.restarts == 0
        asyncio.run(first.log(0))  # a checkpoint holding restarts == 0
        for expected in (1, 2, 3):  # each instance replaced before it checkpoints
            assert MetricsAggregator(cfg).state.meta.restarts == expected
