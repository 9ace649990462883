"""``add_sample`` on a real multi-node Ray cluster: per-rollout values averaged exactly across
workers, batches, resends and an aggregator restart."""

from __future__ import annotations

import statistics
import sys
import time
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
import ray
import ray.cloudpickle as cloudpickle

import art_ray_metrics as arm

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.ray


def _reward(step: int, i: int) -> float:
    return round(0.1 * ((7 * i + step) % 11), 6)


@ray.remote(num_cpus=0)
def rollout(name: str, step: int, i: int) -> None:
    b = arm.connect(step, name=name)
    b.add_sample("reward/judge_score", _reward(step, i))
    b.add_metric("reward/judge_score_sum", _reward(step, i))
    assert b.flush(timeout_s=30).ok


def _exact(values: list[float]) -> tuple[float, float]:
    exact = [Fraction(Decimal(repr(v))) for v in values]
    return float(statistics.mean(exact)), statistics.pstdev(exact)


def test_rollouts_on_three_nodes_give_the_average(run_config: dict[str, Any]) -> None:
    """Twelve rollouts over three nodes: the row holds their mean, not their sum."""
    handle = arm.start_aggregator(**run_config)
    try:
        for step in range(2):
            nodes = ["head", "node_a", "node_b"] * 4
            ray.get(
                [
                    rollout.options(resources={res: 1}).remote(run_config["name"], step, i)
                    for i, res in enumerate(nodes)
                ]
            )
            row = handle.log(step)
            values = [_reward(step, i) for i in range(12)]
            mean, std = _exact(values)
            assert row["reward/judge_score"] == mean
            assert row["reward/judge_score_std_dev"] == std
            assert row["reward/judge_score_count"] == 12.0
            assert (row["reward/judge_score_min"], row["reward/judge_score_max"]) == (
                min(values),
                max(values),
            )
            assert row["reward/judge_score_sum"] == pytest.approx(sum(values))
    finally:
        handle.shutdown()


@pytest.mark.slow
def test_actor_killed_between_batches_keeps_the_average_exact(run_config: dict[str, Any]) -> None:
    """One value per batch, the actor killed midway: resent batches count once."""
    handle = arm.start_aggregator(**run_config)
    client = arm.get_client(arm.ClientConfig(name=run_config["name"], flush_interval_s=0.05))
    try:
        b = arm.connect(0, name=run_config["name"])
        values = [round(0.37 * i % 1.3, 6) for i in range(30)]
        for i, v in enumerate(values):
            b.add_sample("reward/a", v)
            client.ship()
            if i == 15:
                ray.kill(handle.actor, no_restart=False)
            time.sleep(0.01)
        assert b.flush(timeout_s=60).ok
        row = handle.log(0)
        mean, std = _exact(values)
        assert (row["reward/a"], row["reward/a_std_dev"]) == (mean, std)
        assert row["reward/a_count"] == 30.0
    finally:
        handle.shutdown()
