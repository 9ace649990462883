"""The aggregator's rows carry the outcomes and the run budget; batches carry the spend."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from art_ray_metrics.core.outcome import FATES, GIVEN_FATES, group_digest
from art_ray_metrics.core.records import LeafBatch, StepGroup
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.core.validate import check_cost_context, validate_key
from art_ray_metrics.core.wire import FORMAT_VERSION, SPEND_VERSION, decode_batch, encode_batch
from art_ray_metrics.errors import InvalidMetricError, WireFormatError
from tests.hypothesis_profiles import examples

D = Decimal
ZERO = Decimal(0)
CENTS = st.integers(min_value=1, max_value=10**5).map(lambda c: D(c) / 100)


def _group(step: int, spend: dict[str, Decimal], extra: Decimal = ZERO) -> StepGroup:
    total = sum(spend.values(), D(0)) + extra
    return StepGroup(
        step,
        "train",
        {"costs/train/judge": total} if total else {},
        group_spend={group_digest(g): v for g, v in spend.items()},
    )


@settings(max_examples=examples(60), deadline=None)
@given(
    batches=st.lists(
        st.tuples(
            st.sampled_from(["w1", "w2", "w3"]),
            st.dictionaries(st.sampled_from("abcdef"), CENTS, max_size=4),
            st.sampled_from([D(0), D("0.07")]),
        ),
        min_size=1,
        max_size=12,
    ),
    fates=st.dictionaries(st.sampled_from("abcdef"), st.sampled_from(GIVEN_FATES)),
    trainer_cost=st.sampled_from([None, 0.5]),
)
def test_outcomes_in_rows_sum_to_costs_all_to_the_cent(
    batches: list[tuple[str, dict[str, Decimal], Decimal]],
    fates: dict[str, str],
    trainer_cost: float | None,
) -> None:
    state = AggregatorState()
    seqs: dict[str, int] = {}
    for producer, spend, extra in batches:
        seqs[producer] = seqs.get(producer, 0) + 1
        batch = LeafBatch(producer, seqs[producer], (_group(1, spend, extra),), "i")
        state.ingest_bytes(encode_batch(batch))  # through the wire, as the actor does
    metrics = {} if trainer_cost is None else {"costs/gpu": trainer_cost}
    row = state.close_step(1, "train", metrics, group_fates=fates).row
    tagged = any(spend for _, spend, _ in batches)
    if "costs/all" not in row or not (tagged or fates):
        assert not any(k.startswith("costs/outcome/") for k in row)
        return
    outcomes = {f: D(repr(row[f"costs/outcome/{f}"])) for f in FATES}
    assert sum(outcomes.values(), D(0)).quantize(D("0.01")) == D(repr(row["costs/all"])).quantize(
        D("0.01")
    )
    for fate in GIVEN_FATES:
        want = sum(
            (v for _, spend, _ in batches for g, v in spend.items() if fates.get(g) == fate),
            D(0),
        )
        assert outcomes[fate] == want
        assert row[f"costs/cum/outcome/{fate}"] == row[f"costs/outcome/{fate}"]
    assert state.budget.spent == D(repr(row["costs/all"]))


def test_outcome_twins_add_up_and_late_spend_keeps_its_fate() -> None:
    state = AggregatorState()
    state.ingest(LeafBatch("w", 1, (_group(1, {"a": D(1), "b": D(2)}),), "i"))
    row1 = state.close_step(1, "train", group_fates={"a": "trained", "b": "stale"}).row
    assert row1["costs/per_trainable_group"] == 3.0
    state.ingest(LeafBatch("w", 2, (_group(1, {"a": D("0.5")}),), "i"))  # late for step 1
    state.ingest(LeafBatch("w", 3, (_group(2, {"c": D(4)}),), "i"))
    row2 = state.close_step(2, "train", group_fates={"c": "errored"}).row
    assert row2["costs/outcome/trained"] == 0.5  # remembered from step 1
    assert row2["costs/outcome/errored"] == 4.0
    assert row2["costs/cum/outcome/trained"] == 1.5
    assert row2["costs/cum/outcome/stale"] == 2.0
    assert row2["costs/cum/all"] == 7.5


def test_new_unique_scenarios_price_each_first_seen_scenario() -> None:
    state = AggregatorState()
    digests = group_digest("s1") + group_digest("s2")
    group = StepGroup(1, "train", {"costs/train/judge": D(3)}, scenario_digests=digests)
    state.ingest(LeafBatch("w", 1, (group,), "i"))
    assert "costs/per_new_unique_scenario" not in state.close_step(1).row  # outcomes off
    group = StepGroup(
        2,
        "train",
        {"costs/train/judge": D(3)},
        scenario_digests=group_digest("s3") + group_digest("s4"),
        group_spend={group_digest("s3"): D(1)},
    )
    state.ingest(LeafBatch("w", 2, (group,), "i"))
    assert state.close_step(2).row["costs/per_new_unique_scenario"] == 1.5
    group = StepGroup(3, "train", {"costs/train/judge": D(3)}, scenario_digests=digests)
    state.ingest(LeafBatch("w", 3, (group,), "i"))
    assert "costs/per_new_unique_scenario" not in state.close_step(3).row  # none new


def _spend_keys(row: dict[str, float]) -> set[str]:
    derived = ("costs/outcome/", "costs/cum/outcome/", "costs/per_", "costs/budget_")
    named = {"costs/projected_total", "costs/unreconciled", "costs/cum/unreconciled"}
    return {k for k in row if k.startswith(derived) or k in named}


def test_a_run_without_budget_or_groups_gets_no_spend_keys() -> None:
    """Rows as they were before outcomes and budgets: no key appears unasked (ART parity);
    fates an integration derived (``derived_fates``) do not turn the outcomes on either."""
    state = AggregatorState()
    for step in (1, 2):
        group = StepGroup(
            step, "train", {"costs/train/judge": D(2)}, scenario_digests=group_digest(f"s{step}")
        )
        state.ingest(LeafBatch("w", step, (group,), "i"))
        row = state.close_step(step, "train", {"costs/gpu": 0.5}, derived_fates={"s1": "trained"})
        assert row.row["costs/all"] == 2.5
        assert _spend_keys(row.row) == set()
    again = AggregatorState.restore(state.snapshot())
    again.ingest(LeafBatch("w", 3, (StepGroup(3, "train", {"costs/train/judge": D(1)}),), "i"))
    assert _spend_keys(again.close_step(3).row) == set()


def test_outcomes_turn_on_at_the_first_tagged_row_and_stay_on_over_a_restart() -> None:
    state = AggregatorState()
    state.ingest(LeafBatch("w", 1, (StepGroup(1, "train", {"costs/train/judge": D(2)}),), "i"))
    assert _spend_keys(state.close_step(1).row) == set()
    state.ingest(LeafBatch("w", 2, (_group(2, {"a": D(1)}, extra=D("0.5")),), "i"))
    row2 = state.close_step(2, derived_fates={"a": "zero_variance"}).row
    assert row2["costs/outcome/zero_variance"] == 1.0
    assert row2["costs/outcome/unknown"] == 0.5
    # the twins add up to costs/cum/all: the spend before the outcomes were on is unknown
    assert row2["costs/cum/outcome/unknown"] == 2.5
    assert sum(row2[f"costs/cum/outcome/{f}"] for f in FATES) == row2["costs/cum/all"] == 3.5
    restored = AggregatorState.restore(state.snapshot())  # a restart keeps them on
    plain = StepGroup(3, "train", {"costs/train/judge": D("0.25")})
    restored.ingest(LeafBatch("w", 3, (plain,), "i"))
    row3 = restored.close_step(3).row
    assert row3["costs/outcome/unknown"] == 0.25
    assert sum(row3[f"costs/outcome/{f}"] for f in FATES) == row3["costs/all"]
    assert sum(row3[f"costs/cum/outcome/{f}"] for f in FATES) == row3["costs/cum/all"] == 3.75


def test_fates_given_at_a_barrier_turn_the_outcomes_on() -> None:
    state = AggregatorState()
    state.ingest(LeafBatch("w", 1, (StepGroup(1, "train", {"costs/train/judge": D(2)}),), "i"))
    row = state.close_step(1, group_fates={"g": "trained"}).row
    assert row["costs/outcome/unknown"] == 2.0
    assert row["costs/per_trainable_group"] == 2.0


def test_the_budget_is_in_the_checkpoint_and_counts_batches_once() -> None:
    state = AggregatorState()
    state.budget.set_limit(D(10))
    state.budget.grant("w", "i", want=D(4), need=D(1), now=0)
    batch = LeafBatch("w", 1, (_group(1, {"a": D(1)}),), "i", admitted=D(1))
    data = encode_batch(batch)
    state.ingest_bytes(data)
    state.ingest_bytes(data)  # a resend: applied once, spent once
    assert state.budget.spent == D(1)
    assert state.budget.accounts[("w", "i")].shipped == D(1)
    restored = AggregatorState.restore(state.snapshot())
    assert restored.budget.to_wire() == state.budget.to_wire()
    blob, shards, _ = state.checkpoint_parts()
    again = AggregatorState.from_checkpoint(blob, shards)
    assert again.budget.committed() == D(4)
    restored.budget.declare_gone("w", "i")
    row = restored.close_step(1).row
    assert row["costs/unreconciled"] == 3.0
    assert row["costs/cum/unreconciled"] == 3.0
    assert row["costs/budget_remaining"] == 6.0


def test_a_snapshot_without_budget_restores_an_unlimited_one() -> None:
    state = AggregatorState()
    raw = state.to_wire()
    del raw["budget"], raw["fates"]
    old = AggregatorState.from_wire(raw)
    assert old.budget.limit is None
    assert old.budget.spent == 0


def test_batches_without_spend_keep_format_3_bytes() -> None:
    plain = LeafBatch("w", 1, (StepGroup(1, "train", {"costs/train/x": D(1)}),), "i")
    assert decode_batch(encode_batch(plain)).version == FORMAT_VERSION
    spending = LeafBatch("w", 1, (_group(1, {"g": D(1)}),), "i", admitted=D("0.25"))
    back = decode_batch(encode_batch(spending))
    assert back.version == SPEND_VERSION
    assert back.admitted == D("0.25")
    assert back.groups[0].group_spend == {group_digest("g"): D(1)}


@pytest.mark.parametrize(
    "field",
    [["x", []], ["-1", []], ["1", [[5, []]]], ["1", [[0, [[b"short", "1"]]]]], "nope"],
)
def test_a_malformed_spend_field_is_refused(field: object) -> None:
    import msgpack

    good = encode_batch(LeafBatch("w", 1, (_group(1, {"g": D(1)}),), "i", admitted=D(1)))
    obj = msgpack.unpackb(good)
    obj[9] = field
    with pytest.raises(WireFormatError):
        decode_batch(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize(
    "key", ["costs/outcome/trained", "costs/budget_remaining", "costs/unreconciled/x"]
)
def test_derived_cost_names_are_reserved(key: str) -> None:
    with pytest.raises(InvalidMetricError, match="computed by the aggregator"):
        validate_key(key)


@pytest.mark.parametrize("context", ["outcome", "projected_total", "cum"])
def test_derived_cost_contexts_are_refused(context: str) -> None:
    with pytest.raises(InvalidMetricError):
        check_cost_context(context)


def test_bad_fates_fail_the_barrier_and_change_nothing() -> None:
    state = AggregatorState()
    state.ingest(LeafBatch("w", 1, (_group(1, {"a": D(1)}),), "i"))
    with pytest.raises(InvalidMetricError, match="fate"):
        state.close_step(1, group_fates={"a": "lost"})
    assert (1, "train") in state.pending
    assert state.close_step(1, group_fates={"a": "trained"}).row["costs/outcome/trained"] == 1.0
