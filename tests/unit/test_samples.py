"""Per-rollout values averaged across a step (``add_sample``): exact summaries that merge in any
order, the wire and checkpoint formats, the in-process builder and the aggregator's rows."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import art_ray_metrics as arm
from art_ray_metrics.core.records import LeafBatch, StepGroup
from art_ray_metrics.core.samples import SampleStats, sample_row, sqrt_fraction
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.core.wire import decode_batch, encode_batch
from art_ray_metrics.errors import InvalidMetricError, MetricConflictError, WireFormatError
from art_ray_metrics.testing import make_batch, make_group
from tests.hypothesis_profiles import examples

finite = st.floats(allow_nan=False, allow_infinity=False)
values_st = st.lists(finite, min_size=1, max_size=40)


def _reference(values: list[float]) -> tuple[float, float]:
    """statistics.mean/pstdev on the values as they are recorded (their shortest decimal)."""
    exact = [Fraction(Decimal(repr(v))) for v in values]
    return float(statistics.mean(exact)), statistics.pstdev(exact)


class TestSampleStats:
    def test_readme_trap(self) -> None:
        """Four rollouts with reward 0.5: add_metric gives 2.0, add_sample gives mean 0.5."""
        row = sample_row("reward/judge_score", SampleStats.of([0.5] * 4))
        assert row == {
            "reward/judge_score": 0.5,
            "reward/judge_score_std_dev": 0.0,
            "reward/judge_score_count": 4.0,
            "reward/judge_score_min": 0.5,
            "reward/judge_score_max": 0.5,
        }

    @settings(max_examples=examples(300), deadline=None)
    @given(values_st)
    def test_mean_and_std_dev_equal_statistics_exactly(self, values: list[float]) -> None:
        """Correctly rounded: the same floats as statistics.mean/pstdev over the exact values."""
        s = SampleStats.of(values)
        mean, std = _reference(values)
        assert s.mean() == mean
        assert s.std_dev() == std
        assert (float(s.low), float(s.high)) == (min(values), max(values))

    @settings(max_examples=examples(100), deadline=None)
    @given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40))
    def test_close_to_numpy_as_art_computes(self, values: list[float]) -> None:
        """ART averages with sum()/len() and numpy.std (ddof=0): equal up to float rounding."""
        s = SampleStats.of(values)
        assert s.mean() == pytest.approx(sum(values) / len(values), rel=1e-9, abs=1e-9)
        assert s.std_dev() == pytest.approx(float(np.std(values)), rel=1e-6, abs=1e-6)

    @settings(max_examples=examples(300), deadline=None)
    @given(values_st, st.randoms(use_true_random=False))
    def test_merge_is_exact_in_any_split_and_order(
        self, values: list[float], rnd: random.Random
    ) -> None:
        """Any partition of the values, merged in any order, gives the identical summary."""
        whole = SampleStats.of(values)
        shuffled = values[:]
        rnd.shuffle(shuffled)
        cuts = sorted(rnd.sample(range(1, len(values)), rnd.randint(0, len(values) - 1)))
        parts = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(values)], strict=True)]
        summaries = [SampleStats.of(p) for p in parts]
        rnd.shuffle(summaries)
        merged = summaries[0]
        for other in summaries[1:]:
            merged = merged.merge(other)
        assert merged == whole
        assert (merged.mean(), merged.std_dev()) == (whole.mean(), whole.std_dev())

    def test_extreme_magnitudes_stay_exact(self) -> None:
        """The largest and smallest floats together: no digit is lost, in either order."""
        values = [1.7976931348623157e308, 5e-324, -1.7976931348623157e308, 1.0]
        a = SampleStats.of(values[:2]).merge(SampleStats.of(values[2:]))
        b = SampleStats.of(values[::-1])
        assert a == b
        assert a.mean() == float((Fraction(1) + Fraction(Decimal("5e-324"))) / 4)

    @settings(max_examples=examples(500), deadline=None)
    @given(st.integers(0, 10**60), st.integers(1, 10**60))
    def test_sqrt_fraction_is_correctly_rounded(self, num: int, den: int) -> None:
        """Against statistics' own correctly rounded square root of a fraction."""
        exact = statistics._float_sqrt_of_frac(num, den) if num else 0.0  # type: ignore[attr-defined]
        assert sqrt_fraction(num, den) == exact

    def test_sqrt_fraction_perfect_squares(self) -> None:
        assert sqrt_fraction(9, 4) == 1.5
        assert sqrt_fraction(2, 1) == math.sqrt(2)
        assert sqrt_fraction(1, 10**400) == 1e-200


class TestWire:
    def test_round_trip(self) -> None:
        group = make_group(3, "train", {"costs/train/x": 0.5}, samples={"reward/a": [0.1, 0.7]})
        batch = LeafBatch("p", 1, (group,))
        back = decode_batch(encode_batch(batch))
        assert back == batch

    def test_groups_without_samples_keep_the_five_field_form(self) -> None:
        """Batches without samples are byte-identical to the format before samples existed."""
        import msgpack

        data = encode_batch(make_batch("p", 1, 0, "train", {"reward/x": 1.0}))
        assert len(msgpack.unpackb(data)[4][0]) == 5
        assert decode_batch(data).groups[0].samples == {}

    @pytest.mark.parametrize(
        ("key", "raw", "match"),
        [
            ("reward/a", [0, "0", "0", "0", "0"], "count"),
            ("reward/a", [2, "1", "1", "0.7", "0.2"], "Inconsistent"),  # min > max
            ("reward/a", [2, "3", "5", "1", "1"], "Inconsistent"),  # sum beyond n * max
            ("reward/a", [2, "2", "1", "1", "1"], "Inconsistent"),  # n * sum_sq < sum^2
            ("reward/a", [1, "1E-5000", "0", "0", "0"], "out of bounds"),
            ("reward/a", [1, "0.1", "0.01", "0.1000000000000000000001", "0.1"], "float min/max"),
            ("reward/a", [1, "NaN", "0", "0", "0"], "out of bounds"),
            ("reward/a", [1, "1", "1"], "count, sum"),
            ("costs/train/x", [1, "1", "1", "1", "1"], "summed per step"),
            ("noslash", [1, "1", "1", "1", "1"], "section prefix"),
        ],
    )
    def test_bad_samples_are_refused(self, key: str, raw: object, match: str) -> None:
        import msgpack

        good = msgpack.unpackb(encode_batch(make_batch("p", 1, 0, "train", {"reward/x": 1.0})))
        good[4][0].append({key: raw})
        with pytest.raises(WireFormatError, match=match):
            decode_batch(msgpack.packb(good, use_bin_type=True))


def _rows(state: AggregatorState, step: int) -> dict[str, float]:
    return state.close_step(step, "train").row


class TestAggregator:
    def test_workers_average_not_sum(self) -> None:
        """Four rollouts on two producers, 0.5 each: the row holds 0.5 (add_metric would give 2)."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 0, samples={"reward/judge_score": [0.5, 0.5]}))
        s.ingest(make_batch("q", 1, 0, samples={"reward/judge_score": [0.5, 0.5]}))
        row = _rows(s, 0)
        assert row["reward/judge_score"] == 0.5
        assert row["reward/judge_score_count"] == 4.0

    def test_resent_batch_counts_once(self) -> None:
        s = AggregatorState()
        batch = make_batch("p", 1, 0, samples={"reward/a": [1.0, 3.0]})
        s.ingest(batch)
        assert s.ingest(batch).duplicate
        row = _rows(s, 0)
        assert (row["reward/a"], row["reward/a_count"], row["reward/a_std_dev"]) == (2.0, 2.0, 1.0)

    def test_late_samples_go_into_the_next_row(self) -> None:
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 0, samples={"reward/a": [1.0]}))
        _rows(s, 0)
        s.ingest(make_batch("p", 2, 0, samples={"reward/a": [3.0]}))  # late: step 0 is closed
        s.ingest(make_batch("p", 3, 1, samples={"reward/a": [5.0]}))
        row = _rows(s, 1)
        assert (row["reward/a"], row["reward/a_count"]) == (4.0, 2.0)

    def test_summed_key_wins_a_clash_and_it_is_reported(self) -> None:
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 0, "train", {"reward/a": 2.0}))
        s.ingest(make_batch("q", 1, 0, samples={"reward/a": [1.0, 3.0]}))
        report = s.close_step(0, "train")
        assert report.row["reward/a"] == 2.0
        assert report.row["reward/a_count"] == 2.0
        assert ("reward/a", "reward/a") in report.conflicts

    def test_builder_key_wins_over_trainer_metric_as_in_art(self) -> None:
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 0, samples={"reward/a": [1.0, 3.0]}))
        assert s.close_step(0, "train", {"reward/a": 9.0}).row["reward/a"] == 2.0

    @settings(max_examples=examples(60), deadline=None)
    @given(
        st.lists(st.lists(finite, min_size=1, max_size=8), min_size=1, max_size=5),
        st.randoms(use_true_random=False),
        st.booleans(),
    )
    def test_any_batching_resends_and_restart_give_the_exact_row(
        self, per_producer: list[list[float]], rnd: random.Random, restart: bool
    ) -> None:
        """Producers split their values into batches, resend some, arrive shuffled; the
        aggregator may restart from a snapshot midway: the row is statistics.mean/pstdev."""
        batches = []
        for p, values in enumerate(per_producer):
            seq = 0
            i = 0
            while i < len(values):
                n = rnd.randint(1, len(values) - i)
                seq += 1
                batches.append(make_batch(f"p{p}", seq, 0, samples={"reward/a": values[i : i + n]}))
                i += n
        arrivals = batches + rnd.sample(batches, rnd.randint(0, len(batches)))
        rnd.shuffle(arrivals)
        s = AggregatorState()
        cut = rnd.randint(0, len(arrivals))
        for b in arrivals[:cut]:
            s.ingest(b)
        if restart:
            s = AggregatorState.restore(s.snapshot())
        for b in arrivals[cut:]:
            s.ingest(b)
        row = _rows(s, 0)
        values = [v for vs in per_producer for v in vs]
        mean, std = _reference(values)
        assert (row["reward/a"], row["reward/a_std_dev"]) == (mean, std)
        assert row["reward/a_count"] == len(values)
        assert (row["reward/a_min"], row["reward/a_max"]) == (min(values), max(values))

    def test_pending_samples_survive_a_checkpoint(self) -> None:
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 0, samples={"reward/a": [0.1, 0.2]}))
        blob, shards, _ = s.checkpoint_parts()
        back = AggregatorState.from_checkpoint(blob, shards)
        assert back.pending[(0, "train")].samples == s.pending[(0, "train")].samples
        assert _rows(back, 0)["reward/a"] == pytest.approx(0.15)

    def test_state_without_samples_is_unchanged_on_the_wire(self) -> None:
        """A buffer without samples keeps its six-field form (older snapshots still load)."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 0, "train", {"reward/x": 1.0}))
        assert len(s.to_wire()["pending"][0][2]) == 6


class TestBuilders:
    def test_in_process_builder_averages(self) -> None:
        b = arm.MetricsBuilder("train")
        for reward in (0.5, 0.5, 0.5, 0.5):
            b.add_sample("reward/judge_score", reward)
            b.add_metric("reward/judge_score_sum", reward)
        row = asyncio.run(b.flush())
        assert row["reward/judge_score"] == 0.5
        assert row["reward/judge_score_sum"] == 2.0  # add_metric keeps ART's summing semantics
        assert asyncio.run(b.flush()) == {}

    def test_summed_and_sampled_key_clash_raises_at_the_call(self) -> None:
        b = arm.MetricsBuilder("train")
        b.add_sample("reward/a", 1.0)
        with pytest.raises(MetricConflictError, match="add_sample"):
            b.add_metric("reward/a", 1.0)
        b.add_metric("reward/b", 1.0)
        with pytest.raises(MetricConflictError, match="add_metric"):
            b.add_sample("reward/b", 1.0)

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("costs/train/x", 1.0),
            ("time/step_wall_s", 1.0),
            ("data/step_num_scenarios", 1),
            ("reward/a", float("nan")),
            ("reward/a", True),
            ("reward", 1.0),
        ],
    )
    def test_invalid_sample_raises_naming_the_key(self, key: str, value: object) -> None:
        b = arm.MetricsBuilder("train")
        with pytest.raises(InvalidMetricError, match=key.split("/")[0]):
            b.add_sample(key, value)  # type: ignore[arg-type]
        assert asyncio.run(b.flush()) == {}

    def test_client_ships_samples_as_summaries(self) -> None:
        """The worker builder ships one exact summary per key (no Ray needed to build it)."""
        from art_ray_metrics.distributed.client import MetricsClient
        from art_ray_metrics.distributed.record import WorkerBuilder

        sent: list[bytes] = []

        class _Capture:  # a transport that keeps what is sent and delivers nothing
            lookup_error = None

            def ready(self) -> bool:
                return True

            def gone(self) -> bool:
                return False

            def resolve(self) -> bool:
                return True

            def send(self, data: bytes, durable: bool) -> object:
                sent.append(data)
                raise RuntimeError("no actor in this test")

            def confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
                return False

            def failed(self, exc: BaseException) -> None:
                pass

        client = MetricsClient(producer_id="w", transport=_Capture())  # type: ignore[arg-type]
        try:
            wb = WorkerBuilder(client, 2, "train", "train")
            for v in (0.25, 0.75, 1.0):
                wb.add_sample("reward/a", v)
            client.ship()
            (group,) = decode_batch(sent[0]).groups
            assert group == StepGroup(
                2, "train", samples={"reward/a": SampleStats.of([0.25, 0.75, 1.0])}
            )
        finally:
            client.stopped.set()
