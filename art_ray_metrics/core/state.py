"""The aggregator's state, a facade over the stages of a leaf inside the aggregator: ingest
(:mod:`art_ray_metrics.core.ingest`: producer windows, limits, refusal) fills the step buffers
(:mod:`art_ray_metrics.core.buffer`), close (:mod:`art_ray_metrics.core.close`: the barrier
math) folds them into rows, and the snapshot encoding persists the whole. Pure Python: no I/O,
threads, locks, Ray or W&B. The Ray actor is a thin shell around one :class:`AggregatorState`;
the in-process builder uses the buffers and the close math directly.

Invariants of :class:`AggregatorState`:

- **Idempotent ingest.** A batch is applied at most once per ``(producer_id, incarnation,
  seq)``; the window per producer incarnation is a watermark plus the set of sequence numbers
  above it (:class:`~art_ray_metrics.core.ingest.ProducerWindows`, which also holds what the
  shell made durable). A window the producer confirmed it will never resend into
  (:meth:`AggregatorState.confirm`) is dropped; if that incarnation sends again, its window
  restarts at the batch's ``acked_upto``. So state grows with live producers, not with every
  producer ever seen.
- **Order independence.** Sums are exact decimals, sample summaries exact counts and sums, and
  scenario ids a set union, so any split of the same leaves into batches, in any arrival order,
  yields the same rows.
- **Paid responses once.** A cost leaf with a response id is applied once per run.
- **Nothing dropped.** A leaf for a step whose scope was already closed is *late*: it goes
  into the next row of that scope (cumulative totals stay exact) and is counted. Closing step
  ``s`` also folds in, as late, any pending leaves of that scope for steps below ``s`` that
  were never closed (a skipped step, or leaves replayed after a restart). Late leaves are held
  per slot ``(step they were recorded for, scope)``, so a rewind keeps those of the steps it
  keeps.
- **Splits, scopes, barriers.** A barrier closes ``(step, split)``: it folds the pending leaves
  of the split's scope (:func:`~art_ray_metrics.core.keys.scope_for_split`) into the row of
  ``(step, split)``. ``val`` and ``test`` share the scope ``eval``: the first of them at a step
  takes the leaves, the second the ones that arrived since. ``last_closed`` is per scope (what
  is late); ``last_closed_split`` per split (what is a resume: a split closing a step at or
  below its own last one).
- **Conflicts keep every dollar** (see :mod:`art_ray_metrics.core.buffer`): the clash of two
  producers' leaf and ancestor is counted and named.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from art_ray_metrics.core import keys as K
from art_ray_metrics.core.budget import BudgetLedger
from art_ray_metrics.core.buffer import UNATTRIBUTED, CumulativeState, StepBuffer
from art_ray_metrics.core.close import (
    StepReport,
    close_buffer,
    close_step,
    commit_close,
    plan_close,
    split_trainer_metrics,
)
from art_ray_metrics.core.counters import STATE_COUNTERS, row_values
from art_ray_metrics.core.dedupe import DigestLedger, digest, split_digests
from art_ray_metrics.core.ingest import (
    MAX_RETIRED,
    Decision,
    Limits,
    ProducerKey,
    ProducerWindows,
    Refusal,
    Window,
    admit,
    replay_decision,
)
from art_ray_metrics.core.meta import AggregatorMeta
from art_ray_metrics.core.outcome import FateMemory
from art_ray_metrics.core.records import IngestResult, LeafBatch, StepGroup
from art_ray_metrics.core.rollup import EXACT, ZERO
from art_ray_metrics.core.wire import batch_identity, decode_batch, decode_state, encode_state
from art_ray_metrics.errors import WireFormatError

_add = EXACT.add

__all__ = [
    "MAX_RETIRED",
    "UNATTRIBUTED",
    "AggregatorState",
    "CumulativeState",
    "Decision",
    "Limits",
    "ProducerKey",
    "StepBuffer",
    "StepReport",
    "close_buffer",
    "commit_close",
    "plan_close",
    "split_trainer_metrics",
]


COUNTER_NAMES = STATE_COUNTERS
"""The state's counters (declared in :mod:`~art_ray_metrics.core.counters`)."""


class AggregatorState:
    """The aggregator's whole state; the Ray actor is a thin shell around one instance."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.run_keys: set[str] = set()
        """Every leaf key producers sent in the run (bounded by ``limits.max_keys_per_run``)."""
        self.cum = CumulativeState()
        self.pending: dict[tuple[int, str], StepBuffer] = {}
        self.late: dict[tuple[int, str], StepBuffer] = {}
        """Late leaves by ``(step they were recorded for, scope)``: the next close of the scope
        takes them all."""
        self.last_closed: dict[str, int] = {}
        """The last closed step per scope: a leaf for a step at or below it is late."""
        self.last_closed_split: dict[str, int] = {}
        """The last closed step per split: a barrier at or below it is a resume."""
        self.producers = ProducerWindows()
        """Per producer incarnation, the batches applied and those durable; the retired ones."""
        self.refusals: dict[ProducerKey, dict[int, tuple[tuple[int, str, str | None, str], ...]]]
        self.refusals = {}
        """What was refused of batches whose producer may not have heard yet (until its
        ``acked_upto`` passes them): a resend's answer names it again."""
        self.pending_cost_ids: set[bytes] = set()
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.conflict_names: dict[str, int] = {}
        self.meta = AggregatorMeta()
        """Opaque, msgpack-able fields the shell persists with the state (run id, epoch, …)."""
        self.budget = BudgetLedger()
        """The run budget: spend, leases per producer incarnation (:mod:`~art_ray_metrics.
        core.budget`); configured by the shell (``configure``), kept in the checkpoint."""
        self.fates = FateMemory()
        """Fates given at recent barriers, for group spend that arrives late."""
        self.clock: Callable[[], float] = time.monotonic
        """The budget's clock (silences of producer incarnations)."""

    # -- ingest ---------------------------------------------------------------------------

    def ingest(self, batch: LeafBatch, decided: Decision | None = None) -> IngestResult:
        """Apply a batch once; a repeated ``(producer_id, incarnation, seq)`` is acknowledged,
        not applied. Leaves that would break a :class:`Limits` bound or make a pending sum
        overflow are refused one key at a time (see :func:`~art_ray_metrics.core.ingest.admit`):
        the rest of the batch is applied, and :attr:`IngestResult.refused` names what was not.

        ``decided`` replays a decision made earlier (a write-ahead log): exactly the keys it
        names are refused and nothing is checked against the limits, so a replay decides as
        the live aggregator did whatever limits it runs with."""
        pid, inc = batch.producer_id, batch.incarnation
        window = self.producers.for_batch(batch)
        if window is None or window.seen(batch.seq):
            self.counters["duplicate_batches"] += 1
            told = self.refusals.get((pid, inc), {}).get(batch.seq, ())
            return IngestResult(pid, batch.seq, True, 0, (), inc, batch.acked_upto, told)
        self._settle_header(batch, window)
        if decided is None:
            refused = admit(
                batch, self.limits, self.run_keys, (self.pending, self.late), self.last_closed
            )
        else:
            refused = replay_decision(batch, decided, self.run_keys)
        limit = any(r.limit for r in refused.values())
        self.counters["limit_rejections"] += int(limit)
        late, lost_leaves, conflicts, refusals, cost = self._apply_groups(batch, refused)
        self.budget.on_batch(pid, inc, cost=cost, admitted=batch.admitted, now=self.clock())
        window.mark(batch.seq)
        if refusals:
            self.refusals.setdefault((pid, inc), {})[batch.seq] = tuple(refusals)
        self.counters["batches"] += 1
        self.counters["leaves"] += batch.leaf_count - lost_leaves
        self.counters["late_leaves"] += late
        self.counters["conflicts"] += len(conflicts)
        for ancestor, _ in conflicts:
            self.conflict_names[ancestor] = self.conflict_names.get(ancestor, 0) + 1
        return IngestResult(
            pid,
            batch.seq,
            False,
            late,
            tuple(conflicts),
            inc,
            batch.acked_upto,
            tuple(refusals),
            limit,
        )

    def _settle_header(self, batch: LeafBatch, window: Window) -> None:
        """Apply what a batch's header declares: the batches its producer gave up on.

        Format 3: ``acked_upto`` advances the window (so it always compacts), each given-up
        batch never applied here is counted, and its leaves are counted on the row of their
        step. Older formats only counted ``dropped`` (their replay decides as it did live)."""
        told = self.refusals.get((batch.producer_id, batch.incarnation))
        if told is not None:  # the producer holds answers up to acked_upto: it heard them
            for seq in [s for s in told if s <= batch.acked_upto]:
                del told[seq]
            if not told:
                del self.refusals[(batch.producer_id, batch.incarnation)]
        if batch.version < 3:
            self.counters["dropped_batches"] += batch.dropped
            return
        lost = [entry for entry in batch.lost if not window.seen(entry[0])]
        self.counters["dropped_batches"] += window.advance(batch.acked_upto)
        cap = self.limits.max_open_scopes
        for seq, step, scope, leaves in lost:
            if window.seen(seq):  # settled by this header: never applied, so lost
                if cap is not None and scope not in self.last_closed:
                    open_scopes = {sc for _, sc in self.pending} | set(self.late)
                    if scope not in open_scopes and len(open_scopes) >= cap:
                        continue  # counted as a dropped batch only: no scope opens for it
                buf, _ = self._buffer_for(StepGroup(step, scope))
                buf.lost_leaves += leaves

    def _apply_groups(
        self, batch: LeafBatch, refused: Mapping[int, Refusal]
    ) -> tuple[int, int, list[tuple[str, str]], list[tuple[int, str, str | None, str]], Decimal]:
        """Apply what was admitted of each group: (late leaves, lost leaves, conflicts,
        refusals as ``(step, scope, key or None, reason)``, dollars of cost applied)."""
        cost = ZERO
        late = 0
        lost_leaves = 0
        conflicts: list[tuple[str, str]] = []
        refusals: list[tuple[int, str, str | None, str]] = []
        for index, group in enumerate(batch.groups):
            refusal = refused.get(index)
            if refusal is not None:
                refusals.extend((group.step, group.scope, k, r) for k, r in refusal.reasons)
                lost_leaves += refusal.leaves
                if refusal.kept is None:  # a scope it may not open: counted on no step's row
                    continue
                group = refusal.kept
            buf, is_late = self._buffer_for(group)
            if refusal is not None:
                buf.lost_leaves += refusal.leaves
            before = len(buf.conflicts)
            cost = _add(cost, self._apply(buf, group))
            buf.producers.add(batch.producer_id)
            if is_late:
                buf.late_leaves += group.leaf_count
                late += group.leaf_count
            conflicts.extend(buf.conflicts[before:])
        return late, lost_leaves, conflicts, refusals, cost

    def _buffer_for(self, group: StepGroup) -> tuple[StepBuffer, bool]:
        key = (group.step, group.scope)
        last = self.last_closed.get(group.scope)
        if last is not None and group.step <= last:
            buf = self.late.get(key)
            if buf is None:
                buf = self.late[key] = StepBuffer()
            return buf, True
        buf = self.pending.get(key)
        if buf is None:
            buf = self.pending[key] = StepBuffer()
        return buf, False

    def _apply(self, buf: StepBuffer, group: StepGroup) -> Decimal:
        """Apply one group to its buffer; returns the dollars of cost it added."""
        total = ZERO
        for key, value in group.sums.items():
            buf.add(key, value, strict=False)
            if key.startswith("costs/"):
                total = _add(total, value)
        costs = group.keyed_costs
        ids = [digest(cost.response_id) for cost in costs]
        applied = self.cum.cost_ids.contains_many(ids) if costs else []
        keyed_groups = group.keyed_groups
        for i, (cost, d, seen) in enumerate(zip(costs, ids, applied, strict=True)):
            if seen or d in self.pending_cost_ids:
                self.counters["duplicate_costs"] += 1
                continue
            self.pending_cost_ids.add(d)
            buf.cost_ids.add(d)
            buf.add(cost.key, cost.value, strict=False)
            total = _add(total, cost.value)
            if keyed_groups and i in keyed_groups:  # its group's spend: once, as the cost
                buf.group_spend.add(keyed_groups[i], cost.value)
        if group.scenario_digests:
            buf.scenarios.update(split_digests(group.scenario_digests))
        if group.samples:
            buf.add_samples(group.samples)
        for group_id, value in group.group_spend.items():
            buf.group_spend.add(group_id, value)
        return total

    def ingest_bytes(self, data: bytes, decided: Decision | None = None) -> IngestResult:
        """Decode and apply a wire batch; malformed bytes are counted and change nothing.

        Raises:
            WireFormatError: the bytes are not a valid batch of a known version.
        """
        try:
            batch = decode_batch(data)
        except WireFormatError:
            self.counters["rejected_batches"] += 1
            ident = batch_identity(data)
            if ident is not None:  # move the producer past it: its later batches still count
                pid, inc, seq, acked_upto = ident
                header = LeafBatch(pid, seq, (), inc, acked_upto, version=2)
                window = self.producers.for_batch(header)
                if window is not None:
                    window.mark(seq)
            raise
        return self.ingest(batch, decided)

    def refuse_bytes(self, data: bytes, *, limit: bool) -> None:
        """Repeat a refusal decided earlier (a replayed write-ahead log): count it and move
        the producer's window past the batch; apply nothing and check nothing. A batch the
        window already holds is skipped, uncounted, as the live aggregator would have."""
        ident = batch_identity(data)
        if ident is None:
            return
        pid, inc, seq, acked_upto = ident
        known = (pid, inc) in self.producers
        window = self.producers.for_replay((pid, inc), acked_upto)
        if known and window.seen(seq):
            return
        window.mark(seq)
        self.counters["rejected_batches"] += 1
        if limit:
            self.counters["limit_rejections"] += 1

    def confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
        """The producer holds durable acknowledgements up to ``acked_upto`` and will never
        resend those batches: drop its window when nothing above is applied. Returns whether
        the window was dropped."""
        key = (producer_id, incarnation)
        if not self.producers.confirm(key, acked_upto):
            return False
        self.refusals.pop(key, None)
        return True

    # -- barrier --------------------------------------------------------------------------

    def producers_reported(self, step: int, split: str) -> frozenset[str]:
        """Producers that sent at least one batch (possibly empty) for ``(step, split)``."""
        buf = self.pending.get((step, K.scope_for_split(split)))
        return frozenset(buf.producers) if buf is not None else frozenset()

    def close_step(
        self,
        step: int,
        split: str = "train",
        metrics: Mapping[str, float] | None = None,
        group_fates: Mapping[Any, str] | None = None,
        derived_fates: Mapping[Any, str] | None = None,
    ) -> StepReport:
        """Close ``(step, split)`` and return its row: see
        :func:`~art_ray_metrics.core.close.close_step` (a transaction: a close that raises
        :class:`~art_ray_metrics.errors.InvalidMetricError` leaves the state as it was)."""
        return close_step(self, step, split, metrics, group_fates, derived_fates)

    def telemetry(self) -> dict[str, float]:
        """The core's counters as ``telemetry/...`` row keys."""
        sizes = {"pending_steps": len(self.pending), "producers": len(self.producers)}
        return row_values("state", {**self.counters, **sizes}, K.TELEMETRY_PREFIX)

    # -- persistence ----------------------------------------------------------------------

    def to_wire(self, *, include_ledgers: bool = True) -> dict[str, Any]:
        """Plain msgpack-able form; without ledgers for incremental checkpoints."""
        out: dict[str, Any] = {
            "cum": {k: str(v) for k, v in self.cum.values.items()},
            "pending": [[s, sc, b.to_wire()] for (s, sc), b in sorted(self.pending.items())],
            "late_steps": [[s, sc, b.to_wire()] for (s, sc), b in sorted(self.late.items())],
            "last_closed": dict(self.last_closed),
            "last_closed_split": dict(self.last_closed_split),
            "windows": [
                [p, i, e.applied.watermark, sorted(e.applied.above or ())]
                for (p, i), e in self.producers.items()
            ],
            "refusals": [
                [p, i, seq, [list(r) for r in told]]
                for (p, i), by_seq in self.refusals.items()
                for seq, told in by_seq.items()
            ],
            "counters": dict(self.counters),
            "conflict_names": dict(self.conflict_names),
            "meta": self.meta.to_dict(),
            "keys": sorted(self.run_keys),
            "budget": self.budget.to_wire(),
            "fates": self.fates.to_wire(),
        }
        if include_ledgers:
            out["scenarios"] = self.cum.scenarios.to_bytes()
            out["cost_ids"] = self.cum.cost_ids.to_bytes()
        return out

    @classmethod
    def from_wire(
        cls, raw: Mapping[str, Any], *, scenarios: bytes = b"", cost_ids: bytes = b""
    ) -> AggregatorState:
        """Inverse of :meth:`to_wire`; ledgers come from ``raw`` or from the given shard bytes."""
        state = cls()
        state.cum.values = {str(k): Decimal(v) for k, v in raw["cum"].items()}
        state.cum.scenarios = DigestLedger.from_bytes(raw.get("scenarios", scenarios))
        state.cum.cost_ids = DigestLedger.from_bytes(raw.get("cost_ids", cost_ids))
        state.pending = {(int(s), str(sc)): StepBuffer.from_wire(b) for s, sc, b in raw["pending"]}
        state.last_closed = {str(k): int(v) for k, v in raw["last_closed"].items()}
        if "late_steps" in raw:
            state.late = {
                (int(s), str(sc)): StepBuffer.from_wire(b) for s, sc, b in raw["late_steps"]
            }
        else:  # before late leaves were kept per step: held for the scope's last closed step
            state.late = {
                (state.last_closed.get(str(sc), 0), str(sc)): StepBuffer.from_wire(b)
                for sc, b in raw["late"]
            }
        if "windows" in raw:
            for p, i, w, a in raw["windows"]:
                state.producers.restore((str(p), str(i)), int(w), a)
        else:  # format 1: one window per producer id, no incarnation
            for p, (w, a) in raw["producers"].items():
                state.producers.restore((str(p), ""), int(w), a)
        for p, i, seq, told in raw.get("refusals", ()):
            state.refusals.setdefault((str(p), str(i)), {})[int(seq)] = tuple(
                (int(st), str(sc), None if k is None else str(k), str(r)) for st, sc, k, r in told
            )
        state.counters.update({str(k): int(v) for k, v in raw["counters"].items()})
        state.conflict_names = {str(k): int(v) for k, v in raw["conflict_names"].items()}
        state.meta = AggregatorMeta.from_dict(raw["meta"])
        if "last_closed_split" in raw:
            state.last_closed_split = {str(k): int(v) for k, v in raw["last_closed_split"].items()}
        else:  # older snapshots: the splits' last rows, and splits that are their own scope
            state.last_closed_split = {sp: row.step for sp, row in state.meta.last_rows.items()}
            for scope, step in state.last_closed.items():
                if scope != K.scope_for_split("val"):
                    held = state.last_closed_split.get(scope, step)
                    state.last_closed_split[scope] = max(held, step)
        state.run_keys = {str(k) for k in raw.get("keys", ())}
        if "budget" in raw:  # older snapshots kept no budget
            state.budget = BudgetLedger.from_wire(raw["budget"], now=state.clock())
            state.fates = FateMemory.from_wire(raw.get("fates", ()))
        for buf in (*state.pending.values(), *state.late.values()):
            state.pending_cost_ids |= buf.cost_ids
        return state

    def snapshot(self) -> bytes:
        """The whole state as versioned msgpack bytes (ledgers included)."""
        return encode_state(self.to_wire())

    @classmethod
    def restore(cls, data: bytes) -> AggregatorState:
        """Rebuild a state from :meth:`snapshot` bytes.

        Raises:
            WireFormatError: malformed, truncated or of an unknown format version.
        """
        return cls._from_checked(decode_state(data), b"", b"")

    def checkpoint_parts(self) -> tuple[bytes, dict[str, bytes], tuple[int, int]]:
        """Incremental checkpoint: (state blob without ledgers, new ledger shards, token).

        Shards hold only digests added since the last :meth:`checkpoint_committed`; pass the
        returned token there once the checkpoint is durable (a failed one loses nothing).
        """
        token = (self.cum.scenarios.journal_position(), self.cum.cost_ids.journal_position())
        shards = {
            "scenarios": self.cum.scenarios.journal_bytes(token[0]),
            "cost_ids": self.cum.cost_ids.journal_bytes(token[1]),
        }
        return encode_state(self.to_wire(include_ledgers=False)), shards, token

    def checkpoint_committed(self, token: tuple[int, int]) -> None:
        """Forget journal entries that a committed checkpoint holds."""
        self.cum.scenarios.drop_journal(token[0])
        self.cum.cost_ids.drop_journal(token[1])

    @classmethod
    def from_checkpoint(cls, state: bytes, shards: Mapping[str, bytes]) -> AggregatorState:
        """Rebuild from a checkpoint's state blob and the concatenation of its shards."""
        return cls._from_checked(
            decode_state(state), shards.get("scenarios", b""), shards.get("cost_ids", b"")
        )

    @classmethod
    def _from_checked(
        cls, raw: Mapping[str, Any], scenarios: bytes, cost_ids: bytes
    ) -> AggregatorState:
        try:
            return cls.from_wire(raw, scenarios=scenarios, cost_ids=cost_ids)
        except (KeyError, TypeError, ValueError, InvalidOperation, AttributeError) as exc:
            if isinstance(exc, WireFormatError):
                raise
            raise WireFormatError(f"Malformed state snapshot: {exc!r}") from exc
