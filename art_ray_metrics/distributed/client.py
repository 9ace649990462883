"""Worker side: a per-process batching client and the step-bound builder ``connect`` returns.

Life of a leaf::

    builder.add_cost("train/judge", 0.002)       # validated here; raises before anything is sent
      -> PendingLeaves of (step, scope)           # raw values; summed exactly at ship time
      -> ship(): LeafBatch(producer_id, seq)      # on size, on time (background thread), on flush()
      -> actor.ingest.remote(bytes)               # at most max_in_flight unacknowledged calls
      -> retained until the actor says durable    # resent after a failed call or actor restart

Guarantees:

- **Exactly once.** Every batch has ``(producer_id, seq)``; the actor applies each once, so the
  client can resend freely (after an error, a timeout or an actor restart).
- **Bounded memory.** Raw values wait at most until the next ship (``max_batch_leaves`` of
  them); batches carry one exact sum per distinct key. In-flight calls are capped, retained
  batches are capped (beyond the cap the oldest is dropped *and counted*: only when the actor
  has been unreachable for that long).
- **No lost errors.** Every call's result is reaped; failures are counted, logged once per
  kind, and resent under the same sequence number.
- **Flush means durable.** ``flush()`` returns after the actor acknowledged every batch of
  this process as durable (write-ahead log or checkpoint), so a rollout that flushed and
  returned has its metrics in, even if the actor dies right after. It never raises on
  telemetry failure: it returns a :class:`FlushResult` saying what happened.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from art_ray_metrics.builder import _COST_KEYS, LeafRecorder, Number, PendingLeaves
from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core import keys as K
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.records import KeyedCost, LeafBatch, StepGroup
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
    """Every batch of this process is acknowledged as durable."""
    batches: int
    """Batches shipped by this process so far."""
    retained: int
    """Batches still waiting for a durable acknowledgement."""
    error: str | None = None


def _default_producer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class MetricsClient:
    """One per process and aggregator: buffers leaves and ships them as batches."""

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        producer_id: str | None = None,
        actor: Any = None,
    ) -> None:
        self.config = config or ClientConfig()
        self.producer_id = producer_id or _default_producer_id()
        self._actor = actor
        self._lock = threading.RLock()
        self._pending: dict[tuple[int, str], PendingLeaves] = {}
        self._pending_leaves = 0
        self._max_batch_leaves = self.config.max_batch_leaves
        self._seq = 0
        self._retained: dict[int, bytes] = {}
        self._inflight: dict[Any, int] = {}  # ObjectRef -> seq
        self._durable_upto = 0
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
        self.pricing = PricingRegistry()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="art-ray-metrics-client", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)

    # -- recording (called by WorkerBuilder) ------------------------------------------------

    def _slot(self, step: int, scope: str) -> PendingLeaves:
        slot = self._pending.get((step, scope))
        if slot is None:
            slot = self._pending[(step, scope)] = PendingLeaves()
        return slot

    def record(self, step: int, scope: str, key: str, value: Number) -> None:
        """Add a validated leaf (conflicts with unshipped leaves of the step raise)."""
        self.record_into((step, scope), key, value)

    def record_into(self, slot_key: tuple[int, str], key: str, value: Number) -> None:
        """:meth:`record` for a ``(step, scope)`` the caller keeps; ship when the batch is full.
        The worker's hot path: a repeated key is one list append."""
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
        if pending >= self._max_batch_leaves:
            self.ship()

    def record_scenarios(self, step: int, scope: str, digests: list[bytes]) -> None:
        """Add scenario digests."""
        with self._lock:
            slot = self._slot(step, scope)
            slot.scenarios.update(digests)
            self._pending_leaves += len(digests)

    def record_sample(self, step: int, scope: str, key: str, value: float) -> None:
        """Add one per-rollout value (averaged by the aggregator); ship when the batch is full."""
        with self._lock:
            self._slot(step, scope).record_sample(key, value)
            pending = self._pending_leaves = self._pending_leaves + 1
        if pending >= self._max_batch_leaves:
            self.ship()

    def record_keyed_cost(self, step: int, scope: str, key: str, value: Decimal, rid: str) -> None:
        """Add a cost applied at most once per response id (by the aggregator)."""
        with self._lock:
            slot = self._slot(step, scope)
            slot.keyed.append(KeyedCost(key, value, rid))
            self._pending_leaves += 1

    def touch(self, step: int, scope: str) -> None:
        """Make sure the next batch reports this producer for ``(step, scope)``."""
        with self._lock:
            self._slot(step, scope)

    # -- shipping --------------------------------------------------------------------------

    def actor(self) -> Any:
        """The aggregator's handle, looked up once (with backoff) and cached."""
        if self._actor is None:
            self._actor = lookup_actor(
                self.config.name, self.config.namespace, self.config.lookup_timeout_s
            )
        return self._actor

    def ship(self, *, durable: bool = False) -> int | None:
        """Send everything pending as one batch; return its seq (None if nothing to send)."""
        with self._lock:
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
            self._pending.clear()
            self._pending_leaves = 0
            self._seq += 1
            seq = self._seq
            data = encode_batch(LeafBatch(self.producer_id, seq, groups))
            self._retained[seq] = data
            self._last_ship = time.monotonic()
            self.counters["batches"] += 1
            self._trim_retained()
        self._send(seq, data, durable=durable)
        return seq

    def _trim_retained(self) -> None:
        excess = len(self._retained) - self.config.max_retained_batches
        if excess > 0:
            for seq in sorted(self._retained)[:excess]:
                del self._retained[seq]
                self.counters["dropped_retained"] += 1
            log.error("art_ray_metrics: dropped %d unacknowledged batches (cap reached)", excess)

    def _send(self, seq: int, data: bytes, *, durable: bool) -> None:
        self._wait_for_room()
        try:
            ref = self.actor().ingest.remote(data, durable)
        except Exception as exc:  # lookup failed or the handle is broken: resend later
            self._failed(exc)
            return
        with self._lock:
            self._inflight[ref] = seq

    def _wait_for_room(self) -> None:
        deadline = time.monotonic() + self.config.flush_timeout_s
        while len(self._inflight) >= self.config.max_in_flight and time.monotonic() < deadline:
            self.reap(timeout_s=0.5, block=True)

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
        for ref in ready:
            with self._lock:
                seq = self._inflight.pop(ref, None)
            if seq is None:
                continue
            try:
                ack = ray.get(ref)
            except WireFormatError as exc:  # cannot be fixed by a resend
                with self._lock:
                    self._retained.pop(seq, None)
                self.counters["rejected"] += 1
                self.last_error = f"batch {seq} rejected: {exc}"
                log.error("art_ray_metrics: %s", self.last_error)
                continue
            except Exception as exc:
                self._failed(exc)
                continue
            self._acked(ack)
        return len(ready)

    def _acked(self, ack: dict[str, Any]) -> None:
        upto = int(ack.get("durable_upto", 0))
        with self._lock:
            if upto > self._durable_upto:
                self._durable_upto = upto
            for seq in [s for s in self._retained if s <= self._durable_upto]:
                del self._retained[seq]
            self._backoff = 0.1

    def _failed(self, exc: BaseException) -> None:
        self.counters["send_failures"] += 1
        text = f"{type(exc).__name__}: {exc}"
        if text != self.last_error:
            log.warning("art_ray_metrics: send failed, will resend: %s", text[:300])
        self.last_error = text
        with self._lock:
            self._resend_after = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)

    def _resend(self, *, durable: bool = False) -> None:
        with self._lock:
            inflight = set(self._inflight.values())
            todo = [(s, d) for s, d in sorted(self._retained.items()) if s not in inflight]
        for seq, data in todo:
            self.counters["resends"] += 1
            self._send(seq, data, durable=durable)

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
            except Exception as exc:  # the loop must survive anything
                self._failed(exc)

    def flush(self, timeout_s: float | None = None) -> FlushResult:
        """Ship everything and wait until the actor acknowledged it all as durable."""
        deadline = time.monotonic() + (timeout_s or self.config.flush_timeout_s)
        self.ship(durable=True)
        while True:
            self.reap(timeout_s=0.2, block=True)
            with self._lock:
                done = not self._retained and not self._pending
                idle = not self._inflight
            if done:
                return FlushResult(True, self._seq, 0, None)
            if time.monotonic() >= deadline:
                with self._lock:
                    left = len(self._retained)
                return FlushResult(False, self._seq, left, self.last_error)
            if idle and time.monotonic() >= self._resend_after:
                self._resend(durable=True)

    def stats(self) -> dict[str, Any]:
        """Client counters (batches, resends, failures, retained, in flight)."""
        with self._lock:
            return {
                "producer_id": self.producer_id,
                **self.counters,
                "retained": len(self._retained),
                "in_flight": len(self._inflight),
                "pending_leaves": self._pending_leaves,
                "last_error": self.last_error,
            }

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is pending (bounded) and stop the background thread."""
        if self._stop.is_set():
            return
        try:
            if self._pending or self._retained:
                self.flush(timeout_s)
        except Exception as exc:  # interpreter shutdown: never raise from atexit
            log.debug("art_ray_metrics: close failed: %s", exc)
        self._stop.set()


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


_CLIENTS: dict[tuple[str, str], MetricsClient] = {}
_CLIENTS_LOCK = threading.Lock()


def get_client(
    config: ClientConfig | None = None, *, producer_id: str | None = None
) -> MetricsClient:
    """The process-wide client for an aggregator (created on first use)."""
    config = config or _named_config(None, None)
    key = (config.name, config.namespace)
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


class WorkerBuilder(LeafRecorder):
    """ART's ``MetricsBuilder`` methods bound to one step and cost context, recording into
    the process-wide client. ``flush()`` blocks until durable; ``aflush()`` awaits it."""

    def __init__(self, client: MetricsClient, step: int, cost_context: str, scope: str) -> None:
        self.client = client
        self.step = V.check_step(step)
        self.cost_context = V.check_cost_context(cost_context)
        self.scope = scope
        self._slot_key = (step, scope)
        client.touch(step, scope)

    # -- the hot path: validation inlined, then MetricsClient.record_into ------------------

    def add_metric(self, key: str, value: float) -> None:
        """Add ``value`` to leaf ``key`` of this step (repeated writes are summed)."""
        kind = type(value)
        if (
            (kind is float or kind is int)
            and type(key) is str
            and key in _VALID_KEYS
            and value - value == 0  # finite
            and (value >= 0 or not key.startswith("costs/"))
        ):
            self.client.record_into(self._slot_key, key, value)
        else:
            super().add_metric(key, value)  # validates, raising with the key and value

    def add_cost(self, path: str, usd: float) -> None:
        """Record ``usd`` dollars under ``costs/<path>``, e.g. ``train/llm_judge/correctness``."""
        key = _COST_KEYS.get(path) if type(path) is str else None
        if key is not None and type(usd) is float and usd - usd == 0 and usd >= 0:
            self.client.record_into(self._slot_key, key, usd)
        else:
            super().add_cost(path, usd)

    def _record(self, key: str, value: Number) -> None:
        self.client.record_into(self._slot_key, key, value)

    def _record_scenarios(self, digests: list[bytes]) -> None:
        self.client.record_scenarios(self.step, self.scope, digests)

    def _record_keyed_cost(self, key: str, value: Decimal, response_id: str) -> None:
        self.client.record_keyed_cost(self.step, self.scope, key, value, response_id)

    def _record_sample(self, key: str, value: float) -> None:
        self.client.record_sample(self.step, self.scope, key, value)

    def _pricing(self) -> PricingRegistry:
        return self.client.pricing

    def for_cost_context(
        self, cost_context: str, *, buffer_scope: str | None = None
    ) -> WorkerBuilder:
        """The same step under another cost context (and scope)."""
        context = V.check_cost_context(cost_context)
        return WorkerBuilder(self.client, self.step, context, buffer_scope or context)

    def for_step(self, step: int) -> WorkerBuilder:
        """The same cost context for another step."""
        return WorkerBuilder(self.client, step, self.cost_context, self.scope)

    def flush(self, timeout_s: float | None = None) -> FlushResult:
        """Ship and wait for the durable acknowledgement (never raises on telemetry failure)."""
        result = self.client.flush(timeout_s)
        if not result.ok:
            log.warning("art_ray_metrics: flush not confirmed durable: %s", result)
        return result

    async def aflush(self, timeout_s: float | None = None) -> FlushResult:
        """``flush`` for asyncio code (runs in a thread)."""
        return await asyncio.to_thread(self.flush, timeout_s)


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
    if config is None:
        config = _named_config(name, namespace)
    elif name is not None or namespace is not None:
        updates = {k: v for k, v in (("name", name), ("namespace", namespace)) if v is not None}
        config = config.model_copy(update=updates)
    scope = K.scope_for_split(split) if split is not None else cost_context.strip()
    return WorkerBuilder(get_client(config, producer_id=producer_id), step, cost_context, scope)


_NAMED_CONFIGS: dict[tuple[str | None, str | None], ClientConfig] = {}


def _named_config(name: str | None, namespace: str | None) -> ClientConfig:
    config = _NAMED_CONFIGS.get((name, namespace))
    if config is None:
        fields = {k: v for k, v in (("name", name), ("namespace", namespace)) if v is not None}
        config = _NAMED_CONFIGS[(name, namespace)] = ClientConfig(**fields)
    return config
