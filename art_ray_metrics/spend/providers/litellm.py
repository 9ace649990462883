"""LiteLLM: the response-cost header its proxy and SDK attach to a response.

``response._hidden_params["additional_headers"]["llm_provider-x-litellm-response-cost"]``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

from art_ray_metrics.spend.base import Provider, cost_value, field_of

__all__ = ["COST_HEADER", "PROVIDER", "direct_cost"]

COST_HEADER: Final = "llm_provider-x-litellm-response-cost"


def direct_cost(response: Any) -> Decimal | None:
    """The cost LiteLLM reported in its response header, or ``None``.

    Raises:
        PricingError: The reported cost is NaN, infinite or negative.
    """
    headers = field_of(field_of(response, "_hidden_params"), "additional_headers")
    return cost_value(field_of(headers, COST_HEADER), COST_HEADER)


PROVIDER: Final = Provider(name="litellm", direct_cost=direct_cost)
