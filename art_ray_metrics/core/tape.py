"""The record stage's data, pure: a slot's pending leaves, the worker's tape and key registries.

*Slot* is the ``(step, scope)`` pair a leaf closes into.

- :class:`PendingLeaves`: the unclosed leaves of one slot of one producer (the in-process
  builder, the ART adapter and the worker client all hold them); leaf/ancestor conflicts are
  checked by :mod:`.keytree`.
- The *tape*: the worker client's one list of recorded leaves, four flat items per entry
  (:data:`ENTRY`): ``slot, rollout id, key, value``. Builders extend it without a lock
  (``list.extend`` with a tuple is one atomic step under the GIL, and the tuple dies at once, so
  nothing is left for the cyclic GC to track). ``key`` None marks a scenario digest
  (``value``) or, with ``value`` None, a builder's creation (its slot is reported even if it
  records nothing). :func:`drain_tape` moves entries into the pending leaves of their slots;
  :func:`rollouts_in` tells which rollouts recorded what, and :class:`RolloutLedger` keeps it
  per batch, so a loss is charged to exactly the rollouts whose flushes it fails.
- :class:`KeyRegistries`: per slot, the one slot object builders put on the tape (so a drain
  tells a change of slot by identity) and the registry of the slot's keys, for the latest
  :data:`MAX_REGISTRIES` slots.

No locks here: the client (:mod:`art_ray_metrics.distributed.client`) calls these under its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from art_ray_metrics.core import keytree
from art_ray_metrics.core.buffer import StepBuffer
from art_ray_metrics.core.records import KeyedCost
from art_ray_metrics.core.rollup import exact_sum, to_decimal
from art_ray_metrics.core.samples import SampleStats
from art_ray_metrics.errors import MetricConflictError

__all__ = [
    "ENTRY",
    "ITEMS_BUDGET",
    "MAX_REGISTRIES",
    "MAX_REPORTED",
    "ROLLOUT_IDS",
    "KeyRegistries",
    "Number",
    "PendingLeaves",
    "Refused",
    "RolloutCtx",
    "RolloutLedger",
    "Slot",
    "drain_tape",
    "rollouts_in",
]

Number = float | int | Decimal

Slot = tuple[int, str]
"""``(step, scope)``."""

RolloutCtx = tuple[Slot, int, int, int]
"""A worker builder's context: ``(slot, rollout id, lo, generation)``; its tape entries carry
the first two. Views of one rollout (``for_step``, ``for_cost_context``) share its id and
``lo``, the first batch that can hold its leaves; ``generation`` tells a rollout begun before a
fork."""

ROLLOUT_IDS = itertools.count(1)
"""Rollout ids of this process (a rollout is one builder and its views)."""

ENTRY = 4
"""Items per tape entry: ``slot, rollout id, key, value``."""

MAX_REGISTRIES = 64
"""Slot key registries a client keeps (the oldest steps' are forgotten first)."""


class PendingLeaves:
    """The unclosed leaves of one slot of one producer.

    :attr:`leaves` maps each pending leaf to its raw value (a number, or a ``list`` of them
    once it is written again); :attr:`ancestors` maps their proper ancestors below the section
    to one leaf under each (see :mod:`.keytree`), so a leaf/ancestor conflict raises at the
    call, as in ART. Values are summed exactly, each distinct value converted once, when the
    step is closed or shipped (:meth:`sums`).
    """

    __slots__ = (
        "ancestors",
        "cost_ids",
        "group_spend",
        "keyed",
        "keyed_groups",
        "leaves",
        "samples",
        "scenarios",
    )

    def __init__(self) -> None:
        self.leaves: dict[str, Any] = {}
        self.ancestors: dict[str, str] = {}
        self.samples: dict[str, list[float]] = {}  # add_sample values, averaged at the barrier
        self.scenarios: set[bytes] = set()
        self.keyed: list[KeyedCost] = []  # producer side: applied once per id by the actor
        self.cost_ids: set[bytes] = set()  # in-process: response ids already applied here
        self.group_spend: dict[bytes, list[Number]] = {}
        """Raw values of the cost leaves recorded inside a rollout with a group id, by group
        digest (a part of :attr:`leaves`, for the outcomes: :mod:`.outcome`)."""
        self.keyed_groups: dict[int, bytes] = {}
        """The group digest of a keyed cost, by its index in :attr:`keyed` (the aggregator
        adds it to the group's spend only if the cost is applied: once per response id)."""

    def record(self, key: str, value: Number | bool) -> None:
        """Add a validated value to ``key`` (a key registry records ``True``).

        Raises:
            MetricConflictError: ``key`` is an ancestor or a descendant of a pending leaf, or
                a sampled key; nothing is changed.
        """
        leaves = self.leaves
        held = leaves.get(key)
        if held is None:
            if self.samples and key in self.samples:
                raise MetricConflictError(
                    f"Cannot log {key!r} with add_metric: it is recorded with add_sample"
                )
            clash = keytree.admit(key, leaves, self.ancestors)
            if clash is not None:
                raise keytree.conflict_error(key, clash)
            leaves[key] = value
        elif held.__class__ is list:
            held.append(value)
        else:
            leaves[key] = [held, value]

    def record_sample(self, key: str, value: float) -> None:
        """Add one validated per-rollout value of ``key`` (averaged at the barrier).

        Raises:
            MetricConflictError: ``key`` is a pending summed leaf or one's ancestor; nothing
                is changed.
        """
        values = self.samples.get(key)
        if values is None:
            if key in self.leaves or key in self.ancestors:
                raise MetricConflictError(
                    f"Cannot record {key!r} with add_sample: it is logged with add_metric"
                )
            self.samples[key] = [value]
        else:
            values.append(value)

    def sample_stats(self) -> dict[str, SampleStats]:
        """The exact summaries of the sampled values so far (the raw values stay)."""
        return {key: SampleStats.of(values) for key, values in self.samples.items()}

    def sums(self) -> dict[str, Decimal]:
        """The exact per-key sums so far (the raw values stay)."""
        return {
            key: exact_sum(held) if held.__class__ is list else to_decimal(held)
            for key, held in self.leaves.items()
        }

    def add_group_spend(self, group: bytes, value: Number) -> None:
        """Note that ``value`` dollars of a cost leaf belong to ``group`` (a digest)."""
        held = self.group_spend.get(group)
        if held is None:
            self.group_spend[group] = [value]
        else:
            held.append(value)

    def group_sums(self) -> dict[bytes, Decimal]:
        """The exact spend per group digest so far (keyed costs are not in it)."""
        return {group: exact_sum(values) for group, values in self.group_spend.items()}

    def to_buffer(self) -> StepBuffer:
        """The exact step buffer of these leaves (consumes this object)."""
        buf = StepBuffer()
        buf.sums = self.sums()
        buf.samples = self.sample_stats()
        buf.scenarios = self.scenarios
        buf.cost_ids = self.cost_ids
        self.leaves = {}
        self.ancestors = {}
        self.samples = {}
        return buf


class KeyRegistries:
    """Per slot: the slot object builders put on the tape and its key registry (a key maps to
    ``True`` in the registry's :attr:`~PendingLeaves.leaves` once registered), for the latest
    :data:`MAX_REGISTRIES` slots. Not thread-safe: the client adds under its lock and reads
    :attr:`entries` without one."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[Slot, tuple[Slot, PendingLeaves]] = {}

    def entry(self, slot: Slot) -> tuple[Slot, PendingLeaves]:
        """``slot``'s shared slot object and registry (made on first use; the oldest steps'
        are forgotten beyond :data:`MAX_REGISTRIES`)."""
        entry = self.entries.get(slot)
        if entry is None:
            entry = self.entries[slot] = (slot, PendingLeaves())
            if len(self.entries) > MAX_REGISTRIES:
                for old in sorted(self.entries)[: MAX_REGISTRIES // 2]:
                    del self.entries[old]
        return entry

    def register(self, slot: Slot, key: str) -> None:
        """Make ``key`` a known leaf of ``slot``.

        Raises:
            MetricConflictError: ``key`` is an ancestor or a descendant of a leaf registered
                for the slot, or a sampled key; nothing is changed.
        """
        registry = self.entry(slot)[1]
        if registry.leaves.get(key) is not True:
            registry.record(key, True)

    def register_sample(self, slot: Slot, key: str) -> None:
        """Make ``key`` a known sampled key of ``slot`` (raises as :meth:`register`)."""
        registry = self.entry(slot)[1]
        if key not in registry.samples:
            registry.record_sample(key, 0.0)


def drain_tape(
    items: list[Any],
    pending: dict[Slot, PendingLeaves],
    his: dict[int, int],
    seq: int,
    groups: dict[int, bytes] | None = None,
) -> int:
    """Add tape ``items`` to the ``pending`` leaves of their slots; note in ``his`` that
    batch ``seq`` carries each rollout's last leaves. Returns the number of leaves added
    (scenario digests included, builder creation marks not). A ``costs/`` leaf of a rollout
    that ``groups`` (rollout id to group digest) names is also added to its group's spend.

    No conflict check here: the key registries made it (a builder still holding a forgotten
    step's registry could pass one; the aggregator then keeps both values, the ancestor's as
    ``unattributed``, and counts the clash)."""
    last_slot: Any = None
    last_rid = 0
    leaves: dict[str, Any] = {}
    into: PendingLeaves | None = None
    markers = 0
    it = iter(items)
    for slot, rid, key, value in zip(it, it, it, it, strict=True):
        if rid != last_rid:
            last_rid = rid
            his[rid] = seq
        if slot is not last_slot:
            last_slot = slot
            into = pending.get(slot)
            if into is None:
                into = pending[slot] = PendingLeaves()
            leaves = into.leaves
        if key is None:
            if value is None:
                markers += 1
            else:
                into.scenarios.add(value)  # type: ignore[union-attr]
            continue
        held = leaves.get(key)
        if held is None:
            leaves[key] = value
        elif held.__class__ is list:
            held.append(value)
        else:
            leaves[key] = [held, value]
        if groups and key.startswith("costs/"):
            group = groups.get(rid)
            if group is not None:
                into.add_group_spend(group, value)  # type: ignore[union-attr]
    return len(items) // ENTRY - markers


def rollouts_in(
    items: list[list[Any]], refused: set[tuple[int, str, str | None]] | None
) -> set[int]:
    """The rollouts that recorded into tape ``items`` (all of them, or those that recorded a
    ``refused`` ``(step, scope, key)``; key None: anything of that group)."""
    rids: set[int] = set()
    if refused is None:  # at C speed (a rollout that recorded nothing may be included)
        return rids.union(*(chunk[1::ENTRY] for chunk in items))
    for chunk in items:
        it = iter(chunk)
        for slot, rid, key, value in zip(it, it, it, it, strict=True):
            if (slot[0], slot[1], key) in refused or (
                (slot[0], slot[1], None) in refused and (key is not None or value is not None)
            ):
                rids.add(rid)
    return rids


Refused = set[tuple[int, str, str | None]]
"""``(step, scope, key)`` the aggregator refused in a batch (key None: the whole group)."""

ITEMS_BUDGET = 1 << 18
"""Tape items kept for batches not answered yet (which rollout recorded what); beyond, the
oldest batches keep only their set of rollouts (so a refusal of some keys in them is charged
to all of their rollouts)."""

MAX_REPORTED = 256
"""Losses kept for the next process-wide flush's report."""


class RolloutLedger:
    """Which rollouts each batch carries, and why a rollout's leaves are lost (the client
    calls it under its lock).

    Each built batch keeps the tape items it was built from until its first answer (which
    names any refused keys), within :data:`ITEMS_BUDGET` items; from then on, until it is
    durable or given up, only the set of its rollouts. A loss is charged to exactly the
    rollouts that recorded what was lost (:attr:`lost_rids`); when a batch's items are gone,
    to every rollout whose batch range covers it (:attr:`lost_seqs`). Losses also wait in
    :attr:`rejected` for the next process-wide flush's report.
    """

    __slots__ = (
        "batch_rids",
        "charged",
        "drained",
        "items",
        "items_size",
        "lost_rids",
        "lost_seqs",
        "max_lost",
        "rejected",
    )

    def __init__(self, max_lost: int) -> None:
        self.max_lost = max_lost
        """Rollouts (and batches of unknown rollouts) whose losses are remembered at most."""
        self.drained: list[list[Any]] = []  # tape items drained since the last batch built
        self.items: dict[int, list[list[Any]]] = {}  # seq -> its tape items, until settled
        self.items_size = 0
        self.batch_rids: dict[int, set[int]] = {}  # seq -> its rollouts (items over budget)
        self.lost_rids: dict[int, str] = {}  # rollout id -> why some of its leaves are lost
        self.lost_seqs: dict[int, str] = {}  # seq -> why, when its rollouts are unknown
        self.rejected: dict[int, str] = {}  # losses not yet reported by a process flush
        # per batch, the refused (step, scope, key) already charged: a restarted actor that
        # never logged the batch decides its resend again and may refuse other keys
        self.charged: dict[int, set[tuple[int, str, str | None]]] = {}

    def note_drain(self, items: list[Any]) -> None:
        """Tape items drained for the next batch (counted against the budget)."""
        self.drained.append(items)
        self.items_size += len(items)

    def note_entry(self, entry: list[Any]) -> None:
        """One entry recorded for the next batch outside the tape (a sample, a keyed cost)."""
        self.drained.append(entry)

    def take_drained(self) -> list[list[Any]]:
        """What the batch being built carries (and start afresh for the next one)."""
        drained, self.drained = self.drained, []
        return drained

    def built(self, seq: int, drained: list[list[Any]]) -> None:
        """Batch ``seq`` was built from ``drained``; keep the newest batches' items within
        the budget, the older ones' rollouts only."""
        self.items[seq] = drained
        while self.items_size > ITEMS_BUDGET and len(self.items) > 1:
            old = next(iter(self.items))
            self.applied(old)

    def not_built(self, drained: list[list[Any]], key: int, reason: str) -> None:
        """The batch of ``drained`` could not be built: charge the loss to its rollouts."""
        self.items_size -= sum(len(chunk) for chunk in drained)
        self.note_rejected(key, reason)
        self.lose_rollouts(rollouts_in(drained, None), reason)

    def applied(self, seq: int) -> None:
        """Batch ``seq`` was answered (or is over the budget): from here only the set of its
        rollouts is kept, until it is settled."""
        items = self.items.pop(seq, None)
        if items is not None:
            self.items_size -= sum(len(chunk) for chunk in items)
            self.batch_rids[seq] = rollouts_in(items, None)

    def newly_refused(
        self, seq: int, keys: set[tuple[int, str, str | None]]
    ) -> set[tuple[int, str, str | None]]:
        """The refused keys of batch ``seq`` not charged yet (each is charged once: an answer
        repeats what was charged, or names keys a restarted aggregator refused anew)."""
        charged = self.charged.get(seq, set())
        fresh = keys - charged
        if fresh:
            self.charged[seq] = charged | fresh
        return fresh

    def note_rejected(self, key: int, reason: str) -> None:
        self.rejected[key] = reason
        if len(self.rejected) > MAX_REPORTED:  # reported by a process flush: keep the newest
            del self.rejected[next(iter(self.rejected))]

    def lose(self, seq: int, reason: str, refused: Refused | None) -> None:
        """Charge the loss of batch ``seq`` (all of it, or the ``refused`` keys) to the
        rollouts that recorded it; a batch lost whole is settled."""
        self.note_rejected(seq, reason)
        items = self.items.get(seq)
        if items is not None:
            self.lose_rollouts(rollouts_in(items, refused), reason)
        elif seq in self.batch_rids:
            self.lose_rollouts(self.batch_rids[seq], reason)
        else:
            self.lost_seqs[seq] = reason
            if len(self.lost_seqs) > self.max_lost:
                del self.lost_seqs[next(iter(self.lost_seqs))]
        if refused is None:
            self.settle(seq)

    def lose_rollouts(self, rids: Iterable[int], reason: str) -> None:
        lost = self.lost_rids
        for rid in rids:
            held = lost.get(rid)
            lost[rid] = reason if held is None else f"{held}; {reason}"[:4000]
        if len(lost) > self.max_lost:
            for rid in sorted(lost)[: len(lost) - self.max_lost // 2]:
                del lost[rid]

    def settle(self, seq: int) -> None:
        """Forget what batch ``seq`` carried: it is durable or lost."""
        items = self.items.pop(seq, None)
        if items is not None:
            self.items_size -= sum(len(chunk) for chunk in items)
        self.batch_rids.pop(seq, None)
        self.charged.pop(seq, None)

    def losses(self, rid: int | None, lo: int, top: int) -> list[str]:
        """Why a flush is not ok. A rollout's (``rid``, batches ``[lo, top]``): while any of
        its leaves is lost, for as long as it asks. The process's (``rid`` None): anything
        lost since its previous flush (reported once)."""
        if rid is None:
            rejected, self.rejected = self.rejected, {}
            return list(rejected.values())
        reasons = [self.lost_rids[rid]] if rid in self.lost_rids else []
        if self.lost_seqs:
            reasons += [r for s, r in self.lost_seqs.items() if lo <= s <= top]
        return reasons
