"""The aggregator's metadata record keeps the checkpoint map of the string-keyed era."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgpack

from art_ray_metrics.core.meta import AggregatorMeta, Health, LastRow, OutboxEntry, RewindEntry
from art_ray_metrics.core.state import AggregatorState

# what a checkpoint written by the dict-based aggregator holds under "meta"
OLD_META: dict[str, Any] = {
    "outbox": [[3, "train", {"loss/x": 0.5}, "2025-01-01T00:00:00+00:00"]],
    "last_rows": {"train": [3, {"loss/x": 0.5}], "val": [2, {"val/r": 1.0}]},
    "restarts": 2,
    "wandb_run_id": "abc12345",
    "wandb_finished_upto": 1,
    "rewind": [[2, "val", "rewind/a.bin"], [3, "train", "rewind/b.bin"]],
    "rewind_drop": ["rewind/old.bin"],
    "rewind_floor": 1,
    "history_drop": [[4, "train"]],
    "close_seq": 7,
    "rewound": {"rewinds": 1, "steps": 2, "costs_usd": "0.25"},
}


def test_an_old_checkpoint_map_loads_typed_and_writes_back_identically() -> None:
    meta = AggregatorMeta.from_dict(msgpack.unpackb(msgpack.packb(OLD_META)))
    assert meta.outbox == [OutboxEntry(3, "train", {"loss/x": 0.5}, "2025-01-01T00:00:00+00:00")]
    assert meta.last_rows["val"] == LastRow(2, {"val/r": 1.0})
    assert meta.rewind[1] == RewindEntry(3, "train", "rewind/b.bin")
    assert meta.history_drop == [(4, "train")]
    assert meta.rewound.costs_usd == Decimal("0.25")
    assert meta.to_dict() == OLD_META


def test_a_new_state_starts_before_the_first_start() -> None:
    """restarts -1 before the first start; missing keys of an older map take defaults."""
    assert AggregatorMeta.from_dict({}) == AggregatorMeta()
    assert AggregatorMeta().restarts == -1
    assert AggregatorMeta().wandb_finished_upto is None


def test_unknown_keys_survive_a_checkpoint_round_trip() -> None:
    state = AggregatorState()
    state.meta = AggregatorMeta.from_dict({**OLD_META, "from_a_newer_version": [1, 2]})
    state.meta.gpu_since = 12.5
    blob, shards, _token = state.checkpoint_parts()
    again = AggregatorState.from_checkpoint(blob, shards)
    assert again.meta == state.meta
    assert again.meta.extra == {"from_a_newer_version": [1, 2]}


def test_health_keeps_the_stats_keys() -> None:
    health = Health(replayed_batches=3)
    health.storage_failed(RuntimeError("x" * 500))
    out = health.to_dict()
    assert sorted(out) == sorted(
        [
            "wal_writes",
            "wal_failures",
            "checkpoints",
            "checkpoint_failures",
            "history_failures",
            "replayed_batches",
            "last_storage_error",
            "barrier_timeouts",
            "rewind_refused",
            "backpressure",
            "history_rejected",
            "loop_restarts",
        ]
    )
    assert len(out["last_storage_error"]) == 300
