"""The transport stage, worker side: a per-process client that batches what builders record,
ships it over a transport (:mod:`.transport`), and tracks acknowledgements and resends.

Life of a leaf (recorded by a builder of :mod:`.record`)::

    the client's tape                             # see core/tape.py; drained under the lock
      -> PendingLeaves per slot (step, scope)     # summed exactly at ship
      -> ship(): LeafBatch(producer_id, incarnation, seq)   # on size, on time, on flush()
      -> transport.send(bytes, durable)           # a flush's call waits for the log write
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
- **Conflicts raise at the call.** A key is registered for its slot the first time it is
  recorded (under the lock, :class:`~art_ray_metrics.core.tape.KeyRegistries`); a leaf that is
  an ancestor or a descendant of one already recorded for the slot by this process raises
  :class:`MetricConflictError`, even across batches (while the slot's registry is kept).
- **Flush means durable, for its own leaves.** A builder's ``flush()`` returns once the batches
  holding its leaves are durable (write-ahead log or checkpoint); it does not wait for other
  rollouts' batches. It never raises on telemetry failure: it returns a :class:`FlushResult`.

Why one module over 500 lines: :class:`MetricsClient` is one state machine under one lock
(the sequence, the retained batches, the calls in flight and the rollouts' batch ranges change
together in every ship, answer, give-up and resend, and each flush reads them together), so its
methods stay together here rather than in mixins that would spread the lock's invariants over
files. What holds none of that state lives elsewhere: the tape, key registries and loss ledger
in :mod:`art_ray_metrics.core.tape`; the pure decisions the client applies under its lock (a
batch's groups, what an acknowledgement settles, a flush's answer) and :class:`FlushResult` in
:mod:`.batches`; the process's table of clients (``get_client``, ``close_clients``) in
:mod:`.clients`; the builder in :mod:`.record`; the transports and their calls' futures in
:mod:`.transport`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.backoff import RESEND
from art_ray_metrics.core.records import KeyedCost, LeafBatch
from art_ray_metrics.core.replies import IngestAck
from art_ray_metrics.core.rollup import exact_sum
from art_ray_metrics.core.tape import (
    ENTRY,
    ROLLOUT_IDS,
    KeyRegistries,
    Number,
    PendingLeaves,
    RolloutCtx,
    RolloutLedger,
    Slot,
    drain_tape,
)
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.distributed.batches import (
    FlushResult,
    default_producer_id,
    flush_result,
    lost_declarations,
    new_incarnation,
    range_durable,
    refused_keys,
    settled_seqs,
    shipped_big,
    step_groups,
)
from art_ray_metrics.distributed.budget import ClientBudget
from art_ray_metrics.distributed.transport import (
    JITTER,
    RayTransport,
    Transport,
    await_outcome,
    chain_future,
    future_outcome,
    one_line,
    wait_futures,
)
from art_ray_metrics.errors import WireFormatError
from art_ray_metrics.spend.pricing import PricingRegistry

__all__ = ["MAX_GROUPS", "MetricsClient"]

log = logging.getLogger(__name__)


_ALL_CLIENTS: weakref.WeakSet[MetricsClient] = weakref.WeakSet()


class MetricsClient:
    """One per process, aggregator and producer id: buffers leaves and ships them as batches.

    What builders (:mod:`.record`) use: :meth:`open_rollout`, :attr:`tape`, :attr:`tape_cap`
    and :attr:`stopped`; the slow paths ``record_*``; :meth:`ship`, :meth:`rollout_range`,
    :meth:`flush_range` and :meth:`aflush_range`; :attr:`pricing`. Everything else is the
    client's own state, guarded by its lock."""

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
        self.producer_id = V.check_text("producer_id", producer_id or default_producer_id())
        self._transport: Transport = transport or RayTransport(
            self.config.name, self.config.namespace, actor
        )
        self.tape: list[Any] = []
        """The tape (see :mod:`~art_ray_metrics.core.tape`): one list for the process's life,
        which builders extend without the lock."""
        self._start()
        self.pricing = PricingRegistry()
        _ALL_CLIENTS.add(self)
        atexit.register(self.close)

    def _start(self) -> None:
        """Fresh per-process state: a new incarnation, sequence and background thread."""
        self.incarnation = new_incarnation()
        self.budget = ClientBudget(
            self._transport,
            self.producer_id,
            self.incarnation,
            lease_calls=self.config.budget_lease_calls,
            wait_s=self.config.budget_wait_s,
            default_max_tokens=self.config.default_max_tokens,
            # a config pickled by a build without the field has none: its default
            first_wait_s=getattr(self.config, "budget_first_wait_s", 5.0),
        )
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self.tape.clear()  # in a forked child: the parent ships what it recorded
        self._gen = getattr(self, "_gen", 0) + 1  # rollouts begun before a fork are older
        self._his: dict[int, int] = {}  # rollout id -> seq of the batch with its last leaves
        self._groups: dict[int, bytes] = {}  # rollout id -> group digest (set_group)
        self._prune_his_at = _PRUNE_HIS_AT
        self._keys = KeyRegistries()  # see open_rollout and _register
        self._pending: dict[Slot, PendingLeaves] = {}
        self._pending_leaves = 0
        self._max_batch_leaves = self.config.max_batch_leaves
        self.tape_cap = self._max_batch_leaves * ENTRY
        """Tape items that make a full batch: a builder that reaches it calls :meth:`ship`."""
        self._seq = 0
        self._retained: dict[int, bytes] = {}
        # call -> (seq, durable); a call is in here from before its send starts (see _send)
        self._inflight: dict[concurrent.futures.Future[Any], tuple[int, bool]] = {}
        self._foreign: dict[Any, concurrent.futures.Future[Any]] = {}  # see _adopt
        self._ledger = RolloutLedger(_MAX_HIS)  # which rollouts each batch carries; losses
        self._lost_decl: list[tuple[int, int, str, int]] = []  # given up, not yet declared
        self._carried: dict[int, int] = {}  # seq -> the newest given-up seq its header declares
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
        self.stopped = threading.Event()
        """Set once the client stops (closed, replaced, or its transport's world ended)."""
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

    # -- recording: the surface a builder uses (see distributed/record.py) -----------------
    #
    # Builders put leaves on :attr:`tape` without the lock (see core/tape.py). ``_drain``
    # moves the tape into ``_pending`` under the lock and notes in ``_his`` which batch carries
    # each rollout's last leaves. Only keys already registered for the slot take the tape
    # directly: a new key is checked for leaf/ancestor conflicts under the lock first
    # (``_register``), so every conflict still raises at the call that made it.

    def _slot(self, slot: Slot) -> PendingLeaves:
        pending = self._pending.get(slot)
        if pending is None:
            pending = self._pending[slot] = PendingLeaves()
        return pending

    def open_rollout(
        self, slot: Slot, rollout: tuple[int, int, int] | None = None
    ) -> tuple[RolloutCtx, dict[str, Any]]:
        """A builder's context for ``slot``: of a new rollout, or of a view of ``rollout``
        (its id, lo and generation); and the slot's registered keys (a key maps to ``True``
        once registered; read without the lock, kept across ships for the latest steps)."""
        entry = self._keys.entries.get(slot)
        if entry is None:
            with self._lock:
                entry = self._keys.entry(slot)
        shared, registry = entry
        if rollout is None:
            return (shared, next(ROLLOUT_IDS), self._seq + 1, self._gen), registry.leaves
        return (shared, rollout[0], rollout[1], rollout[2]), registry.leaves

    def _register(self, slot: Slot, key: str) -> None:
        """Make ``key`` a known leaf of ``slot`` (under the lock).

        Raises:
            MetricConflictError: ``key`` is an ancestor or a descendant of a leaf recorded for
                the step (in this process), or a sampled key; nothing is changed.
        """
        self._keys.register(slot, key)

    def set_group(self, ctx: RolloutCtx, group: bytes, *, explicit: bool = True) -> None:
        """Tag the rollout of ``ctx`` with a group digest: its cost leaves recorded from now
        on count as that group's spend (the outcomes); those recorded before keep the group
        they had. A default (``explicit`` False: the rollout's scenario id) never replaces a
        group already set; a named one replaces a default. The newest :data:`MAX_GROUPS`
        rollouts are remembered.

        The tape is drained first, under the lock: a leaf still on it was recorded before
        this call, and whether a background ship had drained it already must not decide
        its group (a drain tags with the group the rollout has at the time)."""
        rid = ctx[1]
        if not explicit and rid in self._groups:  # the common repeat: no lock
            return
        with self._lock:
            if not explicit and rid in self._groups:
                return
            self._drain()
            self._groups[rid] = group
            if len(self._groups) > MAX_GROUPS:
                for old in list(self._groups)[: MAX_GROUPS // 2]:
                    del self._groups[old]

    def _drain(self) -> None:
        """Move the tape into ``_pending`` (under the lock). Each drained rollout learns the
        seq of the batch that will carry its leaves: the next one."""
        tape = self.tape
        n = len(tape)
        if not n:
            return
        items = tape[:n]
        del tape[:n]  # entries added meanwhile stay for the next drain
        self._ledger.note_drain(items)  # which rollout recorded what
        his = self._his
        self._pending_leaves += drain_tape(items, self._pending, his, self._seq + 1, self._groups)
        if len(his) > self._prune_his_at:  # forget rollouts whose batches are all durable
            upto = self._acked_upto()
            his = {r: h for r, h in his.items() if h > upto}
            if len(his) > _MAX_HIS:  # nothing durable for long (actor unreachable): the oldest
                his = {r: his[r] for r in sorted(his)[-(_MAX_HIS // 2) :]}
            self._his = his
            self._prune_his_at = min(_MAX_HIS, max(_PRUNE_HIS_AT, 2 * len(his)))

    def _pending_now(self) -> dict[Slot, PendingLeaves]:
        """What the next batch would carry, by slot (tests and diagnostics)."""
        with self._lock:
            self._drain()
            return self._pending

    def record(self, step: int, scope: str, key: str, value: Number) -> int:
        """Add a validated leaf for ``(step, scope)``; return the seq of the batch that will
        carry it (or a later one).

        Raises:
            MetricConflictError: ``key`` conflicts with a leaf recorded for the step.
        """
        self.record_into(((step, scope), next(ROLLOUT_IDS), self._seq + 1, self._gen), key, value)
        return self._seq + 1

    def record_into(self, ctx: RolloutCtx, key: str, value: Number) -> None:
        """The slow path of a validated leaf (its key is new for the step): register the key,
        then put the leaf on the tape; ship when a batch is full."""
        with self._lock:
            self._register(ctx[0], key)
            self.tape.extend((ctx[0], ctx[1], key, value))
        if len(self.tape) >= self.tape_cap:
            self.ship()

    def record_big(self, ctx: RolloutCtx, key: str, value: Number) -> None:
        """:meth:`record_into` for a value of magnitude >= ``MAX_MAGNITUDE``: refuses it when
        the key's pending sum would leave float range (the aggregator could not hold it)."""
        step, scope = slot = ctx[0]
        with self._lock:
            self._register(slot, key)
            self._drain()
            pending = self._pending.get(slot)
            held = pending.leaves.get(key) if pending is not None else None
            values = held if held.__class__ is list else [] if held is None else [held]
            shipped = self._big.get((step, scope, key), Decimal(0))
            V.check_sum(key, exact_sum([*values, value, shipped]))
            self.tape.extend((ctx[0], ctx[1], key, value))
            self._big.setdefault((step, scope, key), Decimal(0))

    def record_scenarios(self, ctx: RolloutCtx, digests: list[bytes]) -> None:
        """Add scenario digests; ship when the batch is full."""
        slot, rid = ctx[0], ctx[1]
        self.tape.extend([x for d in digests for x in (slot, rid, None, d)])
        if len(self.tape) >= self.tape_cap:
            self.ship()

    def record_sample(self, ctx: RolloutCtx, key: str, value: float) -> None:
        """Add one per-rollout value (averaged by the aggregator); ship when the batch is full.

        Raises:
            MetricConflictError: ``key`` is a leaf recorded for the step.
        """
        with self._lock:
            self._keys.register_sample(ctx[0], key)
            self._slot(ctx[0]).samples.setdefault(key, []).append(value)
            self._ledger.note_entry([ctx[0], ctx[1], key, value])
            self._his[ctx[1]] = self._seq + 1
            pending = self._pending_leaves = self._pending_leaves + 1
        if pending >= self._max_batch_leaves:
            self.ship()

    def record_keyed_cost(self, ctx: RolloutCtx, key: str, value: Decimal, rid: str) -> None:
        """Add a cost applied at most once per response id (by the aggregator)."""
        V.check_text("response_id", rid)
        with self._lock:
            pending = self._slot(ctx[0])
            group = self._groups.get(ctx[1]) if self._groups else None
            if group is not None:
                pending.keyed_groups[len(pending.keyed)] = group
            pending.keyed.append(KeyedCost(key, value, rid))
            self._ledger.note_entry([ctx[0], ctx[1], key, value])
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
        groups = step_groups(self._pending)
        if self._big:  # keys that got huge values: remember what was shipped (rare)
            self._big.update(shipped_big(self._big, groups))
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
        drained = self._ledger.take_drained()
        try:
            data = encode_batch(batch)
        except Exception as exc:  # validation should make this impossible: report, never wedge
            self._not_encodable(admitted, drained, exc)
            return None
        self._pending.clear()
        self._pending_leaves = 0
        self._dropped_unreported = 0
        self._seq = seq
        self._retained[seq] = data
        self._ledger.built(seq, drained)
        if lost:
            self._carried[seq] = lost[-1][0]
        self._last_ship = time.monotonic()
        self.counters["batches"] += 1
        return seq, data

    def _not_encodable(self, admitted: Decimal, drained: list[list[Any]], exc: Exception) -> None:
        """Drop what was pending (under the lock), charged to the rollouts that recorded it:
        their flushes say not ok. The seq is not consumed."""
        self.budget.untake(admitted)
        self._pending.clear()
        self._pending_leaves = 0
        self.counters["rejected"] += 1
        reason = f"batch not encodable: {exc!r}"[:500]
        self._ledger.not_built(drained, -self.counters["rejected"], reason)
        log.error("art_ray_metrics: could not encode a batch: %r", exc)

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
            self._lost_decl.extend(lost_declarations(seq, data))
            reason = (
                f"batch {seq} dropped unacknowledged at max_retained_batches={cap} (the "
                f"aggregator was unreachable): last error {self.last_error}"
            )[:2000]
            self._ledger.lose(seq, reason, None)
        if len(self._lost_decl) > _MAX_LOST_DECL:  # the oldest stay counted as batches only
            del self._lost_decl[: len(self._lost_decl) - _MAX_LOST_DECL]
        log.error("art_ray_metrics: dropped %d unacknowledged batches (cap reached)", excess)

    def _send(self, seq: int, data: bytes, *, durable: bool) -> Any:
        """Start the call carrying batch ``seq``; return it (a future of the answer). Never
        looks the aggregator up: with none resolved yet the batch stays retained and the
        background thread sends it.

        The call is in flight from before the transport's send starts (which can take
        milliseconds on a busy process): flushes arriving meanwhile wait for it (group commit)
        instead of sending batches of their own or a copy of this one."""
        if not self._transport.ready():  # not found yet: no failure, the lookup is under way
            self._wake.set()
            return None
        call: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if seq not in self._retained:  # settled since it was picked: a copy is stale, and
                return None  # after a confirm the aggregator may no longer know it applied it
            self._inflight[call] = (seq, durable)  # and no confirm until it is answered
        try:
            self._adopt(self._transport.send(data, durable), call)
        except Exception as exc:  # Ray is gone, or the handle is broken: resend later
            with self._lock:
                self._inflight.pop(call, None)  # the waiters' _complete is then a no-op
            call.set_exception(exc)
            self._failed(exc)
            self._wake.set()
            return None
        return call

    def _wait_for_room(self) -> None:
        deadline = time.monotonic() + self.config.flush_timeout_s
        while len(self._inflight) >= self.config.max_in_flight and time.monotonic() < deadline:
            refs = list(self._inflight)
            if refs:
                self._reap_refs(self._wait_calls(refs, 1, 0.5))
            if self._transport.gone():
                return

    def reap(self, *, timeout_s: float = 0.0, block: bool = False) -> int:
        """Collect finished calls; return how many finished."""
        with self._lock:
            refs = list(self._inflight)
        if not refs:
            return 0
        ready = self._wait_calls(refs, 1 if block else len(refs), timeout_s)
        self._reap_refs(ready)
        return len(ready)

    def _reap_refs(self, ready: list[Any]) -> None:
        for ref in ready:
            self._complete(ref, future_outcome(ref))

    def _wait_calls(self, calls: list[Any], n: int, timeout_s: float) -> list[Any]:
        """The calls among ``calls`` (this client's futures) answered within ``timeout_s``, at
        least ``n`` unless timed out; in slices, so a transport whose world ended (the answer
        would never come) is noticed."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            ready = wait_futures(calls, n, min(_WAIT_SLICE_S, deadline - time.monotonic()))
            if (
                len(ready) >= min(n, len(calls))
                or time.monotonic() >= deadline
                or self._transport.gone()
            ):
                return ready

    def _adopt(self, source: Any, call: concurrent.futures.Future[Any]) -> None:
        """Complete ``call`` with the answer of the transport's call ``source``: chained when
        it is a future; else through the transport's ``wait`` and ``outcome`` (at once if it
        finished, or by the background thread)."""
        if isinstance(source, concurrent.futures.Future):
            chain_future(source, call)
            return
        if self._transport.wait([source], 1, 0.0):
            call.set_result(self._transport.outcome(source))  # an ack, or the exception
            return
        with self._lock:
            self._foreign[source] = call

    def _reap_foreign(self) -> None:
        """Answers of transport calls that are not futures (see :meth:`_adopt`)."""
        with self._lock:
            sources = list(self._foreign)
        for source in self._transport.wait(sources, len(sources), 0.0):
            with self._lock:
                call = self._foreign.pop(source, None)
            if call is not None:
                call.set_result(self._transport.outcome(source))

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
                    self._ledger.lose(seq, reason, None)
            self.counters["rejected"] += 1
            self.last_error = reason
            log.error("art_ray_metrics: %s", self.last_error)
        elif isinstance(outcome, BaseException):
            self._failed(outcome)
        else:
            self._acked(seq, outcome)
            if asked_durable and seq in self._retained:
                self._failed(RuntimeError("the aggregator could not make the batch durable yet"))

    def _acked(self, seq: int, reply: IngestAck | dict[str, Any]) -> None:
        ack = IngestAck.from_reply(reply)  # a map: an aggregator of an earlier version
        upto = ack.durable_upto
        refused = ack.refused
        with self._lock:
            keys = refused_keys(refused)
            fresh = self._ledger.newly_refused(seq, keys) if keys else keys
            if fresh:
                # some keys were refused (the rest applied): charge their rollouts, once per key
                reason = "; ".join(str(r[3]) for r in refused or ())[:2000]
                self._ledger.lose(seq, f"batch {seq}: {reason}", fresh)
                self.counters["rejected"] += 1
                self.last_error = reason
                log.error("art_ray_metrics: batch %s: %s", seq, reason[:500])
            settled = settled_seqs(self._retained, seq, ack.durable, upto)
            for s in settled:
                del self._retained[s]
            if seq in self._retained:
                # applied, not durable yet: only a give-up at the cap can still lose it, and
                # that is charged per batch; the set of its rollouts is enough from here
                self._ledger.applied(seq)
            for s in settled:
                self._ledger.settle(s)
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
            busy = {s for s, _ in self._inflight.values()}
            return [
                (s, d)
                for s, d in sorted(self._retained.items())
                if s not in busy and s >= lo and (hi is None or s <= hi)
            ]

    def _resend(self, *, durable: bool = False, lo: int = 1, hi: int | None = None) -> None:
        for seq, data in self._resendable(lo, hi):
            self.counters["resends"] += 1
            self._send(seq, data, durable=durable)

    def _confirm(self) -> None:
        """Tell the actor every batch up to here is acknowledged, so it can drop our window."""
        with self._lock:
            if self._pending or self.tape or self._inflight:
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
        while not self.stopped.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            if self.stopped.is_set():
                return
            try:
                if self._transport.gone():  # e.g. ray.shutdown(): never start it again
                    self._stop_quietly()
                    return
                self._lookup()
                if self._foreign:
                    self._reap_foreign()
                self.budget.tick()
                if self._inflight:
                    self.reap()
                now = time.monotonic()
                waiting = self._pending or self.tape
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
        self.stopped.set()
        with self._lock:
            self._inflight.clear()
            self._foreign.clear()
            unsent = len(self._retained) + len(self._pending) + len(self.tape)
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
        """(all of [lo, hi] durable, calls in flight for them)."""
        with self._lock:
            done = range_durable(self._seq, self._retained, lo, hi)
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
            reasons = self._ledger.losses(rid, lo, self._seq if hi is None else hi)
        return flush_result(done, self._seq, left, reasons, self.last_error)

    def _durable_ahead(self) -> list[Any]:
        """The durable calls of this process in flight (flushes' batches and resends)."""
        with self._lock:
            return [call for call, (_, durable) in self._inflight.items() if durable]

    def _ship_for(self, hi: int) -> int:
        """Build batch ``hi`` if nobody did yet and send it durable. Not held back by
        ``max_in_flight``: each such call has a caller waiting on it, which bounds them.

        Returns ``hi``, or the last batch built when nothing is left to build batch ``hi``
        from: the caller's leaves are then in earlier batches (or were never this process's
        to ship: recorded before a fork, or dropped by an encoding failure, which the flush
        reports)."""
        built = None
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

    def _flush_steps(
        self, lo: int, hi: int, timeout_s: float | None, rid: int | None, answer: list[FlushResult]
    ) -> Iterator[_FlushWait]:
        """The one flush loop, driven by :meth:`flush_range` (blocking) and
        :meth:`aflush_range` (on an event loop). It yields what to wait for: ``None`` (let
        coroutines about to flush record first, so they share one batch; nothing to do when
        blocking), a pause in seconds, or ``(calls, n, timeout)``: until ``n`` of the calls
        finish (the driver accounts for them with :meth:`_complete`). Appends the flush's
        answer to ``answer`` when it ends.

        Ships what is pending if batch ``hi`` is not built yet, then waits until every batch
        in ``[lo, hi]`` is acknowledged durable (other batches are not waited for). Never
        waits longer than ``timeout_s``: it never looks the aggregator up itself.

        Group commit across the flushes of this process: while a durable call is in flight,
        a flush whose batch is not built yet first waits (within its time) for one such call
        to finish instead of sending a call of its own. Whoever is first to build then ships
        every leaf recorded meanwhile in one batch, so concurrent flushes cost about one
        actor call per round trip, whatever the thread count."""
        deadline = time.monotonic() + (timeout_s or self.config.flush_timeout_s)
        if self._seq < hi:
            yield None
            ahead = self._durable_ahead()
            left = deadline - time.monotonic()
            if ahead and left > 0 and self._seq < hi:
                yield ahead, 1, left
            hi = self._ship_for(hi)
        while True:
            done, refs = self._flush_state(lo, hi)
            left = deadline - time.monotonic()
            if done or left <= 0 or self._transport.gone():
                answer.append(self._unreachable(done, lo, hi, rid))
                return
            if refs:
                yield refs, len(refs), left
            elif self._no_route():
                yield min(_POLL_S, left)
            else:
                pause = self._resend_after - time.monotonic()
                if pause > 0:
                    yield min(pause, left)
                self._resend(durable=True, lo=lo, hi=hi)

    def flush_range(
        self, lo: int, hi: int, timeout_s: float | None = None, rid: int | None = None
    ) -> FlushResult:
        """Wait, blocking, until the batches ``[lo, hi]`` holding a rollout's leaves (``rid``;
        None: this process's) are durable: see :meth:`_flush_steps`."""
        answer: list[FlushResult] = []
        for wait in self._flush_steps(lo, hi, timeout_s, rid, answer):
            if isinstance(wait, tuple):
                calls, n, timeout = wait
                self._reap_refs(self._wait_calls(calls, n, timeout))
            elif wait is not None:
                time.sleep(wait)
        return answer[0]

    async def aflush_range(
        self, lo: int, hi: int, timeout_s: float | None = None, rid: int | None = None
    ) -> FlushResult:
        """:meth:`flush_range` for asyncio: awaits the calls' object refs, no thread per call."""
        answer: list[FlushResult] = []
        for wait in self._flush_steps(lo, hi, timeout_s, rid, answer):
            if isinstance(wait, tuple):
                calls, n, timeout = wait
                futs = {asyncio.ensure_future(await_outcome(c)): c for c in calls}
                until = asyncio.FIRST_COMPLETED if n < len(calls) else asyncio.ALL_COMPLETED
                finished, _ = await asyncio.wait(futs, timeout=timeout, return_when=until)
                for f in finished:
                    self._complete(futs[f], f.exception() or f.result())
            else:
                await asyncio.sleep(wait or 0)
        return answer[0]

    def flush(self, timeout_s: float | None = None) -> FlushResult:
        """Ship everything and wait until the actor acknowledged all of it as durable."""
        with self._lock:
            self._drain()
            hi = self._seq + 1 if self._pending else self._seq
        return self.flush_range(1, hi, timeout_s)

    def rollout_range(self, ctx: RolloutCtx) -> tuple[int, int]:
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
                "pending_leaves": self._pending_leaves + len(self.tape) // ENTRY,
                "last_error": self.last_error,
            }

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is pending and stop the background thread, within ``timeout_s`` in all
        (no lookup runs inside it). Never starts Ray: after ``ray.shutdown()`` there is
        nothing to ship to, and the unsent leaves are counted in a warning.

        Registered with ``atexit``; call it (or :func:`~.clients.close_clients`) on a driver
        before ``ray.shutdown()`` to stop a driver-side client explicitly."""
        with self._lock:
            if self._closing or self.stopped.is_set():
                return
            self._closing = True
        try:
            if self._pid != os.getpid():
                return
            unsent = self._pending or self.tape or self._retained
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
            self.stopped.set()
            self._wake.set()

    @property
    def usable(self) -> bool:
        """Neither stopped nor closing: :func:`~.clients.get_client` may hand it out."""
        return not (self.stopped.is_set() or self._closing)

    def abandon(self) -> None:
        """Stop at once, without flushing (its aggregator's route changed:
        :func:`~.clients.set_route`)."""
        self.stopped.set()
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


_WAIT_SLICE_S = 0.5
"""A flush waits for its calls in slices this long, checking the transport is still there."""


_FlushWait = tuple[list[Any], int, float] | float | None
"""What a flush waits for next: see :meth:`MetricsClient._flush_steps`."""


_MAX_LOST_DECL = 4096
"""Given-up batch groups declared in each header at most (the oldest then count as batches
only, not on their steps' rows)."""

_PRUNE_HIS_AT = 4096
"""Rollouts remembered before those whose batches are all durable are forgotten."""

_MAX_HIS = 65_536
"""Rollouts remembered at most: beyond, the oldest are forgotten (their flush then waits for
every batch since they began, which is safe, only slower)."""


MAX_GROUPS = 65_536
"""Rollouts whose group a client remembers (:meth:`MetricsClient.set_group`); beyond, the
oldest half is forgotten (a rollout that long-lived records untagged spend: ``unknown``)."""
