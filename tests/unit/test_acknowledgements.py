"""An acknowledgement is a promise; windows are safe to drop and always compact.

Real :class:`MetricsClient` s against a real :class:`AggregatorState` through an in-process
stand-in for the actor (no Ray): every applied batch counts as durable at once, and the
stand-in can be switched off (calls fail, as when no aggregator is reachable).
Invariant checked throughout: a builder's ``flush()`` says ok only if its own leaves are in
a row; whatever is refused or dropped turns every affected rollout's flush ok=False with the
reason and is counted on the row of its step.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core.records import LeafBatch, StepGroup
from art_ray_metrics.core.state import AggregatorState, Limits
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.distributed.client import MetricsClient
from art_ray_metrics.distributed.record import WorkerBuilder
from art_ray_metrics.errors import WireFormatError
from tests.hypothesis_profiles import examples


class _Ref:
    """A finished call: its outcome (an ack or the exception the actor raised)."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome


class _Call:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> _Ref:
        return _Ref(self.fn(*args))


class _InProcessActor:
    """The actor's ingest/confirm contract over a real state; applied means durable. It answers
    with plain maps, as aggregators before typed replies did: the client reads both."""

    def __init__(self, state: AggregatorState) -> None:
        self.state = state
        self.online = True
        self.ingest = _Call(self._ingest)
        self.confirm = _Call(self._confirm)

    def _ingest(self, data: bytes, durable: bool = False) -> Any:
        if not self.online:
            raise ConnectionError("no aggregator reachable")
        try:
            result = self.state.ingest_bytes(data)
        except WireFormatError as exc:
            return exc
        entry = self.state.producers.get((result.producer_id, result.incarnation))
        window = entry.applied if entry is not None else None
        return {
            "seq": result.seq,
            "duplicate": result.duplicate,
            "durable": True,
            "durable_upto": window.watermark if window is not None else 0,
            "refused": [list(r) for r in getattr(result, "refused", ())],
        }

    def _confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
        if not self.online:
            raise ConnectionError("no aggregator reachable")
        return self.state.confirm(producer_id, incarnation, acked_upto)


class _Direct:
    """A transport straight to an :class:`_InProcessActor`: every call has finished when
    ``send`` returns (its outcome an ack or the exception the actor raised)."""

    lookup_error: str | None = None

    def __init__(self, actor: _InProcessActor) -> None:
        self.actor = actor

    def ready(self) -> bool:
        return True

    def gone(self) -> bool:
        return False

    def resolve(self) -> bool:
        return True

    def send(self, data: bytes, durable: bool) -> _Ref:
        return self.actor.ingest.remote(data, durable)

    def confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
        self.actor.confirm.remote(producer_id, incarnation, acked_upto)
        return True

    def wait(self, calls: list[Any], num_returns: int, timeout_s: float) -> list[Any]:
        return list(calls)

    def outcome(self, call: _Ref) -> Any:
        return call.outcome

    def failed(self, exc: BaseException) -> None:
        pass

    def after_fork(self) -> _Direct:
        return self


def _reachable(actor: _InProcessActor, *clients: MetricsClient) -> None:
    """The aggregator is back; the clients' resend back-off has run out."""
    actor.online = True
    for c in clients:
        c._resend_after = 0.0


def _client(actor: _InProcessActor, **config: Any) -> MetricsClient:
    fields: dict[str, Any] = {
        "flush_interval_s": 1e6,
        "max_batch_leaves": 10**9,
        "max_in_flight": 10**6,
        "flush_timeout_s": 0.5,
        **config,
    }
    c = MetricsClient(ClientConfig(**fields), transport=_Direct(actor))
    c.stopped.set()  # no background thread: the test drives every ship
    c._thread.join()
    return c


@pytest.fixture
def clients() -> Iterator[list[MetricsClient]]:
    made: list[MetricsClient] = []
    yield made
    for c in made:
        c.stopped.set()


def _costs(row: dict[str, float], key: str = "costs/all") -> Decimal:
    return Decimal(str(row.get(key, 0.0)))


class TestOneRolloutNeverSinksAnother:
    """Defect 2: two rollouts of one process share a batch; one breaks a limit."""

    def test_over_limit_keys_refuse_only_their_rollout(self, clients: list[MetricsClient]) -> None:
        state = AggregatorState(Limits(max_keys_per_step=100))
        actor = _InProcessActor(state)
        c = _client(actor)
        clients.append(c)
        a = WorkerBuilder(c, 0, "train", "train")
        b = WorkerBuilder(c, 0, "train", "train")
        a.add_cost("train/a", 1.0)
        for i in range(101):
            b.add_metric(f"reward/k{i}", 1.0)
        ra, rb = a.flush(), b.flush()
        assert not rb.ok
        assert rb.error is not None
        assert "max_keys_per_step" in rb.error
        assert ra.ok, ra
        report = state.close_step(0)
        assert _costs(report.row) == Decimal("1")  # A's dollar is in the row
        assert report.lost_leaves == 2  # B's two keys over the bound, on their step's row
        assert state.counters["limit_rejections"] == 1

    def test_a_rollout_whose_key_is_refused_is_told(self, clients: list[MetricsClient]) -> None:
        """B fills the step first: A's new key is the one over the bound, so A is refused."""
        state = AggregatorState(Limits(max_keys_per_step=100))
        c = _client(_InProcessActor(state))
        clients.append(c)
        a = WorkerBuilder(c, 0, "train", "train")
        b = WorkerBuilder(c, 0, "train", "train")
        for i in range(100):
            b.add_metric(f"reward/k{i}", 1.0)
        a.add_cost("train/a", 1.0)
        ra, rb = a.flush(), b.flush()
        assert rb.ok
        assert not ra.ok
        assert ra.error is not None
        assert "costs/train/a" in ra.error
        report = state.close_step(0)
        assert "costs/all" not in report.row
        assert report.lost_leaves == 1

    def test_cross_producer_sum_overflow_refuses_only_the_key(
        self, clients: list[MetricsClient]
    ) -> None:
        state = AggregatorState()
        actor = _InProcessActor(state)
        first, second = _client(actor), _client(actor)
        clients += [first, second]
        WorkerBuilder(first, 0, "train", "train").add_metric("time/step_x_s", 6e299)
        assert first.flush().ok
        a = WorkerBuilder(second, 0, "train", "train")
        b = WorkerBuilder(second, 0, "train", "train")
        a.add_cost("train/a", 1.0)
        b.add_metric("time/step_x_s", 6e299)
        ra, rb = a.flush(), b.flush()
        assert ra.ok, ra
        assert not rb.ok
        assert rb.error is not None
        assert "time/step_x_s" in rb.error
        report = state.close_step(0)
        assert _costs(report.row) == Decimal("1")
        assert report.row["time/step_x_s"] == 6e299


class TestDroppedAtTheCap:
    """Defect 5: a batch dropped at max_retained_batches."""

    def test_dropped_batch_fails_its_rollout_and_is_counted(
        self, clients: list[MetricsClient]
    ) -> None:
        state = AggregatorState()
        actor = _InProcessActor(state)
        actor.online = False
        c = _client(actor, max_retained_batches=2)
        clients.append(c)
        builders = []
        for usd in (1.0, 2.0, 4.0):
            w = WorkerBuilder(c, 0, "train", "train")
            w.add_cost("train/x", usd)
            c.ship()
            builders.append(w)
        _reachable(actor, c)
        a, b, d = (w.flush() for w in builders)
        assert b.ok, b
        assert d.ok, d
        assert not a.ok
        assert a.error is not None
        assert "dropped" in a.error
        assert state.counters["dropped_batches"] == 1
        report = state.close_step(0)
        assert _costs(report.row) == Decimal("6")
        assert report.lost_leaves == 1  # the dropped batch's leaf, on its step's row
        assert not builders[0].flush().ok  # asking again does not turn it into a promise


class TestWindowsAreSafeToDrop:
    """Defect 6: a copy of an old batch after confirm dropped the window."""

    def test_a_copy_after_confirm_is_a_duplicate(self) -> None:
        state = AggregatorState()
        group = StepGroup(0, "train", {"costs/train/x": Decimal("3")})
        data = encode_batch(LeafBatch("p", 1, (group,), "inc", 0))
        state.ingest_bytes(data)
        assert state.confirm("p", "inc", 1)
        result = state.ingest_bytes(data)  # the stale resend arrives late
        assert result.duplicate
        assert state.counters["duplicate_batches"] == 1
        assert _costs(state.close_step(0).row) == Decimal("3")

    def test_the_client_stale_resend_after_confirm(self, clients: list[MetricsClient]) -> None:
        state = AggregatorState()
        actor = _InProcessActor(state)
        c = _client(actor)
        clients.append(c)
        w = WorkerBuilder(c, 0, "train", "train")
        w.add_cost("train/x", 3.0)
        c.ship()
        stale = list(c._retained.items())  # a resend snapshotted before the flush completes
        assert w.flush().ok
        c._confirm()
        assert (c.producer_id, c.incarnation) not in state.producers
        for seq, data in stale:  # the client knows it settled them: no copy leaves
            assert c._send(seq, data, durable=False) is None
        for _, data in stale:  # and were one delivered, the retired window refuses it
            assert actor.ingest.remote(data).outcome["duplicate"]
        assert _costs(state.close_step(0).row) == Decimal("3")
        assert state.counters["duplicate_batches"] == 1


class TestWindowsCompact:
    """Defect 11: after client-side drops the window must compact and confirm succeed."""

    def test_declared_drops_advance_the_window(self, clients: list[MetricsClient]) -> None:
        state = AggregatorState()
        actor = _InProcessActor(state)
        actor.online = False
        c = _client(actor, max_retained_batches=2)
        clients.append(c)
        w = WorkerBuilder(c, 0, "train", "train")
        for _ in range(6):
            w.add_metric("reward/x", 1.0)
            c.ship()
        _reachable(actor, c)
        assert c.flush().ok is False  # four batches were dropped: reported
        for _ in range(200):
            w.add_metric("reward/x", 1.0)
            c.ship()
            c.reap()
        assert c.flush().ok
        window = state.producers[(c.producer_id, c.incarnation)].applied
        assert window.above is None
        assert window.watermark == c._seq
        small = len(state.snapshot())
        c._confirm()
        assert (c.producer_id, c.incarnation) not in state.producers
        assert len(state.snapshot()) <= small
        assert state.counters["dropped_batches"] == 4

    def test_old_wal_batches_replay_as_before(self) -> None:
        """A version-2 batch's acked_upto never advanced a live window: nor does its replay."""
        import msgpack

        state = AggregatorState()
        group = [0, "train", {"reward/x": "1"}, [], b""]

        def v2(seq: int, acked: int) -> bytes:
            out: bytes = msgpack.packb(
                ["arm-batch", 2, "p", seq, [group], "inc", acked, 0], use_bin_type=True
            )
            return out

        state.ingest_bytes(v2(1, 0))
        state.ingest_bytes(v2(3, 2))  # seq 2 was given up by the client
        window = state.producers[("p", "inc")].applied
        assert window.watermark == 1
        assert window.above == {3}
        assert state.counters["dropped_batches"] == 0


class _Protocol(RuleBasedStateMachine):
    """One real client, one real state, an aggregator that comes and goes, a small cap,
    stale copies of old batches and confirms. Each rollout records its own key, so after
    every step: a rollout whose flush said ok has exactly its cents in the state; no rollout
    has more than it recorded (nothing applied twice); windows stay compact."""

    def __init__(self) -> None:
        super().__init__()
        self.state = AggregatorState()
        self.actor = _InProcessActor(self.state)
        self.client = _client(self.actor, max_retained_batches=2)
        self.copies: list[tuple[int, bytes]] = []
        self.cents: list[int] = []
        self.builders: list[WorkerBuilder] = []
        self.promised: set[int] = set()

    def teardown(self) -> None:
        self.client.stopped.set()

    @rule(cents=st.integers(1, 500))
    def record(self, cents: int) -> None:
        w = WorkerBuilder(self.client, 0, "train", "train")
        w.add_metric(f"costs/train/r{len(self.builders)}", cents / 100)
        self.builders.append(w)
        self.cents.append(cents)

    @rule()
    def ship(self) -> None:
        self.client.ship()
        self.copies.extend(self.client._retained.items())

    @rule(cents=st.integers(1, 500))
    def record_and_ship(self, cents: int) -> None:
        self.record(cents)
        self.ship()

    @rule()
    def reap(self) -> None:
        self.client.reap()

    @rule(online=st.booleans())
    def toggle(self, online: bool) -> None:
        if online:
            _reachable(self.actor, self.client)
        else:
            self.actor.online = False

    @precondition(lambda self: self.builders)
    @rule(i=st.integers(0, 10**6))
    def flush(self, i: int) -> None:
        idx = i % len(self.builders)
        w = self.builders[idx]
        if self.client.rollout_range(w._ctx)[1] > self.client._seq and not self.actor.online:
            return  # nothing shipped yet and nothing reachable: the flush would just wait
        # offline, a flush can only time out (ok=False): do not wait for it
        if w.flush(timeout_s=0.5 if self.actor.online else 0.001).ok:
            self.promised.add(idx)

    @rule()
    def confirm(self) -> None:
        if self.actor.online:
            self.client._confirm()

    @precondition(lambda self: self.copies)
    @rule(i=st.integers(0, 10**6))
    def stale_copy(self, i: int) -> None:
        if self.actor.online:
            seq, data = self.copies[i % len(self.copies)]
            self.client._send(seq, data, durable=False)  # what a resend snapshot would send
            self.actor.ingest.remote(data)  # a copy delivered anyway (defence in depth)

    @invariant()
    def promises_hold(self) -> None:
        buf = self.state.pending.get((0, "train"))
        sums = buf.sums if buf is not None else {}
        for idx, cents in enumerate(self.cents):
            applied = sums.get(f"costs/train/r{idx}", Decimal(0))
            assert applied <= Decimal(cents) / 100, f"rollout {idx} applied twice"
            if idx in self.promised:
                assert applied == Decimal(cents) / 100, f"rollout {idx}: ok but not applied"

    @invariant()
    def window_bounded(self) -> None:
        for entry in self.state.producers.values():
            window = entry.applied
            assert window.above is None or len(window.above) <= 4


_Protocol.TestCase.settings = settings(
    max_examples=examples(100), stateful_step_count=30, deadline=None
)
TestProtocolStateful = _Protocol.TestCase


class TestTheActorShell:
    """The actor class without Ray, on in-memory storage: its answers and durable windows."""

    @staticmethod
    def _actor(storage: str, **fields: Any) -> Any:
        from art_ray_metrics import AggregatorConfig
        from art_ray_metrics.distributed.actor import MetricsAggregator

        cfg = AggregatorConfig(storage_uri=storage, wandb_mode="disabled", **fields)
        return MetricsAggregator(cfg.model_dump_json())

    def test_refusals_given_up_batches_and_retired_windows(self) -> None:
        import asyncio
        import uuid

        storage = f"memory://{uuid.uuid4().hex}"
        agg = self._actor(storage, max_keys_per_step=2)

        def batch(seq: int, acked: int, leaves: dict[str, str], lost: Any = ()) -> bytes:
            group = StepGroup(0, "train", {k: Decimal(v) for k, v in leaves.items()})
            return encode_batch(LeafBatch("p", seq, (group,), "inc", acked, 0, tuple(lost)))

        async def run() -> tuple[dict[str, Any], ...]:
            # seqs 1-3 were given up by the producer; seq 4 declares them, seq 5 follows
            lost = [(1, 0, "train", 2), (2, 0, "train", 1), (3, 0, "train", 1)]
            first = await agg.ingest(batch(4, 3, {"reward/a": "1", "reward/b": "1"}, lost), True)
            over = await agg.ingest(batch(5, 4, {"reward/a": "1", "reward/c": "1"}), True)
            again = await agg.ingest(batch(5, 4, {"reward/a": "1", "reward/c": "1"}), True)
            assert await agg.confirm("p", "inc", 5)
            copy = await agg.ingest(batch(4, 3, {"reward/a": "1", "reward/b": "1"}, lost), True)
            row = await agg.log(0)
            return first, over, again, copy, row

        first, over, again, copy, row = asyncio.run(run())
        assert first.durable
        assert first.durable_upto == 4  # the declared give-ups count as settled
        assert over.durable
        assert [r[2] for r in over.refused] == ["reward/c"]
        assert "max_keys_per_step=2" in over.refused[0][3]
        assert again.duplicate
        assert again.refused == over.refused  # a resend is told again
        assert copy.duplicate
        assert copy.durable
        assert row["reward/a"] == 2.0
        assert "reward/c" not in row
        assert row["telemetry/dropped_batches"] == 3
        assert row["telemetry/lost_leaves_in_row"] == 5  # 4 given up + 1 refused
        assert row["telemetry/producers"] == 0  # the window was confirmed away


def test_a_refusal_decided_again_after_a_restart_is_charged() -> None:
    """A batch whose first answer refused one key is lost with the actor (not yet written
    to the write-ahead log); the restarted actor decides its resend again, with a step that
    filled up meanwhile, and refuses another key. That rollout's flush must not say ok (it
    did: the client charged refusals once per batch). Found by the e2e model suite."""
    from art_ray_metrics.distributed.actor import MetricsAggregator
    from art_ray_metrics.testing import InProcessAggregator
    from tests.faults import FaultyStore, install

    class Flaky(InProcessAggregator):
        store: FaultyStore

        def _new_agg(self) -> MetricsAggregator:
            agg = super()._new_agg()
            self.store = install(agg)
            return agg

    with Flaky(max_keys_per_step=1, checkpoint_interval_s=3600, install=False) as agg:
        config = ClientConfig(name=agg.name, flush_interval_s=1e6)
        p0, p1 = agg.client("p0", config), agg.client("p1", config)
        try:
            a = WorkerBuilder(p0, 0, "train", "train")
            b = WorkerBuilder(p0, 0, "train", "train")
            a.add_cost("train/a", 1.0)
            b.add_cost("train/b", 2.0)
            agg.store.down = True  # the write-ahead log cannot take it
            p0.ship()  # not durable: applied, then lost with the actor
            p0.reap(timeout_s=5, block=True)
            assert "refused" in (b.flush(timeout_s=0.1).error or "")  # the step holds a
            agg.crash()  # the restart opens the storage (up again) and never saw the batch
            c = WorkerBuilder(p1, 0, "train", "train")
            c.add_cost("train/c", 4.0)
            assert c.flush(timeout_s=10).ok  # c now holds the step's one key
            result = a.flush(timeout_s=10)  # the resend is decided again: a is refused now
            row = agg.log(0)
            assert ("costs/train/a" in row) == result.ok, (result, row)
        finally:
            p0.close(timeout_s=1)
            p1.close(timeout_s=1)
