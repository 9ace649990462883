"""LiteLLM: its response-cost header, and its model price map as the last price source.

Reported cost: ``response._hidden_params["additional_headers"]
["llm_provider-x-litellm-response-cost"]`` (set by LiteLLM's SDK and proxy).

Price map (used only when ``litellm`` is importable; install the ``[litellm]`` extra): the model
name goes to ``litellm.get_model_info(model_name)`` unchanged, exactly as OpenPipe ART does, so
LiteLLM resolves provider prefixes (``"gemini/gemini-2.0-flash"``, ``"gpt-4.1"``,
``"openai/gpt-4.1"``) the same way for both. The map's per-token float prices become per-million
Decimals through their shortest ``repr`` (``2.5e-06`` → ``Decimal("0.0000025")`` → ``2.5``), i.e.
the decimal literal written in LiteLLM's JSON, not the binary float's expansion. Mapping, as in
ART: ``input_cost_per_token`` → P, ``output_cost_per_token`` → O (both required),
``cache_read_input_token_cost`` → C and R, ``cache_creation_input_token_cost`` → W. Long-context
surcharges (``*_above_200k_tokens``) are not applied, as in ART.

Not consulted: ``huggingface/``, ``ollama/``, ``ollama_chat/``, ``github_copilot/`` and
``chatgpt/`` names, for which LiteLLM's lookup makes network requests (a $0 price, or a
device-login flow). Importing ``litellm`` fetches its remote price map unless
``LITELLM_LOCAL_MODEL_COST_MAP=True`` is set (the bundled copy is then used).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from art_ray_metrics.spend.base import Provider, TokenPricing, cost_value, field_of, to_decimal

__all__ = ["COST_HEADER", "PROVIDER", "direct_cost", "litellm_token_pricing"]

COST_HEADER: Final = "llm_provider-x-litellm-response-cost"
_MILLION: Final = Decimal(1_000_000)
_SKIPPED_PREFIXES: Final = (
    "huggingface/",
    "ollama/",
    "ollama_chat/",
    "github_copilot/",
    "chatgpt/",
)
_MISS: Final = object()
_cache: dict[str, TokenPricing | None] = {}
_lock = threading.Lock()


def direct_cost(response: Any) -> Decimal | None:
    """The cost LiteLLM reported in its response header, or ``None``.

    Raises:
        PricingError: The reported cost is NaN, infinite or negative.
    """
    headers = field_of(field_of(response, "_hidden_params"), "additional_headers")
    return cost_value(field_of(headers, COST_HEADER), COST_HEADER)


def _per_million(info: Mapping[str, Any], name: str) -> Decimal | None:
    value = info.get(name)
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, str):
            value = Decimal(value.strip())
        return to_decimal(value, name) * _MILLION
    except (InvalidOperation, ValueError):  # PricingError is a ValueError
        return None


def _model_info(model_name: str) -> Mapping[str, Any] | None:
    try:
        import litellm
    except ImportError:
        return None
    with _lock:
        # get_model_info prints a banner for names it cannot place; keep the console quiet.
        quiet = litellm.suppress_debug_info
        litellm.suppress_debug_info = True
        try:
            info = litellm.get_model_info(model_name)
        except Exception:
            return None
        finally:
            litellm.suppress_debug_info = quiet
    return info if isinstance(info, Mapping) else None


def litellm_token_pricing(model_name: str) -> TokenPricing | None:
    """LiteLLM's price-map entry for ``model_name`` as :class:`TokenPricing`, or ``None``.

    ``None`` when litellm is not installed, does not know the model, or lacks its input or
    output price. Cached per model name, misses included.
    """
    cached = _cache.get(model_name, _MISS)
    if cached is not _MISS:
        return cached  # type: ignore[return-value]
    result: TokenPricing | None = None
    if not model_name.lower().startswith(_SKIPPED_PREFIXES):
        info = _model_info(model_name)
        if info is not None:
            prompt = _per_million(info, "input_cost_per_token")
            completion = _per_million(info, "output_cost_per_token")
            if prompt is not None and completion is not None:
                read = _per_million(info, "cache_read_input_token_cost")
                result = TokenPricing(
                    prompt_per_million=prompt,
                    completion_per_million=completion,
                    cached_prompt_per_million=read,
                    cache_creation_per_million=_per_million(
                        info, "cache_creation_input_token_cost"
                    ),
                    cache_read_per_million=read,
                )
    with _lock:
        if len(_cache) > 4096:
            _cache.clear()
        _cache[model_name] = result
    return result


def _price_source(
    provider: str, model_name: str, total_input_tokens: Decimal
) -> TokenPricing | None:
    return litellm_token_pricing(model_name)


PROVIDER: Final = Provider(name="litellm", direct_cost=direct_cost, price_source=_price_source)
