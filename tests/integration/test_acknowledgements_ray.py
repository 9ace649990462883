"""An acknowledgement is a promise, on real Ray: two rollouts of one worker process share a
batch, one of them breaks a limit; the other's leaves are in the row and its flush is ok, the
offender's flush is not (naming the keys), and the row counts what was refused."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import ray
import ray.cloudpickle as cloudpickle

import art_ray_metrics as arm

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
def _two_rollouts(name: str, step: int, keys: int, big: float | None) -> list[Any]:
    """Rollout A records $1, rollout B records ``keys`` new keys (and ``big`` seconds); both
    land in one batch (nothing ships before the first flush)."""
    a = arm.connect(step, name=name)
    b = arm.connect(step, name=name)
    a.add_cost("train/a", 1.0)
    for i in range(keys):
        b.add_metric(f"reward/k{i}", 1.0)
    if big is not None:
        b.add_metric("time/step_x_s", big)
    ra, rb = a.flush(timeout_s=60), b.flush(timeout_s=60)
    assert rb.batches == ra.batches  # one batch held both rollouts' leaves
    return [ra.ok, ra.error, rb.ok, rb.error]


class TestOneRolloutNeverSinksAnother:
    def test_over_limit_keys_and_sum_overflow(self, run_config: dict[str, Any]) -> None:
        handle = arm.start_aggregator(**run_config, max_keys_per_step=100)
        name = run_config["name"]
        try:
            a_ok, a_error, b_ok, b_error = ray.get(_two_rollouts.remote(name, 0, 101, None))
            assert a_ok, a_error
            assert not b_ok
            assert "max_keys_per_step=100" in b_error
            row = handle.log(0)
            assert row["costs/all"] == 1.0
            assert row["telemetry/lost_leaves_in_row"] == 2.0
            assert row["telemetry/limit_rejections"] == 1.0

            # another producer holds a huge sum; B's would overflow it: only B's key is refused
            first = arm.connect(1, name=name, producer_id="first")
            first.add_metric("time/step_x_s", 6e299)
            assert first.flush(timeout_s=60).ok
            a_ok, a_error, b_ok, b_error = ray.get(_two_rollouts.remote(name, 1, 0, 6e299))
            assert a_ok, a_error
            assert not b_ok
            assert "time/step_x_s" in b_error
            row = handle.log(1)
            assert row["costs/all"] == 1.0
            assert row["time/step_x_s"] == 6e299
            assert row["telemetry/lost_leaves_in_row"] == 1.0
            assert row["telemetry/rejected_batches"] == 0.0
        finally:
            handle.shutdown()
