"""Price one LLM API response in dollars: ``(provider, model, response) -> Decimal``.

Pure and synchronous; no I/O. Money is :class:`~decimal.Decimal` from the first price to the
returned cost; only the sink turns it into a float.

Order in which a response is priced:

1. A cost the response reports itself: ``usage.cost`` (a number, or an object with
   ``total_cost``), ``usage.model_extra["cost"]``, or LiteLLM's
   ``_hidden_params["additional_headers"]["llm_provider-x-litellm-response-cost"]``.
2. A cost extractor registered for the provider (``Callable[[response], float | None]``;
   ``None`` falls through).
3. Token usage × per-million prices. The prices come from, in order: pricing registered for the
   exact model name → :data:`BUILTIN_PRICING` → the ``genai-prices`` offline snapshot → a
   :class:`~art_ray_metrics.errors.PricingError` "No pricing configured for model ...".
   Explicit price arguments replace single fields of whatever was found (and, when both the
   prompt and the completion price are given, are enough on their own).

Usage shapes and formulas (all prices per million tokens):

* OpenAI chat: ``usage.prompt_tokens`` (includes cached), ``usage.completion_tokens``,
  ``usage.prompt_tokens_details.cached_tokens`` (capped at the prompt tokens).
  cost = (prompt − cached)·P + cached·C + completion·O, C defaults to P.
  Newer API versions also report ``prompt_tokens_details.cache_write_tokens`` (part of the
  prompt); those are priced at W, which defaults to P, so the formula is unchanged unless a
  cache-write price is known (genai-prices maps it as genai-prices itself does).
* OpenAI Responses: ``usage.input_tokens`` (includes cached), ``usage.output_tokens``,
  ``usage.input_tokens_details.cached_tokens`` (and ``cache_write_tokens``); same formula.
* Anthropic: ``usage.input_tokens`` (excludes cache tokens), ``usage.output_tokens``,
  ``usage.cache_creation_input_tokens``, ``usage.cache_read_input_tokens``.
  cost = input·P + cache_creation·W + cache_read·R + output·O, W and R default to P.

Objects (SDK pydantic models) and plain dicts are both accepted. Token counts must be
non-negative finite numbers (``bool``, NaN, infinity and negatives raise ``PricingError``);
prices likewise.

What this does not price (a cost-accuracy caveat): per-request fees, web-search and tool fees,
audio/image token rates, service tiers (priority/flex/batch), Anthropic's 1-hour cache-write
rate (all cache writes are priced at W), and long-context tiers of models registered by hand.
Long-context tiers of ``genai-prices`` models *are* applied (the tier is picked from the total
input tokens, as ``genai-prices`` does).

Worked example (ART's golden numbers):

>>> pricing = TokenPricing.create(prompt_per_million=2, completion_per_million=8,
...                               cached_prompt_per_million=0.5)
>>> usage = openai_chat_usage({"prompt_tokens": 2000, "completion_tokens": 100,
...                            "prompt_tokens_details": {"cached_tokens": 1500}})
>>> usage_cost(usage, pricing)
Decimal('0.00255')
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any, Final, cast

from art_ray_metrics.errors import PricingError

__all__ = [
    "ANTHROPIC_PROVIDER",
    "BUILTIN_PRICING",
    "OPENAI_PROVIDER",
    "CostExtractor",
    "PriceOverrides",
    "PricedResponse",
    "PricingRegistry",
    "TokenPricing",
    "TokenUsage",
    "UsageKind",
    "anthropic_usage",
    "extract_direct_cost",
    "extract_response_id",
    "genai_token_pricing",
    "normalize_model_name",
    "normalize_provider",
    "normalize_usage",
    "openai_chat_usage",
    "openai_responses_usage",
    "to_price",
    "usage_cost",
]

OPENAI_PROVIDER: Final = "openai"
ANTHROPIC_PROVIDER: Final = "anthropic"
_MILLION: Final = Decimal(1_000_000)
_ZERO: Final = Decimal(0)
_LITELLM_COST_HEADER: Final = "llm_provider-x-litellm-response-cost"

CostExtractor = Callable[[Any], "float | None"]
"""A provider-specific function that returns the dollar cost of a response, or ``None``."""


# --------------------------------------------------------------------------- validation


def _to_decimal(value: object, what: str) -> Decimal:
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


def to_price(value: object, what: str = "price") -> Decimal:
    """Validate a price (dollars per million tokens, or dollars) and return it as Decimal.

    Args:
        value: An ``int``, ``float`` or ``Decimal``; not ``bool``, NaN, infinite or negative.
        what: Name used in the error message.

    Returns:
        The exact decimal value (floats go through their shortest ``repr``).

    Raises:
        PricingError: The value is not a finite non-negative number.

    >>> to_price(0.3)
    Decimal('0.3')
    """
    return _to_decimal(value, what)


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
            object.__setattr__(self, name, _to_decimal(value, name))

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
            prompt_per_million=_to_decimal(prompt_per_million, "prompt_per_million"),
            completion_per_million=_to_decimal(completion_per_million, "completion_per_million"),
            cached_prompt_per_million=_opt_price(
                cached_prompt_per_million, "cached_prompt_per_million"
            ),
            cache_creation_per_million=_opt_price(
                cache_creation_per_million, "cache_creation_per_million"
            ),
            cache_read_per_million=_opt_price(cache_read_per_million, "cache_read_per_million"),
        )


def _opt_price(value: object, what: str) -> Decimal | None:
    return None if value is None else _to_decimal(value, what)


@dataclass(frozen=True, slots=True)
class PriceOverrides:
    """Explicit per-call prices (``*_price_per_million`` arguments); ``None`` keeps the field."""

    prompt: Decimal | None = None
    completion: Decimal | None = None
    cached_prompt: Decimal | None = None
    cache_creation: Decimal | None = None
    cache_read: Decimal | None = None

    @classmethod
    def create(
        cls,
        *,
        prompt_price_per_million: float | Decimal | None = None,
        completion_price_per_million: float | Decimal | None = None,
        cached_prompt_price_per_million: float | Decimal | None = None,
        cache_creation_price_per_million: float | Decimal | None = None,
        cache_read_price_per_million: float | Decimal | None = None,
    ) -> PriceOverrides:
        """Validate the five optional ART price arguments.

        Raises:
            PricingError: A given price is a bool, NaN, infinite or negative.
        """
        return cls(
            prompt=_opt_price(prompt_price_per_million, "prompt_price_per_million"),
            completion=_opt_price(completion_price_per_million, "completion_price_per_million"),
            cached_prompt=_opt_price(
                cached_prompt_price_per_million, "cached_prompt_price_per_million"
            ),
            cache_creation=_opt_price(
                cache_creation_price_per_million, "cache_creation_price_per_million"
            ),
            cache_read=_opt_price(cache_read_price_per_million, "cache_read_price_per_million"),
        )

    @property
    def is_empty(self) -> bool:
        """Whether no price was given."""
        return (
            self.prompt is None
            and self.completion is None
            and self.cached_prompt is None
            and self.cache_creation is None
            and self.cache_read is None
        )

    @property
    def is_complete(self) -> bool:
        """Whether the overrides alone price a call (prompt and completion given)."""
        return self.prompt is not None and self.completion is not None

    def apply(self, base: TokenPricing | None) -> TokenPricing | None:
        """Return ``base`` with the given fields replaced (or the overrides alone if complete)."""
        if base is None:
            if self.prompt is None or self.completion is None:
                return None
            return TokenPricing(
                prompt_per_million=self.prompt,
                completion_per_million=self.completion,
                cached_prompt_per_million=self.cached_prompt,
                cache_creation_per_million=self.cache_creation,
                cache_read_per_million=self.cache_read,
            )
        if self.is_empty:
            return base
        return replace(
            base,
            prompt_per_million=_pick(self.prompt, base.prompt_per_million),
            completion_per_million=_pick(self.completion, base.completion_per_million),
            cached_prompt_per_million=_pick(self.cached_prompt, base.cached_prompt_per_million),
            cache_creation_per_million=_pick(self.cache_creation, base.cache_creation_per_million),
            cache_read_per_million=_pick(self.cache_read, base.cache_read_per_million),
        )


def _pick(override: Decimal | None, base: Any) -> Any:
    return base if override is None else override


NO_OVERRIDES: Final = PriceOverrides()

# Built-in list prices, looked up by exact model name after registered pricing and before
# genai-prices. Kept deliberately small: it pins the two names OpenPipe ART ships in
# art.api_costs.MODEL_TOKEN_PRICING (LiteLLM-style "provider/model" names, which genai-prices
# does not match), so ported code prices them exactly as ART does.
_VENDOR_PRICING: Final[Mapping[str, TokenPricing]] = {
    # OpenAI API pricing page, GPT-4.1 (https://openai.com/api/pricing/, model launched
    # 2025-04-14): $2.00 input, $0.50 cached input, $8.00 output per 1M tokens.
    "openai/gpt-4.1": TokenPricing.create(
        prompt_per_million=Decimal("2"),
        completion_per_million=Decimal("8"),
        cached_prompt_per_million=Decimal("0.5"),
    ),
    # Anthropic pricing page, Claude Sonnet (https://www.anthropic.com/pricing#api):
    # $3 input, $3.75 5-minute cache write, $0.30 cache read, $15 output per 1M tokens.
    "anthropic/claude-sonnet-4-6": TokenPricing.create(
        prompt_per_million=Decimal("3"),
        completion_per_million=Decimal("15"),
        cache_creation_per_million=Decimal("3.75"),
        cache_read_per_million=Decimal("0.30"),
    ),
}


# Hosted open-weight models (Tinker list prices per 1M tokens, prefill and sampling), the figures
# OpenPipe ART 0.5.18 falls back to (``art/costs.py``), so ported code pricing these names works.
_TINKER_PREFILL_SAMPLE: Final[Mapping[str, tuple[str, str]]] = {
    "Qwen/Qwen3.6-35B-A3B": ("0.36", "0.89"),
    "Qwen/Qwen3.6-27B": ("1.24", "3.73"),
    "Qwen/Qwen3.5-4B": ("0.22", "0.67"),
    "Qwen/Qwen3.5-27B": ("1.24", "3.73"),
    "Qwen/Qwen3.5-35B-A3B": ("0.36", "0.89"),
    "Qwen/Qwen3.5-397B-A17B": ("2", "5"),
    "Qwen/Qwen3.5-397B-A17B:peft:262144": ("4", "10"),
    "Qwen/Qwen3-4B-Instruct-2507": ("0.07", "0.22"),
    "Qwen/Qwen3-8B": ("0.13", "0.4"),
    "Qwen/Qwen3-8B-Base": ("0.13", "0.4"),
    "Qwen/Qwen3-30B-A3B": ("0.12", "0.3"),
    "Qwen/Qwen3-30B-A3B-Base": ("0.12", "0.3"),
    "Qwen/Qwen3-30B-A3B-Instruct-2507": ("0.12", "0.3"),
    "Qwen/Qwen3-32B": ("0.49", "1.47"),
    "Qwen/Qwen3-235B-A22B-Instruct-2507": ("0.68", "1.7"),
    "Qwen/Qwen3-VL-30B-A3B-Instruct": ("0.18", "0.44"),
    "Qwen/Qwen3-VL-235B-A22B-Instruct": ("1.02", "2.56"),
    "meta-llama/Llama-3.2-1B": ("0.03", "0.09"),
    "meta-llama/Llama-3.2-3B": ("0.06", "0.18"),
    "meta-llama/Llama-3.1-8B": ("0.13", "0.4"),
    "meta-llama/Llama-3.1-8B-Instruct": ("0.13", "0.4"),
    "meta-llama/Llama-3.1-70B": ("1.05", "3.16"),
    "meta-llama/Llama-3.3-70B-Instruct": ("1.05", "3.16"),
    "deepseek-ai/DeepSeek-V3.1": ("1.13", "2.81"),
    "deepseek-ai/DeepSeek-V3.1-Base": ("1.13", "2.81"),
    "openai/gpt-oss-120b": ("0.18", "0.44"),
    "openai/gpt-oss-120b:peft:131072": ("0.63", "1.54"),
    "openai/gpt-oss-20b": ("0.12", "0.3"),
    "moonshotai/Kimi-K2-Thinking": ("0.98", "2.44"),
    "moonshotai/Kimi-K2.5": ("1.47", "3.66"),
    "moonshotai/Kimi-K2.5:peft:131072": ("5.15", "12.81"),
    "moonshotai/Kimi-K2.6": ("1.47", "3.66"),
    "moonshotai/Kimi-K2.6:peft:131072": ("5.15", "12.81"),
    "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": ("0.13", "0.33"),
    "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16": ("0.38", "0.96"),
    "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16:peft:262144": ("0.76", "1.92"),
}
BUILTIN_PRICING: Final[Mapping[str, TokenPricing]] = {
    **_VENDOR_PRICING,
    **{
        name: TokenPricing.create(
            prompt_per_million=Decimal(prefill), completion_per_million=Decimal(sample)
        )
        for name, (prefill, sample) in _TINKER_PREFILL_SAMPLE.items()
    },
}


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
    cache_read_tokens: Decimal = _ZERO
    cache_write_tokens: Decimal = _ZERO

    @property
    def total_input_tokens(self) -> Decimal:
        """All input tokens (uncached + cache read + cache write)."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens


def _field(container: Any, name: str) -> Any:
    if container is None:
        return None
    if isinstance(container, Mapping):
        return container.get(name)
    return getattr(container, name, None)


def _count(container: Any, name: str) -> Decimal | None:
    value = _field(container, name)
    return None if value is None else _to_decimal(value, f"usage.{name}")


def _usage_of(response: Any) -> Any:
    """The usage object of a response, or the argument itself if it already is one."""
    usage = _field(response, "usage")
    return response if usage is None else usage


def openai_chat_usage(usage: Any) -> TokenUsage | None:
    """Normalise OpenAI Chat Completions usage; ``None`` if it has none of its fields.

    Raises:
        PricingError: A token count is invalid.

    >>> openai_chat_usage({"prompt_tokens": 100, "completion_tokens": 50}).input_tokens
    Decimal('100')
    """
    details = _field(usage, "prompt_tokens_details")
    return _openai_usage(
        UsageKind.OPENAI_CHAT,
        _count(usage, "prompt_tokens"),
        _count(usage, "completion_tokens"),
        _count(details, "cached_tokens"),
        _count(details, "cache_write_tokens"),
    )


def openai_responses_usage(usage: Any) -> TokenUsage | None:
    """Normalise OpenAI Responses API usage; ``None`` if it has none of its fields.

    Raises:
        PricingError: A token count is invalid.
    """
    details = _field(usage, "input_tokens_details")
    return _openai_usage(
        UsageKind.OPENAI_RESPONSES,
        _count(usage, "input_tokens"),
        _count(usage, "output_tokens"),
        _count(details, "cached_tokens"),
        _count(details, "cache_write_tokens"),
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
    total_prompt = prompt or _ZERO
    cached_capped = min(cached or _ZERO, total_prompt)
    written_capped = min(written or _ZERO, total_prompt - cached_capped)
    return TokenUsage(
        kind=kind,
        input_tokens=total_prompt - cached_capped - written_capped,
        output_tokens=completion or _ZERO,
        cache_read_tokens=cached_capped,
        cache_write_tokens=written_capped,
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
    inp = _count(usage, "input_tokens")
    out = _count(usage, "output_tokens")
    write = _count(usage, "cache_creation_input_tokens")
    read = _count(usage, "cache_read_input_tokens")
    if inp is None and out is None and not write and not read:
        return None
    return TokenUsage(
        kind=UsageKind.ANTHROPIC,
        input_tokens=inp or _ZERO,
        output_tokens=out or _ZERO,
        cache_read_tokens=read or _ZERO,
        cache_write_tokens=write or _ZERO,
    )


def _looks_like_anthropic(usage: Any) -> bool:
    return (
        _field(usage, "cache_creation_input_tokens") is not None
        or _field(usage, "cache_read_input_tokens") is not None
    )


def normalize_usage(response: Any, provider: str) -> TokenUsage:
    """Find and normalise the token usage of a response (or of a bare usage object).

    ``provider="openai"`` accepts chat and Responses usage; ``"anthropic"`` accepts Anthropic
    usage; any other provider (OpenAI-compatible servers, routers) is matched by shape.

    Args:
        response: An SDK response, a dict, or a usage object/dict.
        provider: The provider name (normalised here).

    Returns:
        The normalised usage.

    Raises:
        PricingError: No usage, usage of another provider, or an invalid token count.
    """
    provider_name = normalize_provider(provider)
    usage = _usage_of(response)
    result: TokenUsage | None
    if provider_name == OPENAI_PROVIDER:
        result = openai_chat_usage(usage)
        if result is None and not _looks_like_anthropic(usage):
            result = openai_responses_usage(usage)
    elif provider_name == ANTHROPIC_PROVIDER:
        result = None if _field(usage, "prompt_tokens") is not None else anthropic_usage(usage)
    elif _field(usage, "prompt_tokens") is not None or _field(usage, "completion_tokens"):
        result = openai_chat_usage(usage)
    elif _looks_like_anthropic(usage):
        result = anthropic_usage(usage)
    else:
        result = openai_responses_usage(usage)
    if result is None:
        raise PricingError(
            f"Expected token usage of provider {provider_name!r} in the response but got "
            f"{type(response).__name__} with usage {usage if usage is not response else None!r}; "
            "pass the right provider/model pair or register a cost extractor"
        )
    return result


def usage_cost(usage: TokenUsage, pricing: TokenPricing) -> Decimal:
    """Dollar cost of ``usage`` at ``pricing`` (the formulas in docs/design.md), exact.

    >>> p = TokenPricing.create(prompt_per_million=3, completion_per_million=15,
    ...                         cache_creation_per_million=3.75, cache_read_per_million=0.30)
    >>> usage_cost(anthropic_usage({"input_tokens": 100, "output_tokens": 50,
    ...     "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 500}), p)
    Decimal('0.00495')
    """
    prompt = pricing.prompt_per_million
    if usage.kind is UsageKind.ANTHROPIC:
        read_price = pricing.cache_read_per_million
    else:
        read_price = pricing.cached_prompt_per_million
    write_price = pricing.cache_creation_per_million
    total = (
        usage.input_tokens * prompt
        + usage.cache_read_tokens * (prompt if read_price is None else read_price)
        + usage.cache_write_tokens * (prompt if write_price is None else write_price)
        + usage.output_tokens * pricing.completion_per_million
    )
    return total / _MILLION


# --------------------------------------------------------------------------- direct cost, id


def _cost_value(value: Any, what: str) -> Decimal | None:
    """A reported cost: a number, a numeric string, or an object with ``total_cost``."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = Decimal(value.strip())
        except InvalidOperation:
            return None
    if isinstance(value, int | float | Decimal):
        return _to_decimal(value, what)
    total = _field(value, "total_cost")
    if total is None or isinstance(total, dict | list):
        return None
    return _cost_value(total, f"{what}.total_cost")


def extract_direct_cost(response: Any) -> Decimal | None:
    """Return the cost a response reports about itself, or ``None``.

    Looks at ``usage.cost``, ``usage.model_extra["cost"]`` and LiteLLM's response-cost header.

    Raises:
        PricingError: A reported cost is NaN, infinite or negative.

    >>> extract_direct_cost({"usage": {"cost": 0.0012}})
    Decimal('0.0012')
    >>> extract_direct_cost({"usage": {"prompt_tokens": 3}}) is None
    True
    """
    usage = _field(response, "usage")
    cost = _cost_value(_field(usage, "cost"), "usage.cost")
    if cost is not None:
        return cost
    model_extra = _field(usage, "model_extra")
    cost = _cost_value(_field(model_extra, "cost"), "usage.model_extra['cost']")
    if cost is not None:
        return cost
    headers = _field(_field(response, "_hidden_params"), "additional_headers")
    return _cost_value(_field(headers, _LITELLM_COST_HEADER), _LITELLM_COST_HEADER)


def extract_response_id(response: Any) -> str | None:
    """Return the provider's response id (``chatcmpl-…``, ``resp_…``, ``msg_…``) or ``None``.

    >>> extract_response_id({"id": "msg_01"})
    'msg_01'
    """
    value = _field(response, "id")
    return value if isinstance(value, str) and value else None


# --------------------------------------------------------------------------- genai-prices

_GenaiEntry = tuple[Any, "TokenPricing | None"]
_GENAI_MISS: Final = object()
_GENAI_TOKEN_FIELDS: Final = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
_genai_cache: dict[tuple[str, str, date], _GenaiEntry | None] = {}
_genai_lock = threading.Lock()


def _genai_model_price(provider: str, model_name: str) -> _GenaiEntry | None:
    """The genai-prices ``ModelPrice`` in force today and, unless it has tiers, its mapping.

    Cached per (provider, model, UTC day), misses included.
    """
    today = datetime.now(UTC).date()
    key = (provider, model_name, today)
    cached = _genai_cache.get(key, _GENAI_MISS)
    if cached is not _GENAI_MISS:
        return cast("_GenaiEntry | None", cached)
    model_price = _lookup_genai(provider, model_name)
    result: _GenaiEntry | None = None
    if model_price is not None:
        tiered = any(
            getattr(model_price, name, None) is not None
            and not isinstance(getattr(model_price, name), Decimal)
            for name in _GENAI_TOKEN_FIELDS
        )
        result = (model_price, None if tiered else _genai_pricing(model_price, _ZERO))
    with _genai_lock:
        if len(_genai_cache) > 4096:
            _genai_cache.clear()
        _genai_cache[key] = result
    return result


def _lookup_genai(provider: str, model_name: str) -> Any | None:
    try:
        from genai_prices import data_snapshot
    except ImportError:  # pragma: no cover - genai-prices is a dependency
        return None
    snapshot = data_snapshot.get_snapshot()
    refs = [model_name]
    prefix = f"{provider}/"
    if model_name.lower().startswith(prefix):
        refs.append(model_name[len(prefix) :])
    for provider_id in (provider, None):
        for ref in refs:
            try:
                _, model = snapshot.find_provider_model(ref, None, provider_id, None)
            except LookupError:
                continue
            return model.get_prices(datetime.now(UTC))
    return None


def _genai_field(model_price: Any, name: str, total_input: Decimal) -> Decimal | None:
    price = getattr(model_price, name, None)
    if price is None or isinstance(price, Decimal):
        return price
    # TieredPrices: the highest tier whose start the total input tokens exceed (as genai-prices).
    applicable: Decimal = price.base
    for tier in reversed(price.tiers):
        if total_input > tier.start:
            applicable = tier.price
            break
    return applicable


def genai_token_pricing(
    provider: str, model_name: str, *, total_input_tokens: Decimal = _ZERO
) -> TokenPricing | None:
    """Map the ``genai-prices`` snapshot's prices for a model onto :class:`TokenPricing`.

    ``input_mtok`` → P, ``output_mtok`` → O (missing means free, as in genai-prices),
    ``cache_read_mtok`` → C and R, ``cache_write_mtok`` → W. Long-context tiers are resolved for
    ``total_input_tokens``. Works offline with the bundled snapshot.

    Args:
        provider: Provider id (``"openai"``, ``"anthropic"``, ...); unknown ids fall back to
            genai-prices' own provider detection.
        model_name: Model reference; a ``"<provider>/"`` prefix is tolerated.
        total_input_tokens: Total input tokens of the call, to pick a tier.

    Returns:
        The pricing, or ``None`` when genai-prices does not know the model or has no token price.
    """
    entry = _genai_model_price(normalize_provider(provider), normalize_model_name(model_name))
    if entry is None:
        return None
    model_price, flat = entry
    return flat if flat is not None else _genai_pricing(model_price, total_input_tokens)


def _genai_pricing(model_price: Any, total_input_tokens: Decimal) -> TokenPricing | None:
    prompt = _genai_field(model_price, "input_mtok", total_input_tokens)
    if prompt is None:
        return None
    read = _genai_field(model_price, "cache_read_mtok", total_input_tokens)
    return TokenPricing(
        prompt_per_million=prompt,
        completion_per_million=_genai_field(model_price, "output_mtok", total_input_tokens)
        or _ZERO,
        cached_prompt_per_million=read,
        cache_creation_per_million=_genai_field(
            model_price, "cache_write_mtok", total_input_tokens
        ),
        cache_read_per_million=read,
    )


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class PricedResponse:
    """The result of pricing one response.

    Attributes:
        cost: Dollars, exact.
        method: ``"direct"``, ``"extractor"`` or ``"usage"``.
        response_id: The provider response id, if the response had one.
    """

    cost: Decimal
    method: str
    response_id: str | None


class PricingRegistry:
    """Registered model pricing and provider cost extractors, shared by a builder family.

    Also keeps a bounded, thread-safe ledger of response ids already recorded in this process
    (see :meth:`claim_response_id`), so re-recording a response costs once.

    Thread-safety: registration and claims take a lock; lookups read plain dicts, which is safe
    under the GIL because writers replace entries atomically.
    """

    def __init__(self, *, max_response_ids: int = 65_536) -> None:
        """Create an empty registry.

        Args:
            max_response_ids: How many recorded response ids to remember (oldest forgotten).
        """
        if isinstance(max_response_ids, bool) or max_response_ids < 1:
            raise PricingError(f"Expected a positive max_response_ids but got {max_response_ids!r}")
        self._lock = threading.Lock()
        self._model_pricing: dict[str, TokenPricing] = {}
        self._extractors: dict[str, CostExtractor] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._max_seen = max_response_ids

    # registration ---------------------------------------------------------------------------

    def register_model_pricing(self, model_name: str, pricing: TokenPricing) -> None:
        """Price ``model_name`` (exact name) with ``pricing``; replaces an earlier registration."""
        name = normalize_model_name(model_name)
        if not isinstance(pricing, TokenPricing):
            raise PricingError(f"Expected a TokenPricing but got {pricing!r}")
        with self._lock:
            self._model_pricing[name] = pricing

    def register_cost_extractor(self, provider: str, extractor: CostExtractor) -> None:
        """Use ``extractor(response) -> float | None`` for ``provider`` before token pricing."""
        if not callable(extractor):
            raise PricingError(f"Expected a callable cost extractor but got {extractor!r}")
        with self._lock:
            self._extractors[normalize_provider(provider)] = extractor

    def cost_extractor(self, provider: str) -> CostExtractor | None:
        """The extractor registered for ``provider``, if any."""
        return self._extractors.get(normalize_provider(provider))

    def registered_pricing(self, model_name: str) -> TokenPricing | None:
        """Pricing registered for exactly ``model_name``, if any."""
        return self._model_pricing.get(model_name.strip())

    # lookup ---------------------------------------------------------------------------------

    def resolve_pricing(
        self,
        provider: str,
        model_name: str,
        overrides: PriceOverrides = NO_OVERRIDES,
        *,
        total_input_tokens: Decimal = _ZERO,
    ) -> TokenPricing | None:
        """Find prices: registered → built-in → genai-prices, then apply ``overrides``.

        Returns:
            The pricing, or ``None`` if nothing prices the model.
        """
        name = normalize_model_name(model_name)
        base = self._model_pricing.get(name) or BUILTIN_PRICING.get(name)
        if base is None:
            base = genai_token_pricing(provider, name, total_input_tokens=total_input_tokens)
        return overrides.apply(base)

    def require_pricing(
        self,
        provider: str,
        model_name: str,
        overrides: PriceOverrides = NO_OVERRIDES,
        *,
        total_input_tokens: Decimal = _ZERO,
    ) -> TokenPricing:
        """Like :meth:`resolve_pricing` but raise when nothing prices the model.

        Raises:
            PricingError: "No pricing configured for model ...".
        """
        pricing = self.resolve_pricing(
            provider, model_name, overrides, total_input_tokens=total_input_tokens
        )
        if pricing is None:
            raise PricingError(
                f"No pricing configured for model {model_name!r} (provider {provider!r}): "
                "not registered, not built in, and unknown to genai-prices. Register it with "
                "register_model_pricing() or pass prompt_price_per_million and "
                "completion_price_per_million."
            )
        return pricing

    def can_price(
        self, provider: str, model_name: str, overrides: PriceOverrides = NO_OVERRIDES
    ) -> bool:
        """Whether a response of this model could be priced without its own reported cost.

        True if a cost extractor is registered for the provider or pricing resolves.
        """
        if self.cost_extractor(provider) is not None:
            return True
        return self.resolve_pricing(provider, model_name, overrides) is not None

    def price_response(
        self,
        response: Any,
        *,
        provider: str,
        model_name: str,
        overrides: PriceOverrides = NO_OVERRIDES,
    ) -> PricedResponse:
        """Price one response: direct cost → registered extractor → usage × pricing.

        Raises:
            PricingError: No pricing for the model, usage that does not match the provider,
                invalid token counts, or an extractor returning an invalid cost.
        """
        provider_name = normalize_provider(provider)
        normalize_model_name(model_name)
        rid = extract_response_id(response)
        direct = extract_direct_cost(response)
        if direct is not None:
            return PricedResponse(direct, "direct", rid)
        extractor = self._extractors.get(provider_name)
        if extractor is not None:
            extracted = extractor(response)
            if extracted is not None:
                cost = _to_decimal(extracted, f"cost extractor result for {provider_name!r}")
                return PricedResponse(cost, "extractor", rid)
        usage = normalize_usage(response, provider_name)
        pricing = self.require_pricing(
            provider_name, model_name, overrides, total_input_tokens=usage.total_input_tokens
        )
        return PricedResponse(usage_cost(usage, pricing), "usage", rid)

    # idempotency ----------------------------------------------------------------------------

    def forget_response_id(self, response_key: str) -> None:
        """Undo a :meth:`claim_response_id` whose recording failed."""
        with self._lock:
            self._seen.pop(response_key, None)

    def claim_response_id(self, response_key: str) -> bool:
        """Record ``response_key``; return False if it was already recorded (LRU-bounded)."""
        with self._lock:
            if response_key in self._seen:
                self._seen.move_to_end(response_key)
                return False
            self._seen[response_key] = None
            if len(self._seen) > self._max_seen:
                self._seen.popitem(last=False)
            return True
