"""Where the money went: the spend of each trajectory group, by the fate the trainer gave it.

Pure: standard library and the digest of :mod:`art_ray_metrics.core.dedupe`.

A cost leaf recorded inside a rollout can carry the rollout's *group* id (its scenario, or
whatever the trainer groups trajectories by). The producers' group spend travels next to the
cost leaves as one exact sum per group digest (:class:`GroupSpend`); a barrier may say what
became of each group (its *fate*). The row then splits ``costs/all`` by fate::

    costs/outcome/trained          spend of groups the trainer trained on
    costs/outcome/zero_variance    groups whose rewards had no variance (no gradient)
    costs/outcome/stale            groups too far off-policy to use
    costs/outcome/errored          groups whose rollouts raised
    costs/outcome/discarded        groups dropped for any other reason
    costs/outcome/unknown          everything else: spend of groups without a fate, and spend
                                   recorded outside any group (GPU time, the trainer's costs)

so the six always add up to ``costs/all`` exactly (in ``Decimal``): ``unknown`` is computed as
``costs/all`` minus the others. Each has a cumulative twin (``costs/cum/outcome/<fate>``) that
adds up the rows as every cost twin does. Two ratios follow: ``costs/per_trainable_group``
(the row's ``costs/all`` over the groups it trained on: what one useful group cost, waste
included) and ``costs/per_new_unique_scenario`` (``costs/all`` over the scenarios the run saw
for the first time in this row). A ratio whose denominator is zero is left out.

A fate given at one barrier is remembered (:class:`FateMemory`, the newest
:data:`FATE_MEMORY` groups), so group spend that arrives late, into a later row, is still
attributed to the fate its group was given.

>>> spend = GroupSpend()
>>> spend.add(group_digest("g1"), Decimal("0.30")); spend.add(group_digest("g2"), Decimal("0.20"))
>>> fates = FateTable.from_trainer({"g1": "trained", "g2": "zero_variance"})
>>> row, cum = outcome_row(Decimal("0.75"), spend, fates, new_unique_scenarios=2, cum={})
>>> {k: str(v) for k, v in sorted(row.items()) if not k.startswith("costs/cum/")}
... # doctest: +NORMALIZE_WHITESPACE
{'costs/outcome/discarded': '0', 'costs/outcome/errored': '0', 'costs/outcome/stale': '0',
 'costs/outcome/trained': '0.30', 'costs/outcome/unknown': '0.25',
 'costs/outcome/zero_variance': '0.20', 'costs/per_new_unique_scenario': '0.375',
 'costs/per_trainable_group': '0.75'}
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

from art_ray_metrics.core.dedupe import DIGEST_SIZE, digest
from art_ray_metrics.core.rollup import EXACT, ZERO
from art_ray_metrics.errors import InvalidMetricError, WireFormatError

__all__ = [
    "FATES",
    "FATE_MEMORY",
    "GIVEN_FATES",
    "OUTCOME_PREFIX",
    "PER_NEW_UNIQUE_SCENARIO_KEY",
    "PER_TRAINABLE_GROUP_KEY",
    "FateMemory",
    "FateTable",
    "GroupSpend",
    "check_fate",
    "group_digest",
    "outcome_row",
]

GIVEN_FATES: Final = ("trained", "zero_variance", "stale", "errored", "discarded")
"""Fates a trainer may give a group."""
FATES: Final = (*GIVEN_FATES, "unknown")
OUTCOME_PREFIX: Final = "costs/outcome/"
PER_TRAINABLE_GROUP_KEY: Final = "costs/per_trainable_group"
PER_NEW_UNIQUE_SCENARIO_KEY: Final = "costs/per_new_unique_scenario"
FATE_MEMORY: Final = 65_536
"""Fates remembered for late group spend (about 100 bytes each)."""

_add = EXACT.add
_sub = EXACT.subtract
_div = EXACT.divide


def check_fate(fate: object) -> str:
    """Return a fate a trainer may give, or raise.

    Raises:
        InvalidMetricError: Not one of :data:`GIVEN_FATES` (``unknown`` is never given).

    >>> check_fate("zero_variance")
    'zero_variance'
    """
    if not isinstance(fate, str) or fate not in GIVEN_FATES:
        raise InvalidMetricError(
            f"Expected a group fate in {GIVEN_FATES} but got {fate!r} (spend of groups without "
            "a fate is reported as costs/outcome/unknown)"
        )
    return fate


def group_digest(group_id: object) -> bytes:
    """The 16-byte digest a group id travels and is remembered as (ids compare as strings).

    Raises:
        InvalidMetricError: ``None``, a bool or an empty string.
    """
    if group_id is None or isinstance(group_id, bool) or group_id == "":
        raise InvalidMetricError(f"Expected a non-empty group id but got {group_id!r}")
    return digest(group_id)


class GroupSpend:
    """Exact spend per group digest of one ``(step, scope)`` (merges in any order)."""

    __slots__ = ("sums",)

    def __init__(self, sums: Mapping[bytes, Decimal] | None = None) -> None:
        self.sums: dict[bytes, Decimal] = dict(sums) if sums else {}

    def __bool__(self) -> bool:
        return bool(self.sums)

    def add(self, group: bytes, value: Decimal) -> None:
        """Add ``value`` dollars to ``group`` (a :func:`group_digest`)."""
        held = self.sums.get(group)
        self.sums[group] = value if held is None else _add(held, value)

    def merge(self, other: GroupSpend) -> None:
        """Fold another buffer's spend into this one."""
        for group, value in other.sums.items():
            self.add(group, value)

    def total(self) -> Decimal:
        """The spend of every group."""
        total = ZERO
        for value in self.sums.values():
            total = _add(total, value)
        return total

    def to_wire(self) -> list[list[Any]]:
        """``[[digest, decimal-str], ...]`` in digest order."""
        return [[g, str(v)] for g, v in sorted(self.sums.items())]

    @classmethod
    def from_wire(cls, raw: Iterable[Any]) -> GroupSpend:
        """Inverse of :meth:`to_wire`.

        Raises:
            WireFormatError: A digest of the wrong size or an amount that is not finite.
        """
        out = cls()
        for item in raw:
            group, value = item
            if not isinstance(group, bytes) or len(group) != DIGEST_SIZE:
                raise WireFormatError(f"Expected a {DIGEST_SIZE}-byte group digest, got {group!r}")
            amount = Decimal(value)
            if not amount.is_finite():
                raise WireFormatError(f"Expected a finite group spend but got {value!r}")
            out.add(group, amount)
        return out


@dataclass(frozen=True, slots=True)
class FateTable:
    """The fates a trainer gave at one barrier, by group digest."""

    fates: Mapping[bytes, str] = field(default_factory=dict)

    @classmethod
    def from_trainer(cls, fates: Mapping[Any, str] | None) -> FateTable:
        """Validate ``{group_id: fate}`` as a trainer passes it.

        Raises:
            InvalidMetricError: An empty group id or a fate not in :data:`GIVEN_FATES`.
        """
        if not fates:
            return cls()
        return cls({group_digest(g): check_fate(f) for g, f in fates.items()})

    @property
    def trained(self) -> int:
        """Groups given the fate ``trained``."""
        return sum(1 for fate in self.fates.values() if fate == "trained")

    def to_wire(self) -> list[list[Any]]:
        return [[g, f] for g, f in sorted(self.fates.items())]

    @classmethod
    def from_wire(cls, raw: Iterable[Any]) -> FateTable:
        return cls({bytes(g): check_fate(f) for g, f in raw})


class FateMemory:
    """The fates of the newest :data:`FATE_MEMORY` groups, for spend that arrives late."""

    __slots__ = ("_fates", "capacity")

    def __init__(self, capacity: int = FATE_MEMORY) -> None:
        self._fates: OrderedDict[bytes, str] = OrderedDict()
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self._fates)

    def get(self, group: bytes) -> str | None:
        return self._fates.get(group)

    def remember(self, table: FateTable) -> None:
        """Keep ``table``'s fates (a later fate of the same group replaces an earlier one)."""
        fates = self._fates
        for group, fate in table.fates.items():
            fates[group] = fate
            fates.move_to_end(group)
        while len(fates) > self.capacity:
            fates.popitem(last=False)

    def to_wire(self) -> list[list[Any]]:
        return [[g, f] for g, f in self._fates.items()]

    @classmethod
    def from_wire(cls, raw: Iterable[Any], capacity: int = FATE_MEMORY) -> FateMemory:
        memory = cls(capacity)
        memory.remember(FateTable({bytes(g): check_fate(f) for g, f in raw}))
        return memory


def outcome_row(
    costs_all: Decimal | None,
    spend: GroupSpend,
    fates: FateTable,
    *,
    new_unique_scenarios: int,
    cum: Mapping[str, Decimal],
    memory: FateMemory | None = None,
) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
    """The outcome keys of one row and the cumulative values they set.

    Args:
        costs_all: The row's ``costs/all`` (``None`` when the row has no cost).
        spend: The group spend folded into the row (its step's, and late spend).
        fates: The fates given at this barrier; a group without one here takes the fate
            ``memory`` remembers, else it is ``unknown``.
        new_unique_scenarios: Scenarios seen for the first time in this row.
        cum: The run's cumulative values (read only).
        memory: Remembered fates (read only here: the caller remembers ``fates`` on commit).

    Returns:
        ``(row, updates)``: the six ``costs/outcome/<fate>`` keys with their ``costs/cum/``
        twins and the two ratios when defined, and the cumulative values to commit. Both empty
        when the row has no cost and no group spend.
    """
    if costs_all is None and not spend:
        return {}, {}
    total = ZERO if costs_all is None else costs_all
    by_fate = dict.fromkeys(GIVEN_FATES, ZERO)
    attributed = ZERO
    for group, value in spend.sums.items():
        fate = fates.fates.get(group)
        if fate is None and memory is not None:
            fate = memory.get(group)
        if fate is None:
            continue
        by_fate[fate] = _add(by_fate[fate], value)
        attributed = _add(attributed, value)
    by_fate["unknown"] = _sub(total, attributed)
    row: dict[str, Decimal] = {}
    updates: dict[str, Decimal] = {}
    for fate in FATES:
        key = f"{OUTCOME_PREFIX}{fate}"
        cum_key = f"costs/cum/outcome/{fate}"
        row[key] = by_fate[fate]
        updates[cum_key] = row[cum_key] = _add(cum.get(cum_key, ZERO), by_fate[fate])
    trained = fates.trained
    if trained:
        row[PER_TRAINABLE_GROUP_KEY] = _div(total, Decimal(trained))
    if new_unique_scenarios > 0:
        row[PER_NEW_UNIQUE_SCENARIO_KEY] = _div(total, Decimal(new_unique_scenarios))
    return row, updates
