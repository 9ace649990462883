"""The actor's typed answers still read as the maps earlier versions answered with.

Callers written against those maps (an older worker client reading ``ack.get("durable")``, a
script or test calling ``actor.stats.remote()`` and indexing the answer) must keep working.
"""

from __future__ import annotations

import pickle

import pytest

from art_ray_metrics.core.replies import AggregatorStats, IngestAck


def _stats() -> AggregatorStats:
    values = {f: None for f in AggregatorStats.__dataclass_fields__}
    values.update(name="agg", epoch=3, counters={"batches": 2}, node_id="n1", pid=7)
    return AggregatorStats(**values)  # type: ignore[arg-type]


def test_ingest_ack_reads_as_the_earlier_map() -> None:
    ack = IngestAck("p", 4, False, True, 4, refused=((0, "train", "costs/x", "limit"),))
    as_map = ack.to_dict()
    assert {k: ack[k] for k in as_map} == as_map
    assert ack.get("durable") is True
    assert ack.get("durable_upto") == 4
    assert ack.get("missing", "default") == "default"
    with pytest.raises(KeyError):
        ack["missing"]
    assert IngestAck.from_reply(as_map) == ack  # and back, from an earlier version's map
    assert pickle.loads(pickle.dumps(ack)) == ack  # what Ray does with it


def test_stats_read_as_the_documented_map() -> None:
    stats = _stats()
    assert stats["node_id"] == "n1"
    assert stats["counters"] == {"batches": 2}
    assert stats.get("epoch") == 3
    assert set(stats.keys()) == set(AggregatorStats.as_map(stats))
