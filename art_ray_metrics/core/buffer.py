"""Step buffers: the pending leaves of one ``(step, scope)`` and the run-wide cumulative state.

Pure data with exact arithmetic (no I/O). Both consumers of the step math use them: the
in-process :class:`~art_ray_metrics.builder.MetricsBuilder` (one buffer per scope) and the
aggregator's :class:`~art_ray_metrics.core.state.AggregatorState` (one buffer per slot, the
``(step, scope)`` pair). Ingest (:mod:`art_ray_metrics.core.ingest`) fills them; the barrier
math (:mod:`art_ray_metrics.core.close`) folds them into rows.

**Conflicts keep every dollar.** When one producer sends ``costs/train`` and another
``costs/train/x`` for the same step, the ancestor's value moves to ``costs/train/unattributed``
(so ``costs/train`` = x + unattributed), and the clash is recorded. A single producer cannot
create a conflict: it raises there.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from art_ray_metrics.core import keytree
from art_ray_metrics.core.dedupe import DigestLedger, split_digests
from art_ray_metrics.core.outcome import GroupSpend
from art_ray_metrics.core.rollup import EXACT
from art_ray_metrics.core.samples import SampleStats

__all__ = ["UNATTRIBUTED", "CumulativeState", "StepBuffer"]

UNATTRIBUTED = "unattributed"
"""Child that receives an ancestor leaf's value when two producers' leaves conflict."""

_add = EXACT.add


class StepBuffer:
    """The pending leaves of one ``(step, scope)``: exact sums with ancestor bookkeeping."""

    __slots__ = (
        "_ancestors",
        "conflicts",
        "cost_ids",
        "group_spend",
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
        self.group_spend = GroupSpend()
        """Spend of the cost leaves that carried a group id, by group (outcomes)."""

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
        clash = keytree.admit(key, sums, self._ancestors)
        while clash is not None:
            if strict:
                raise keytree.conflict_error(key, clash)
            self.conflicts.append(clash)
            above = clash[0]
            if above == key:  # an ancestor of a pending leaf: the value goes beside it
                self.add(f"{key}/{UNATTRIBUTED}", value, strict=False)
                return
            # a pending leaf above ``key``: its value moves under it (so it becomes an
            # ancestor), then ``key`` is admitted below it
            self.add(f"{above}/{UNATTRIBUTED}", sums.pop(above), strict=False)
            clash = keytree.admit(key, sums, self._ancestors)
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
        self.group_spend.merge(other.group_spend)

    def to_wire(self) -> list[Any]:
        """Plain msgpack-able form (see :mod:`art_ray_metrics.core.wire`); sample summaries are
        appended as a seventh field only when there are any (or lost leaves follow), lost
        leaves as an eighth only when there are any (or group spend follows), group spend as
        a ninth only when there is any (older builds wrote six, seven or eight)."""
        out: list[Any] = [
            {k: str(v) for k, v in self.sums.items()},
            b"".join(sorted(self.scenarios)),
            b"".join(sorted(self.cost_ids)),
            sorted(self.producers),
            self.late_leaves,
            [list(c) for c in self.conflicts],
        ]
        if self.samples or self.lost_leaves or self.group_spend:
            out.append({k: v.to_wire() for k, v in sorted(self.samples.items())})
        if self.lost_leaves or self.group_spend:
            out.append(self.lost_leaves)
        if self.group_spend:
            out.append(self.group_spend.to_wire())
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
        if len(raw) > 8:
            buf.group_spend = GroupSpend.from_wire(raw[8])
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
