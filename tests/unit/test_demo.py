"""The demo's pure workload as a test oracle, and the demo leaving a caller's Ray alone.

No Ray starts here: the Ray calls the demo makes are replaced where it matters.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from art_ray_metrics.builder import MetricsBuilder
from art_ray_metrics.ops.demo import default_options
from art_ray_metrics.ops.demo import run as demo_run
from art_ray_metrics.ops.demo.workload import (
    compare_totals,
    expected_data_totals,
    plan_rollout,
    record_rollout,
    step_fates,
)


class TestWorkloadOracle:
    @pytest.mark.parametrize(("seed", "rollouts", "steps"), [(0, 3, 3), (7, 4, 5), (1, 1, 1)])
    def test_expected_totals_are_what_a_builder_sums(
        self, seed: int, rollouts: int, steps: int
    ) -> None:
        """The arithmetic oracle and the library, fed the same rollouts, agree on every
        ``data/cum`` and ``time/cum`` total after each step."""
        builder = MetricsBuilder("train")
        for step in range(steps):
            for index in range(rollouts):
                record_rollout(builder, plan_rollout(seed, step, index, rollouts), 0.5)
            row = asyncio.run(builder.flush())
            want = expected_data_totals(seed, rollouts, step)
            assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-15)
            assert set(want) == {k for k in row if k.startswith(("data/cum/", "time/cum/"))}

    def test_unique_ids_saturate_at_the_pool(self) -> None:
        """Scenario ids come from a pool of 3 x rollouts: the unique count stops there."""
        totals = expected_data_totals(0, 2, 60)
        assert totals["data/cum/num_scenarios"] == 122
        assert totals["data/cum/num_unique_scenarios"] == 6


class TestOutcomes:
    def test_a_zero_variance_group_now_and_then(self) -> None:
        """Every rollout's group gets a fate; over a run some are zero-variance, most are
        trained, and the fates are a pure function of (seed, step)."""
        fates = [step_fates(0, step, 4) for step in range(12)]
        for step, given in enumerate(fates):
            assert set(given) == {plan_rollout(0, step, i, 4).scenario_id for i in range(4)}
        counts = [f for given in fates for f in given.values()]
        assert 0 < counts.count("zero_variance") < counts.count("trained")
        assert step_fates(0, 5, 4) == fates[5]

    def test_chaos_compares_no_outcome_totals(self) -> None:
        """The in-process reference is given no fates: its rows have no outcome keys."""
        row = {"costs/cum/all": 1.0, "costs/cum/outcome/trained": 0.7}
        assert [key for key, *_ in compare_totals(row, {"costs/cum/all": 1.0})] == ["costs/cum/all"]


class TestRayOwnership:
    """Was: the demo's ``finally`` shut down any Ray, also one its caller had joined."""

    @pytest.fixture
    def failing_run(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
        """Run the demo with Ray's start replaced and the steps failing; return the shutdowns."""
        import ray

        shutdowns: list[int] = []
        monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
        monkeypatch.setattr(demo_run, "_init_ray", lambda opts: None)

        def steps(*args: Any) -> Any:
            raise RuntimeError("the steps failed")

        monkeypatch.setattr(demo_run, "_on_ray", steps)

        def run(connected: bool) -> list[int]:
            monkeypatch.setattr(ray, "is_initialized", lambda: connected)
            opts = default_options(
                run="r", storage_uri=str(tmp_path / "r"), local_dir=str(tmp_path)
            )
            with pytest.raises(RuntimeError, match="the steps failed"):
                demo_run.run_demo(opts)
            return shutdowns

        return run

    def test_a_ray_the_caller_joined_stays_up(self, failing_run: Any) -> None:
        assert failing_run(connected=True) == []

    def test_a_ray_the_demo_started_is_shut_down(self, failing_run: Any) -> None:
        assert failing_run(connected=False) == [1]
