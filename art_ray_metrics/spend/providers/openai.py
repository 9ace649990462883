"""OpenAI: Chat Completions and Responses usage, their stream events, ART's GPT-4.1 price.

Usage shapes (prices per million tokens):

* Chat: ``usage.prompt_tokens`` (includes cached), ``usage.completion_tokens``,
  ``usage.prompt_tokens_details.cached_tokens`` (capped at the prompt tokens).
  cost = (prompt − cached)·P + cached·C + completion·O, C defaults to P.
  Newer API versions also report ``prompt_tokens_details.cache_write_tokens`` (part of the
  prompt); those are priced at W, which defaults to P.
* Responses: ``usage.input_tokens`` (includes cached), ``usage.output_tokens``,
  ``usage.input_tokens_details.cached_tokens`` (and ``cache_write_tokens``); same formula.

Streams: a chat stream's final chunk carries ``usage`` (with
``stream_options={"include_usage": True}``); ``.stream()`` wraps chunks in ``ChunkEvent``
(``type="chunk"``); the Responses API reports usage on the ``response.completed`` event.
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
from art_ray_metrics.spend.providers.anthropic import looks_like_anthropic

__all__ = ["OPENAI_PROVIDER", "PROVIDER", "openai_chat_usage", "openai_responses_usage"]

OPENAI_PROVIDER: Final = "openai"

# OpenAI API pricing page, GPT-4.1 (https://openai.com/api/pricing/, model launched 2025-04-14):
# $2.00 input, $0.50 cached input, $8.00 output per 1M tokens. One of the two names OpenPipe ART
# ships in art.api_costs.MODEL_TOKEN_PRICING (a LiteLLM-style name genai-prices does not match).
PRICES: Final = {
    "openai/gpt-4.1": TokenPricing.create(
        prompt_per_million=Decimal("2"),
        completion_per_million=Decimal("8"),
        cached_prompt_per_million=Decimal("0.5"),
    ),
}


def openai_chat_usage(usage: Any) -> TokenUsage | None:
    """Normalise OpenAI Chat Completions usage; ``None`` if it has none of its fields.

    Raises:
        PricingError: A token count is invalid.

    >>> openai_chat_usage({"prompt_tokens": 100, "completion_tokens": 50}).input_tokens
    Decimal('100')
    """
    details = field_of(usage, "prompt_tokens_details")
    return _openai_usage(
        UsageKind.OPENAI_CHAT,
        count_of(usage, "prompt_tokens"),
        count_of(usage, "completion_tokens"),
        count_of(details, "cached_tokens"),
        count_of(details, "cache_write_tokens"),
    )


def openai_responses_usage(usage: Any) -> TokenUsage | None:
    """Normalise OpenAI Responses API usage; ``None`` if it has none of its fields.

    Raises:
        PricingError: A token count is invalid.
    """
    details = field_of(usage, "input_tokens_details")
    return _openai_usage(
        UsageKind.OPENAI_RESPONSES,
        count_of(usage, "input_tokens"),
        count_of(usage, "output_tokens"),
        count_of(details, "cached_tokens"),
        count_of(details, "cache_write_tokens"),
    )


def _openai_usage(
    kind: UsageKind,
    prompt: Decimal | None,
    completion: Decimal | None,
    cached: Decimal | None,
    written: Decimal | None,
) -> TokenUsage | None:
    if prompt is None and completion is None and not cached and not written:
        return None
    total_prompt = prompt or ZERO
    cached_capped = min(cached or ZERO, total_prompt)
    written_capped = min(written or ZERO, total_prompt - cached_capped)
    return TokenUsage(
        kind=kind,
        input_tokens=total_prompt - cached_capped - written_capped,
        output_tokens=completion or ZERO,
        cache_read_tokens=cached_capped,
        cache_write_tokens=written_capped,
    )


def _chat_shaped(usage: Any) -> bool:
    return field_of(usage, "prompt_tokens") is not None or bool(
        field_of(usage, "completion_tokens")
    )


def parse_usage(usage: Any) -> TokenUsage | None:
    """Usage of a response from ``provider="openai"``: chat, else Responses."""
    result = openai_chat_usage(usage)
    if result is None and not looks_like_anthropic(usage):
        result = openai_responses_usage(usage)
    return result


def usage_by_shape(usage: Any) -> TokenUsage | None:
    """OpenAI-compatible usage of an unnamed provider: chat-shaped, or Responses-shaped."""
    if _chat_shaped(usage):
        return openai_chat_usage(usage)
    if looks_like_anthropic(usage):
        return None
    return openai_responses_usage(usage)


def observe_stream(acc: StreamUsage, item: Any) -> Any:
    """Unwrap ``ChunkEvent`` and ``response.*`` events to the object carrying usage and id."""
    kind = field_of(item, "type")
    if kind == "chunk" and field_of(item, "chunk") is not None:
        return field_of(item, "chunk")
    if isinstance(kind, str) and kind.startswith("response."):
        return field_of(item, "response")
    return item


PROVIDER: Final = Provider(
    name=OPENAI_PROVIDER,
    parse_usage=parse_usage,
    usage_by_shape=usage_by_shape,
    observe_stream=observe_stream,
    prices=PRICES,
)
