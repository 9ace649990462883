"""The run budget's pure core: the aggregator's ledger and the producers' leases.

The state machine plays the whole protocol (grants, calls, settles, batches, idle returns,
producer deaths and silences, aggregator restarts from a checkpoint plus a replayed log, limit
changes) and checks after every step that the ledger never commits less than what may have
been paid, that no grant lets admitted calls past the hard limit, and that the unreconciled
bound covers what dead producers paid and no row counts, within their unused lease.
"""

from __future__ import annotations

from decimal import Decimal

import msgpack
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from art_ray_metrics.core.budget import (
    BUDGET_REMAINING_KEY,
    PROJECTED_TOTAL_KEY,
    UNRECONCILED_CUM_KEY,
    UNRECONCILED_KEY,
    BudgetLedger,
)
from art_ray_metrics.core.budget_terms import check_limit, check_soft
from art_ray_metrics.core.lease import LocalLease
from art_ray_metrics.errors import ConfigError
from tests.hypothesis_profiles import examples

D = Decimal


def test_a_grant_never_passes_the_limit() -> None:
    ledger = BudgetLedger(limit=D("1.00"))
    first = ledger.grant("a", "1", want=D("0.60"), need=D("0.10"), now=0)
    second = ledger.grant("b", "1", want=D("0.60"), need=D("0.10"), now=0)
    assert (first.amount, second.amount) == (D("0.60"), D("0.40"))
    third = ledger.grant("c", "1", want=D("0.60"), need=D("0.01"), now=0)
    assert third.amount == 0
    assert third.exhausted
    assert third.committed == D("1.00")
    assert third.limit == D("1.00")


def test_need_that_does_not_fit_gets_nothing() -> None:
    ledger = BudgetLedger(limit=D("1.00"))
    ledger.on_trainer_cost(D("0.95"))
    grant = ledger.grant("a", "1", want=D("0.50"), need=D("0.10"), now=0)
    assert grant.amount == 0
    assert grant.exhausted
    assert grant.spent == D("0.95")
    small = ledger.grant("a", "1", want=D("0.50"), need=D("0.02"), now=0)
    assert small.amount == D("0.05")
    assert not small.exhausted


def test_without_limit_everything_is_granted_and_leases_still_bound_losses() -> None:
    ledger = BudgetLedger(limit=None)
    assert ledger.grant("a", "1", want=D(5), need=D(1), now=0).amount == D(5)
    assert ledger.remaining() is None
    assert ledger.headroom() is None
    ledger.on_batch("a", "1", cost=D(2), admitted=D(2), now=1)
    assert ledger.declare_gone("a", "1")
    assert ledger.unreconciled() == D(3)


def test_idle_return_forgets_the_account_and_a_gone_one_is_kept() -> None:
    ledger = BudgetLedger(limit=D(10))
    ledger.grant("a", "1", want=D(4), need=D(0), now=0)
    ledger.on_batch("a", "1", cost=D(1), admitted=D(1), now=1)
    ledger.give_back("a", "1", D(3), now=2)
    assert ledger.accounts == {}
    assert ledger.committed() == D(1)
    assert not ledger.declare_gone("a", "1")  # nothing outstanding: nothing lost


def test_silence_past_the_timeout_is_gone_and_asking_again_revives() -> None:
    ledger = BudgetLedger(limit=D(10), silence_timeout_s=5)
    ledger.grant("a", "1", want=D(2), need=D(0), now=0)
    ledger.grant("b", "1", want=D(2), need=D(0), now=0)
    ledger.on_batch("b", "1", cost=D(0), admitted=D(0), now=4)
    assert ledger.sweep(now=6) == [("a", "1")]
    assert ledger.unreconciled() == D(2)
    ledger.grant("a", "1", want=D(1), need=D(0), now=7)  # it was only silent
    assert ledger.unreconciled() == 0
    assert ledger.committed() == D(5)


def test_late_reconciliation_leaves_the_bound() -> None:
    ledger = BudgetLedger(limit=D(10))
    ledger.grant("a", "1", want=D(3), need=D(0), now=0)
    ledger.declare_gone("a", "1")
    row = ledger.row(train_close=True)
    assert row[UNRECONCILED_KEY] == D(3)
    assert row[UNRECONCILED_CUM_KEY] == D(3)
    ledger.on_batch("a", "1", cost=D("1.25"), admitted=D("1.25"), now=1)
    row = ledger.row(train_close=True)
    assert row[UNRECONCILED_KEY] == D("-1.25")
    assert row[UNRECONCILED_CUM_KEY] == D("1.75")
    assert ledger.spent == D("1.25")
    assert row[BUDGET_REMAINING_KEY] == D(10) - D(3)


def test_rows_carry_remaining_and_projection() -> None:
    ledger = BudgetLedger(limit=D(100), planned_steps=10)
    assert ledger.row(train_close=False) == {BUDGET_REMAINING_KEY: D(100)}
    ledger.on_trainer_cost(D(4))
    row = ledger.row(train_close=True)
    assert row == {BUDGET_REMAINING_KEY: D(96), PROJECTED_TOTAL_KEY: D(40)}
    ledger.on_trainer_cost(D(2))
    assert ledger.row(train_close=True)[PROJECTED_TOTAL_KEY] == D(30)
    assert UNRECONCILED_KEY not in ledger.row(train_close=False)


def test_soft_limit_crosses_once_and_rearms_when_raised() -> None:
    ledger = BudgetLedger(limit=D(10), soft=D("0.5"))
    ledger.on_trainer_cost(D(4))
    assert not ledger.cross_soft()
    ledger.on_trainer_cost(D(1))
    assert ledger.cross_soft()
    assert not ledger.cross_soft()
    restored = BudgetLedger.from_wire(ledger.to_wire(), now=0)
    assert not restored.cross_soft()  # the flag survives a restart
    restored.set_limit(D(20))
    ledger.on_trainer_cost(D(0))
    assert not restored.cross_soft()
    restored.on_trainer_cost(D(5))
    assert restored.cross_soft()


def test_lowering_the_limit_stops_grants_and_leases_stay() -> None:
    ledger = BudgetLedger(limit=D(10))
    ledger.grant("a", "1", want=D(6), need=D(0), now=0)
    ledger.set_limit(D(5))
    assert ledger.headroom() == 0
    assert ledger.grant("b", "1", want=D(1), need=D("0.1"), now=0).exhausted
    assert ledger.committed() == D(6)


def test_a_restart_that_lost_a_grant_heals_from_what_the_producer_holds() -> None:
    ledger = BudgetLedger(limit=D(10))
    lease = LocalLease()
    lease.add_grant(ledger.grant("a", "1", want=D(2), need=D(0), now=0).amount)
    saved = ledger.to_wire()
    lease.add_grant(ledger.grant("a", "1", want=D(3), need=D(0), now=1).amount)  # lost below
    restarted = BudgetLedger.from_wire(msgpack.unpackb(msgpack.packb(saved)), now=2)
    assert restarted.committed() == D(2)
    restarted.grant("a", "1", want=D(1), need=D(0), held=lease.held, now=3)
    assert restarted.committed() == D(6)


def test_wire_round_trip_is_msgpack_friendly() -> None:
    ledger = BudgetLedger(limit=D("12.5"), soft=D("0.9"), planned_steps=7, silence_timeout_s=9)
    ledger.grant("a", "1", want=D("0.3"), need=D(0), now=0)
    ledger.on_batch("a", "1", cost=D("0.7"), admitted=D("0.1"), now=1)
    ledger.grant("b", "2", want=D("0.2"), need=D(0), now=0)
    ledger.declare_gone("b", "2")
    ledger.row(train_close=True)
    raw = msgpack.unpackb(msgpack.packb(ledger.to_wire()))
    back = BudgetLedger.from_wire(raw, now=100)
    assert back.to_wire() == ledger.to_wire()
    assert back.unreconciled() == D("0.2")
    assert back.committed() == ledger.committed()
    with pytest.raises(ConfigError, match="format"):
        BudgetLedger.from_wire({**raw, "format": 9}, now=0)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), True, "x", [1]])
def test_bad_limits_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError):
        check_limit(bad)


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, None])
def test_bad_soft_fractions_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError):
        check_soft(bad)


def test_the_terms_keep_their_old_import_path() -> None:
    """The value types and checks live in core.budget_terms; core.budget re-exports them."""
    from art_ray_metrics.core import budget, budget_terms

    for name in ("Grant", "LeaseAccount", "check_limit", "check_soft"):
        assert name in budget.__all__
        assert getattr(budget, name) is getattr(budget_terms, name)


def test_bad_requests_are_refused() -> None:
    ledger = BudgetLedger(limit=D(1))
    with pytest.raises(ConfigError):
        ledger.grant("a", "1", want=D(1), need=D(2), now=0)
    with pytest.raises(ConfigError):
        ledger.grant("a", "1", want=D(0), need=D(0), now=0)
    with pytest.raises(ConfigError):
        BudgetLedger(planned_steps=0)
    with pytest.raises(ConfigError):
        BudgetLedger(silence_timeout_s=0)


def test_local_lease_keeps_every_dollar_in_one_place() -> None:
    lease = LocalLease()
    lease.add_grant(D(1))
    assert lease.try_reserve(D("0.4"))
    assert lease.try_reserve(D("0.4"))
    assert not lease.try_reserve(D("0.4"))
    lease.settle(D("0.4"), D("0.1"))
    lease.settle(D("0.4"), None)  # paid, unpriced: kept as spent, never shipped
    assert (lease.balance, lease.open, lease.admitted, lease.unpriced) == (
        D("0.5"),
        0,
        D("0.1"),
        D("0.4"),
    )
    assert lease.give_back() == 0  # admitted cost not shipped yet
    assert lease.take_admitted() == D("0.1")
    assert lease.admitted == 0
    assert lease.give_back() == D("0.5")
    assert lease.held == D("0.4")


# --------------------------------------------------------------------------- the protocol

CENTS = st.integers(min_value=1, max_value=80).map(lambda c: D(c) / 100)


class _Producer:
    def __init__(self, name: str, generation: int) -> None:
        self.name = name
        self.incarnation = f"{name}-{generation}"
        self.lease = LocalLease()
        self.open: list[Decimal] = []  # estimates of calls in flight (each may be paid)
        self.unshipped = D(0)  # priced real cost settled, not in a batch yet
        self.unpriced = D(0)  # estimates of paid calls that could not be priced
        self.extra = D(0)  # cost recorded without admission, not in a batch yet


class BudgetProtocol(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = BudgetLedger(limit=D(5), silence_timeout_s=10)
        self.max_limit = D(5)
        self.now = 0.0
        self.generation = 0
        self.producers = {n: self._new(n) for n in ("a", "b", "c")}
        self.checkpoint = self.ledger.to_wire()
        self.log: list[tuple[str, ...]] = []  # what the write-ahead log holds since it
        self.paid_admitted = D(0)  # real cost of admitted calls settled (priced) so far
        self.shipped_extra = D(0)  # cost recorded without admission, applied
        self.dead: list[_Producer] = []
        self.lowered = False
        self.unadmitted = False

    @initialize(unadmitted=st.booleans())
    def mode(self, unadmitted: bool) -> None:
        """Half the runs also record costs without admission (GPU time, manual costs)."""
        self.unadmitted = unadmitted

    def _new(self, name: str) -> _Producer:
        self.generation += 1
        return _Producer(name, self.generation)

    # -- calls ------------------------------------------------------------------------------

    @rule(name=st.sampled_from("abc"), estimate=CENTS)
    def call(self, name: str, estimate: Decimal) -> None:
        p = self.producers[name]
        if not p.lease.try_reserve(estimate):
            need = max(estimate - p.lease.balance, D(0))
            grant = self.ledger.grant(
                name,
                p.incarnation,
                want=max(need, estimate * 3),
                need=need,
                held=p.lease.held,
                now=self.now,
            )
            self.log.append(("grant", name, p.incarnation, grant.amount))
            if grant.amount and not self.lowered:
                assert self.ledger.committed() <= self.ledger.limit  # type: ignore[operator]
            p.lease.add_grant(grant.amount)
            if not p.lease.try_reserve(estimate):
                assert grant.exhausted
                return
        p.open.append(estimate)

    @precondition(lambda self: any(p.open for p in self.producers.values()))
    @rule(data=st.data(), share=st.sampled_from([D(0), D("0.5"), D(1), None]))
    def settle(self, data: st.DataObject, share: Decimal | None) -> None:
        p = data.draw(st.sampled_from([p for p in self.producers.values() if p.open]))
        estimate = p.open.pop(data.draw(st.integers(0, len(p.open) - 1)))
        if share is None:
            p.lease.settle(estimate, None)
            p.unpriced += estimate
            return
        real = estimate * share
        p.lease.settle(estimate, real)
        p.unshipped += real
        self.paid_admitted += real

    @rule(name=st.sampled_from("abc"), estimate=CENTS, share=st.sampled_from([D("0.5"), D(1)]))
    def whole_call(self, name: str, estimate: Decimal, share: Decimal) -> None:
        """The common path in one step: admitted, paid, settled, shipped."""
        p = self.producers[name]
        self.call(name, estimate)
        if p.open and p.open[-1] == estimate:
            p.open.pop()
            p.lease.settle(estimate, estimate * share)
            p.unshipped += estimate * share
            self.paid_admitted += estimate * share
        self.ship(name)

    @precondition(lambda self: self.unadmitted)
    @rule(name=st.sampled_from("abc"), cost=CENTS)
    def record_without_admission(self, name: str, cost: Decimal) -> None:
        self.producers[name].extra += cost

    @rule(name=st.sampled_from("abc"))
    def ship(self, name: str) -> None:
        p = self.producers[name]
        admitted = p.lease.take_admitted()
        assert admitted == p.unshipped
        cost = admitted + p.extra
        self.ledger.on_batch(name, p.incarnation, cost=cost, admitted=admitted, now=self.now)
        self.log.append(("batch", name, p.incarnation, cost, admitted))
        self.shipped_extra += p.extra
        p.unshipped = p.extra = D(0)

    @rule(name=st.sampled_from("abc"))
    def idle_return(self, name: str) -> None:
        p = self.producers[name]
        amount = p.lease.give_back()
        if amount:
            returned, seq = self.ledger.give_back(name, p.incarnation, amount, now=self.now)
            assert returned == amount
            assert seq == self.ledger.grant_seq
            self.log.append(("return", name, p.incarnation, returned, seq))

    # -- failures and time -------------------------------------------------------------------

    @precondition(lambda self: len(self.dead) < 6)
    @rule(data=st.data(), by_sweep=st.booleans(), mid_call=st.booleans())
    def die(self, data: st.DataObject, by_sweep: bool, mid_call: bool) -> None:
        busy = [n for n, p in self.producers.items() if self._may_have_paid(p)]
        name = data.draw(st.sampled_from(busy if mid_call and busy else "abc"))
        p = self.producers[name]
        self.dead.append(p)
        self.producers[name] = self._new(name)
        if by_sweep:
            self.now += 11
            for other in self.producers.values():  # the living keep talking
                self.ledger.on_batch(
                    other.name, other.incarnation, cost=D(0), admitted=D(0), now=self.now
                )
            self.ledger.sweep(self.now)
        else:
            self.ledger.declare_gone(name, p.incarnation)

    @rule()
    def take_checkpoint(self) -> None:
        self.checkpoint = msgpack.unpackb(msgpack.packb(self.ledger.to_wire()))
        self.log = []

    @rule()
    def restart_aggregator(self) -> None:
        """A restart restores the checkpoint and replays the log: batches, and the grants and
        returns the aggregator logs before it answers."""
        ledger = BudgetLedger.from_wire(self.checkpoint, now=self.now)
        ledger.set_limit(self.ledger.limit)  # the configuration's, not the checkpoint's
        for kind, name, incarnation, *amounts in self.log:
            if kind == "batch":
                cost, admitted = amounts
                ledger.on_batch(name, incarnation, cost=cost, admitted=admitted, now=self.now)
            elif kind == "grant":
                ledger.replay_grant(name, incarnation, amounts[0], now=self.now)
            else:  # logged as a numbered grant of the negative amount
                returned, seq = amounts
                assert ledger.replay_grant(name, incarnation, -returned, self.now, seq)
        ledger.soft_crossed = self.ledger.soft_crossed
        assert ledger.outstanding() >= 0
        for p in [*self.producers.values(), *self.dead]:
            key = (p.name, p.incarnation)
            before, after = self.ledger.accounts.get(key), ledger.accounts.get(key)
            assert (before.outstanding if before else 0) == (after.outstanding if after else 0)
        assert ledger.spent == self.ledger.spent
        self.ledger = ledger
        for p in self.dead:  # it learns again who is gone
            ledger.declare_gone(p.name, p.incarnation)

    @rule(delta=st.integers(-2, 3))
    def change_limit(self, delta: int) -> None:
        limit = max(self.ledger.limit + delta, D(0))  # type: ignore[operator]
        if limit < self.max_limit:
            self.lowered = True
        self.max_limit = max(self.max_limit, limit)
        self.ledger.set_limit(limit)

    # -- what must hold -------------------------------------------------------------------

    def _may_have_paid(self, p: _Producer) -> Decimal:
        return sum(p.open, D(0)) + p.unshipped + p.unpriced

    @invariant()
    def committed_covers_everything_that_may_have_been_paid(self) -> None:
        unshipped = sum(
            (self._may_have_paid(p) for p in [*self.producers.values(), *self.dead]), D(0)
        )
        assert self.ledger.committed() >= self.ledger.spent + unshipped

    @invariant()
    def the_producer_holds_what_the_ledger_says_is_outstanding(self) -> None:
        for p in self.producers.values():
            account = self.ledger.accounts.get((p.name, p.incarnation))
            outstanding = D(0) if account is None else account.outstanding
            assert outstanding == p.lease.held

    @invariant()
    def admitted_calls_never_pass_the_limit(self) -> None:
        if self.lowered or self.shipped_extra or any(p.extra for p in self.producers.values()):
            return
        admitted = self.paid_admitted + sum(
            (sum(p.open, D(0)) + p.unpriced for p in [*self.producers.values(), *self.dead]),
            D(0),
        )
        assert admitted <= self.max_limit

    @invariant()
    def the_bound_covers_dead_producers_within_their_unused_lease(self) -> None:
        for p in self.dead:
            account = self.ledger.accounts.get((p.name, p.incarnation))
            bound = D(0) if account is None else account.outstanding
            lost = self._may_have_paid(p)
            assert lost <= bound <= lost + max(p.lease.balance, D(0))
            assert account is None or account.gone or bound == 0
        assert self.ledger.unreconciled() == sum(
            (self._may_have_paid(p) + p.lease.balance for p in self.dead), D(0)
        )


TestBudgetProtocol = BudgetProtocol.TestCase
TestBudgetProtocol.settings = settings(
    max_examples=examples(150), stateful_step_count=40, deadline=None
)


def test_numbered_grants_replay_once() -> None:
    """A grant the checkpoint already counts is skipped; a newer one applies (and numbers
    the next grant after it)."""
    ledger = BudgetLedger(limit=Decimal(10))
    first = ledger.grant("w", "i", want=Decimal(2), need=Decimal(1), now=0.0)
    assert first.seq == 1
    restored = BudgetLedger.from_wire(ledger.to_wire(), now=0.0)
    assert not restored.replay_grant("w", "i", Decimal(2), 0.0, seq=1)  # in the checkpoint
    assert restored.replay_grant("w", "i", Decimal(3), 0.0, seq=2)  # logged after it
    assert restored.committed() == Decimal(5)
    assert restored.grant("v", "j", want=Decimal(1), need=Decimal(1), now=0.0).seq == 3
    refused = restored.grant("v", "j", want=Decimal(9), need=Decimal(9), now=0.0)
    assert refused.seq == 0  # nothing granted: nothing to log


def test_the_write_ahead_log_replays_grants_after_the_checkpoint() -> None:
    from art_ray_metrics.core.state import AggregatorState
    from art_ray_metrics.durable.reader import LoadedCheckpoint
    from art_ray_metrics.durable.restore import encode_wal_record, rebuild_state

    state = AggregatorState()
    state.budget.set_limit(Decimal(10))
    state.budget.grant("w", "i", want=Decimal(2), need=Decimal(1), now=0.0)
    blob, shards, _ = state.checkpoint_parts()
    wal = [encode_wal_record([], [("w", "i", "2", 1), ("x", "k", "4", 2), ("x", "k", "-3", 3)])]
    loaded = LoadedCheckpoint(blob, shards, epoch=1, seq=1, wal=wal, manifest="m")
    rebuilt, _ = rebuild_state(loaded)
    assert rebuilt.budget.committed() == Decimal(3)  # 2 in the checkpoint, 4 granted, 3 back
    assert rebuilt.budget.grant_seq == 3
