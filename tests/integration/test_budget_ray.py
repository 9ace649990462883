"""The run budget with real Ray: admission before the call on several producers at once, a
restart with a budget, and a worker SIGKILLed in the middle of a paid call."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle as cloudpickle

import art_ray_metrics as arm
from art_ray_metrics.errors import BudgetExceededError

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = [pytest.mark.ray, pytest.mark.slow]

ESTIMATE = 0.03  # the decorator's max_cost_usd: every call reserves this much


@arm.track_api_cost(
    source="judge",
    provider="openai",
    # a model genai-prices knows (its own prices below win): for a name no bundled table
    # knows, the first call in each worker process imports LiteLLM to look it up (5 CPU-s,
    # about 10 s with four workers importing it at once on two cores)
    model_name="gpt-4o-mini",
    prompt_price_per_million=1000,
    completion_price_per_million=1000,
    max_cost_usd=ESTIMATE,
)
def judge(response_id: str, completion_tokens: int, sleep_s: float = 0.0) -> dict[str, Any]:
    if sleep_s:
        time.sleep(sleep_s)
    return {
        "id": response_id,
        "usage": {"prompt_tokens": 0, "completion_tokens": completion_tokens},
    }


def _wait_for_budget(builder: Any) -> None:
    client = builder.client
    deadline = time.monotonic() + 30
    while client.budget.enabled is None and time.monotonic() < deadline:
        client.budget.active()
        time.sleep(0.05)


@ray.remote(num_cpus=0)
def rollouts(name: str, producer: str, calls: int) -> tuple[int, int]:
    builder = arm.connect(0, name=name, producer_id=producer)
    _wait_for_budget(builder)
    sent = refused = 0
    with builder.activate_context():
        for i in range(calls):
            try:
                judge(f"{producer}-{os.getpid()}-{i}", 30)  # $0.03: costs its bound
                sent += 1
            except BudgetExceededError:
                refused += 1
    assert builder.flush(timeout_s=30).ok
    return sent, refused


@ray.remote(num_cpus=0)
def dies_mid_call(name: str, pid_file: str) -> None:
    config = arm.ClientConfig(name=name, budget_lease_calls=1)  # at most ~2 reservations held
    builder = arm.connect(0, name=name, producer_id="doomed", config=config)
    _wait_for_budget(builder)
    with builder.activate_context():
        judge("paid-and-shipped", 10)  # $0.01, shipped below
        assert builder.flush(timeout_s=30).ok
        with open(pid_file, "w") as out:  # the test kills this process (same machine)
            out.write(str(os.getpid()))
        judge("paid-never-shipped", 20, sleep_s=600)  # killed in here


class TestBudgetOnRay:
    def test_concurrent_producers_stop_at_the_limit_and_a_restart_keeps_it(
        self, run_config: dict[str, Any]
    ) -> None:
        handle = arm.start_aggregator(**run_config, budget_usd=1.0)
        try:
            refs = [rollouts.remote(run_config["name"], f"w{i}", 20) for i in range(4)]
            results = ray.get(refs, timeout=300)
            sent = sum(s for s, _ in results)
            assert sum(r for _, r in results) > 0
            assert sent * ESTIMATE <= 1.0 + 1e-9  # nothing sent past the limit
            row = handle.log(0)
            assert row["costs/all"] == pytest.approx(sent * ESTIMATE)
            assert row["costs/budget_remaining"] == pytest.approx(1.0 - sent * ESTIMATE)
            assert not any(k.startswith("costs/outcome/") for k in row)  # no groups: no keys
            handle.set_budget(2.0)
            ray.kill(handle.actor, no_restart=False)  # a restart keeps the raised limit
            time.sleep(1)
            figures = handle.budget()
            assert figures["limit"] == 2.0
            assert figures["spent"] == pytest.approx(sent * ESTIMATE)
        finally:
            handle.shutdown()

    def test_a_worker_killed_mid_call_is_bounded_by_one_reservation(
        self, run_config: dict[str, Any], tmp_path: Path
    ) -> None:
        handle = arm.start_aggregator(**run_config, budget_usd=10.0, budget_silence_timeout_s=3.0)
        try:
            pid_file = tmp_path / "pid"
            ref = dies_mid_call.options(max_retries=0).remote(run_config["name"], str(pid_file))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not pid_file.exists():
                time.sleep(0.2)
            time.sleep(1.0)  # the second call is in flight (sleeping in the "API")
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            with pytest.raises(ray.exceptions.RayError):
                ray.get(ref, timeout=60)
            time.sleep(4.0)  # silent past the timeout
            row = handle.log(0)
            paid = 0.02  # the call in flight when it died (20 tokens at $1000 per million)
            bound = row["costs/cum/unreconciled"]
            assert row["costs/all"] == pytest.approx(0.01)
            assert paid <= bound <= paid + ESTIMATE  # covers it, tight within one reservation
        finally:
            handle.shutdown()
