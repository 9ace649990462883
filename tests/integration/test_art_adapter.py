"""OpenPipe ART's own training loop on the aggregator, against the real openpipe-art 0.5.18: no
GPU, no network (non-trainable ``art.Model``, no backend, ``report_metrics=[]``, litellm's local
price map). The same ART-style loop runs twice: in one process under plain ART, and with its
rollouts as Ray tasks under ``worker_context`` and the model ``attach``-ed; the rows agree step
by step."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle as cloudpickle

import art_ray_metrics as arm

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported
os.environ.setdefault("TQDM_DISABLE", "1")

try:
    ART_INSTALLED = version("openpipe-art")
except PackageNotFoundError:
    ART_INSTALLED = ""
if not ART_INSTALLED and os.environ.get("CI") == "true":  # CI must run these, never skip them
    raise RuntimeError("openpipe-art is missing: CI installs it with the [dev] extra ([art])")

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        not ART_INSTALLED,
        reason="openpipe-art is not installed (in the clone: pip install -e '.[art]')",
    ),
]

ARTIFACT_KEYS = {"time/wall_clock_sec", "recorded_at"}
"""Keys whose values depend on the clock."""


def _judge() -> Any:
    """A fake judge call priced by ART's own table (openai/gpt-4.1) via ART's track_api_cost."""
    from art.api_costs import track_api_cost

    @track_api_cost(source="judge/fake", provider="openai", model_name="openai/gpt-4.1")
    def judge(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {"usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}

    return judge


def rollout_body(step: int, group: int, idx: int, split: str) -> Any:
    """One rollout: records through ART's active builder only, as ART user code does."""
    import art
    from art.metrics import MetricsBuilder

    builder = MetricsBuilder.get_active()
    builder.add_cost(f"{builder.cost_context}/tool", 0.001 * (idx + 1))
    _judge()(1000 * (group + 1), 100 * (idx + 1))
    # RULER's cost hook, as ruler() calls it after its judge completion (no network here)
    from art.rewards.ruler import _record_ruler_cost
    from litellm.types.utils import ModelResponse, Usage

    usage_ = Usage(prompt_tokens=900 + 10 * idx, completion_tokens=150)
    _record_ruler_cost("openai/gpt-4.1", ModelResponse(usage=usage_))
    builder.add_data(step_actor_tokens=120 + idx)
    # TrainableModel's completion-cost hook, with a cost calculator of its own
    trainable = art.TrainableModel(name="hook", project="p", base_model="m", report_metrics=[])
    trainable.set_cost_calculator(
        lambda p, c, ctx: {f"costs/{ctx}/inference": (p or 0) * 1e-7 + (c or 0) * 4e-7}
    )
    usage = type("U", (), {"prompt_tokens": 50 + idx, "completion_tokens": 20})()
    trainable._record_openai_completion_costs(type("R", (), {"usage": usage, "choices": [0]})())
    reward = round(0.1 * step + 0.3 * idx + 0.05 * group, 6)
    return art.Trajectory(
        messages_and_choices=[
            {"role": "user", "content": f"s{step} g{group} {split}"},
            {"role": "assistant", "content": f"answer {idx}"},
        ],
        reward=reward,
        metrics={"correct": float(idx == 1), "num_turns": 2 + idx + group},
        metadata={"scenario_id": f"scenario-{(step + group) % 3}"},
    )


@ray.remote(num_cpus=0)
def rollout_task(name: str, step: int, group: int, idx: int, split: str) -> Any:
    from art_ray_metrics.art import worker_context

    context = "train" if split == "train" else "eval"
    with worker_context(step, context, split=split, name=name):
        return rollout_body(step, group, idx, split)


@ray.remote(num_cpus=0)
class AsyncRoller:
    """An asyncio actor: its methods use ``async with worker_context(...)``."""

    async def rollout(self, name: str, step: int, group: int, idx: int, split: str) -> Any:
        from art_ray_metrics.art import worker_context

        context = "train" if split == "train" else "eval"
        async with worker_context(step, context, split=split, name=name):
            await asyncio.sleep(0)
            return rollout_body(step, group, idx, split)


GROUPS, PER_GROUP, STEPS = 2, 3, 3


async def run_plain_art(base: Path) -> Any:
    """The loop in one process under plain ART."""
    import art

    model = art.Model(name="loop", project="parity", base_path=str(base), report_metrics=[])
    for step in range(1, STEPS + 1):
        for split, context in (("train", "train"), ("val", "eval")):
            token = model.activate_metrics_context(context)
            try:
                groups = [
                    art.TrajectoryGroup([rollout_body(step, g, i, split) for i in range(PER_GROUP)])
                    for g in range(GROUPS)
                ]
            finally:
                token.var.reset(token)
            extra = {"loss": 0.25 * step, "time/step_trainer_s": 1.5} if split == "train" else None
            await model.log(groups, split=split, step=step, metrics=extra)
    return model


async def run_on_ray(base: Path, handle: arm.AggregatorHandle, name: str) -> Any:
    """The same loop with its rollouts as Ray tasks and the model attached."""
    import art

    from art_ray_metrics.art import attach

    model = art.Model(name="loop", project="parity", base_path=str(base), report_metrics=[])
    attach(model, handle)
    roller = AsyncRoller.remote()  # type: ignore[attr-defined]
    # one CPU of the head: the tasks take turns on one worker process, which imports ART
    # (6 CPU-seconds) once instead of once per concurrent task
    task = rollout_task.options(num_cpus=1, resources={"head": 1})
    for step in range(1, STEPS + 1):
        for split in ("train", "val"):
            refs = [
                [
                    (roller.rollout if i % 2 else task).remote(name, step, g, i, split)
                    for i in range(PER_GROUP)
                ]
                for g in range(GROUPS)
            ]
            groups = [art.TrajectoryGroup(ray.get(r)) for r in refs]
            extra = {"loss": 0.25 * step, "time/step_trainer_s": 1.5} if split == "train" else None
            await model.log(groups, split=split, step=step, metrics=extra)
    return model


def _history(model: Any) -> list[dict[str, Any]]:
    path = Path(model._get_output_dir()) / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in row.items() if k not in ARTIFACT_KEYS and not k.startswith("telemetry/")
    }


class TestArtParity:
    def test_ray_loop_rows_equal_plain_art_rows(
        self, run_config: dict[str, Any], tmp_path: Path
    ) -> None:
        """Step by step, same keys and the same values (up to float summation order)."""
        handle = arm.start_aggregator(**run_config)
        try:
            plain = asyncio.run(run_plain_art(tmp_path / "plain"))
            attached = asyncio.run(run_on_ray(tmp_path / "ray", handle, run_config["name"]))
            expected, got = _history(plain), _history(attached)
            assert len(expected) == len(got) == 2 * STEPS
            for want, have in zip(expected, got, strict=True):
                want, have = _comparable(want), _comparable(have)
                assert sorted(have) == sorted(want), (want["step"], set(have) ^ set(want))
                assert have == pytest.approx(want, rel=1e-12, abs=1e-15)
            last_train = _comparable(got[-2])
            assert last_train["train/loss"] == 0.75  # ART's key for a backend loss
            assert "loss/train" not in last_train
            assert last_train["data/cum/num_unique_scenarios"] == 3.0
            assert last_train["costs/train/inference"] > 0  # TrainableModel's hook, in tasks
            assert last_train["costs/train/judge/ruler"] > 0  # RULER's hook
            # the aggregator holds the cumulative state; ART's state.json does not
            assert "_metrics_builder_state" in (plain.read_state() or {})
            assert "_metrics_builder_state" not in (attached.read_state() or {})
            # ART still writes the trajectories
            assert (Path(attached._get_output_dir()) / "trajectories/train/0003.parquet").exists()
        finally:
            handle.shutdown()

    def test_trainer_side_costs_and_a_restarted_trainer_continue_the_totals(
        self, run_config: dict[str, Any], tmp_path: Path
    ) -> None:
        """Costs recorded on the trainer through the model's builder reach the row; a fresh
        Model attached to the same aggregator continues the cumulative values."""
        import art

        from art_ray_metrics.art import attach

        handle = arm.start_aggregator(**run_config)
        try:
            model = art.Model(name="m", project="p", base_path=str(tmp_path), report_metrics=[])
            attach(model, handle)
            model.metrics_builder("train").add_cost("train/judge", 0.5)
            asyncio.run(model.log(metrics={"costs/gpu": 0.25, "lr": 1e-5}, split="train", step=1))
            row = _history(model)[-1]
            assert (row["costs/train/judge"], row["costs/all"]) == (0.5, 0.75)
            assert row["train/lr"] == 1e-5
            again = art.Model(name="m", project="p", base_path=str(tmp_path), report_metrics=[])
            attach(again, handle)
            with again.metrics_builder("train").activate_context() as b:
                b.add_cost("train/judge", 0.25)
            asyncio.run(again.log(metrics={}, split="train", step=2))
            assert _history(again)[-1]["costs/cum/all"] == 1.0
            with pytest.raises(TypeError, match="already attached"):
                attach(again, handle)
        finally:
            handle.shutdown()


class _Backend:
    """What ART's Model.log asks a backend for its automatic step metrics."""

    def __init__(self, usd_per_hour: float) -> None:
        self.usd_per_hour = usd_per_hour

    def supports_automatic_train_step_metrics(self) -> bool:
        return True

    def automatic_gpu_cost_per_hour_usd(self, model: Any) -> float:
        return self.usd_per_hour


class TestGpuChargedOnce:
    @pytest.mark.parametrize("aggregator_charges", [False, True])
    def test_backend_gpu_cost_unless_the_aggregator_charges(
        self, run_config: dict[str, Any], tmp_path: Path, aggregator_charges: bool
    ) -> None:
        """The backend bills $1000/s, the aggregator $0.001/s: the row has exactly one of them."""
        import art

        from art_ray_metrics.art import attach

        gpu = {"gpu_type": "H100", "gpu_count": 1, "gpu_hourly_usd": 3.6}
        handle = arm.start_aggregator(**run_config, **(gpu if aggregator_charges else {}))
        try:
            model = art.Model(name="g", project="p", base_path=str(tmp_path), report_metrics=[])
            object.__setattr__(model, "_backend", _Backend(usd_per_hour=3.6e6))
            attach(model, handle)
            asyncio.run(model.log(metrics={"loss": 1.0}, split="train", step=1))
            row = _history(model)[-1]
            assert row["time/step_wall_s"] > 0  # the backend's step time is kept either way
            if aggregator_charges:
                assert 0 < row["costs/gpu"] < 1.0
            else:
                assert row["costs/gpu"] == pytest.approx(1000 * row["time/step_wall_s"])
        finally:
            handle.shutdown()


# -- an existing ART run moves over ----------------------------------------------------------


def _trajectory(scenario: str, reward: float) -> Any:
    import art

    return art.Trajectory(
        messages_and_choices=[
            {"role": "user", "content": scenario},
            {"role": "assistant", "content": "ok"},
        ],
        reward=reward,
        metadata={"scenario_id": scenario},
    )


async def _issue_step(model: Any, step: int) -> None:
    """One step of the issue's scenario: 4 scenarios (one group each), a $0.01 judge cost each."""
    import art

    builder = model.metrics_builder("train")
    groups = []
    for i in range(4):
        builder.add_cost("train/judge", 0.01)
        scenario = f"scenario-{4 * step + i}"
        groups.append(art.TrajectoryGroup([_trajectory(scenario, r) for r in (0.0, 1.0)]))
    await model.log(groups, split="train", step=step)


def _art_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("art_ray_metrics")]


class TestMoveAnExistingArtRun:
    def test_totals_continue_from_state_json_once(
        self,
        run_config: dict[str, Any],
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Steps 0-1 under plain ART ($0.08, 8 scenarios in state.json), then a new trainer
        attaches a Model of the same name to a fresh aggregator: step 2 has $0.12 and 12
        unique scenarios, also after the aggregator was killed right after the attach."""
        import art

        from art_ray_metrics.art import attach

        def new_model() -> Any:
            return art.Model(
                name="moved", project="mig", base_path=str(tmp_path), report_metrics=[]
            )

        plain = new_model()
        for step in (0, 1):
            asyncio.run(_issue_step(plain, step))
        art_state = (plain.read_state() or {})["_metrics_builder_state"]
        assert art_state["cum_state"]["costs/cum/all"] == pytest.approx(0.08)
        assert len(art_state["unique_scenario_ids"]) == 8

        handle = arm.start_aggregator(**run_config)
        try:
            moved = new_model()
            attach(moved, handle)
            ray.kill(handle.actor, no_restart=False)  # the adopted totals are checkpointed
            asyncio.run(_issue_step(moved, 2))
            rows = _history(moved)
            print("\nmigration rows:")  # the issue asks for them
            for row in rows:
                print({k: row[k] for k in sorted(row) if k.startswith(("costs/", "data/cum"))})
            assert [r["step"] for r in rows] == [0, 1, 2]
            assert rows[1]["costs/cum/all"] == pytest.approx(0.08)  # plain ART's rows
            assert rows[2]["costs/all"] == 0.04
            assert rows[2]["costs/cum/all"] == 0.12
            assert rows[2]["costs/cum/train/judge"] == 0.12
            assert rows[2]["data/cum/num_unique_scenarios"] == 12.0
            assert (moved.read_state() or {})["art_ray_metrics"] == {
                "adopted_by": handle.config.storage_uri
            }

            # a restarted trainer: the aggregator's state is the run's, nothing is reported
            caplog.clear()
            again = new_model()
            with caplog.at_level("WARNING", logger="art_ray_metrics"):
                attach(again, handle)
            assert _art_messages(caplog) == []
            asyncio.run(_issue_step(again, 3))
            last = _history(again)[-1]
            assert (last["costs/cum/all"], last["data/cum/num_unique_scenarios"]) == (0.16, 16.0)
        finally:
            handle.shutdown()

    def test_an_aggregator_with_a_state_keeps_it_and_says_so_in_one_line(
        self,
        run_config: dict[str, Any],
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        import art

        from art_ray_metrics.art import attach

        plain = art.Model(name="m", project="p", base_path=str(tmp_path), report_metrics=[])
        asyncio.run(_issue_step(plain, 0))  # state.json: $0.04, 4 scenarios
        handle = arm.start_aggregator(**run_config)
        try:
            handle.log(0, "train", {"costs/train/judge": 1.0})  # the aggregator's own state
            model = art.Model(name="m", project="p", base_path=str(tmp_path), report_metrics=[])
            with caplog.at_level("WARNING", logger="art_ray_metrics"):
                attach(model, handle)
            (line,) = _art_messages(caplog)
            assert "state.json differs from the aggregator's state, which is kept" in line
            assert "costs/cum/all: 0.04 there, 1.0 here" in line
            assert "unique scenarios 4 there, 0 here (4 not here)" in line
            assert "\n" not in line
            asyncio.run(model.log(metrics={"costs/train/judge": 0.5}, split="train", step=1))
            assert _history(model)[-1]["costs/cum/all"] == 1.5
        finally:
            handle.shutdown()

    def test_a_state_json_not_in_arts_format_is_refused_by_name(
        self, run_config: dict[str, Any], tmp_path: Path
    ) -> None:
        import art

        from art_ray_metrics.art import attach

        model = art.Model(name="bad", project="p", base_path=str(tmp_path), report_metrics=[])
        model.overwrite_state({"_metrics_builder_state": {"cum_state": {"costs/all": 0.5}}})
        handle = arm.start_aggregator(**run_config)
        try:
            with pytest.raises(arm.InvalidMetricError, match=r"state\.json.*'costs/all' = 0\.5"):
                attach(model, handle)
            assert "_arm_attached" not in model.__dict__
        finally:
            handle.shutdown()


# -- ART's W&B run ---------------------------------------------------------------------------


def _axis(key: str, definitions: list[dict[str, Any]]) -> str | None:
    """The x-axis W&B gives ``key``: its own definition, else the last matching glob's."""
    from fnmatch import fnmatchcase

    named = [d for d in definitions if d.get("name") == key]
    if named:
        return str(named[-1]["step_metric"])
    globs = [d for d in definitions if fnmatchcase(key, d.get("glob_name", "\0"))]
    return str(globs[-1]["step_metric"]) if globs else None


async def _wandb_steps(model: Any) -> None:
    """Config before the first row and after it, two train rows and one val row."""
    await _issue_step(model, 0)
    model.update_wandb_config({"batch_size": 4, "judge": {"model": "gpt-4.1"}})
    await _issue_step(model, 1)
    await model.log(metrics={"accuracy": 0.5}, split="val", step=1)


class TestArtWandbRun:
    def test_the_attached_run_is_arts_run_with_arts_config_and_axes(
        self, run_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Plain ART and the attached model, both offline: the same run id, project, entity,
        name and config, and every key of ART's rows on the same x-axis."""
        import art

        from art_ray_metrics.art import attach
        from art_ray_metrics.export.wandb_offline import (
            find_offline_run_files,
            read_offline_history,
            read_offline_metric_definitions,
            read_offline_run,
        )

        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.setenv("WANDB_ENTITY", "my-team")
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # ART logs to W&B only with a key set
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / "plain-wandb"))
        (tmp_path / "plain-wandb").mkdir()
        config = {"lr": 1e-5, "base_model": "Qwen/Qwen2.5-7B"}

        plain = art.Model(
            name="wandb-run",
            project="art-proj",
            base_path=str(tmp_path / "plain"),
            report_metrics=["wandb"],
        )
        plain.update_wandb_config(config)
        asyncio.run(_wandb_steps(plain))
        plain._wandb_run.finish()

        ours_dir = tmp_path / "ours-wandb"
        handle = arm.start_aggregator(
            **{**run_config, "wandb_mode": "offline", "wandb_dir": str(ours_dir)}
        )
        try:
            model = art.Model(
                name="wandb-run",
                project="art-proj",
                base_path=str(tmp_path / "ours"),
                report_metrics=[],
            )
            model.update_wandb_config(config)
            attach(model, handle)
            stats = handle.stats()
            print("\nattached W&B run:", stats["wandb_run_id"], "project", model.project)
            asyncio.run(_wandb_steps(model))
        finally:
            handle.shutdown()

        (theirs,) = find_offline_run_files(tmp_path / "plain-wandb", "wandb-run")
        (ours,) = find_offline_run_files(ours_dir, "wandb-run")
        want, got = read_offline_run(theirs), read_offline_run(ours)
        assert want == {
            "run_id": "wandb-run",
            "project": "art-proj",
            "entity": "my-team",
            "display_name": "wandb-run",
            "config": {**config, "batch_size": 4, "judge": {"model": "gpt-4.1"}},
        }
        assert got == want
        assert stats["wandb_run_id"] == "wandb-run"
        art_defs = read_offline_metric_definitions(theirs)
        our_defs = read_offline_metric_definitions(ours)
        art_rows = read_offline_history(theirs)
        our_rows = read_offline_history(ours)
        assert len(art_rows) == len(our_rows) == 3
        keys = {k for row in art_rows for k in row if not k.startswith("_")}
        assert {"time/wall_clock_sec", "costs/cum/all", "val/accuracy"} <= keys
        axes = {k: _axis(k, art_defs) for k in sorted(keys)}
        assert axes["time/wall_clock_sec"] == ""  # an axis of its own, as ART defines it
        assert axes["costs/train/judge"] == "training_step"
        assert {k: _axis(k, our_defs) for k in sorted(keys)} == axes
        for want_row, got_row in zip(art_rows, our_rows, strict=True):
            assert set(want_row) - {"_runtime", "_timestamp"} <= set(got_row)


# -- ART's next release (stand-ins of its changed signatures) ---------------------------------


def _next_art_model_type() -> type:
    """An ``art.Model`` whose ``log`` makes the calls ART's GitHub main makes after 0.5.18:
    ``_log_metrics(..., custom_metric_keys=...)`` and the ``step_rollout_*`` builder names
    (plus a keyword no release has, to see it ignored)."""
    import art

    class NextArtModel(art.Model):  # type: ignore[misc]
        async def log(
            self,
            trajectories: Any = None,
            split: str = "val",
            *,
            metrics: dict[str, float] | None = None,
            step: int | None = None,
        ) -> None:
            builder = self._metrics_builder_for_split(split)
            builder.add_data(step_rollout_tokens=100)
            builder.add_user_timing(step_rollout_s=2.0)
            builder.add_idle_times(step_rollout_idle_s=0.5)
            row = {**(metrics or {}), **await builder.flush()}
            self._log_metrics(
                row, split, step, custom_metric_keys=set(metrics or {}), not_yet_invented=1
            )

    return NextArtModel


@ray.remote(num_cpus=0)
def next_art_rollout(name: str, step: int) -> None:
    from art.metrics import MetricsBuilder

    from art_ray_metrics.art import worker_context

    with worker_context(step, "train", split="train", name=name):
        builder = MetricsBuilder.get_active()
        builder.add_data(step_rollout_tokens=20)
        builder.add_user_timing(step_rollout_s=1.0)
        builder.add_idle_times(step_rollout_idle_s=0.25)


class TestArtsNextRelease:
    def test_new_keywords_aliases_and_pass_through_cum_keys(
        self,
        run_config: dict[str, Any],
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        import art.model

        from art_ray_metrics.art import attach

        # ART's pipeline trainer passes discarded/* through (a section in the newer ART)
        monkeypatch.setattr(art.model, "METRIC_SECTIONS", art.model.METRIC_SECTIONS | {"discarded"})
        handle = arm.start_aggregator(**run_config)
        try:
            model = _next_art_model_type()(
                name="next", project="p", base_path=str(tmp_path), report_metrics=[]
            )
            attach(model, handle)
            with caplog.at_level("WARNING", logger="art_ray_metrics"):
                for step in (1, 2):
                    ray.get(next_art_rollout.remote(run_config["name"], step))
                    extra = {"discarded/cum/stale_groups": float(step), "loss": 0.5}
                    asyncio.run(model.log(split="train", step=step, metrics=extra))
            warned = [m for m in _art_messages(caplog) if "not_yet_invented" in m]
            assert len(warned) == 1  # once, not per row
            row = _history(model)[-1]
            assert row["data/step_actor_tokens"] == 120  # trainer 100 + worker 20
            assert row["time/step_actor_s"] == 3.0
            assert row["throughput/step_actor_idle_s"] == 0.75
            assert row["throughput/cum/actor_idle_s"] == 1.5
            assert row["discarded/cum/stale_groups"] == 2.0  # passed through unchanged
            assert row["train/loss"] == 0.5
            # the trainer's own barrier takes a pass-through cum key too, and still refuses ours
            direct = handle.log(3, "train", {"discarded/cum/stale_groups": 3.0})
            assert direct["discarded/cum/stale_groups"] == 3.0
            with pytest.raises(arm.InvalidMetricError, match="reserved cumulative"):
                handle.log(4, "train", {"costs/cum/all": 1.0})
        finally:
            handle.shutdown()


def fated_rollout(name: str, step: int, scenario: str, idx: int, reward: float) -> Any:
    """A rollout of ``scenario`` paying $0.01 per idx + 1 (its default group: the scenario id
    it records), or raising when ``reward`` is negative (after paying)."""
    import art

    from art_ray_metrics.art import worker_context

    with worker_context(step, name=name) as builder:
        builder.add_data(scenario_ids=[scenario])
        builder.add_cost("train/judge", 0.01 * (idx + 1))
        if reward < 0:
            return RuntimeError(f"rollout {scenario}/{idx} failed")
        return art.Trajectory(
            messages_and_choices=[{"role": "user", "content": scenario}],
            reward=reward,
            metadata={"scenario_id": scenario},
        )


fated_task = ray.remote(num_cpus=0)(fated_rollout)


class TestOutcomeFates:
    def test_attach_derives_each_groups_fate_from_model_log(
        self, run_config: dict[str, Any], tmp_path: Path
    ) -> None:
        """Rewards that vary: trained; equal rewards: zero_variance; an exception: errored.
        Each group's spend (tagged with its scenario id in the Ray tasks) lands under its
        fate, and the outcomes add up to costs/all."""
        import art

        from art_ray_metrics.art import attach

        handle = arm.start_aggregator(**run_config)
        try:
            model = art.Model(name="fates", project="p", base_path=str(tmp_path), report_metrics=[])
            attach(model, handle)
            plan = {"s-var": [0.0, 1.0], "s-flat": [0.5, 0.5], "s-err": [1.0, -1.0]}
            refs = {
                s: [fated_task.remote(run_config["name"], 1, s, i, r) for i, r in enumerate(rs)]
                for s, rs in plan.items()
            }
            groups = []
            for got in ([ray.get(r) for r in rs] for rs in refs.values()):
                trajectories = [t for t in got if isinstance(t, art.Trajectory)]
                errors = [t for t in got if isinstance(t, BaseException)]
                groups.append(art.TrajectoryGroup(trajectories, exceptions=errors))
            asyncio.run(model.log(groups, split="train", step=1, metrics={"costs/gpu": 0.5}))
            row = _history(model)[-1]
            assert row["costs/outcome/trained"] == pytest.approx(0.03)
            assert row["costs/outcome/zero_variance"] == pytest.approx(0.03)
            assert row["costs/outcome/errored"] == pytest.approx(0.03)
            assert row["costs/outcome/unknown"] == pytest.approx(0.5)  # the trainer's GPU
            fates = ("trained", "zero_variance", "stale", "errored", "discarded", "unknown")
            total = sum(row[f"costs/outcome/{f}"] for f in fates)
            assert round(total, 9) == round(row["costs/all"], 9) == 0.59
            assert row["costs/per_trainable_group"] == pytest.approx(0.59)
        finally:
            handle.shutdown()
