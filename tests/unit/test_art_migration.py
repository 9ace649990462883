"""Moving an existing ART run onto the aggregator, and ART's next API, without Ray or ART:
adopting ART's totals (art_ray_metrics.core.adopt), a rewind back to them, pass-through
``cum`` keys of other sections, the ``step_rollout_*`` aliases of the builder, and the W&B
sink's ``time/wall_clock_sec`` axis and config updates (real wandb, offline)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from art_ray_metrics import InvalidMetricError, MetricsBuilder
from art_ray_metrics.core import adopt as A
from art_ray_metrics.core.dedupe import digest
from art_ray_metrics.core.meta import AggregatorMeta
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.testing import make_batch
from tests.hypothesis_profiles import examples
from tests.unit.test_rewind import Shell

ART_CUM = {"costs/cum/all": 0.08, "costs/cum/train": 0.08, "costs/cum/train/judge": 0.08}
"""ART's ``cum_state`` after steps 0-1 of four $0.01 judge costs each (as ART sums floats)."""


def _ids(step: int) -> list[str]:
    return [f"scenario-{4 * step + i}" for i in range(4)]


def _step(state: AggregatorState, step: int, seq: int) -> dict[str, float]:
    leaves = [("costs/train/judge", 0.01)] * 4
    state.ingest(make_batch("w", seq, step, leaves=leaves, scenario_ids=_ids(step)))
    return state.close_step(step, "train").row


class TestAdopt:
    def test_the_issue_scenario_gives_twelve_cents_and_twelve_scenarios(self) -> None:
        state = AggregatorState()
        assert A.is_fresh(state)
        old_ids = _ids(0) + _ids(1)
        A.adopt(state, A.check_cumulative(ART_CUM), [digest(i) for i in old_ids])
        row = _step(state, 2, 1)
        assert row["costs/cum/all"] == 0.12
        assert row["costs/cum/train/judge"] == 0.12
        assert row["data/cum/num_unique_scenarios"] == 12.0
        assert state.cum.values["costs/cum/all"] == Decimal(
            "0.12"
        )  # exact, not 0.12000000000000001

    def test_a_state_of_its_own_is_kept_and_the_difference_named(self) -> None:
        state = AggregatorState()
        _step(state, 0, 1)
        assert not A.is_fresh(state)
        values = A.check_cumulative(ART_CUM)
        with pytest.raises(ValueError, match="fresh"):
            A.adopt(state, values, [])
        before = dict(state.cum.values)
        line = A.mismatch(state, values, [digest(i) for i in _ids(0) + _ids(1)])
        assert line is not None
        assert "\n" not in line
        assert "first costs/cum/all: 0.08 there, 0.04 here" in line
        assert "unique scenarios 8 there, 4 here (4 not here)" in line
        assert state.cum.values == before

    def test_the_same_state_is_no_mismatch(self) -> None:
        state = AggregatorState()
        values = A.check_cumulative(ART_CUM)
        digests = [digest(i) for i in _ids(0)]
        A.adopt(state, values, digests)
        assert not A.is_fresh(state)  # a second attach compares instead of adopting again
        # ART's float sums differ from exact ones in the last digits: still the same state
        close = A.check_cumulative({**ART_CUM, "costs/cum/all": 0.08000000000000002})
        assert A.mismatch(state, close, list(reversed(digests))) is None

    @pytest.mark.parametrize(
        ("values", "match"),
        [
            ({"costs/all": 0.1}, r"cumulative key .*'costs/all' = 0\.1"),
            ({"costs/cum/all": float("nan")}, r"costs/cum/all"),
            ({"costs/cum/all": -1.0}, r"costs/cum/all.*-1\.0"),
            ({"costs/cum/all": "dollars"}, r"number for 'costs/cum/all' but got 'dollars'"),
            ({"data/cum/actor_tokens": True}, r"data/cum/actor_tokens"),
        ],
    )
    def test_bad_values_name_key_and_value(self, values: dict[str, object], match: str) -> None:
        with pytest.raises(InvalidMetricError, match=match):
            A.check_cumulative(values)

    def test_rewind_before_the_first_close_returns_to_the_adopted_state(self) -> None:
        shell = Shell()
        A.adopt(shell.state, A.check_cumulative(ART_CUM), [digest("old")])
        first = shell.step(2, ("a",))
        shell.step(3, ("b",))
        shell.rewind(1)  # the trainer went back to ART's checkpoint of step 1
        assert shell.state.cum.values == A.check_cumulative(ART_CUM)
        assert len(shell.state.cum.scenarios) == 1
        assert shell.step(2, ("a",)) == first

    def test_meta_round_trip_keeps_baseline_and_wandb_run(self) -> None:
        meta = AggregatorMeta(
            baseline_cum={"costs/cum/all": Decimal("0.08")},
            wandb_run={"project": "p", "name": "m", "entity": None, "config": {"lr": 1e-5}},
        )
        again = AggregatorMeta.from_dict(meta.to_dict())
        assert again.baseline_cum == {"costs/cum/all": Decimal("0.08")}
        assert again.wandb_run == meta.wandb_run
        assert AggregatorMeta.from_dict(AggregatorMeta().to_dict()).wandb_run is None

    @settings(max_examples=examples(40), deadline=None)
    @given(
        cents=st.dictionaries(
            st.sampled_from(["costs/cum/all", "costs/cum/train", "data/cum/actor_tokens"]),
            st.integers(0, 10**6),
        ),
        old=st.sets(st.integers(0, 30), max_size=20),
        new=st.sets(st.integers(0, 30), max_size=20),
        cost=st.integers(1, 10**4),
    )
    def test_adopted_totals_continue_exactly(
        self, cents: dict[str, int], old: set[int], new: set[int], cost: int
    ) -> None:
        """Any ART state plus one step: every total is the old one plus the step, exactly, and
        the unique count is that of the union of the ids."""
        values = {k: v / 100 for k, v in cents.items()}
        state = AggregatorState()
        A.adopt(state, A.check_cumulative(values), [digest(f"s{i}") for i in old])
        leaves = {"costs/train/x": cost / 100}
        state.ingest(make_batch("w", 1, 5, leaves=leaves, scenario_ids=[f"s{i}" for i in new]))
        row = state.close_step(5, "train").row
        step_usd = Decimal(cost) / 100
        for key in ("costs/cum/all", "costs/cum/train"):
            want = Decimal(cents.get(key, 0)) / 100 + step_usd
            assert state.cum.values[key] == want
            assert row[key] == float(want)
        if new:
            assert row["data/cum/num_unique_scenarios"] == len(old | new)


class TestPassThroughCum:
    def test_a_trainer_cum_key_of_another_section_passes_unchanged(self) -> None:
        state = AggregatorState()
        row = state.close_step(0, "train", {"discarded/cum/stale_groups": 3.0}).row
        assert row["discarded/cum/stale_groups"] == 3.0

    @pytest.mark.parametrize(
        "key", ["costs/cum/all", "time/cum/wall_s", "data/cum/x", "throughput/cum/actor_idle_s"]
    )
    def test_the_aggregators_own_cumulatives_are_still_refused(self, key: str) -> None:
        with pytest.raises(InvalidMetricError, match="reserved cumulative"):
            AggregatorState().close_step(0, "train", {key: 1.0})


class TestRolloutAliases:
    def test_newer_names_record_under_the_keys_in_use(self) -> None:
        b = MetricsBuilder("train")
        b.add_data(step_rollout_tokens=120)
        b.add_user_timing(step_rollout_s=1.5)
        b.add_idle_times(step_rollout_idle_s=0.25)
        row = asyncio.run(b.flush())
        assert row["data/step_actor_tokens"] == 120
        assert row["time/step_actor_s"] == 1.5
        assert row["throughput/step_actor_idle_s"] == 0.25
        assert row["throughput/cum/actor_idle_s"] == 0.25

    @pytest.mark.parametrize(
        ("method", "kwargs"),
        [
            ("add_data", {"step_actor_tokens": 1, "step_rollout_tokens": 2}),
            ("add_user_timing", {"step_actor_s": 1.0, "step_rollout_s": 2.0}),
            ("add_idle_times", {"step_actor_idle_s": 1.0, "step_rollout_idle_s": 2.0}),
        ],
    )
    def test_both_names_at_once_are_refused(self, method: str, kwargs: dict[str, float]) -> None:
        with pytest.raises(InvalidMetricError, match="Expected one of"):
            getattr(MetricsBuilder("train"), method)(**kwargs)


class TestSinkAxesAndConfig:
    def test_wall_clock_is_its_own_axis_and_config_updates_reach_the_run(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        from art_ray_metrics.export.wandb_offline import (
            find_offline_run_files,
            read_offline_metric_definitions,
            read_offline_run,
        )
        from art_ray_metrics.export.wandb_sink import WandbSink, WandbSinkConfig

        monkeypatch.setenv("WANDB_SILENT", "true")
        sink = WandbSink(
            WandbSinkConfig(
                project="p", run_id="axes1", mode="offline", dir=str(tmp_path), config={"a": 1}
            )
        )
        sink.update_config({"b": 2})  # before the run exists: at its init
        sink.start()
        sink.update_config({"c": {"d": 3}})  # while it runs
        sink.log(
            {"time/wall_clock_sec": 1.0, "discarded/cum/stale_groups": 2.0}, step=0, split="train"
        )
        sink.close()
        assert sink.failures == 0, sink.last_error
        (file,) = find_offline_run_files(tmp_path, "axes1")
        defs = read_offline_metric_definitions(file)
        assert {"name": "time/wall_clock_sec", "step_metric": "", "summary": []} in defs
        assert {"glob_name": "discarded/*", "step_metric": "training_step", "summary": []} in defs
        run = read_offline_run(file)
        assert (run["run_id"], run["project"]) == ("axes1", "p")
        assert run["config"] == {"a": 1, "b": 2, "c": {"d": 3}}


class TestActorKeepsWhatItAdopted:
    """The actor class without Ray, on in-memory storage, W&B offline: what ``attach`` hands it
    survives a restart (a new instance on the same storage)."""

    @staticmethod
    def _config(tmp_path: Path, **fields: object) -> str:
        import uuid

        from art_ray_metrics import AggregatorConfig

        return AggregatorConfig(
            storage_uri=f"memory://{uuid.uuid4().hex}",
            wandb_mode="offline",
            wandb_dir=str(tmp_path),
            **fields,  # type: ignore[arg-type]
        ).model_dump_json()

    def test_adopted_totals_and_arts_wandb_run_survive_a_restart(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        from art_ray_metrics.distributed.actor import MetricsAggregator

        monkeypatch.setenv("WANDB_SILENT", "true")
        cfg = self._config(tmp_path)
        first = MetricsAggregator(cfg)
        values = {k: repr(v) for k, v in ART_CUM.items()}
        digests = b"".join(digest(i) for i in _ids(0) + _ids(1))

        async def attach() -> tuple[dict[str, object], dict[str, object]]:
            adopted = await first.adopt_cumulative(values, digests, "state.json")
            run = await first.use_wandb_run("art-proj", "m", "m", "team", {"lr": 1e-5})
            return adopted, run

        adopted, run = asyncio.run(attach())
        assert adopted == {"adopted": True, "durable": True, "mismatch": None}
        assert run == {"run_id": "m", "project": "art-proj", "switched": True, "note": None}
        assert first.wandb is not None
        first.wandb.close()
        again = MetricsAggregator(cfg)  # a restarted actor
        try:
            assert again.state.cum.values["costs/cum/all"] == Decimal("0.08")
            assert len(again.state.cum.scenarios) == 8
            assert again.wandb is not None
            sink = again.wandb.config
            assert (sink.project, sink.run_name, sink.run_id, sink.entity) == (
                "art-proj",
                "m",
                "m",
                "team",
            )
            assert sink.config == {"lr": 1e-5}  # ART's run: the model's config only
            # a second attach: nothing adopted twice, the same run, no note
            again_adopted = asyncio.run(again.adopt_cumulative(values, digests, "state.json"))
            assert again_adopted == {"adopted": False, "durable": True, "mismatch": None}
            rerun = asyncio.run(again.use_wandb_run("art-proj", "m", "m", "team", {}))
            assert (rerun["switched"], rerun["note"]) == (False, None)
        finally:
            if again.wandb is not None:
                again.wandb.close()

    def test_a_run_with_rows_or_a_configured_id_keeps_its_wandb_run(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        from art_ray_metrics.distributed.actor import MetricsAggregator

        monkeypatch.setenv("WANDB_SILENT", "true")
        logged = MetricsAggregator(self._config(tmp_path / "a"))
        configured = MetricsAggregator(
            self._config(tmp_path / "b", wandb_run_id="mine", wandb_name="My run")
        )
        try:

            async def calls() -> tuple[dict[str, object], dict[str, object]]:
                await logged.log(0, "train", {"costs/train/judge": 1.0})
                first = await logged.use_wandb_run("p", "m", "m", None, {"lr": 1})
                second = await configured.use_wandb_run("p", "m", "m", None, {"lr": 1})
                return first, second

            kept, explicit = asyncio.run(calls())
            assert kept["switched"] is False
            assert "rows were already logged to W&B run" in str(kept["note"])
            assert explicit["switched"] is False
            assert "configured wandb_run_id 'mine' is kept" in str(explicit["note"])
            assert configured.wandb is not None
            sink = configured.wandb.config
            assert (sink.project, sink.run_id, sink.run_name) == (
                "art-ray-metrics",
                "mine",
                "My run",
            )
            assert configured.wandb.failures == 0
        finally:
            for agg in (logged, configured):
                if agg.wandb is not None:
                    agg.wandb.close()
