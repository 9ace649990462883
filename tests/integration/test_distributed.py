"""The distributed path on a real multi-node Ray cluster: producers on several nodes, the
named actor, the barrier, exactly-once ingest under retries, resends and restarts."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle as cloudpickle

import art_ray_metrics as arm
from art_ray_metrics.core import keys as K
from art_ray_metrics.core.outcome import PER_NEW_UNIQUE_SCENARIO_KEY, PER_TRAINABLE_GROUP_KEY
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.testing import make_batch

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.ray


def _record(b: Any, step: int, i: int) -> None:
    """The leaves one rollout records (same calls for the in-process reference)."""
    b.add_cost("train/llm_judge/correctness", 0.0012 * (i + 1))
    b.add_cost("train/llm_judge/style", 0.0003)
    b.add_data(step_num_scenarios=1, step_actor_tokens=100 + i, scenario_ids=[f"s{(step + i) % 5}"])
    b.add_user_timing(step_actor_s=0.5 + i / 10)
    b.add_metric("reward/judge_score", 0.1 * i)
    if i % 2:
        b.for_cost_context("eval").add_cost("eval/llm_judge/correctness", 0.002)


@ray.remote(num_cpus=0)
def rollout(name: str, step: int, i: int) -> str:
    b = arm.connect(step, name=name)
    _record(b, step, i)
    assert b.flush(timeout_s=30).ok
    return ray.get_runtime_context().get_node_id()


def _no_telemetry(row: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in row.items() if not k.startswith(K.TELEMETRY_PREFIX)}


_OUTCOME_PREFIXES = ("costs/outcome/", "costs/cum/outcome/")


def _art_keys(row: dict[str, float], *, outcomes_on: bool) -> dict[str, float]:
    """The row without our own keys: telemetry, and the spend by outcome (MetricsBuilder,
    like ART, has neither). The outcome keys are on from the first row whose spend carried
    a group: ``_record``'s eval cost, recorded after ``add_data`` made the rollout's scenario
    id its group (its train costs come before, so they stay ungrouped)."""
    outcomes = {k for k in row if k.startswith(_OUTCOME_PREFIXES)}
    assert bool(outcomes) == outcomes_on, sorted(outcomes)
    if not outcomes:
        return _no_telemetry(row)
    # no fates given: every dollar is `unknown`, and the outcomes add up to the costs
    assert row["costs/outcome/unknown"] == pytest.approx(row["costs/all"], rel=1e-12)
    assert sum(row[k] for k in outcomes if k.startswith("costs/outcome/")) == pytest.approx(
        row["costs/all"], rel=1e-12
    )
    assert row["costs/cum/outcome/unknown"] == pytest.approx(row["costs/cum/all"], rel=1e-12)
    ours = outcomes | {PER_TRAINABLE_GROUP_KEY, PER_NEW_UNIQUE_SCENARIO_KEY}
    return {k: v for k, v in _no_telemetry(row).items() if k not in ours}


class TestRowsMatchInProcess:
    def test_multi_node_rows_equal_metrics_builder(self, run_config: dict[str, Any]) -> None:
        """Producers on three nodes give exactly the rows of one in-process MetricsBuilder."""
        handle = arm.start_aggregator(**run_config)
        reference = arm.MetricsBuilder("train")
        nodes = set()
        try:
            for step in range(3):
                refs = [
                    rollout.options(resources={res: 1}).remote(run_config["name"], step, i)
                    for i, res in enumerate(
                        ["head", "node_a", "node_b", "node_a", "node_b", "head"]
                    )
                ]
                nodes |= set(ray.get(refs))
                for i in range(6):
                    _record(reference, step, i)
                row = handle.log(step, metrics={"loss": 0.25})
                expected = asyncio.run(reference.flush())
                expected = {K.route_key(k, "train"): v for k, v in expected.items()}
                expected |= {"loss/train": 0.25, "training_step": float(step)}
                assert _art_keys(row, outcomes_on=step > 0) == expected
                assert row["telemetry/producers_in_row"] >= 3
                eval_row = handle.log(step, "val")
                eval_ref = asyncio.run(reference.for_cost_context("eval").flush())
                assert _art_keys(eval_row, outcomes_on=True) == {
                    **eval_ref,
                    "training_step": float(step),
                }
            assert len(nodes) == 3
            # the train row of step 2 comes before that step's eval spend is closed
            assert row["costs/cum/all"] == pytest.approx(3 * (0.0012 * 21 + 6 * 0.0003) + 2 * 0.006)
            assert eval_row["costs/cum/all"] == pytest.approx(
                3 * (0.0012 * 21 + 6 * 0.0003 + 0.006)
            )
            assert row["data/cum/num_unique_scenarios"] == 5.0
        finally:
            handle.shutdown()

    def test_async_log(self, run_config: dict[str, Any]) -> None:
        """alog works from an asyncio trainer."""
        handle = arm.start_aggregator(**run_config)
        try:
            ray.get(rollout.remote(run_config["name"], 0, 0))
            row = asyncio.run(handle.alog(0))
            assert row["costs/train/llm_judge/correctness"] == 0.0012
        finally:
            handle.shutdown()


class TestConfig:
    def test_same_config_reattaches_and_different_config_raises(
        self, run_config: dict[str, Any]
    ) -> None:
        """get-or-create: the same config attaches; another config is a clear error."""
        handle = arm.start_aggregator(**run_config)
        try:
            again = arm.start_aggregator(**run_config)
            assert again.actor._actor_id == handle.actor._actor_id
            with pytest.raises(arm.ConfigMismatchError, match="different configuration"):
                arm.start_aggregator(**{**run_config, "checkpoint_retention": 7})
        finally:
            handle.shutdown()

    def test_settings_reach_the_actor_and_its_restarts_without_a_runtime_env(
        self, run_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The driver's non-secret settings (here W&B's) are set in the actor's process, and
        again when Ray restarts it, with no Ray runtime env (that made Ray start the actor
        through a runtime-env worker: a start took 2.0 s instead of 1.3 s here)."""
        monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9/only-this-driver-has-it")

        def seen() -> tuple[str | None, str]:
            def read(_: Any) -> tuple[str | None, str]:
                env = ray.get_runtime_context().get_runtime_env_string()
                return os.environ.get("WANDB_BASE_URL"), env

            out: tuple[str | None, str] = ray.get(handle.actor.__ray_call__.remote(read))
            return out

        handle = arm.start_aggregator(**run_config)
        try:
            assert seen() == ("http://127.0.0.1:9/only-this-driver-has-it", "{}")
            first = handle.stats()["pid"]
            ray.kill(handle.actor, no_restart=False)
            deadline = time.monotonic() + 60
            while handle.stats()["pid"] == first:  # stats() retries while Ray restarts it
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert seen() == ("http://127.0.0.1:9/only-this-driver-has-it", "{}")
        finally:
            handle.shutdown()

    def test_an_actor_ray_cannot_place_is_a_clear_error_and_frees_its_name(
        self, run_config: dict[str, Any]
    ) -> None:
        """actor_resources no node has: start_aggregator raises within start_timeout_s, names
        the resource, and the name can be used again (it used to wait forever)."""
        started = time.monotonic()
        with pytest.raises(
            arm.AggregatorStartTimeoutError, match="no alive node has resource 'nope'"
        ):
            arm.start_aggregator(**run_config, actor_resources={"nope": 1.0}, start_timeout_s=2.0)
        assert time.monotonic() - started < 30
        handle = arm.start_aggregator(**run_config)  # the same name, placeable this time
        try:
            assert handle.log(0, metrics={"loss/x": 0.5})["loss/x"] == 0.5
        finally:
            handle.shutdown()
        with pytest.raises(arm.ConfigError, match="start_timeout_s"):
            arm.start_aggregator(**run_config, start_timeout_s=0)


@ray.remote(max_retries=3, num_cpus=0)
def flaky_rollout(name: str, marker: str) -> int:
    first = not os.path.exists(marker)
    b = arm.connect(0, name=name)
    b.add_cost("train/rollout_llm", 0.5)  # spend that really happens again on a retry
    b._add_cost_leaf(
        "train/judge", arm_decimal("0.25"), response_id="resp-fixed"
    )  # one paid response
    b.add_data(scenario_ids=["sc-1", "sc-2"])
    assert b.flush(timeout_s=30).ok
    if first:
        Path(marker).write_text("died")
        os._exit(1)  # the worker process dies mid-task; Ray re-executes the task
    return 2


def arm_decimal(text: str) -> Any:
    from decimal import Decimal

    return Decimal(text)


class TestRetriesAndResends:
    def test_task_killed_and_retried(self, run_config: dict[str, Any], tmp_path: Path) -> None:
        """A re-executed rollout counts its real spend again but not its response or scenarios."""
        handle = arm.start_aggregator(**run_config)
        try:
            assert ray.get(flaky_rollout.remote(run_config["name"], str(tmp_path / "m"))) == 2
            row = handle.log(0)
            assert row["costs/train/rollout_llm"] == 1.0  # two real executions
            assert row["costs/train/judge"] == 0.25  # the same paid response, once
            assert row["data/cum/num_unique_scenarios"] == 2.0
            assert row["telemetry/duplicate_costs"] == 1.0
        finally:
            handle.shutdown()

    def test_duplicate_resend_is_acknowledged_once(self, run_config: dict[str, Any]) -> None:
        """The same (producer_id, seq) sent twice through the raw actor API counts once."""
        handle = arm.start_aggregator(**run_config)
        try:
            actor = ray.get_actor(run_config["name"], namespace="art_ray_metrics")
            data = encode_batch(make_batch("raw", 1, 0, "train", {"costs/train/x": 0.75}))
            first, second = ray.get([actor.ingest.remote(data), actor.ingest.remote(data)])
            assert sorted([first.duplicate, second.duplicate]) == [False, True]
            row = handle.log(0)
            assert row["costs/all"] == 0.75
            assert handle.stats()["counters"]["duplicate_batches"] == 1
        finally:
            handle.shutdown()

    def test_bad_input_rejected_and_actor_keeps_serving(self, run_config: dict[str, Any]) -> None:
        """Truncated bytes, a wrong version and bad values raise WireFormatError to the sender."""
        handle = arm.start_aggregator(**run_config)
        try:
            good = encode_batch(make_batch("raw", 1, 0, "train", {"costs/train/x": 1.0}))
            bad_value = good.replace(b"1.0", b"NaN")
            bad = [good[:-4], b"\x95\xa9arm-batch\x09\xa1p\x01\x90", bad_value, b"\xc1"]
            for data in bad:
                with pytest.raises(arm.WireFormatError):
                    ray.get(handle.actor.ingest.remote(data))
            # a refused batch moves its producer's window past its seq: a new seq is applied
            good2 = encode_batch(make_batch("raw", 2, 0, "train", {"costs/train/x": 1.0}))
            assert ray.get(handle.actor.ingest.remote(good)).duplicate is True
            assert ray.get(handle.actor.ingest.remote(good2)).duplicate is False
            row = handle.log(0)
            assert row["costs/all"] == 1.0
            assert row["telemetry/rejected_batches"] == 4.0
        finally:
            handle.shutdown()

    @pytest.mark.slow
    def test_actor_killed_between_batches(self, run_config: dict[str, Any]) -> None:
        """ray.kill(no_restart=False) mid-stream: batches are resent and applied exactly once."""
        handle = arm.start_aggregator(**run_config)
        client = arm.get_client(arm.ClientConfig(name=run_config["name"], flush_interval_s=0.05))
        try:
            b = arm.connect(0, name=run_config["name"])
            for i in range(40):
                b.add_cost("train/x", 0.01)
                b.add_data(scenario_ids=[f"id-{i}"])
                client.ship()
                if i == 20:
                    ray.kill(handle.actor, no_restart=False)
                time.sleep(0.01)
            result = b.flush(timeout_s=60)
            assert result.ok, result
            row = handle.log(0)
            assert row["costs/train/x"] == 0.4
            assert row["data/cum/num_unique_scenarios"] == 40.0
            stats = client.stats()
            assert stats["send_failures"] + stats["resends"] > 0
            assert (
                handle.stats()["health"]["replayed_batches"] + row["telemetry/duplicate_batches"]
                > 0
            )
        finally:
            handle.shutdown()


@ray.remote(num_cpus=0)
class Producer:
    def __init__(self, name: str) -> None:
        self.name = name

    def record(self, step: int, usd: float) -> str:
        b = arm.connect(step, name=self.name)
        b.add_cost("train/remote", usd)
        assert b.flush(timeout_s=30).ok
        return ray.get_runtime_context().get_node_id()


class TestBarrier:
    def test_waits_for_expected_producers(self, run_config: dict[str, Any]) -> None:
        """The barrier waits for a set of producer ids before closing the step."""

        @ray.remote(num_cpus=0)
        def late_producer(name: str, pid: str, delay: float) -> None:
            time.sleep(delay)
            client = arm.get_client(arm.ClientConfig(name=name), producer_id=pid)
            b = arm.WorkerBuilder(client, 3, "train", "train")
            b.add_cost("train/x", 1.0)
            b.flush(timeout_s=30)

        handle = arm.start_aggregator(**run_config)
        try:
            late_producer.options(resources={"node_a": 1}).remote(run_config["name"], "pa", 1.0)
            late_producer.options(resources={"node_b": 1}).remote(run_config["name"], "pb", 1.5)
            row = handle.log(3, expect_producers=["pa", "pb"], timeout_s=60)
            assert row["costs/train/x"] == 2.0
            started = time.monotonic()
            handle.log(4, expect_producers=1, timeout_s=0.5)
            assert time.monotonic() - started >= 0.5
            assert handle.stats()["health"]["barrier_timeouts"] == 1
        finally:
            handle.shutdown()

    def test_cross_producer_conflict_is_reported(self, run_config: dict[str, Any]) -> None:
        """costs/train from one producer and costs/train/x from another: counted, every dollar kept."""
        handle = arm.start_aggregator(**run_config)
        try:
            actor = handle.actor
            ray.get(
                actor.ingest.remote(
                    encode_batch(make_batch("a", 1, 0, "train", {"costs/train": 1.0}))
                )
            )
            ray.get(
                actor.ingest.remote(
                    encode_batch(make_batch("b", 1, 0, "train", {"costs/train/x": 0.5}))
                )
            )
            row = handle.log(0)
            assert row["costs/train"] == 1.5
            assert row["costs/train/unattributed"] == 1.0
            assert row["telemetry/conflicts_in_row"] == 1.0
            assert handle.stats()["conflicts_by_key"] == {"costs/train": 1}
        finally:
            handle.shutdown()


class TestNodeLoss:
    @pytest.mark.slow
    def test_worker_node_removed(self, ray_cluster: Any, run_config: dict[str, Any]) -> None:
        """A producer whose node is removed: what it flushed before is in the row."""
        node = ray_cluster.add_node(
            node_ip_address="127.0.0.1", num_cpus=1, resources={"doomed": 1}
        )
        ray_cluster.wait_for_nodes()
        handle = arm.start_aggregator(**run_config)
        try:
            producer = Producer.options(resources={"doomed": 1}).remote(run_config["name"])
            ray.get(producer.record.remote(0, 0.5))
            ray_cluster.remove_node(node)
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(producer.record.remote(0, 0.25), timeout=60)
            row = handle.log(0)
            assert row["costs/train/remote"] == 0.5
        finally:
            handle.shutdown()
