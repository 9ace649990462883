"""genai-prices: the maintained offline price snapshot, consulted after built-in prices.

``input_mtok`` → P, ``output_mtok`` → O (missing means free, as in genai-prices),
``cache_read_mtok`` → C and R, ``cache_write_mtok`` → W. Long-context tiers are applied: the
tier is picked from the call's total input tokens, as genai-prices does.
"""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Final, cast

from art_ray_metrics.spend.base import (
    ZERO,
    Provider,
    TokenPricing,
    normalize_model_name,
    normalize_provider,
)

__all__ = ["PROVIDER", "genai_token_pricing"]

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
        result = (model_price, None if tiered else _genai_pricing(model_price, ZERO))
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
    provider: str, model_name: str, *, total_input_tokens: Decimal = ZERO
) -> TokenPricing | None:
    """Map the ``genai-prices`` snapshot's prices for a model onto :class:`TokenPricing`.

    Works offline with the bundled snapshot.

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
        completion_per_million=_genai_field(model_price, "output_mtok", total_input_tokens) or ZERO,
        cached_prompt_per_million=read,
        cache_creation_per_million=_genai_field(
            model_price, "cache_write_mtok", total_input_tokens
        ),
        cache_read_per_million=read,
    )


def _price_source(
    provider: str, model_name: str, total_input_tokens: Decimal
) -> TokenPricing | None:
    return genai_token_pricing(provider, model_name, total_input_tokens=total_input_tokens)


PROVIDER: Final = Provider(name="genai-prices", price_source=_price_source)
