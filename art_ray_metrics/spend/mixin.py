"""The builders' pricing methods: :class:`ApiCostMixin` (ART's ``add_response_cost``,
``register_cost_extractor`` and ``register_model_pricing``) on top of three host hooks.

:func:`~art_ray_metrics.spend.track.track_api_cost` records through the same
``_record_response_cost`` when the active builder has this mixin, so a response priced by the
decorator and one passed to ``add_response_cost`` are recorded (and de-duplicated by response
id) the same way; see :mod:`art_ray_metrics.spend.track` for the guarantees.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from art_ray_metrics.errors import InvalidMetricError
from art_ray_metrics.spend.pricing import (
    CostExtractor,
    PriceOverrides,
    PricingRegistry,
    TokenPricing,
    normalize_model_name,
    normalize_provider,
)

__all__ = ["ApiCostMixin", "normalize_source"]


def normalize_source(source: str) -> str:
    """``source`` without surrounding slashes and spaces.

    Raises:
        InvalidMetricError: ``source`` is not a string or is empty.
    """
    if not isinstance(source, str) or not source.strip("/").strip():
        raise InvalidMetricError(f"Expected a non-empty cost source but got {source!r}")
    return source.strip().strip("/")


class ApiCostMixin:
    """Gives a builder ART's pricing methods on top of three host hooks.

    The host class provides ``cost_context: str`` and:

    * ``_pricing() -> PricingRegistry``: the registry shared by the builder family;
    * ``_add_cost_leaf(path, usd, *, response_id)``: record ``costs/<path>`` (``usd`` is a
      ``Decimal``); the aggregator applies a given ``response_id`` at most once per run;
    * ``_add_unpriced_call(path)``: count one unpriced call for ``costs/<path>``.
    """

    __slots__ = ()

    if TYPE_CHECKING:
        cost_context: str

        def _pricing(self) -> PricingRegistry: ...

        def _add_cost_leaf(self, path: str, usd: Decimal, *, response_id: str | None) -> None: ...

        def _add_unpriced_call(self, path: str) -> None: ...

    def _api_cost_path(self, source: str) -> str:
        return f"{self.cost_context.strip('/')}/{normalize_source(source)}"

    def add_response_cost(
        self,
        source: str,
        response: Any,
        *,
        provider: str,
        model_name: str,
        prompt_price_per_million: float | Decimal | None = None,
        completion_price_per_million: float | Decimal | None = None,
        cached_prompt_price_per_million: float | Decimal | None = None,
        cache_creation_price_per_million: float | Decimal | None = None,
        cache_read_price_per_million: float | Decimal | None = None,
    ) -> float | None:
        """Price ``response`` and record it as ``costs/<cost_context>/<source>``.

        As in ART this raises when the response cannot be priced (the caller still holds the
        response); unlike ART it first counts an unpriced call so the failure shows in the row.
        A response whose provider id was already recorded adds nothing and returns ``0.0``.

        Args:
            source: Cost source under the builder's cost context, e.g. ``"llm_judge"``.
            response: The SDK response object or its dict.
            provider: ``"openai"``, ``"anthropic"`` or another provider name.
            model_name: Model whose pricing applies.
            prompt_price_per_million: Override of P.
            completion_price_per_million: Override of O.
            cached_prompt_price_per_million: Override of C (OpenAI cached input).
            cache_creation_price_per_million: Override of W (Anthropic cache write).
            cache_read_price_per_million: Override of R (Anthropic cache read).

        Returns:
            The dollars recorded by this call, as a float.

        Raises:
            PricingError: The response could not be priced (an unpriced call was recorded).
            InvalidMetricError: ``source`` is empty.
        """
        overrides = PriceOverrides.create(
            prompt_price_per_million=prompt_price_per_million,
            completion_price_per_million=completion_price_per_million,
            cached_prompt_price_per_million=cached_prompt_price_per_million,
            cache_creation_price_per_million=cache_creation_price_per_million,
            cache_read_price_per_million=cache_read_price_per_million,
        )
        cost = self._record_response_cost(
            self._api_cost_path(source),
            response,
            provider=normalize_provider(provider),
            model_name=normalize_model_name(model_name),
            overrides=overrides,
        )
        return float(cost)

    def _record_response_cost(
        self,
        path: str,
        response: Any,
        *,
        provider: str,
        model_name: str,
        overrides: PriceOverrides,
    ) -> Decimal:
        """Price and record one response; count an unpriced call and re-raise on failure."""
        registry = self._pricing()
        try:
            priced = registry.price_response(
                response, provider=provider, model_name=model_name, overrides=overrides
            )
        except Exception:
            self._add_unpriced_call(path)
            raise
        key = f"{provider}:{priced.response_id}" if priced.response_id is not None else None
        if key is not None and not registry.claim_response_id(key):
            return Decimal(0)
        try:
            self._add_cost_leaf(path, priced.cost, response_id=key)
        except Exception:
            if key is not None:
                registry.forget_response_id(key)
            self._add_unpriced_call(path)
            raise
        return priced.cost

    def register_cost_extractor(self, provider: str, extractor: CostExtractor) -> None:
        """Use ``extractor(response) -> float | None`` for ``provider`` before token pricing."""
        self._pricing().register_cost_extractor(provider, extractor)

    def register_model_pricing(
        self,
        model_name: str,
        *,
        prompt_per_million: float | Decimal,
        completion_per_million: float | Decimal,
        cached_prompt_per_million: float | Decimal | None = None,
        cache_creation_per_million: float | Decimal | None = None,
        cache_read_per_million: float | Decimal | None = None,
    ) -> None:
        """Register prices (dollars per million tokens) for the exact ``model_name``.

        Raises:
            PricingError: Empty model name, or a price that is a bool, NaN, infinite or negative.
        """
        self._pricing().register_model_pricing(
            model_name,
            TokenPricing.create(
                prompt_per_million=prompt_per_million,
                completion_per_million=completion_per_million,
                cached_prompt_per_million=cached_prompt_per_million,
                cache_creation_per_million=cache_creation_per_million,
                cache_read_per_million=cache_read_per_million,
            ),
        )
