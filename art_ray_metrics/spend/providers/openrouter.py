"""Routers that report the cost in the response (OpenRouter and compatible servers).

``usage.cost`` is a number (or an object with ``total_cost``); through the OpenAI SDK, whose
pydantic models keep unknown fields aside, the same value is ``usage.model_extra["cost"]``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

from art_ray_metrics.spend.base import Provider, cost_value, field_of

__all__ = ["PROVIDER", "direct_cost"]


def direct_cost(response: Any) -> Decimal | None:
    """``usage.cost`` or ``usage.model_extra["cost"]``, or ``None``.

    Raises:
        PricingError: The reported cost is NaN, infinite or negative.
    """
    usage = field_of(response, "usage")
    cost = cost_value(field_of(usage, "cost"), "usage.cost")
    if cost is not None:
        return cost
    model_extra = field_of(usage, "model_extra")
    return cost_value(field_of(model_extra, "cost"), "usage.model_extra['cost']")


PROVIDER: Final = Provider(name="openrouter", direct_cost=direct_cost)
