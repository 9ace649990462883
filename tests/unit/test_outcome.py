"""Outcomes: the spend of each group by the fate the trainer gave it, summing to costs/all."""

from __future__ import annotations

from decimal import Decimal

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from art_ray_metrics.core.outcome import (
    FATES,
    GIVEN_FATES,
    OUTCOME_PREFIX,
    PER_NEW_UNIQUE_SCENARIO_KEY,
    PER_TRAINABLE_GROUP_KEY,
    FateMemory,
    FateTable,
    GroupSpend,
    check_fate,
    group_digest,
    outcome_row,
)
from art_ray_metrics.errors import InvalidMetricError, WireFormatError
from tests.hypothesis_profiles import examples

D = Decimal
CENTS = st.integers(min_value=0, max_value=10**6).map(lambda c: D(c) / 100)
GROUPS = st.text(min_size=1, max_size=6)


def _outcomes(row: dict[str, Decimal]) -> dict[str, Decimal]:
    return {k[len(OUTCOME_PREFIX) :]: v for k, v in row.items() if k.startswith(OUTCOME_PREFIX)}


@settings(max_examples=examples(200), deadline=None)
@given(
    spend=st.dictionaries(GROUPS, CENTS, max_size=12),
    fates=st.dictionaries(GROUPS, st.sampled_from(GIVEN_FATES), max_size=12),
    outside=CENTS,
    new=st.integers(0, 5),
)
def test_outcomes_sum_to_costs_all_exactly(
    spend: dict[str, Decimal], fates: dict[str, str], outside: Decimal, new: int
) -> None:
    buf = GroupSpend()
    for group, value in spend.items():
        buf.add(group_digest(group), value)
    costs_all = sum(spend.values(), D(0)) + outside
    table = FateTable.from_trainer(fates)
    row, cum = outcome_row(costs_all, buf, table, new_unique_scenarios=new, cum={})
    outcomes = _outcomes(row)
    assert set(outcomes) == set(FATES)
    assert sum(outcomes.values(), D(0)) == costs_all
    for fate in GIVEN_FATES:
        assert outcomes[fate] == sum((v for g, v in spend.items() if fates.get(g) == fate), D(0))
    assert outcomes["unknown"] >= outside
    assert cum == {f"costs/cum/outcome/{f}": outcomes[f] for f in FATES}
    trained = sum(1 for f in fates.values() if f == "trained")
    assert (PER_TRAINABLE_GROUP_KEY in row) == (trained > 0)
    if trained:
        assert row[PER_TRAINABLE_GROUP_KEY] * trained == costs_all
    assert (PER_NEW_UNIQUE_SCENARIO_KEY in row) == (new > 0)


@settings(max_examples=examples(100), deadline=None)
@given(
    leaves=st.lists(st.tuples(st.sampled_from("abcd"), CENTS), max_size=20),
    cut=st.integers(0, 20),
)
def test_group_spend_merges_in_any_order(leaves: list[tuple[str, Decimal]], cut: int) -> None:
    whole, first, second = GroupSpend(), GroupSpend(), GroupSpend()
    for i, (group, value) in enumerate(leaves):
        whole.add(group_digest(group), value)
        (first if i < cut else second).add(group_digest(group), value)
    second.merge(first)
    assert second.sums == whole.sums
    raw = msgpack.unpackb(msgpack.packb(whole.to_wire()))
    assert GroupSpend.from_wire(raw).sums == whole.sums
    assert whole.total() == sum((v for _, v in leaves), D(0))


def test_cumulative_twins_add_up_the_rows() -> None:
    cum: dict[str, Decimal] = {}
    g = group_digest("g")
    for value in ("0.10", "0.25"):
        spend = GroupSpend({g: D(value)})
        _row, updates = outcome_row(
            D(value) * 2,
            spend,
            FateTable.from_trainer({"g": "stale"}),
            new_unique_scenarios=0,
            cum=cum,
        )
        cum.update(updates)
    assert cum["costs/cum/outcome/stale"] == D("0.35")
    assert cum["costs/cum/outcome/unknown"] == D("0.35")
    assert cum["costs/cum/outcome/trained"] == 0


def test_late_spend_takes_the_remembered_fate() -> None:
    memory = FateMemory(capacity=2)
    memory.remember(FateTable.from_trainer({"old": "errored", "x": "trained"}))
    memory.remember(FateTable.from_trainer({"y": "trained"}))  # "old" falls out
    assert len(memory) == 2
    assert memory.get(group_digest("old")) is None
    spend = GroupSpend({group_digest("x"): D(1), group_digest("old"): D(2)})
    row, _ = outcome_row(D(3), spend, FateTable(), new_unique_scenarios=0, cum={}, memory=memory)
    assert _outcomes(row)["trained"] == D(1)
    assert _outcomes(row)["unknown"] == D(2)
    assert PER_TRAINABLE_GROUP_KEY not in row  # trained counts fates given at this barrier
    back = FateMemory.from_wire(msgpack.unpackb(msgpack.packb(memory.to_wire())), capacity=2)
    assert back.get(group_digest("x")) == "trained"


def test_a_row_without_cost_has_no_outcome() -> None:
    assert outcome_row(None, GroupSpend(), FateTable(), new_unique_scenarios=3, cum={}) == (
        {},
        {},
    )


@pytest.mark.parametrize("bad", ["unknown", "TRAINED", "", None, 3])
def test_unknown_fates_are_refused(bad: object) -> None:
    with pytest.raises(InvalidMetricError, match="fate"):
        check_fate(bad)


@pytest.mark.parametrize("bad", [None, "", True])
def test_empty_group_ids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidMetricError, match="group id"):
        group_digest(bad)


def test_malformed_group_spend_is_refused() -> None:
    with pytest.raises(WireFormatError):
        GroupSpend.from_wire([[b"short", "1"]])
    with pytest.raises(WireFormatError):
        GroupSpend.from_wire([[group_digest("g"), "NaN"]])
    assert FateTable.from_wire(FateTable.from_trainer({"g": "trained"}).to_wire()).trained == 1
