"""core/tape.py: the worker's tape, key registries and loss ledger, without a client."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from art_ray_metrics import MetricConflictError
from art_ray_metrics.core import tape as T
from art_ray_metrics.core.tape import KeyRegistries, PendingLeaves, RolloutLedger

_TRAIN = (0, "train")
_EVAL = (0, "eval")


def _entries(*entries: tuple[Any, int, str | None, Any]) -> list[Any]:
    return [item for entry in entries for item in entry]


class TestDrainTape:
    def test_sums_per_slot_counts_leaves_and_notes_each_rollouts_batch(self) -> None:
        items = _entries(
            (_TRAIN, 1, None, None),  # a builder's creation: reported, not a leaf
            (_TRAIN, 1, "costs/train/judge", 0.25),
            (_TRAIN, 1, "costs/train/judge", 0.5),
            (_EVAL, 2, "costs/eval/judge", 1),
            (_EVAL, 2, None, b"d" * 16),  # a scenario digest
        )
        pending: dict[T.Slot, PendingLeaves] = {}
        his: dict[int, int] = {}
        assert T.drain_tape(items, pending, his, 7) == 4
        assert pending[_TRAIN].sums() == {"costs/train/judge": Decimal("0.75")}
        assert pending[_EVAL].sums() == {"costs/eval/judge": Decimal(1)}
        assert pending[_EVAL].scenarios == {b"d" * 16}
        assert his == {1: 7, 2: 7}

    def test_rollouts_in_names_only_those_that_recorded_a_refused_key(self) -> None:
        chunk = _entries(
            (_TRAIN, 1, "costs/train/a", 1),
            (_TRAIN, 2, "costs/train/b", 1),
            (_EVAL, 3, "costs/eval/c", 1),
            (_EVAL, 4, None, None),  # a builder of the group that recorded nothing yet
        )
        assert T.rollouts_in([chunk], None) == {1, 2, 3, 4}
        assert T.rollouts_in([chunk], {(0, "train", "costs/train/b")}) == {2}
        assert T.rollouts_in([chunk], {(0, "eval", None)}) == {3, 4}  # the whole group


class TestKeyRegistries:
    def test_one_slot_object_per_slot_and_conflicts_raise(self) -> None:
        registries = KeyRegistries()
        slot, registry = registries.entry((3, "train"))
        assert registries.entry((3, "train"))[0] is slot
        registries.register((3, "train"), "costs/train/judge")
        assert registry.leaves == {"costs/train/judge": True}
        with pytest.raises(MetricConflictError, match="ancestor"):
            registries.register((3, "train"), "costs/train")
        with pytest.raises(MetricConflictError, match="add_sample"):
            registries.register_sample((3, "train"), "costs/train/judge")

    def test_the_latest_steps_are_kept(self) -> None:
        registries = KeyRegistries()
        for step in range(3 * T.MAX_REGISTRIES):
            registries.entry((step, "train"))
        assert len(registries.entries) <= T.MAX_REGISTRIES
        assert (3 * T.MAX_REGISTRIES - 1, "train") in registries.entries


class TestRolloutLedger:
    def _ledger_with_batch(self) -> RolloutLedger:
        ledger = RolloutLedger(max_lost=100)
        ledger.note_drain(
            _entries((_TRAIN, 1, "costs/train/a", 1), (_TRAIN, 2, "costs/train/b", 1))
        )
        ledger.built(1, ledger.take_drained())
        return ledger

    def test_refused_keys_fail_only_the_rollouts_that_recorded_them(self) -> None:
        ledger = self._ledger_with_batch()
        refused = {(0, "train", "costs/train/b")}
        assert ledger.newly_refused(1, refused) == refused
        ledger.lose(1, "limit", refused)
        assert ledger.newly_refused(1, refused) == set()  # charged once
        assert ledger.losses(1, 1, 1) == []
        assert ledger.losses(2, 1, 1) == ["limit"]
        assert ledger.losses(None, 1, 1) == ["limit"]
        assert ledger.losses(None, 1, 1) == []  # the process's report is given once
        assert ledger.losses(2, 1, 1) == ["limit"]  # a rollout's, for as long as it asks

    def test_an_answered_batch_charges_all_its_rollouts(self) -> None:
        ledger = self._ledger_with_batch()
        ledger.applied(1)
        assert ledger.items == {}
        assert ledger.items_size == 0
        ledger.lose(1, "dropped at the cap", None)
        assert ledger.losses(1, 1, 1) == ledger.losses(2, 1, 1) == ["dropped at the cap"]
        assert ledger.batch_rids == {}  # lost whole: settled

    def test_a_batch_of_unknown_rollouts_fails_every_flush_covering_it(self) -> None:
        ledger = RolloutLedger(max_lost=100)
        ledger.lose(5, "gone", None)
        assert ledger.losses(9, 1, 5) == ["gone"]
        assert ledger.losses(9, 6, 8) == []

    def test_items_over_the_budget_keep_their_rollouts_only(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(T, "ITEMS_BUDGET", 8)
        ledger = self._ledger_with_batch()
        ledger.note_drain(
            _entries((_TRAIN, 3, "costs/train/c", 1), (_TRAIN, 3, "costs/train/c", 1))
        )
        ledger.built(2, ledger.take_drained())
        assert list(ledger.items) == [2]
        assert ledger.batch_rids == {1: {1, 2}}
        ledger.lose(1, "limit", {(0, "train", "costs/train/b")})  # only its rollouts are known
        assert ledger.losses(1, 1, 1) == ledger.losses(2, 1, 1) == ["limit"]

    def test_an_unbuildable_batch_fails_its_rollouts(self) -> None:
        ledger = RolloutLedger(max_lost=100)
        ledger.note_drain(_entries((_TRAIN, 4, "costs/train/a", 1)))
        ledger.not_built(ledger.take_drained(), -1, "not encodable")
        assert ledger.items_size == 0
        assert ledger.losses(4, 1, 1) == ["not encodable"]
        assert ledger.losses(None, 1, 1) == ["not encodable"]
