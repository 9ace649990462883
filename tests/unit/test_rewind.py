"""Resume from an older step without Ray: exact restore, tombstones, the window, lost dollars
and the rewind object format (art_ray_metrics.core.rewind)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgpack
import pytest

from art_ray_metrics.core import rewind as R
from art_ray_metrics.core.dedupe import DigestLedger, digest
from art_ray_metrics.core.meta import LastRow, OutboxEntry
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.errors import InvalidMetricError, WireFormatError
from art_ray_metrics.testing import make_batch


class Shell:
    """The actor's part of the protocol, with a dict as the object store."""

    def __init__(self, window: int = 64) -> None:
        self.state = AggregatorState()
        self.window = window
        self.objects: dict[str, bytes] = {}
        self.tombstones = dict.fromkeys(R.TOMBSTONES.values(), b"")
        self.seq = 0

    def send(self, step: int, cost: float, ids: tuple[str, ...] = (), rid: str = "") -> None:
        self.seq += 1
        keyed = [("costs/train/judge", 0.5, rid)] if rid else []
        batch = make_batch(
            "p",
            self.seq,
            step,
            leaves={"costs/train/llm": cost, "data/step_actor_tokens": 10},
            scenario_ids=ids,
            keyed_costs=keyed,
        )
        self.state.ingest(batch)

    def close(self, step: int, split: str = "train") -> dict[str, float]:
        ledgers = (self.state.cum.scenarios, self.state.cum.cost_ids)
        before = [len(ledger.journal_bytes()) for ledger in ledgers]
        row = self.state.close_step(step, split).row
        added = [ledger.journal_bytes()[n:] for ledger, n in zip(ledgers, before, strict=True)]
        key, data, evicted = R.record_close(
            self.state, step, split, added[0], added[1], window=self.window
        )
        self.objects[key] = data
        for old in evicted:
            del self.objects[old]
        return row

    def step(self, step: int, ids: tuple[str, ...] = (), rid: str = "") -> dict[str, float]:
        self.send(step, 0.01 * (step + 1), ids, rid)
        return self.close(step)

    def rewind(self, step: int, *, keep_late: bool = False) -> R.RewindResult | None:
        plan = R.plan_rewind(self.state, step, keep_late=keep_late, window=self.window)
        if plan is None:
            return None
        base = R.decode_record(self.objects[plan.base_key]) if plan.base_key else None
        records = [R.decode_record(self.objects[k]) for k in plan.keys]
        result = R.apply_rewind(self.state, plan, base, records, keep_late=keep_late)
        for family, removed in result.tombstones.items():
            self.tombstones[family] += removed
        for key in result.dropped_keys:
            del self.objects[key]
        self.objects.update(result.rewritten)
        return result


def _ids(step: int) -> tuple[str, ...]:
    return (f"sc-{step}", f"sc-{step % 3}")


def _snapshot(state: AggregatorState) -> tuple[Any, ...]:
    return (
        dict(state.cum.values),
        dict(state.last_closed),
        state.cum.scenarios.to_bytes(),
        state.cum.cost_ids.to_bytes(),
        set(state.pending_cost_ids),
    )


class TestExactRestore:
    def test_rewind_restores_cum_last_closed_and_ledgers(self) -> None:
        """After rewinding to k the state equals that of a run that stopped after k."""
        ref, shell = Shell(), Shell()
        for s in range(4):
            ref.step(s, _ids(s), rid=f"r{s}")
        for s in range(8):
            shell.step(s, _ids(s), rid=f"r{s}")
        result = shell.rewind(3)
        assert result is not None
        assert result.discarded_steps == 4
        assert _snapshot(shell.state) == _snapshot(ref.state)

    def test_re_executed_steps_give_the_same_rows(self) -> None:
        """Rows after the rewind equal the rows of a run without the failure."""
        ref, shell = Shell(), Shell()
        ref_rows = [ref.step(s, _ids(s), rid=f"r{s}") for s in range(8)]
        for s in range(6):
            shell.step(s, _ids(s), rid=f"r{s}")
        shell.rewind(2)
        rows = [shell.step(s, _ids(s), rid=f"r{s}") for s in range(3, 8)]
        assert rows == ref_rows[3:]
        assert _snapshot(shell.state) == _snapshot(ref.state)

    def test_rewind_to_minus_one_empties_the_cumulative_state(self) -> None:
        """Rewinding before the first step leaves no cumulative value, scope or id."""
        shell = Shell()
        for s in range(3):
            shell.step(s, _ids(s), rid=f"r{s}")
        shell.rewind(-1)
        assert _snapshot(shell.state) == ({}, {}, b"", b"", set())
        assert shell.state.meta.rewind == []

    def test_paid_response_is_charged_again_after_rewind(self) -> None:
        """A response id first paid in a discarded step counts again when re-sent."""
        shell = Shell()
        shell.step(0)
        first = shell.step(1, rid="resp-1")
        shell.rewind(0)
        again = shell.step(1, rid="resp-1")
        assert again["costs/train/judge"] == first["costs/train/judge"] == 0.5
        assert shell.state.counters["duplicate_costs"] == 0

    def test_nothing_to_discard_returns_none(self) -> None:
        """A target at or after the last close, with no later buffers, changes nothing."""
        shell = Shell()
        shell.step(0)
        shell.step(1)
        before = _snapshot(shell.state)
        assert shell.rewind(1) is None
        assert shell.rewind(5) is None
        assert _snapshot(shell.state) == before

    def test_meta_rows_outbox_and_history_drop(self) -> None:
        """Rows of discarded steps leave last_rows and the outbox and are queued for deletion."""
        shell = Shell()
        meta = shell.state.meta
        meta.last_rows, meta.outbox = {}, []
        for s in range(3):
            row = shell.step(s)
            meta.last_rows["train"] = LastRow(s, row)
            meta.outbox.append(OutboxEntry(s, "train", row, "t"))
        shell.rewind(0)
        assert meta.last_rows == {}
        assert [e.step for e in meta.outbox] == [0]
        assert meta.history_drop == [(1, "train"), (2, "train")]
        assert [r.step for r in meta.rewind] == [0]
        assert meta.rewound.rewinds == 1
        assert meta.rewound.steps == 2


class TestTombstones:
    def test_tombstones_hold_exactly_the_removed_ids(self) -> None:
        """The tombstones are the ids the discarded closes added, nothing else."""
        shell = Shell()
        shell.step(0, ("a",), rid="r0")
        shell.step(1, ("a", "b"), rid="r1")
        shell.step(2, ("c",), rid="r2")
        result = shell.rewind(0)
        assert result is not None
        removed = result.tombstones["scenarios_rewound"]
        assert sorted(removed[i : i + 16] for i in (0, 16)) == sorted([digest("b"), digest("c")])
        assert len(result.tombstones["cost_ids_rewound"]) == 32

    def test_net_shards_cancel_one_for_one(self) -> None:
        """An id is present iff it was added more often than removed."""
        a, b, c = digest("a"), digest("b"), digest("c")
        shards = {"scenarios": a + b + c + a + b, "scenarios_rewound": a + b + b, "cost_ids": c}
        net = R.net_shards(shards)
        assert DigestLedger.from_bytes(net["scenarios"]).to_bytes() == (
            DigestLedger.from_bytes(a + c).to_bytes()
        )
        assert net["cost_ids"] == c
        assert R.net_shards({"scenarios": a}) == {"scenarios": a}

    def test_checkpoint_restore_after_add_remove_add(self) -> None:
        """Incremental shards plus tombstones restore the live ledgers across rewinds."""
        shell = Shell()
        shards = {"scenarios": b"", "cost_ids": b""}

        def commit() -> AggregatorState:
            blob, new, token = shell.state.checkpoint_parts()
            for family, data in new.items():
                shards[family] += data
            shell.state.checkpoint_committed(token)
            merged = {**shards, **shell.tombstones}
            return AggregatorState.from_checkpoint(blob, R.net_shards(merged))

        for s in range(4):
            shell.step(s, _ids(s), rid=f"r{s}")
        commit()
        shell.rewind(1)
        restored = commit()
        assert _snapshot(restored) == _snapshot(shell.state)
        for s in range(2, 6):  # the same ids come back: added, removed, added again
            shell.step(s, _ids(s), rid=f"r{s}")
        restored = commit()
        assert _snapshot(restored) == _snapshot(shell.state)
        assert len(shell.state.cum.scenarios) == 6

    def test_rewind_after_failed_commits_keeps_uncommitted_ids(self) -> None:
        """Steps closed during an outage, then a rewind, then a commit: no id is lost.

        Steps 1-2 close while commits fail; the trainer rewinds to 1; storage returns. The
        restored run holds steps 0-1's ids (5 unique), and a paid id of step 1 is not charged
        again when its response is retried.
        """
        shell = Shell()
        shards = {"scenarios": b"", "cost_ids": b""}

        def commit() -> AggregatorState:
            blob, new, token = shell.state.checkpoint_parts()
            for family, data in new.items():
                shards[family] += data
            shell.state.checkpoint_committed(token)
            merged = {**shards, **shell.tombstones}
            return AggregatorState.from_checkpoint(blob, R.net_shards(merged))

        shell.step(0, ("a", "b"), rid="r0")
        commit()
        shell.step(1, ("c", "d", "e"), rid="r1")  # storage down: no commit
        shell.step(2, ("f",), rid="r2")
        shell.rewind(1)
        restored = commit()  # storage back
        assert len(restored.cum.scenarios) == len(shell.state.cum.scenarios) == 5
        assert _snapshot(restored) == _snapshot(shell.state)
        restored.ingest(
            make_batch("p2", 1, 2, leaves={}, keyed_costs=[("costs/train/judge", 0.5, "r1")])
        )
        assert restored.counters["duplicate_costs"] == 1

    def test_ledger_without(self) -> None:
        """DigestLedger.without removes the given digests and keeps the journal."""
        a, b, c = digest("a"), digest("b"), digest("c")
        ledger = DigestLedger()
        ledger.add_many([a, b, c])
        smaller = ledger.without(b + digest("absent"))
        assert (len(smaller), b in smaller, a in smaller) == (2, False, True)
        assert smaller.journal_bytes() == ledger.journal_bytes()
        assert len(ledger) == 3
        with pytest.raises(WireFormatError, match="multiple of 16"):
            ledger.without(b"x")


class TestWindow:
    def test_window_slides_and_sets_the_floor(self) -> None:
        """Only the last `window` closes are kept; the floor is the newest evicted step."""
        shell = Shell(window=2)
        for s in range(5):
            shell.step(s)
        meta = shell.state.meta
        assert [r.step for r in meta.rewind] == [3, 4]
        assert meta.rewind_floor == 2
        assert sorted(shell.objects) == [r.key for r in meta.rewind]
        assert meta.rewind[-1].key == "rewind/000000000004-train-000000000005.bin"

    def test_target_outside_the_window_is_refused(self) -> None:
        """A target whose base close left the window raises and changes nothing."""
        shell = Shell(window=2)
        for s in range(5):
            shell.step(s)
        before = (_snapshot(shell.state), list(shell.state.meta.rewind))
        with pytest.raises(InvalidMetricError, match="oldest step still restorable"):
            shell.rewind(1)
        with pytest.raises(InvalidMetricError, match=">= 3"):
            shell.rewind(2)
        assert (_snapshot(shell.state), shell.state.meta.rewind) == before
        result = shell.rewind(3)
        assert result is not None
        assert result.discarded_steps == 1

    def test_disabled_window_refuses(self) -> None:
        """With rewind_window=0 any rewind that would discard something raises."""
        state = AggregatorState()
        state.ingest(make_batch("p", 1, 3, leaves={"costs/train/llm": 1.0}))
        with pytest.raises(InvalidMetricError, match="rewind_window=0"):
            R.plan_rewind(state, 1, keep_late=False, window=0)

    def test_within_the_window_from_the_start(self) -> None:
        """Before anything left the window, rewinding to before the first close is allowed."""
        shell = Shell(window=3)
        shell.step(0)
        shell.step(1)
        result = shell.rewind(-1)
        assert result is not None
        assert result.discarded_steps == 2


class TestLostDollars:
    def test_discarded_closes_and_buffers_are_counted(self) -> None:
        """Lost spend = cum cost of discarded closes + costs of dropped pending/late buffers."""
        shell = Shell()
        for s in range(4):
            shell.step(s)  # step s costs 0.01 * (s + 1) (+0 judge)
        shell.state.ingest(make_batch("q", 1, 7, leaves={"costs/train/llm": 0.25}))
        shell.state.ingest(make_batch("q", 2, 2, leaves={"costs/gpu": 0.125}))  # late
        assert shell.state.late
        result = shell.rewind(1)
        assert result is not None
        assert result.costs_usd == Decimal("0.03") + Decimal("0.04") + Decimal("0.25") + Decimal(
            "0.125"
        )
        assert (result.discarded_steps, result.discarded_buffers) == (2, 2)
        assert shell.state.meta.rewound.costs_usd == result.costs_usd
        assert not shell.state.pending
        assert not shell.state.late
        assert result.summary() == {
            "discarded_steps": 2,
            "discarded_buffers": 2,
            "costs_usd": float(result.costs_usd),
        }

    def test_keep_late_keeps_late_leaves_and_their_response_ids(self) -> None:
        """An implicit rewind keeps late leaves (for the re-executed step) and their ids."""
        shell = Shell()
        for s in range(3):
            shell.step(s)
        late = make_batch(
            "q", 1, 1, leaves={"costs/train/llm": 0.5}, keyed_costs=[("costs/train/j", 1, "x")]
        )
        shell.state.ingest(late)
        result = shell.rewind(0, keep_late=True)
        assert result is not None
        assert result.costs_usd == Decimal("0.02") + Decimal("0.03")
        assert result.discarded_buffers == 0
        assert shell.state.pending_cost_ids == {digest("x")}
        row = shell.step(1)
        assert row["costs/train/llm"] == pytest.approx(0.02 + 0.5)

    def test_pending_cost_ids_drop_with_their_buffers(self) -> None:
        """A paid id pending in a dropped buffer can be charged again after the rewind."""
        shell = Shell()
        shell.step(0)
        shell.send(1, 0.1, rid="again")
        shell.rewind(0)
        assert shell.state.pending_cost_ids == set()
        row = shell.step(1, rid="again")
        assert row["costs/train/judge"] == 0.5


class TestRecordFormat:
    def _record(self) -> R.RewindRecord:
        return R.RewindRecord(
            5, "train", {"costs/cum/all": Decimal("1.25")}, {"train": 5}, digest("a"), b""
        )

    def test_round_trip_and_layout(self) -> None:
        """Encoding is the documented msgpack map and decodes to the same record."""
        record = self._record()
        data = R.encode_record(record)
        assert R.decode_record(data) == record
        assert data == msgpack.packb(
            {
                "format": 1,
                "step": 5,
                "split": "train",
                "cum": {"costs/cum/all": "1.25"},
                "last_closed": {"train": 5},
                "scenarios": digest("a"),
                "cost_ids": b"",
            },
            use_bin_type=True,
        )
        assert R.record_key(5, "eval", 12) == "rewind/000000000005-eval-000000000012.bin"

    @pytest.mark.parametrize("cut", [0, 1, 10, -1])
    def test_truncated_raises_typed(self, cut: int) -> None:
        """Truncated bytes raise WireFormatError."""
        data = R.encode_record(self._record())
        with pytest.raises(WireFormatError):
            R.decode_record(data[:cut])

    @pytest.mark.parametrize(
        ("field", "value", "match"),
        [
            ("format", 2, "format 1"),
            ("step", -1, "step"),
            ("step", True, "step"),
            ("split", "", "split"),
            ("cum", {"costs/cum/all": "abc"}, "decimal"),
            ("cum", {"costs/cum/all": "NaN"}, "decimal"),
            ("cum", {"k": 1.5}, "decimal"),
            ("last_closed", {"train": "5"}, "last_closed"),
            ("cum", [], "maps"),
            ("scenarios", b"short", "multiples of 16"),
            ("cost_ids", "text", "cost_ids"),
        ],
    )
    def test_bad_fields_raise(self, field: str, value: object, match: str) -> None:
        """Every field is checked; a bad one raises WireFormatError naming it."""
        raw = msgpack.unpackb(R.encode_record(self._record()), raw=False)
        raw[field] = value
        with pytest.raises(WireFormatError, match=match):
            R.decode_record(msgpack.packb(raw, use_bin_type=True))

    def test_missing_or_extra_field_raises(self) -> None:
        """The field set is exact."""
        raw = msgpack.unpackb(R.encode_record(self._record()), raw=False)
        for changed in ({k: v for k, v in raw.items() if k != "cum"}, {**raw, "x": 1}):
            with pytest.raises(WireFormatError, match="fields"):
                R.decode_record(msgpack.packb(changed, use_bin_type=True))
