"""distributed/batches.py: the client's pure decisions, without a client."""

from __future__ import annotations

from decimal import Decimal

from art_ray_metrics.core.records import LeafBatch
from art_ray_metrics.core.tape import PendingLeaves, Slot
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.distributed import batches as B


def _pending() -> dict[Slot, PendingLeaves]:
    late, early = PendingLeaves(), PendingLeaves()
    late.record("costs/train/judge", 0.25)
    late.record("costs/train/judge", 0.5)
    early.record("costs/eval/judge", 1)
    return {(3, "train"): late, (1, "eval"): early}


class TestBuilding:
    def test_one_group_per_slot_in_slot_order_with_exact_sums(self) -> None:
        groups = B.step_groups(_pending())
        assert [(g.step, g.scope) for g in groups] == [(1, "eval"), (3, "train")]
        assert groups[1].sums == {"costs/train/judge": Decimal("0.75")}

    def test_shipped_big_adds_only_the_keys_the_groups_carry(self) -> None:
        groups = B.step_groups(_pending())
        big = {
            (3, "train", "costs/train/judge"): Decimal("1e300"),
            (3, "train", "costs/train/other"): Decimal(5),
        }
        assert B.shipped_big(big, groups) == {
            (3, "train", "costs/train/judge"): Decimal("1e300") + Decimal("0.75")
        }

    def test_lost_declarations_name_each_group_of_the_given_up_batch(self) -> None:
        data = encode_batch(LeafBatch("p", 4, B.step_groups(_pending()), "inc"))
        assert B.lost_declarations(4, data) == [(4, 1, "eval", 1), (4, 3, "train", 1)]
        assert B.lost_declarations(5, b"not a batch") == []


class TestAcknowledgements:
    def test_refused_keys_as_the_ledger_charges_them(self) -> None:
        refused = [(2, "train", "costs/train/x", "limit"), (2, "eval", None, "malformed")]
        assert B.refused_keys(refused) == {(2, "train", "costs/train/x"), (2, "eval", None)}
        assert B.refused_keys(None) == set()

    def test_settled_the_batch_if_durable_then_every_one_up_to_the_mark(self) -> None:
        retained = {5: b"", 2: b"", 3: b"", 7: b""}
        assert B.settled_seqs(retained, 5, True, 3) == [5, 2, 3]
        assert B.settled_seqs(retained, 5, False, 3) == [2, 3]
        assert B.settled_seqs(retained, 2, False, 0) == []
        assert B.settled_seqs(retained, 9, True, 0) == []  # not retained: nothing to settle


class TestFlushes:
    def test_a_range_is_durable_once_built_and_no_longer_retained(self) -> None:
        assert B.range_durable(5, [6, 7], 2, 5)
        assert not B.range_durable(4, [], 2, 5)  # batch 5 not built yet
        assert not B.range_durable(5, [1, 3], 2, 5)

    def test_losses_make_a_flush_not_ok_else_the_last_error_while_not_done(self) -> None:
        assert B.flush_result(True, 4, 0, [], "old") == B.FlushResult(True, 4, 0, None)
        assert B.flush_result(False, 4, 2, [], "down") == B.FlushResult(False, 4, 2, "down")
        lost = B.flush_result(True, 4, 0, ["a", "b"], None)
        assert lost == B.FlushResult(False, 4, 0, "a; b")

    def test_identities(self) -> None:
        assert B.new_incarnation() != B.new_incarnation()
        assert len(B.new_incarnation()) == 16
        assert B.default_producer_id().count("-") >= 2
