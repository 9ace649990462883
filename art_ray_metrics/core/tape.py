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
  :func:`rollouts_in` tells which rollouts recorded what.
- :class:`KeyRegistries`: per slot, the one slot object builders put on the tape (so a drain
  tells a change of slot by identity) and the registry of the slot's keys, for the latest
  :data:`MAX_REGISTRIES` slots.

No locks here: the client (:mod:`art_ray_metrics.distributed.client`) calls these under its own.
"""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

from art_ray_metrics.core import keytree
from art_ray_metrics.core.records import KeyedCost
from art_ray_metrics.core.rollup import exact_sum, to_decimal
from art_ray_metrics.core.samples import SampleStats
from art_ray_metrics.core.state import StepBuffer
from art_ray_metrics.errors import MetricConflictError

__all__ = [
    "ENTRY",
    "MAX_REGISTRIES",
    "ROLLOUT_IDS",
    "KeyRegistries",
    "Number",
    "PendingLeaves",
    "RolloutCtx",
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

    __slots__ = ("ancestors", "cost_ids", "keyed", "leaves", "samples", "scenarios")

    def __init__(self) -> None:
        self.leaves: dict[str, Any] = {}
        self.ancestors: dict[str, str] = {}
        self.samples: dict[str, list[float]] = {}  # add_sample values, averaged at the barrier
        self.scenarios: set[bytes] = set()
        self.keyed: list[KeyedCost] = []  # producer side: applied once per id by the actor
        self.cost_ids: set[bytes] = set()  # in-process: response ids already applied here

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
    items: list[Any], pending: dict[Slot, PendingLeaves], his: dict[int, int], seq: int
) -> int:
    """Add tape ``items`` to the ``pending`` leaves of their slots; note in ``his`` that
    batch ``seq`` carries each rollout's last leaves. Returns the number of leaves added
    (scenario digests included, builder creation marks not).

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
