"""MetricsBuilder: ART's in-process API, results and state format."""

from __future__ import annotations

import asyncio
import inspect
import json
from decimal import Decimal
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from art_ray_metrics import InvalidMetricError, MetricConflictError, MetricsBuilder, track_api_cost
from art_ray_metrics.core.state import StepBuffer
from art_ray_metrics.core.tape import PendingLeaves
from tests.hypothesis_profiles import examples


def _flush(b: MetricsBuilder) -> dict[str, float]:
    return asyncio.run(b.flush())


class TestArtApi:
    # ART 0.5.18's public signatures (copied as data, to detect drift in ours)
    ART_SIGNATURES: ClassVar[dict[str, object]] = {
        "add_cost": "(self, path: 'str', usd: 'float') -> 'None'",
        "add_metric": "(self, key: 'str', value: 'float') -> 'None'",
        "add_data": ["step_num_scenarios", "step_actor_tokens", "scenario_ids"],
        "add_user_timing": ["step_wall_s", "step_actor_s", "step_eval_s"],
        "add_idle_times": ["step_trainer_idle_s", "step_actor_idle_s"],
        "add_response_cost": [
            "source",
            "response",
            "provider",
            "model_name",
            "prompt_price_per_million",
            "completion_price_per_million",
            "cached_prompt_price_per_million",
            "cache_creation_price_per_million",
            "cache_read_price_per_million",
        ],
        "register_model_pricing": [
            "model_name",
            "prompt_per_million",
            "completion_per_million",
            "cached_prompt_per_million",
            "cache_creation_per_million",
            "cache_read_per_million",
        ],
        "register_cost_extractor": ["provider", "extractor"],
        "for_cost_context": ["cost_context", "buffer_scope"],
        "measure": ["key"],
        "flush": [],
        "activate": [],
        "activate_context": [],
        "state_dict": [],
        "load_state_dict": ["state"],
    }

    # the names ART's next release uses (after 0.5.18), keyword-only aliases in ours
    NEWER_ALIASES: ClassVar[dict[str, list[str]]] = {
        "add_data": ["step_rollout_tokens"],
        "add_user_timing": ["step_rollout_s"],
        "add_idle_times": ["step_rollout_idle_s"],
    }

    @pytest.mark.parametrize("name", sorted(ART_SIGNATURES))
    def test_method_parameters_match_art(self, name: str) -> None:
        """Every ART method exists with ART's parameter names, in order (then the keyword-only
        aliases of ART's next release)."""
        expected = self.ART_SIGNATURES[name]
        params = list(inspect.signature(getattr(MetricsBuilder, name)).parameters)[1:]
        if isinstance(expected, str):
            expected = [p.split(":")[0].strip() for p in expected[7:].split(")")[0].split(",")]
        assert params == [*expected, *self.NEWER_ALIASES.get(name, [])]

    def test_flush_is_async(self) -> None:
        """flush() is a coroutine function, as in ART."""
        assert inspect.iscoroutinefunction(MetricsBuilder.flush)

    def test_art_worked_example(self) -> None:
        """ART's rollup test through the public API."""
        b = MetricsBuilder("train")
        b.add_cost("train/llm_judge/general", 0.08)
        b.add_cost("train/llm_judge/hallucination", 0.04)
        b.add_cost("train/tinker_train", 1.20)
        b.add_cost("train/tinker_inference", 0.45)
        b.add_cost("eval/llm_judge/correctness", 0.06)
        row = _flush(b)
        assert (row["costs/train"], row["costs/eval"], row["costs/all"]) == (1.77, 0.06, 1.83)
        assert row["costs/cum/train/llm_judge"] == 0.12

    def test_cumulative_across_flushes_and_empty_flush(self) -> None:
        """Cumulative twins continue across flushes; an empty flush is {}."""
        b = MetricsBuilder("train")
        b.add_cost("train/x", 0.1)
        _flush(b)
        b.add_cost("train/x", 0.2)
        row = _flush(b)
        assert row["costs/cum/train/x"] == pytest.approx(0.3)
        assert row["costs/cum/all"] == 0.3
        assert _flush(b) == {}

    def test_throughput_and_idle(self) -> None:
        """ART's throughput test: trainer 40/4 -> 10, actor 10/2 -> 5; idle cumulatives."""
        b = MetricsBuilder("train")
        b.add_metric("data/step_trainer_tokens", 40)
        b.add_metric("time/step_trainer_s", 4)
        b.add_data(step_actor_tokens=10)
        b.add_user_timing(step_actor_s=2, step_wall_s=5)
        b.add_idle_times(step_trainer_idle_s=1, step_actor_idle_s=0.5)
        row = _flush(b)
        assert row["throughput/avg_trainer_tok_per_s"] == 10.0
        assert row["throughput/avg_actor_tok_per_s"] == 5.0
        assert row["time/cum/wall_s"] == 5.0
        assert row["throughput/cum/trainer_idle_s"] == 1.0
        assert row["throughput/cum/actor_idle_s"] == 0.5

    def test_scopes_and_shared_cumulative(self) -> None:
        """for_cost_context shares cumulative state; buffers are per scope."""
        train = MetricsBuilder("train")
        ev = train.for_cost_context("eval")
        assert train.for_cost_context("train") is train
        train.add_cost("train/j", 1.0)
        ev.add_cost("eval/j", 0.5)
        assert _flush(ev)["costs/all"] == 0.5
        row = _flush(train)
        assert row["costs/all"] == 1.0
        assert row["costs/cum/all"] == 1.5

    def test_unique_scenarios(self) -> None:
        """Scenario ids compare as str and count once per run."""
        b = MetricsBuilder("train")
        b.add_data(scenario_ids=[1, "1", "a"])
        assert _flush(b)["data/cum/num_unique_scenarios"] == 2.0
        b.add_data(step_num_scenarios=2, scenario_ids=["a", "b"])
        row = _flush(b)
        assert row["data/cum/num_unique_scenarios"] == 3.0
        assert row["data/cum/num_scenarios"] == 2.0

    def test_measure_records_when_block_raises(self) -> None:
        """measure() adds the elapsed seconds even when the block raises."""
        b = MetricsBuilder("train")
        with pytest.raises(RuntimeError), b.measure("time/step_actor_s"):
            raise RuntimeError("boom")
        assert _flush(b)["time/step_actor_s"] >= 0.0

    def test_activation(self) -> None:
        """activate_context makes the builder active and restores the previous one."""
        b = MetricsBuilder("train")
        with pytest.raises(LookupError):
            MetricsBuilder.get_active()
        with b.activate_context() as active:
            assert active is b
            assert MetricsBuilder.get_active() is b
        with pytest.raises(LookupError):
            MetricsBuilder.get_active()

    def test_track_api_cost_records_into_active_builder(self) -> None:
        """The decorator prices a response into the active builder's cost context."""
        b = MetricsBuilder("train")
        b.register_model_pricing("m", prompt_per_million=1.0, completion_per_million=2.0)

        with b.activate_context():  # pricing registered on the builder is seen at decoration

            @track_api_cost(source="llm_judge/q", provider="openai", model_name="m")
            def judge() -> dict[str, object]:
                return {"usage": {"prompt_tokens": 100, "completion_tokens": 50}}

        judge()  # no active builder: runs, records nothing
        with b.activate_context():
            judge()
        row = _flush(b)
        assert row["costs/train/llm_judge/q"] == 0.0002


class TestValidation:
    @pytest.mark.parametrize(
        ("call", "match"),
        [
            (lambda b: b.add_metric("nosection", 1.0), "section prefix"),
            (lambda b: b.add_metric("costs/cum/x", 1.0), "reserved cumulative"),
            (lambda b: b.add_metric("costs_prefill", 1.0), "costs/train/prefill"),
            (lambda b: b.add_cost("", 1.0), "non-empty cost path"),
            (lambda b: b.add_cost("train/x", float("nan")), "finite"),
            (lambda b: b.add_cost("train/x", float("inf")), "finite"),
            (lambda b: b.add_cost("train/x", True), "finite"),
            (lambda b: b.add_cost("train/x", "0.1"), "finite"),
            (lambda b: b.add_cost("train/x", -0.5), "non-negative"),
            (lambda b: b.add_data(scenario_ids="abc"), "single string"),
            (lambda b: b.for_cost_context(" "), "non-empty cost_context"),
        ],
        ids=[
            "no-section",
            "cum",
            "legacy",
            "empty-path",
            "nan",
            "inf",
            "bool",
            "str",
            "negative-cost",
            "str-ids",
            "empty-context",
        ],
    )
    def test_rejected_with_clear_error(self, call: object, match: str) -> None:
        """Bad input raises InvalidMetricError (a ValueError) and records nothing."""
        b = MetricsBuilder("train")
        b.add_cost("train/ok", 1.0)
        with pytest.raises(InvalidMetricError, match=match):
            call(b)  # type: ignore[operator]
        assert _flush(b)["costs/all"] == 1.0

    def test_ancestor_descendant_conflicts_name_both_keys(self) -> None:
        """A leaf that is an ancestor or a descendant of a pending leaf raises, naming both."""
        b = MetricsBuilder("train")
        b.add_cost("train/x", 1.0)
        with pytest.raises(
            MetricConflictError, match=r"'costs/train'.*ancestor of 'costs/train/x'"
        ):
            b.add_cost("train", 1.0)
        with pytest.raises(MetricConflictError, match=r"'costs/train/x/y'.*'costs/train/x'"):
            b.add_cost("train/x/y", 1.0)
        with pytest.raises(ValueError):
            b.add_cost("train/x/z", 1.0)
        assert _flush(b)["costs/all"] == 1.0
        b.add_cost("train/x/y", 2.0)  # fine in the next step
        assert _flush(b)["costs/train/x"] == 2.0


class TestState:
    def test_loads_art_state_dict(self) -> None:
        """An ART run's saved {cum_state, unique_scenario_ids} continues exactly."""
        art_state = {
            "cum_state": {
                "costs/cum/all": 1.5,
                "costs/cum/train": 1.5,
                "data/cum/actor_tokens": 10.0,
            },
            "unique_scenario_ids": ["a", "b"],
        }
        b = MetricsBuilder("train")
        b.add_cost("train/pending", 9.0)  # dropped on load, as in ART
        b.load_state_dict(json.loads(json.dumps(art_state)))
        b.add_cost("train/x", 0.25)
        b.add_data(scenario_ids=["b", "c"])
        row = _flush(b)
        assert row["costs/cum/all"] == 1.75
        assert row["data/cum/num_unique_scenarios"] == 3.0
        assert "costs/train/pending" not in row

    def test_round_trip_is_json_and_exact(self) -> None:
        """state_dict() is JSON-serialisable and restores exact decimals and ids."""
        a = MetricsBuilder("train")
        for _ in range(3):
            a.add_cost("train/x", 0.1)
            a.add_data(scenario_ids=["s1", "s2"])
            _flush(a)
        b = MetricsBuilder("train")
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        for m in (a, b):
            m.add_cost("train/x", 0.1)
            m.add_data(scenario_ids=["s3"])
        assert _flush(a) == _flush(b)
        assert b.state_dict()["cum_state_exact"]["costs/cum/all"] == "0.4"


_SEGMENTS = st.sampled_from(["a", "b", "c"])
_KEYS = st.builds(
    lambda section, rest: "/".join([section, *rest]),
    st.sampled_from(["costs", "reward"]),
    st.lists(_SEGMENTS, min_size=1, max_size=4),
)


class TestPendingLeaves:
    """The pending leaves raise and sum exactly as the strict StepBuffer does."""

    @settings(max_examples=examples(300), deadline=None)
    @given(st.lists(st.tuples(_KEYS, st.integers(0, 9)), max_size=40))
    def test_same_conflicts_and_sums_as_step_buffer(self, writes: list[tuple[str, int]]) -> None:
        pending, reference = PendingLeaves(), StepBuffer()
        for key, value in writes:
            expected = got = None
            try:
                reference.add(key, Decimal(value))
            except MetricConflictError as exc:
                expected = str(exc)
            try:
                pending.record(key, value)
            except MetricConflictError as exc:
                got = str(exc)
            assert got == expected
        assert pending.sums() == reference.sums

    def test_a_rejected_key_registers_nothing(self) -> None:
        """A conflict leaves no ancestor behind: the parent can still become a leaf."""
        pending = PendingLeaves()
        pending.record("costs/train/judge", 0.25)
        with pytest.raises(MetricConflictError, match="'costs/train/judge' is already a leaf"):
            pending.record("costs/train/judge/new/deep", 1.0)
        assert (pending.leaves.keys(), pending.ancestors.keys()) == (
            {"costs/train/judge"},
            {"costs/train"},
        )
        pending.record("costs/train/other/deep", 0.5)
        assert pending.sums() == {
            "costs/train/judge": Decimal("0.25"),
            "costs/train/other/deep": Decimal("0.5"),
        }


class TestReplay:
    def test_a_replay_records_every_kind_of_leaf_exactly(self) -> None:
        """``LeafRecorder.replay`` hands sums, scenario ids, per-response costs and samples to
        another recorder through its hooks: what it holds afterwards equals the source."""
        from art_ray_metrics.integrations.art_leaves import TrainerLeaves
        from art_ray_metrics.spend.pricing import PricingRegistry

        source: dict[str, PendingLeaves] = {}
        first = TrainerLeaves("train", "train", source, PricingRegistry())
        first.add_cost("train/judge", 0.1)
        first.add_cost("train/judge", 0.2)  # summed exactly: 0.3, not 0.30000000000000004
        first.add_data(scenario_ids=["s-1", "é-2"])
        first._add_cost_leaf("train/api", Decimal("0.015"), response_id="resp-1")
        first.add_sample("reward/score", 0.5)
        first.add_sample("reward/score", 1.0)
        first.add_metric("loss/train", 2.5)

        target: dict[str, PendingLeaves] = {}
        TrainerLeaves("train", "train", target, PricingRegistry()).replay(source["train"])
        got, want = target["train"], source["train"]
        assert got.sums() == want.sums()
        assert got.sums()["costs/train/judge"] == Decimal("0.3")
        assert got.scenarios == want.scenarios
        assert len(got.scenarios) == 2
        assert got.keyed == want.keyed
        assert len(got.keyed) == 1
        assert got.samples == want.samples == {"reward/score": [0.5, 1.0]}
