"""Stream taps of :func:`~art_ray_metrics.spend.track.track_api_cost`: usage read from the
chunks as they pass, the cost recorded once when the stream finishes.

:func:`stream_kind` classifies what a decorated call returned: an OpenAI/Anthropic SDK stream
(tapped in place: its iterator and ``close`` are wrapped on the instance, so the caller gets the
very same object), an SDK ``*StreamManager`` (returned behind a thin proxy whose
``__enter__``/``__aenter__`` taps the stream it opens), a plain generator (handed back wrapped in
a new generator; ``send``/``throw`` are not forwarded), or a response (``None``). A
:class:`StreamRecorder` accumulates the usage and, on exhaustion, ``close()``, ``with`` exit or
garbage collection, calls the call spec's ``record_stream_end`` exactly once and settles the
call's budget reservation to the cost recorded.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any, Protocol

from art_ray_metrics.spend.admission import Reservation
from art_ray_metrics.spend.base import StreamUsage
from art_ray_metrics.spend.providers import STREAM_OBSERVERS

__all__ = ["StreamEnd", "StreamRecorder", "settle", "stream_kind", "tap"]


class StreamEnd(Protocol):
    """What a recorder needs of the call spec: record a finished stream's usage."""

    def record_stream_end(self, builder: Any, accumulated: StreamUsage) -> Decimal | None: ...


def settle(reservation: Reservation | None, cost: Decimal | None) -> None:
    """Settle a budget reservation (if any) to the real cost (``None``: unpriced)."""
    if reservation is not None:
        reservation.settle(cost)


class StreamRecorder:
    """Observes chunks and records the cost exactly once when the stream finishes (settling
    the call's reservation under a budget to it)."""

    __slots__ = ("_builder", "_done", "_reservation", "_spec", "usage")

    def __init__(
        self, spec: StreamEnd, builder: Any, reservation: Reservation | None = None
    ) -> None:
        self._spec = spec
        self._builder = builder
        self._done = False
        self._reservation = reservation
        self.usage = StreamUsage(STREAM_OBSERVERS)

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        cost: Decimal | None = None
        try:
            cost = self._spec.record_stream_end(self._builder, self.usage)
        finally:
            settle(self._reservation, cost)


_SDK_MODULES = ("openai", "anthropic")


def stream_kind(obj: Any) -> str | None:
    """Classify a return value: SDK stream (tapped in place), manager, generator, or response."""
    cls = type(obj)
    if inspect.isgenerator(obj):
        return "generator"
    if inspect.isasyncgen(obj):
        return "async_generator"
    if not cls.__module__.startswith(_SDK_MODULES):
        return None
    name = cls.__name__
    if name.endswith("StreamManager"):
        return "async_manager" if hasattr(cls, "__aenter__") else "manager"
    if hasattr(cls, "__anext__") and hasattr(obj, "_iterator"):
        return "async_stream"
    if hasattr(cls, "__next__") and hasattr(obj, "_iterator"):
        return "sync_stream"
    return None


def tap(obj: Any, kind: str, recorder: StreamRecorder) -> Any:
    if kind == "sync_stream":
        _tap_sync_stream(obj, recorder)
        return obj
    if kind == "async_stream":
        _tap_async_stream(obj, recorder)
        return obj
    if kind == "manager":
        return _TrackedStreamManager(obj, recorder)
    if kind == "async_manager":
        return _TrackedAsyncStreamManager(obj, recorder)
    if kind == "generator":
        return _tapped_iter(obj, recorder)
    return _tapped_aiter(obj, recorder)


def _tapped_iter(inner: Iterator[Any], recorder: StreamRecorder) -> Iterator[Any]:
    try:
        for item in inner:
            recorder.usage.observe(item)
            yield item
    finally:
        recorder.finish()


async def _tapped_aiter(inner: AsyncIterator[Any], recorder: StreamRecorder) -> AsyncIterator[Any]:
    try:
        async for item in inner:
            recorder.usage.observe(item)
            yield item
    finally:
        recorder.finish()


def _tap_sync_stream(stream: Any, recorder: StreamRecorder) -> None:
    """Wrap an SDK stream's iterator and ``close`` on the instance itself."""
    stream._iterator = _tapped_iter(stream._iterator, recorder)
    ref = weakref.ref(stream)
    cls_close = type(stream).close

    def close() -> None:
        try:
            target = ref()
            if target is not None:
                cls_close(target)
        finally:
            recorder.finish()

    stream.close = close


def _tap_async_stream(stream: Any, recorder: StreamRecorder) -> None:
    stream._iterator = _tapped_aiter(stream._iterator, recorder)
    ref = weakref.ref(stream)
    cls_close = type(stream).close

    async def close() -> None:
        try:
            target = ref()
            if target is not None:
                await cls_close(target)
        finally:
            recorder.finish()

    stream.close = close


class _TrackedStreamManager:
    """Proxy of an SDK ``*StreamManager`` that taps the stream it opens."""

    def __init__(self, manager: Any, recorder: StreamRecorder) -> None:
        self._manager = manager
        self._recorder = recorder

    def __enter__(self) -> Any:
        stream = self._manager.__enter__()
        _tap_sync_stream(stream, self._recorder)
        return stream

    def __exit__(self, *exc_info: Any) -> Any:
        try:
            return self._manager.__exit__(*exc_info)
        finally:
            self._recorder.finish()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)


class _TrackedAsyncStreamManager:
    """Proxy of an SDK ``Async*StreamManager`` that taps the stream it opens."""

    def __init__(self, manager: Any, recorder: StreamRecorder) -> None:
        self._manager = manager
        self._recorder = recorder

    async def __aenter__(self) -> Any:
        stream = await self._manager.__aenter__()
        _tap_async_stream(stream, self._recorder)
        return stream

    async def __aexit__(self, *exc_info: Any) -> Any:
        try:
            return await self._manager.__aexit__(*exc_info)
        finally:
            self._recorder.finish()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)
