"""How a :class:`~art_ray_metrics.distributed.client.MetricsClient` reaches its aggregator.

The client owns batching, sequence numbers, retention and resends; a transport only finds the
aggregator and carries calls to it. Two exist:

- :class:`RayTransport`: the named Ray actor (``ray.get_actor``, ``ingest.remote``); each call is
  the ``concurrent.futures.Future`` of its object ref (``ObjectRef.future()``): Ray completes it
  once, from its own callback, so any number of flushing threads wait on it without a
  ``ray.wait``/``ray.get`` each.
- :class:`InProcessTransport`: a :class:`~art_ray_metrics.testing.InProcessAggregator` in this
  process (the real actor class over real storage, on its own event loop; no Ray).

Rules every transport keeps (the client relies on them):

- :meth:`Transport.send` and :meth:`Transport.confirm` never look the aggregator up: with none
  resolved they raise :class:`AggregatorUnavailableError` (``send``) or do nothing (``confirm``).
  Only :meth:`Transport.resolve` looks up, and only the client's background thread calls it,
  so no recording call, flush or event loop ever waits for a lookup.
- A failed lookup is remembered: ``resolve`` does nothing until its back-off has passed.
- :meth:`Transport.failed` is told of every failed call; a call that failed because the
  aggregator is gone for good (killed, or replaced by a new one) forgets the handle, so the
  next ``resolve`` finds whatever aggregator now holds the name.
- :meth:`Transport.gone` is True once the transport's world ended in this process (Ray was
  connected and is not any more): the client then stops quietly and never starts anything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import re
import sys
import threading
import time
from typing import Any, Protocol

from art_ray_metrics.core.backoff import LOOKUP
from art_ray_metrics.errors import AggregatorUnavailableError

__all__ = [
    "JITTER",
    "InProcessTransport",
    "RayTransport",
    "Transport",
    "await_outcome",
    "chain_future",
    "future_outcome",
    "one_line",
    "wait_futures",
]

JITTER = random.Random()
"""Back-off jitter from a generator of our own: the process's global ``random`` state (a
user's seeded experiment, a property test drawing examples) is never touched."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, without ANSI codes: for a Ray task error, its cause's
    type and the first line of its message (the remote traceback is logged, not returned)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and type(exc).__name__.startswith("RayTaskError"):
        exc = cause
    text = _ANSI.sub("", str(exc)).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:limit]


class Transport(Protocol):
    """What the client needs from the way to its aggregator (see the module docstring)."""

    lookup_error: str | None
    """Why the last lookup failed (None once one succeeded)."""

    def ready(self) -> bool:
        """An aggregator is resolved: :meth:`send` will not raise for want of one."""

    def gone(self) -> bool:
        """This transport's world ended in this process (e.g. ``ray.shutdown()``)."""

    def resolve(self) -> bool:
        """Look the aggregator up once, unless resolved or the back-off has not passed.
        Returns :meth:`ready`. Called only from the client's background thread."""

    def send(self, data: bytes, durable: bool) -> Any:
        """Start an ``ingest`` call; return it (no lookup). A ``concurrent.futures.Future``
        of the answer is chained to the client's own future of the call; any other call
        object is waited on through :meth:`wait` and :meth:`outcome` (by the client's
        background thread unless it finished at once).

        Raises:
            AggregatorUnavailableError: No aggregator is resolved.
        """

    def confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
        """Send a ``confirm`` (fire and forget); False when it was not sent."""

    def call(self, method: str, *args: Any) -> concurrent.futures.Future[Any]:
        """Start a call of another remote method (the run budget's); its future (no lookup).

        Raises:
            AggregatorUnavailableError: No aggregator is resolved.
        """

    def wait(self, calls: list[Any], num_returns: int, timeout_s: float) -> list[Any]:
        """The calls among ``calls`` that finished (at least ``num_returns`` unless timed out)."""

    def outcome(self, call: Any) -> Any:
        """A finished call's acknowledgement, or its exception (returned, never raised)."""

    def failed(self, exc: BaseException) -> None:
        """A call or send failed with ``exc``: forget the handle if the aggregator is gone."""

    def after_fork(self) -> Transport:
        """The transport a forked child starts with (nothing resolved)."""


class _Lookups:
    """Back-off bookkeeping of failed lookups (shared by the transports)."""

    def __init__(self) -> None:
        self.lookup_error: str | None = None
        self.lookups = 0
        self.failed_lookups = 0
        self._next_at = 0.0
        self._backoff = LOOKUP.start(JITTER)

    def due(self) -> bool:
        return time.monotonic() >= self._next_at

    def miss(self, why: str) -> None:
        self.failed_lookups += 1
        self.lookup_error = why
        self._next_at = time.monotonic() + self._backoff.next_delay()

    def hit(self) -> None:
        self.lookup_error = None
        self._backoff.reset()
        self._next_at = 0.0


def _ray() -> Any:
    """The ``ray`` module if this process imported it (never imports it: that is slow)."""
    return sys.modules.get("ray")


def _ray_connected() -> bool:
    ray = _ray()
    try:
        return ray is not None and bool(ray.is_initialized())
    except Exception:  # half imported at interpreter exit
        return False


_WAIT_SLICE_S = 0.5
"""A Ray call's future is waited on in slices this long, checking that Ray is still up."""


def _as_future(ref: Any) -> concurrent.futures.Future[Any]:
    """The future of a Ray object ref, completed by Ray's callback with the reply, or with the
    exception ``ray.get`` would raise (a stand-in ref without ``future()`` never completes)."""
    future = getattr(ref, "future", None)
    if future is None:
        return concurrent.futures.Future()
    return future()  # type: ignore[no-any-return]


def wait_futures(calls: list[Any], num_returns: int, timeout_s: float) -> list[Any]:
    """The futures among ``calls`` done within ``timeout_s`` (at least ``num_returns`` of them
    unless timed out), in the order given."""
    if num_returns >= len(calls):  # all of them: on each future's own condition, no waiters
        deadline = time.monotonic() + max(0.0, timeout_s)
        for call in calls:
            if call.done():
                continue
            try:
                call.exception(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            except concurrent.futures.CancelledError:
                continue
        return [c for c in calls if c.done()]
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        done, _ = concurrent.futures.wait(
            calls,
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=concurrent.futures.FIRST_COMPLETED,
        )
        if len(done) >= num_returns or time.monotonic() >= deadline:
            return [c for c in calls if c in done]


def future_outcome(call: concurrent.futures.Future[Any]) -> Any:
    """A finished call's reply, or its exception (returned, never raised)."""
    try:
        return call.result(timeout=0)
    except concurrent.futures.CancelledError:
        return AggregatorGoneError("the aggregator died while the call was in flight")
    except Exception as exc:
        return exc


async def await_outcome(call: concurrent.futures.Future[Any]) -> Any:
    """:func:`future_outcome` awaited on an event loop: the call's reply or its exception
    (returned, never raised)."""
    try:
        return await asyncio.wrap_future(call)
    except asyncio.CancelledError:
        if call.cancelled():
            return AggregatorGoneError("the aggregator died while the call was in flight")
        raise
    except Exception as exc:
        return exc


def chain_future(
    source: concurrent.futures.Future[Any], call: concurrent.futures.Future[Any]
) -> None:
    """Complete ``call`` as the transport's future ``source`` completes."""

    def copy(done: concurrent.futures.Future[Any]) -> None:
        if done.cancelled():
            call.cancel()
        elif (exc := done.exception()) is not None:
            call.set_exception(exc)
        else:
            call.set_result(done.result())

    source.add_done_callback(copy)


class RayTransport(_Lookups):
    """The named aggregator actor, through Ray. Never initialises Ray: every call first checks
    that this process is connected."""

    def __init__(self, name: str, namespace: str, actor: Any = None) -> None:
        super().__init__()
        self.name = name
        self.namespace = namespace
        self._actor = actor
        self._seen_ray = _ray_connected()
        self._lock = threading.Lock()

    def ready(self) -> bool:
        return self._actor is not None

    def gone(self) -> bool:
        if _ray_connected():
            self._seen_ray = True
            return False
        return self._seen_ray

    def resolve(self) -> bool:
        if self._actor is not None:
            return True
        if not self.due():
            return False
        if not _ray_connected():
            self.miss("Ray is not initialized in this process")
            return False
        self.lookups += 1
        try:
            actor = _ray().get_actor(self.name, namespace=self.namespace)
        except Exception as exc:  # ValueError: no such actor; anything else: GCS trouble
            detail = "" if isinstance(exc, ValueError) else f" ({one_line(exc)})"
            self.miss(
                f"no aggregator actor {self.name!r} in namespace {self.namespace!r}{detail}; "
                "start it on the driver with art_ray_metrics.start_aggregator()"
            )
            return False
        with self._lock:
            self._actor = actor
        self.hit()
        return True

    def send(self, data: bytes, durable: bool) -> Any:
        actor = self._actor
        if actor is None:
            raise AggregatorUnavailableError(self.lookup_error or "the aggregator is not found yet")
        if not _ray_connected():
            raise AggregatorUnavailableError("Ray is not initialized in this process")
        return _as_future(actor.ingest.remote(data, durable))

    def call(self, method: str, *args: Any) -> concurrent.futures.Future[Any]:
        """Call another remote method without waiting (the run budget's grants)."""
        actor = self._actor
        if actor is None:
            raise AggregatorUnavailableError(self.lookup_error or "the aggregator is not found yet")
        if not _ray_connected():
            raise AggregatorUnavailableError("Ray is not initialized in this process")
        future: concurrent.futures.Future[Any] = getattr(actor, method).remote(*args).future()
        return future

    def confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
        actor = self._actor
        if actor is None or not _ray_connected():
            return False
        actor.confirm.remote(producer_id, incarnation, acked_upto)
        return True

    def wait(self, calls: list[Any], num_returns: int, timeout_s: float) -> list[Any]:
        # in slices: a future of a process whose Ray was shut down never completes
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            if not _ray_connected():
                return []
            ready = wait_futures(
                calls, num_returns, min(_WAIT_SLICE_S, deadline - time.monotonic())
            )
            if len(ready) >= min(num_returns, len(calls)) or time.monotonic() >= deadline:
                return ready

    def outcome(self, call: Any) -> Any:
        return future_outcome(call)

    def failed(self, exc: BaseException) -> None:
        ray = _ray()
        died = getattr(getattr(ray, "exceptions", None), "ActorDiedError", None)
        if died is not None and isinstance(exc, died):  # killed, or replaced under its name
            with self._lock:
                self._actor = None
            self.hit()  # look the name up again at once

    def after_fork(self) -> RayTransport:
        return RayTransport(self.name, self.namespace)


class AggregatorGoneError(AggregatorUnavailableError):
    """The in-process aggregator a handle pointed at was shut down or replaced (the in-process
    counterpart of Ray's ``ActorDiedError``)."""


class InProcessTransport(_Lookups):
    """An aggregator object living in this process: calls run on its event loop thread.

    ``registry`` is what ``resolve`` looks the aggregator up in: an object whose ``lookup()``
    returns the current :class:`~art_ray_metrics.testing.InProcessAggregator` instance handle
    (or None while there is none), as ``ray.get_actor`` does by name.
    """

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self.registry = registry
        self._target: Any = None

    def ready(self) -> bool:
        return self._target is not None

    def gone(self) -> bool:
        return bool(getattr(self.registry, "closed", False))

    def resolve(self) -> bool:
        if self._target is not None:
            return True
        if not self.due():
            return False
        self.lookups += 1
        target = self.registry.lookup()
        if target is None:
            self.miss(f"no in-process aggregator {getattr(self.registry, 'name', '')!r} running")
            return False
        self._target = target
        self.hit()
        return True

    def send(self, data: bytes, durable: bool) -> Any:
        target = self._target
        if target is None:
            raise AggregatorUnavailableError(self.lookup_error or "the aggregator is not found yet")
        return target.submit("ingest", data, durable)

    def call(self, method: str, *args: Any) -> concurrent.futures.Future[Any]:
        """Call another method of the aggregator without waiting."""
        target = self._target
        if target is None:
            raise AggregatorUnavailableError(self.lookup_error or "the aggregator is not found yet")
        future: concurrent.futures.Future[Any] = target.submit(method, *args)
        return future

    def confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
        target = self._target
        if target is None:
            return False
        try:
            target.submit("confirm", producer_id, incarnation, acked_upto)
        except AggregatorUnavailableError:
            return False
        return True

    def wait(self, calls: list[Any], num_returns: int, timeout_s: float) -> list[Any]:
        return wait_futures(calls, num_returns, timeout_s)

    def outcome(self, call: Any) -> Any:
        return future_outcome(call)

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, AggregatorGoneError):
            self._target = None
            self.hit()

    def after_fork(self) -> InProcessTransport:
        return InProcessTransport(self.registry)
