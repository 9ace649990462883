"""The aggregator's health, read back from a real Ray node's Prometheus metrics endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("_ray_metrics_job.py")
sys.path.insert(0, str(JOB.parent))
from _ray_metrics_job import EXPECTED  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_metrics_exported_from_the_node_endpoint(tmp_path: Path) -> None:
    """A dedicated one-node cluster with ``_metrics_export_port``: the aggregator's counters,
    gauges and latency histograms appear with their exact values (the exporter publishes every
    few seconds, so the job polls with a bounded timeout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # its own cluster, never the shared test cluster
    done = subprocess.run(
        [sys.executable, str(JOB), str(tmp_path / "run"), "120"],
        env=env,
        capture_output=True,
        text=True,
        timeout=850,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = {}
    for line in done.stdout.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("ray_"):
            seen[name] = float(value)
    for name, value in EXPECTED.items():
        if name.endswith("_count"):
            assert seen.get(name, 0.0) >= value, (name, seen)
        else:
            assert seen.get(name) == value, (name, seen)
    assert seen["ray_art_metrics_barrier_seconds_sum"] > 0
