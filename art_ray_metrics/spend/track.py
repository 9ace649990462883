"""Record the dollar cost of LLM API calls: ``track_api_cost`` and the builders' pricing methods.

``@track_api_cost(source=..., provider=..., model_name=...)`` wraps a function that calls an LLM
API. After each call it prices the response (see :mod:`art_ray_metrics.spend.pricing`) and records
``costs/<cost_context>/<source>`` on the builder active in the current context
(:mod:`art_ray_metrics.core.active`). Builders get ART's ``add_response_cost``,
``register_cost_extractor`` and ``register_model_pricing`` from :class:`ApiCostMixin`.

What the decorator handles:

* sync and async functions returning a response;
* functions returning an OpenAI or Anthropic stream (``Stream``/``AsyncStream``, Anthropic
  ``MessageStream``, OpenAI ``ChatCompletionStream``) or a ``*StreamManager``; sync and async
  generator functions. The caller gets the stream unchanged: SDK stream objects are the very same
  object, tapped in place (their iterator and ``close`` are wrapped); managers are returned behind
  a thin proxy whose ``__enter__``/``__aenter__`` taps the stream they open. Usage is read from
  the chunks as they pass (OpenAI: the final chunk's ``usage``, which needs
  ``stream_options={"include_usage": True}``; Responses: the ``response.completed`` event;
  Anthropic: ``message_start`` + ``message_delta``). The cost is recorded once, when the stream
  is exhausted, closed (``close()``, ``with``) or garbage-collected after the consumer stopped
  early; it prices the usage reported so far. A stream that ends without any usage is recorded
  as an **unpriced call** and warns. A plain generator returned by an ordinary function is
  handed back wrapped in a new generator (``send``/``throw`` are not forwarded); decorated
  generator functions are iterated the same way.

Guarantees and choices:

* **No active builder**: the call runs and nothing is recorded.
* **Fail before paying**: at decoration time, if no pricing, built-in price, genai-prices entry,
  cost extractor or explicit price covers the model, :class:`UnpricedModelWarning` is issued
  (pricing may still be registered later). At every call with an active builder the check is
  repeated *before* the wrapped function runs and raises
  :class:`~art_ray_metrics.errors.PricingError` if it still fails, so nothing is paid for that
  cannot be priced. ``check_pricing=False`` turns both checks off (for providers whose
  responses carry their own cost, e.g. OpenRouter/LiteLLM).
* **Never lose a paid response**: a failure after the call (no usage, usage of another
  provider, a failing ``response_getter`` or extractor) records one unpriced call for the cost
  path (the builder reports it as ``data/step_unpriced_api_calls``), issues
  :class:`UnpricedCallWarning` and returns the result. With ``strict=True`` the error is raised
  instead (after the unpriced call is recorded); for a stream it is raised to the consumer when
  the stream ends, or reported as unraisable if the stream was garbage-collected.
* **Idempotent by response id**: a response with a provider id is recorded once.
  :class:`ApiCostMixin` skips ids it recorded before in this process (bounded LRU in the
  builder's :class:`~art_ray_metrics.spend.pricing.PricingRegistry`) and passes the id on to the
  aggregator, which applies it at most once per run. Providers that reuse ids (some mocks and
  self-hosted servers) must not rely on this; responses without an id are never de-duplicated.

Context propagation: asyncio tasks inherit the active builder; threads do not. Wrap the callable
with :func:`bind_context` (or use ``contextvars.copy_context().run`` / ``asyncio.to_thread``).
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextvars import copy_context
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from art_ray_metrics.core.active import get_active_builder
from art_ray_metrics.errors import InvalidMetricError, PricingError
from art_ray_metrics.spend.admission import Admission, Reservation
from art_ray_metrics.spend.base import ZERO, StreamUsage, to_decimal
from art_ray_metrics.spend.estimate import estimate_cost, request_bound
from art_ray_metrics.spend.pricing import (
    CostExtractor,
    PriceOverrides,
    PricingRegistry,
    TokenPricing,
    normalize_model_name,
    normalize_provider,
)
from art_ray_metrics.spend.providers import STREAM_OBSERVERS

__all__ = [
    "ApiCostMixin",
    "RequestGetter",
    "ResponseGetter",
    "UnpricedCallWarning",
    "UnpricedModelWarning",
    "bind_context",
    "track_api_cost",
]

P = ParamSpec("P")
R = TypeVar("R")

ResponseGetter = Callable[[Any], Any]
"""Maps the decorated function's result to the API response to price."""
RequestGetter = Callable[..., Mapping[str, Any]]
"""Called with the decorated function's arguments; returns the API request's keyword arguments
(``messages``, ``max_tokens``, ...) to estimate the call from under a run budget."""

_FALLBACK_REGISTRY = PricingRegistry(max_response_ids=1)


class UnpricedModelWarning(UserWarning):
    """A decorated call's model has no pricing yet; calls will fail before paying."""


class UnpricedCallWarning(UserWarning):
    """A paid call could not be priced; it was recorded as an unpriced call."""


def _normalize_source(source: str) -> str:
    if not isinstance(source, str) or not source.strip("/").strip():
        raise InvalidMetricError(f"Expected a non-empty cost source but got {source!r}")
    return source.strip().strip("/")


class ApiCostMixin:
    """Gives a builder ART's pricing methods on top of three host hooks.

    The host class provides ``cost_context: str`` and:

    * ``_pricing() -> PricingRegistry``: the registry shared by the builder family;
    * ``_add_cost_leaf(path, usd, *, response_id)``: record ``costs/<path>`` (``usd`` is a
      ``Decimal``); the aggregator applies a given ``response_id`` at most once per run;
    * ``_add_unpriced_call(path)``: count one unpriced call for ``costs/<path>``.
    """

    __slots__ = ()

    if TYPE_CHECKING:
        cost_context: str

        def _pricing(self) -> PricingRegistry: ...

        def _add_cost_leaf(self, path: str, usd: Decimal, *, response_id: str | None) -> None: ...

        def _add_unpriced_call(self, path: str) -> None: ...

    def _api_cost_path(self, source: str) -> str:
        return f"{self.cost_context.strip('/')}/{_normalize_source(source)}"

    def add_response_cost(
        self,
        source: str,
        response: Any,
        *,
        provider: str,
        model_name: str,
        prompt_price_per_million: float | Decimal | None = None,
        completion_price_per_million: float | Decimal | None = None,
        cached_prompt_price_per_million: float | Decimal | None = None,
        cache_creation_price_per_million: float | Decimal | None = None,
        cache_read_price_per_million: float | Decimal | None = None,
    ) -> float | None:
        """Price ``response`` and record it as ``costs/<cost_context>/<source>``.

        As in ART this raises when the response cannot be priced (the caller still holds the
        response); unlike ART it first counts an unpriced call so the failure shows in the row.
        A response whose provider id was already recorded adds nothing and returns ``0.0``.

        Args:
            source: Cost source under the builder's cost context, e.g. ``"llm_judge"``.
            response: The SDK response object or its dict.
            provider: ``"openai"``, ``"anthropic"`` or another provider name.
            model_name: Model whose pricing applies.
            prompt_price_per_million: Override of P.
            completion_price_per_million: Override of O.
            cached_prompt_price_per_million: Override of C (OpenAI cached input).
            cache_creation_price_per_million: Override of W (Anthropic cache write).
            cache_read_price_per_million: Override of R (Anthropic cache read).

        Returns:
            The dollars recorded by this call, as a float.

        Raises:
            PricingError: The response could not be priced (an unpriced call was recorded).
            InvalidMetricError: ``source`` is empty.
        """
        overrides = PriceOverrides.create(
            prompt_price_per_million=prompt_price_per_million,
            completion_price_per_million=completion_price_per_million,
            cached_prompt_price_per_million=cached_prompt_price_per_million,
            cache_creation_price_per_million=cache_creation_price_per_million,
            cache_read_price_per_million=cache_read_price_per_million,
        )
        cost = self._record_response_cost(
            self._api_cost_path(source),
            response,
            provider=normalize_provider(provider),
            model_name=normalize_model_name(model_name),
            overrides=overrides,
        )
        return float(cost)

    def _record_response_cost(
        self,
        path: str,
        response: Any,
        *,
        provider: str,
        model_name: str,
        overrides: PriceOverrides,
    ) -> Decimal:
        """Price and record one response; count an unpriced call and re-raise on failure."""
        registry = self._pricing()
        try:
            priced = registry.price_response(
                response, provider=provider, model_name=model_name, overrides=overrides
            )
        except Exception:
            self._add_unpriced_call(path)
            raise
        key = f"{provider}:{priced.response_id}" if priced.response_id is not None else None
        if key is not None and not registry.claim_response_id(key):
            return Decimal(0)
        try:
            self._add_cost_leaf(path, priced.cost, response_id=key)
        except Exception:
            if key is not None:
                registry.forget_response_id(key)
            self._add_unpriced_call(path)
            raise
        return priced.cost

    def register_cost_extractor(self, provider: str, extractor: CostExtractor) -> None:
        """Use ``extractor(response) -> float | None`` for ``provider`` before token pricing."""
        self._pricing().register_cost_extractor(provider, extractor)

    def register_model_pricing(
        self,
        model_name: str,
        *,
        prompt_per_million: float | Decimal,
        completion_per_million: float | Decimal,
        cached_prompt_per_million: float | Decimal | None = None,
        cache_creation_per_million: float | Decimal | None = None,
        cache_read_per_million: float | Decimal | None = None,
    ) -> None:
        """Register prices (dollars per million tokens) for the exact ``model_name``.

        Raises:
            PricingError: Empty model name, or a price that is a bool, NaN, infinite or negative.
        """
        self._pricing().register_model_pricing(
            model_name,
            TokenPricing.create(
                prompt_per_million=prompt_per_million,
                completion_per_million=completion_per_million,
                cached_prompt_per_million=cached_prompt_per_million,
                cache_creation_per_million=cache_creation_per_million,
                cache_read_per_million=cache_read_per_million,
            ),
        )


# --------------------------------------------------------------------------- call spec


class _CallSpec:
    """What one decorator application prices, plus its pre-call check cache."""

    __slots__ = (
        "_checked",
        "check_pricing",
        "max_cost_usd",
        "model_name",
        "overrides",
        "provider",
        "request_getter",
        "response_getter",
        "source",
        "strict",
    )

    def __init__(
        self,
        *,
        source: str,
        provider: str,
        model_name: str,
        response_getter: ResponseGetter | None,
        overrides: PriceOverrides,
        strict: bool,
        check_pricing: bool,
        max_cost_usd: Decimal | None = None,
        request_getter: RequestGetter | None = None,
    ) -> None:
        self.max_cost_usd = max_cost_usd
        self.request_getter = request_getter
        self.source = source
        self.provider = provider
        self.model_name = model_name
        self.response_getter = response_getter
        self.overrides = overrides
        self.strict = strict
        self.check_pricing = check_pricing
        self._checked: weakref.WeakSet[PricingRegistry] = weakref.WeakSet()

    def _registry_of(self, builder: Any) -> PricingRegistry:
        getter = getattr(builder, "_pricing", None)
        registry = getter() if getter is not None else None
        return registry if isinstance(registry, PricingRegistry) else _FALLBACK_REGISTRY

    def can_price(self, builder: Any) -> bool:
        registry = self._registry_of(builder) if builder is not None else _FALLBACK_REGISTRY
        return registry.can_price(self.provider, self.model_name, self.overrides)

    def check_before_call(self, builder: Any) -> None:
        """Raise ``PricingError`` before the API call if the builder cannot price it."""
        if not self.check_pricing:
            return
        registry = self._registry_of(builder)
        if registry in self._checked:
            return
        if not registry.can_price(self.provider, self.model_name, self.overrides):
            raise PricingError(
                f"No pricing configured for model {self.model_name!r} "
                f"(provider {self.provider!r}, source {self.source!r}); refusing to make an API "
                "call that cannot be priced. Register it with register_model_pricing(), pass "
                "prompt_price_per_million and completion_price_per_million, or decorate with "
                "check_pricing=False if the response reports its own cost."
            )
        self._checked.add(registry)

    # recording ----------------------------------------------------------------------------

    def _path(self, builder: Any) -> str:
        return f"{str(builder.cost_context).strip('/')}/{self.source}"

    def _failed(self, builder: Any, exc: Exception, *, counted: bool) -> None:
        if not counted:
            builder._add_unpriced_call(self._path(builder))
        if self.strict:
            raise exc
        warnings.warn(
            UnpricedCallWarning(
                f"Recorded an unpriced call for costs/{self._path(builder)} "
                f"(model {self.model_name!r}, provider {self.provider!r}): {exc}"
            ),
            stacklevel=4,
        )

    def record(self, builder: Any, response: Any) -> Decimal | None:
        """Price and record a response; never raise unless strict. Returns the dollars
        recorded (``0`` for a response recorded before), ``None`` for an unpriced call."""
        try:
            if isinstance(builder, ApiCostMixin):
                return builder._record_response_cost(
                    self._path(builder),
                    response,
                    provider=self.provider,
                    model_name=self.model_name,
                    overrides=self.overrides,
                )
            o = self.overrides
            usd = builder.add_response_cost(
                self.source,
                response,
                provider=self.provider,
                model_name=self.model_name,
                prompt_price_per_million=o.prompt,
                completion_price_per_million=o.completion,
                cached_prompt_price_per_million=o.cached_prompt,
                cache_creation_price_per_million=o.cache_creation,
                cache_read_price_per_million=o.cache_read,
            )
            return None if usd is None else Decimal(repr(float(usd)))
        except Exception as exc:
            self._failed(builder, exc, counted=True)
            return None

    def record_result(
        self, builder: Any, result: Any, reservation: Reservation | None = None
    ) -> Any:
        """Record a finished call's result, or tap it if it is a stream; return what to return.

        ``reservation`` (the call's admission under a budget) is settled to the cost recorded,
        at once or when the stream ends."""
        if self.response_getter is None:
            target = result
        else:
            try:
                target = self.response_getter(result)
            except Exception as exc:
                _settle(reservation, None)
                self._failed(builder, exc, counted=False)
                return result
        kind = _stream_kind(target)
        if kind is None:
            cost: Decimal | None = None
            try:
                cost = self.record(builder, target)
            finally:
                _settle(reservation, cost)
            return result
        tapped = _tap(target, kind, _StreamRecorder(self, builder, reservation))
        return tapped if target is result else result

    def record_stream_end(self, builder: Any, accumulated: StreamUsage) -> Decimal | None:
        response = accumulated.response()
        if response is None:
            self._failed(
                builder,
                PricingError(
                    "Expected token usage in the stream but none arrived before it ended "
                    "(OpenAI chat streams need stream_options={'include_usage': True})"
                ),
                counted=False,
            )
            return None
        return self.record(builder, response)

    # admission ------------------------------------------------------------------------------

    def admission_of(self, builder: Any) -> Admission | None:
        """The builder's admission under a run budget, if it has one."""
        hook = getattr(builder, "_admission", None)
        return hook() if hook is not None else None

    def estimate(self, builder: Any, admission: Admission, args: Any, kwargs: Any) -> Decimal:
        """The call's upper-bound estimate in dollars (see :mod:`~art_ray_metrics.spend.
        estimate`).

        Raises:
            PricingError: Neither ``max_cost_usd`` nor a token price covers the model.
        """
        if self.max_cost_usd is not None:
            return self.max_cost_usd
        request = kwargs if self.request_getter is None else self.request_getter(*args, **kwargs)
        bound = request_bound(request, default_max_tokens=admission.default_max_tokens)
        registry = self._registry_of(builder)
        pricing = registry.registered_pricing(self.model_name)
        if pricing is not None or not self.overrides.is_complete:  # the full lookup order
            pricing = registry.resolve_pricing(
                self.provider,
                self.model_name,
                self.overrides,
                total_input_tokens=Decimal(bound.input_tokens),
            )
        else:  # the call's own prices: no price source is consulted on the hot path
            pricing = self.overrides.apply(None)
        if pricing is None:
            raise PricingError(
                f"Cannot estimate a call of model {self.model_name!r} (provider "
                f"{self.provider!r}, source {self.source!r}) under the run budget: no token "
                "price is known. Register its pricing or decorate with max_cost_usd=<dollars "
                "per call>; the call was not sent."
            )
        return estimate_cost(pricing, bound)

    def admit(self, builder: Any, args: Any, kwargs: Any) -> Reservation | None:
        """Reserve the call's estimate before it is sent (``None``: no budget)."""
        admission = self.admission_of(builder)
        if admission is None:
            return None
        return admission.reserve(self.estimate(builder, admission, args, kwargs))

    async def aadmit(self, builder: Any, args: Any, kwargs: Any) -> Reservation | None:
        """:meth:`admit` for coroutines (a wait for budget does not block the event loop)."""
        admission = self.admission_of(builder)
        if admission is None:
            return None
        return await admission.areserve(self.estimate(builder, admission, args, kwargs))


def _settle(reservation: Reservation | None, cost: Decimal | None) -> None:
    if reservation is not None:
        reservation.settle(cost)


# --------------------------------------------------------------------------- streams


class _StreamRecorder:
    """Observes chunks and records the cost exactly once when the stream finishes (settling
    the call's reservation under a budget to it)."""

    __slots__ = ("_builder", "_done", "_reservation", "_spec", "usage")

    def __init__(
        self, spec: _CallSpec, builder: Any, reservation: Reservation | None = None
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
            _settle(self._reservation, cost)


_SDK_MODULES = ("openai", "anthropic")


def _stream_kind(obj: Any) -> str | None:
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


def _tap(obj: Any, kind: str, recorder: _StreamRecorder) -> Any:
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


def _tapped_iter(inner: Iterator[Any], recorder: _StreamRecorder) -> Iterator[Any]:
    try:
        for item in inner:
            recorder.usage.observe(item)
            yield item
    finally:
        recorder.finish()


async def _tapped_aiter(inner: AsyncIterator[Any], recorder: _StreamRecorder) -> AsyncIterator[Any]:
    try:
        async for item in inner:
            recorder.usage.observe(item)
            yield item
    finally:
        recorder.finish()


def _tap_sync_stream(stream: Any, recorder: _StreamRecorder) -> None:
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


def _tap_async_stream(stream: Any, recorder: _StreamRecorder) -> None:
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

    def __init__(self, manager: Any, recorder: _StreamRecorder) -> None:
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

    def __init__(self, manager: Any, recorder: _StreamRecorder) -> None:
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


# --------------------------------------------------------------------------- decorator


def track_api_cost(
    *,
    source: str,
    provider: str,
    model_name: str,
    response_getter: ResponseGetter | None = None,
    prompt_price_per_million: float | Decimal | None = None,
    completion_price_per_million: float | Decimal | None = None,
    cached_prompt_price_per_million: float | Decimal | None = None,
    cache_creation_price_per_million: float | Decimal | None = None,
    cache_read_price_per_million: float | Decimal | None = None,
    strict: bool = False,
    check_pricing: bool = True,
    max_cost_usd: float | Decimal | None = None,
    request_getter: RequestGetter | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function that calls an LLM API so each call's cost is recorded.

    The cost goes to ``costs/<cost_context>/<source>`` of the builder active when the function
    is called (nothing is recorded without one). See the module docstring for streams,
    fail-before-pay, unpriced calls and idempotency.

    Args:
        source: Cost source, e.g. ``"llm_judge"``.
        provider: ``"openai"``, ``"anthropic"`` or another provider name.
        model_name: Model whose pricing applies.
        response_getter: Maps the function's result to the response to price. For generator
            functions it maps each yielded item to the chunk to observe.
        prompt_price_per_million: Override of P.
        completion_price_per_million: Override of O.
        cached_prompt_price_per_million: Override of C (OpenAI cached input).
        cache_creation_price_per_million: Override of W (Anthropic cache write).
        cache_read_price_per_million: Override of R (Anthropic cache read).
        strict: Raise pricing failures that happen after the call instead of warning.
        check_pricing: Check pricing at decoration and before each call (fail before paying).
        max_cost_usd: Under a run budget, the most one call can cost (reserved before it is
            sent); without it the estimate is computed from the request and the model's
            prices (:mod:`~art_ray_metrics.spend.estimate`).
        request_getter: Under a run budget, maps the function's arguments to the API
            request's keyword arguments to estimate from; by default the function's own
            keyword arguments are read (``messages``, ``max_tokens``, ...).

    Returns:
        The decorator; the wrapped function keeps its signature and sync/async nature.

    Raises:
        InvalidMetricError: ``source`` is empty (at decoration).
        PricingError: Empty provider/model, or an invalid price (at decoration); no pricing for
            the model (before the call).
        BudgetExceededError: Under a run budget, the call's estimate does not fit under the
            hard limit (before the call: nothing is sent).
    """
    spec = _CallSpec(
        source=_normalize_source(source),
        provider=normalize_provider(provider),
        model_name=normalize_model_name(model_name),
        response_getter=response_getter,
        overrides=PriceOverrides.create(
            prompt_price_per_million=prompt_price_per_million,
            completion_price_per_million=completion_price_per_million,
            cached_prompt_price_per_million=cached_prompt_price_per_million,
            cache_creation_price_per_million=cache_creation_price_per_million,
            cache_read_price_per_million=cache_read_price_per_million,
        ),
        strict=strict,
        check_pricing=check_pricing,
        max_cost_usd=None if max_cost_usd is None else to_decimal(max_cost_usd, "max_cost_usd"),
        request_getter=request_getter,
    )
    if check_pricing and not spec.can_price(get_active_builder()):
        warnings.warn(
            UnpricedModelWarning(
                f"No pricing configured for model {spec.model_name!r} (provider "
                f"{spec.provider!r}); calls of source {spec.source!r} will raise PricingError "
                "before the API call unless pricing is registered first"
            ),
            stacklevel=2,
        )

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        if inspect.isasyncgenfunction(func):
            return cast(Callable[P, R], _wrap_async_generator(func, spec))
        if inspect.isgeneratorfunction(func):
            return cast(Callable[P, R], _wrap_generator(func, spec))
        if inspect.iscoroutinefunction(func):
            return cast(Callable[P, R], _wrap_async(func, spec))
        return _wrap_sync(func, spec)

    return decorate


def _wrap_sync(func: Callable[P, R], spec: _CallSpec) -> Callable[P, R]:
    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        builder = get_active_builder()
        if builder is None:
            return func(*args, **kwargs)
        spec.check_before_call(builder)
        reservation = spec.admit(builder, args, kwargs)
        try:
            result = func(*args, **kwargs)
        except BaseException:
            _settle(reservation, ZERO)  # nothing came back: nothing to record
            raise
        return cast(R, spec.record_result(builder, result, reservation))

    return wrapper


def _wrap_async(func: Callable[P, Any], spec: _CallSpec) -> Callable[P, Any]:
    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        builder = get_active_builder()
        if builder is None:
            return await func(*args, **kwargs)
        spec.check_before_call(builder)
        reservation = await spec.aadmit(builder, args, kwargs)
        try:
            result = await func(*args, **kwargs)
        except BaseException:
            _settle(reservation, ZERO)
            raise
        return spec.record_result(builder, result, reservation)

    return wrapper


def _wrap_generator(func: Callable[P, Iterator[Any]], spec: _CallSpec) -> Callable[P, Any]:
    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Iterator[Any]:
        builder = get_active_builder()
        if builder is None:
            yield from func(*args, **kwargs)
            return
        spec.check_before_call(builder)
        recorder = _StreamRecorder(spec, builder, spec.admit(builder, args, kwargs))
        getter = spec.response_getter
        try:
            for item in func(*args, **kwargs):
                recorder.usage.observe(item if getter is None else getter(item))
                yield item
        finally:
            recorder.finish()

    return wrapper


def _wrap_async_generator(
    func: Callable[P, AsyncIterator[Any]], spec: _CallSpec
) -> Callable[P, Any]:
    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[Any]:
        builder = get_active_builder()
        if builder is None:
            async for item in func(*args, **kwargs):
                yield item
            return
        spec.check_before_call(builder)
        recorder = _StreamRecorder(spec, builder, await spec.aadmit(builder, args, kwargs))
        getter = spec.response_getter
        try:
            async for item in func(*args, **kwargs):
                recorder.usage.observe(item if getter is None else getter(item))
                yield item
        finally:
            recorder.finish()

    return wrapper


def bind_context(func: Callable[P, R]) -> Callable[P, R]:
    """Return ``func`` bound to a copy of the caller's context (active builder included).

    Threads start with an empty context, so a builder activated in the submitting thread is not
    active in a worker thread. Wrap the callable when submitting it::

        with builder.activate_context():
            executor.submit(bind_context(judge), item)

    Each call runs in a fresh copy of the captured context, so the result can be called from
    several threads at once.

    >>> from art_ray_metrics.core.active import set_active_builder, reset_active_builder
    >>> import threading
    >>> token = set_active_builder("b")
    >>> seen = []
    >>> t = threading.Thread(target=bind_context(lambda: seen.append(get_active_builder())))
    >>> t.start(); t.join(); reset_active_builder(token); seen
    ['b']
    """
    context = copy_context()

    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return context.copy().run(func, *args, **kwargs)

    return run
