"""Resume from an older step: the pure rewind policy over an :class:`AggregatorState`.

Rewinding to ``k`` restores the state right after the last close of a step ``<= k``, so rows
closed afterwards equal those of a run that never failed. The policy and the record format are
described in ``docs/design.md`` ("Rewinds"). The actor's protocol, per barrier and rewind::

    key, data, evicted = record_close(state, step, split, new_scenarios, new_cost_ids, window=n)
    plan = plan_rewind(state, k, keep_late=..., window=n)     # None: nothing to discard
    result = apply_rewind(state, plan, base, records, keep_late=...)

The shell stores ``data`` at ``key`` before the checkpoint, reads ``plan.base_key`` and
``plan.keys``, appends ``result.tombstones`` to its tombstone shards, stores
``result.rewritten`` (the kept closes applied again) and forgets the evicted and dropped
objects. The shell serialises rewinds with closes: none may run between a plan and its apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import msgpack
import numpy as np

from art_ray_metrics.core.buffer import StepBuffer
from art_ray_metrics.core.dedupe import DIGEST_SIZE
from art_ray_metrics.core.keys import scope_for_split
from art_ray_metrics.core.meta import RewindEntry
from art_ray_metrics.core.rollup import ZERO
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.core.wire import decode_envelope
from art_ray_metrics.errors import InvalidMetricError, WireFormatError

__all__ = [
    "REWIND_FORMAT",
    "REWIND_PREFIX",
    "TOMBSTONES",
    "RewindPlan",
    "RewindRecord",
    "RewindResult",
    "apply_rewind",
    "decode_record",
    "encode_record",
    "forgotten_last_rows",
    "net_shards",
    "plan_rewind",
    "record_close",
    "record_key",
]

REWIND_PREFIX = "rewind/"
"""Key prefix of the rewind objects."""
REWIND_FORMAT = 1
"""Format version of a rewind object."""
TOMBSTONES = {"scenarios": "scenarios_rewound", "cost_ids": "cost_ids_rewound"}
"""Shard family of the ids a rewind removed, per ledger family."""

_CUM_ALL = "costs/cum/all"
_FIELDS = ("format", "step", "split", "cum", "last_closed", "scenarios", "cost_ids")


@dataclass(frozen=True, slots=True)
class RewindRecord:
    """The state right after one close and the ids that close added."""

    step: int
    split: str
    cum: dict[str, Decimal]
    last_closed: dict[str, int]
    scenarios: bytes = b""
    cost_ids: bytes = b""


@dataclass(frozen=True, slots=True)
class RewindPlan:
    """What a rewind discards, computed before the shell reads any object.

    Attributes:
        step: the target step.
        first: index in ``meta.rewind`` of the first discarded close.
        base_key: the object of the close to restore (``None``: back to the empty state).
        keys: the objects of every close from ``first`` on, oldest first: the discarded ones
            (steps after the target) and the kept ones closed after them (a val barrier of
            a kept step that closed after a later train step), which are applied again.
        discarded: ``(step, split)`` of the discarded closes.
        pending_later: pending buffers of steps after the target (dropped).
        late_later: late buffers of steps after the target (dropped; empty for an implicit
            rewind, which keeps them for the re-executed step).
    """

    step: int
    first: int
    base_key: str | None
    keys: tuple[str, ...]
    discarded: frozenset[tuple[int, str]]
    pending_later: tuple[tuple[int, str], ...]
    late_later: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RewindResult:
    """What :func:`apply_rewind` changed.

    Attributes:
        discarded_steps: closed ``(step, split)`` pairs discarded.
        discarded_buffers: pending and late buffers dropped.
        costs_usd: spend that left the totals.
        tombstones: removed ids (concatenated digests) per tombstone shard family.
        dropped_keys: rewind objects of the closes from ``first`` on (unqueue or delete them).
        rewritten: ``(key, object bytes)`` of the kept closes applied again, now after the
            target (store them before the commit that names them).
    """

    discarded_steps: int
    discarded_buffers: int
    costs_usd: Decimal
    tombstones: dict[str, bytes] = field(default_factory=dict)
    dropped_keys: tuple[str, ...] = ()
    rewritten: tuple[tuple[str, bytes], ...] = ()

    def summary(self) -> dict[str, Any]:
        """The plain dict returned by the actor's ``rewind``."""
        return {
            "discarded_steps": self.discarded_steps,
            "discarded_buffers": self.discarded_buffers,
            "costs_usd": float(self.costs_usd),
        }


# -- the object format -----------------------------------------------------------------------


def record_key(step: int, split: str, close_seq: int) -> str:
    """The object key of one close's rewind record."""
    return f"{REWIND_PREFIX}{step:012d}-{split}-{close_seq:012d}.bin"


def encode_record(record: RewindRecord) -> bytes:
    """Serialise a record (format version 1)."""
    out: bytes = msgpack.packb(
        {
            "format": REWIND_FORMAT,
            "step": record.step,
            "split": record.split,
            "cum": {k: str(v) for k, v in record.cum.items()},
            "last_closed": dict(record.last_closed),
            "scenarios": record.scenarios,
            "cost_ids": record.cost_ids,
        },
        use_bin_type=True,
    )
    return out


def _digests_field(value: object, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) % DIGEST_SIZE:
        raise WireFormatError(
            f"Expected {name} as bytes in multiples of {DIGEST_SIZE} but got {value!r:.80}"
        )
    return value


def decode_record(data: bytes) -> RewindRecord:
    """Parse and check a rewind object.

    Raises:
        WireFormatError: malformed, truncated, of an unknown version or with a bad field.
    """
    obj = decode_envelope(data, what="a rewind record", versions=(REWIND_FORMAT,))
    if set(obj) != set(_FIELDS):
        raise WireFormatError(f"Expected rewind record fields {_FIELDS} but got {sorted(obj)!r}")
    step, split, cum, last_closed = obj["step"], obj["split"], obj["cum"], obj["last_closed"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise WireFormatError(f"Expected step as an int >= 0 but got {step!r}")
    if not isinstance(split, str) or not split:
        raise WireFormatError(f"Expected split as a non-empty str but got {split!r}")
    if not isinstance(cum, dict) or not isinstance(last_closed, dict):
        raise WireFormatError(f"Expected cum and last_closed as maps but got {cum!r:.80}")
    values: dict[str, Decimal] = {}
    for key, value in cum.items():
        if not isinstance(key, str) or not key:
            raise WireFormatError(f"Expected cum keys as non-empty str but got {key!r}")
        try:
            number = Decimal(value) if isinstance(value, str) else None
        except InvalidOperation:
            number = None
        if number is None or not number.is_finite():
            raise WireFormatError(f"Expected a decimal string for cum {key!r} but got {value!r}")
        values[key] = number
    closed: dict[str, int] = {}
    for scope, value in last_closed.items():
        if not isinstance(scope, str) or not scope:
            raise WireFormatError(f"Expected last_closed scopes as non-empty str but got {scope!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise WireFormatError(f"Expected last_closed[{scope!r}] >= 0 but got {value!r}")
        closed[scope] = value
    return RewindRecord(
        step,
        split,
        values,
        closed,
        _digests_field(obj["scenarios"], "scenarios"),
        _digests_field(obj["cost_ids"], "cost_ids"),
    )


# -- tombstones ------------------------------------------------------------------------------


def _digests(data: bytes) -> np.ndarray[Any, np.dtype[np.bytes_]]:
    return np.frombuffer(data, dtype=f"S{DIGEST_SIZE}")


def net_shards(shards: Mapping[str, bytes]) -> dict[str, bytes]:
    """Ledger shards minus their tombstones: an id counts iff added more often than removed.

    Families without tombstones are returned unchanged; the tombstone families stay in the
    result (the state ignores them).
    """
    out = dict(shards)
    for family, tomb in TOMBSTONES.items():
        removed = shards.get(tomb, b"")
        if not removed:
            continue
        added, added_n = np.unique(_digests(shards.get(family, b"")), return_counts=True)
        gone, gone_n = np.unique(_digests(removed), return_counts=True)
        minus = np.zeros(added.size, dtype=np.int64)
        if gone.size:
            idx = np.minimum(np.searchsorted(gone, added), gone.size - 1)
            hit = gone[idx] == added
            minus[hit] = gone_n[idx[hit]]
        out[family] = added[added_n > minus].tobytes()
    return out


# -- the window ------------------------------------------------------------------------------


def record_close(
    state: AggregatorState,
    step: int,
    split: str,
    scenarios: bytes,
    cost_ids: bytes,
    *,
    window: int,
) -> tuple[str, bytes, list[str]]:
    """Record the close of ``(step, split)`` just made and slide the window.

    ``scenarios`` and ``cost_ids`` are the digests that close added to the ledgers. Returns
    ``(key, object bytes, evicted keys)``; the evicted objects left the window (``window`` >= 1
    keeps the new one).
    """
    meta = state.meta
    meta.close_seq += 1
    key = record_key(step, split, meta.close_seq)
    record = RewindRecord(
        step, split, dict(state.cum.values), dict(state.last_closed), scenarios, cost_ids
    )
    entries = meta.rewind
    entries.append(RewindEntry(step, split, key))
    evicted = []
    while len(entries) > window:
        old = entries.pop(0)
        meta.rewind_floor = max(meta.rewind_floor, old.step)
        evicted.append(old.key)
    return key, encode_record(record), evicted


def plan_rewind(
    state: AggregatorState, step: int, *, keep_late: bool, window: int
) -> RewindPlan | None:
    """Decide what rewinding to ``step`` discards; ``None`` when there is nothing to discard.

    Raises:
        InvalidMetricError: rewinding is disabled (``window <= 0``) or the close to restore
            left the window.
    """
    meta = state.meta
    entries = meta.rewind
    first = next((i for i, r in enumerate(entries) if r.step > step), None)
    pending_later = tuple(k for k in state.pending if k[0] > step)
    late_later = () if keep_late else tuple(k for k in state.late if k[0] > step)
    if first is None and not pending_later and not late_later:
        return None
    first = len(entries) if first is None else first
    if window <= 0 or (first == 0 and meta.rewind_floor >= 0):
        oldest = entries[0].step if entries else "none"
        raise InvalidMetricError(
            f"Expected a step to rewind to >= {oldest} (the oldest step still restorable "
            f"with rewind_window={window}) but got {step!r}"
        )
    after = entries[first:]
    return RewindPlan(
        step=step,
        first=first,
        base_key=entries[first - 1].key if first > 0 else None,
        keys=tuple(r.key for r in after),
        discarded=frozenset((r.step, r.split) for r in after if r.step > step),
        pending_later=pending_later,
        late_later=late_later,
    )


def apply_rewind(
    state: AggregatorState,
    plan: RewindPlan,
    base: RewindRecord | None,
    records: Sequence[RewindRecord],
    *,
    keep_late: bool,
) -> RewindResult:
    """Go back to the state right after ``base`` (without one: the state before the first
    close, empty unless a cumulative state was adopted, ``meta.baseline_cum``), then apply
    again the kept closes made after it (their steps are at or below the target).

    ``records`` are the decoded objects of ``plan.keys``. Restores cumulative values and last
    closed steps, adds back what each kept close added to the cumulative values (its record
    minus the one before it), removes the ids the discarded closes added, drops pending buffers
    of later steps (and late buffers unless ``keep_late``: an implicit rewind keeps them for
    the re-executed step; an explicit one keeps those recorded for the steps it keeps),
    recomputes the pending paid-response ids and updates the meta fields.
    """
    before = state.cum.values.get(_CUM_ALL, ZERO)
    replay = _replay_kept(state, plan, base, records)
    state.cum.values = replay.cum
    state.last_closed = replay.last_closed
    lost = before - replay.cum.get(_CUM_ALL, ZERO)
    tombstones = _remove_ids(state, replay.gone)
    dropped = _drop_buffers(state, plan)
    for buf in dropped:
        lost += sum((v for k, v in buf.sums.items() if k.startswith("costs/")), ZERO)
    _rewind_meta(state, plan, replay.kept, lost)
    return RewindResult(
        len(plan.discarded), len(dropped), lost, tombstones, plan.keys, tuple(replay.rewritten)
    )


@dataclass(slots=True)
class _Replay:
    """The cumulative state after a rewind's base and its kept closes (see :func:`_replay_kept`)."""

    cum: dict[str, Decimal]
    last_closed: dict[str, int]
    gone: list[RewindRecord] = field(default_factory=list)
    """The records of the discarded closes."""
    kept: list[RewindEntry] = field(default_factory=list)
    """The window entries of the kept closes, applied again (with new close numbers)."""
    rewritten: list[tuple[str, bytes]] = field(default_factory=list)
    """Their rewind objects, ``(key, bytes)``."""


def _replay_kept(
    state: AggregatorState,
    plan: RewindPlan,
    base: RewindRecord | None,
    records: Sequence[RewindRecord],
) -> _Replay:
    """Start from ``base`` and add again what each kept close after it added; changes only
    ``meta.close_seq`` (the kept closes get new rewind objects)."""
    meta = state.meta
    # before every close kept: the values adopted before the first close (usually none)
    base_cum = base.cum if base else meta.baseline_cum
    out = _Replay(dict(base_cum), dict(base.last_closed) if base else {})
    cum, last_closed = out.cum, out.last_closed
    prev = base_cum
    for record in records:
        if record.step > plan.step:
            out.gone.append(record)
        else:  # a kept close made after a discarded one: what it added, on the new base
            for key, value in record.cum.items():
                delta = value - prev.get(key, ZERO)
                if delta:
                    cum[key] = cum.get(key, ZERO) + delta
            scope = scope_for_split(record.split)
            last_closed[scope] = max(last_closed.get(scope, record.step), record.step)
            meta.close_seq += 1
            key = record_key(record.step, record.split, meta.close_seq)
            again = RewindRecord(
                record.step,
                record.split,
                dict(cum),
                dict(last_closed),
                record.scenarios,
                record.cost_ids,
            )
            out.kept.append(RewindEntry(record.step, record.split, key))
            out.rewritten.append((key, encode_record(again)))
        prev = record.cum
    return out


def _remove_ids(state: AggregatorState, gone: Sequence[RewindRecord]) -> dict[str, bytes]:
    """Remove from the ledgers the ids the discarded closes added; their tombstones."""
    tombstones: dict[str, bytes] = {}
    removed = b"".join(r.scenarios for r in gone)
    if removed:
        state.cum.scenarios = state.cum.scenarios.without(removed)
        tombstones[TOMBSTONES["scenarios"]] = removed
    removed = b"".join(r.cost_ids for r in gone)
    if removed:
        state.cum.cost_ids = state.cum.cost_ids.without(removed)
        tombstones[TOMBSTONES["cost_ids"]] = removed
    return tombstones


def _drop_buffers(state: AggregatorState, plan: RewindPlan) -> list[StepBuffer]:
    """Drop the pending and late buffers the plan discards (returned) and recompute the
    pending paid-response ids."""
    dropped: list[StepBuffer] = [
        buf for k in plan.pending_later if (buf := state.pending.pop(k, None)) is not None
    ]
    # late leaves of the steps kept stay (a run that never failed counts them); those of the
    # discarded steps go with their steps
    dropped.extend(buf for k in plan.late_later if (buf := state.late.pop(k, None)) is not None)
    state.pending_cost_ids = set()
    for buf in (*state.pending.values(), *state.late.values()):
        state.pending_cost_ids |= buf.cost_ids
    return dropped


def _rewind_meta(
    state: AggregatorState, plan: RewindPlan, kept: list[RewindEntry], lost: Decimal
) -> None:
    """Forget the discarded closes in the meta fields and the splits' last closed steps, and
    count the rewind."""
    meta = state.meta
    gone = plan.discarded
    meta.last_rows = {sp: r for sp, r in meta.last_rows.items() if (r.step, sp) not in gone}
    meta.outbox = [e for e in meta.outbox if (e.step, e.split) not in gone]
    meta.history_drop.extend(sorted(gone))
    meta.rewind = meta.rewind[: plan.first] + kept
    # a split's last closed step: its own if kept, else its last close still in the window
    closed_split = {sp: st for sp, st in state.last_closed_split.items() if st <= plan.step}
    for entry in meta.rewind:
        if state.last_closed_split.get(entry.split, -1) > plan.step:
            closed_split[entry.split] = max(closed_split.get(entry.split, -1), entry.step)
    state.last_closed_split = closed_split
    meta.rewound.rewinds += 1
    meta.rewound.steps += len(gone)
    meta.rewound.costs_usd += lost


def forgotten_last_rows(state: AggregatorState) -> list[tuple[str, int, dict[str, float] | None]]:
    """After a rewind: each split whose last row it discarded, with the step of its last kept
    close and that close's row if the outbox still holds it (None: the caller reads it back
    from the history). The split gets that row back, so a retried barrier of the step is a
    retry; without it, it looked like a resume and rewound to the step before."""
    meta = state.meta
    waiting = {(e.step, e.split): e.row for e in meta.outbox}
    return [
        (split, step, waiting.get((step, split)))
        for split, step in state.last_closed_split.items()
        if split not in meta.last_rows
    ]
