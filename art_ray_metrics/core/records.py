"""Plain records exchanged between producers, the aggregator state and the wire format.

A producer ships a :class:`LeafBatch`: its stable (logical) ``producer_id``, the
``incarnation`` its process chose at start (so a restarted, retried or forked producer under the
same id starts a fresh sequence), a per-incarnation sequence number ``seq`` (1, 2, 3, … in the
order batches are built) and one :class:`StepGroup` per
``(step, scope)`` it recorded leaves for. Within a group, repeated keys are already summed
(sums commute, so pre-aggregating at the producer changes no row), except API costs that carry
a provider response id: those travel one by one as :class:`KeyedCost` so the aggregator can
apply each paid response at most once per run. Scenario ids travel as 16-byte digests. Values
recorded with ``add_sample`` (averaged, not summed) travel as
:class:`~art_ray_metrics.core.samples.SampleStats`, which merge exactly too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from art_ray_metrics.core.samples import SampleStats

__all__ = ["IngestResult", "KeyedCost", "LeafBatch", "StepGroup"]


@dataclass(frozen=True, slots=True)
class KeyedCost:
    """One API cost leaf that must be applied at most once per ``response_id``."""

    key: str
    value: Decimal
    response_id: str


@dataclass(frozen=True, slots=True)
class StepGroup:
    """Everything one producer recorded for one ``(step, scope)`` since its last batch."""

    step: int
    scope: str
    sums: dict[str, Decimal] = field(default_factory=dict)
    keyed_costs: tuple[KeyedCost, ...] = ()
    scenario_digests: bytes = b""
    samples: dict[str, SampleStats] = field(default_factory=dict)
    group_spend: dict[bytes, Decimal] = field(default_factory=dict)
    """Spend of this group's cost leaves that carried a group id, by group digest (a part of
    the sums, not added to them: :mod:`~art_ray_metrics.core.outcome`)."""
    keyed_groups: dict[int, bytes] = field(default_factory=dict)
    """The group digest of a keyed cost, by its index in :attr:`keyed_costs` (added to the
    group's spend only when the cost is applied, once per response id)."""

    @property
    def leaf_count(self) -> int:
        """Number of distinct leaves (sums, keyed costs and sampled keys) in the group."""
        return len(self.sums) + len(self.keyed_costs) + len(self.samples)


@dataclass(frozen=True, slots=True)
class LeafBatch:
    """What a producer sends in one call; ``(producer_id, incarnation, seq)`` makes resends
    idempotent."""

    producer_id: str
    seq: int
    groups: tuple[StepGroup, ...]
    incarnation: str = ""
    acked_upto: int = 0
    """The producer holds durable acknowledgements of every seq up to this one (it will never
    resend them)."""
    dropped: int = 0
    """Batches the producer gave up on (retained-batch cap) since its previous batch."""
    lost: tuple[tuple[int, int, str, int], ...] = ()
    """``(seq, step, scope, leaves)`` of the batches the producer gave up on, per group,
    until a batch declaring them is acknowledged (format 3): counted on their steps' rows."""
    version: int = 3
    admitted: Decimal = Decimal(0)
    """Real cost of the calls admitted under the producer's budget lease whose cost leaves
    this batch carries (:mod:`~art_ray_metrics.core.budget`)."""
    """The wire format it was read from. From format 3 on, ``acked_upto`` advances the
    producer's window past the batches it gave up on (older batches replay as they did)."""

    @property
    def leaf_count(self) -> int:
        """Number of distinct leaves over all groups."""
        return sum(g.leaf_count for g in self.groups)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """The aggregator's answer to one batch."""

    producer_id: str
    seq: int
    duplicate: bool
    late_leaves: int = 0
    conflicts: tuple[tuple[str, str], ...] = ()
    incarnation: str = ""
    acked_upto: int = 0
    refused: tuple[tuple[int, str, str | None, str], ...] = ()
    """``(step, scope, key or None for the whole group, reason)`` of what was not applied."""
    limit: bool = False
    """A configured limit (not an overflow) refused something of the batch."""
