"""Taxonomy: routing, backend names, cumulative twins and the validation table."""

from __future__ import annotations

import math

import pytest

from art_ray_metrics.core import keys as K
from art_ray_metrics.core import validate as V
from art_ray_metrics.errors import InvalidMetricError, MetricsError


class TestRouting:
    @pytest.mark.parametrize(
        ("key", "split", "routed"),
        [
            ("reward/mean", "train", "reward/mean"),
            ("custom", "train", "train/custom"),
            ("rewardish/x", "train", "train/rewardish/x"),
            ("val/acc", "train", "val/acc"),
            ("custom", "val", "val/custom"),
            ("reward/mean", "rollout", "rollout/reward/mean"),
            ("costs/train/x", "test", "costs/train/x"),
        ],
        ids=lambda v: str(v),
    )
    def test_route_key_matches_art(self, key: str, split: str, routed: str) -> None:
        """Keys keep their name under a section or split, else get the split prefix."""
        assert K.route_key(key, split) == routed

    @pytest.mark.parametrize(
        ("name", "key"),
        [
            ("loss", "loss/train"),
            ("policy_loss", "loss/train"),
            ("entropy", "loss/entropy"),
            ("kl_div", "loss/kl_div"),
            ("grad_norm", "loss/grad_norm"),
            ("learning_rate", "loss/learning_rate"),
            ("num_groups_submitted", "data/step_num_groups_submitted"),
            ("num_groups_trainable", "data/step_num_groups_trainable"),
            ("num_trajectories", "data/step_num_trajectories"),
            ("num_trainable_tokens", "data/step_trainer_tokens"),
            ("train_tokens", "data/step_trainer_tokens"),
            ("reward", "reward"),
        ],
    )
    def test_backend_names(self, name: str, key: str) -> None:
        """Backend names map into the taxonomy as in ART."""
        assert K.canonical_backend_key(name) == key

    def test_scopes(self) -> None:
        """val and test share the eval buffer; other splits are their own scope."""
        assert [K.scope_for_split(s) for s in ("train", "val", "test", "x")] == [
            "train",
            "eval",
            "eval",
            "x",
        ]


class TestCumulative:
    @pytest.mark.parametrize(
        ("key", "twin"),
        [
            ("costs/all", "costs/cum/all"),
            ("costs/train/llm_judge", "costs/cum/train/llm_judge"),
            ("time/step_wall_s", "time/cum/wall_s"),
            ("data/step_actor_tokens", "data/cum/actor_tokens"),
            ("data/other", "data/cum/other"),
        ],
    )
    def test_twin_names(self, key: str, twin: str) -> None:
        """The twin drops a leading step_ and inserts cum as second segment."""
        assert K.to_cumulative(key) == twin

    def test_managed_predicate(self) -> None:
        """Only costs/, time/step_, data/step_, throughput/step_ keys are builder-managed."""
        managed = ["costs/gpu", "time/step_x", "data/step_x", "throughput/step_x"]
        plain = ["time/wall", "data/x", "throughput/avg", "reward/x", "loss/train"]
        assert all(K.is_builder_managed(k) for k in managed)
        assert not any(K.is_builder_managed(k) for k in plain)


class TestValidation:
    def test_no_section(self) -> None:
        """A key without '/' is refused and named."""
        with pytest.raises(InvalidMetricError, match=r"section prefix.*'accuracy'"):
            V.validate_key("accuracy")

    def test_reserved_cum(self) -> None:
        """The second segment 'cum' is reserved."""
        with pytest.raises(InvalidMetricError, match="reserved cumulative"):
            V.validate_key("costs/cum/x")

    @pytest.mark.parametrize(
        ("key", "hint"),
        [("costs_prefill", "costs/train/prefill"), ("costs_total", "costs/train/")],
    )
    def test_legacy_cost_keys(self, key: str, hint: str) -> None:
        """Legacy costs_* keys name their hierarchical replacement."""
        with pytest.raises(InvalidMetricError, match=hint):
            V.validate_key(key)

    @pytest.mark.parametrize("key", ["", "/x", "x/", "a//b", None, 3, ["a/b"]])
    def test_malformed(self, key: object) -> None:
        """Empty segments and non-strings are refused."""
        with pytest.raises(InvalidMetricError):
            V.validate_key(key)

    @pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None, [1]])
    def test_bad_values(self, value: object) -> None:
        """NaN, inf, bool and non-numbers are refused, naming the key."""
        with pytest.raises(InvalidMetricError, match="reward/x"):
            V.check_value("reward/x", value)

    def test_negative_cost(self) -> None:
        """A negative cost is refused; a negative reward is fine."""
        with pytest.raises(InvalidMetricError, match="non-negative"):
            V.check_value("costs/train/x", -0.01)
        assert V.check_value("reward/x", -1.5) == -1.5

    def test_errors_are_value_errors(self) -> None:
        """Ported `except ValueError` blocks keep working."""
        with pytest.raises(ValueError):
            V.validate_key("bad")
        assert issubclass(InvalidMetricError, MetricsError)


class TestSumBound:
    """The worker's ``check_sum`` and the aggregator's admission compare a running sum with the
    same exact bound, so they agree on sums that round to it as floats."""

    def test_exact_at_the_bound(self) -> None:
        from decimal import Decimal

        bound = Decimal(V.MAX_ABS_VALUE)  # the float's exact value
        assert bound == V.MAX_ABS_SUM
        for total in (bound, -bound, V.MAX_ABS_VALUE, Decimal("1e300"), 0):
            V.check_sum("time/step_x", total)
        just_above = bound.next_plus()
        assert just_above > bound
        assert float(just_above) == V.MAX_ABS_VALUE  # a float check would let it through
        refused: tuple[object, ...] = (just_above, -just_above, Decimal("inf"), Decimal("nan"))
        for total in (*refused, 10**301, "x"):
            with pytest.raises(InvalidMetricError, match="time/step_x"):
                V.check_sum("time/step_x", total)

    def test_the_aggregator_refuses_the_same_sums(self) -> None:
        """A pending 1e300 plus 6e283 is past the exact bound but rounds to 1e300 as a float:
        both sides refuse it; plus 1e283 both accept."""
        from decimal import Decimal

        from art_ray_metrics.core.records import LeafBatch
        from art_ray_metrics.core.state import AggregatorState
        from art_ray_metrics.testing import make_group

        def batch(seq: int, value: float) -> LeafBatch:
            group = make_group(0, "train", {"time/step_x": value})
            return LeafBatch("p", seq, (group,), "i" * 16, seq - 1, 0)

        over, under = Decimal("1e300") + Decimal("6e283"), Decimal("1e300") + Decimal("1e283")
        assert float(over) == V.MAX_ABS_VALUE
        for sign in (1, -1):
            state = AggregatorState()
            state.ingest(batch(1, sign * 1e300))
            refused = state.ingest(batch(2, sign * 6e283)).refused  # that key only is refused
            assert [(r[2], "time/step_x" in r[3]) for r in refused] == [("time/step_x", True)]
            with pytest.raises(InvalidMetricError, match="time/step_x"):
                V.check_sum("time/step_x", sign * over)
            assert state.ingest(batch(3, sign * 1e283)).refused == ()
            V.check_sum("time/step_x", sign * under)
