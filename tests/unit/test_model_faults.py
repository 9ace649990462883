"""A model-based fault suite: random runs of the aggregator against a plain reference model.

A hypothesis state machine drives the aggregator (``MetricsAggregator`` without Ray: the pure
``AggregatorState``, the ``CheckpointManager`` and the history over a fault-injecting in-memory
store) through random sequences of batches (reordered, duplicated, malformed), barriers,
rewinds, checkpoints, storage outages (whole, or starting in the middle of a commit), and
crashes at any point followed by a restore through ``durable.restore.rebuild_state``. After
every step the aggregator must agree with the reference model: the run's cost total to the
cent (exactly, as Decimal), the unique scenario ids and paid response ids exactly, the pending
spend exactly, and each step's row once in the history.

The reference model is a few lists and sets: leaves of a step wait until the step closes,
leaves for a closed step go into the next close, a rewind drops the closes after its target,
and a crash goes back to the last commit plus what the write-ahead log made durable; producers
resend what the aggregator never called durable, as the real client does.

``ARM_MODEL_EXAMPLES`` sets the number of runs (default 40 under the ``ci`` hypothesis profile,
10 under ``dev``: see ``tests/hypothesis_profiles.py``; a few seconds each); ``ARM_MODEL_STEPS``
the rules per run (default 40). The long run is in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import copy
import os
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from art_ray_metrics import AggregatorConfig
from art_ray_metrics.core.dedupe import DigestLedger, digest
from art_ray_metrics.core.rollup import ZERO, to_decimal
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.distributed.actor import MetricsAggregator
from art_ray_metrics.durable.checkpoint import CheckpointManager
from art_ray_metrics.durable.restore import rebuild_state
from art_ray_metrics.durable.storage import InMemoryStore
from art_ray_metrics.errors import BackPressureError, StorageError, WireFormatError
from art_ray_metrics.testing import make_batch
from tests.faults import FaultyStore
from tests.hypothesis_profiles import examples

EXAMPLES = int(os.environ.get("ARM_MODEL_EXAMPLES") or examples(40))
STEPS = int(os.environ.get("ARM_MODEL_STEPS", "40"))
JUDGE = Decimal("0.5")
PRODUCERS = ("p0", "p1")


@dataclass(frozen=True)
class Leaves:
    """What one batch carries (all for one step of the train split)."""

    step: int
    cost: Decimal
    ids: frozenset[str]
    rid: str | None


@dataclass(frozen=True)
class Part:
    """One applied batch as the reference sees it: its cost (judge charge included when the
    response id was not paid yet), its ids and the response id it paid."""

    cost: Decimal
    ids: frozenset[str]
    rids: frozenset[str]


@dataclass
class Closed:
    step: int
    parts: list[Part]
    ids_added: frozenset[str]
    cum_after: Decimal


@dataclass
class Reference:
    """The plain model of one run."""

    applied: set[tuple[str, int]] = field(default_factory=set)
    pending: dict[int, list[Part]] = field(default_factory=dict)
    late: list[tuple[int, Part]] = field(default_factory=list)  # (step recorded for, part)
    closed: list[Closed] = field(default_factory=list)

    @property
    def last_closed(self) -> int | None:
        return self.closed[-1].step if self.closed else None

    @property
    def cum(self) -> Decimal:
        return self.closed[-1].cum_after if self.closed else ZERO

    def unique(self) -> set[str]:
        return {i for c in self.closed for i in c.ids_added}

    def paid(self) -> set[str]:
        return {r for c in self.closed for p in c.parts for r in p.rids}

    def pending_parts(self) -> list[Part]:
        return [p for parts in self.pending.values() for p in parts] + [p for _, p in self.late]

    def apply(self, key: tuple[str, int], leaves: Leaves) -> None:
        self.applied.add(key)
        cost, rids = leaves.cost, frozenset[str]()
        taken = self.paid() | {r for p in self.pending_parts() for r in p.rids}
        if leaves.rid is not None and leaves.rid not in taken:
            cost, rids = cost + JUDGE, frozenset({leaves.rid})
        part = Part(cost, leaves.ids, rids)
        last = self.last_closed
        if last is not None and leaves.step <= last:
            self.late.append((leaves.step, part))
        else:
            self.pending.setdefault(leaves.step, []).append(part)

    def close(self, step: int) -> Closed:
        parts = [p for s in sorted(self.pending) if s <= step for p in self.pending.pop(s)]
        parts += [p for _, p in self.late]
        self.late = []
        ids = frozenset(i for p in parts for i in p.ids)
        row = Closed(
            step, parts, ids - self.unique(), self.cum + sum((p.cost for p in parts), ZERO)
        )
        self.closed.append(row)
        return row

    def rewind(self, step: int, *, keep_late: bool = False) -> None:
        self.closed = [c for c in self.closed if c.step <= step]
        self.pending = {s: p for s, p in self.pending.items() if s <= step}
        if not keep_late:  # an explicit rewind keeps the late leaves of the steps it keeps
            self.late = [(s, p) for s, p in self.late if s <= step]


def _ledger(values: set[str]) -> bytes:
    return DigestLedger.from_bytes(b"".join(digest(v) for v in values)).to_bytes()


class AggregatorUnderFaults(RuleBasedStateMachine):
    """One run: a trainer, two producers, flaky storage and crashes."""

    @initialize()
    def start(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.name = f"model-{uuid.uuid4().hex}"
        self.config = AggregatorConfig(
            storage_uri=f"memory://{self.name}",
            wandb_mode="disabled",
            checkpoint_interval_s=3600,
            wal_interval_s=3600,
            checkpoint_retention=2,
            checkpoint_prune_every=1,
            max_wal_queue_bytes=1500,
        ).model_dump_json()
        self.store = FaultyStore(InMemoryStore.named(self.name))
        self.agg: MetricsAggregator | None = None
        self.ref = Reference()
        self.committed = Reference()
        self.since_commit: list[tuple[str, int]] = []
        self.sent: dict[tuple[str, int], tuple[bytes, Leaves]] = {}
        self.unsent: list[tuple[str, int]] = []
        self.seq = dict.fromkeys(PRODUCERS, 0)
        self.trainer_step = -1
        self.last_log: tuple[int, dict[str, float]] | None = None
        self._boot()

    def teardown(self) -> None:
        if getattr(self, "agg", None) is not None:
            self._crash()
        if hasattr(self, "loop"):
            self.loop.close()
            InMemoryStore.forget(self.name)

    # -- plumbing -------------------------------------------------------------------------

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _boot(self) -> None:
        agg = MetricsAggregator(self.config)  # restores through durable.restore.rebuild_state
        agg.store = agg.ckpt._store = agg.history._store = self.store  # type: ignore[assignment]
        agg.committer.store = self.store
        self.agg = agg

    def _crash(self) -> None:
        assert self.agg is not None
        tasks = self.agg.tasks
        for task in tasks:
            task.cancel()
        if tasks:
            self._run(asyncio.gather(*tasks, return_exceptions=True))
        self.agg = None

    def _after_call(self, checkpoints_before: int) -> None:
        """Follow what became durable: a commit snapshots the reference."""
        assert self.agg is not None
        if self.agg.health.checkpoints > checkpoints_before:
            self.committed = copy.deepcopy(self.ref)
            self.since_commit = []

    def _durable(self, key: tuple[str, int]) -> bool:
        assert self.agg is not None
        return self.agg.state.producers.durable_seen(key[0], key[1])

    def _deliver(self, key: tuple[str, int], *, durable: bool, after_restore: bool = False) -> None:
        assert self.agg is not None
        data, leaves = self.sent[key]
        before = self.agg.health.checkpoints
        try:
            ack = self._run(self.agg.ingest(data, durable))
        except BackPressureError:
            assert self.agg.wal.queue  # only a full queue pushes back
            return
        if key in self.ref.applied:
            assert after_restore or ack.duplicate, f"{key} applied twice"
        else:
            # after a restore a record whose append raised may have been replayed: a duplicate
            assert after_restore or not ack.duplicate, f"{key} was never applied"
            self.ref.apply(key, leaves)
            self.since_commit.append(key)
        self._after_call(before)

    # -- producers ------------------------------------------------------------------------

    @precondition(lambda self: self.agg is not None)
    @rule(
        producer=st.sampled_from(PRODUCERS),
        offset=st.integers(-2, 2),
        cost=st.sampled_from(["0.01", "0.25", "0.07", "1.5"]),
        ids=st.frozensets(st.sampled_from([f"s{i}" for i in range(8)]), max_size=3),
        rid=st.none() | st.sampled_from([f"r{i}" for i in range(5)]),
        now=st.booleans(),
        durable=st.booleans(),
    )
    def record(
        self,
        producer: str,
        offset: int,
        cost: str,
        ids: frozenset[str],
        rid: str | None,
        now: bool,
        durable: bool,
    ) -> None:
        """A producer ships a batch now, or holds it to deliver later (reordering)."""
        step = max(0, self.trainer_step + 1 + offset)
        self.seq[producer] += 1
        key = (producer, self.seq[producer])
        leaves = Leaves(step, Decimal(cost), ids, rid)
        keyed = [("costs/train/judge", float(JUDGE), rid)] if rid else []
        batch = make_batch(
            producer,
            key[1],
            step,
            leaves={"costs/train/llm": float(leaves.cost)},
            scenario_ids=sorted(ids),
            keyed_costs=keyed,
        )
        assert to_decimal(float(leaves.cost)) == leaves.cost
        self.sent[key] = (encode_batch(batch), leaves)
        if now:
            self._deliver(key, durable=durable)
        else:
            self.unsent.append(key)

    @precondition(lambda self: self.agg is not None and bool(self.unsent))
    @rule(pick=st.integers(0, 100), durable=st.booleans())
    def deliver_held(self, pick: int, durable: bool) -> None:
        """A held batch arrives (out of order)."""
        key = self.unsent.pop(pick % len(self.unsent))
        self._deliver(key, durable=durable)

    @precondition(lambda self: self.agg is not None and bool(self.sent))
    @rule(pick=st.integers(0, 1000))
    def resend(self, pick: int) -> None:
        """A batch arrives again (a retry, a resend after a lost answer)."""
        keys = sorted(self.sent)
        key = keys[pick % len(keys)]
        if key in self.unsent:
            self.unsent.remove(key)
        self._deliver(key, durable=False)

    @precondition(lambda self: self.agg is not None)
    @rule(data=st.sampled_from([b"", b"\x93\x01", b"\x95\xa9arm-batch\x02\xa1p\x01\x90"]))
    def malformed(self, data: bytes) -> None:
        """Bytes that are no batch: refused, counted, nothing changes."""
        assert self.agg is not None
        rejected = self.agg.state.counters["rejected_batches"]
        try:
            self._run(self.agg.ingest(data))
        except WireFormatError:
            pass
        except BackPressureError:
            return
        else:
            raise AssertionError("malformed bytes were accepted")
        assert self.agg.state.counters["rejected_batches"] == rejected + 1

    # -- trainer --------------------------------------------------------------------------

    @precondition(lambda self: self.agg is not None and self.trainer_step < 40)
    @rule(skip=st.integers(0, 1))
    def log(self, skip: int) -> None:
        """The step barrier (sometimes skipping a step number)."""
        assert self.agg is not None
        step = self.trainer_step + 1 + skip
        before = self.agg.health.checkpoints
        row = self._run(self.agg.log(step))
        self.trainer_step = step
        expected = self.ref.close(step)
        self._after_call(before)
        row_cost = sum((p.cost for p in expected.parts), ZERO)
        assert row.get("costs/all", 0.0) == float(row_cost)
        if expected.parts:
            assert row["costs/cum/all"] == float(expected.cum_after)
        self.last_log = (step, row)

    @precondition(
        lambda self: (
            self.agg is not None
            and not self.store.down
            and self.store.fail_after is None
            and len(self.ref.closed) >= 2
        )
    )
    @rule(back=st.integers(1, 3))
    def log_older_step(self, back: int) -> None:
        """A barrier for a step already closed (the trainer resumed without calling rewind):
        an implicit rewind to the step before it, then the close."""
        assert self.agg is not None
        steps = [c.step for c in self.ref.closed]
        step = steps[max(0, len(steps) - 1 - back)]
        before = self.agg.health.checkpoints
        row = self._run(self.agg.log(step))
        self.ref.rewind(step - 1, keep_late=True)
        expected = self.ref.close(step)
        self._after_call(before)
        self.trainer_step = step
        assert row.get("costs/all", 0.0) == float(sum((p.cost for p in expected.parts), ZERO))
        self.last_log = (step, row)

    @precondition(lambda self: self.agg is not None and self.last_log is not None)
    @rule()
    def log_again(self) -> None:
        """A retried barrier call returns the same row and closes nothing."""
        assert self.agg is not None
        assert self.last_log is not None
        step, row = self.last_log
        rows = self.agg.state.counters["rows"]
        assert self._run(self.agg.log(step)) == row
        assert self.agg.state.counters["rows"] == rows

    @precondition(lambda self: self.agg is not None and self.trainer_step >= 0)
    @rule(back=st.integers(0, 3))
    def rewind(self, back: int) -> None:
        """The trainer resumes from its checkpoint of an older step."""
        assert self.agg is not None
        target = max(-1, self.trainer_step - back)
        before = self.agg.health.checkpoints
        try:
            self._run(self.agg.rewind(target))
        except StorageError:
            assert self.store.down  # a rewind object could not be read: nothing changed
            return
        self.ref.rewind(target)
        self._after_call(before)
        self.trainer_step = target
        self.last_log = None

    @precondition(lambda self: self.agg is not None)
    @rule()
    def checkpoint(self) -> None:
        """An explicit checkpoint (also what the timer loop does)."""
        assert self.agg is not None
        before = self.agg.health.checkpoints
        self._run(self.agg.checkpoint())
        self._after_call(before)

    # -- faults ---------------------------------------------------------------------------

    @rule()
    def outage(self) -> None:
        self.store.down = True

    @rule(after=st.integers(0, 6))
    def outage_mid_commit(self, after: int) -> None:
        """Storage fails after a few more requests: inside a WAL append or a commit."""
        self.store.fail_after = after

    @rule()
    def storage_back(self) -> None:
        self.store.down = False
        self.store.fail_after = None

    @precondition(lambda self: self.agg is not None)
    @rule()
    def crash(self) -> None:
        """The actor dies: everything not committed or in the write-ahead log is gone."""
        assert self.agg is not None
        durable = [k for k in self.since_commit if self._durable(k)]
        retained = [k for k in self.sent if k not in self.unsent and not self._durable(k)]
        self._crash()
        self.ref = copy.deepcopy(self.committed)
        for key in durable:  # replayed from the write-ahead log
            self.ref.apply(key, self.sent[key][1])
        self.since_commit = list(durable)
        self.retained = retained
        self.last_log = None

    @precondition(lambda self: self.agg is None)
    @rule()
    def restart(self) -> None:
        """Ray restarts the actor once storage answers; producers resend what was not durable."""
        self.store.down = False
        self.store.fail_after = None
        self._boot()
        assert self.agg is not None
        for key in self.retained:
            self._deliver(key, durable=False, after_restore=True)

    # -- the comparison -------------------------------------------------------------------

    @invariant()
    def agrees_with_the_reference(self) -> None:
        agg = self.agg
        if agg is None:
            return
        state, ref = agg.state, self.ref
        assert state.cum.values.get("costs/cum/all", ZERO) == ref.cum
        assert state.cum.scenarios.to_bytes() == _ledger(ref.unique())
        assert state.cum.cost_ids.to_bytes() == _ledger(ref.paid())
        assert state.last_closed.get("train") == ref.last_closed
        waiting = sum(
            (
                v
                for buf in (*state.pending.values(), *state.late.values())
                for k, v in buf.sums.items()
                if k.startswith("costs/")
            ),
            ZERO,
        )
        assert waiting == sum((p.cost for p in ref.pending_parts()), ZERO)
        assert len(state.pending_cost_ids) == len({r for p in ref.pending_parts() for r in p.rids})

    @invariant()
    def a_restore_now_agrees(self) -> None:
        """What a restarted aggregator would load now: the last commit plus the write-ahead
        log, exactly (every durable batch replayed, every rewind netted)."""
        if self.agg is None:
            return
        loaded = CheckpointManager(self.store.inner).load_latest()
        state, _ = rebuild_state(loaded) if loaded is not None else (AggregatorState(), 0)
        expected = copy.deepcopy(self.committed)
        for key in self.since_commit:
            entry = state.producers.get(key[0])
            replayed = entry is not None and entry.applied.seen(key[1])
            assert replayed or not self._durable(key), f"durable batch {key} not replayed"
            if replayed:
                expected.apply(key, self.sent[key][1])
        assert state.cum.values.get("costs/cum/all", ZERO) == expected.cum
        assert state.cum.scenarios.to_bytes() == _ledger(expected.unique())
        assert state.cum.cost_ids.to_bytes() == _ledger(expected.paid())
        assert state.last_closed.get("train") == expected.last_closed

    @invariant()
    def history_holds_each_closed_step_once(self) -> None:
        agg = self.agg
        if agg is None or self.store.down or self.store.fail_after is not None:
            return
        meta = agg.state.meta
        if meta.outbox or meta.history_drop:
            return  # writes still owed: checked once they are done
        records = list(agg.history.read())
        steps = [int(r["step"]) for r in records]
        assert len(steps) == len(set(steps))
        assert steps == [c.step for c in self.ref.closed]
        for record, closed in zip(records, self.ref.closed, strict=True):
            if closed.parts:
                assert record["costs/cum/all"] == float(closed.cum_after)


AggregatorUnderFaults.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    phases=[Phase.explicit, Phase.reuse, Phase.generate]
    + ([] if os.environ.get("ARM_MODEL_NO_SHRINK") else [Phase.shrink]),
)
TestAggregatorUnderFaults = AggregatorUnderFaults.TestCase
