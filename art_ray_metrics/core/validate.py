"""One place for every check on what producers and trainers hand us.

The in-process builder, the worker client, the wire decoder, the aggregator's barrier and the
history all call these functions, so they accept and refuse exactly the same input. Each raises
:class:`~art_ray_metrics.errors.InvalidMetricError` naming the offending key and value.
"""

from __future__ import annotations

import numbers
import re
from decimal import Decimal
from typing import Final

from art_ray_metrics.core.keys import DERIVED_COST_NAMES, is_cumulative
from art_ray_metrics.errors import InvalidMetricError

__all__ = [
    "MAX_ABS_SUM",
    "MAX_ABS_VALUE",
    "MAX_MAGNITUDE",
    "MAX_STEP",
    "RESERVED_ROW_KEYS",
    "STEP_DIGITS",
    "check_cost_context",
    "check_row_key",
    "check_split",
    "check_step",
    "check_sum",
    "check_text",
    "check_value",
    "finite_float",
    "validate_key",
]

STEP_DIGITS: Final = 12
"""Steps are written zero-padded to this many digits in history object names."""
MAX_STEP: Final = 10**STEP_DIGITS - 1
_SPLIT_RE: Final = re.compile(r"[A-Za-z0-9_.]+")
MAX_ABS_VALUE: Final = 1e300
"""Largest magnitude of a recorded leaf and of a pending sum: headroom so that summing leaves,
rollups and cumulative totals never overflows a float."""
MAX_ABS_SUM: Final = Decimal(MAX_ABS_VALUE)
""":data:`MAX_ABS_VALUE` as an exact ``Decimal``, for exact sums: comparing a ``Decimal`` with
a ``float`` converts the float each time (about 40 times slower), with the same result."""
MAX_MAGNITUDE: Final = 1e290
"""Values below this magnitude take the workers' fast path: no realistic count of them can sum
past :data:`MAX_ABS_VALUE`. Larger ones have their running sum checked (:func:`check_sum`)."""
RESERVED_ROW_KEYS: Final = frozenset({"step", "split", "recorded_at", "writer_epoch", "discarded"})
"""Fields of a history record; no row metric may use these names."""

_LEGACY_COST_HINTS: Final = {
    "costs_prefill": "costs/train/prefill",
    "costs_sample": "costs/train/sample",
    "costs_train": "costs/train/train",
    "costs_total": "costs/train/<source>",
}

_VALID_KEYS: set[str] = set()
_VALID_KEYS_MAX = 65_536  # keys repeat: remember valid ones so the hot path is one set lookup


def validate_key(key: object) -> str:
    """Check a key a producer wants to record and return it.

    Raises:
        InvalidMetricError: not a non-empty string, not UTF-8 encodable, no section prefix, an
            empty segment, a
            reserved ``cum`` namespace, or a legacy ``costs_*`` key (the message names the
            hierarchical replacement).
    """
    if type(key) is str and key in _VALID_KEYS:
        return key
    if not isinstance(key, str) or not key:
        raise InvalidMetricError(f"Expected a non-empty metric key but got {key!r}")
    if "/" not in key:
        if key.startswith("costs_"):
            hint = _LEGACY_COST_HINTS.get(key, f"costs/train/{key[6:]}")
            raise InvalidMetricError(
                f"Legacy cost key {key=!r} is not supported; log a hierarchical cost key "
                f"such as {hint!r} instead"
            )
        raise InvalidMetricError(
            f"Metric key must include a section prefix (e.g. 'reward/{key}') but got {key=!r}"
        )
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMetricError(
            f"Expected a key that encodes as UTF-8 (no lone surrogates) but got {key=!r}"
        ) from None
    if key.startswith("/") or key.endswith("/") or "//" in key:
        raise InvalidMetricError(f"Expected '/'-separated non-empty segments but got {key=!r}")
    if is_cumulative(key):
        raise InvalidMetricError(
            f"Metric key {key=!r} uses the reserved cumulative namespace '<section>/cum/...'; "
            "cumulative values are computed by the aggregator"
        )
    if key.startswith("costs/") and key.split("/", 2)[1] in DERIVED_COST_NAMES:
        raise InvalidMetricError(
            f"Metric key {key=!r} is computed by the aggregator (costs/outcome/..., the run "
            f"budget's keys); reserved names under costs/: {sorted(DERIVED_COST_NAMES)}"
        )
    if len(_VALID_KEYS) < _VALID_KEYS_MAX:
        _VALID_KEYS.add(key)
    return key


def check_value(
    key: str, value: object, *, cost: bool | None = None, bounded: bool = True
) -> float:
    """Return ``value`` as a finite float, or raise naming the key.

    ``bool`` is refused (``True`` is not a number of dollars). Negative values are refused for
    cost keys (``cost`` defaults to ``key.startswith("costs/")``). Values that are summed
    (``bounded``) must lie within :data:`MAX_ABS_VALUE`.

    >>> check_value("costs/train/x", 0.25)
    0.25
    """
    kind = type(value)
    if kind is float and -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:  # type: ignore[operator]
        if value < 0 and (key.startswith("costs/") if cost is None else cost):  # type: ignore[operator]
            raise InvalidMetricError(f"Expected a non-negative cost for {key=!r} but got {value!r}")
        return value  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Decimal)):
        raise InvalidMetricError(f"Expected a finite number for {key=!r} but got {value!r}")
    if kind is float:
        f: float = value  # type: ignore[assignment]
    else:
        if isinstance(value, Decimal) and not value.is_finite():  # sNaN cannot become a float
            raise InvalidMetricError(f"Expected a finite number for {key=!r} but got {value!r}")
        try:
            f = float(value)
        except OverflowError:  # an int or Decimal beyond float range
            f = float("inf")
    if f - f != 0.0:  # NaN or an infinity
        raise InvalidMetricError(f"Expected a finite number for {key=!r} but got {value!r}")
    if bounded and not -MAX_ABS_VALUE <= f <= MAX_ABS_VALUE:
        raise InvalidMetricError(
            f"Expected a number within +-{MAX_ABS_VALUE:g} for {key=!r} but got {value!r}"
        )
    if (key.startswith("costs/") if cost is None else cost) and f < 0:
        raise InvalidMetricError(f"Expected a non-negative cost for {key=!r} but got {value!r}")
    return f


def check_sum(key: str, total: object) -> None:
    """Raise unless a running sum (exact, e.g. a ``Decimal``) stays within :data:`MAX_ABS_VALUE`,
    the bound the aggregator enforces on pending sums.

    >>> check_sum("time/step_x", Decimal("1e300"))
    """
    try:  # exactly, as the aggregator compares its pending sums
        exact = total if isinstance(total, Decimal) else Decimal(total)  # type: ignore[arg-type]
        ok = exact.is_finite() and exact.copy_abs() <= MAX_ABS_SUM  # copy_abs never rounds
    except (ArithmeticError, TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidMetricError(
            f"Adding this value to {key=!r} makes its sum {total!r} leave +-{MAX_ABS_VALUE:g}"
        )


def check_text(what: str, value: object) -> str:
    """Return a non-empty string that encodes as UTF-8 (ids, scopes), or raise naming it.

    >>> check_text("producer_id", "judge-1")
    'judge-1'
    """
    if not isinstance(value, str) or not value:
        raise InvalidMetricError(f"Expected {what} as a non-empty string but got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMetricError(
            f"Expected {what} that encodes as UTF-8 (no lone surrogates) but got {value!r}"
        ) from None
    return value


def finite_float(key: str, value: object) -> float:
    """Return a number as a finite float (for rows and history records), or raise naming the key.

    >>> finite_float("loss/train", Decimal("0.5"))
    0.5
    """
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise InvalidMetricError(f"Expected a number for {key=!r} but got {value!r}")
    try:
        out = float(value)
    except OverflowError:
        out = float("inf")
    if out - out != 0.0:
        raise InvalidMetricError(f"Expected a finite value for {key=!r} but got {value!r}")
    return out


def check_row_key(key: str) -> str:
    """Return a row key the history can store (not one of :data:`RESERVED_ROW_KEYS`).

    >>> check_row_key("loss/train")
    'loss/train'
    """
    if key in RESERVED_ROW_KEYS:
        raise InvalidMetricError(
            f"Expected a metric key but got the reserved history field {key=!r}"
        )
    return key


def check_step(step: object, what: str = "step") -> int:
    """Return a step: an ``int`` (not ``bool``) in ``[0, MAX_STEP]``.

    >>> check_step(3)
    3
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise InvalidMetricError(f"Expected a {what} in [0, {MAX_STEP}] but got {step!r}")
    return step


def check_split(split: object) -> str:
    """Return a split name: letters, digits, ``_`` or ``.`` (it is part of object names).

    >>> check_split("train")
    'train'
    """
    if not isinstance(split, str) or not _SPLIT_RE.fullmatch(split):
        raise InvalidMetricError(
            f"Expected a split of letters, digits, '_' or '.' but got {split!r}"
        )
    return split


def check_cost_context(context: object) -> str:
    """Return a cost context (the segment after ``costs/``) stripped of surrounding space.

    >>> check_cost_context(" train ")
    'train'
    """
    text = context.strip() if isinstance(context, str) else ""
    if not text:
        raise InvalidMetricError(f"Expected a non-empty cost_context but got {context!r}")
    if text.partition("/")[0] in DERIVED_COST_NAMES or text.partition("/")[0] == "cum":
        raise InvalidMetricError(
            f"Expected a cost_context that is not computed by the aggregator but got {text!r}"
        )
    return check_text("cost_context", text)
