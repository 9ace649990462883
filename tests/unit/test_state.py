"""The aggregation state machine: ART's step math, idempotency, ordering, late leaves,
conflicts and snapshots."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from art_ray_metrics.core.records import LeafBatch
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.errors import InvalidMetricError, WireFormatError
from art_ray_metrics.testing import make_batch, make_group
from tests.hypothesis_profiles import examples

ART_COSTS = {
    "costs/train/llm_judge/general": 0.08,
    "costs/train/llm_judge/hallucination": 0.04,
    "costs/train/tinker_train": 1.20,
    "costs/train/tinker_inference": 0.45,
    "costs/eval/llm_judge/correctness": 0.06,
}


def _close(
    state: AggregatorState, step: int, split: str = "train", **kw: object
) -> dict[str, float]:
    return state.close_step(step, split, **kw).row  # type: ignore[arg-type]


class TestArtNumbers:
    def test_cost_rollups(self) -> None:
        """ART's rollup example: costs/train 1.77, costs/eval 0.06, costs/all 1.83."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 0, "train", ART_COSTS))
        row = _close(s, 0)
        assert row["costs/train/llm_judge"] == 0.12
        assert row["costs/train"] == 1.77
        assert row["costs/eval/llm_judge"] == 0.06
        assert row["costs/eval"] == 0.06
        assert row["costs/all"] == 1.83
        assert row["costs/cum/all"] == 1.83
        assert row["costs/cum/train"] == 1.77
        assert row["training_step"] == 0.0

    def test_gpu_is_top_level(self) -> None:
        """costs/gpu counts in costs/all but not in costs/train."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 1, "train", {"costs/gpu": 2.5, "costs/train/x": 0.5}))
        row = _close(s, 1)
        assert (row["costs/train"], row["costs/all"], row["costs/cum/gpu"]) == (0.5, 3.0, 2.5)

    def test_repeated_writes_sum(self) -> None:
        """Two add_cost('train/x', 0.1) give 0.2 exactly."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 1, "train", [("costs/train/x", 0.1), ("costs/train/x", 0.1)]))
        s.ingest(make_batch("q", 1, 1, "train", [("costs/train/x", 0.1)]))
        assert _close(s, 1)["costs/train/x"] == 0.3  # float sums would give 0.30000000000000004

    def test_throughput(self) -> None:
        """ART's test: trainer 40 tok / 4 s -> 10; actor 10 tok / 2 s -> 5."""
        s = AggregatorState()
        s.ingest(
            make_batch(
                "p",
                1,
                1,
                "train",
                {
                    "data/step_trainer_tokens": 40,
                    "time/step_trainer_s": 4,
                    "data/step_actor_tokens": 10,
                    "time/step_actor_s": 2,
                },
            )
        )
        row = _close(s, 1)
        assert row["throughput/avg_trainer_tok_per_s"] == 10.0
        assert row["throughput/avg_actor_tok_per_s"] == 5.0
        assert row["data/cum/trainer_tokens"] == 40.0
        assert row["time/cum/trainer_s"] == 4.0

    def test_throughput_uses_cumulative(self) -> None:
        """The averages divide run totals, so a step with only seconds still has a rate."""
        s = AggregatorState()
        s.ingest(
            make_batch("p", 1, 1, "train", {"data/step_actor_tokens": 100, "time/step_actor_s": 1})
        )
        _close(s, 1)
        s.ingest(make_batch("p", 2, 2, "train", {"time/step_actor_s": 4}))
        row = _close(s, 2)
        assert row["throughput/avg_actor_tok_per_s"] == 20.0
        assert "throughput/avg_trainer_tok_per_s" not in row

    def test_idle_cumulatives(self) -> None:
        """Idle seconds get throughput/cum twins across steps."""
        s = AggregatorState()
        for step in (1, 2):
            s.ingest(
                make_batch(
                    "p",
                    step,
                    step,
                    "train",
                    {"throughput/step_trainer_idle_s": 1.5, "throughput/step_actor_idle_s": 0.5},
                )
            )
            row = _close(s, step)
        assert row["throughput/cum/trainer_idle_s"] == 3.0
        assert row["throughput/cum/actor_idle_s"] == 1.0

    def test_cum_shared_across_scopes(self) -> None:
        """A val row's costs/cum/all includes train spend."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 1, "train", {"costs/train/j": 1.0}))
        s.ingest(make_batch("p", 2, 1, "eval", {"costs/eval/j": 0.25}))
        _close(s, 1, "train")
        assert _close(s, 1, "val")["costs/cum/all"] == 1.25

    def test_empty_step(self) -> None:
        """A step with nothing pending has no builder keys, only training_step."""
        s = AggregatorState()
        assert _close(s, 3) == {"training_step": 3.0}

    def test_unique_scenarios(self) -> None:
        """Scenario ids are a run-wide exact set; the key appears only when ids arrived."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 1, scenario_ids=["a", "b", 1]))
        s.ingest(make_batch("q", 1, 1, scenario_ids=["b", "1"]))  # 1 and "1" are one id
        assert _close(s, 1)["data/cum/num_unique_scenarios"] == 3.0
        s.ingest(make_batch("p", 2, 2, scenario_ids=["a", "c"]))
        assert _close(s, 2)["data/cum/num_unique_scenarios"] == 4.0
        s.ingest(make_batch("p", 3, 3, "train", {"reward/x": 1.0}))
        assert "data/cum/num_unique_scenarios" not in _close(s, 3)


class TestIdempotency:
    def test_duplicate_batch_is_acknowledged_not_applied(self) -> None:
        """A resent (producer_id, seq) changes nothing and is counted."""
        s = AggregatorState()
        b = make_batch("p", 1, 1, "train", {"costs/train/x": 0.5}, scenario_ids=["a"])
        assert not s.ingest(b).duplicate
        assert s.ingest(b).duplicate
        assert s.counters["duplicate_batches"] == 1
        assert _close(s, 1)["costs/all"] == 0.5

    def test_out_of_order_seqs(self) -> None:
        """Seqs arriving 3, 1, 2 are all applied once; resends of any are dropped."""
        s = AggregatorState()
        for seq in (3, 1, 2, 2, 3, 1):
            s.ingest(make_batch("p", seq, 1, "train", {"data/step_x": 1}))
        assert s.producers[("p", "")].applied.watermark == 3
        assert _close(s, 1)["data/step_x"] == 3.0

    def test_response_id_applied_once_per_run(self) -> None:
        """The same paid response (response id) costs once, across producers and steps."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 1, keyed_costs=[("costs/train/judge", 0.01, "resp-1")]))
        s.ingest(make_batch("q", 1, 1, keyed_costs=[("costs/train/judge", 0.01, "resp-1")]))
        assert _close(s, 1)["costs/all"] == 0.01
        s.ingest(
            make_batch(
                "q",
                2,
                2,
                keyed_costs=[
                    ("costs/train/judge", 0.01, "resp-1"),
                    ("costs/train/judge", 0.02, "resp-2"),
                ],
            )
        )
        assert _close(s, 2)["costs/all"] == 0.02
        assert s.counters["duplicate_costs"] == 2


@st.composite
def _workload(draw: st.DrawFn) -> list[tuple[int, str, str, float, str | None]]:
    keys = [
        "costs/train/judge/a",
        "costs/train/judge/b",
        "costs/gpu",
        "costs/eval/j",
        "time/step_actor_s",
        "data/step_actor_tokens",
        "reward/score",
    ]
    n = draw(st.integers(1, 40))
    out = []
    for _ in range(n):
        step = draw(st.integers(1, 3))
        key = draw(st.sampled_from(keys))
        scope = "eval" if key.startswith("costs/eval") else "train"
        value = draw(
            st.one_of(st.integers(0, 1000).map(lambda c: c / 100), st.floats(0, 5, allow_nan=False))
        )
        sid = draw(st.one_of(st.none(), st.sampled_from(["s1", "s2", "s3", "s4"])))
        out.append((step, scope, key, value, sid))
    return out


def _run(batches: list[LeafBatch]) -> list[dict[str, float]]:
    s = AggregatorState()
    for b in batches:
        s.ingest(b)
    rows = []
    for step in (1, 2, 3):
        rows.append(s.close_step(step, "train").row)
        rows.append(s.close_step(step, "val").row)
    return rows


def _shard(
    work: list[tuple[int, str, str, float, str | None]], producers: int, rnd: random.Random
) -> list[LeafBatch]:
    per: dict[str, list[tuple[int, str, str, float, str | None]]] = {}
    for item in work:
        per.setdefault(f"p{rnd.randrange(producers)}", []).append(item)
    batches = []
    for pid, items in per.items():
        seq = 0
        i = 0
        while i < len(items):
            chunk = items[i : i + rnd.randint(1, 5)]
            i += len(chunk)
            seq += 1
            groups = []
            for step in sorted({c[0] for c in chunk}):
                for scope in sorted({c[1] for c in chunk if c[0] == step}):
                    mine = [c for c in chunk if c[0] == step and c[1] == scope]
                    groups.append(
                        make_group(
                            step,
                            scope,
                            [(c[2], c[3]) for c in mine],
                            scenario_ids=[c[4] for c in mine if c[4]],
                        )
                    )
            batches.append(LeafBatch(pid, seq, tuple(groups)))
    return batches


class TestOrderIndependence:
    @settings(max_examples=examples(60), deadline=None)
    @given(work=_workload(), seed=st.integers(0, 2**32 - 1))
    def test_split_permute_duplicate_gives_same_rows(
        self, work: list[tuple[int, str, str, float, str | None]], seed: int
    ) -> None:
        """Any split across producers, any order, any resends: the same rows, exactly."""
        rnd = random.Random(seed)
        reference = _run(_shard(work, 1, random.Random(0)))
        batches = _shard(work, rnd.randint(1, 4), rnd)
        batches += [rnd.choice(batches) for _ in range(rnd.randint(0, 3))]  # resends
        rnd.shuffle(batches)
        assert _run(batches) == reference


class TestLateAndConflicts:
    def test_late_leaf_goes_into_next_row(self) -> None:
        """A leaf for a closed step lands in the next row of its scope; totals stay exact."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 1, "train", {"costs/train/j": 1.0}))
        _close(s, 1)
        res = s.ingest(make_batch("q", 1, 1, "train", {"costs/train/j": 0.5}))
        assert res.late_leaves == 1
        s.ingest(make_batch("p", 2, 2, "train", {"costs/train/j": 2.0}))
        report = s.close_step(2, "train")
        assert report.row["costs/train/j"] == 2.5
        assert report.row["costs/cum/all"] == 3.5
        assert report.late_leaves == 1
        assert s.counters["late_leaves"] == 1

    def test_cross_producer_conflict_keeps_every_dollar(self) -> None:
        """costs/train from one producer and costs/train/x from another: value moves to unattributed."""
        for order in ((0, 1), (1, 0)):
            s = AggregatorState()
            batches = [
                make_batch("a", 1, 1, "train", {"costs/train": 1.0}),
                make_batch("b", 1, 1, "train", {"costs/train/x": 0.25}),
            ]
            for i in order:
                s.ingest(batches[i])
            report = s.close_step(1, "train")
            assert report.row["costs/train"] == 1.25
            assert report.row["costs/train/unattributed"] == 1.0
            assert report.row["costs/all"] == 1.25
            assert report.conflicts
            assert s.conflict_names == {"costs/train": 1}


class TestTrainerMetrics:
    def test_merge_and_route(self) -> None:
        """Trainer metrics are mapped, routed and merged; managed keys are summed with leaves."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 4, "train", {"data/step_trainer_tokens": 10}))
        row = _close(
            s,
            4,
            metrics={
                "policy_loss": 0.5,
                "reward": 0.9,
                "num_trainable_tokens": 30,
                "time/step_trainer_s": 2,
            },
        )
        assert row["loss/train"] == 0.5
        assert row["train/reward"] == 0.9
        assert row["data/step_trainer_tokens"] == 40.0
        assert row["throughput/avg_trainer_tok_per_s"] == 20.0

    @pytest.mark.parametrize(
        "metrics",
        [
            {"loss": float("nan")},
            {"costs_total": 1.0},
            {"costs/cum/x": 1.0},
            {"costs/train": 1, "costs/train/x": 2},
        ],
    )
    def test_bad_trainer_metrics_change_nothing(self, metrics: dict[str, float]) -> None:
        """Invalid trainer metrics raise and the pending step stays intact."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 1, "train", {"costs/train/x": 1.0}))
        with pytest.raises(InvalidMetricError):
            s.close_step(1, "train", metrics)
        assert _close(s, 1)["costs/all"] == 1.0


class TestSnapshots:
    def test_restore_mid_run_continues_identically(self) -> None:
        """restore(snapshot()) mid-run gives the same later rows as the original."""

        def feed(state: AggregatorState, steps: range) -> list[dict[str, float]]:
            rows = []
            for step in steps:
                state.ingest(
                    make_batch(
                        "p",
                        step * 10,
                        step,
                        "train",
                        {"costs/train/j": 0.1 * step},
                        scenario_ids=[f"s{step % 3}"],
                    )
                )
                state.ingest(
                    make_batch("q", step * 10, step + 1, "train", {"data/step_actor_tokens": step})
                )
                rows.append(state.close_step(step, "train").row)
            return rows

        a = AggregatorState()
        feed(a, range(1, 4))
        a.ingest(
            make_batch(
                "r", 1, 9, "eval", {"costs/eval/x": 1.0}, keyed_costs=[("costs/eval/y", 0.5, "rid")]
            )
        )
        b = AggregatorState.restore(a.snapshot())
        assert feed(b, range(4, 8)) == feed(a, range(4, 8))
        assert b.snapshot() == a.snapshot()

    def test_checkpoint_parts_round_trip(self) -> None:
        """State blob plus accumulated shards rebuild the same state."""
        a = AggregatorState()
        shards: dict[str, bytes] = {"scenarios": b"", "cost_ids": b""}
        for step in range(1, 5):
            a.ingest(
                make_batch(
                    "p",
                    step,
                    step,
                    scenario_ids=[f"s{i}" for i in range(step * 3)],
                    keyed_costs=[("costs/train/j", 0.1, f"r{step}")],
                )
            )
            a.close_step(step, "train")
            blob, new, token = a.checkpoint_parts()
            for name, data in new.items():
                shards[name] += data
            a.checkpoint_committed(token)
        assert len(shards["scenarios"]) == 12 * 16  # each digest written once
        b = AggregatorState.from_checkpoint(blob, shards)
        assert b.snapshot() == a.snapshot()

    @pytest.mark.parametrize("cut", [0, 1, 5, -1])
    def test_truncated_snapshot_raises_typed(self, cut: int) -> None:
        """Truncated snapshot bytes raise WireFormatError."""
        data = AggregatorState().snapshot()
        with pytest.raises(WireFormatError):
            AggregatorState.restore(data[:cut])


class TestBadBatches:
    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"\x93\x01",
            encode_batch(make_batch("p", 1, 1, "train", {"costs/train/x": 1.0}))[:-3],
            b"\x95\xa9arm-batch\x02\xa1p\x01\x90",  # version 2
            b"\x95\xa9arm-batch\x01\xa1p\x00\x90",  # seq 0
        ],
        ids=["empty", "garbage", "truncated", "version", "seq0"],
    )
    def test_rejected_and_state_untouched(self, data: bytes) -> None:
        """Malformed bytes raise WireFormatError, are counted, and change no state."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 1, "train", {"costs/train/x": 1.0}))
        before = s.snapshot()
        with pytest.raises(WireFormatError):
            s.ingest_bytes(data)
        assert s.counters["rejected_batches"] == 1
        s.counters["rejected_batches"] = 0
        assert s.snapshot() == before


class TestSkippedSteps:
    def test_pending_older_step_folds_into_next_close(self) -> None:
        """Leaves of a step never closed go into the next closed row of the scope as late."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 3, "train", {"costs/train/j": 1.0}))
        s.ingest(make_batch("p", 2, 5, "train", {"costs/train/j": 2.0}))
        s.ingest(make_batch("p", 3, 6, "train", {"costs/train/j": 4.0}))
        report = s.close_step(5, "train")
        assert report.row["costs/train/j"] == 3.0
        assert report.late_leaves == 1
        assert s.close_step(6, "train").row["costs/cum/all"] == 7.0


class TestDeepConflicts:
    def test_conflict_with_a_deep_descendant_keeps_bookkeeping(self) -> None:
        """After resolving costs/train vs costs/train/x/y, costs/train/x is still an ancestor."""
        s = AggregatorState()
        s.ingest(make_batch("a", 1, 0, "train", {"costs/train": 1.0}))
        s.ingest(make_batch("b", 1, 0, "train", {"costs/train/x/y": 2.0}))
        s.ingest(make_batch("c", 1, 0, "train", {"costs/train/x": 4.0}))
        row = s.close_step(0, "train").row
        assert row["costs/all"] == 7.0
        assert row["costs/train"] == 7.0
        assert row["costs/train/x"] == 6.0
        assert row["costs/train/x/unattributed"] == 4.0
