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
        assert agg.gpu.cost(1800.0) == pytest.approx(3.0)

        async def steps() -> dict[str, float]:
            await agg.log(0)
            agg.gpu.since -= 3600.0  # an hour of training
            return await agg.log(1, metrics={"costs/train/judge": 1.0})

        row = asyncio.run(steps())
        assert row["costs/gpu"] == pytest.approx(6.0, rel=1e-3)
        assert row["costs/all"] == pytest.approx(7.0, rel=1e-3)
        assert row["costs/cum/gpu"] >= row["costs/gpu"]

    def test_price_table_and_unknown_hardware(self) -> None:
        """The table prices known types; unknown hardware gives no cost."""
        assert _actor(gpu_type="H100", gpu_count=1).gpu.cost(3600.0) == pytest.approx(2.99)
        assert _actor(gpu_type="TPUv9", gpu_count=4).gpu.cost(3600.0) is None

    def test_auto_without_ray_charges_nothing(self) -> None:
        """gpu_type='auto' with no Ray GPUs detected: no cost, no error."""
        assert _actor(gpu_type="auto").gpu.cost(3600.0) is None
        assert _actor().gpu.cost(3600.0) is None


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


class TestBarrierTimeout:
    def test_raise_leaves_the_step_open_and_close_closes_it(self) -> None:
        """on_timeout='raise': BarrierTimeoutError names who is missing, nothing is closed, and
        the leaves are still there for the next call; the default closes with what arrived."""
        from art_ray_metrics import BarrierTimeoutError
        from art_ray_metrics.core.wire import encode_batch
        from art_ray_metrics.testing import make_batch

        agg = _actor()

        async def run() -> dict[str, float]:
            await agg.ingest(encode_batch(make_batch("judge-1", 1, 0, leaves={"costs/j": 0.5})))
            with pytest.raises(BarrierTimeoutError, match="judge-2"):
                await agg.log(
                    0, expect_producers=["judge-1", "judge-2"], timeout_s=0.05, on_timeout="raise"
                )
            assert 0 not in agg.state.last_closed.values()
            with pytest.raises(BarrierTimeoutError):
                await agg.log(0, expect_producers=2, timeout_s=0.05, on_timeout="raise")
            return await agg.log(0, expect_producers=2, timeout_s=0.05)

        row = asyncio.run(run())
        assert row["costs/all"] == 0.5
        assert agg.health.barrier_timeouts == 3

    def test_unknown_policy_is_refused(self) -> None:
        from art_ray_metrics import InvalidMetricError

        with pytest.raises(InvalidMetricError, match="on_timeout"):
            asyncio.run(_actor().log(0, on_timeout="wait"))
