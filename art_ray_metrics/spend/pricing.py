"""Price one LLM API response in dollars: ``(provider, model, response) -> Decimal``.

Pure and synchronous; no I/O. Money is :class:`~decimal.Decimal` from the first price to the
returned cost; only the sink turns it into a float. What each provider's responses look like
(usage shapes, reported costs, list prices) lives in :mod:`art_ray_metrics.spend.providers`;
this module holds the order in which they are consulted.

Order in which a response is priced:

1. A cost the response reports itself (``usage.cost``, ``usage.model_extra["cost"]``, LiteLLM's
   response-cost header; see the providers' ``direct_cost``).
2. A cost extractor registered for the provider (``Callable[[response], float | None]``;
   ``None`` falls through).
3. Token usage × per-million prices. The prices come from, in order: pricing registered for the
   exact model name → :data:`BUILTIN_PRICING` → the providers' price sources (the
   ``genai-prices`` offline snapshot) → a :class:`~art_ray_metrics.errors.PricingError`
   "No pricing configured for model ...". Explicit price arguments replace single fields of
   whatever was found (and, when both the prompt and the completion price are given, are enough
   on their own).

Objects (SDK pydantic models) and plain dicts are both accepted. Token counts must be
non-negative finite numbers (``bool``, NaN, infinity and negatives raise ``PricingError``);
prices likewise.

What this does not price (a cost-accuracy caveat): per-request fees, web-search and tool fees,
audio/image token rates, service tiers (priority/flex/batch), Anthropic's 1-hour cache-write
rate (all cache writes are priced at W), and long-context tiers of models registered by hand.
Long-context tiers of ``genai-prices`` models *are* applied.

Worked example (ART's golden numbers):

>>> pricing = TokenPricing.create(prompt_per_million=2, completion_per_million=8,
...                               cached_prompt_per_million=0.5)
>>> usage = openai_chat_usage({"prompt_tokens": 2000, "completion_tokens": 100,
...                            "prompt_tokens_details": {"cached_tokens": 1500}})
>>> usage_cost(usage, pricing)
Decimal('0.00255')
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Final

from art_ray_metrics.errors import PricingError
from art_ray_metrics.spend.base import (
    ZERO,
    TokenPricing,
    TokenUsage,
    UsageKind,
    field_of,
    normalize_model_name,
    normalize_provider,
    opt_price,
    to_decimal,
)
from art_ray_metrics.spend.providers import (
    BUILTIN_PRICING,
    DIRECT_COSTS,
    PRICE_SOURCES,
    SHAPE_PARSERS,
    USAGE_PARSERS,
)
from art_ray_metrics.spend.providers.anthropic import ANTHROPIC_PROVIDER, anthropic_usage
from art_ray_metrics.spend.providers.genai import genai_token_pricing
from art_ray_metrics.spend.providers.openai import (
    OPENAI_PROVIDER,
    openai_chat_usage,
    openai_responses_usage,
)

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

_MILLION: Final = Decimal(1_000_000)

CostExtractor = Callable[[Any], "float | None"]
"""A provider-specific function that returns the dollar cost of a response, or ``None``."""


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
    return to_decimal(value, what)


# --------------------------------------------------------------------------- prices


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
            prompt=opt_price(prompt_price_per_million, "prompt_price_per_million"),
            completion=opt_price(completion_price_per_million, "completion_price_per_million"),
            cached_prompt=opt_price(
                cached_prompt_price_per_million, "cached_prompt_price_per_million"
            ),
            cache_creation=opt_price(
                cache_creation_price_per_million, "cache_creation_price_per_million"
            ),
            cache_read=opt_price(cache_read_price_per_million, "cache_read_price_per_million"),
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


# --------------------------------------------------------------------------- usage


def normalize_usage(response: Any, provider: str) -> TokenUsage:
    """Find and normalise the token usage of a response (or of a bare usage object).

    A known provider (``"openai"``: chat and Responses usage; ``"anthropic"``) reads its own
    usage shape; any other provider (OpenAI-compatible servers, routers) is matched by shape.

    Args:
        response: An SDK response, a dict, or a usage object/dict.
        provider: The provider name (normalised here).

    Returns:
        The normalised usage.

    Raises:
        PricingError: No usage, usage of another provider, or an invalid token count.
    """
    provider_name = normalize_provider(provider)
    usage = field_of(response, "usage")
    if usage is None:
        usage = response
    result: TokenUsage | None = None
    parser = USAGE_PARSERS.get(provider_name)
    if parser is not None:
        result = parser(usage)
    else:
        for by_shape in SHAPE_PARSERS:
            result = by_shape(usage)
            if result is not None:
                break
    if result is None:
        raise PricingError(
            f"Expected token usage of provider {provider_name!r} in the response but got "
            f"{type(response).__name__} with usage {usage if usage is not response else None!r}; "
            "pass the right provider/model pair or register a cost extractor"
        )
    return result


def usage_cost(usage: TokenUsage, pricing: TokenPricing) -> Decimal:
    """Dollar cost of ``usage`` at ``pricing``, exact.

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
    for direct_cost in DIRECT_COSTS:
        cost = direct_cost(response)
        if cost is not None:
            return cost
    return None


def extract_response_id(response: Any) -> str | None:
    """Return the provider's response id (``chatcmpl-…``, ``resp_…``, ``msg_…``) or ``None``.

    >>> extract_response_id({"id": "msg_01"})
    'msg_01'
    """
    value = field_of(response, "id")
    return value if isinstance(value, str) and value else None


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
        total_input_tokens: Decimal = ZERO,
    ) -> TokenPricing | None:
        """Find prices: registered → built-in → genai-prices, then apply ``overrides``.

        Returns:
            The pricing, or ``None`` if nothing prices the model.
        """
        name = normalize_model_name(model_name)
        base = self._model_pricing.get(name) or BUILTIN_PRICING.get(name)
        if base is None:
            provider_name = normalize_provider(provider)
            for source in PRICE_SOURCES:
                base = source(provider_name, name, total_input_tokens)
                if base is not None:
                    break
        return overrides.apply(base)

    def require_pricing(
        self,
        provider: str,
        model_name: str,
        overrides: PriceOverrides = NO_OVERRIDES,
        *,
        total_input_tokens: Decimal = ZERO,
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

        True if a cost extractor is registered for the provider or pricing resolves. Complete
        prices in ``overrides`` answer without a lookup (a price source such as LiteLLM can
        cost seconds to import, and nothing it returns could make the answer false).
        """
        if self.cost_extractor(provider) is not None or overrides.apply(None) is not None:
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
                cost = to_decimal(extracted, f"cost extractor result for {provider_name!r}")
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
