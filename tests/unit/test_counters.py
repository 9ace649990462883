"""The counter registry, the typed replies at the Ray boundary, and the GPU meter."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import uuid

import pytest

from art_ray_metrics import AggregatorConfig
from art_ray_metrics.core import counters as C
from art_ray_metrics.core.meta import AggregatorMeta, Health
from art_ray_metrics.core.replies import AggregatorStats, IngestAck
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.distributed import actor as actor_mod
from art_ray_metrics.distributed.actor import MetricsAggregator
from art_ray_metrics.distributed.telemetry import COUNTERS, FAILURES, GAUGES, HISTOGRAMS
from art_ray_metrics.spend.gpu_meter import GpuMeter
from art_ray_metrics.testing import make_batch

STATS_KEYS = {
    "name", "namespace", "run_name", "storage_uri", "epoch", "fenced", "counters",
    "conflicts_by_key", "pending_steps", "last_closed", "producers", "gauges", "health",
    "wandb", "wandb_run_id", "unique_scenarios", "rewound", "cum", "uptime_s", "pid", "node_id",
}  # fmt: skip
"""The keys ``handle.stats()`` has always returned."""


def _actor(**fields: object) -> MetricsAggregator:
    cfg = AggregatorConfig(
        storage_uri=f"memory://{uuid.uuid4().hex}", wandb_mode="disabled", **fields
    )
    return MetricsAggregator(cfg.model_dump_json())


class TestRegistry:
    def test_the_state_counters_keep_their_checkpoint_order(self) -> None:
        """The counters map is checkpointed in this order: append, never reorder."""
        assert C.STATE_COUNTERS == (
            "batches", "duplicate_batches", "rejected_batches", "limit_rejections", "leaves",
            "late_leaves", "conflicts", "duplicate_costs", "rows", "dropped_batches",
        )  # fmt: skip
        assert tuple(AggregatorState().counters) == C.STATE_COUNTERS

    def test_health_has_the_declared_fields_in_order(self) -> None:
        numeric = [f.name for f in dataclasses.fields(Health) if f.name != "last_storage_error"]
        assert tuple(numeric) == C.HEALTH_FIELDS

    def test_no_name_twice_for_one_owner(self) -> None:
        pairs = [(d.owner, d.name) for d in C.DECLARED]
        assert len(pairs) == len(set(pairs))

    def test_ray_table_is_what_telemetry_exports(self) -> None:
        names = {m.name for m in C.ray_table()}
        assert names == {*COUNTERS, *FAILURES, *GAUGES, *HISTOGRAMS}
        assert {m.name for m in C.ray_table() if m.tagged} == {"storage_failures"}

    def test_ray_values_read_each_owner(self) -> None:
        sources = {
            "state": dict.fromkeys(C.STATE_COUNTERS, 2)
            | {"pending_steps": 1, "producers": 3, "unique_scenarios": 4},
            "health": C.read("health", Health(wal_failures=5, checkpoint_failures=6)),
            "actor": {"wal_queue_batches": 7.0},
            "wandb": C.zeros("wandb") | {"failures": 8.0},
        }
        counters = C.ray_values(sources, "counter")
        assert counters["storage_failures/wal"] == 5.0
        assert counters["storage_failures/checkpoint"] == 6.0
        assert counters["wandb_failures"] == 8.0
        assert counters["batches"] == 2.0
        assert "limit_rejections" not in counters  # rows and stats only
        gauges = C.ray_values(sources, "gauge")
        assert gauges == {
            "pending_steps": 1.0,
            "producers": 3.0,
            "unique_scenarios": 4.0,
            "wal_queue_batches": 7.0,
        }

    def test_a_row_carries_exactly_the_declared_row_numbers(self) -> None:
        agg = _actor()

        async def run() -> dict[str, float]:
            await agg.ingest(encode_batch(make_batch("w", 1, 0, leaves={"reward/x": 1.0})))
            return await agg.log(0)

        row = asyncio.run(run())
        telemetry = {k for k in row if k.startswith("telemetry/")}
        declared = {f"telemetry/{d.name}" for d in C.DECLARED if "row" in d.shows}
        assert telemetry == declared
        assert row["telemetry/batches"] == 1.0
        assert row["telemetry/producers_in_row"] == 1.0

    def test_rows_without_telemetry(self) -> None:
        row = asyncio.run(_actor(telemetry_in_rows=False).log(0))
        assert not [k for k in row if k.startswith("telemetry/")]


class TestReplies:
    def test_ingest_ack_crosses_as_a_record_and_reads_an_older_map(self) -> None:
        agg = _actor()
        data = encode_batch(make_batch("w", 1, 0, leaves={"reward/x": 1.0}))
        ack = asyncio.run(agg.ingest(data, True))
        assert isinstance(ack, IngestAck)
        assert (ack.producer_id, ack.seq, ack.duplicate, ack.durable) == ("w", 1, False, True)
        assert pickle.loads(pickle.dumps(ack)) == ack
        assert IngestAck.from_reply(ack) is ack
        old = ack.to_dict()  # what earlier aggregators answered
        assert old["refused"] == []
        assert old["durable_upto"] == ack.durable_upto
        assert IngestAck.from_reply(old) == ack

    def test_an_older_map_with_refused_keys(self) -> None:
        old = {"seq": 3, "duplicate": False, "durable": True, "durable_upto": 3,
               "refused": [[0, "train", "reward/c", "max_keys_per_step=2"]]}  # fmt: skip
        ack = IngestAck.from_reply(old)
        assert ack.refused == ((0, "train", "reward/c", "max_keys_per_step=2"),)
        assert ack.conflicts == ()
        assert ack.late_leaves == 0

    def test_stats_keep_the_documented_map(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(actor_mod, "_node_id", lambda: None)  # asking Ray would start it
        stats = asyncio.run(_actor().stats())
        assert isinstance(stats, AggregatorStats)
        assert pickle.loads(pickle.dumps(stats)) == stats
        out = AggregatorStats.as_map(stats)
        assert set(out) == STATS_KEYS
        assert set(out["counters"]) == set(C.STATE_COUNTERS)
        assert set(out["health"]) == {*C.HEALTH_FIELDS, "last_storage_error"}
        assert set(out["gauges"]) == {f"telemetry/{d.name}" for d in C.declared("actor", "row")}
        assert AggregatorStats.as_map(out) == out  # an earlier version's map, as it was


class TestGpuMeter:
    def test_charges_from_the_last_barrier_kept_in_the_metadata(self) -> None:
        meta = AggregatorMeta()
        meter = GpuMeter(meta, 1000.0, gpu_type="H100", gpu_count=2, hourly_usd=3.0)
        assert meta.gpu_since == 1000.0  # a first start: charged from now
        assert meter.charge(1000.0 + 1800.0) == pytest.approx(3.0)
        meter.since = 2800.0
        assert meta.gpu_since == 2800.0
        again = GpuMeter(meta, 9999.0, gpu_type="H100", gpu_count=2, hourly_usd=3.0)
        assert again.since == 2800.0  # a restart keeps the time charged from
        assert again.charge(2000.0) == 0.0  # a clock behind the barrier charges nothing

    def test_no_gpu_type_or_no_gpus_charge_nothing(self) -> None:
        meta = AggregatorMeta()
        assert GpuMeter(meta, 0.0, gpu_type=None, gpu_count=None, hourly_usd=None).cost(60) is None
        zero = GpuMeter(meta, 0.0, gpu_type="H100", gpu_count=0, hourly_usd=None)
        assert zero.cost(3600.0) is None
        assert zero.gpus == {}
