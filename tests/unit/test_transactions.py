"""Barriers are transactions; poison input is refused at the door; limits (issue 12, pure core).

Each test here failed before its fix: a close that raised after changing the state, poison
values that made every later close raise, a signalling NaN that escaped as a bare ValueError,
unbounded keys and scopes.
"""

from __future__ import annotations

from decimal import Decimal

import msgpack
import pytest

from art_ray_metrics.core.state import AggregatorState, Limits
from art_ray_metrics.core.validate import check_value
from art_ray_metrics.core.wire import decode_batch, encode_batch
from art_ray_metrics.errors import InvalidMetricError, WireFormatError
from art_ray_metrics.testing import make_batch


def _raw_batch(producer: str, seq: int, step: int, scope: str, sums: dict[str, str]) -> bytes:
    """Bytes a producer with another build could send (values unchecked by our client)."""
    group = [step, scope, sums, [], b""]
    return msgpack.packb(["arm-batch", 1, producer, seq, [group]], use_bin_type=True)


class TestCloseIsATransaction:
    def test_zero_seconds_as_float_does_not_half_close(self) -> None:
        """time/step_actor_s = 1E-400 is 0.0 as a float: the row has no throughput, no raise."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 0, leaves={"costs/train/x": 0.5, "data/step_actor_tokens": 7}))
        row = s.close_step(0, metrics={"time/step_actor_s": Decimal("1E-400")}).row
        assert "throughput/avg_actor_tok_per_s" not in row
        assert row["costs/cum/all"] == 0.5
        assert s.cum.values["costs/cum/all"] == Decimal("0.5")

    def test_failed_close_leaves_the_state_as_it_was(self) -> None:
        """A close whose row cannot be computed raises and changes nothing."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 0, leaves={"costs/train/x": 0.5}, scenario_ids=["a"]))
        s.close_step(0)
        s.ingest(make_batch("p", 2, 1, leaves={"costs/train/x": 0.25}, scenario_ids=["b"]))
        s.ingest(make_batch("p", 3, 0, leaves={"costs/gpu": 0.125}))  # late
        s.cum.values["data/cum/actor_tokens"] = Decimal("1e400")  # the row cannot be a float
        before = s.snapshot()
        with pytest.raises(InvalidMetricError, match="data/cum/actor_tokens"):
            s.close_step(1, metrics={"data/step_actor_tokens": 1})
        assert s.snapshot() == before
        assert (1, "train") in s.pending
        assert (0, "train") in s.late  # late leaves are held per (step, scope)
        del s.cum.values["data/cum/actor_tokens"]
        row = s.close_step(1).row
        assert row["costs/cum/all"] == 0.875
        assert row["data/cum/num_unique_scenarios"] == 2


class TestPoisonRefusedAtIngest:
    def test_two_producers_summing_past_a_float(self) -> None:
        """Each leaf fits; their sum would not: the second producer's key is refused (named in
        the result, counted on its step's row), the rest of its batch applies, later closes
        work."""
        s = AggregatorState()
        s.ingest_bytes(_raw_batch("a", 1, 0, "train", {"reward/x": "1e300"}))
        result = s.ingest_bytes(
            _raw_batch("b", 1, 0, "train", {"reward/x": "1e300", "reward/y": "2"})
        )
        ((step, scope, key, reason),) = result.refused
        assert (step, scope, key) == (0, "train", "reward/x")
        assert "beyond" in reason
        assert s.counters["rejected_batches"] == 0
        assert s.producers[("b", "")].applied.seen(1)  # a resend is a duplicate
        report = s.close_step(0)
        assert report.row["reward/x"] == 1e300
        assert report.row["reward/y"] == 2.0
        assert report.lost_leaves == 1
        assert s.close_step(1).row == {"training_step": 1.0}

    def test_one_leaf_beyond_the_bound(self) -> None:
        """1e308 is a finite float but sums of it are not: refused at the producer and the
        aggregator alike."""
        with pytest.raises(InvalidMetricError, match="within"):
            check_value("reward/x", 1e308)
        s = AggregatorState()
        with pytest.raises(WireFormatError):
            s.ingest_bytes(_raw_batch("p", 1, 0, "train", {"reward/x": "1e308"}))

    def test_trainer_pass_through_values_are_not_bounded(self) -> None:
        """A diverging loss of 1e305 is a value to show, not to sum."""
        s = AggregatorState()
        assert s.close_step(0, metrics={"loss/train": 1e305}).row["loss/train"] == 1e305


class TestWire:
    @pytest.mark.parametrize("value", ["sNaN", "-sNaN", "NaN", "Infinity"])
    def test_signalling_nan_is_a_wire_format_error(self, value: str) -> None:
        """Decimal('sNaN') cannot become a float: refused as WireFormatError and counted."""
        data = _raw_batch("p", 1, 0, "train", {"reward/x": value})
        with pytest.raises(WireFormatError, match="reward/x"):
            decode_batch(data)
        s = AggregatorState()
        with pytest.raises(WireFormatError):
            s.ingest_bytes(data)
        assert s.counters["rejected_batches"] == 1

    @pytest.mark.parametrize("scope", ["val-hard", "a\\b", "x/y"])
    def test_scope_that_no_barrier_can_close_is_refused(self, scope: str) -> None:
        """A scope no split maps to would stay pending forever."""
        with pytest.raises(WireFormatError, match="scope"):
            decode_batch(_raw_batch("p", 1, 0, scope, {"reward/x": "1"}))


class TestLimits:
    def test_keys_per_step(self) -> None:
        """More distinct keys in one (step, scope) than allowed: the keys beyond the bound are
        refused (named, counted), the rest of the batch applies."""
        s = AggregatorState(Limits(max_keys_per_step=3))
        s.ingest(make_batch("p", 1, 0, leaves={"reward/a": 1, "reward/b": 1}))
        s.ingest(make_batch("p", 2, 0, leaves={"reward/a": 1, "reward/c": 1}))
        result = s.ingest(make_batch("q", 1, 0, leaves={"reward/a": 5, "reward/d": 1}))
        ((_, _, key, reason),) = result.refused
        assert key == "reward/d"
        assert "max_keys_per_step=3" in reason
        assert (s.counters["limit_rejections"], s.counters["rejected_batches"]) == (1, 0)
        assert s.pending[(0, "train")].sums == {
            "reward/a": Decimal(7),
            "reward/b": Decimal(1),
            "reward/c": Decimal(1),
        }
        assert s.pending[(0, "train")].lost_leaves == 1
        assert s.ingest(make_batch("q", 2, 1, leaves={"reward/d": 1})).refused == ()

    def test_keys_per_run_survive_a_restore(self) -> None:
        """The run's distinct keys are part of the state."""
        s = AggregatorState(Limits(max_keys_per_run=2))
        s.ingest(make_batch("p", 1, 0, leaves={"reward/a": 1, "costs/train/b": 1}))
        s.close_step(0)
        restored = AggregatorState.restore(s.snapshot())
        restored.limits = Limits(max_keys_per_run=2)
        assert restored.ingest(make_batch("p", 2, 1, leaves={"reward/a": 2})).refused == ()
        result = restored.ingest(make_batch("p", 3, 1, leaves={"reward/new": 2}))
        assert [(k, "max_keys_per_run=2" in r) for _, _, k, r in result.refused] == [
            ("reward/new", True)
        ]

    def test_open_scopes(self) -> None:
        """Producers recording for splits nobody closes cannot open scopes without bound: a
        group of a scope beyond the bound is refused whole."""
        s = AggregatorState(Limits(max_open_scopes=2))
        s.ingest(make_batch("p", 1, 0, "train", {"reward/a": 1}))
        s.ingest(make_batch("p", 2, 0, "eval", {"reward/a": 1}))
        result = s.ingest(make_batch("p", 3, 0, "rollout_b", {"reward/a": 1}))
        ((_, scope, key, reason),) = result.refused
        assert (scope, key) == ("rollout_b", None)
        assert "max_open_scopes=2" in reason
        assert (0, "rollout_b") not in s.pending
        s.close_step(0, "val")
        assert s.ingest(make_batch("p", 4, 0, "rollout_b", {"reward/a": 1})).refused == ()

    def test_unbounded_by_default(self) -> None:
        """The pure state has no limits unless given (the actor passes its configuration)."""
        s = AggregatorState()
        s.ingest(make_batch("p", 1, 0, leaves={f"reward/k{i}": 1 for i in range(2000)}))
        assert len(s.pending[(0, "train")].sums) == 2000
        assert encode_batch(make_batch("p", 1, 0)) != b""


class TestDerivedGauges:
    def test_throughput_that_overflows_is_omitted(self) -> None:
        """Tokens over a subnormal number of seconds: no throughput key, the barrier works."""
        s = AggregatorState()
        s.ingest(
            make_batch(
                "p", 1, 0, leaves={"time/step_actor_s": 2.2e-313, "data/step_actor_tokens": 1}
            )
        )
        row = s.close_step(0).row
        assert "throughput/avg_actor_tok_per_s" not in row
        assert row["data/cum/actor_tokens"] == 1.0
