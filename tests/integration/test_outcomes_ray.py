"""Where the money went, with real Ray: several producers tag their cost leaves with their
rollouts' groups, the trainer gives fates, and every row's ``costs/outcome/*`` add up to
``costs/all`` to the cent (and the cumulative twins to ``costs/cum/all``)."""

from __future__ import annotations

import sys
from decimal import Decimal
from typing import Any

import pytest
import ray
import ray.cloudpickle as cloudpickle

import art_ray_metrics as arm

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = [pytest.mark.ray]

FATES = ("trained", "zero_variance", "stale", "errored", "discarded", "unknown")
GIVEN = FATES[:-1]


@arm.track_api_cost(
    source="judge",
    provider="openai",
    # a model genai-prices knows (its own prices below win): for a name no bundled table
    # knows, the first call in each worker process imports LiteLLM to look it up (5 CPU-s,
    # about 10 s with four workers importing it at once on two cores)
    model_name="gpt-4o-mini",
    prompt_price_per_million=1000,
    completion_price_per_million=1000,
)
def judge(response_id: str, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": response_id,
        "usage": {"prompt_tokens": 0, "completion_tokens": completion_tokens},
    }


def _cents(step: int, producer: int, group: int) -> int:
    return 1 + (7 * step + 3 * producer + 5 * group) % 11


@ray.remote(num_cpus=0)
def producer_task(name: str, producer: int, step: int, groups: int) -> bool:
    """One producer's rollouts of ``step``: one per group (named, or by scenario id), each a
    tool cost and a keyed judge call; and one rollout without a group."""
    for group in range(groups):
        gid = f"s{step}-g{group}"
        if group % 2:
            builder = arm.connect(step, name=name, producer_id=f"p{producer}", group=gid)
        else:
            builder = arm.connect(step, name=name, producer_id=f"p{producer}")
            builder.add_data(scenario_ids=[gid])  # the default group
        builder.add_cost("train/tool", _cents(step, producer, group) / 100)
        with builder.activate_context():
            judge(f"r-{step}-{producer}-{group}", 10 * _cents(step, producer, group))
        assert builder.flush(timeout_s=60).ok
    untagged = arm.connect(step, name=name, producer_id=f"p{producer}")
    untagged.add_cost("train/tool", 0.07)
    return untagged.flush(timeout_s=60).ok


def test_outcomes_sum_to_costs_all_to_the_cent_on_every_row(run_config: dict[str, Any]) -> None:
    handle = arm.start_aggregator(**run_config)
    producers, groups, steps = 3, 5, 3
    want_cum = dict.fromkeys(FATES, Decimal(0))
    try:
        for step in range(steps):
            assert all(
                ray.get(
                    [
                        producer_task.remote(run_config["name"], p, step, groups)
                        for p in range(producers)
                    ]
                )
            )
            fates = {f"s{step}-g{g}": GIVEN[(g + step) % len(GIVEN)] for g in range(groups)}
            row = handle.log(step, metrics={"costs/gpu": 0.25}, group_fates=fates)
            want = dict.fromkeys(FATES, Decimal(0))
            for g in range(groups):
                cents = sum(_cents(step, p, g) for p in range(producers))
                want[fates[f"s{step}-g{g}"]] += Decimal(2 * cents) / 100  # tool + judge
            want["unknown"] = Decimal("0.07") * producers + Decimal("0.25")
            got = {f: Decimal(repr(row[f"costs/outcome/{f}"])) for f in FATES}
            assert {f: round(v, 2) for f, v in got.items()} == want
            assert round(sum(got.values()), 2) == round(Decimal(repr(row["costs/all"])), 2)
            for fate in FATES:
                want_cum[fate] += want[fate]
            cum = {f: Decimal(repr(row[f"costs/cum/outcome/{f}"])) for f in FATES}
            assert {f: round(v, 2) for f, v in cum.items()} == want_cum
            assert round(sum(cum.values()), 2) == round(Decimal(repr(row["costs/cum/all"])), 2)
            assert row["costs/per_trainable_group"] == pytest.approx(
                row["costs/all"] / sum(1 for f in fates.values() if f == "trained")
            )
    finally:
        handle.shutdown()
