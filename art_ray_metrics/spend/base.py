"""Value types every provider module shares: prices, usage, a stream's usage, a provider.

Pure and synchronous. Money and token counts are :class:`~decimal.Decimal`; floats enter through
their shortest ``repr`` (``0.3`` becomes ``Decimal("0.3")``), so list prices stay exact.

A provider module (``art_ray_metrics.spend.providers.<name>``) describes what it knows as one
:class:`Provider`; :mod:`art_ray_metrics.spend.providers` lists them in lookup order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any, Final

from art_ray_metrics.errors import PricingError

__all__ = [
    "ZERO",
    "Provider",
    "StreamUsage",
    "TokenPricing",
    "TokenUsage",
    "UsageKind",
    "cost_value",
    "field_of",
    "normalize_model_name",
    "normalize_provider",
    "to_decimal",
]

ZERO: Final = Decimal(0)


def field_of(container: Any, name: str) -> Any:
    """``container[name]`` for mappings, ``container.name`` otherwise; ``None`` when absent.

    >>> field_of({"a": 1}, "a"), field_of(None, "a")
    (1, None)
    """
    if container is None:
        return None
    if isinstance(container, Mapping):
        return container.get(name)
    return getattr(container, name, None)


def to_decimal(value: object, what: str) -> Decimal:
    """Convert a non-negative finite int/float/Decimal to Decimal or raise ``PricingError``."""
    if isinstance(value, bool):
        raise PricingError(f"Expected a non-negative number for {what} but got {value!r}")
    if isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise PricingError(f"Expected a finite number for {what} but got {value!r}")
        # repr() gives the shortest decimal that round-trips: 0.3 -> Decimal("0.3"), exact.
        result = Decimal(repr(value))
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise PricingError(f"Expected a finite number for {what} but got {value!r}")
        result = value
    else:
        raise PricingError(f"Expected a non-negative number for {what} but got {value!r}")
    if result < 0:
        raise PricingError(f"Expected a non-negative number for {what} but got {value!r}")
    return result


def normalize_provider(provider: str | None) -> str:
    """Return the provider name stripped and lower-cased.

    Raises:
        PricingError: The name is empty or not a string.

    >>> normalize_provider(" OpenAI ")
    'openai'
    """
    if not isinstance(provider, str) or not provider.strip():
        raise PricingError(f"Expected a non-empty provider name but got {provider!r}")
    return provider.strip().lower()


def normalize_model_name(model_name: str | None) -> str:
    """Return the model name stripped of surrounding whitespace (case is kept).

    Raises:
        PricingError: The name is empty or not a string.
    """
    if not isinstance(model_name, str) or not model_name.strip():
        raise PricingError(f"Expected a non-empty model_name but got {model_name!r}")
    return model_name.strip()


def opt_price(value: object, what: str) -> Decimal | None:
    """:func:`to_decimal`, passing ``None`` through."""
    return None if value is None else to_decimal(value, what)


def cost_value(value: Any, what: str) -> Decimal | None:
    """A cost a response reports: a number, a numeric string, or an object with ``total_cost``.

    Raises:
        PricingError: The reported cost is NaN, infinite or negative.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = Decimal(value.strip())
        except InvalidOperation:
            return None
    if isinstance(value, int | float | Decimal):
        return to_decimal(value, what)
    total = field_of(value, "total_cost")
    if total is None or isinstance(total, dict | list):
        return None
    return cost_value(total, f"{what}.total_cost")


# --------------------------------------------------------------------------- prices


@dataclass(frozen=True, slots=True)
class TokenPricing:
    """Dollar prices per million tokens of one model.

    Attributes:
        prompt_per_million: Uncached input tokens (P).
        completion_per_million: Output tokens (O).
        cached_prompt_per_million: OpenAI cached input tokens (C); ``None`` means P.
        cache_creation_per_million: Anthropic cache-write tokens (W); ``None`` means P.
        cache_read_per_million: Anthropic cache-read tokens (R); ``None`` means P.
    """

    prompt_per_million: Decimal
    completion_per_million: Decimal
    cached_prompt_per_million: Decimal | None = None
    cache_creation_per_million: Decimal | None = None
    cache_read_per_million: Decimal | None = None

    def __post_init__(self) -> None:
        for name in (
            "prompt_per_million",
            "completion_per_million",
            "cached_prompt_per_million",
            "cache_creation_per_million",
            "cache_read_per_million",
        ):
            value = getattr(self, name)
            if value is None and name not in ("prompt_per_million", "completion_per_million"):
                continue
            object.__setattr__(self, name, to_decimal(value, name))

    @classmethod
    def create(
        cls,
        *,
        prompt_per_million: float | Decimal,
        completion_per_million: float | Decimal,
        cached_prompt_per_million: float | Decimal | None = None,
        cache_creation_per_million: float | Decimal | None = None,
        cache_read_per_million: float | Decimal | None = None,
    ) -> TokenPricing:
        """Build a pricing from ints, floats or Decimals, validating each price.

        Raises:
            PricingError: A price is a bool, NaN, infinite or negative.
        """
        return cls(
            prompt_per_million=to_decimal(prompt_per_million, "prompt_per_million"),
            completion_per_million=to_decimal(completion_per_million, "completion_per_million"),
            cached_prompt_per_million=opt_price(
                cached_prompt_per_million, "cached_prompt_per_million"
            ),
            cache_creation_per_million=opt_price(
                cache_creation_per_million, "cache_creation_per_million"
            ),
            cache_read_per_million=opt_price(cache_read_per_million, "cache_read_per_million"),
        )


# --------------------------------------------------------------------------- usage


class UsageKind(Enum):
    """Which usage shape a response reported."""

    OPENAI_CHAT = "openai_chat"
    OPENAI_RESPONSES = "openai_responses"
    ANTHROPIC = "anthropic"


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of one response, split by the price that applies to each.

    Attributes:
        kind: The usage shape the counts came from.
        input_tokens: Input tokens billed at the prompt price (OpenAI: prompt minus cache;
            Anthropic: ``input_tokens``, which already excludes cache tokens).
        output_tokens: Output tokens (completion; includes reasoning tokens).
        cache_read_tokens: OpenAI cached prompt tokens or Anthropic cache-read tokens.
        cache_write_tokens: Anthropic cache-creation tokens, or OpenAI ``cache_write_tokens``.
    """

    kind: UsageKind
    input_tokens: Decimal
    output_tokens: Decimal
    cache_read_tokens: Decimal = ZERO
    cache_write_tokens: Decimal = ZERO

    @property
    def total_input_tokens(self) -> Decimal:
        """All input tokens (uncached + cache read + cache write)."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens


def count_of(container: Any, name: str) -> Decimal | None:
    """A token count field of a usage object, validated; ``None`` when absent."""
    value = field_of(container, name)
    return None if value is None else to_decimal(value, f"usage.{name}")


# --------------------------------------------------------------------------- streams


class StreamUsage:
    """Accumulates the response id and usage reported by the chunks of one stream.

    Provider observers (:attr:`Provider.observe_stream`) see each chunk first; what they hand
    back is read generically (its ``usage`` and ``id``).

    Attributes:
        response_id: The last response id seen.
        usage: The last ``usage`` object seen on a chunk.
        merged: Usage fields merged from incremental events (preferred over ``usage`` when set).
    """

    __slots__ = ("_observers", "merged", "response_id", "usage")

    def __init__(self, observers: tuple[StreamObserver, ...] = ()) -> None:
        self.response_id: str | None = None
        self.usage: Any = None
        self.merged: dict[str, Any] | None = None
        self._observers = observers

    def observe(self, item: Any) -> None:
        """Take in one chunk or event of the stream."""
        for observer in self._observers:
            item = observer(self, item)
            if item is None:
                return
        usage = field_of(item, "usage")
        if usage is not None:
            self.usage = usage
        self.set_id(field_of(item, "id"))

    def set_id(self, value: Any) -> None:
        """Remember ``value`` as the response id if it is a non-empty string."""
        if isinstance(value, str) and value:
            self.response_id = value

    def response(self) -> dict[str, Any] | None:
        """A response-shaped dict for pricing, or ``None`` if no usage was seen."""
        usage = self.merged if self.merged else self.usage
        if usage is None:
            return None
        return {"id": self.response_id, "usage": usage}


StreamObserver = Callable[[StreamUsage, Any], Any]
"""Sees a stream chunk; returns the object to read ``usage``/``id`` from, or ``None`` if done."""

UsageParser = Callable[[Any], "TokenUsage | None"]
PriceSource = Callable[[str, str, Decimal], "TokenPricing | None"]
"""``(provider, model_name, total_input_tokens) -> TokenPricing | None``."""
DirectCost = Callable[[Any], "Decimal | None"]


@dataclass(frozen=True, slots=True)
class Provider:
    """What one provider module knows; every field is optional.

    Attributes:
        name: The provider name users pass (``provider="openai"``), or a source name.
        parse_usage: Reads the usage of a response from this provider (``None`` if it has none).
        usage_by_shape: Recognises this provider's usage when the provider name is unknown
            (OpenAI-compatible servers, routers); ``None`` when it is not this shape.
        observe_stream: Taps this provider's stream events (see :class:`StreamUsage`).
        direct_cost: Reads a cost the response reports about itself.
        prices: Built-in list prices by exact model name.
        price_source: Prices a model after registered and built-in prices fail.
    """

    name: str
    parse_usage: UsageParser | None = None
    usage_by_shape: UsageParser | None = None
    observe_stream: StreamObserver | None = None
    direct_cost: DirectCost | None = None
    prices: Mapping[str, TokenPricing] = field(default_factory=dict)
    price_source: PriceSource | None = None
