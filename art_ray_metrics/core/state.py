"""The aggregation state machine: pending step buffers, the run-wide cumulative state, and
the step math described in docs/design.md. Pure Python: no I/O, threads, locks, Ray or W&B.

Temporality. Leaves are *per-step deltas*; rows carry per-step values plus *cumulative twins*
that add up every closed step of the run (shared by all scopes)::

    step 1: costs/train/judge 0.25            -> costs/train 0.25, costs/all 0.25, costs/cum/all 0.25
    step 2: costs/train/judge 0.50, costs/gpu 1 -> costs/train 0.50, costs/all 1.50, costs/cum/all 1.75

Two consumers share the machinery:

- :class:`~art_ray_metrics.builder.MetricsBuilder` (in-process, ART's API) keeps one
  :class:`StepBuffer` per scope and a :class:`CumulativeState`;
- :class:`AggregatorState` (inside the Ray actor) keeps one buffer per ``(step, scope)`` and
  ingests :class:`~art_ray_metrics.core.records.LeafBatch` es from many producers.

Invariants of :class:`AggregatorState`:

- **Idempotent ingest.** A batch is applied at most once per ``(producer_id, incarnation,
  seq)``; the window per producer incarnation is a watermark plus the set of sequence numbers
  above it. A window the producer confirmed it will never resend into (:meth:`AggregatorState.
  confirm`) is dropped; if that incarnation sends again, its window restarts at the batch's
  ``acked_upto``. So state grows with live producers, not with every producer ever seen.
- **Order independence.** Sums are exact decimals, sample summaries exact counts and sums, and
  scenario ids a set union, so any split of the same leaves into batches, in any arrival order,
  yields the same rows.
- **Paid responses once.** A cost leaf with a response id is applied once per run.
- **Nothing dropped.** A leaf for a step whose scope was already closed is *late*: it goes
  into the next row of that scope (cumulative totals stay exact) and is counted. Closing step
  ``s`` also folds in, as late, any pending leaves of that scope for steps below ``s`` that
  were never closed (a skipped step, or leaves replayed after a restart). Late leaves are held
  per ``(step they were recorded for, scope)``, so a rewind keeps those of the steps it keeps.
- **Splits, scopes, barriers.** A barrier closes ``(step, split)``: it folds the pending leaves
  of the split's scope (:func:`~art_ray_metrics.core.keys.scope_for_split`) into the row of
  ``(step, split)``. ``val`` and ``test`` share the scope ``eval``: the first of them at a step
  takes the leaves, the second the ones that arrived since. ``last_closed`` is per scope (what
  is late); ``last_closed_split`` per split (what is a resume: a split closing a step at or
  below its own last one).
- **Conflicts keep every dollar.** When one producer sends ``costs/train`` and another
  ``costs/train/x`` for the same step, the ancestor's value moves to
  ``costs/train/unattributed`` (so ``costs/train`` = x + unattributed), and the clash is
  counted and named. A single producer cannot create a conflict: it raises there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from art_ray_metrics.core import keys as K
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.counters import STATE_COUNTERS, row_values
from art_ray_metrics.core.dedupe import DigestLedger, digest, split_digests
from art_ray_metrics.core.meta import AggregatorMeta
from art_ray_metrics.core.records import IngestResult, LeafBatch, StepGroup
from art_ray_metrics.core.rollup import EXACT, ZERO, cost_rollups, to_decimal
from art_ray_metrics.core.samples import SampleStats, sample_row
from art_ray_metrics.core.wire import batch_identity, decode_batch, decode_state, encode_state
from art_ray_metrics.errors import (
    InvalidMetricError,
    MetricConflictError,
    WireFormatError,
)

__all__ = [
    "UNATTRIBUTED",
    "AggregatorState",
    "CumulativeState",
    "Decision",
    "Limits",
    "StepBuffer",
    "StepReport",
    "close_buffer",
    "commit_close",
    "plan_close",
]

UNATTRIBUTED = "unattributed"
"""Child that receives an ancestor leaf's value when two producers' leaves conflict."""

_add = EXACT.add


class StepBuffer:
    """The pending leaves of one ``(step, scope)``: exact sums with ancestor bookkeeping."""

    __slots__ = (
        "_ancestors",
        "conflicts",
        "cost_ids",
        "late_leaves",
        "lost_leaves",
        "producers",
        "samples",
        "scenarios",
        "sums",
    )

    def __init__(self) -> None:
        self.sums: dict[str, Decimal] = {}
        self._ancestors: dict[str, str] = {}  # proper prefix -> one leaf below it
        self.scenarios: set[bytes] = set()
        self.cost_ids: set[bytes] = set()
        self.conflicts: list[tuple[str, str]] = []
        self.producers: set[str] = set()
        self.late_leaves = 0
        self.lost_leaves = 0
        """Leaves of this step a producer lost: refused at ingest, or in a batch it gave up
        on at its retained-batch cap (counted on the row; never in the sums)."""
        self.samples: dict[str, SampleStats] = {}

    def __bool__(self) -> bool:
        return bool(self.sums or self.scenarios or self.samples)

    def add_samples(self, samples: Mapping[str, SampleStats]) -> None:
        """Merge per-key sample summaries (exact, in any order)."""
        own = self.samples
        for key, stats in samples.items():
            held = own.get(key)
            own[key] = stats if held is None else held.merge(stats)

    def add(self, key: str, value: Decimal, *, strict: bool = True) -> None:
        """Add ``value`` to leaf ``key``.

        Raises:
            MetricConflictError: ``strict`` and ``key`` is an ancestor or a descendant of a
                pending leaf; nothing is changed. Without ``strict`` the conflict is resolved
                into an ``unattributed`` child and recorded in :attr:`conflicts`.
        """
        sums = self.sums
        current = sums.get(key)
        if current is not None:
            sums[key] = _add(current, value)
            return
        ancestors = self._ancestors
        below = ancestors.get(key)
        if below is not None:
            if strict:
                raise MetricConflictError(
                    f"Cannot log {key!r} as a leaf: it is an ancestor of {below!r}"
                )
            self.conflicts.append((key, below))
            self.add(f"{key}/{UNATTRIBUTED}", value, strict=False)
            return
        # one pass over the proper prefixes below the section (a section alone is never a
        # leaf): a pending leaf among them is a conflict; then register them as ancestors
        prefixes = []
        cut = key.find("/", key.find("/") + 1)
        while cut != -1:
            parent = key[:cut]
            if parent in sums:
                if strict:
                    raise MetricConflictError(
                        f"Cannot log {key!r} as a leaf: {parent!r} is already a leaf ancestor"
                    )
                self.conflicts.append((parent, key))
                self.add(f"{parent}/{UNATTRIBUTED}", sums.pop(parent), strict=False)
            prefixes.append(parent)
            cut = key.find("/", cut + 1)
        for parent in prefixes:
            if parent not in ancestors:
                ancestors[parent] = key
        sums[key] = value

    def merge(self, other: StepBuffer) -> None:
        """Fold another buffer into this one (conflicts resolved, never raised)."""
        for key, value in other.sums.items():
            self.add(key, value, strict=False)
        self.add_samples(other.samples)
        self.scenarios |= other.scenarios
        self.cost_ids |= other.cost_ids
        self.producers |= other.producers
        self.late_leaves += other.late_leaves
        self.lost_leaves += other.lost_leaves
        self.conflicts.extend(other.conflicts)

    def to_wire(self) -> list[Any]:
        """Plain msgpack-able form (see :mod:`art_ray_metrics.core.wire`); sample summaries are
        appended as a seventh field only when there are any (or lost leaves follow), lost
        leaves as an eighth only when there are any (older builds wrote six or seven)."""
        out: list[Any] = [
            {k: str(v) for k, v in self.sums.items()},
            b"".join(sorted(self.scenarios)),
            b"".join(sorted(self.cost_ids)),
            sorted(self.producers),
            self.late_leaves,
            [list(c) for c in self.conflicts],
        ]
        if self.samples or self.lost_leaves:
            out.append({k: v.to_wire() for k, v in sorted(self.samples.items())})
        if self.lost_leaves:
            out.append(self.lost_leaves)
        return out

    @classmethod
    def from_wire(cls, raw: list[Any]) -> StepBuffer:
        """Inverse of :meth:`to_wire`; re-adds leaves so ancestor bookkeeping is rebuilt."""
        sums, scenarios, cost_ids, producers, late_leaves, conflicts = raw[:6]
        buf = cls()
        if len(raw) > 6:
            buf.samples = {str(k): SampleStats.from_wire(str(k), v) for k, v in raw[6].items()}
        for key, value in sums.items():
            buf.add(key, Decimal(value), strict=False)
        buf.scenarios = set(split_digests(scenarios))
        buf.cost_ids = set(split_digests(cost_ids))
        buf.producers = set(producers)
        buf.late_leaves = int(late_leaves)
        buf.lost_leaves = int(raw[7]) if len(raw) > 7 else 0
        buf.conflicts = [(str(a), str(b)) for a, b in conflicts]
        return buf


class CumulativeState:
    """Run-wide state: cumulative values, unique scenario digests, applied response ids."""

    __slots__ = ("cost_ids", "scenarios", "values")

    def __init__(self, *, journal: bool = True) -> None:
        """``journal=False``: the ledgers keep no journal (nothing checkpoints incrementally)."""
        self.values: dict[str, Decimal] = {}
        self.scenarios = DigestLedger(journal=journal)
        self.cost_ids = DigestLedger(journal=journal)


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


class _Window:
    """Which sequence numbers of one producer incarnation were applied: a watermark plus the
    gaps above it (``above`` is None while there are none: idle producers stay small)."""

    __slots__ = ("above", "watermark")

    def __init__(self, watermark: int = 0, above: Iterable[int] = ()) -> None:
        self.watermark = watermark
        self.above: set[int] | None = set(above) or None

    def seen(self, seq: int) -> bool:
        return seq <= self.watermark or (self.above is not None and seq in self.above)

    def mark(self, seq: int) -> None:
        if seq <= self.watermark:
            return
        if seq == self.watermark + 1 and self.above is None:
            self.watermark = seq
            return
        above = self.above if self.above is not None else set()
        above.add(seq)
        self._settle(above)

    def advance(self, upto: int) -> int:
        """The producer will never send a seq up to ``upto`` again: every one of them is
        settled (applied, refused, or given up on). Returns how many were never seen here
        (the batches it gave up on)."""
        if upto <= self.watermark:
            return 0
        above = self.above or set()
        skipped = upto - self.watermark - sum(1 for s in above if s <= upto)
        self.watermark = upto
        self._settle({s for s in above if s > upto})
        return skipped

    def _settle(self, above: set[int]) -> None:
        while self.watermark + 1 in above:
            self.watermark += 1
            above.discard(self.watermark)
        self.above = above or None


MAX_RETIRED = 16_384
"""Confirmed (retired) producer windows remembered as a bare watermark, the newest first: a
copy of one of their batches still in flight is then a duplicate, never applied again. Kept in
memory only (checkpoints stay sized by live producers): the client never sends a copy of a
batch it confirmed past, which holds across restarts too."""


ProducerKey = tuple[str, str]
"""``(producer_id, incarnation)``."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what producers can make the aggregator hold; ``None`` is unbounded.

    Attributes:
        max_keys_per_step: distinct leaf keys pending for one ``(step, scope)``.
        max_keys_per_run: distinct leaf keys producers sent in the whole run.
        max_open_scopes: scopes with pending leaves (a split the trainer never closes).
    """

    max_keys_per_step: int | None = None
    max_keys_per_run: int | None = None
    max_open_scopes: int | None = None


COUNTER_NAMES = STATE_COUNTERS
"""The state's counters (declared in :mod:`~art_ray_metrics.core.counters`)."""


Decision = tuple[bool, tuple[tuple[int, str, str | None, str], ...]]
"""A decision made earlier about a batch's keys: (a configured limit refused something,
``(step, scope, key or None for the whole group, reason)`` of each refusal)."""


def _without(group: StepGroup, keys: set[str] | dict[str, str]) -> StepGroup:
    """``group`` without the leaves of ``keys``."""
    return replace(
        group,
        sums={k: v for k, v in group.sums.items() if k not in keys},
        keyed_costs=tuple(c for c in group.keyed_costs if c.key not in keys),
        samples={k: v for k, v in group.samples.items() if k not in keys},
    )


@dataclass(slots=True)
class _Refusal:
    """What :meth:`AggregatorState._admit` refused of one group."""

    group: StepGroup
    kept: StepGroup | None
    """The group without its refused keys (None: refused whole)."""
    reasons: list[tuple[str | None, str]]
    """(refused key, or None for the whole group; why)."""
    limit: bool
    """A :class:`Limits` bound (not an overflow) refused something."""

    @property
    def leaves(self) -> int:
        return self.group.leaf_count - (self.kept.leaf_count if self.kept is not None else 0)


class AggregatorState:
    """The aggregator's whole state; the Ray actor is a thin shell around one instance."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.run_keys: set[str] = set()
        """Every leaf key producers sent in the run (bounded by ``limits.max_keys_per_run``)."""
        self.cum = CumulativeState()
        self.pending: dict[tuple[int, str], StepBuffer] = {}
        self.late: dict[tuple[int, str], StepBuffer] = {}
        """Late leaves by ``(step they were recorded for, scope)``: the next close of the scope
        takes them all."""
        self.last_closed: dict[str, int] = {}
        """The last closed step per scope: a leaf for a step at or below it is late."""
        self.last_closed_split: dict[str, int] = {}
        """The last closed step per split: a barrier at or below it is a resume."""
        self.producers: dict[ProducerKey, _Window] = {}
        self.retired: dict[ProducerKey, int] = {}
        """Windows dropped by :meth:`confirm`, as their watermark (the newest ``MAX_RETIRED``;
        not persisted)."""
        self.refusals: dict[ProducerKey, dict[int, tuple[tuple[int, str, str | None, str], ...]]]
        self.refusals = {}
        """What was refused of batches whose producer may not have heard yet (until its
        ``acked_upto`` passes them): a resend's answer names it again."""
        self.pending_cost_ids: set[bytes] = set()
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.conflict_names: dict[str, int] = {}
        self.meta = AggregatorMeta()
        """Opaque, msgpack-able fields the shell persists with the state (run id, epoch, …)."""

    # -- ingest ---------------------------------------------------------------------------

    def _window(self, batch: LeafBatch) -> _Window | None:
        """The batch's producer window (created if new); None when the batch is a copy of
        one a retired (confirmed) window had already settled."""
        key = (batch.producer_id, batch.incarnation)
        window = self.producers.get(key)
        if window is not None:
            return window
        floor = self.retired.get(key)
        if floor is not None:
            if batch.seq <= floor:
                return None
            del self.retired[key]  # the producer is back: its window restarts at the floor
        # format 3 counts a new producer's given-up batches: its window starts at zero and
        # advances to ``acked_upto`` below; older formats start at ``acked_upto``
        start = 0 if batch.version >= 3 else batch.acked_upto
        window = self.producers[key] = _Window(max(start, floor or 0))
        return window

    def _settle_header(self, batch: LeafBatch, window: _Window) -> None:
        """Apply what a batch's header declares: the batches its producer gave up on.

        Format 3: ``acked_upto`` advances the window (so it always compacts), each given-up
        batch never applied here is counted, and its leaves are counted on the row of their
        step. Older formats only counted ``dropped`` (their replay decides as it did live)."""
        told = self.refusals.get((batch.producer_id, batch.incarnation))
        if told is not None:  # the producer holds answers up to acked_upto: it heard them
            for seq in [s for s in told if s <= batch.acked_upto]:
                del told[seq]
            if not told:
                del self.refusals[(batch.producer_id, batch.incarnation)]
        if batch.version < 3:
            self.counters["dropped_batches"] += batch.dropped
            return
        lost = [entry for entry in batch.lost if not window.seen(entry[0])]
        self.counters["dropped_batches"] += window.advance(batch.acked_upto)
        cap = self.limits.max_open_scopes
        for seq, step, scope, leaves in lost:
            if window.seen(seq):  # settled by this header: never applied, so lost
                if cap is not None and scope not in self.last_closed:
                    open_scopes = {sc for _, sc in self.pending} | set(self.late)
                    if scope not in open_scopes and len(open_scopes) >= cap:
                        continue  # counted as a dropped batch only: no scope opens for it
                buf, _ = self._buffer_for(StepGroup(step, scope))
                buf.lost_leaves += leaves

    def ingest(self, batch: LeafBatch, decided: Decision | None = None) -> IngestResult:
        """Apply a batch once; a repeated ``(producer_id, incarnation, seq)`` is acknowledged,
        not applied. Leaves that would break a :class:`Limits` bound or make a pending sum
        overflow are refused one key at a time (see :meth:`_admit`): the rest of the batch is
        applied, and :attr:`IngestResult.refused` names what was not.

        ``decided`` replays a decision made earlier (a write-ahead log): exactly the keys it
        names are refused and nothing is checked against the limits, so a replay decides as
        the live aggregator did whatever limits it runs with."""
        pid, inc = batch.producer_id, batch.incarnation
        window = self._window(batch)
        if window is None or window.seen(batch.seq):
            self.counters["duplicate_batches"] += 1
            told = self.refusals.get((pid, inc), {}).get(batch.seq, ())
            return IngestResult(pid, batch.seq, True, 0, (), inc, batch.acked_upto, told)
        self._settle_header(batch, window)
        refused = self._admit(batch) if decided is None else self._decided(batch, decided)
        if refused:
            self.counters["limit_rejections"] += int(any(r.limit for r in refused.values()))
        late = 0
        lost_leaves = 0
        conflicts: list[tuple[str, str]] = []
        refusals: list[tuple[int, str, str | None, str]] = []
        for index, group in enumerate(batch.groups):
            refusal = refused.get(index)
            if refusal is not None:
                refusals.extend((group.step, group.scope, k, r) for k, r in refusal.reasons)
                lost_leaves += refusal.leaves
                if refusal.kept is None:  # a scope it may not open: counted on no step's row
                    continue
                group = refusal.kept
            buf, is_late = self._buffer_for(group)
            if refusal is not None:
                buf.lost_leaves += refusal.leaves
            before = len(buf.conflicts)
            self._apply(buf, group)
            buf.producers.add(batch.producer_id)
            if is_late:
                buf.late_leaves += group.leaf_count
                late += group.leaf_count
            conflicts.extend(buf.conflicts[before:])
        window.mark(batch.seq)
        if refusals:
            self.refusals.setdefault((pid, inc), {})[batch.seq] = tuple(refusals)
        self.counters["batches"] += 1
        self.counters["leaves"] += batch.leaf_count - lost_leaves
        self.counters["late_leaves"] += late
        self.counters["conflicts"] += len(conflicts)
        for ancestor, _ in conflicts:
            self.conflict_names[ancestor] = self.conflict_names.get(ancestor, 0) + 1
        return IngestResult(
            pid,
            batch.seq,
            False,
            late,
            tuple(conflicts),
            inc,
            batch.acked_upto,
            tuple(refusals),
            any(r.limit for r in refused.values()),
        )

    def _decided(self, batch: LeafBatch, decided: Decision) -> dict[int, _Refusal]:
        """:meth:`_admit` as decided before: refuse the keys ``decided`` names (a group of a
        named ``(step, scope)`` with key None whole), check nothing, and add the run keys of
        what applies."""
        limit, refusals = decided
        named: dict[tuple[int, str], list[tuple[str | None, str]]] = {}
        for step, scope, key, reason in refusals:
            named.setdefault((step, scope), []).append((key, reason))
        out: dict[int, _Refusal] = {}
        for index, group in enumerate(batch.groups):
            reasons = named.get((group.step, group.scope))
            kept: StepGroup | None = group
            if reasons is not None:
                bad = {key for key, _ in reasons if key is not None}
                whole = any(key is None for key, _ in reasons)
                kept = None if whole else _without(group, bad)
                out[index] = _Refusal(group, kept, reasons, limit)
            if kept is not None:
                self.run_keys.update(kept.sums)
                self.run_keys.update(c.key for c in kept.keyed_costs)
                self.run_keys.update(kept.samples)
        return out

    def _admit(self, batch: LeafBatch) -> dict[int, _Refusal]:
        """What of a batch to refuse, by group index; changes nothing but the run's key set.

        The unit of refusal is one leaf key of one group (all of that key's values in the
        batch): keys are admitted in the batch's order (the order the producer first recorded
        them), and a key that would break a bound is refused: a new key beyond
        ``max_keys_per_step`` or ``max_keys_per_run``, or a key whose pending sum would leave
        ``+-MAX_ABS_VALUE``. A group whose scope would open beyond ``max_open_scopes`` is
        refused whole. The producer is told which keys, so it fails exactly the rollouts
        that recorded them."""
        limits = self.limits
        out: dict[int, _Refusal] = {}
        sums: dict[tuple[int, str, str], Decimal] = {}
        step_keys: dict[tuple[int, str], set[str]] = {}
        new_keys: set[str] = set()
        scopes = {sc for _, sc in self.pending} | {sc for _, sc in self.late}
        ident = f"Batch {batch.producer_id}/{batch.seq}"
        for index, group in enumerate(batch.groups):
            last = self.last_closed.get(group.scope)
            late = last is not None and group.step <= last
            where = (group.step, group.scope)  # late or pending: lateness is per (step, scope)
            buf = self.late.get(where) if late else self.pending.get(where)
            if buf is None and group.scope not in scopes:
                cap = limits.max_open_scopes
                if cap is not None and len(scopes) + 1 > cap:
                    reason = (
                        f"{ident}: scope {group.scope!r} refused: {len(scopes) + 1} scopes would "
                        f"have pending leaves ({sorted(scopes)[:5]}...), above "
                        f"max_open_scopes={cap}; are producers recording for a split the "
                        "trainer never logs?"
                    )
                    out[index] = _Refusal(group, None, [(None, reason)], True)
                    continue
                scopes.add(group.scope)
            totals: dict[str, Decimal] = dict(group.sums)
            for cost in group.keyed_costs:
                totals[cost.key] = _add(totals.get(cost.key, ZERO), cost.value)
            held = buf.sums if buf is not None else {}
            keys = step_keys.get(where)  # keys this batch adds to the step (not a copy of it)
            if keys is None:
                keys = step_keys[where] = set()
            bad: dict[str, str] = {}
            limit = False
            for key in (*totals, *(k for k in group.samples if k not in totals)):
                new_step = key not in held and key not in keys
                new_run = key not in self.run_keys and key not in new_keys
                cap = limits.max_keys_per_step
                if new_step and cap is not None and len(held) + len(keys) + 1 > cap:
                    limit = True
                    bad[key] = (
                        f"{ident}: {key!r} refused: step {group.step} ({group.scope}) would "
                        f"hold {len(held) + len(keys) + 1} distinct keys, above "
                        f"max_keys_per_step={cap}"
                    )
                    continue
                cap = limits.max_keys_per_run
                if new_run and cap is not None and len(self.run_keys) + len(new_keys) + 1 > cap:
                    limit = True
                    bad[key] = (
                        f"{ident}: {key!r} refused: the run would hold "
                        f"{len(self.run_keys) + len(new_keys) + 1} distinct keys, above "
                        f"max_keys_per_run={cap}"
                    )
                    continue
                value = totals.get(key)
                if value is not None:
                    slot = (*where, key)
                    current = sums.get(slot)
                    if current is None:
                        current = held.get(key, ZERO)
                    total = _add(current, value)
                    if total.copy_abs() > V.MAX_ABS_SUM:  # exact: copy_abs never rounds
                        bad[key] = (
                            f"{ident}: {key!r} refused: its sum for step {group.step} "
                            f"({group.scope}) would be {total:.3e}, beyond "
                            f"+-{V.MAX_ABS_VALUE:g}"
                        )
                        continue
                    sums[slot] = total
                if new_step:
                    keys.add(key)
                if new_run:
                    new_keys.add(key)
            if bad:
                kept = _without(group, bad)
                reasons: list[tuple[str | None, str]] = list(bad.items())
                out[index] = _Refusal(group, kept, reasons, limit)
        self.run_keys |= new_keys
        return out

    def _buffer_for(self, group: StepGroup) -> tuple[StepBuffer, bool]:
        key = (group.step, group.scope)
        last = self.last_closed.get(group.scope)
        if last is not None and group.step <= last:
            buf = self.late.get(key)
            if buf is None:
                buf = self.late[key] = StepBuffer()
            return buf, True
        buf = self.pending.get(key)
        if buf is None:
            buf = self.pending[key] = StepBuffer()
        return buf, False

    def _apply(self, buf: StepBuffer, group: StepGroup) -> None:
        for key, value in group.sums.items():
            buf.add(key, value, strict=False)
        costs = group.keyed_costs
        ids = [digest(cost.response_id) for cost in costs]
        applied = self.cum.cost_ids.contains_many(ids) if costs else []
        for cost, d, seen in zip(costs, ids, applied, strict=True):
            if seen or d in self.pending_cost_ids:
                self.counters["duplicate_costs"] += 1
                continue
            self.pending_cost_ids.add(d)
            buf.cost_ids.add(d)
            buf.add(cost.key, cost.value, strict=False)
        if group.scenario_digests:
            buf.scenarios.update(split_digests(group.scenario_digests))
        if group.samples:
            buf.add_samples(group.samples)

    def ingest_bytes(self, data: bytes, decided: Decision | None = None) -> IngestResult:
        """Decode and apply a wire batch; malformed bytes are counted and change nothing.

        Raises:
            WireFormatError: the bytes are not a valid batch of a known version.
        """
        try:
            batch = decode_batch(data)
        except WireFormatError:
            self.counters["rejected_batches"] += 1
            ident = batch_identity(data)
            if ident is not None:  # move the producer past it: its later batches still count
                pid, inc, seq, acked_upto = ident
                window = self._window(LeafBatch(pid, seq, (), inc, acked_upto, version=2))
                if window is not None:
                    window.mark(seq)
            raise
        return self.ingest(batch, decided)

    def refuse_bytes(self, data: bytes, *, limit: bool) -> None:
        """Repeat a refusal decided earlier (a replayed write-ahead log): count it and move
        the producer's window past the batch; apply nothing and check nothing. A batch the
        window already holds is skipped, uncounted, as the live aggregator would have."""
        ident = batch_identity(data)
        if ident is None:
            return
        pid, inc, seq, acked_upto = ident
        window = self.producers.get((pid, inc))
        if window is None:
            window = self.producers[(pid, inc)] = _Window(acked_upto)
        elif window.seen(seq):
            return
        window.mark(seq)
        self.counters["rejected_batches"] += 1
        if limit:
            self.counters["limit_rejections"] += 1

    def confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
        """The producer holds durable acknowledgements up to ``acked_upto`` and will never
        resend those batches: drop its window when nothing above is applied. Returns whether
        the window was dropped."""
        key = (producer_id, incarnation)
        window = self.producers.get(key)
        if window is None or window.above is not None or window.watermark > acked_upto:
            return False
        del self.producers[key]
        self.refusals.pop(key, None)
        # retired, not forgotten: a copy of an old batch still in flight stays a duplicate
        self.retired[key] = window.watermark
        if len(self.retired) > MAX_RETIRED:
            del self.retired[next(iter(self.retired))]
        return True

    # -- barrier --------------------------------------------------------------------------

    def producers_reported(self, step: int, split: str) -> frozenset[str]:
        """Producers that sent at least one batch (possibly empty) for ``(step, split)``."""
        buf = self.pending.get((step, K.scope_for_split(split)))
        return frozenset(buf.producers) if buf is not None else frozenset()

    def close_step(
        self,
        step: int,
        split: str = "train",
        metrics: Mapping[str, float] | None = None,
    ) -> StepReport:
        """Close ``(step, split)`` and return its row.

        ``metrics`` are the trainer's own values for the row: backend names are mapped into the
        taxonomy, builder-managed keys are summed with the producers' leaves, other keys pass
        through (a builder key of the same name wins, as in ART). Every key is routed as in ART
        and the row gets ``training_step``. A transaction: the whole row is computed and
        checked first (every value a finite float, no reserved history field), and a close that
        raises :class:`InvalidMetricError` leaves the state as it was.
        """
        V.check_step(step)
        V.check_split(split)
        managed, passthrough = split_trainer_metrics(metrics)
        scope = K.scope_for_split(split)
        # a transaction: build the row on a fresh buffer, commit only once nothing can fail
        current = self.pending.get((step, scope))
        late = sorted(k for k in self.late if k[1] == scope)
        older = [k for k in self.pending if k[1] == scope and k[0] < step]
        buf = StepBuffer()
        if current is not None:
            buf.merge(current)
        for held in late:
            buf.merge(self.late[held])
        for skipped in older:  # a step the trainer skipped: its leaves are late
            stale = self.pending[skipped]
            buf.merge(stale)
            buf.late_leaves += len(stale.sums) + len(stale.samples)
        for key, value in managed:
            buf.add(key, value, strict=False)
        computed, updates = plan_close(buf, self.cum)  # raises InvalidMetricError
        row = {**passthrough, **computed}
        routed = {K.route_key(k, split): v for k, v in row.items()}
        for routed_key in routed:
            V.check_row_key(routed_key)
        routed["training_step"] = float(step)
        # -- commit
        self.pending.pop((step, scope), None)
        for held in late:
            self.late.pop(held)
        for skipped in older:
            self.pending.pop(skipped)
        commit_close(buf, self.cum, updates)
        self.pending_cost_ids -= buf.cost_ids
        prev = self.last_closed.get(scope)
        self.last_closed[scope] = step if prev is None else max(prev, step)
        prev = self.last_closed_split.get(split)
        self.last_closed_split[split] = step if prev is None else max(prev, step)
        self.counters["rows"] += 1
        return StepReport(
            step,
            split,
            routed,
            buf.late_leaves,
            tuple(buf.conflicts),
            frozenset(buf.producers),
            buf.lost_leaves,
        )

    def telemetry(self) -> dict[str, float]:
        """The core's counters as ``telemetry/...`` row keys."""
        sizes = {"pending_steps": len(self.pending), "producers": len(self.producers)}
        return row_values("state", {**self.counters, **sizes}, K.TELEMETRY_PREFIX)

    # -- persistence ----------------------------------------------------------------------

    def to_wire(self, *, include_ledgers: bool = True) -> dict[str, Any]:
        """Plain msgpack-able form; without ledgers for incremental checkpoints."""
        out: dict[str, Any] = {
            "cum": {k: str(v) for k, v in self.cum.values.items()},
            "pending": [[s, sc, b.to_wire()] for (s, sc), b in sorted(self.pending.items())],
            "late_steps": [[s, sc, b.to_wire()] for (s, sc), b in sorted(self.late.items())],
            "last_closed": dict(self.last_closed),
            "last_closed_split": dict(self.last_closed_split),
            "windows": [
                [p, i, w.watermark, sorted(w.above or ())] for (p, i), w in self.producers.items()
            ],
            "refusals": [
                [p, i, seq, [list(r) for r in told]]
                for (p, i), by_seq in self.refusals.items()
                for seq, told in by_seq.items()
            ],
            "counters": dict(self.counters),
            "conflict_names": dict(self.conflict_names),
            "meta": self.meta.to_dict(),
            "keys": sorted(self.run_keys),
        }
        if include_ledgers:
            out["scenarios"] = self.cum.scenarios.to_bytes()
            out["cost_ids"] = self.cum.cost_ids.to_bytes()
        return out

    @classmethod
    def from_wire(
        cls, raw: Mapping[str, Any], *, scenarios: bytes = b"", cost_ids: bytes = b""
    ) -> AggregatorState:
        """Inverse of :meth:`to_wire`; ledgers come from ``raw`` or from the given shard bytes."""
        state = cls()
        state.cum.values = {str(k): Decimal(v) for k, v in raw["cum"].items()}
        state.cum.scenarios = DigestLedger.from_bytes(raw.get("scenarios", scenarios))
        state.cum.cost_ids = DigestLedger.from_bytes(raw.get("cost_ids", cost_ids))
        state.pending = {(int(s), str(sc)): StepBuffer.from_wire(b) for s, sc, b in raw["pending"]}
        state.last_closed = {str(k): int(v) for k, v in raw["last_closed"].items()}
        if "late_steps" in raw:
            state.late = {
                (int(s), str(sc)): StepBuffer.from_wire(b) for s, sc, b in raw["late_steps"]
            }
        else:  # before late leaves were kept per step: held for the scope's last closed step
            state.late = {
                (state.last_closed.get(str(sc), 0), str(sc)): StepBuffer.from_wire(b)
                for sc, b in raw["late"]
            }
        if "windows" in raw:
            state.producers = {
                (str(p), str(i)): _Window(int(w), a) for p, i, w, a in raw["windows"]
            }
        else:  # format 1: one window per producer id, no incarnation
            state.producers = {
                (str(p), ""): _Window(int(w), a) for p, (w, a) in raw["producers"].items()
            }
        for p, i, seq, told in raw.get("refusals", ()):
            state.refusals.setdefault((str(p), str(i)), {})[int(seq)] = tuple(
                (int(st), str(sc), None if k is None else str(k), str(r)) for st, sc, k, r in told
            )
        state.counters.update({str(k): int(v) for k, v in raw["counters"].items()})
        state.conflict_names = {str(k): int(v) for k, v in raw["conflict_names"].items()}
        state.meta = AggregatorMeta.from_dict(raw["meta"])
        if "last_closed_split" in raw:
            state.last_closed_split = {str(k): int(v) for k, v in raw["last_closed_split"].items()}
        else:  # older snapshots: the splits' last rows, and splits that are their own scope
            state.last_closed_split = {sp: row.step for sp, row in state.meta.last_rows.items()}
            for scope, step in state.last_closed.items():
                if scope != K.scope_for_split("val"):
                    held = state.last_closed_split.get(scope, step)
                    state.last_closed_split[scope] = max(held, step)
        state.run_keys = {str(k) for k in raw.get("keys", ())}
        for buf in (*state.pending.values(), *state.late.values()):
            state.pending_cost_ids |= buf.cost_ids
        return state

    def snapshot(self) -> bytes:
        """The whole state as versioned msgpack bytes (ledgers included)."""
        return encode_state(self.to_wire())

    @classmethod
    def restore(cls, data: bytes) -> AggregatorState:
        """Rebuild a state from :meth:`snapshot` bytes.

        Raises:
            WireFormatError: malformed, truncated or of an unknown format version.
        """
        return cls._from_checked(decode_state(data), b"", b"")

    def checkpoint_parts(self) -> tuple[bytes, dict[str, bytes], tuple[int, int]]:
        """Incremental checkpoint: (state blob without ledgers, new ledger shards, token).

        Shards hold only digests added since the last :meth:`checkpoint_committed`; pass the
        returned token there once the checkpoint is durable (a failed one loses nothing).
        """
        token = (self.cum.scenarios.journal_position(), self.cum.cost_ids.journal_position())
        shards = {
            "scenarios": self.cum.scenarios.journal_bytes(token[0]),
            "cost_ids": self.cum.cost_ids.journal_bytes(token[1]),
        }
        return encode_state(self.to_wire(include_ledgers=False)), shards, token

    def checkpoint_committed(self, token: tuple[int, int]) -> None:
        """Forget journal entries that a committed checkpoint holds."""
        self.cum.scenarios.drop_journal(token[0])
        self.cum.cost_ids.drop_journal(token[1])

    @classmethod
    def from_checkpoint(cls, state: bytes, shards: Mapping[str, bytes]) -> AggregatorState:
        """Rebuild from a checkpoint's state blob and the concatenation of its shards."""
        return cls._from_checked(
            decode_state(state), shards.get("scenarios", b""), shards.get("cost_ids", b"")
        )

    @classmethod
    def _from_checked(
        cls, raw: Mapping[str, Any], scenarios: bytes, cost_ids: bytes
    ) -> AggregatorState:
        try:
            return cls.from_wire(raw, scenarios=scenarios, cost_ids=cost_ids)
        except (KeyError, TypeError, ValueError, InvalidOperation, AttributeError) as exc:
            if isinstance(exc, WireFormatError):
                raise
            raise WireFormatError(f"Malformed state snapshot: {exc!r}") from exc


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
