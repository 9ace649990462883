"""Adopting a run's cumulative state kept elsewhere (an OpenPipe ART run's ``state.json``).

A run that started under plain ART has its totals in ART's builder state: cumulative values
(``costs/cum/all`` ...) and the unique scenario ids. Moved onto an aggregator that has closed
nothing yet, that state becomes the aggregator's starting point, once; an aggregator that
already has a state keeps its own and the caller reports the difference (:func:`mismatch`).
Pure Python, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from art_ray_metrics.core import keys as K
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.rollup import to_decimal
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.errors import InvalidMetricError

__all__ = ["adopt", "check_cumulative", "is_fresh", "mismatch"]

_REL_TOLERANCE = Decimal("1e-9")
"""Values that differ by less than this (relative) are equal: ART sums floats, we sum decimals."""


def check_cumulative(values: Mapping[Any, Any]) -> dict[str, Decimal]:
    """Validate cumulative values (``<section>/cum/...`` keys, finite numbers, no negative
    cost) and return them as exact decimals (floats through their shortest repr).

    Raises:
        InvalidMetricError: naming the key and the value.
    """
    out: dict[str, Decimal] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not K.is_cumulative(key):
            raise InvalidMetricError(
                f"Expected a cumulative key '<section>/cum/...' but got {key!r} = {value!r}"
            )
        if isinstance(value, str):
            try:
                value = Decimal(value)
            except ArithmeticError:
                raise InvalidMetricError(
                    f"Expected a number for {key!r} but got {value!r}"
                ) from None
        number = V.check_value(key, value, bounded=False)
        out[key] = value if isinstance(value, Decimal) else to_decimal(number)
    return out


def is_fresh(state: AggregatorState) -> bool:
    """True if the aggregator has no state of its own: no row closed, no cumulative value, no
    unique id (pending, unclosed leaves do not count: they have not been totalled)."""
    meta = state.meta
    return (
        not state.cum.values
        and len(state.cum.scenarios) == 0
        and not state.last_closed
        and not meta.last_rows
        and not meta.rewind
        and not meta.baseline_cum
    )


def adopt(
    state: AggregatorState, values: Mapping[str, Decimal], scenarios: Iterable[bytes]
) -> None:
    """Make ``values`` and the scenario digests the state of a fresh aggregator.

    Raises:
        ValueError: the aggregator is not fresh (:func:`is_fresh`); nothing is changed.
    """
    if not is_fresh(state):
        raise ValueError("Expected a fresh aggregator (nothing closed) to adopt a state into")
    state.cum.values = dict(values)
    state.meta.baseline_cum = dict(values)
    digests = sorted(set(scenarios))
    if digests:
        state.cum.scenarios.add_many(digests)


def _differs(a: Decimal, b: Decimal) -> bool:
    return abs(a - b) > _REL_TOLERANCE * max(Decimal(1), abs(a), abs(b))


def mismatch(
    state: AggregatorState, values: Mapping[str, Decimal], scenarios: Iterable[bytes]
) -> str | None:
    """How ``values``/``scenarios`` differ from the aggregator's state, in one line; ``None``
    if they agree (values within float rounding, the same unique ids)."""
    own = state.cum.values
    zero = Decimal(0)
    differing = sorted(
        k for k in set(values) | set(own) if _differs(values.get(k, zero), own.get(k, zero))
    )
    digests = sorted(set(scenarios))
    missing = sum(1 for found in state.cum.scenarios.contains_many(digests) if not found)
    theirs, ours = len(digests), len(state.cum.scenarios)
    parts = []
    if differing:
        first = differing[0]
        parts.append(
            f"{len(differing)} cumulative values differ (first {first}: "
            f"{values.get(first, zero)} there, {own.get(first, zero)} here)"
        )
    if missing or theirs != ours:
        parts.append(f"unique scenarios {theirs} there, {ours} here ({missing} not here)")
    return "; ".join(parts) or None
