"""Helpers for testing code that uses art_ray_metrics, without Ray.

- :func:`make_batch` builds a :class:`~art_ray_metrics.records.LeafBatch` from plain values.
- :class:`FakeClock` is a settable monotonic clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal

from .dedupe import digest
from .records import KeyedCost, LeafBatch, StepGroup
from .rollup import EXACT, to_decimal

__all__ = ["FakeClock", "make_batch", "make_group"]


def make_group(
    step: int,
    scope: str = "train",
    leaves: Mapping[str, float] | Iterable[tuple[str, float]] = (),
    *,
    scenario_ids: Iterable[object] = (),
    keyed_costs: Iterable[tuple[str, float, str]] = (),
) -> StepGroup:
    """A group with repeated keys summed exactly, as a producer pre-aggregates them."""
    items = leaves.items() if isinstance(leaves, Mapping) else leaves
    sums: dict[str, Decimal] = {}
    for key, value in items:
        sums[key] = EXACT.add(sums.get(key, Decimal(0)), to_decimal(value))
    keyed = tuple(KeyedCost(k, to_decimal(v), rid) for k, v, rid in keyed_costs)
    digests = b"".join(sorted({digest(s) for s in scenario_ids}))
    return StepGroup(step, scope, sums, keyed, digests)


def make_batch(
    producer_id: str,
    seq: int,
    step: int,
    scope: str = "train",
    leaves: Mapping[str, float] | Iterable[tuple[str, float]] = (),
    *,
    scenario_ids: Iterable[object] = (),
    keyed_costs: Iterable[tuple[str, float, str]] = (),
) -> LeafBatch:
    """A one-group batch."""
    group = make_group(step, scope, leaves, scenario_ids=scenario_ids, keyed_costs=keyed_costs)
    return LeafBatch(producer_id, seq, (group,))


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds
