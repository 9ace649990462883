"""The aggregator's Ray metrics: what is published when, and the files that name them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from art_ray_metrics.distributed.telemetry import (
    COUNTERS,
    FAILURES,
    GAUGES,
    HISTOGRAMS,
    PREFIX,
    AggregatorTelemetry,
)

ROOT = Path(__file__).resolve().parents[2]


def exported_names() -> set[str]:
    """Names as Ray's Prometheus endpoint shows them (``ray_`` prefix, ``_total`` counters)."""
    counters = {f"ray_{PREFIX}{n}_total" for n in (*COUNTERS, *FAILURES)}
    gauges = {f"ray_{PREFIX}{n}" for n in GAUGES}
    histograms = {f"ray_{PREFIX}{n}{s}" for n in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    return counters | gauges | histograms


class Recorder:
    """Stands in for one Ray metric object: records calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, float, Any]] = []
        self.fail = fail

    def inc(self, value: float, tags: Any = None) -> None:
        if self.fail:
            raise RuntimeError("exporter down")
        self.calls.append(("inc", value, tags))

    def set(self, value: float) -> None:
        self.calls.append(("set", value, None))

    def observe(self, value: float) -> None:
        self.calls.append(("observe", value, None))


def telemetry_with_recorders(**fail: bool) -> tuple[AggregatorTelemetry, dict[str, Recorder]]:
    t = AggregatorTelemetry("agg", "ns")
    recorders = {
        n: Recorder(fail.get(n, False)) for n in (*COUNTERS, *FAILURES, *GAUGES, *HISTOGRAMS)
    }
    t._metrics = dict(recorders)
    return t, recorders


class TestPublish:
    def test_counters_publish_deltas_after_the_restored_baseline(self) -> None:
        """A restarted actor publishes only what it counted itself; each delta once."""
        t, rec = telemetry_with_recorders()
        t.baseline({"batches": 10})
        t.publish({"batches": 12, "storage_failures/wal": 1}, {"producers": 3}, force=True)
        t.publish({"batches": 12, "storage_failures/wal": 1}, {"producers": 4}, force=True)
        t.publish({"batches": 15, "storage_failures/wal": 3}, {"producers": 4}, force=True)
        assert rec["batches"].calls == [("inc", 2, None), ("inc", 3, None)]
        assert rec["storage_failures"].calls == [
            ("inc", 1, {"operation": "wal"}),
            ("inc", 2, {"operation": "wal"}),
        ]
        assert [c[1] for c in rec["producers"].calls] == [3, 4, 4]

    def test_a_total_that_goes_back_rebases(self) -> None:
        """Counters restored to an older value publish nothing until they pass it again."""
        t, rec = telemetry_with_recorders()
        t.publish({"rows": 5}, {}, force=True)
        t.publish({"rows": 3}, {}, force=True)
        t.publish({"rows": 4}, {}, force=True)
        assert rec["rows"].calls == [("inc", 5, None), ("inc", 1, None)]

    def test_publishing_is_rate_limited_unless_forced(self) -> None:
        t, rec = telemetry_with_recorders()
        t.publish({"batches": 1}, {}, force=True)
        t.publish({"batches": 2}, {})  # within the interval: skipped, delta kept for later
        t.publish({"batches": 3}, {}, force=True)
        assert rec["batches"].calls == [("inc", 1, None), ("inc", 2, None)]

    def test_a_failing_exporter_disables_telemetry_without_raising(self) -> None:
        t, _ = telemetry_with_recorders(batches=True)
        t.publish({"batches": 1}, {}, force=True)
        assert not t.enabled
        t.publish({"batches": 2}, {}, force=True)
        t.observe("barrier_seconds", 0.1)

    @pytest.mark.slow  # a fresh interpreter (this one may have imported Ray)
    def test_disabled_outside_ray(self) -> None:
        """Constructed where Ray is not running (unit tests, tools), it is a silent no-op."""
        code = (
            "from art_ray_metrics.distributed.telemetry import AggregatorTelemetry as T\n"
            "t = T('a', 'n'); assert not t.enabled\n"
            "t.publish({'batches': 1}, {'producers': 1}, force=True); t.observe('x', 1.0)\n"
            "import sys; assert 'ray' not in sys.modules\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


class TestDocumentedNames:
    def test_readme_lists_every_exported_metric(self) -> None:
        readme = (ROOT / "README.md").read_text()
        for name in exported_names():
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in readme, base

    @pytest.mark.parametrize("path", ["cluster/grafana-aggregator.json"])
    def test_grafana_panels_use_only_exported_metrics(self, path: str) -> None:
        dashboard = json.loads((ROOT / path).read_text())
        used = set()
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                used |= set(re.findall(r"ray_art_metrics_[a-z_]+", target["expr"]))
        assert used
        assert used <= exported_names(), used - exported_names()
