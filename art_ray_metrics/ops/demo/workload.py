"""The demo's workload: pure functions of ``(seed, step, rollout index)``, and its oracle.

No Ray, no network, no clock: what each rollout records (scenario id, token count, actor time,
the answer its judges grade), the trainer's loss, and the cumulative ``data/`` and ``time/``
totals a run through a given step must end with (:func:`expected_data_totals`, computed here by
plain arithmetic, so a test checks a demo run against it without trusting the code that
aggregated it). Judge scores and costs come from the fake API (:mod:`.judges`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from art_ray_metrics.builder import LeafRecorder

__all__ = [
    "COMPARED_PREFIXES",
    "UNCOMPARED_PREFIXES",
    "ZERO_VARIANCE_SHARE",
    "RolloutPlan",
    "compare_totals",
    "expected_data_totals",
    "plan_rollout",
    "record_rollout",
    "step_fates",
    "trainer_loss",
]

COMPARED_PREFIXES = ("costs/cum/", "data/cum/")
"""The totals ``--chaos`` compares with the in-process reference (timings are wall-clock)."""
UNCOMPARED_PREFIXES = ("costs/cum/outcome/",)
"""Totals the reference has no counterpart of (its builder is given no fates)."""
ZERO_VARIANCE_SHARE = 0.2
"""About this share of a step's groups get the fate ``zero_variance`` (their judge spend
shows under ``costs/outcome/zero_variance``)."""


@dataclass(frozen=True)
class RolloutPlan:
    """Everything one rollout does, derived from ``(seed, step, index)``."""

    step: int
    index: int
    scenario_id: str
    tokens: int
    actor_s: float
    answer: str
    quality: float

    @property
    def prompt(self) -> str:
        """The judge prompt (it determines the fake API's usage and response id)."""
        return (
            f"Grade this answer to {self.scenario_id} (step {self.step}, rollout {self.index}):"
            f" {self.answer} (quality={self.quality:.2f})"
        )


def plan_rollout(seed: int, step: int, index: int, rollouts: int) -> RolloutPlan:
    """The deterministic plan of rollout ``index`` at ``step``.

    Scenario ids are drawn from a pool of ``3 * rollouts`` ids, so the unique count grows over
    the first steps and then saturates.

    >>> plan_rollout(0, 1, 2, 4) == plan_rollout(0, 1, 2, 4)
    True
    """
    rng = random.Random(f"{seed}:{step}:{index}")
    pool = max(4, 3 * rollouts)
    tokens = rng.randrange(300, 1200)
    return RolloutPlan(
        step=step,
        index=index,
        scenario_id=f"scenario-{rng.randrange(pool):04d}",
        tokens=tokens,
        actor_s=round(tokens / rng.uniform(800.0, 1600.0), 3),
        answer=f"answer-{rng.getrandbits(32):08x}",
        # the policy "learns": answers get better with training (the fake judge scores this)
        quality=min(0.95, 0.3 + 0.55 * (1 - 0.75**step) + rng.uniform(-0.1, 0.1)),
    )


def record_rollout(builder: LeafRecorder, plan: RolloutPlan, score: float) -> None:
    """The leaves a rollout records (also used, unchanged, by the in-process reference)."""
    builder.add_data(
        step_num_scenarios=1, step_actor_tokens=plan.tokens, scenario_ids=[plan.scenario_id]
    )
    builder.add_user_timing(step_actor_s=plan.actor_s)
    builder.add_metric("reward/judge_score_sum", score)  # summed, as add_metric always is
    builder.add_sample("reward/judge_score", score)  # averaged over the step's rollouts


def step_fates(seed: int, step: int, rollouts: int) -> dict[str, str]:
    """The fate the trainer gives each group (a rollout's scenario id) of ``step``: now and
    then ``zero_variance`` (as if its rewards had not varied), else ``trained``.

    >>> set(step_fates(0, 1, 8).values()) <= {"trained", "zero_variance"}
    True
    """
    fates: dict[str, str] = {}
    for index in range(rollouts):
        group = plan_rollout(seed, step, index, rollouts).scenario_id
        draw = random.Random(f"fate:{seed}:{step}:{group}").random()
        fates[group] = "zero_variance" if draw < ZERO_VARIANCE_SHARE else "trained"
    return fates


def trainer_loss(seed: int, step: int) -> float:
    """A made-up, decreasing training loss."""
    return round(2.0 * 0.85**step + random.Random(f"loss:{seed}:{step}").uniform(0, 0.05), 6)


def expected_data_totals(seed: int, rollouts: int, last_step: int) -> dict[str, float]:
    """The cumulative totals of what rollouts record (not their judges) after steps
    ``0..last_step`` of a run of ``rollouts`` rollouts per step, whatever the sessions, resumes
    and kills in between: the test oracle of a demo run.

    >>> totals = expected_data_totals(0, 4, 1)
    >>> totals["data/cum/num_scenarios"], totals["data/cum/num_unique_scenarios"]
    (8.0, 6.0)
    """
    plans = [
        plan_rollout(seed, step, index, rollouts)
        for step in range(last_step + 1)
        for index in range(rollouts)
    ]
    return {
        "data/cum/num_scenarios": float(len(plans)),
        "data/cum/actor_tokens": float(sum(p.tokens for p in plans)),
        "data/cum/num_unique_scenarios": float(len({p.scenario_id for p in plans})),
        "time/cum/actor_s": float(sum(Decimal(repr(p.actor_s)) for p in plans)),
    }


def compare_totals(
    row: Mapping[str, float], reference: Mapping[str, float]
) -> list[tuple[str, float | None, float | None, bool]]:
    """``(key, aggregator, reference, equal)`` for every compared cumulative key of either row
    (not the outcomes: :data:`UNCOMPARED_PREFIXES`)."""
    keys = sorted(
        k
        for k in {*row, *reference}
        if k.startswith(COMPARED_PREFIXES) and not k.startswith(UNCOMPARED_PREFIXES)
    )
    out = []
    for key in keys:
        got, want = row.get(key), reference.get(key)
        equal = got is not None and want is not None and math.isclose(got, want, rel_tol=1e-12)
        out.append((key, got, want, equal))
    return out
