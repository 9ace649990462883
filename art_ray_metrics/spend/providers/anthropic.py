"""Anthropic: Messages usage with cache tokens, its stream events, ART's Claude Sonnet price.

Usage: ``usage.input_tokens`` (excludes cache tokens), ``usage.output_tokens``,
``usage.cache_creation_input_tokens``, ``usage.cache_read_input_tokens``.
cost = input·P + cache_creation·W + cache_read·R + output·O, W and R default to P.

Streams: ``message_start`` (and ``message_stop``) carry the message with its id and usage;
``message_delta`` events update the usage (output tokens grow as the message streams).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

from art_ray_metrics.spend.base import (
    ZERO,
    Provider,
    StreamUsage,
    TokenPricing,
    TokenUsage,
    UsageKind,
    count_of,
    field_of,
)

__all__ = ["ANTHROPIC_PROVIDER", "PROVIDER", "anthropic_usage", "looks_like_anthropic"]

ANTHROPIC_PROVIDER: Final = "anthropic"

# Anthropic pricing page, Claude Sonnet (https://www.anthropic.com/pricing#api): $3 input,
# $3.75 5-minute cache write, $0.30 cache read, $15 output per 1M tokens. One of the two names
# OpenPipe ART ships in art.api_costs.MODEL_TOKEN_PRICING.
PRICES: Final = {
    "anthropic/claude-sonnet-4-6": TokenPricing.create(
        prompt_per_million=Decimal("3"),
        completion_per_million=Decimal("15"),
        cache_creation_per_million=Decimal("3.75"),
        cache_read_per_million=Decimal("0.30"),
    ),
}

_USAGE_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def anthropic_usage(usage: Any) -> TokenUsage | None:
    """Normalise Anthropic Messages usage; ``None`` if it has none of its fields.

    Raises:
        PricingError: A token count is invalid.

    >>> u = anthropic_usage({"input_tokens": 100, "output_tokens": 50,
    ...                      "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 500})
    >>> u.total_input_tokens
    Decimal('1600')
    """
    inp = count_of(usage, "input_tokens")
    out = count_of(usage, "output_tokens")
    write = count_of(usage, "cache_creation_input_tokens")
    read = count_of(usage, "cache_read_input_tokens")
    if inp is None and out is None and not write and not read:
        return None
    return TokenUsage(
        kind=UsageKind.ANTHROPIC,
        input_tokens=inp or ZERO,
        output_tokens=out or ZERO,
        cache_read_tokens=read or ZERO,
        cache_write_tokens=write or ZERO,
    )


def looks_like_anthropic(usage: Any) -> bool:
    """Whether ``usage`` has Anthropic's cache-token fields."""
    return (
        field_of(usage, "cache_creation_input_tokens") is not None
        or field_of(usage, "cache_read_input_tokens") is not None
    )


def parse_usage(usage: Any) -> TokenUsage | None:
    """Usage of a response from ``provider="anthropic"`` (OpenAI-shaped usage is not)."""
    return None if field_of(usage, "prompt_tokens") is not None else anthropic_usage(usage)


def usage_by_shape(usage: Any) -> TokenUsage | None:
    """Anthropic usage of an unnamed provider, recognised by its cache-token fields."""
    return anthropic_usage(usage) if looks_like_anthropic(usage) else None


def observe_stream(acc: StreamUsage, item: Any) -> Any:
    """Merge ``message_start``/``message_stop``/``message_delta`` usage into ``acc.merged``."""
    kind = field_of(item, "type")
    if kind in ("message_start", "message_stop"):
        message = field_of(item, "message")
        if message is not None:
            acc.set_id(field_of(message, "id"))
            _merge(acc, field_of(message, "usage"), replace=True)
        return None
    if kind == "message_delta":
        _merge(acc, field_of(item, "usage"), replace=False)
        return None
    return item


def _merge(acc: StreamUsage, usage: Any, *, replace: bool) -> None:
    if usage is None:
        return
    merged = {} if replace or acc.merged is None else acc.merged
    for name in _USAGE_FIELDS:
        value = field_of(usage, name)
        if value is not None:
            merged[name] = value
    acc.merged = merged


PROVIDER: Final = Provider(
    name=ANTHROPIC_PROVIDER,
    parse_usage=parse_usage,
    usage_by_shape=usage_by_shape,
    observe_stream=observe_stream,
    prices=PRICES,
)
