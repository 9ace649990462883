"""Worker side: a per-process batching client and the step-bound builder ``connect`` returns.

Life of a leaf::

    builder.add_cost("train/judge", 0.002)       # validated here; raises before anything is sent
      -> the client's tape                        # one atomic list.extend: no lock, no GC object
      -> PendingLeaves of (step, scope)           # drained at ship; summed exactly there
      -> ship(): LeafBatch(producer_id, incarnation, seq)   # on size, on time, on flush()
      -> actor.ingest.remote(bytes, durable)      # a flush's call waits for the log write
      -> retained until the actor says durable    # resent after a failed call or actor restart

Guarantees:

- **Exactly once.** Every batch has ``(producer_id, incarnation, seq)``; the incarnation is
  chosen when the client starts (a restarted, retried or forked producer gets a new one), and
  the actor applies each batch once, so the client can resend freely.
- **Bounded memory.** Raw values wait at most until the next ship (``max_batch_leaves`` of
  them); batches carry one exact sum per distinct key. Key registries are kept for the latest
  64 ``(step, scope)`` pairs, and a rollout is forgotten once all its batches are durable.
  Background calls in flight are capped, retained batches are capped (beyond the cap the
  oldest is dropped *and counted* on the next row: only when the actor has been unreachable
  for that long: the batch that displaces it declares it, so the aggregator's window moves
  past it and its leaves are counted on their step's row; its rollouts' flushes say not ok).
- **No lost errors, no wedge.** Every call's result is reaped; failures are counted, logged once
  per kind, and resent under the same seq with jittered backoff. Keys the actor refuses (a
  limit, a sum overflow) and a batch it refuses whole (malformed) are charged to exactly the
  rollouts that recorded them: their flushes say not ok; later batches are unaffected.
- **Conflicts raise at the call.** A key is registered for its step the first time it is
  recorded (under the lock); a leaf that is an ancestor or a descendant of one already recorded
  for the step by this process raises :class:`MetricConflictError`, even across batches
  (while the step's registry is kept).
- **Flush means durable, for its own leaves.** A builder's ``flush()`` returns once the batches
  holding its leaves are durable (write-ahead log or checkpoint); it does not wait for other
  rollouts' batches. It never raises on telemetry failure: it returns a :class:`FlushResult`.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from art_ray_metrics.builder import (
    _COST_KEYS,
    LeafRecorder,
    Number,
    PendingLeaves,
    _alias,
    _scenario_digests,
)
from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core import keys as K
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.backoff import RESEND
from art_ray_metrics.core.records import KeyedCost, LeafBatch, StepGroup
from art_ray_metrics.core.rollup import exact_sum
from art_ray_metrics.core.wire import decode_batch, encode_batch
from art_ray_metrics.distributed.budget import ClientBudget
from art_ray_metrics.distributed.transport import JITTER, RayTransport, Transport, one_line
from art_ray_metrics.distributed.workerenv import load_worker_env
from art_ray_metrics.errors import WireFormatError
from art_ray_metrics.spend.admission import Admission
from art_ray_metrics.spend.pricing import PricingRegistry

__all__ = [
    "FlushResult",
    "MetricsClient",
    "WorkerBuilder",
    "close_clients",
    "connect",
    "get_client",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlushResult:
    """What an explicit flush achieved."""

    ok: bool
    """Every batch holding the flushed leaves is acknowledged as durable, and none of those
    leaves was lost (refused by the aggregator, given up at the retained-batch cap, not
    encodable): a builder's flush answers for its own leaves only, for as long as it asks;
    the process-wide ``MetricsClient.flush()`` reports every loss since its previous call."""
    batches: int
    """Batches shipped by this process so far."""
    retained: int
    """Batches still waiting for a durable acknowledgement."""
    error: str | None = None


def _default_producer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _new_incarnation() -> str:
    return uuid.uuid4().hex[:16]


_ALL_CLIENTS: weakref.WeakSet[MetricsClient] = weakref.WeakSet()


class MetricsClient:
    """One per process, aggregator and producer id: buffers leaves and ships them as batches."""

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        producer_id: str | None = None,
        actor: Any = None,
        transport: Transport | None = None,
    ) -> None:
        """``transport``: how the aggregator is reached (default: the named Ray actor of
        ``config``, or the given ``actor`` handle); see :mod:`.transport`."""
        self.config = config or ClientConfig()
        self.producer_id = V.check_text("producer_id", producer_id or _default_producer_id())
        self._transport: Transport = transport or RayTransport(
            self.config.name, self.config.namespace, actor
        )
        self._tape: list[Any] = []  # one list for the process's life; entries of _ENTRY items
        self._start()
        self.pricing = PricingRegistry()
        _ALL_CLIENTS.add(self)
        atexit.register(self.close)

    def _start(self) -> None:
        """Fresh per-process state: a new incarnation, sequence and background thread."""
        self.incarnation = _new_incarnation()
        self.budget = ClientBudget(
            self._transport,
            self.producer_id,
            self.incarnation,
            lease_calls=self.config.budget_lease_calls,
            wait_s=self.config.budget_wait_s,
            default_max_tokens=self.config.default_max_tokens,
        )
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._tape.clear()  # in a forked child: the parent ships what it recorded
        self._gen = getattr(self, "_gen", 0) + 1  # rollouts begun before a fork are older
        self._his: dict[int, int] = {}  # rollout id -> seq of the batch with its last leaves
        self._prune_his_at = _PRUNE_HIS_AT
        # (step, scope) -> (that key, its registry): see _register. Builders put that one key
        # object on the tape, so _drain tells a change of slot by identity.
        self._keys: dict[tuple[int, str], tuple[tuple[int, str], PendingLeaves]] = {}
        self._pending: dict[tuple[int, str], PendingLeaves] = {}
        self._pending_leaves = 0
        self._max_batch_leaves = self.config.max_batch_leaves
        self._tape_cap = self._max_batch_leaves * _ENTRY  # tape items that make a full batch
        self._seq = 0
        self._retained: dict[int, bytes] = {}
        self._inflight: dict[Any, tuple[int, bool]] = {}  # ObjectRef -> (seq, durable)
        self._rejected: dict[int, str] = {}  # losses not yet reported by a process flush
        # per-rollout acknowledgement bookkeeping (see _lose): what each batch carries
        self._drained: list[list[Any]] = []  # tape items drained since the last batch built
        self._items: dict[int, list[list[Any]]] = {}  # seq -> its tape items, until settled
        self._items_size = 0
        self._batch_rids: dict[int, set[int]] = {}  # seq -> its rollouts (items over budget)
        self._lost_rids: dict[int, str] = {}  # rollout id -> why some of its leaves are lost
        self._lost_seqs: dict[int, str] = {}  # seq -> why, when its rollouts are unknown
        self._lost_decl: list[tuple[int, int, str, int]] = []  # given up, not yet declared
        self._carried: dict[int, int] = {}  # seq -> the newest given-up seq its header declares
        self._charged: set[int] = set()  # batches whose refused keys were charged already
        self._sending = 0  # sends between their retained check and being in flight
        self._dropped_unreported = 0
        self._confirmed = 0
        self._big: dict[tuple[int, str, str], Decimal] = {}  # shipped sums of keys with huge values
        self._last_ship = time.monotonic()
        self._resend_after = 0.0
        self._backoff = RESEND.start(JITTER)
        self.counters: dict[str, int] = {
            "batches": 0,
            "resends": 0,
            "send_failures": 0,
            "rejected": 0,
            "dropped_retained": 0,
        }
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # the background thread looks up now, not next tick
        self._closing = False
        self._missing_since: float | None = None  # lookups failing since (monotonic)
        self._thread = threading.Thread(
            target=self._run, name="art-ray-metrics-client", daemon=True
        )
        self._thread.start()

    def _after_fork(self) -> None:
        """In a forked child: the parent ships what it recorded; the child starts afresh."""
        self._transport = self._transport.after_fork()
        self._start()

    # -- recording (called by WorkerBuilder) ------------------------------------------------
    #
    # The tape: builders add ``(step, scope), rollout id, key, value`` to ``self._tape`` as
    # four flat items, without the lock: ``list.extend`` with a tuple is one atomic step, so
    # entries from concurrent threads never interleave. ``key`` None marks a scenario digest
    # (``value``) or, with ``value`` None, a builder's creation (its step is reported even if
    # it records nothing). The tuple passed to ``extend`` dies at once, so recording a leaf
    # leaves no object for the cyclic GC to track (a tuple per leaf cost a collection every
    # ~60 rollouts).
    # ``_drain`` moves the tape into ``_pending`` under the lock and notes in ``_his`` which
    # batch carries each rollout's last leaves. Only keys already registered for the
    # (step, scope) take the tape directly: a new key is checked for leaf/ancestor conflicts
    # under the lock first (``_register``), so every conflict still raises at the call that
    # made it.

    def _slot(self, slot_key: tuple[int, str]) -> PendingLeaves:
        slot = self._pending.get(slot_key)
        if slot is None:
            slot = self._pending[slot_key] = PendingLeaves()
        return slot

    def _slot_entry(self, slot_key: tuple[int, str]) -> tuple[tuple[int, str], PendingLeaves]:
        """``(step, scope)``'s shared key object and registry (key -> ``True`` for a leaf, or a
        leaf under it for an ancestor). Kept across ships, for the latest steps."""
        entry = self._keys.get(slot_key)
        if entry is None:
            with self._lock:
                entry = self._keys.get(slot_key)
                if entry is None:
                    entry = self._keys[slot_key] = (slot_key, PendingLeaves())
                    if len(self._keys) > _MAX_REGISTRIES:  # forget the oldest steps' first
                        for old in sorted(self._keys)[: _MAX_REGISTRIES // 2]:
                            del self._keys[old]
        return entry

    def _registry(self, slot_key: tuple[int, str]) -> PendingLeaves:
        return self._slot_entry(slot_key)[1]

    def _register(self, slot_key: tuple[int, str], key: str) -> None:
        """Make ``key`` a known leaf of ``(step, scope)`` (under the lock).

        Raises:
            MetricConflictError: ``key`` is an ancestor or a descendant of a leaf recorded for
                the step (in this process), or a sampled key; nothing is changed.
        """
        reg = self._registry(slot_key)
        if reg.slots.get(key) is not True:
            reg.record(key, True)

    def _drain(self) -> None:
        """Move the tape into ``_pending`` (under the lock). Each drained rollout learns the
        seq of the batch that will carry its leaves: the next one."""
        tape = self._tape
        n = len(tape)
        if not n:
            return
        items = tape[:n]
        del tape[:n]  # entries added meanwhile stay for the next drain
        self._drained.append(items)  # which rollout recorded what: see _rollouts_of
        self._items_size += n
        seq = self._seq + 1
        pending = self._pending
        his = self._his
        last_sk: Any = None
        last_rid = 0
        slots: dict[str, Any] = {}
        slot: PendingLeaves | None = None
        markers = 0
        it = iter(items)
        for sk, rid, key, value in zip(it, it, it, it, strict=True):
            if rid != last_rid:
                last_rid = rid
                his[rid] = seq
            if sk is not last_sk:
                last_sk = sk
                slot = pending.get(sk)
                if slot is None:
                    slot = pending[sk] = PendingLeaves()
                slots = slot.slots
            if key is None:
                if value is None:
                    markers += 1
                else:
                    slot.scenarios.add(value)  # type: ignore[union-attr]
                continue
            # no conflict check here: the registry made it (a builder still holding a
            # forgotten step's registry could pass one; the aggregator then keeps both
            # values, the ancestor's as ``unattributed``, and counts the clash)
            held = slots.get(key)
            if held is None:
                slots[key] = value
            elif held.__class__ is list:
                held.append(value)
            else:
                slots[key] = [held, value]
        self._pending_leaves += n // _ENTRY - markers
        if len(his) > self._prune_his_at:  # forget rollouts whose batches are all durable
            upto = self._acked_upto()
            his = {r: h for r, h in his.items() if h > upto}
            if len(his) > _MAX_HIS:  # nothing durable for long (actor unreachable): the oldest
                his = {r: his[r] for r in sorted(his)[-(_MAX_HIS // 2) :]}
            self._his = his
            self._prune_his_at = min(_MAX_HIS, max(_PRUNE_HIS_AT, 2 * len(his)))

    def _pending_now(self) -> dict[tuple[int, str], PendingLeaves]:
        """What the next batch would carry, by ``(step, scope)`` (tests and diagnostics)."""
        with self._lock:
            self._drain()
            return self._pending

    def record(self, step: int, scope: str, key: str, value: Number) -> int:
        """Add a validated leaf for ``(step, scope)``; return the seq of the batch that will
        carry it (or a later one).

        Raises:
            MetricConflictError: ``key`` conflicts with a leaf recorded for the step.
        """
        self.record_into(self._new_ctx((step, scope)), key, value)
        return self._seq + 1

    def _new_ctx(self, slot_key: tuple[int, str]) -> _Ctx:
        """A new rollout's context: no batch built before now can hold its leaves."""
        return (slot_key, next(_ROLLOUT_IDS), self._seq + 1, self._gen)

    def record_into(self, ctx: _Ctx, key: str, value: Number) -> None:
        """The slow path of a validated leaf (its key is new for the step): register the key,
        then put the leaf on the tape; ship when a batch is full."""
        with self._lock:
            self._register(ctx[0], key)
            self._tape.extend((ctx[0], ctx[1], key, value))
        if len(self._tape) >= self._tape_cap:
            self.ship()

    def record_big(self, ctx: _Ctx, key: str, value: Number) -> None:
        """:meth:`record_into` for a value of magnitude >= ``MAX_MAGNITUDE``: refuses it when
        the key's pending sum would leave float range (the aggregator could not hold it)."""
        step, scope = slot_key = ctx[0]
        with self._lock:
            self._register(slot_key, key)
            self._drain()
            slot = self._pending.get(slot_key)
            held = slot.slots.get(key) if slot is not None else None
            values = held if held.__class__ is list else [] if held is None else [held]
            shipped = self._big.get((step, scope, key), Decimal(0))
            V.check_sum(key, exact_sum([*values, value, shipped]))
            self._tape.extend((ctx[0], ctx[1], key, value))
            self._big.setdefault((step, scope, key), Decimal(0))

    def record_scenarios(self, ctx: _Ctx, digests: list[bytes]) -> None:
        """Add scenario digests; ship when the batch is full."""
        sk, rid = ctx[0], ctx[1]
        self._tape.extend([x for d in digests for x in (sk, rid, None, d)])
        if len(self._tape) >= self._tape_cap:
            self.ship()

    def record_sample(self, ctx: _Ctx, key: str, value: float) -> None:
        """Add one per-rollout value (averaged by the aggregator); ship when the batch is full.

        Raises:
            MetricConflictError: ``key`` is a leaf recorded for the step.
        """
        with self._lock:
            reg = self._registry(ctx[0])
            if key not in reg.samples:
                reg.record_sample(key, 0.0)
            self._slot(ctx[0]).samples.setdefault(key, []).append(value)
            self._drained.append([ctx[0], ctx[1], key, value])
            self._his[ctx[1]] = self._seq + 1
            pending = self._pending_leaves = self._pending_leaves + 1
        if pending >= self._max_batch_leaves:
            self.ship()

    def record_keyed_cost(self, ctx: _Ctx, key: str, value: Decimal, rid: str) -> None:
        """Add a cost applied at most once per response id (by the aggregator)."""
        V.check_text("response_id", rid)
        with self._lock:
            self._slot(ctx[0]).keyed.append(KeyedCost(key, value, rid))
            self._drained.append([ctx[0], ctx[1], key, value])
            self._his[ctx[1]] = self._seq + 1
            self._pending_leaves += 1

    def touch(self, step: int, scope: str) -> int:
        """Make sure the next batch reports this producer for ``(step, scope)``; return the
        seq of that batch."""
        with self._lock:
            self._slot((step, scope))
            return self._seq + 1

    # -- shipping --------------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """How this client reaches its aggregator (see :mod:`.transport`)."""
        return self._transport

    def _acked_upto(self) -> int:
        """Every seq up to this one is acknowledged durable (or given up): never resent."""
        return min(self._retained) - 1 if self._retained else self._seq

    def _build(self) -> tuple[int, bytes] | None:
        """Encode everything pending as the next batch (under the lock). The seq is consumed
        only once the bytes exist: nothing accepted can wedge the sequence."""
        admitted = self.budget.take_admitted()  # before the drain: its leaves are on the tape
        self._drain()
        if not self._pending:
            self.budget.untake(admitted)
            self._last_ship = time.monotonic()
            return None
        groups = tuple(
            StepGroup(
                step,
                scope,
                p.sums(),
                tuple(p.keyed),
                b"".join(sorted(p.scenarios)),
                p.sample_stats(),
            )
            for (step, scope), p in sorted(self._pending.items())
        )
        if self._big:  # keys that got huge values: remember what was shipped (rare)
            sums = {(g.step, g.scope): g.sums for g in groups}
            for big_key, total in self._big.items():
                add = sums.get(big_key[:2], {}).get(big_key[2])
                if add is not None:
                    self._big[big_key] = exact_sum([total, add])
        seq = self._seq + 1
        self._make_room()  # before encoding: this batch declares what it displaced
        lost = tuple(self._lost_decl)
        batch = LeafBatch(
            self.producer_id,
            seq,
            groups,
            self.incarnation,
            self._acked_upto(),
            self._dropped_unreported,
            lost,
            admitted=admitted,
        )
        drained, self._drained = self._drained, []
        try:
            data = encode_batch(batch)
        except Exception as exc:  # validation should make this impossible: report, never wedge
            self.budget.untake(admitted)
            self._pending.clear()
            self._pending_leaves = 0
            self._items_size -= sum(len(chunk) for chunk in drained)
            self.counters["rejected"] += 1
            reason = f"batch not encodable: {exc!r}"[:500]
            self._note_rejected(-self.counters["rejected"], reason)
            self._lose_rollouts(_rollouts_in(drained, None), reason)
            log.error("art_ray_metrics: could not encode a batch: %r", exc)
            return None
        self._pending.clear()
        self._pending_leaves = 0
        self._dropped_unreported = 0
        self._seq = seq
        self._retained[seq] = data
        self._items[seq] = drained
        if lost:
            self._carried[seq] = lost[-1][0]
        self._budget_items()
        self._last_ship = time.monotonic()
        self.counters["batches"] += 1
        return seq, data

    def ship(self, *, durable: bool = False) -> int | None:
        """Send everything pending as one batch; return its seq (None if nothing to send)."""
        with self._lock:
            built = self._build()
        if built is None:
            return None
        self._wait_for_room()
        self._send(built[0], built[1], durable=durable)
        return built[0]

    def _make_room(self) -> None:
        """Give up the oldest retained batches so the one being built fits the cap (under the
        lock): each is declared to the aggregator in the next batch's header (its window moves
        past it; its leaves are counted on their steps' rows) and fails every flush of a
        rollout whose leaves it held."""
        excess = len(self._retained) + 1 - self.config.max_retained_batches
        if excess <= 0:
            return
        cap = self.config.max_retained_batches
        for seq in sorted(self._retained)[:excess]:
            data = self._retained.pop(seq)
            self.counters["dropped_retained"] += 1
            self._dropped_unreported += 1
            try:
                groups = decode_batch(data).groups
            except WireFormatError:  # our own bytes: cannot happen; the batch still counts
                groups = ()
            self._lost_decl.extend((seq, g.step, g.scope, g.leaf_count) for g in groups)
            reason = (
                f"batch {seq} dropped unacknowledged at max_retained_batches={cap} (the "
                f"aggregator was unreachable): last error {self.last_error}"
            )[:2000]
            self._lose(seq, reason, None)
        if len(self._lost_decl) > _MAX_LOST_DECL:  # the oldest stay counted as batches only
            del self._lost_decl[: len(self._lost_decl) - _MAX_LOST_DECL]
        log.error("art_ray_metrics: dropped %d unacknowledged batches (cap reached)", excess)

    # -- per-rollout acknowledgements ------------------------------------------------------
    #
    # Each built batch keeps the tape items it was built from until its first answer (which
    # names any refused keys), within a budget; from then on, until it is durable or given
    # up, only the set of its rollouts. A loss
    # is charged to exactly the rollouts that recorded what was lost (``_lost_rids``); when a
    # batch's items are gone, to every rollout whose batch range covers it (``_lost_seqs``).

    def _note_rejected(self, key: int, reason: str) -> None:
        self._rejected[key] = reason
        if len(self._rejected) > _MAX_REPORTED:  # reported by a process flush: keep the newest
            del self._rejected[next(iter(self._rejected))]

    def _lose(
        self, seq: int, reason: str, refused: set[tuple[int, str, str | None]] | None
    ) -> None:
        """Charge the loss of batch ``seq`` (all of it, or the ``refused`` ``(step, scope,
        key)``; key None: the whole group) to the rollouts that recorded it (under the lock)."""
        self._note_rejected(seq, reason)
        items = self._items.get(seq)
        if items is not None:
            self._lose_rollouts(_rollouts_in(items, refused), reason)
        elif seq in self._batch_rids:
            self._lose_rollouts(self._batch_rids[seq], reason)
        else:
            self._lost_seqs[seq] = reason
            if len(self._lost_seqs) > _MAX_HIS:
                del self._lost_seqs[next(iter(self._lost_seqs))]
        if refused is None:
            self._settle(seq)

    def _lose_rollouts(self, rids: Iterable[int], reason: str) -> None:
        lost = self._lost_rids
        for rid in rids:
            held = lost.get(rid)
            lost[rid] = reason if held is None else f"{held}; {reason}"[:4000]
        if len(lost) > _MAX_HIS:
            for rid in sorted(lost)[: len(lost) - _MAX_HIS // 2]:
                del lost[rid]

    def _settle(self, seq: int) -> None:
        """Forget what batch ``seq`` carried (under the lock): it is durable or lost."""
        items = self._items.pop(seq, None)
        if items is not None:
            self._items_size -= sum(len(chunk) for chunk in items)
        self._batch_rids.pop(seq, None)
        self._charged.discard(seq)

    def _budget_items(self) -> None:
        """Keep the items of the newest batches within ``_ITEMS_BUDGET`` (under the lock)."""
        while self._items_size > _ITEMS_BUDGET and len(self._items) > 1:
            seq = next(iter(self._items))
            items = self._items.pop(seq)
            self._items_size -= sum(len(chunk) for chunk in items)
            self._batch_rids[seq] = _rollouts_in(items, None)

    def _send(self, seq: int, data: bytes, *, durable: bool) -> Any:
        """Start the call carrying batch ``seq``. Never looks the aggregator up: with none
        resolved yet the batch stays retained and the background thread sends it."""
        if not self._transport.ready():  # not found yet: no failure, the lookup is under way
            self._wake.set()
            return None
        with self._lock:
            if seq not in self._retained:  # settled since it was picked: a copy is stale, and
                return None  # after a confirm the aggregator may no longer know it applied it
            self._sending += 1  # no confirm until this call is in flight (see _confirm)
        try:
            ref = self._transport.send(data, durable)
        except Exception as exc:  # Ray is gone, or the handle is broken: resend later
            with self._lock:
                self._sending -= 1
            self._failed(exc)
            self._wake.set()
            return None
        with self._lock:
            self._inflight[ref] = (seq, durable)
            self._sending -= 1
        return ref

    def _wait_for_room(self) -> None:
        deadline = time.monotonic() + self.config.flush_timeout_s
        while len(self._inflight) >= self.config.max_in_flight and time.monotonic() < deadline:
            refs = list(self._inflight)
            if refs:
                self._reap_refs(self._transport.wait(refs, 1, 0.5))
            if self._transport.gone():
                return

    def reap(self, *, timeout_s: float = 0.0, block: bool = False) -> int:
        """Collect finished calls; return how many finished."""
        with self._lock:
            refs = list(self._inflight)
        if not refs:
            return 0
        ready = self._transport.wait(refs, 1 if block else len(refs), timeout_s)
        self._reap_refs(ready)
        return len(ready)

    def _reap_refs(self, ready: list[Any]) -> None:
        for ref in ready:
            self._complete(ref, self._transport.outcome(ref))

    def _complete(self, ref: Any, outcome: Any) -> None:
        """Account for one finished call (``outcome`` is its ack or its exception); idempotent."""
        with self._lock:
            entry = self._inflight.pop(ref, None)
        if entry is None:
            return
        seq, asked_durable = entry
        if isinstance(outcome, WireFormatError):  # refused for good: the actor moved past it
            reason = f"batch {seq} rejected: {outcome}"[:2000]
            with self._lock:
                if self._retained.pop(seq, None) is not None:
                    self._lose(seq, reason, None)
            self.counters["rejected"] += 1
            self.last_error = reason
            log.error("art_ray_metrics: %s", self.last_error)
        elif isinstance(outcome, BaseException):
            self._failed(outcome)
        else:
            self._acked(seq, outcome)
            if asked_durable and seq in self._retained:
                self._failed(RuntimeError("the aggregator could not make the batch durable yet"))

    def _acked(self, seq: int, ack: dict[str, Any]) -> None:
        upto = int(ack.get("durable_upto", 0))
        refused = ack.get("refused")
        with self._lock:
            if refused and seq not in self._charged:
                # some keys were refused (the rest applied): charge their rollouts, once
                self._charged.add(seq)
                keys = {
                    (int(r[0]), str(r[1]), None if r[2] is None else str(r[2])) for r in refused
                }
                reason = "; ".join(str(r[3]) for r in refused)[:2000]
                self._lose(seq, f"batch {seq}: {reason}", keys)
                self.counters["rejected"] += 1
                self.last_error = reason
                log.error("art_ray_metrics: batch %s: %s", seq, reason[:500])
            settled = []
            if ack.get("durable") and self._retained.pop(seq, None) is not None:
                settled.append(seq)
            if upto and self._retained and min(self._retained) <= upto:
                for s in [s for s in self._retained if s <= upto]:
                    del self._retained[s]
                    settled.append(s)
            if seq in self._items and seq in self._retained:
                # applied, not durable yet: only a give-up at the cap can still lose it, and
                # that is charged per batch; the set of its rollouts is enough from here
                items = self._items.pop(seq)
                self._items_size -= sum(len(chunk) for chunk in items)
                self._batch_rids[seq] = _rollouts_in(items, None)
            for s in settled:
                self._settle(s)
                declared = self._carried.pop(s, 0)
                if declared:  # the aggregator holds this header: its declarations are made
                    self._lost_decl = [e for e in self._lost_decl if e[0] > declared]
            self._backoff.reset()

    def _failed(self, exc: BaseException) -> None:
        self._transport.failed(exc)  # the aggregator died or was replaced: look it up again
        self.counters["send_failures"] += 1
        text = one_line(exc)  # a Ray task error's cause, without its remote traceback
        if text != self.last_error:
            log.warning("art_ray_metrics: send failed, will resend: %s", text)
            if str(exc).strip() != text.split(": ", 1)[-1]:
                log.debug("art_ray_metrics: the failure in full: %s", exc)
        self.last_error = text
        with self._lock:  # exponential backoff with jitter: restarts are not hammered in step
            self._resend_after = time.monotonic() + self._backoff.next_delay()

    def _resendable(self, lo: int = 1, hi: int | None = None) -> list[tuple[int, bytes]]:
        with self._lock:
            inflight = {s for s, _ in self._inflight.values()}
            return [
                (s, d)
                for s, d in sorted(self._retained.items())
                if s not in inflight and s >= lo and (hi is None or s <= hi)
            ]

    def _resend(self, *, durable: bool = False, lo: int = 1, hi: int | None = None) -> None:
        for seq, data in self._resendable(lo, hi):
            self.counters["resends"] += 1
            self._send(seq, data, durable=durable)

    def _confirm(self) -> None:
        """Tell the actor every batch up to here is acknowledged, so it can drop our window."""
        with self._lock:
            if self._pending or self._tape or self._inflight or self._sending:
                return
            upto = self._acked_upto()
        if upto > self._confirmed and self._transport.confirm(
            self.producer_id, self.incarnation, upto
        ):
            self._confirmed = upto

    def _lookup(self) -> None:
        """Look the aggregator up if none is resolved (back-off between failures). Only this
        thread looks up: recording, flushes and event loops never wait for a lookup."""
        transport = self._transport
        if transport.ready():
            return
        if transport.resolve():
            self._missing_since = None
            with self._lock:  # found (again): what is retained goes now, not after a back-off
                self._resend_after = 0.0
                self._backoff.reset()
            return
        now = time.monotonic()
        if self._missing_since is None:
            self._missing_since = now
        elif now - self._missing_since >= self.config.lookup_timeout_s:
            self._missing_since = float("inf")  # said once; lookups go on with back-off
            log.error(
                "art_ray_metrics: no aggregator found for %.0f s (%s); still looking",
                self.config.lookup_timeout_s,
                transport.lookup_error,
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self._transport.gone():  # e.g. ray.shutdown(): never start it again
                    self._stop_quietly()
                    return
                self._lookup()
                self.budget.tick()
                if self._inflight:
                    self.reap()
                now = time.monotonic()
                waiting = self._pending or self._tape
                if waiting and now - self._last_ship >= self.config.flush_interval_s:
                    self.ship()
                # unacknowledged or not yet durable: ask again (duplicates are free)
                if (
                    self._retained
                    and not self._inflight
                    and now >= self._resend_after
                    and now - self._last_ship >= self.config.flush_interval_s
                ):
                    self._resend()
                    self._last_ship = now
                if (
                    not self._retained
                    and self._seq > self._confirmed
                    and now - self._last_ship >= self.config.flush_interval_s
                ):
                    self._confirm()
            except Exception as exc:  # the loop must survive anything
                self._failed(exc)

    def _stop_quietly(self) -> None:
        """The transport's world ended (Ray shut down in this process): stop sending."""
        self._stop.set()
        with self._lock:
            self._inflight.clear()
            unsent = len(self._retained) + len(self._pending) + len(self._tape)
        if unsent:
            log.warning(
                "art_ray_metrics: Ray was shut down in this process; the client stops with "
                "%d batches or leaves unsent",
                unsent,
            )
        else:
            log.info("art_ray_metrics: Ray was shut down in this process; the client stops")

    # -- flushing --------------------------------------------------------------------------

    def _flush_state(self, lo: int, hi: int) -> tuple[bool, list[Any]]:
        """(all of [lo, hi] durable, refs in flight for them)."""
        with self._lock:
            done = self._seq >= hi and not any(lo <= s <= hi for s in self._retained)
            refs = [r for r, (s, _) in self._inflight.items() if lo <= s <= hi]
        return done, refs

    def _result(
        self, done: bool, lo: int = 1, hi: int | None = None, rid: int | None = None
    ) -> FlushResult:
        """A flush's answer. A rollout's (``rid``): not ok while any of its leaves is lost
        (refused, dropped at the cap, not encodable), for as long as it asks. The process's
        (``rid`` None): not ok when anything was lost since its previous flush."""
        with self._lock:
            left = len(self._retained)
            if rid is None:
                rejected, self._rejected = self._rejected, {}
                reasons = list(rejected.values())
            else:
                reasons = [self._lost_rids[rid]] if rid in self._lost_rids else []
                if self._lost_seqs:
                    top = self._seq if hi is None else hi
                    reasons += [r for s, r in self._lost_seqs.items() if lo <= s <= top]
        if reasons:
            return FlushResult(False, self._seq, left, "; ".join(reasons)[:4000])
        return FlushResult(done, self._seq, left, None if done else self.last_error)

    def _durable_ahead(self) -> list[Any]:
        """The durable calls of this process in flight (flushes' batches and resends)."""
        with self._lock:
            return [call for call, (_, durable) in self._inflight.items() if durable]

    def _follow(self, hi: int, deadline: float) -> None:
        """Group commit across the flushes of this process: while a durable call is in
        flight, a flush whose batch is not built yet waits (until ``deadline`` at most) for
        one such call to finish instead of sending a call of its own. Whoever is first to
        build then ships every leaf recorded meanwhile in one batch, so concurrent flushes
        cost about one actor call per round trip, whatever the thread count."""
        ahead = self._durable_ahead()
        left = deadline - time.monotonic()
        if ahead and left > 0 and self._seq < hi:
            self._reap_refs(self._transport.wait(ahead, 1, left))

    async def _afollow(self, hi: int, deadline: float) -> None:
        """:meth:`_follow` on the caller's event loop."""
        ahead = self._durable_ahead()
        left = deadline - time.monotonic()
        if not ahead or left <= 0 or self._seq >= hi:
            return
        futs = {asyncio.ensure_future(self._transport.aoutcome(r)): r for r in ahead}
        finished, _ = await asyncio.wait(futs, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        for f in finished:
            self._complete(futs[f], f.result())

    def _ship_for(self, hi: int, deadline: float | None = None) -> int:
        """Build batch ``hi`` if nobody did yet and send it durable, after the durable call in
        flight, if any (see :meth:`_follow`; with a ``deadline`` only). Not held back by
        ``max_in_flight``: each such call has a caller waiting on it, which bounds them.

        Returns ``hi``, or the last batch built when nothing is left to build batch ``hi``
        from: the caller's leaves are then in earlier batches (or were never this process's
        to ship: recorded before a fork, or dropped by an encoding failure, which the flush
        reports)."""
        built = None
        if self._seq < hi:
            if deadline is not None:
                self._follow(hi, deadline)
            with self._lock:
                if self._seq < hi:
                    built = self._build()
                    if built is None:
                        hi = self._seq
            if built is not None:
                self._send(built[0], built[1], durable=True)
        return hi

    def _no_route(self) -> bool:
        """No aggregator to send to now (none resolved, or the transport's world ended): a
        flush then waits for the background thread's lookup instead of looking up itself."""
        if self._transport.ready():
            return False
        self._wake.set()
        return True

    def _unreachable(self, done: bool, lo: int, hi: int, rid: int | None) -> FlushResult:
        if not done and not self._transport.ready() and self._transport.lookup_error:
            self.last_error = self._transport.lookup_error
        return self._result(done, lo, hi, rid)

    def flush_range(
        self, lo: int, hi: int, timeout_s: float | None = None, rid: int | None = None
    ) -> FlushResult:
        """Ship what is pending if batch ``hi`` is not built yet, then wait until every batch
        in ``[lo, hi]`` is acknowledged durable (other batches are not waited for). Never
        waits longer than ``timeout_s``: it never looks the aggregator up itself."""
        deadline = time.monotonic() + (timeout_s or self.config.flush_timeout_s)
        hi = self._ship_for(hi, deadline)
        while True:
            done, refs = self._flush_state(lo, hi)
            left = deadline - time.monotonic()
            if done or left <= 0 or self._transport.gone():
                return self._unreachable(done, lo, hi, rid)
            if refs:
                self._reap_refs(self._transport.wait(refs, len(refs), left))
            elif self._no_route():
                time.sleep(min(_POLL_S, left))
            else:
                pause = self._resend_after - time.monotonic()
                if pause > 0:
                    time.sleep(min(pause, left))
                self._resend(durable=True, lo=lo, hi=hi)

    async def aflush_range(
        self, lo: int, hi: int, timeout_s: float | None = None, rid: int | None = None
    ) -> FlushResult:
        """:meth:`flush_range` for asyncio: awaits the calls' object refs, no thread per call."""
        deadline = time.monotonic() + (timeout_s or self.config.flush_timeout_s)
        if self._seq < hi:
            await asyncio.sleep(0)  # let coroutines about to flush record first: one batch
            await self._afollow(hi, deadline)
            hi = self._ship_for(hi)
        while True:
            done, refs = self._flush_state(lo, hi)
            left = deadline - time.monotonic()
            if done or left <= 0 or self._transport.gone():
                return self._unreachable(done, lo, hi, rid)
            if refs:
                futs = {asyncio.ensure_future(self._transport.aoutcome(r)): r for r in refs}
                finished, _ = await asyncio.wait(futs, timeout=left)
                for f in finished:
                    self._complete(futs[f], f.exception() or f.result())
            elif self._no_route():
                await asyncio.sleep(min(_POLL_S, left))
            else:
                pause = self._resend_after - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(min(pause, left))
                self._resend(durable=True, lo=lo, hi=hi)

    def flush(self, timeout_s: float | None = None) -> FlushResult:
        """Ship everything and wait until the actor acknowledged all of it as durable."""
        with self._lock:
            self._drain()
            hi = self._seq + 1 if self._pending else self._seq
        return self.flush_range(1, hi, timeout_s)

    def rollout_range(self, ctx: _Ctx) -> tuple[int, int]:
        """The batches ``[lo, hi]`` holding a rollout's leaves, once the tape is drained. A
        rollout no longer in the table (all durable, or dropped from a full one) gets every
        batch since it began; one begun before a fork, in the forked child: from the child's
        first batch."""
        with self._lock:
            self._drain()
            lo = ctx[2] if ctx[3] == self._gen else 1
            hi = self._his.get(ctx[1])
            if hi is None:
                hi = self._seq + 1 if self._pending else self._seq
            return lo, hi

    def stats(self) -> dict[str, Any]:
        """Client counters (batches, resends, failures, retained, in flight)."""
        with self._lock:
            return {
                "producer_id": self.producer_id,
                "incarnation": self.incarnation,
                **self.counters,
                "retained": len(self._retained),
                "in_flight": len(self._inflight),
                "pending_leaves": self._pending_leaves + len(self._tape) // _ENTRY,
                "last_error": self.last_error,
            }

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is pending and stop the background thread, within ``timeout_s`` in all
        (no lookup runs inside it). Never starts Ray: after ``ray.shutdown()`` there is
        nothing to ship to, and the unsent leaves are counted in a warning.

        Registered with ``atexit``; call it (or :func:`close_clients`) on a driver before
        ``ray.shutdown()`` to stop a driver-side client explicitly."""
        with self._lock:
            if self._closing or self._stop.is_set():
                return
            self._closing = True
        try:
            if self._pid != os.getpid():
                return
            unsent = self._pending or self._tape or self._retained
            if self._transport.gone() or not self._connected():
                if unsent:
                    log.warning("art_ray_metrics: closing without Ray; unsent leaves are lost")
                return
            if unsent:
                self.flush(timeout_s)
            self._confirm()
        except Exception as exc:  # interpreter shutdown: never raise from atexit
            log.debug("art_ray_metrics: close failed: %s", exc)
        finally:
            self._stop.set()
            self._wake.set()

    def _connected(self) -> bool:
        """The transport can carry calls in this process (for Ray: Ray is initialized)."""
        if isinstance(self._transport, RayTransport):
            ray = sys.modules.get("ray")  # at exit it may be half imported by another thread
            try:
                return ray is not None and bool(ray.is_initialized())
            except Exception:
                return False
        return True


def _forget_after_fork() -> None:
    for client in list(_ALL_CLIENTS):
        client._after_fork()


os.register_at_fork(after_in_child=_forget_after_fork)


_POLL_S = 0.02
"""How often a flush with no aggregator resolved checks whether the background thread found
one (it never looks up itself)."""


_CLIENTS: dict[tuple[str, str, str | None], MetricsClient] = {}
"""Process-wide clients by (actor name, namespace, explicit producer id or None)."""
_CLIENTS_LOCK = threading.Lock()


_ROUTES: dict[tuple[str, str], Callable[[], Transport]] = {}
"""Transports for aggregators that are not Ray actors, by (name, namespace): an
:class:`~art_ray_metrics.testing.InProcessAggregator` installs itself here, so ``connect``
reaches it from unchanged rollout code."""


def get_client(
    config: ClientConfig | None = None, *, producer_id: str | None = None
) -> MetricsClient:
    """The process-wide client for an aggregator (created on first use)."""
    config = config or _named_config(None, None)
    if producer_id is not None:
        V.check_text("producer_id", producer_id)
    key = (config.name, config.namespace, producer_id)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None or client._stop.is_set() or client._closing:
            route = _ROUTES.get((config.name, config.namespace))
            transport = route() if route is not None else None
            client = _CLIENTS[key] = MetricsClient(
                config, producer_id=producer_id, transport=transport
            )
        return client


def set_route(name: str, namespace: str, route: Callable[[], Transport] | None) -> None:
    """Route this process's clients of aggregator ``(name, namespace)`` through transports
    made by ``route`` (None: back to Ray). Clients already made for it are stopped (without
    flushing) and forgotten, so the next ``connect`` makes one on the new route."""
    with _CLIENTS_LOCK:
        if route is None:
            _ROUTES.pop((name, namespace), None)
        else:
            _ROUTES[(name, namespace)] = route
        for key in [k for k in _CLIENTS if k[:2] == (name, namespace)]:
            old = _CLIENTS.pop(key)
            old._stop.set()
            old._wake.set()


def close_clients(timeout_s: float = 5.0) -> None:
    """Flush and close every client of this process (each within ``timeout_s``).

    A driver that recorded leaves itself calls it before ``ray.shutdown()``; the clients
    would otherwise notice Ray is gone and stop on their own (they never start Ray)."""
    with _CLIENTS_LOCK:
        clients = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client in clients:
        client.close(timeout_s)


def _reset_clients() -> None:
    """Close and forget every client of this process (tests)."""
    with _CLIENTS_LOCK:
        for client in _CLIENTS.values():
            client.close(timeout_s=1.0)
        _CLIENTS.clear()


_Ctx = tuple[tuple[int, str], int, int, int]
"""A builder's context: ``((step, scope), rollout id, lo, generation)``; its tape entries
carry the first two. Views of one rollout (``for_step``, ``for_cost_context``) share its id
and ``lo``, the first batch that can hold its leaves; ``generation`` tells a rollout begun
before a fork."""

_ROLLOUT_IDS = itertools.count(1)


def _rollouts_in(
    items: list[list[Any]], refused: set[tuple[int, str, str | None]] | None
) -> set[int]:
    """The rollouts that recorded into tape ``items`` (all of them, or those that recorded a
    ``refused`` ``(step, scope, key)``; key None: anything of that group)."""
    rids: set[int] = set()
    if refused is None:  # at C speed (a rollout that recorded nothing may be included)
        return rids.union(*(chunk[1::_ENTRY] for chunk in items))
    for chunk in items:
        it = iter(chunk)
        for sk, rid, key, value in zip(it, it, it, it, strict=True):
            if (sk[0], sk[1], key) in refused or (
                (sk[0], sk[1], None) in refused and (key is not None or value is not None)
            ):
                rids.add(rid)
    return rids


_ITEMS_BUDGET = 1 << 18
"""Tape items kept for batches not answered yet (which rollout recorded what); beyond, the
oldest batches keep only their set of rollouts (so a refusal of some keys in them is charged
to all of their rollouts)."""

_MAX_LOST_DECL = 4096
"""Given-up batch groups declared in each header at most (the oldest then count as batches
only, not on their steps' rows)."""

_MAX_REPORTED = 256
"""Losses kept for the next process-wide flush's report."""

_ENTRY = 4
"""Items per tape entry: ``(step, scope), rollout id, key, value``."""

_PRUNE_HIS_AT = 4096
"""Rollouts remembered before those whose batches are all durable are forgotten."""

_MAX_HIS = 65_536
"""Rollouts remembered at most: beyond, the oldest are forgotten (their flush then waits for
every batch since they began, which is safe, only slower)."""

_MAX_REGISTRIES = 64
"""``(step, scope)`` key registries a client keeps (the oldest steps' are forgotten first)."""

_FAST = V.MAX_MAGNITUDE  # the fast paths' bound; larger values have their sums checked

# the fixed keys of add_data, add_user_timing and add_idle_times (none is a cost)
_NUM_SCENARIOS = V.validate_key("data/step_num_scenarios")
_ACTOR_TOKENS = V.validate_key("data/step_actor_tokens")
_WALL_S = V.validate_key("time/step_wall_s")
_ACTOR_S = V.validate_key("time/step_actor_s")
_EVAL_S = V.validate_key("time/step_eval_s")
_TRAINER_IDLE = V.validate_key("throughput/step_trainer_idle_s")
_ACTOR_IDLE = V.validate_key("throughput/step_actor_idle_s")


_DATA_KEYS = (_NUM_SCENARIOS, _ACTOR_TOKENS)
_TIMING_KEYS = (_WALL_S, _ACTOR_S, _EVAL_S)
_IDLE_KEYS = (_TRAINER_IDLE, _ACTOR_IDLE)


class WorkerBuilder(LeafRecorder):
    """ART's ``MetricsBuilder`` methods bound to one step and cost context, recording into
    the process-wide client. ``flush()`` blocks until this builder's leaves are durable;
    ``aflush()`` awaits it on the event loop.

    The hot path takes no lock: a valid leaf whose key is already registered for the step
    is one ``extend`` of the client's tape (see :class:`MetricsClient`)."""

    # one per rollout: no instance dict; __weakref__ keeps the builder weak-referenceable
    __slots__ = (
        "__weakref__",
        "_cap",
        "_ctx",
        "_known",
        "_rid",
        "_sk",
        "_tape",
        "client",
        "cost_context",
        "scope",
        "step",
    )

    def __init__(
        self,
        client: MetricsClient,
        step: int,
        cost_context: str,
        scope: str,
        _rollout: tuple[int, int, int] | None = None,
    ) -> None:
        self._bind(
            client,
            V.check_step(step),
            V.check_cost_context(cost_context),
            V.check_text("scope", scope),
            _rollout,
        )

    def _bind(
        self,
        client: MetricsClient,
        step: int,
        cost_context: str,
        scope: str,
        rollout: tuple[int, int, int] | None,
    ) -> None:
        """Set up from arguments already checked (``connect`` caches what it checked)."""
        self.client = client
        self.step = step
        self.cost_context = cost_context
        self.scope = scope
        slot_key = (step, scope)
        sk, reg = client._keys.get(slot_key) or client._slot_entry(slot_key)
        if rollout is None:
            rid = next(_ROLLOUT_IDS)
            self._ctx = (sk, rid, client._seq + 1, client._gen)
        else:
            rid = rollout[0]
            self._ctx = (sk, rid, rollout[1], rollout[2])
        # copies of what _ctx and the client hold, so the hot path reads one attribute each
        self._sk = sk
        self._rid = rid
        self._known = reg.slots
        self._cap = client._tape_cap
        self._tape = tape = client._tape
        tape.extend((sk, rid, None, None))  # the next batch reports this producer for the step
        if len(tape) >= self._cap:
            client.ship()

    @property
    def _rollout(self) -> tuple[int, int, int]:
        """This builder's rollout (id, lo, generation), shared with its views."""
        return self._ctx[1:]

    # -- the hot path: validation inlined, then one atomic extend of the tape --------------

    def add_metric(self, key: str, value: float) -> None:
        """Add ``value`` to leaf ``key`` of this step (repeated writes are summed)."""
        kind = type(value)
        if (
            (kind is float or kind is int)
            and type(key) is str
            and self._known.get(key) is True  # registered for the step, so valid
            and -_FAST < value < _FAST  # finite, and no realistic sum can pass the bound
            and (value >= 0 or not key.startswith("costs/"))
        ):
            tape = self._tape
            tape.extend((self._sk, self._rid, key, value))
            if len(tape) >= self._cap:
                self.client.ship()
        else:
            super().add_metric(key, value)  # validates, raising with the key and value

    def add_cost(self, path: str, usd: float) -> None:
        """Record ``usd`` dollars under ``costs/<path>``, e.g. ``train/llm_judge/correctness``."""
        key = _COST_KEYS.get(path) if type(path) is str else None
        if (
            key is not None
            and type(usd) is float
            and 0 <= usd < _FAST
            and self._known.get(key) is True
        ):
            tape = self._tape
            tape.extend((self._sk, self._rid, key, usd))
            if len(tape) >= self._cap:
                self.client.ship()
        else:
            super().add_cost(path, usd)

    def _put_fixed(self, keys: tuple[str, ...], values: tuple[object, ...]) -> bool:
        """Record each given value under its fixed key if all are plain ``int``/``float``
        inside the fast bound (known keys onto the tape, a new one registered first). Returns
        False, having recorded nothing, if one needs the general checks."""
        for value in values:
            if value is not None:
                kind = type(value)
                if not ((kind is float or kind is int) and -_FAST < value < _FAST):  # type: ignore[operator]
                    return False
        known = self._known
        tape = self._tape
        sk = self._sk
        rid = self._rid
        for i, value in enumerate(values):  # not zip(strict=True): that doubles the cost
            if value is not None:
                key = keys[i]
                if known.get(key) is True:
                    tape.extend((sk, rid, key, value))
                else:
                    self.client.record_into(self._ctx, key, value)  # type: ignore[arg-type]
        if len(tape) >= self._cap:
            self.client.ship()
        return True

    def add_data(
        self,
        step_num_scenarios: int | None = None,
        step_actor_tokens: int | None = None,
        scenario_ids: Iterable[Any] | None = None,
        *,
        step_rollout_tokens: int | None = None,
    ) -> None:
        """Record scenario and token counts and the step's scenario ids (deduplicated run-wide)."""
        step_actor_tokens = _alias(
            "step_actor_tokens", step_actor_tokens, "step_rollout_tokens", step_rollout_tokens
        )
        # ids are digested before anything is recorded (a bad one raises); they are added
        # after the counts, as on the general path
        # (once: scenario_ids may be an iterator)
        digests = _scenario_digests(scenario_ids) if scenario_ids is not None else None
        if not self._put_fixed(_DATA_KEYS, (step_num_scenarios, step_actor_tokens)):
            super().add_data(step_num_scenarios, step_actor_tokens)  # checks; may raise
            if digests:
                self._record_scenarios(digests)
        elif digests:
            self.client.record_scenarios(self._ctx, digests)

    def add_user_timing(
        self,
        step_wall_s: float | None = None,
        step_actor_s: float | None = None,
        step_eval_s: float | None = None,
        *,
        step_rollout_s: float | None = None,
    ) -> None:
        """Record step timings in seconds under ``time/step_*``."""
        step_actor_s = _alias("step_actor_s", step_actor_s, "step_rollout_s", step_rollout_s)
        if not self._put_fixed(_TIMING_KEYS, (step_wall_s, step_actor_s, step_eval_s)):
            super().add_user_timing(step_wall_s, step_actor_s, step_eval_s)

    def add_idle_times(
        self,
        step_trainer_idle_s: float | None = None,
        step_actor_idle_s: float | None = None,
        *,
        step_rollout_idle_s: float | None = None,
    ) -> None:
        """Record idle seconds under ``throughput/step_*_idle_s``."""
        step_actor_idle_s = _alias(
            "step_actor_idle_s", step_actor_idle_s, "step_rollout_idle_s", step_rollout_idle_s
        )
        if not self._put_fixed(_IDLE_KEYS, (step_trainer_idle_s, step_actor_idle_s)):
            super().add_idle_times(step_trainer_idle_s, step_actor_idle_s)

    def _record(self, key: str, value: Number) -> None:
        if -V.MAX_MAGNITUDE < value < V.MAX_MAGNITUDE:
            self.client.record_into(self._ctx, key, value)
        else:  # refuse a value whose pending sum would overflow, before it is accepted
            self.client.record_big(self._ctx, key, value)

    def _record_scenarios(self, digests: list[bytes]) -> None:
        self.client.record_scenarios(self._ctx, digests)

    def _record_keyed_cost(self, key: str, value: Decimal, response_id: str) -> None:
        self.client.record_keyed_cost(self._ctx, key, value, response_id)

    def _record_sample(self, key: str, value: float) -> None:
        self.client.record_sample(self._ctx, key, value)

    def _pricing(self) -> PricingRegistry:
        return self.client.pricing

    def _admission(self) -> Admission | None:
        """The process's admission under the run budget (``None``: no budget)."""
        return self.client.budget.active()

    def for_cost_context(
        self, cost_context: str, *, buffer_scope: str | None = None
    ) -> WorkerBuilder:
        """The same step under another cost context (and scope); flushed with this builder.
        The scope is the one a barrier closes (``val``/``test`` are ``eval``)."""
        context = V.check_cost_context(cost_context)
        scope = K.scope_for_cost_context(buffer_scope or context)
        return WorkerBuilder(self.client, self.step, context, scope, self._rollout)

    def for_step(self, step: int) -> WorkerBuilder:
        """The same cost context for another step; flushed with this builder."""
        return WorkerBuilder(self.client, step, self.cost_context, self.scope, self._rollout)

    def flush(self, timeout_s: float | None = None) -> FlushResult:
        """Ship this builder's leaves and wait until the aggregator holds them durably (other
        rollouts' batches are not waited for). Never raises on telemetry failure."""
        lo, hi = self.client.rollout_range(self._ctx)
        result = self.client.flush_range(lo, hi, timeout_s, self._ctx[1])
        if not result.ok:
            log.warning("art_ray_metrics: flush not confirmed durable: %s", result)
        return result

    async def aflush(self, timeout_s: float | None = None) -> FlushResult:
        """``flush`` for asyncio code: awaits the acknowledgements on the event loop."""
        lo, hi = self.client.rollout_range(self._ctx)
        result = await self.client.aflush_range(lo, hi, timeout_s, self._ctx[1])
        if not result.ok:
            log.warning("art_ray_metrics: flush not confirmed durable: %s", result)
        return result


def connect(
    step: int,
    cost_context: str = "train",
    *,
    split: str | None = None,
    name: str | None = None,
    namespace: str | None = None,
    producer_id: str | None = None,
    config: ClientConfig | None = None,
) -> WorkerBuilder:
    """A builder for one step in a worker, recording into the named aggregator.

    ``cost_context`` is the first segment under ``costs/`` for API costs; the buffer scope is
    ``scope_for_split(split)`` when a split is given, else ``scope_for_cost_context`` of the
    cost context (the context's own name, but ``val`` and ``test`` are ``eval``: a barrier
    always closes it). The actor is looked up lazily, on the first send. The first call
    in a Ray worker process also sets the variables the driver shares with
    ``AggregatorConfig.worker_env`` (API keys) that the process lacks, in ``os.environ``.
    """
    cache_key = (cost_context, split, name, namespace, producer_id)
    cacheable = config is None
    if config is None:
        try:
            bound = _CONNECTED.get(cache_key)
        except TypeError:  # an unhashable argument: the checks below name it
            bound = None
        if (
            bound is not None
            and not bound[0]._stop.is_set()
            and type(step) is int
            and 0 <= step <= V.MAX_STEP
        ):
            builder = _new_builder(WorkerBuilder)
            builder._bind(bound[0], step, bound[1], bound[2], None)
            return builder
        config = _named_config(name, namespace)
    elif name is not None or namespace is not None:
        updates = {k: v for k, v in (("name", name), ("namespace", namespace)) if v is not None}
        config = config.model_copy(update=updates)
    scope = K.scope_for_split(V.check_split(split)) if split is not None else None
    if scope is None:
        scope = K.scope_for_cost_context(V.check_cost_context(cost_context))
    # the API keys the driver shares (worker_env), before the rollout's code needs them
    env_ready = load_worker_env(config.name, config.namespace)
    builder = WorkerBuilder(get_client(config, producer_id=producer_id), step, cost_context, scope)
    if cacheable and env_ready and len(_CONNECTED) < 4096:
        _CONNECTED[cache_key] = (builder.client, builder.cost_context, builder.scope)
    return builder


_new_builder = object.__new__  # WorkerBuilder defines no __new__: skip the class lookup

_CONNECTED: dict[tuple[Any, ...], tuple[MetricsClient, str, str]] = {}
"""What ``connect`` checked, by its arguments: the client, cost context and scope. An entry
is used while its client runs (a closed client is replaced through :func:`get_client`)."""


_NAMED_CONFIGS: dict[tuple[str | None, str | None], ClientConfig] = {}


def _named_config(name: str | None, namespace: str | None) -> ClientConfig:
    config = _NAMED_CONFIGS.get((name, namespace))
    if config is None:
        fields = {k: v for k, v in (("name", name), ("namespace", namespace)) if v is not None}
        config = _NAMED_CONFIGS[(name, namespace)] = ClientConfig(**fields)
    return config
