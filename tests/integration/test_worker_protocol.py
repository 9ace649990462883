"""The worker <-> actor protocol at concurrency and under bad input, on real Ray: concurrent
rollouts in one process, producers restarted under a fixed id, values the actor would refuse,
and an actor that refuses a batch."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time
from typing import Any

import pytest
import ray
import ray.cloudpickle as cloudpickle

import art_ray_metrics as arm
from art_ray_metrics.distributed.clients import get_client

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.ray


def _rollout(name: str, step: int, i: int) -> arm.WorkerBuilder:
    b = arm.connect(step, name=name)
    for _ in range(4):
        b.add_cost("train/llm_judge/correctness", 0.25)
    b.add_metric(f"reward/r{i}", float(i + 1))
    b.add_data(scenario_ids=[f"s{i}"])
    b.add_user_timing(step_actor_s=0.5)
    return b


class TestConcurrentRollouts:
    def test_threads_each_see_their_own_leaves(self, run_config: dict[str, Any]) -> None:
        """32 threads of one process flush at once; each flush covers its own leaves."""
        handle = arm.start_aggregator(**run_config)
        name = run_config["name"]
        try:
            barrier = threading.Barrier(32)

            def work(i: int) -> bool:
                b = _rollout(name, 0, i)
                barrier.wait()
                return b.flush(timeout_s=60).ok

            with concurrent.futures.ThreadPoolExecutor(32) as pool:
                assert all(pool.map(work, range(32)))
            row = handle.log(0)
            assert all(row[f"reward/r{i}"] == i + 1 for i in range(32))
            assert row["costs/train/llm_judge/correctness"] == pytest.approx(32.0)
            assert row["data/cum/num_unique_scenarios"] == 32
        finally:
            handle.shutdown()

    def test_asyncio_64_coroutines_without_threads(self, run_config: dict[str, Any]) -> None:
        """64 coroutines flush in one event loop; no flush borrows an executor thread."""
        handle = arm.start_aggregator(**run_config)
        name = run_config["name"]
        assert arm.connect(0, name=name).flush(timeout_s=60).ok  # actor looked up once

        class NoThreads(concurrent.futures.ThreadPoolExecutor):
            def submit(self, *args: Any, **kwargs: Any) -> Any:
                raise AssertionError("aflush used a thread")

        async def main() -> list[bool]:
            asyncio.get_running_loop().set_default_executor(NoThreads(1))

            async def one(i: int) -> bool:
                b = _rollout(name, 1, i)
                await asyncio.sleep(0)
                return (await b.aflush(timeout_s=60)).ok

            return await asyncio.gather(*(one(i) for i in range(64)))

        try:
            assert all(asyncio.run(main()))
            row = handle.log(1)
            assert all(row[f"reward/r{i}"] == i + 1 for i in range(64))
            assert row["costs/train/llm_judge/correctness"] == pytest.approx(64.0)
        finally:
            handle.shutdown()


@ray.remote(max_restarts=1, max_task_retries=0, num_cpus=0)
class Judge:
    def __init__(self, name: str) -> None:
        self.name = name

    def spend(self, usd: float) -> bool:
        b = arm.connect(0, name=self.name, producer_id="judge-1")
        b.add_cost("train/llm_judge/correctness", usd)
        return b.flush(timeout_s=60).ok

    def die(self) -> None:
        os._exit(1)


class TestProducerIdentity:
    def test_restarted_producer_under_fixed_id_loses_nothing(
        self, run_config: dict[str, Any]
    ) -> None:
        """Judge flushes $1, is killed and restarted by Ray, flushes $2: the row has $3."""
        handle = arm.start_aggregator(**run_config)
        try:
            judge = Judge.remote(run_config["name"])
            assert ray.get(judge.spend.remote(1.0))
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(judge.die.remote())
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert ray.get(judge.spend.remote(2.0))
                    break
                except ray.exceptions.RayActorError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            row = handle.log(0, expect_producers=["judge-1"], timeout_s=30)
            assert row["costs/train/llm_judge/correctness"] == 3.0
            assert row["costs/cum/all"] == 3.0
        finally:
            handle.shutdown()

    def test_connect_honours_producer_id_once_a_client_exists(
        self, run_config: dict[str, Any]
    ) -> None:
        """A second producer id in a process that already has a client is its own producer."""
        handle = arm.start_aggregator(**run_config)
        name = run_config["name"]
        try:
            assert arm.connect(0, name=name).flush(timeout_s=60).ok
            b = arm.connect(0, name=name, producer_id="judge-7")
            assert b.client.producer_id == "judge-7"
            b.add_cost("train/judge", 0.5)
            assert b.flush(timeout_s=60).ok
            row = handle.log(0, expect_producers=["judge-7"], timeout_s=30)
            assert row["costs/train/judge"] == 0.5
        finally:
            handle.shutdown()


class TestNothingWedgesAProducer:
    def test_bad_values_refused_at_the_call_then_good_leaves_arrive(
        self, run_config: dict[str, Any]
    ) -> None:
        """Everything the actor would refuse raises at the call naming key and value; the
        producer keeps working and its good leaves all arrive."""
        handle = arm.start_aggregator(**run_config)
        name = run_config["name"]
        try:
            b = arm.connect(0, name=name)
            b.add_metric("time/step_big_s", 6e299)
            b.add_cost("train/huge", 6e299)
            bad_calls = [
                (lambda: b.add_metric("reward/judge\udce9", 1.0), "reward/judge"),
                (lambda: b.add_metric("time/step_x_s", 10**400), "time/step_x_s"),
                (lambda: b.add_metric("time/step_big_s", 6e299), "time/step_big_s"),  # sum > 1e300
                (lambda: b.add_cost("train/huge", 6e299), "costs/train/huge"),
                (lambda: b.add_metric("time/step_y_s", 1e308), "time/step_y_s"),  # leaf > 1e300
                (lambda: b.add_metric("reward/x", float("nan")), "reward/x"),
                (lambda: b.add_data(scenario_ids=["s\udce9"]), "scenario"),
                (lambda: arm.connect(-1, name=name), "-1"),
                (lambda: arm.connect(True, name=name), "True"),  # type: ignore[arg-type]
                (lambda: arm.connect(0, "tr\udce9in", name=name), "cost_context"),
                (lambda: arm.connect(0, split="a/b", name=name), "a/b"),
                (lambda: arm.connect(0, name=name, producer_id="p\udce9"), "producer_id"),
            ]
            for call, named in bad_calls:
                with pytest.raises(arm.InvalidMetricError) as info:
                    call()
                assert named in str(info.value)
            b.add_metric("reward/ok", 1.0)
            b.add_cost("train/judge", 0.25)
            assert b.flush(timeout_s=60).ok
            b2 = arm.connect(0, name=name)
            b2.add_cost("train/judge", 0.5)
            assert b2.flush(timeout_s=60).ok
            row = handle.log(0)
            assert row["reward/ok"] == 1.0
            assert row["time/step_big_s"] == 6e299
            assert row["costs/train/huge"] == 6e299
            assert row["costs/train/judge"] == 0.75
            assert row["telemetry/rejected_batches"] == 0
        finally:
            handle.shutdown()

    def test_refused_batch_is_reported_once_then_good_batches_work(
        self, run_config: dict[str, Any]
    ) -> None:
        """A batch the actor refuses (a simulated bug) is reported by the next flush, counted
        on the row, and later flushes work without waiting for it."""
        handle = arm.start_aggregator(**run_config)
        name = run_config["name"]
        try:
            b = arm.connect(0, name=name)
            b.add_metric("reward/good_before", 1.0)
            client = get_client(b.client.config)
            with client._lock:  # bypass validation: what a bug or a version skew would send
                client._pending_now()[(0, "train")].leaves["reward/bad"] = float("inf")
            first = b.flush(timeout_s=60)
            assert not first.ok
            assert first.error is not None
            assert "reward/bad" in first.error
            started = time.monotonic()
            b2 = arm.connect(0, name=name)
            b2.add_metric("reward/good_after", 2.0)
            second = b2.flush(timeout_s=60)
            assert second.ok, second
            assert time.monotonic() - started < 30  # not a full flush timeout
            b3 = arm.connect(0, name=name)
            b3.add_metric("reward/good_later", 3.0)
            assert b3.flush(timeout_s=60).ok
            row = handle.log(0)
            assert row["reward/good_after"] == 2.0
            assert row["reward/good_later"] == 3.0
            assert "reward/bad" not in row
            assert row["telemetry/rejected_batches"] == 1
            assert client.counters["rejected"] == 1
        finally:
            handle.shutdown()
