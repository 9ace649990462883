"""The barrier math: folding a slot's pending leaves into a row (the *close* stage).

Pure Python, no I/O. :func:`close_buffer` (with its two halves :func:`plan_close` and
:func:`commit_close`) turns one :class:`~art_ray_metrics.core.buffer.StepBuffer` into a row and
updates the run's :class:`~art_ray_metrics.core.buffer.CumulativeState`; the in-process builder
calls it per scope. :func:`close_step` closes one ``(step, split)`` of an aggregator's state
(:class:`~art_ray_metrics.core.state.AggregatorState` delegates to it): a split's scope
(:func:`~art_ray_metrics.core.keys.scope_for_split`) gives the slot whose leaves the row takes,
with the late leaves held for that scope and the leaves of skipped steps.

Temporality. Leaves are *per-step deltas*; rows carry per-step values plus *cumulative twins*
that add up every closed step of the run (shared by all scopes)::

    step 1: costs/train/judge 0.25            -> costs/train 0.25, costs/all 0.25, costs/cum/all 0.25
    step 2: costs/train/judge 0.50, costs/gpu 1 -> costs/train 0.50, costs/all 1.50, costs/cum/all 1.75
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from art_ray_metrics.core import keys as K
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.budget import BudgetLedger
from art_ray_metrics.core.buffer import CumulativeState, StepBuffer
from art_ray_metrics.core.outcome import FateMemory, FateTable, outcome_row
from art_ray_metrics.core.rollup import EXACT, ZERO, cost_rollups, to_decimal
from art_ray_metrics.core.samples import sample_row
from art_ray_metrics.errors import InvalidMetricError

__all__ = [
    "OUTCOMES_ON_KEY",
    "ClosingState",
    "StepReport",
    "close_buffer",
    "close_step",
    "commit_close",
    "outcomes_on",
    "plan_close",
    "split_trainer_metrics",
]

_add = EXACT.add

Slot = tuple[int, str]
"""``(step, scope)``: the row a leaf closes into."""


def close_buffer(buf: StepBuffer, cum: CumulativeState) -> dict[str, float]:
    """Fold one step's buffer into the cumulative state and return its row.

    The row holds the summed leaves, cost rollups and ``costs/all``, cumulative twins of every
    ``costs/``, ``time/`` and ``data/`` key, idle cumulatives, the unique-scenario count (when
    scenarios arrived), the throughput averages and, per sampled key, its mean, standard
    deviation, count, min and max. A summed leaf keeps its key if a sampled key of the same name
    arrived too (the clash is recorded in ``buf.conflicts``). An empty buffer gives ``{}``.

    Raises:
        InvalidMetricError: a row value would not be a finite float; ``cum`` is unchanged.
    """
    row, updates = plan_close(buf, cum)
    commit_close(buf, cum, updates)
    return row


def plan_close(
    buf: StepBuffer, cum: CumulativeState
) -> tuple[dict[str, float], dict[str, Decimal]]:
    """The row of :func:`close_buffer` and the cumulative values it sets; changes nothing but
    ``buf.conflicts``.

    Raises:
        InvalidMetricError: a row value would not be a finite float (naming the key).
    """
    result: dict[str, Decimal] = dict(buf.sums)
    result.update(cost_rollups({k: v for k, v in result.items() if k.startswith("costs/")}))
    values = cum.values
    updates: dict[str, Decimal] = {}
    for key, value in list(result.items()):
        if key.partition("/")[0] in K.CUMULATIVE_SECTIONS:
            cum_key = K.to_cumulative(key)
            total = _add(updates.get(cum_key, values.get(cum_key, ZERO)), value)
            updates[cum_key] = total
            result[cum_key] = total
    for step_key, cum_key in K.IDLE_CUMULATIVE_KEYS.items():
        if step_key in result:
            total = _add(updates.get(cum_key, values.get(cum_key, ZERO)), result[step_key])
            updates[cum_key] = total
            result[cum_key] = total
    if buf.scenarios:
        new = buf.scenarios
        found = cum.scenarios.contains_many(list(new))
        unique = len(cum.scenarios) + sum(1 for f in found if not f)
        result["data/cum/num_unique_scenarios"] = Decimal(unique)
    row = {k: V.finite_float(k, v) for k, v in result.items()}
    for kind in ("trainer", "actor"):
        if f"data/step_{kind}_tokens" in result or f"time/step_{kind}_s" in result:
            tokens = updates.get(f"data/cum/{kind}_tokens", values.get(f"data/cum/{kind}_tokens"))
            seconds = updates.get(f"time/cum/{kind}_s", values.get(f"time/cum/{kind}_s"))
            if tokens is not None and seconds is not None and float(seconds) > 0:
                rate = float(tokens) / float(seconds)
                if rate - rate == 0.0:  # a derived gauge: omitted, never a failed barrier
                    row[f"throughput/avg_{kind}_tok_per_s"] = rate
    for key, stats in sorted(buf.samples.items()):
        for out_key, number in sample_row(key, stats).items():
            if out_key in row:
                buf.conflicts.append((out_key, key))
            else:
                row[out_key] = V.finite_float(out_key, number)
    return row, updates


def commit_close(buf: StepBuffer, cum: CumulativeState, updates: Mapping[str, Decimal]) -> None:
    """Apply a :func:`plan_close` to the cumulative state (cannot fail)."""
    cum.values.update(updates)
    if buf.scenarios:
        cum.scenarios.add_many(buf.scenarios)
    if buf.cost_ids:
        cum.cost_ids.add_many(buf.cost_ids)


@dataclass(frozen=True, slots=True)
class StepReport:
    """The result of closing one ``(step, split)``."""

    step: int
    split: str
    row: dict[str, float]
    late_leaves: int = 0
    conflicts: tuple[tuple[str, str], ...] = ()
    producers: frozenset[str] = field(default_factory=frozenset)
    lost_leaves: int = 0
    """Leaves of this row's steps refused at ingest or dropped at a producer's cap."""


class ClosingState(Protocol):
    """What :func:`close_step` reads and changes of an aggregator's state."""

    budget: BudgetLedger
    fates: FateMemory
    cum: CumulativeState
    pending: dict[Slot, StepBuffer]
    late: dict[Slot, StepBuffer]
    last_closed: dict[str, int]
    last_closed_split: dict[str, int]
    pending_cost_ids: set[bytes]
    counters: dict[str, int]


def split_trainer_metrics(
    metrics: Mapping[str, float] | None,
) -> tuple[list[tuple[str, Decimal]], dict[str, float]]:
    """Validate the trainer's metrics for a row: (builder-managed leaves, pass-through values)."""
    managed: list[tuple[str, Decimal]] = []
    passthrough: dict[str, float] = {}
    for raw_key, value in (metrics or {}).items():
        if not isinstance(raw_key, str) or not raw_key:
            raise InvalidMetricError(f"Expected a non-empty metric key but got {raw_key!r}")
        if raw_key.startswith("costs_"):
            V.validate_key(raw_key)  # raises the legacy-key error with its replacement
        key = K.canonical_backend_key(raw_key)
        is_managed = K.is_builder_managed(key)
        number = V.check_value(key, value, bounded=is_managed)
        if is_managed:
            V.validate_key(key)
            managed.append((key, to_decimal(value if isinstance(value, Decimal) else number)))
        else:
            if K.is_cumulative(key) and key.partition("/")[0] in K.COMPUTED_CUMULATIVE_SECTIONS:
                V.validate_key(key)  # raises: the aggregator computes these
            passthrough[key] = number
    # a leaf/ancestor clash among the trainer's own managed keys is the trainer's error
    probe = StepBuffer()
    for managed_key, managed_value in managed:
        probe.add(managed_key, managed_value, strict=True)
    return managed, passthrough


def close_step(
    state: ClosingState,
    step: int,
    split: str = "train",
    metrics: Mapping[str, float] | None = None,
    group_fates: Mapping[Any, str] | None = None,
    derived_fates: Mapping[Any, str] | None = None,
) -> StepReport:
    """Close ``(step, split)`` of ``state`` and return its row.

    ``metrics`` are the trainer's own values for the row: backend names are mapped into the
    taxonomy, builder-managed keys are summed with the producers' leaves, other keys pass
    through (a builder key of the same name wins, as in ART). Every key is routed as in ART
    and the row gets ``training_step``. A transaction: the whole row is computed and
    checked first (every value a finite float, no reserved history field), and a close that
    raises :class:`InvalidMetricError` leaves the state as it was.

    The row also splits its spend by the fates ``group_fates`` gives (``{group_id: fate}``,
    :mod:`~art_ray_metrics.core.outcome`) and carries the run budget's keys
    (:meth:`~art_ray_metrics.core.budget.BudgetLedger.row`, only under a budget).
    ``derived_fates`` are fates an integration derived itself (the ART adapter's); they are
    attributed as ``group_fates`` are (which win for the same group) but do not turn the
    outcome keys on: those appear from the first row whose spend carried a group id or whose
    barrier was given ``group_fates``, and then on every row with a cost
    (:func:`outcomes_on`), so a run that uses neither keeps its rows as they were.
    """
    V.check_step(step)
    V.check_split(split)
    managed, passthrough = split_trainer_metrics(metrics)
    given = FateTable.from_trainer(group_fates)  # raises InvalidMetricError
    fates = FateTable({**FateTable.from_trainer(derived_fates).fates, **given.fates})
    scope = K.scope_for_split(split)
    # a transaction: build the row on a fresh buffer, commit only once nothing can fail
    buf, late, older = _gather(state, step, scope)
    for key, value in managed:
        buf.add(key, value, strict=False)
    computed, updates = plan_close(buf, state.cum)  # raises InvalidMetricError
    spend_row = _plan_outcomes(state, buf, fates, updates, given=bool(given.fates))
    computed.update({k: V.finite_float(k, v) for k, v in spend_row.items()})
    routed = _routed_row({**passthrough, **computed}, step, split)
    _commit(state, (step, scope), split, buf, (late, older), updates)
    state.fates.remember(fates)
    state.budget.on_trainer_cost(_cost_total(managed))
    budget_row = state.budget.row(train_close=split == "train")
    routed.update({K.route_key(k, split): float(v) for k, v in budget_row.items()})
    return StepReport(
        step,
        split,
        routed,
        buf.late_leaves,
        tuple(buf.conflicts),
        frozenset(buf.producers),
        buf.lost_leaves,
    )


OUTCOMES_ON_KEY = "costs/cum/outcome/unknown"
_CUM_ALL = "costs/cum/all"


def _cost_total(leaves: Iterable[tuple[str, Decimal]]) -> Decimal:
    total = ZERO
    for key, value in leaves:
        if key.startswith("costs/"):
            total = _add(total, value)
    return total


def outcomes_on(cum: Mapping[str, Decimal]) -> bool:
    """Whether the run's rows carry the outcome keys: from the first row that had them on, the
    cumulative ``costs/cum/outcome/unknown`` is in the run's cumulative values (so the
    checkpoint keeps it, and a rewind to before that row turns them off again)."""
    return OUTCOMES_ON_KEY in cum


def _plan_outcomes(
    state: ClosingState,
    buf: StepBuffer,
    fates: FateTable,
    updates: dict[str, Decimal],
    *,
    given: bool,
) -> dict[str, Decimal]:
    """The row's outcome keys (:func:`~art_ray_metrics.core.outcome.outcome_row`), once they
    are on (:func:`outcomes_on`, or this row turns them on); their cumulative values join
    ``updates``. The row that turns them on seeds ``costs/cum/outcome/unknown`` with the
    run's earlier spend, so the cumulative twins add up to ``costs/cum/all`` too."""
    cum = {**state.cum.values, **updates}
    if not outcomes_on(state.cum.values):
        if not (buf.group_spend or given):
            return {}
        cum[OUTCOMES_ON_KEY] = state.cum.values.get(_CUM_ALL, ZERO)
    costs = [(k, v) for k, v in buf.sums.items() if k.startswith("costs/")]
    new_scenarios = 0
    if buf.scenarios:
        found = state.cum.scenarios.contains_many(list(buf.scenarios))
        new_scenarios = sum(1 for f in found if not f)
    row, cum_updates = outcome_row(
        _cost_total(costs) if costs else None,
        buf.group_spend,
        fates,
        new_unique_scenarios=new_scenarios,
        cum=cum,
        memory=state.fates,
    )
    updates.update(cum_updates)
    updates.setdefault(OUTCOMES_ON_KEY, cum[OUTCOMES_ON_KEY])  # on from this row, even costless
    return row


def _gather(
    state: ClosingState, step: int, scope: str
) -> tuple[StepBuffer, list[Slot], list[Slot]]:
    """A fresh buffer holding what the row of ``(step, scope)`` takes, and the late and older
    pending slots it took (their buffers are dropped at the commit)."""
    current = state.pending.get((step, scope))
    late = sorted(k for k in state.late if k[1] == scope)
    older = [k for k in state.pending if k[1] == scope and k[0] < step]
    buf = StepBuffer()
    if current is not None:
        buf.merge(current)
    for held in late:
        buf.merge(state.late[held])
    for skipped in older:  # a step the trainer skipped: its leaves are late
        stale = state.pending[skipped]
        buf.merge(stale)
        buf.late_leaves += len(stale.sums) + len(stale.samples)
    return buf, late, older


def _routed_row(row: Mapping[str, float], step: int, split: str) -> dict[str, float]:
    """``row`` with every key routed as in ART, checked, and ``training_step`` added.

    Raises:
        InvalidMetricError: a routed key is a reserved history field.
    """
    routed = {K.route_key(k, split): v for k, v in row.items()}
    for routed_key in routed:
        V.check_row_key(routed_key)
    routed["training_step"] = float(step)
    return routed


def _commit(
    state: ClosingState,
    slot: Slot,
    split: str,
    buf: StepBuffer,
    taken: tuple[list[Slot], list[Slot]],
    updates: Mapping[str, Decimal],
) -> None:
    """Apply a planned close of ``slot`` for ``split`` (cannot fail): drop the buffers it took
    (``taken``: its late slots and its skipped pending ones), fold it into the cumulative state
    and move the last closed steps."""
    step, scope = slot
    late, older = taken
    state.pending.pop(slot, None)
    for held in late:
        state.late.pop(held)
    for skipped in older:
        state.pending.pop(skipped)
    commit_close(buf, state.cum, updates)
    state.pending_cost_ids -= buf.cost_ids
    prev = state.last_closed.get(scope)
    state.last_closed[scope] = step if prev is None else max(prev, step)
    prev = state.last_closed_split.get(split)
    state.last_closed_split[split] = step if prev is None else max(prev, step)
    state.counters["rows"] += 1
