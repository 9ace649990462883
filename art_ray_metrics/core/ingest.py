"""Admission, the *ingest* stage: which batches apply (producer windows) and which of their
leaves the aggregator refuses (limits, overflowing sums), and replaying those decisions.

Pure Python, no I/O. :class:`~art_ray_metrics.core.state.AggregatorState` ties these to its step
buffers; the Ray actor only reaches them through the state.

- **Producer windows.** A batch is applied at most once per ``(producer_id, incarnation,
  seq)``. :class:`ProducerWindows` is the one map of producer incarnations: each entry
  (:class:`ProducerWindow`) holds the :class:`Window` of sequence numbers *applied* and the
  one of sequence numbers *durable* (in the shell's write-ahead log or a checkpoint), so the
  shell never keeps a map of its own in step. A window is a watermark plus the set of sequence
  numbers above it. A producer that confirmed it will never resend into its window
  (:meth:`ProducerWindows.confirm`) is retired to a bare watermark: state grows with live
  producers, not with every producer ever seen.
- **Refusal.** The unit of refusal is one leaf key of one group (:func:`admit`); a group whose
  scope may not open is refused whole. What was refused is a :class:`Decision`, logged with the
  batch so a replay (:func:`replay_decision`) refuses exactly the same keys whatever limits it runs
  with.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal

from art_ray_metrics.core import validate as V
from art_ray_metrics.core.buffer import StepBuffer
from art_ray_metrics.core.records import LeafBatch, StepGroup
from art_ray_metrics.core.rollup import EXACT, ZERO

__all__ = [
    "MAX_RETIRED",
    "Decision",
    "Limits",
    "ProducerKey",
    "ProducerWindow",
    "ProducerWindows",
    "Refusal",
    "Window",
    "admit",
    "replay_decision",
    "without",
]

_add = EXACT.add

ProducerKey = tuple[str, str]
"""``(producer_id, incarnation)``."""

Slot = tuple[int, str]
"""``(step, scope)``: the row a leaf closes into."""

MAX_RETIRED = 16_384
"""Confirmed (retired) producer windows remembered as a bare watermark, the newest first: a
copy of one of their batches still in flight is then a duplicate, never applied again. Kept in
memory only (checkpoints stay sized by live producers): the client never sends a copy of a
batch it confirmed past, which holds across restarts too."""


# -- producer windows ------------------------------------------------------------------------


class Window:
    """Which sequence numbers of one producer incarnation were settled: a watermark plus the
    gaps above it (``above`` is None while there are none: idle producers stay small)."""

    __slots__ = ("above", "watermark")

    def __init__(self, watermark: int = 0, above: Iterable[int] = ()) -> None:
        self.watermark = watermark
        self.above: set[int] | None = set(above) or None

    def copy(self) -> Window:
        return Window(self.watermark, self.above or ())

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


class ProducerWindow:
    """One producer incarnation's entry: the sequence numbers applied to the state, and those
    durable (the shell's write-ahead log or a checkpoint holds them)."""

    __slots__ = ("applied", "durable")

    def __init__(self, applied: Window, durable: Window | None = None) -> None:
        self.applied = applied
        self.durable = applied.copy() if durable is None else durable


class ProducerWindows(Mapping[ProducerKey, ProducerWindow]):
    """The live producer incarnations' windows, plus the retired ones as bare watermarks.

    The state moves the applied windows; the shell moves the durable ones (:meth:`logged`,
    :meth:`made_durable`) and asks them (:meth:`durable_seen`, :meth:`durable_upto`,
    :meth:`durable_confirmable`). Only the applied windows are persisted: everything a restored
    state applied is durable (:meth:`assume_durable`).
    """

    __slots__ = ("_floors", "_live", "retired")

    def __init__(self) -> None:
        self._live: dict[ProducerKey, ProducerWindow] = {}
        self.retired: dict[ProducerKey, int] = {}
        """Windows dropped by :meth:`confirm`, as their watermark (the newest ``MAX_RETIRED``;
        not persisted)."""
        self._floors: dict[tuple[ProducerKey, int], int] = {}
        """(producer, seq) -> the ``acked_upto`` of a logged batch: once the batch is durable,
        so is the header that moved its producer's window past the batches it gave up on."""

    def __getitem__(self, key: ProducerKey) -> ProducerWindow:
        return self._live[key]

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def __iter__(self) -> Iterator[ProducerKey]:
        return iter(self._live)

    def __len__(self) -> int:
        return len(self._live)

    def for_batch(self, batch: LeafBatch) -> Window | None:
        """The batch's applied window (its entry created if new); None when the batch is a
        copy of one a retired (confirmed) window had already settled."""
        key = (batch.producer_id, batch.incarnation)
        entry = self._live.get(key)
        if entry is not None:
            return entry.applied
        floor = self.retired.get(key)
        if floor is not None:
            if batch.seq <= floor:
                return None
            del self.retired[key]  # the producer is back: its window restarts at the floor
        # format 3 counts a new producer's given-up batches: its window starts at zero and
        # advances to ``acked_upto`` at its header; older formats start at ``acked_upto``
        start = 0 if batch.version >= 3 else batch.acked_upto
        entry = ProducerWindow(Window(max(start, floor or 0)), Window(batch.acked_upto))
        self._live[key] = entry
        return entry.applied

    def for_replay(self, key: ProducerKey, acked_upto: int) -> Window:
        """The applied window of a batch replayed as refused (created at ``acked_upto``)."""
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = ProducerWindow(Window(acked_upto))
        return entry.applied

    def restore(self, key: ProducerKey, watermark: int, above: Iterable[int]) -> None:
        """Add a persisted applied window (durable as far as it is applied)."""
        self._live[key] = ProducerWindow(Window(watermark, above))

    def confirm(self, key: ProducerKey, acked_upto: int) -> bool:
        """Retire ``key``'s entry if nothing above ``acked_upto`` was applied; returns whether
        it was retired."""
        entry = self._live.get(key)
        if entry is None:
            return False
        window = entry.applied
        if window.above is not None or window.watermark > acked_upto:
            return False
        del self._live[key]
        # retired, not forgotten: a copy of an old batch still in flight stays a duplicate
        self.retired[key] = window.watermark
        if len(self.retired) > MAX_RETIRED:
            del self.retired[next(iter(self.retired))]
        return True

    # -- the durable side (moved by the shell) -------------------------------------------------

    def assume_durable(self) -> None:
        """Everything applied is durable (a state just restored from storage)."""
        for entry in self._live.values():
            entry.durable = entry.applied.copy()

    def logged(self, key: ProducerKey, seq: int, acked_upto: int) -> None:
        """Batch ``seq`` of ``key`` was queued for the write-ahead log; once it is durable, so
        is its header's ``acked_upto``."""
        entry = self._live.get(key)
        if entry is not None and acked_upto > entry.durable.watermark:
            self._floors[(key, seq)] = acked_upto

    def made_durable(self, items: Iterable[tuple[ProducerKey, int]]) -> None:
        """These logged batches are now durable."""
        for key, seq in items:
            upto = self._floors.pop((key, seq), 0)
            entry = self._live.get(key)
            if entry is not None:  # None: the producer confirmed and its entry was retired
                entry.durable.advance(upto)
                entry.durable.mark(seq)

    def durable_seen(self, key: ProducerKey, seq: int) -> bool:
        """Whether batch ``seq`` of ``key`` is durable (a retired window's are)."""
        entry = self._live.get(key)
        if entry is not None:
            return entry.durable.seen(seq)
        floor = self.retired.get(key)
        return floor is not None and seq <= floor

    def durable_upto(self, key: ProducerKey) -> int:
        """The durable watermark of ``key`` (a retired window's floor; 0 if unknown)."""
        entry = self._live.get(key)
        if entry is not None:
            return entry.durable.watermark
        return self.retired.get(key, 0)

    def durable_confirmable(self, key: ProducerKey, acked_upto: int) -> bool:
        """Whether nothing of ``key`` above ``acked_upto`` is durable (true when unknown)."""
        entry = self._live.get(key)
        if entry is None:
            return True
        window = entry.durable
        return window.above is None and window.watermark <= acked_upto


# -- refusal ---------------------------------------------------------------------------------


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


Decision = tuple[bool, tuple[tuple[int, str, str | None, str], ...]]
"""A decision made earlier about a batch's keys: (a configured limit refused something,
``(step, scope, key or None for the whole group, reason)`` of each refusal)."""


def without(group: StepGroup, keys: set[str] | dict[str, str]) -> StepGroup:
    """``group`` without the leaves of ``keys``."""
    return replace(
        group,
        sums={k: v for k, v in group.sums.items() if k not in keys},
        keyed_costs=tuple(c for c in group.keyed_costs if c.key not in keys),
        samples={k: v for k, v in group.samples.items() if k not in keys},
    )


@dataclass(slots=True)
class Refusal:
    """What :func:`admit` (or :func:`replay_decision`) refused of one group."""

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


def replay_decision(batch: LeafBatch, decision: Decision, run_keys: set[str]) -> dict[int, Refusal]:
    """:func:`admit` as decided before: refuse the keys ``decision`` names (a group of a named
    ``(step, scope)`` with key None whole), check nothing, and add to ``run_keys`` the keys of
    what applies."""
    limit, refusals = decision
    named: dict[Slot, list[tuple[str | None, str]]] = {}
    for step, scope, key, reason in refusals:
        named.setdefault((step, scope), []).append((key, reason))
    out: dict[int, Refusal] = {}
    for index, group in enumerate(batch.groups):
        reasons = named.get((group.step, group.scope))
        kept: StepGroup | None = group
        if reasons is not None:
            bad = {key for key, _ in reasons if key is not None}
            whole = any(key is None for key, _ in reasons)
            kept = None if whole else without(group, bad)
            out[index] = Refusal(group, kept, reasons, limit)
        if kept is not None:
            run_keys.update(kept.sums)
            run_keys.update(c.key for c in kept.keyed_costs)
            run_keys.update(kept.samples)
    return out


def admit(
    batch: LeafBatch,
    limits: Limits,
    run_keys: set[str],
    buffers: tuple[Mapping[Slot, StepBuffer], Mapping[Slot, StepBuffer]],
    last_closed: Mapping[str, int],
) -> dict[int, Refusal]:
    """What of a batch to refuse, by group index; adds the admitted new keys to ``run_keys``
    and changes nothing else. ``buffers`` are the state's pending and late buffers.

    The unit of refusal is one leaf key of one group (all of that key's values in the batch):
    keys are admitted in the batch's order (the order the producer first recorded them), and a
    key that would break a bound is refused: a new key beyond ``max_keys_per_step`` or
    ``max_keys_per_run``, or a key whose pending sum would leave ``+-MAX_ABS_VALUE``. A group
    whose scope would open beyond ``max_open_scopes`` is refused whole. The producer is told
    which keys, so it fails exactly the rollouts that recorded them."""
    admission = _Admission(batch, limits, run_keys, buffers, last_closed)
    out: dict[int, Refusal] = {}
    for index, group in enumerate(batch.groups):
        refusal = admission.group(group)
        if refusal is not None:
            out[index] = refusal
    run_keys |= admission.new_keys
    return out


class _Admission:
    """One batch's admission: what it adds so far (so its own keys count against the bounds)."""

    def __init__(
        self,
        batch: LeafBatch,
        limits: Limits,
        run_keys: set[str],
        buffers: tuple[Mapping[Slot, StepBuffer], Mapping[Slot, StepBuffer]],
        last_closed: Mapping[str, int],
    ) -> None:
        self.limits = limits
        self.run_keys = run_keys
        self.pending, self.late = buffers
        self.last_closed = last_closed
        self.ident = f"Batch {batch.producer_id}/{batch.seq}"
        self.sums: dict[tuple[int, str, str], Decimal] = {}
        self.step_keys: dict[Slot, set[str]] = {}  # keys this batch adds to a slot
        self.new_keys: set[str] = set()  # keys this batch adds to the run
        self.scopes = {sc for _, sc in self.pending} | {sc for _, sc in self.late}

    def group(self, group: StepGroup) -> Refusal | None:
        """Admit one group's keys in order; what was refused of it (None: nothing)."""
        last = self.last_closed.get(group.scope)
        late = last is not None and group.step <= last
        slot = (group.step, group.scope)  # late or pending: lateness is per slot
        buf = self.late.get(slot) if late else self.pending.get(slot)
        if buf is None and group.scope not in self.scopes:
            refused = self._open_scope(group)
            if refused is not None:
                return refused
        totals: dict[str, Decimal] = dict(group.sums)
        for cost in group.keyed_costs:
            totals[cost.key] = _add(totals.get(cost.key, ZERO), cost.value)
        held = buf.sums if buf is not None else {}
        bad: dict[str, str] = {}
        limit = False
        for key in (*totals, *(k for k in group.samples if k not in totals)):
            reason, by_limit = self._key(group, key, held, totals.get(key))
            if reason is not None:
                bad[key] = reason
                limit = limit or by_limit
        if not bad:
            return None
        return Refusal(group, without(group, bad), list(bad.items()), limit)

    def _open_scope(self, group: StepGroup) -> Refusal | None:
        """Open the group's scope, or refuse the group whole beyond ``max_open_scopes``."""
        scopes = self.scopes
        cap = self.limits.max_open_scopes
        if cap is not None and len(scopes) + 1 > cap:
            reason = (
                f"{self.ident}: scope {group.scope!r} refused: {len(scopes) + 1} scopes would "
                f"have pending leaves ({sorted(scopes)[:5]}...), above "
                f"max_open_scopes={cap}; are producers recording for a split the "
                "trainer never logs?"
            )
            return Refusal(group, None, [(None, reason)], True)
        scopes.add(group.scope)
        return None

    def _key(
        self, group: StepGroup, key: str, held: Mapping[str, Decimal], value: Decimal | None
    ) -> tuple[str | None, bool]:
        """Admit one key of a group: (why it is refused or None, refused by a limit)."""
        keys = self.step_keys.setdefault((group.step, group.scope), set())
        new_step = key not in held and key not in keys
        new_run = key not in self.run_keys and key not in self.new_keys
        cap = self.limits.max_keys_per_step
        if new_step and cap is not None and len(held) + len(keys) + 1 > cap:
            return (
                f"{self.ident}: {key!r} refused: step {group.step} ({group.scope}) would "
                f"hold {len(held) + len(keys) + 1} distinct keys, above "
                f"max_keys_per_step={cap}"
            ), True
        cap = self.limits.max_keys_per_run
        if new_run and cap is not None and len(self.run_keys) + len(self.new_keys) + 1 > cap:
            return (
                f"{self.ident}: {key!r} refused: the run would hold "
                f"{len(self.run_keys) + len(self.new_keys) + 1} distinct keys, above "
                f"max_keys_per_run={cap}"
            ), True
        if value is not None:
            slot = (group.step, group.scope, key)
            current = self.sums.get(slot)
            if current is None:
                current = held.get(key, ZERO)
            total = _add(current, value)
            if total.copy_abs() > V.MAX_ABS_SUM:  # exact: copy_abs never rounds
                return (
                    f"{self.ident}: {key!r} refused: its sum for step {group.step} "
                    f"({group.scope}) would be {total:.3e}, beyond +-{V.MAX_ABS_VALUE:g}"
                ), False
            self.sums[slot] = total
        if new_step:
            keys.add(key)
        if new_run:
            self.new_keys.add(key)
        return None, False
