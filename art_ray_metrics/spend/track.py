"""Record the dollar cost of LLM API calls: ``track_api_cost`` and the builders' pricing methods.

``@track_api_cost(source=..., provider=..., model_name=...)`` wraps a function that calls an LLM
API. After each call it prices the response (see :mod:`art_ray_metrics.spend.pricing`) and records
``costs/<cost_context>/<source>`` on the builder active in the current context
(:mod:`art_ray_metrics.core.active`). Builders get ART's ``add_response_cost``,
``register_cost_extractor`` and ``register_model_pricing`` from :class:`ApiCostMixin`
(:mod:`art_ray_metrics.spend.mixin`, re-exported here).

What the decorator handles:

* sync and async functions returning a response;
* functions returning an OpenAI or Anthropic stream (``Stream``/``AsyncStream``, Anthropic
  ``MessageStream``, OpenAI ``ChatCompletionStream``) or a ``*StreamManager``; sync and async
  generator functions. The caller gets the stream unchanged (how each kind is tapped:
  :mod:`art_ray_metrics.spend.streams`). Usage is read from the chunks as they pass (OpenAI: the
  final chunk's ``usage``, which needs ``stream_options={"include_usage": True}``; Responses:
  the ``response.completed`` event; Anthropic: ``message_start`` + ``message_delta``). The cost
  is recorded once, when the stream is exhausted, closed (``close()``, ``with``) or
  garbage-collected after the consumer stopped early; it prices the usage reported so far. A
  stream that ends without any usage is recorded as an **unpriced call** and warns. Generators
  (returned or decorated) are iterated through a new generator: ``send``/``throw`` are not
  forwarded.

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
with :func:`bind_context` (defined in :mod:`art_ray_metrics.core.active`, re-exported here) or
use ``contextvars.copy_context().run`` / ``asyncio.to_thread``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar, cast

from art_ray_metrics.core.active import bind_context, get_active_builder
from art_ray_metrics.errors import PricingError
from art_ray_metrics.spend.admission import Admission, Reservation
from art_ray_metrics.spend.base import ZERO, StreamUsage, to_decimal
from art_ray_metrics.spend.estimate import bound_cost, estimate_prices, token_bounds
from art_ray_metrics.spend.mixin import ApiCostMixin, normalize_source
from art_ray_metrics.spend.pricing import (
    PriceOverrides,
    PricingRegistry,
    normalize_model_name,
    normalize_provider,
)
from art_ray_metrics.spend.streams import StreamRecorder, settle, stream_kind, tap

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


# --------------------------------------------------------------------------- call spec


class _CallSpec:
    """What one decorator application prices, plus its pre-call check cache."""

    __slots__ = (
        "_checked",
        "_own_prices",
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
        own = overrides.apply(None)  # the call's own prices, when they are complete
        self._own_prices = None if own is None else estimate_prices(own)

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
                settle(reservation, None)
                self._failed(builder, exc, counted=False)
                return result
        kind = stream_kind(target)
        if kind is None:
            cost: Decimal | None = None
            try:
                cost = self.record(builder, target)
            finally:
                settle(reservation, cost)
            return result
        tapped = tap(target, kind, StreamRecorder(self, builder, reservation))
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
        tokens_in, tokens_out = token_bounds(request, admission.default_max_tokens)
        registry = self._registry_of(builder)
        prices = self._own_prices
        if prices is None or registry.registered_pricing(self.model_name) is not None:
            pricing = registry.resolve_pricing(  # the full lookup order
                self.provider,
                self.model_name,
                self.overrides,
                total_input_tokens=Decimal(tokens_in),
            )
            if pricing is None:
                raise PricingError(
                    f"Cannot estimate a call of model {self.model_name!r} (provider "
                    f"{self.provider!r}, source {self.source!r}) under the run budget: no "
                    "token price is known. Register its pricing or decorate with "
                    "max_cost_usd=<dollars per call>; the call was not sent."
                )
            prices = estimate_prices(pricing)
        # else the call's own prices: no price source is consulted on the hot path
        return bound_cost(prices, tokens_in, tokens_out)

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
        source=normalize_source(source),
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
    if check_pricing:
        _warn_if_unpriced(spec)
    return functools.partial(_wrap, spec=spec)


def _warn_if_unpriced(spec: _CallSpec) -> None:
    """The decoration-time check: warn when nothing can price the model yet."""
    if not spec.can_price(get_active_builder()):
        warnings.warn(
            UnpricedModelWarning(
                f"No pricing configured for model {spec.model_name!r} (provider "
                f"{spec.provider!r}); calls of source {spec.source!r} will raise PricingError "
                "before the API call unless pricing is registered first"
            ),
            stacklevel=3,
        )


def _wrap(func: Callable[P, R], spec: _CallSpec) -> Callable[P, R]:
    """Wrap ``func`` by its kind (async generator, generator, coroutine or plain function)."""
    if inspect.isasyncgenfunction(func):
        return cast(Callable[P, R], _wrap_async_generator(func, spec))
    if inspect.isgeneratorfunction(func):
        return cast(Callable[P, R], _wrap_generator(func, spec))
    if inspect.iscoroutinefunction(func):
        return cast(Callable[P, R], _wrap_async(func, spec))
    return _wrap_sync(func, spec)


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
            settle(reservation, ZERO)  # nothing came back: nothing to record
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
            settle(reservation, ZERO)
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
        recorder = StreamRecorder(spec, builder, spec.admit(builder, args, kwargs))
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
        recorder = StreamRecorder(spec, builder, await spec.aadmit(builder, args, kwargs))
        getter = spec.response_getter
        try:
            async for item in func(*args, **kwargs):
                recorder.usage.observe(item if getter is None else getter(item))
                yield item
        finally:
            recorder.finish()

    return wrapper
