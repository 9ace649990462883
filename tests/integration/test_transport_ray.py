"""The client's Ray transport on a real cluster: producers outlive aggregators (issue 19,
defect 3), lookups never hold a call past its timeout (defect 4), and the client never starts
Ray behind the user's back (issue 21, item 1)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle as cloudpickle

import art_ray_metrics as arm
from art_ray_metrics.config import ClientConfig

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


@ray.remote(max_restarts=0, num_cpus=0, resources={"node_a": 1})
class LongLivedJudge:
    """A judge actor that lives across aggregators: it connects anew for every step."""

    def __init__(self, name: str) -> None:
        self.name = name

    def spend(self, step: int, usd: float, timeout_s: float) -> tuple[bool, str | None]:
        b = arm.connect(step, name=self.name, producer_id="judge-long")
        b.add_cost("train/llm_judge/correctness", usd)
        result = b.flush(timeout_s=timeout_s)
        return result.ok, result.error

    def stats(self) -> dict[str, Any]:
        return arm.connect(0, name=self.name, producer_id="judge-long").client.stats()


class TestProducersOutliveAggregators:
    @pytest.mark.parametrize("how", ["shutdown", "killed"])
    def test_worker_recovers_when_the_driver_starts_a_new_aggregator(
        self, run_config: dict[str, Any], how: str
    ) -> None:
        """Defect 3: a long-lived judge flushes; the driver replaces the aggregator on the same
        storage (``handle.shutdown()``, or the actor killed for good as when ``max_restarts`` is
        exhausted, then ``start_aggregator``); the judge's next flushes are ok, and the run is
        exact (each batch once)."""
        cfg = {**run_config, "max_restarts": 0, "wal_interval_s": 0.05}
        handle = arm.start_aggregator(**cfg)
        judge = LongLivedJudge.remote(run_config["name"])  # type: ignore[attr-defined]
        try:
            ok, error = ray.get(judge.spend.remote(0, 1.0, 30.0))
            assert ok, error
            assert handle.log(0)["costs/all"] == 1.0
            if how == "shutdown":
                handle.shutdown()
            else:
                ray.kill(handle.actor, no_restart=True)  # no final checkpoint: the WAL has it
            handle = arm.start_aggregator(**cfg)
            ok, error = ray.get(judge.spend.remote(1, 4.0, 20.0))
            assert ok, error
            ok, error = ray.get(judge.spend.remote(1, 0.5, 20.0))
            assert ok, error
            row = handle.log(1, expect_producers=["judge-long"], timeout_s=30)
            assert row["costs/all"] == 4.5
            assert row["costs/cum/all"] == 5.5
            assert ray.get(judge.stats.remote())["retained"] == 0
        finally:
            ray.kill(judge)
            handle.shutdown()


def _nobody(**fields: Any) -> ClientConfig:
    """A client of an aggregator that does not exist."""
    return ClientConfig(name=f"nobody-{uuid.uuid4().hex[:8]}", **fields)


class TestNoAggregator:
    """Defect 4: with no aggregator, lookups (here up to 5 s each, as ``lookup_timeout_s=5``
    made them before) never run inside a recording call, a flush or an event loop."""

    def test_recording_and_flush_keep_their_timeouts(self, ray_cluster: Any) -> None:
        config = _nobody(lookup_timeout_s=5.0, max_batch_leaves=1)
        b = arm.connect(0, config=config)
        started = time.monotonic()
        b.add_metric("reward/x", 1.0)  # the batch fills: it ships
        b.add_metric("reward/x", 1.0)
        recording = time.monotonic() - started
        started = time.monotonic()
        result = b.flush(timeout_s=0.5)
        flushing = time.monotonic() - started
        print(f"recording {recording:.3f} s, flush(timeout_s=0.5) {flushing:.3f} s")
        # bounds far under the 3.2 s the lookups inside these calls took, far over what a
        # loaded machine adds to a call that does not wait
        assert recording < 1.0
        assert not result.ok
        assert 0.45 <= flushing < 2.0
        assert "no aggregator actor" in (result.error or "")

    def test_aflush_keeps_its_timeout_and_never_blocks_the_loop(self, ray_cluster: Any) -> None:
        b = arm.connect(0, config=_nobody(lookup_timeout_s=5.0))
        b.add_metric("reward/x", 1.0)

        async def main() -> tuple[float, float, bool]:
            gaps = [0.0]

            async def ticker() -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            tick = asyncio.ensure_future(ticker())
            started = time.monotonic()
            result = await b.aflush(timeout_s=1.0)
            took = time.monotonic() - started
            tick.cancel()
            return took, max(gaps), result.ok

        took, worst_gap, ok = asyncio.run(main())
        print(f"aflush(timeout_s=1) {took:.3f} s, longest event-loop stall {worst_gap:.3f} s")
        assert not ok
        assert took < 2.5
        assert worst_gap < 1.0

    def test_failed_lookups_are_remembered(self, ray_cluster: Any) -> None:
        client = arm.get_client(_nobody(flush_interval_s=0.01))
        b = arm.WorkerBuilder(client, 0, "train", "train")
        for _ in range(40):
            b.add_metric("reward/x", 1.0)
            client.ship()
            time.sleep(0.025)
        transport: Any = client.transport
        print(f"lookups in 1 s with 40 sends: {transport.lookups}")
        assert 2 <= transport.lookups <= 8
        client.close(timeout_s=0.2)

    def test_interpreter_exit_is_bounded_by_close(self, ray_cluster: Any) -> None:
        """A worker with unsent leaves and no aggregator exits within close()'s 5 s."""
        code = textwrap.dedent(
            f"""
            import atexit, time
            marks = {{}}
            # registered first, so it runs last: after the client's exit handler
            atexit.register(lambda: print("exit_s", round(time.monotonic() - marks["end"], 3)))
            import ray
            ray.init(address={ray_cluster.address!r}, log_to_driver=False)
            import art_ray_metrics as arm
            from art_ray_metrics.config import ClientConfig
            b = arm.connect(0, config=ClientConfig(name="nobody-exit"))  # lookups: 60 s
            b.add_metric("reward/x", 1.0)
            marks["end"] = time.monotonic()
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        exit_s = float(proc.stdout.split("exit_s", 1)[1].split()[0])
        print(f"interpreter exit took {exit_s} s (close bound 5 s)")
        assert exit_s < 8.0  # close's 5 s, then Ray's own exit handler


class TestNeverStartsRay:
    def test_no_second_ray_after_ray_shutdown(
        self, ray_cluster: Any, run_config: dict[str, Any]
    ) -> None:
        """Issue 21, item 1: a driver connects, flushes, shuts the aggregator and Ray down; its
        client's idle confirm must not start a new local Ray."""
        code = textwrap.dedent(
            f"""
            import time
            import ray
            import art_ray_metrics as arm
            from art_ray_metrics.config import ClientConfig
            ray.init(address={ray_cluster.address!r}, namespace="arm-tests", log_to_driver=False)
            handle = arm.start_aggregator(**{run_config!r})
            # the idle confirm goes out flush_interval_s after the last ship: after shutdown
            b = arm.connect(0, config=ClientConfig(name={run_config["name"]!r},
                                                   flush_interval_s=1.0))
            b.add_cost("train/judge", 1.0)
            assert b.flush(timeout_s=30).ok
            handle.shutdown()
            ray.shutdown()
            time.sleep(2.5)  # two confirm intervals and a half
            print("initialized_after", ray.is_initialized())
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "initialized_after False" in proc.stdout, proc.stdout + proc.stderr[-2000:]
        assert "Started a local Ray instance" not in proc.stderr
