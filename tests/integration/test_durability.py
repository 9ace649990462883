"""Durability on real parts: a real Ray cluster, a real S3 server (moto over HTTP on 127.0.0.1),
real W&B offline runs. The aggregator actor is killed, its node removed, the whole cluster
restarted, the storage taken down, a second aggregator started on the same storage; totals,
unique counts, the JSONL history and W&B must come out as in a run without faults."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle as cloudpickle

import art_ray_metrics as arm
from art_ray_metrics.core import keys as K
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.storage import open_store
from art_ray_metrics.export.wandb_offline import (
    find_offline_run_files,
    read_offline_history,
    wait_for_exit_record,
)
from art_ray_metrics.testing import InProcessAggregator, make_batch

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = [
    pytest.mark.ray,
    # wandb's service threads and the protobuf runtime warn on interpreter-level details
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

PRICES = {"prompt_price_per_million": 0.15, "completion_price_per_million": 0.6}


def _completion(response_id: str, prompt: int, completion: int) -> Any:
    from openai.types.chat import ChatCompletion

    return ChatCompletion.model_validate(
        {
            "id": response_id,
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4o-mini",
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )


def record_rollout(b: Any, step: int, i: int, attempt: str = "") -> None:
    """The leaves one rollout records: plain costs, a priced response with an id, data.

    ``attempt`` tags the response ids: a re-executed rollout makes new API calls.
    """
    b.add_cost("train/rollout_llm", 0.001 * (i + 1) + 0.0001 * step)
    b.add_response_cost(
        "llm_judge",
        _completion(f"chatcmpl-{attempt}{step}-{i}", 1000 + 10 * i, 100 + step),
        provider="openai",
        model_name="gpt-4o-mini",
        **PRICES,
    )
    # the same paid response reported twice (a retried judge call): charged once
    b.add_response_cost(
        "llm_judge",
        _completion(f"chatcmpl-{attempt}{step}-{i}", 1000 + 10 * i, 100 + step),
        provider="openai",
        model_name="gpt-4o-mini",
        **PRICES,
    )
    b.add_data(
        step_num_scenarios=2,
        step_actor_tokens=100 + i + step,
        scenario_ids=[f"sc-{(3 * step + i) % 41}", f"sc-{(7 * step + 2 * i) % 53}"],
    )
    b.add_user_timing(step_actor_s=0.25 + i / 8)
    b.add_metric("reward/score", 0.1 * i + step / 100)


@ray.remote(num_cpus=0, max_retries=0)
def rollout(name: str, step: int, i: int, attempt: str = "") -> bool:
    """One producer task: record, flush (durable), return whether the flush was confirmed."""
    b = arm.connect(step, name=name)
    record_rollout(b, step, i, attempt)
    return bool(b.flush(timeout_s=90).ok)


def run_step(
    handle: Any, name: str, step: int, producers: int = 4, attempt: str = ""
) -> dict[str, float]:
    """Four producers for ``step``, then the barrier."""
    assert all(ray.get([rollout.remote(name, step, i, attempt) for i in range(producers)]))
    if step == 6:  # one paid response sent through the raw actor API (no producer-side dedupe)
        batch = make_batch(
            f"raw-{attempt}", 1, 6, keyed_costs=[("costs/train/judge_raw", 0.5, "resp-raw-6")]
        )
        ingest_raw(handle, encode_batch(batch))
    return dict(handle.log(step, metrics={"loss": 0.5 - step / 100}))


def ingest_raw(handle: Any, payload: bytes) -> None:
    """Send one batch through the raw actor API, as a producer without a client would.

    The actor runs with ``max_task_retries=0`` and this test kills it at random, so a call can
    fail with "the task may or may not have been executed": resend the same batch until a reply
    comes. The reply says ``duplicate`` only if an earlier attempt had reached the actor, and
    the totals compared with the fault-free run show it was counted once either way.
    """
    failed = 0
    while True:
        try:
            reply = ray.get(handle.actor.ingest.remote(payload, True), timeout=120)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            failed += 1
            assert failed <= 30, "the actor did not come back"
            time.sleep(0.2 * failed)
            continue
        assert failed or not reply.duplicate
        return


def reference_run(storage_uri: str, steps: int) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """The fault-free run of ``run_step``'s workload for steps ``0..steps-1``: its rows and
    final ``stats()``, its history in ``storage_uri``.

    In this process, through :class:`~art_ray_metrics.testing.InProcessAggregator` (the actor
    class over real storage): a reference the faulty Ray runs are compared with needs no Ray,
    and on the shared cluster it cost 20-70 s per test (Ray tasks, worker start-up).
    """
    with InProcessAggregator(storage_uri=storage_uri, wandb_mode="disabled") as agg:
        rows = []
        for step in range(steps):
            for i in range(4):
                b = agg.connect(step)
                record_rollout(b, step, i)
                assert b.flush(timeout_s=90).ok
            if step == 6:  # as run_step: the paid response sent through the raw actor API
                batch = make_batch(
                    "raw-", 1, 6, keyed_costs=[("costs/train/judge_raw", 0.5, "resp-raw-6")]
                )
                instance = agg.lookup()
                assert instance is not None
                assert not instance.submit("ingest", encode_batch(batch), True).result()[
                    "duplicate"
                ]
            rows.append(dict(agg.log(step, metrics={"loss": 0.5 - step / 100})))
        stats = agg.stats()
    return rows, stats


def no_telemetry(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in row.items() if not k.startswith(K.TELEMETRY_PREFIX) and k != "recorded_at"
    }


def history_rows(uri: str) -> list[dict[str, Any]]:
    return list(HistoryStore(open_store(uri)).read())


def kill_and_wait(handle: Any) -> dict[str, Any]:
    """Kill the actor (Ray restarts it) and return the stats of the new instance."""
    pid = handle.stats()["pid"]
    ray.kill(handle.actor, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        stats: dict[str, Any] = handle.stats()
        if stats["pid"] != pid:
            return stats
        assert time.monotonic() < deadline
        time.sleep(0.1)


def cum_of(stats: dict[str, Any]) -> dict[str, float]:
    return dict(stats["cum"])


def wandb_rows(wandb_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row of every offline file of the run (one file per attach)."""
    files = find_offline_run_files(wandb_dir, run_id)
    assert files, f"no offline run files for {run_id} under {wandb_dir}"
    assert wait_for_exit_record(files[-1], timeout_s=30)
    rows: list[dict[str, Any]] = []
    for file in files:
        rows.extend(read_offline_history(file))
    return rows


# --------------------------------------------------------------------------------------------
# S3 end to end
# --------------------------------------------------------------------------------------------


class TestS3EndToEnd:
    @pytest.mark.slow
    def test_rows_history_and_restore_over_s3(
        self, run_config: dict[str, Any], owned_s3: Any
    ) -> None:
        """The actor reaches the S3 server through the forwarded AWS env; a new actor restores."""
        uri = owned_s3.bucket() + "/runs/e2e"
        cfg = {**run_config, "storage_uri": uri}
        handle = arm.start_aggregator(**cfg)
        try:
            rows = [run_step(handle, cfg["name"], step) for step in range(3)]
            stats = handle.stats()
            assert stats["storage_uri"] == uri
            assert stats["health"]["checkpoints"] >= 3
            assert stats["health"]["checkpoint_failures"] == 0
        finally:
            handle.shutdown()
        store = open_store(uri)
        assert "CHECKPOINT" in store.list("")
        history = history_rows(uri)
        assert [(r["step"], r["split"]) for r in history] == [(s, "train") for s in range(3)]
        for got, row in zip(history, rows, strict=True):
            assert no_telemetry(got) | {"step": 0, "split": ""} == no_telemetry(row) | {
                "step": 0,
                "split": "",
            }
        again = arm.start_aggregator(**{**cfg, "name": cfg["name"] + "-2"})
        try:
            assert cum_of(again.stats()) == cum_of(stats)
            row = run_step(again, cfg["name"] + "-2", 3)
            assert row["costs/cum/all"] > rows[-1]["costs/cum/all"]
        finally:
            again.shutdown()


# --------------------------------------------------------------------------------------------
# An acknowledged flush is durable
# --------------------------------------------------------------------------------------------


class TestAcknowledgedFlush:
    @pytest.mark.slow
    def test_flushed_leaves_survive_a_kill_before_any_checkpoint(
        self, run_config: dict[str, Any]
    ) -> None:
        """Producer flushes and returns; the actor dies before any checkpoint; leaves are there."""
        cfg = {**run_config, "checkpoint_interval_s": 3600.0, "wal_interval_s": 3600.0}
        handle = arm.start_aggregator(**cfg)
        try:
            assert all(ray.get([rollout.remote(cfg["name"], 0, i) for i in range(4)]))
            before = handle.stats()
            assert before["health"]["checkpoints"] == 0
            assert before["health"]["wal_writes"] >= 1
            stats = kill_and_wait(handle)
            row = handle.log(0)
            assert stats["health"]["replayed_batches"] >= 1
        finally:
            handle.shutdown()
        reference = arm.MetricsBuilder("train")
        for i in range(4):
            record_rollout(reference, 0, i)
        import asyncio

        expected = asyncio.run(reference.flush())
        for key in ("costs/all", "costs/train/llm_judge", "data/cum/num_unique_scenarios"):
            assert row[key] == pytest.approx(expected[key], rel=1e-12)

    def test_flush_latency(self, run_config: dict[str, Any], owned_s3: Any) -> None:
        """Median explicit-flush latency to local storage and to the S3 server (printed)."""

        @ray.remote(num_cpus=0)
        def flushes(name: str, n: int) -> list[float]:
            b = arm.connect(0, name=name)
            out = []
            for i in range(n):
                b.add_cost("train/x", 0.001)
                b.add_data(scenario_ids=[f"lat-{i}"])
                started = time.perf_counter()
                assert b.flush(timeout_s=30).ok
                out.append(time.perf_counter() - started)
            return out

        results = {}
        for label, uri in (
            ("local", run_config["storage_uri"]),
            ("s3", owned_s3.bucket() + "/lat"),
        ):
            cfg = {**run_config, "name": f"{run_config['name']}-{label}", "storage_uri": uri}
            handle = arm.start_aggregator(**cfg)
            try:
                ray.get(flushes.remote(cfg["name"], 3))  # warm-up: lookup, first WAL object
                latencies = ray.get(flushes.remote(cfg["name"], 50))
                row = handle.log(0)
                assert row["costs/train/x"] == pytest.approx(0.053)
                assert row["data/cum/num_unique_scenarios"] == 50.0
            finally:
                handle.shutdown()
            results[label] = statistics.median(latencies)
        print(
            "\nexplicit flush latency (median of 50): "
            + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in results.items())
        )
        Path(os.environ.get("ARM_FLUSH_LATENCY_OUT", os.devnull)).write_text(json.dumps(results))


# --------------------------------------------------------------------------------------------
# Split brain
# --------------------------------------------------------------------------------------------


class TestSplitBrain:
    def test_older_epoch_is_fenced(self, run_config: dict[str, Any]) -> None:
        """Two aggregators on one URI: the older stops writing, the newer keeps its state."""
        old = arm.start_aggregator(**run_config)
        new_cfg = {**run_config, "name": run_config["name"] + "-b"}
        new = None
        try:
            run_step(old, run_config["name"], 0)
            new = arm.start_aggregator(**new_cfg)
            assert new.stats()["epoch"] > old.stats()["epoch"]
            run_step(new, new_cfg["name"], 1)
            # the old one keeps serving but must not write: its barrier of step 7 is not stored
            old.log(7, metrics={"costs/train/zombie": 100.0})
            stats = old.stats()
            assert "newer writer" in str(stats["fenced"])
            checkpoints = stats["health"]["checkpoints"]
            old.log(8, metrics={"costs/train/zombie": 100.0})
            assert old.stats()["health"]["checkpoints"] == checkpoints
            new_cum = cum_of(new.stats())
        finally:
            old.shutdown()
            if new is not None:
                new.shutdown()
        steps = [r["step"] for r in history_rows(run_config["storage_uri"])]
        assert steps == [0, 1]
        third = arm.start_aggregator(**{**run_config, "name": run_config["name"] + "-c"})
        try:
            assert cum_of(third.stats()) == new_cum
            assert "costs/cum/train/zombie" not in new_cum
        finally:
            third.shutdown()


# --------------------------------------------------------------------------------------------
# Storage outage
# --------------------------------------------------------------------------------------------


class TestStorageOutage:
    @pytest.mark.slow
    def test_barriers_continue_and_everything_is_durable_after_recovery(
        self, run_config: dict[str, Any], owned_s3: Any
    ) -> None:
        """S3 down for a few seconds: rows keep coming, checkpoints retry, state is durable."""
        uri = owned_s3.bucket() + "/outage"
        cfg = {
            **run_config,
            "storage_uri": uri,
            "storage_timeout_s": 1.0,
            "checkpoint_interval_s": 0.5,
        }
        handle = arm.start_aggregator(**cfg)
        rows = []
        try:
            rows += [run_step(handle, cfg["name"], step) for step in range(2)]
            owned_s3.stop()
            # a producer that flushes during the outage: its flush returns once durable
            pending = rollout.remote(cfg["name"], 2, 0)
            latencies = []
            for step in (2, 3, 4):
                started = time.monotonic()
                row = handle.log(step, metrics={"costs/train/trainer": 0.25})
                latencies.append(time.monotonic() - started)
                rows.append(dict(row))
            assert all(r["costs/train/trainer"] == 0.25 for r in rows[2:])
            assert max(latencies) < 15.0, latencies
            health = handle.stats()["health"]
            assert health["checkpoint_failures"] >= 1
            assert health["last_storage_error"]
            owned_s3.start()
            assert ray.get(pending, timeout=60)
            rows.append(run_step(handle, cfg["name"], 5))
            deadline = time.monotonic() + 30
            while handle.stats()["gauges"]["telemetry/wal_queue"] or len(history_rows(uri)) < 6:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            final = handle.stats()
        finally:
            owned_s3.start()
            handle.shutdown()
        assert [r["step"] for r in history_rows(uri)] == list(range(6))
        fresh = arm.start_aggregator(**{**cfg, "name": cfg["name"] + "-fresh"})
        try:
            restored = fresh.stats()
            assert cum_of(restored) == cum_of(final)
            assert restored["unique_scenarios"] == final["unique_scenarios"]
        finally:
            fresh.shutdown()


# --------------------------------------------------------------------------------------------
# Actor killed at random moments
# --------------------------------------------------------------------------------------------


def _run(
    cfg: dict[str, Any], steps: int, kills: int, seed: int
) -> tuple[list[dict[str, float]], dict[str, Any], int]:
    handle = arm.start_aggregator(**cfg)
    rng = random.Random(seed)
    done = 0
    timers: list[threading.Timer] = []
    rows = []
    try:
        for step in range(steps):
            if done < kills and rng.random() < 0.3:
                done += 1
                timer = threading.Timer(
                    rng.uniform(0.0, 0.4), ray.kill, (handle.actor,), {"no_restart": False}
                )
                timer.start()
                timers.append(timer)
            rows.append(run_step(handle, cfg["name"], step))
        for timer in timers:
            timer.join()
        stats = handle.stats()
    finally:
        handle.shutdown()
    return rows, stats, done


class TestActorKilled:
    @pytest.mark.slow
    def test_random_kills_match_the_fault_free_run(
        self, run_config: dict[str, Any], tmp_path: Path, wandb_dir: Path
    ) -> None:
        """15 steps, 4 producers, the actor killed at random: same totals, history and W&B.

        Seed 1234 kills at steps 2, 6, 7, 12 and 13 (all five kills): the 30 steps this ran
        before made the same kills and then 15 fault-free steps (half its 30 s)."""
        steps = 15
        ref_uri = str(tmp_path / "ref")
        ref_rows, ref_stats = reference_run(ref_uri, steps)
        cfg = {**run_config, "wandb_mode": "offline", "wandb_dir": str(wandb_dir)}
        rows, stats, kills = _run(cfg, steps, kills=5, seed=1234)
        assert kills >= 3
        assert stats["gauges"]["telemetry/restarts"] >= 2
        assert cum_of(stats) == cum_of(ref_stats)
        assert stats["unique_scenarios"] == ref_stats["unique_scenarios"]
        assert [no_telemetry(r) for r in rows] == [no_telemetry(r) for r in ref_rows]
        history = history_rows(cfg["storage_uri"])
        assert [(r["step"], r["split"]) for r in history] == [(s, "train") for s in range(steps)]
        ref_history = history_rows(ref_uri)
        assert [no_telemetry(r) for r in history] == [no_telemetry(r) for r in ref_history]
        # W&B: every committed row at least once (a resumed offline run has several files)
        logged = wandb_rows(wandb_dir, stats["wandb_run_id"])
        by_step: dict[int, list[dict[str, Any]]] = {}
        for entry in logged:
            by_step.setdefault(int(entry["training_step"]), []).append(entry)
        assert sorted(by_step) == list(range(steps))
        for record in history:
            expected = {k: v for k, v in no_telemetry(record).items() if k not in ("step", "split")}
            assert any(
                {k: e.get(k) for k in expected} == expected for e in by_step[record["step"]]
            ), record["step"]


# --------------------------------------------------------------------------------------------
# Node loss
# --------------------------------------------------------------------------------------------


class TestNodeLoss:
    @pytest.mark.slow
    def test_actor_node_removed(self, ray_cluster: Any, run_config: dict[str, Any]) -> None:
        """The node hosting the actor is removed; it restarts on the other node with its state."""
        nodes = [
            ray_cluster.add_node(node_ip_address="127.0.0.1", num_cpus=0, resources={"agg": 1})
            for _ in range(2)
        ]
        ray_cluster.wait_for_nodes()
        cfg = {**run_config, "actor_resources": {"agg": 1.0}}
        handle = arm.start_aggregator(**cfg)
        removed: list[Any] = []
        try:
            rows = [run_step(handle, cfg["name"], step) for step in range(2)]
            first = handle.stats()
            host = next(n for n in nodes if n.node_id == first["node_id"])
            ray_cluster.remove_node(host)
            removed.append(host)
            rows.append(run_step(handle, cfg["name"], 2))
            after = handle.stats()
            assert after["node_id"] != first["node_id"]
            assert after["node_id"] in {n.node_id for n in nodes}
            assert after["health"]["replayed_batches"] + after["counters"]["rows"] >= 1
            assert rows[2]["costs/cum/all"] > rows[1]["costs/cum/all"]
            assert rows[2]["costs/cum/all"] == pytest.approx(
                rows[1]["costs/cum/all"] + rows[2]["costs/all"], rel=1e-12
            )
            assert rows[2]["data/cum/actor_tokens"] == pytest.approx(
                sum(r["data/step_actor_tokens"] for r in rows)
            )
        finally:
            handle.shutdown()
            for node in nodes:
                if node not in removed:
                    ray_cluster.remove_node(node)


# --------------------------------------------------------------------------------------------
# A trainer that resumes from an older step
# --------------------------------------------------------------------------------------------


@ray.remote(num_cpus=0, max_retries=0)
def plain_rollout(name: str, step: int, i: int) -> bool:
    """Leaves without response ids (ingest never consults the paid-response ledger)."""
    b = arm.connect(step, name=name)
    b.add_cost("train/rollout_llm", 0.001 * (i + 1) + 0.0001 * step)
    b.add_data(step_actor_tokens=10 + i, scenario_ids=[f"sc-{(3 * step + i) % 7}"])
    return bool(b.flush(timeout_s=60).ok)


def plain_step(handle: Any, name: str, step: int) -> dict[str, float]:
    assert all(ray.get([plain_rollout.remote(name, step, i) for i in range(2)]))
    return dict(handle.log(step))


class TestResumeFromOlderStep:
    def test_net_shards_and_without(self) -> None:
        """Tombstones cancel adds one for one; an id re-added after removal is present."""
        from art_ray_metrics.core.rewind import net_shards as _net_shards

        def _without(ledger: Any, removed: bytes) -> Any:
            return ledger.without(removed)

        from art_ray_metrics.core.dedupe import DigestLedger, digest

        a, b, c = digest("a"), digest("b"), digest("c")
        net = _net_shards({"scenarios": a + b + c + a, "scenarios_rewound": a + b, "cost_ids": c})
        assert sorted(
            DigestLedger.from_bytes(net["scenarios"]).to_bytes()[i : i + 16] for i in (0, 16)
        ) == sorted([a, c])
        assert net["cost_ids"] == c
        ledger = DigestLedger.from_bytes(a + b + c)
        smaller = _without(ledger, b)
        assert len(smaller) == 2
        assert b not in smaller

    @pytest.mark.slow
    def test_explicit_rewind_matches_a_run_that_never_failed(
        self, run_config: dict[str, Any], tmp_path: Path
    ) -> None:
        """Steps 0..7, resume from 4, re-run 5..9: rows, totals, ids and history as without it."""
        ref_uri = str(tmp_path / "ref")
        ref_rows, ref_stats = reference_run(ref_uri, 10)
        handle = arm.start_aggregator(**run_config)
        try:
            for s in range(8):
                run_step(handle, run_config["name"], s)
            # a rollout of the lost timeline, sent but never closed
            assert ray.get(rollout.remote(run_config["name"], 8, 0))
            out = handle.rewind(4)
            assert (out["discarded_steps"], out["discarded_buffers"]) == (3, 1)
            rows = [run_step(handle, run_config["name"], s, attempt="r") for s in range(5, 10)]
            stats = handle.stats()
            assert stats["rewound"]["steps"] == 3
            assert float(stats["rewound"]["costs_usd"]) > 0
            restarted = kill_and_wait(handle)  # restore after a rewind: tombstones
        finally:
            handle.shutdown()
        assert [no_telemetry(r) for r in rows] == [no_telemetry(r) for r in ref_rows[5:]]
        for got in (stats, restarted):
            assert cum_of(got) == cum_of(ref_stats)
            assert got["unique_scenarios"] == ref_stats["unique_scenarios"]
        history = history_rows(run_config["storage_uri"])
        assert [no_telemetry(r) for r in history] == [
            no_telemetry(r) for r in history_rows(ref_uri)
        ]
        fresh = arm.start_aggregator(**{**run_config, "name": run_config["name"] + "-fresh"})
        try:
            again = fresh.stats()
            assert cum_of(again) == cum_of(ref_stats)
            assert again["unique_scenarios"] == ref_stats["unique_scenarios"]
        finally:
            fresh.shutdown()

    def test_implicit_rewind_on_an_older_barrier(self, run_config: dict[str, Any]) -> None:
        """Closing a step below the last closed one rewinds to the step before it first."""
        handle = arm.start_aggregator(**run_config)
        try:
            first = [plain_step(handle, run_config["name"], s) for s in range(6)]
            again = [plain_step(handle, run_config["name"], s) for s in range(3, 6)]
            stats = handle.stats()
        finally:
            handle.shutdown()
        assert [no_telemetry(r) for r in again] == [no_telemetry(r) for r in first[3:]]
        assert (stats["rewound"]["rewinds"], stats["rewound"]["steps"]) == (1, 3)
        # steps 3..5 of the first timeline: 2 producers x (0.001 (i + 1) + 0.0001 step)
        assert float(stats["rewound"]["costs_usd"]) == pytest.approx(0.0114)
        assert stats["cum"]["costs/cum/all"] == first[-1]["costs/cum/all"]

    def test_rewind_beyond_the_window_is_refused(self, run_config: dict[str, Any]) -> None:
        """Only the last rewind_window closes are restorable; older targets raise or go late."""
        handle = arm.start_aggregator(**{**run_config, "rewind_window": 2})
        try:
            rows = [plain_step(handle, run_config["name"], s) for s in range(5)]
            with pytest.raises(arm.InvalidMetricError, match="oldest step still restorable"):
                handle.rewind(1)  # the window holds the closes of steps 3 and 4
            assert handle.rewind(3)["discarded_steps"] == 1
            row = plain_step(handle, run_config["name"], 1)  # implicit, too old: late leaves
            stats = handle.stats()
            assert stats["health"]["rewind_refused"] == 1
            assert row["costs/cum/all"] == pytest.approx(
                rows[3]["costs/cum/all"] + row["costs/all"], rel=1e-12
            )
            assert row["telemetry/late_leaves_in_row"] > 0
        finally:
            handle.shutdown()


# --------------------------------------------------------------------------------------------
# Full cluster restart (its own `ray start` cluster; the driver runs in a subprocess)
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import json, sys, time
sys.path.insert(0, {root!r})
import ray
import art_ray_metrics as arm
from tests.integration.test_durability import run_step

ray.init(address={address!r}, namespace="restart-test", log_to_driver=False)
deadline = time.monotonic() + 90  # both nodes alive (the worker joins while this starts)
while sum(n["Alive"] for n in ray.nodes()) < 2:
    assert time.monotonic() < deadline, ray.nodes()
    time.sleep(0.2)
handle = arm.start_aggregator(**{config!r})
rows = [run_step(handle, {name!r}, step) for step in range({start}, {stop})]
stats = handle.stats()
if {finish}:
    handle.shutdown()
print("RESULT " + json.dumps({{"rows": rows, "stats": stats}}))
"""


#: the ray CLI of this interpreter's environment (a venv's python run without activating it
#: has no ``ray`` on PATH)
_RAY_CLI = (
    str(Path(sys.executable).with_name("ray"))
    if Path(sys.executable).with_name("ray").exists()
    else "ray"
)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RayStartCluster:
    """A head and one worker started with ``ray start --block`` in their own process groups."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        # a W&B run made in this test process earlier (the ART adapter's tests run plain ART
        # here) leaves WANDB_SERVICE pointing at this process's W&B service: inherited by the
        # new cluster, the aggregator's wandb.init would wait on that service forever
        self.env.pop("WANDB_SERVICE", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    def _log(self, index: int) -> Path:
        """Where ``ray start`` number ``index`` writes (next to the temp dir: kept after it)."""
        return self.temp_dir.parent / f"{self.temp_dir.name}-ray-start-{index}.log"

    def _start(self, args: list[str]) -> None:
        common = [
            "--node-ip-address=127.0.0.1",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]
        log = open(self._log(len(self.procs)), "wb")  # noqa: SIM115
        # `ray start --address` refuses to join with 0, and a head started with 0 listens on
        # loopback only; every node IP is given explicitly, so 1 changes nothing else here.
        env = {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        self.procs.append(
            subprocess.Popen(
                [_RAY_CLI, "start", *args, *common],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def start(self) -> None:
        """The head, then the worker once the head is up. That the worker joined is waited for
        by the driver (:meth:`drive`), which connects anyway: a probe process per poll
        (``import ray``, ``ray.init``) cost seconds each on the loaded 2-core machine."""
        self._start(
            [
                "--head",
                f"--port={self.port}",
                "--num-cpus=1",
                "--include-dashboard=false",
                f"--ray-client-server-port={_free_port()}",
            ]
        )
        self._wait_head()
        # With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (needed to join) `ray start` rewrites a
        # 127.0.0.1 address to the host's interface IP; 127.0.0.2 is loopback too and is kept.
        worker = [f"--address=127.0.0.2:{self.port}", "--num-cpus=2"]
        self._start(worker)
        self._watchdog = threading.Thread(target=self._keep_worker, args=(worker,), daemon=True)
        self._watchdog.start()

    def _keep_worker(self, args: list[str]) -> None:
        """Start the worker node again if its ``ray start`` exits (twice at most). Ray gives a
        node a fixed 30 s to register with the GCS (``ray/_private/node.py``); on a loaded
        machine a worker can miss that and exit, which is Ray's start-up, not what is tested."""
        for _ in range(2):
            proc = self.procs[-1]
            while proc.poll() is None and not self._stopping.wait(0.5):
                pass
            if self._stopping.is_set():
                return
            self._start(args)

    def _wait_head(self) -> None:
        """Until ``ray start --head`` says its runtime started (within 120 s). A worker started
        earlier registers while the head is still busy and can time out doing so."""
        log = self._log(0)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise AssertionError(f"`ray start --head` exited: {log.read_text()[-2000:]}")
            if b"Ray runtime started" in log.read_bytes():
                return
            time.sleep(0.2)
        raise AssertionError(f"ray start cluster at {self.address}: the head did not start")

    def kill(self) -> None:
        """SIGKILL every process of both process groups (a crash, not a clean stop)."""
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        self.procs = []

    def drive(self, config: dict[str, Any], start: int, stop: int, finish: bool) -> Any:
        script = DRIVER.format(
            root=str(ROOT),
            address=self.address,
            config=config,
            name=config["name"],
            start=start,
            stop=stop,
            finish=finish,
        )
        out = subprocess.run(
            [sys.executable, "-c", script],
            env={**self.env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
            cwd=str(ROOT),
        )
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        assert out.returncode == 0, out.stderr[-3000:]
        assert lines, out.stdout[-3000:]
        return json.loads(lines[-1][len("RESULT ") :])


class TestFullClusterRestart:
    @pytest.mark.slow
    def test_new_cluster_continues_the_run(
        self, own_run_config: dict[str, Any], tmp_path: Path, wandb_dir: Path
    ) -> None:
        """Steps 0..4, cluster killed, a new cluster and driver continue 5..9 exactly (its own
        `ray start` clusters and drivers in subprocesses: no use of the shared one)."""
        import tempfile

        ref_uri = str(tmp_path / "ref")
        ref_rows, ref_stats = reference_run(ref_uri, 10)
        cfg = {
            **own_run_config,
            "wandb_mode": "offline",
            "wandb_dir": str(wandb_dir),
        }
        results = []
        for start, stop, finish in ((0, 5, False), (5, 10, True)):
            temp = Path(tempfile.mkdtemp(prefix="armray", dir="/tmp"))
            cluster = RayStartCluster(temp)
            try:
                cluster.start()
                results.append(cluster.drive(cfg, start, stop, finish))
            finally:
                cluster.kill()
                shutil.rmtree(temp, ignore_errors=True)
        first, second = results
        rows = first["rows"] + second["rows"]
        assert [no_telemetry(r) for r in rows] == [no_telemetry(r) for r in ref_rows]
        assert cum_of(second["stats"]) == cum_of(ref_stats)
        assert second["stats"]["unique_scenarios"] == ref_stats["unique_scenarios"]
        run_id = first["stats"]["wandb_run_id"]
        assert second["stats"]["wandb_run_id"] == run_id
        assert second["stats"]["epoch"] > first["stats"]["epoch"]
        history = history_rows(cfg["storage_uri"])
        assert [(r["step"], r["split"]) for r in history] == [(s, "train") for s in range(10)]
        logged = {int(r["training_step"]) for r in wandb_rows(wandb_dir, run_id)}
        assert logged == set(range(10))
