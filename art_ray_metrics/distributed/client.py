"""Worker side: a per-process batching client and the step-bound builder ``connect`` returns.

Life of a leaf::

    builder.add_cost("train/judge", 0.002)       # validated here; raises before anything is sent
      -> PendingLeaves of (step, scope)           # raw values; summed exactly at ship time
      -> ship(): LeafBatch(producer_id, incarnation, seq)   # on size, on time, on flush()
      -> actor.ingest.remote(bytes, durable)      # a flush's call waits for the log write
      -> retained until the actor says durable    # resent after a failed call or actor restart

Guarantees:

- **Exactly once.** Every batch has ``(producer_id, incarnation, seq)``; the incarnation is
  chosen when the client starts (a restarted, retried or forked producer gets a new one), and
  the actor applies each batch once, so the client can resend freely.
- **Bounded memory.** Raw values wait at most until the next ship (``max_batch_leaves`` of
  them); batches carry one exact sum per distinct key. Background calls in flight are capped,
  retained batches are capped (beyond the cap the oldest is dropped *and counted* on the next
  row: only when the actor has been unreachable for that long).
- **No lost errors, no wedge.** Every call's result is reaped; failures are counted, logged once
  per kind, and resent under the same seq with jittered backoff. A batch the actor refuses is
  dropped, reported by the next flush and counted on the row; later batches are unaffected.
- **Flush means durable, for its own leaves.** A builder's ``flush()`` returns once the batches
  holding its leaves are durable (write-ahead log or checkpoint); it does not wait for other
  rollouts' batches. It never raises on telemetry failure: it returns a :class:`FlushResult`.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from art_ray_metrics.builder import (
    _COST_KEYS,
    LeafRecorder,
    Number,
    PendingLeaves,
    _scenario_digests,
)
from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core import keys as K
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.records import KeyedCost, LeafBatch, StepGroup
from art_ray_metrics.core.rollup import exact_sum
from art_ray_metrics.core.validate import _VALID_KEYS
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.errors import AggregatorUnavailableError, WireFormatError
from art_ray_metrics.spend.pricing import PricingRegistry

__all__ = ["FlushResult", "MetricsClient", "WorkerBuilder", "connect", "get_client"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlushResult:
    """What an explicit flush achieved."""

    ok: bool
    """Every batch holding the flushed leaves is acknowledged as durable, and no batch of this
    process was refused since the previous flush."""
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
    ) -> None:
        self.config = config or ClientConfig()
        self.producer_id = V.check_text("producer_id", producer_id or _default_producer_id())
        self._actor = actor
        self._start()
        self.pricing = PricingRegistry()
        _ALL_CLIENTS.add(self)
        atexit.register(self.close)

    def _start(self) -> None:
        """Fresh per-process state: a new incarnation, sequence and background thread."""
        self.incarnation = _new_incarnation()
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._pending: dict[tuple[int, str], PendingLeaves] = {}
        self._pending_leaves = 0
        self._max_batch_leaves = self.config.max_batch_leaves
        self._seq = 0
        self._retained: dict[int, bytes] = {}
        self._inflight: dict[Any, tuple[int, bool]] = {}  # ObjectRef -> (seq, durable)
        self._rejected: dict[int, str] = {}  # refused batches not yet reported by a flush
        self._dropped_unreported = 0
        self._confirmed = 0
        self._big: dict[tuple[int, str, str], Decimal] = {}  # shipped sums of keys with huge values
        self._last_ship = time.monotonic()
        self._resend_after = 0.0
        self._backoff = 0.1
        self.counters: dict[str, int] = {
            "batches": 0,
            "resends": 0,
            "send_failures": 0,
            "rejected": 0,
            "dropped_retained": 0,
        }
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="art-ray-metrics-client", daemon=True
        )
        self._thread.start()

    def _after_fork(self) -> None:
        """In a forked child: the parent ships what it recorded; the child starts afresh."""
        self._actor = None
        self._start()

    # -- recording (called by WorkerBuilder) ------------------------------------------------

    def _slot(self, step: int, scope: str) -> PendingLeaves:
        slot = self._pending.get((step, scope))
        if slot is None:
            slot = self._pending[(step, scope)] = PendingLeaves()
        return slot

    def record(self, step: int, scope: str, key: str, value: Number) -> int:
        """Add a validated leaf (conflicts with unshipped leaves of the step raise)."""
        return self.record_into((step, scope), key, value)

    def record_into(self, slot_key: tuple[int, str], key: str, value: Number) -> int:
        """:meth:`record` for a ``(step, scope)`` the caller keeps; ship when the batch is full.
        The worker's hot path: a repeated key is one list append. Returns the seq of the batch
        that will carry the leaf (or a later one)."""
        with self._lock:
            slot = self._pending.get(slot_key)
            if slot is None:
                slot = self._slot(*slot_key)
            held = slot.slots.get(key)
            if held.__class__ is list:
                held.append(value)
            else:
                slot.record(key, value)  # new key, second value, or a conflict (raises)
            pending = self._pending_leaves = self._pending_leaves + 1
            seq = self._seq + 1
        if pending >= self._max_batch_leaves:
            self.ship()
        return seq

    def record_many(
        self, slot_key: tuple[int, str], items: list[tuple[str, Number]], digests: list[bytes]
    ) -> int:
        """:meth:`record_into` for several validated leaves and scenario digests under one
        lock (``add_data``, ``add_user_timing``). A conflict raises at its leaf; the leaves
        before it stay recorded, as separate calls would have left them."""
        with self._lock:
            slot = self._pending.get(slot_key)
            if slot is None:
                slot = self._slot(*slot_key)
            slots = slot.slots
            for key, value in items:
                held = slots.get(key)
                if held.__class__ is list:
                    held.append(value)
                else:
                    slot.record(key, value)
            if digests:
                slot.scenarios.update(digests)
            pending = self._pending_leaves = self._pending_leaves + len(items) + len(digests)
            seq = self._seq + 1
        if pending >= self._max_batch_leaves:
            self.ship()
        return seq

    def record_big(self, step: int, scope: str, key: str, value: Number) -> int:
        """:meth:`record` for a value of magnitude >= ``MAX_MAGNITUDE``: refuses it when the
        key's pending sum would leave float range (the aggregator could not hold it)."""
        with self._lock:
            slot = self._slot(step, scope)
            held = slot.slots.get(key)
            values = held if held.__class__ is list else [] if held is None else [held]
            if held.__class__ is not str:
                shipped = self._big.get((step, scope, key), Decimal(0))
                V.check_sum(key, exact_sum([*values, value, shipped]))
            seq = self.record_into((step, scope), key, value)
            self._big.setdefault((step, scope, key), Decimal(0))
            return seq

    def record_scenarios(self, step: int, scope: str, digests: list[bytes]) -> int:
        """Add scenario digests."""
        with self._lock:
            slot = self._slot(step, scope)
            slot.scenarios.update(digests)
            self._pending_leaves += len(digests)
            return self._seq + 1

    def record_sample(self, step: int, scope: str, key: str, value: float) -> int:
        """Add one per-rollout value (averaged by the aggregator); ship when the batch is full.
        Returns the seq of the batch that will carry it."""
        with self._lock:
            self._slot(step, scope).record_sample(key, value)
            pending = self._pending_leaves = self._pending_leaves + 1
            seq = self._seq + 1
        if pending >= self._max_batch_leaves:
            self.ship()
        return seq

    def record_keyed_cost(self, step: int, scope: str, key: str, value: Decimal, rid: str) -> int:
        """Add a cost applied at most once per response id (by the aggregator)."""
        V.check_text("response_id", rid)
        with self._lock:
            slot = self._slot(step, scope)
            slot.keyed.append(KeyedCost(key, value, rid))
            self._pending_leaves += 1
            return self._seq + 1

    def touch(self, step: int, scope: str) -> int:
        """Make sure the next batch reports this producer for ``(step, scope)``; return the
        seq of that batch."""
        with self._lock:
            self._slot(step, scope)
            return self._seq + 1

    # -- shipping --------------------------------------------------------------------------

    def actor(self) -> Any:
        """The aggregator's handle, looked up once (with backoff) and cached."""
        if self._actor is None:
            self._actor = lookup_actor(
                self.config.name, self.config.namespace, self.config.lookup_timeout_s
            )
        return self._actor

    def _acked_upto(self) -> int:
        """Every seq up to this one is acknowledged durable (or given up): never resent."""
        return min(self._retained) - 1 if self._retained else self._seq

    def _build(self) -> tuple[int, bytes] | None:
        """Encode everything pending as the next batch (under the lock). The seq is consumed
        only once the bytes exist: nothing accepted can wedge the sequence."""
        if not self._pending:
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
        batch = LeafBatch(
            self.producer_id,
            seq,
            groups,
            self.incarnation,
            self._acked_upto(),
            self._dropped_unreported,
        )
        try:
            data = encode_batch(batch)
        except Exception as exc:  # validation should make this impossible: report, never wedge
            self._pending.clear()
            self._pending_leaves = 0
            self.counters["rejected"] += 1
            self._rejected[-self.counters["rejected"]] = f"batch not encodable: {exc!r}"[:500]
            log.error("art_ray_metrics: could not encode a batch: %r", exc)
            return None
        self._pending.clear()
        self._pending_leaves = 0
        self._dropped_unreported = 0
        self._seq = seq
        self._retained[seq] = data
        self._last_ship = time.monotonic()
        self.counters["batches"] += 1
        self._trim_retained()
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

    def _trim_retained(self) -> None:
        excess = len(self._retained) - self.config.max_retained_batches
        if excess > 0:
            for seq in sorted(self._retained)[:excess]:
                del self._retained[seq]
                self.counters["dropped_retained"] += 1
                self._dropped_unreported += 1
            log.error("art_ray_metrics: dropped %d unacknowledged batches (cap reached)", excess)

    def _send(self, seq: int, data: bytes, *, durable: bool) -> Any:
        try:
            ref = self.actor().ingest.remote(data, durable)
        except Exception as exc:  # lookup failed or the handle is broken: resend later
            self._failed(exc)
            return None
        with self._lock:
            self._inflight[ref] = (seq, durable)
        return ref

    def _wait_for_room(self) -> None:
        import ray

        deadline = time.monotonic() + self.config.flush_timeout_s
        while len(self._inflight) >= self.config.max_in_flight and time.monotonic() < deadline:
            refs = list(self._inflight)
            if refs:
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.5, fetch_local=True)
                self._reap_refs(ready)

    def reap(self, *, timeout_s: float = 0.0, block: bool = False) -> int:
        """Collect finished calls; return how many finished."""
        import ray

        with self._lock:
            refs = list(self._inflight)
        if not refs:
            return 0
        ready, _ = ray.wait(
            refs, num_returns=1 if block else len(refs), timeout=timeout_s, fetch_local=True
        )
        self._reap_refs(ready)
        return len(ready)

    def _reap_refs(self, ready: list[Any]) -> None:
        import ray

        for ref in ready:
            try:
                outcome: Any = ray.get(ref)
            except Exception as exc:
                outcome = exc
            self._complete(ref, outcome)

    def _complete(self, ref: Any, outcome: Any) -> None:
        """Account for one finished call (``outcome`` is its ack or its exception); idempotent."""
        with self._lock:
            entry = self._inflight.pop(ref, None)
        if entry is None:
            return
        seq, asked_durable = entry
        if isinstance(outcome, WireFormatError):  # refused for good: the actor moved past it
            with self._lock:
                self._retained.pop(seq, None)
                self._rejected[seq] = f"batch {seq} rejected: {outcome}"[:2000]
            self.counters["rejected"] += 1
            self.last_error = self._rejected[seq]
            log.error("art_ray_metrics: %s", self.last_error)
        elif isinstance(outcome, BaseException):
            self._failed(outcome)
        else:
            self._acked(seq, outcome)
            if asked_durable and seq in self._retained:
                self._failed(RuntimeError("the aggregator could not make the batch durable yet"))

    def _acked(self, seq: int, ack: dict[str, Any]) -> None:
        upto = int(ack.get("durable_upto", 0))
        with self._lock:
            if ack.get("durable"):
                self._retained.pop(seq, None)
            if upto and self._retained and min(self._retained) <= upto:
                for s in [s for s in self._retained if s <= upto]:
                    del self._retained[s]
            self._backoff = 0.1

    def _failed(self, exc: BaseException) -> None:
        self.counters["send_failures"] += 1
        text = f"{type(exc).__name__}: {exc}"
        if text != self.last_error:
            log.warning("art_ray_metrics: send failed, will resend: %s", text[:300])
        self.last_error = text
        with self._lock:  # exponential backoff with jitter: restarts are not hammered in step
            self._resend_after = time.monotonic() + self._backoff * random.uniform(0.5, 1.5)
            self._backoff = min(self._backoff * 2, 5.0)

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
            if self._pending or self._inflight:
                return
            upto = self._acked_upto()
        if upto > self._confirmed and self._actor is not None:
            self._actor.confirm.remote(self.producer_id, self.incarnation, upto)
            self._confirmed = upto

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                if self._inflight:
                    self.reap()
                now = time.monotonic()
                if self._pending and now - self._last_ship >= self.config.flush_interval_s:
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

    # -- flushing --------------------------------------------------------------------------

    def _flush_state(self, lo: int, hi: int) -> tuple[bool, list[Any]]:
        """(all of [lo, hi] durable, refs in flight for them)."""
        with self._lock:
            done = self._seq >= hi and not any(lo <= s <= hi for s in self._retained)
            refs = [r for r, (s, _) in self._inflight.items() if lo <= s <= hi]
        return done, refs

    def _result(self, done: bool) -> FlushResult:
        with self._lock:
            rejected, self._rejected = self._rejected, {}
            left = len(self._retained)
        if rejected:  # reported once, by the next flush
            return FlushResult(False, self._seq, left, "; ".join(rejected.values())[:4000])
        return FlushResult(done, self._seq, left, None if done else self.last_error)

    def _ship_for(self, hi: int) -> None:
        """Build batch ``hi`` if nobody did yet and send it durable. Not held back by
        ``max_in_flight``: each such call has a caller waiting on it, which bounds them."""
        if self._seq < hi:
            with self._lock:
                built = self._build() if self._seq < hi else None
            if built is not None:
                self._send(built[0], built[1], durable=True)

    def flush_range(self, lo: int, hi: int, timeout_s: float | None = None) -> FlushResult:
        """Ship what is pending if batch ``hi`` is not built yet, then wait until every batch
        in ``[lo, hi]`` is acknowledged durable (other batches are not waited for)."""
        import ray

        deadline = time.monotonic() + (timeout_s or self.config.flush_timeout_s)
        self._ship_for(hi)
        while True:
            done, refs = self._flush_state(lo, hi)
            left = deadline - time.monotonic()
            if done or left <= 0:
                return self._result(done)
            if refs:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=left, fetch_local=True)
                self._reap_refs(ready)
            else:
                pause = self._resend_after - time.monotonic()
                if pause > 0:
                    time.sleep(min(pause, left))
                self._resend(durable=True, lo=lo, hi=hi)

    async def aflush_range(self, lo: int, hi: int, timeout_s: float | None = None) -> FlushResult:
        """:meth:`flush_range` for asyncio: awaits the calls' object refs, no thread per call."""
        deadline = time.monotonic() + (timeout_s or self.config.flush_timeout_s)
        if self._actor is None:  # the first lookup may wait for the actor: not on the loop
            try:
                await asyncio.to_thread(self.actor)
            except Exception as exc:
                self._failed(exc)
        if self._seq < hi:
            await asyncio.sleep(0)  # let coroutines about to flush record first: one batch
            self._ship_for(hi)
        while True:
            done, refs = self._flush_state(lo, hi)
            left = deadline - time.monotonic()
            if done or left <= 0:
                return self._result(done)
            if refs:
                futs = {asyncio.ensure_future(_as_future(r)): r for r in refs}
                finished, _ = await asyncio.wait(futs, timeout=left)
                for f in finished:
                    self._complete(futs[f], f.exception() or f.result())
            else:
                pause = self._resend_after - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(min(pause, left))
                self._resend(durable=True, lo=lo, hi=hi)

    def flush(self, timeout_s: float | None = None) -> FlushResult:
        """Ship everything and wait until the actor acknowledged all of it as durable."""
        with self._lock:
            hi = self._seq + 1 if self._pending else self._seq
        return self.flush_range(1, hi, timeout_s)

    def stats(self) -> dict[str, Any]:
        """Client counters (batches, resends, failures, retained, in flight)."""
        with self._lock:
            return {
                "producer_id": self.producer_id,
                "incarnation": self.incarnation,
                **self.counters,
                "retained": len(self._retained),
                "in_flight": len(self._inflight),
                "pending_leaves": self._pending_leaves,
                "last_error": self.last_error,
            }

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is pending (bounded) and stop the background thread. Never starts Ray:
        at interpreter exit after ``ray.shutdown()`` there is nothing to ship to."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._pid != os.getpid():
            return
        try:
            ray = sys.modules.get("ray")  # at exit it may be half imported by another thread
            if ray is None or not getattr(ray, "is_initialized", lambda: False)():
                if self._pending or self._retained:
                    log.warning("art_ray_metrics: closing without Ray; unsent leaves are lost")
                return
            if self._pending or self._retained:
                self.flush(timeout_s)
            self._confirm()
        except Exception as exc:  # interpreter shutdown: never raise from atexit
            log.debug("art_ray_metrics: close failed: %s", exc)


async def _as_future(ref: Any) -> Any:
    """Await an object ref (Ray resolves it on the event loop: no thread per call)."""
    return await ref


def _forget_after_fork() -> None:
    for client in list(_ALL_CLIENTS):
        client._after_fork()


os.register_at_fork(after_in_child=_forget_after_fork)


def lookup_actor(name: str, namespace: str, timeout_s: float) -> Any:
    """``ray.get_actor`` with exponential backoff until ``timeout_s``."""
    import ray

    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError as exc:
            if time.monotonic() + delay > deadline:
                raise AggregatorUnavailableError(
                    f"No aggregator actor {name!r} in namespace {namespace!r} after {timeout_s}s; "
                    "start it on the driver with art_ray_metrics.start_aggregator()"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


_CLIENTS: dict[tuple[str, str, str | None], MetricsClient] = {}
"""Process-wide clients by (actor name, namespace, explicit producer id or None)."""
_CLIENTS_LOCK = threading.Lock()


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
        if client is None or client._stop.is_set():
            client = _CLIENTS[key] = MetricsClient(config, producer_id=producer_id)
        return client


def _reset_clients() -> None:
    """Close and forget every client of this process (tests)."""
    with _CLIENTS_LOCK:
        for client in _CLIENTS.values():
            client.close(timeout_s=1.0)
        _CLIENTS.clear()


class _Rollout:
    """The batches one rollout's leaves went into: ``[lo, hi]`` (shared by its views)."""

    __slots__ = ("hi", "lo")

    def __init__(self, seq: int) -> None:
        self.lo = self.hi = seq


_FAST = V.MAX_MAGNITUDE  # the fast paths' bound; larger values have their sums checked

# the fixed keys of add_data, add_user_timing and add_idle_times (none is a cost)
_NUM_SCENARIOS = V.validate_key("data/step_num_scenarios")
_ACTOR_TOKENS = V.validate_key("data/step_actor_tokens")
_WALL_S = V.validate_key("time/step_wall_s")
_ACTOR_S = V.validate_key("time/step_actor_s")
_EVAL_S = V.validate_key("time/step_eval_s")
_TRAINER_IDLE = V.validate_key("throughput/step_trainer_idle_s")
_ACTOR_IDLE = V.validate_key("throughput/step_actor_idle_s")


def _plain_leaves(pairs: tuple[tuple[str, object], ...]) -> list[tuple[str, Number]] | None:
    """The pairs whose value is given, if each is a plain ``int``/``float`` inside the fast
    bound; ``None`` if any needs the general checks (which raise, naming key and value)."""
    items: list[tuple[str, Number]] = []
    for key, value in pairs:
        if value is not None:
            kind = type(value)
            if not ((kind is float or kind is int) and -_FAST < value < _FAST):  # type: ignore[operator]
                return None
            items.append((key, value))  # type: ignore[arg-type]
    return items


class WorkerBuilder(LeafRecorder):
    """ART's ``MetricsBuilder`` methods bound to one step and cost context, recording into
    the process-wide client. ``flush()`` blocks until this builder's leaves are durable;
    ``aflush()`` awaits it on the event loop."""

    # one per rollout: no instance dict; __weakref__ keeps the builder weak-referenceable
    __slots__ = ("__weakref__", "_rollout", "_slot_key", "client", "cost_context", "scope", "step")

    def __init__(
        self,
        client: MetricsClient,
        step: int,
        cost_context: str,
        scope: str,
        _rollout: _Rollout | None = None,
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
        rollout: _Rollout | None,
    ) -> None:
        """Set up from arguments already checked (``connect`` caches what it checked)."""
        self.client = client
        self.step = step
        self.cost_context = cost_context
        self.scope = scope
        self._slot_key = (step, scope)
        seq = client.touch(step, scope)
        if rollout is None:
            rollout = _Rollout(seq)
        elif seq > rollout.hi:
            rollout.hi = seq
        self._rollout = rollout

    @classmethod
    def _checked(
        cls, client: MetricsClient, step: int, cost_context: str, scope: str
    ) -> WorkerBuilder:
        builder = cls.__new__(cls)
        builder._bind(client, step, cost_context, scope, None)
        return builder

    # -- the hot path: validation inlined, then MetricsClient.record_into ------------------

    def add_metric(self, key: str, value: float) -> None:
        """Add ``value`` to leaf ``key`` of this step (repeated writes are summed)."""
        kind = type(value)
        if (
            (kind is float or kind is int)
            and type(key) is str
            and key in _VALID_KEYS
            and -_FAST < value < _FAST  # finite, and no realistic sum can pass the bound
            and (value >= 0 or not key.startswith("costs/"))
        ):
            self._rollout.hi = self.client.record_into(self._slot_key, key, value)
        else:
            super().add_metric(key, value)  # validates, raising with the key and value

    def add_cost(self, path: str, usd: float) -> None:
        """Record ``usd`` dollars under ``costs/<path>``, e.g. ``train/llm_judge/correctness``."""
        key = _COST_KEYS.get(path) if type(path) is str else None
        if key is not None and type(usd) is float and 0 <= usd < _FAST:
            self._rollout.hi = self.client.record_into(self._slot_key, key, usd)
        else:
            super().add_cost(path, usd)

    def add_data(
        self,
        step_num_scenarios: int | None = None,
        step_actor_tokens: int | None = None,
        scenario_ids: Iterable[Any] | None = None,
    ) -> None:
        """Record scenario and token counts and the step's scenario ids (deduplicated run-wide)."""
        items = _plain_leaves(
            ((_NUM_SCENARIOS, step_num_scenarios), (_ACTOR_TOKENS, step_actor_tokens))
        )
        if items is None:  # a value to check (and maybe refuse): the general path
            super().add_data(step_num_scenarios, step_actor_tokens, scenario_ids)
            return
        digests = _scenario_digests(scenario_ids) if scenario_ids is not None else []
        if items or digests:
            self._rollout.hi = self.client.record_many(self._slot_key, items, digests)

    def add_user_timing(
        self,
        step_wall_s: float | None = None,
        step_actor_s: float | None = None,
        step_eval_s: float | None = None,
    ) -> None:
        """Record step timings in seconds under ``time/step_*``."""
        items = _plain_leaves(
            ((_WALL_S, step_wall_s), (_ACTOR_S, step_actor_s), (_EVAL_S, step_eval_s))
        )
        if items is None:
            super().add_user_timing(step_wall_s, step_actor_s, step_eval_s)
        elif items:
            self._rollout.hi = self.client.record_many(self._slot_key, items, [])

    def add_idle_times(
        self,
        step_trainer_idle_s: float | None = None,
        step_actor_idle_s: float | None = None,
    ) -> None:
        """Record idle seconds under ``throughput/step_*_idle_s``."""
        items = _plain_leaves(
            ((_TRAINER_IDLE, step_trainer_idle_s), (_ACTOR_IDLE, step_actor_idle_s))
        )
        if items is None:
            super().add_idle_times(step_trainer_idle_s, step_actor_idle_s)
        elif items:
            self._rollout.hi = self.client.record_many(self._slot_key, items, [])

    def _record(self, key: str, value: Number) -> None:
        if -V.MAX_MAGNITUDE < value < V.MAX_MAGNITUDE:
            self._rollout.hi = self.client.record_into(self._slot_key, key, value)
        else:  # refuse a value whose pending sum would overflow, before it is accepted
            self._rollout.hi = self.client.record_big(self.step, self.scope, key, value)

    def _record_scenarios(self, digests: list[bytes]) -> None:
        self._rollout.hi = self.client.record_scenarios(self.step, self.scope, digests)

    def _record_keyed_cost(self, key: str, value: Decimal, response_id: str) -> None:
        self._rollout.hi = self.client.record_keyed_cost(
            self.step, self.scope, key, value, response_id
        )

    def _record_sample(self, key: str, value: float) -> None:
        self._rollout.hi = self.client.record_sample(self.step, self.scope, key, value)

    def _pricing(self) -> PricingRegistry:
        return self.client.pricing

    def for_cost_context(
        self, cost_context: str, *, buffer_scope: str | None = None
    ) -> WorkerBuilder:
        """The same step under another cost context (and scope); flushed with this builder."""
        context = V.check_cost_context(cost_context)
        scope = buffer_scope or context
        return WorkerBuilder(self.client, self.step, context, scope, self._rollout)

    def for_step(self, step: int) -> WorkerBuilder:
        """The same cost context for another step; flushed with this builder."""
        return WorkerBuilder(self.client, step, self.cost_context, self.scope, self._rollout)

    def flush(self, timeout_s: float | None = None) -> FlushResult:
        """Ship this builder's leaves and wait until the aggregator holds them durably (other
        rollouts' batches are not waited for). Never raises on telemetry failure."""
        r = self._rollout
        result = self.client.flush_range(r.lo, r.hi, timeout_s)
        if not result.ok:
            log.warning("art_ray_metrics: flush not confirmed durable: %s", result)
        return result

    async def aflush(self, timeout_s: float | None = None) -> FlushResult:
        """``flush`` for asyncio code: awaits the acknowledgements on the event loop."""
        r = self._rollout
        result = await self.client.aflush_range(r.lo, r.hi, timeout_s)
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
    ``scope_for_split(split)`` when a split is given, else the cost context (as ART's
    ``for_cost_context``). The actor is looked up lazily, on the first send.
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
            return WorkerBuilder._checked(bound[0], step, bound[1], bound[2])
        config = _named_config(name, namespace)
    elif name is not None or namespace is not None:
        updates = {k: v for k, v in (("name", name), ("namespace", namespace)) if v is not None}
        config = config.model_copy(update=updates)
    scope = K.scope_for_split(V.check_split(split)) if split is not None else None
    if scope is None:
        scope = V.check_cost_context(cost_context)
    builder = WorkerBuilder(get_client(config, producer_id=producer_id), step, cost_context, scope)
    if cacheable and len(_CONNECTED) < 4096:
        _CONNECTED[cache_key] = (builder.client, builder.cost_context, builder.scope)
    return builder


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
