"""Helpers for testing code that uses art_ray_metrics, without Ray.

- :func:`make_batch` builds a :class:`~art_ray_metrics.core.records.LeafBatch` from plain values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal

from art_ray_metrics.core.dedupe import digest
from art_ray_metrics.core.records import KeyedCost, LeafBatch, StepGroup
from art_ray_metrics.core.rollup import EXACT, to_decimal
from art_ray_metrics.core.samples import SampleStats

__all__ = ["make_batch", "make_group"]


def make_group(
    step: int,
    scope: str = "train",
    leaves: Mapping[str, float] | Iterable[tuple[str, float]] = (),
    *,
    scenario_ids: Iterable[object] = (),
    keyed_costs: Iterable[tuple[str, float, str]] = (),
    samples: Mapping[str, Iterable[float]] | None = None,
) -> StepGroup:
    """A group with repeated keys summed exactly, as a producer pre-aggregates them, and
    ``samples`` (per-rollout values by key) summarised as ``add_sample`` ships them."""
    items = leaves.items() if isinstance(leaves, Mapping) else leaves
    sums: dict[str, Decimal] = {}
    for key, value in items:
        sums[key] = EXACT.add(sums.get(key, Decimal(0)), to_decimal(value))
    keyed = tuple(KeyedCost(k, to_decimal(v), rid) for k, v, rid in keyed_costs)
    digests = b"".join(sorted({digest(s) for s in scenario_ids}))
    stats = {k: SampleStats.of(v) for k, v in (samples or {}).items()}
    return StepGroup(step, scope, sums, keyed, digests, stats)


def make_batch(
    producer_id: str,
    seq: int,
    step: int,
    scope: str = "train",
    leaves: Mapping[str, float] | Iterable[tuple[str, float]] = (),
    *,
    scenario_ids: Iterable[object] = (),
    keyed_costs: Iterable[tuple[str, float, str]] = (),
    samples: Mapping[str, Iterable[float]] | None = None,
) -> LeafBatch:
    """A one-group batch."""
    group = make_group(
        step, scope, leaves, scenario_ids=scenario_ids, keyed_costs=keyed_costs, samples=samples
    )
    return LeafBatch(producer_id, seq, (group,))
