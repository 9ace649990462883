"""The cost providers, one module each, in lookup order.

Adding a provider: write ``providers/<name>.py`` ending in ``PROVIDER = Provider(...)`` (see
:class:`art_ray_metrics.spend.base.Provider`) and add it to :data:`PROVIDERS`. Order matters
where providers overlap: direct costs and price sources are tried first to last.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from art_ray_metrics.spend.base import (
    DirectCost,
    PriceSource,
    Provider,
    StreamObserver,
    TokenPricing,
    UsageParser,
)
from art_ray_metrics.spend.providers import anthropic, genai, litellm, openai, openrouter, tinker

__all__ = [
    "BUILTIN_PRICING",
    "DIRECT_COSTS",
    "PRICE_SOURCES",
    "PROVIDERS",
    "SHAPE_PARSERS",
    "STREAM_OBSERVERS",
    "USAGE_PARSERS",
]

PROVIDERS: Final[tuple[Provider, ...]] = (
    openai.PROVIDER,
    anthropic.PROVIDER,
    openrouter.PROVIDER,
    tinker.PROVIDER,
    genai.PROVIDER,
    litellm.PROVIDER,  # after genai-prices: its price map is the last price source
)

BUILTIN_PRICING: Final[Mapping[str, TokenPricing]] = {
    name: pricing for p in PROVIDERS for name, pricing in p.prices.items()
}
"""Built-in list prices by exact model name (looked up after registered pricing)."""

USAGE_PARSERS: Final[Mapping[str, UsageParser]] = {
    p.name: p.parse_usage for p in PROVIDERS if p.parse_usage is not None
}
SHAPE_PARSERS: Final[tuple[UsageParser, ...]] = tuple(
    p.usage_by_shape for p in PROVIDERS if p.usage_by_shape is not None
)
STREAM_OBSERVERS: Final[tuple[StreamObserver, ...]] = tuple(
    p.observe_stream for p in PROVIDERS if p.observe_stream is not None
)
DIRECT_COSTS: Final[tuple[DirectCost, ...]] = tuple(
    p.direct_cost for p in PROVIDERS if p.direct_cost is not None
)
PRICE_SOURCES: Final[tuple[PriceSource, ...]] = tuple(
    p.price_source for p in PROVIDERS if p.price_source is not None
)
