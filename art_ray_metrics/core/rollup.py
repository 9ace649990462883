"""Exact money: decimal conversion and hierarchical cost rollups.

Every summed value is held as a :class:`~decimal.Decimal` with 100 significant digits, so sums
are exact and independent of the order in which producers' leaves arrive (binary floats are
not associative: ``(0.1 + 0.2) + 0.3 != 0.1 + (0.2 + 0.3)``). A float enters through its
shortest ``repr`` (``0.1`` is ten cents, not ``0.1000000000000000055…``) and leaves as the
nearest float only when a row is emitted.

Rollups: every cost leaf adds its value to each proper ancestor at depth ≥ 2, and
``costs/all`` is the sum over the top-level children, which is the sum of all leaves::

    costs/train/llm_judge/general        0.08  ┐
    costs/train/llm_judge/hallucination  0.04  ┴─ costs/train/llm_judge 0.12 ┐
    costs/train/tinker_train             1.20  ───────────────────────────── ├─ costs/train 1.77 ┐
    costs/train/tinker_inference         0.45  ───────────────────────────── ┘                   ├─ costs/all 1.83
    costs/eval/llm_judge/correctness     0.06  ─ costs/eval/llm_judge 0.06 ── costs/eval 0.06 ───┘

>>> leaves = {"costs/train/llm_judge/general": to_decimal(0.08),
...           "costs/train/llm_judge/hallucination": to_decimal(0.04),
...           "costs/train/tinker_train": to_decimal(1.20),
...           "costs/train/tinker_inference": to_decimal(0.45),
...           "costs/eval/llm_judge/correctness": to_decimal(0.06)}
>>> {k: str(v) for k, v in sorted(cost_rollups(leaves).items())}  # doctest: +NORMALIZE_WHITESPACE
{'costs/all': '1.83', 'costs/eval': '0.06', 'costs/eval/llm_judge': '0.06',
 'costs/train': '1.77', 'costs/train/llm_judge': '0.12'}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from decimal import Context, Decimal, localcontext

__all__ = ["EXACT", "ZERO", "cost_rollups", "exact_sum", "to_decimal"]

EXACT = Context(prec=100)
"""The arithmetic context of every sum: wide enough that adding money, seconds and tokens of
any realistic magnitude never rounds."""
ZERO = Decimal(0)


def to_decimal(value: float | int | Decimal) -> Decimal:
    """Convert a finite number exactly as written: floats through their shortest repr.

    >>> to_decimal(0.1) + to_decimal(0.2) == to_decimal(0.3)
    True
    """
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int):
        return Decimal(value)
    return Decimal(repr(value))


def exact_sum(values: Sequence[float | int | Decimal]) -> Decimal:
    """The exact decimal sum of validated finite numbers; equal values are converted once.

    >>> exact_sum([0.1, 0.2, 0.1, 3])
    Decimal('3.4')
    >>> exact_sum([0.1, 0.2, 0.3])
    Decimal('0.6')
    """
    counts = Counter(values)
    with localcontext(EXACT):
        if len(counts) == len(values) and all(type(v) is float for v in values):
            return sum(map(Decimal, map(repr, values)), ZERO)  # all distinct: one C-level pass
        return sum((to_decimal(v) * n for v, n in counts.items()), ZERO)


def cost_rollups(costs: Mapping[str, Decimal]) -> dict[str, Decimal]:
    """Return the ancestors of the given ``costs/...`` leaves and ``costs/all``.

    ``costs`` holds only leaves (no leaf is an ancestor of another). Returns ``{}`` when empty.
    """
    if not costs:
        return {}
    add = EXACT.add
    rollups: dict[str, Decimal] = {}
    total = ZERO
    for key, value in costs.items():
        total = add(total, value)
        end = key.find("/", 6)  # first ancestor at depth 2: "costs/<child>"
        while end != -1:
            parent = key[:end]
            rollups[parent] = add(rollups.get(parent, ZERO), value)
            end = key.find("/", end + 1)
    rollups["costs/all"] = total
    return rollups
