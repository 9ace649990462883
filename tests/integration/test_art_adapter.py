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
    for step in range(1, STEPS + 1):
        for split in ("train", "val"):
            refs = [
                [
                    (roller.rollout if i % 2 else rollout_task).remote(name, step, g, i, split)
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
