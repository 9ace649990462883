"""The trainer's own leaves under :func:`~art_ray_metrics.integrations.art.attach`: kept per
buffer scope between two ``model.log`` calls as ART's private builder keeps them, handed over
when ART's ``Model.log`` flushes, and replayed into a worker builder to reach the aggregator
(:meth:`~art_ray_metrics.builder.LeafRecorder.replay`).
"""

from __future__ import annotations

from decimal import Decimal

from art_ray_metrics.builder import LeafRecorder, Number, PendingLeaves
from art_ray_metrics.core import keys as K
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.records import KeyedCost
from art_ray_metrics.spend.pricing import PricingRegistry

__all__ = ["TrainerLeaves", "merge_pending"]


class TrainerLeaves(LeafRecorder):
    """The trainer's own leaves between two ``model.log`` calls, per buffer scope, as ART's
    private builder keeps them (shared by every cost-context view)."""

    def __init__(
        self,
        cost_context: str,
        scope: str,
        pending: dict[str, PendingLeaves],
        pricing: PricingRegistry,
    ) -> None:
        self.cost_context = V.check_cost_context(cost_context)
        self.scope = scope
        self.pending = pending
        self.pricing = pricing

    def _slot(self) -> PendingLeaves:
        slot = self.pending.get(self.scope)
        if slot is None:
            slot = self.pending[self.scope] = PendingLeaves()
        return slot

    def _record(self, key: str, value: Number) -> None:
        self._slot().record(key, value)

    def _record_scenarios(self, digests: list[bytes]) -> None:
        self._slot().scenarios.update(digests)

    def _record_keyed_cost(self, key: str, value: Decimal, response_id: str) -> None:
        self._slot().keyed.append(KeyedCost(key, value, response_id))

    def _record_sample(self, key: str, value: float) -> None:
        self._slot().record_sample(key, value)

    def _pricing(self) -> PricingRegistry:
        return self.pricing

    def for_cost_context(
        self, cost_context: str, *, buffer_scope: str | None = None
    ) -> TrainerLeaves:
        context = V.check_cost_context(cost_context)
        # a scope some barrier closes: model.metrics_builder("val") records into eval, which
        # the next val or test log ships (in ART its leaves would wait in "val" forever)
        scope = K.scope_for_cost_context(
            buffer_scope.strip() if buffer_scope is not None else context
        )
        if context == self.cost_context and scope == self.scope:
            return self
        return TrainerLeaves(context, scope, self.pending, self.pricing)


def merge_pending(into: PendingLeaves, other: PendingLeaves) -> None:
    """Add ``other``'s leaves to ``into`` (sums, scenarios, keyed costs and samples)."""
    for key, value in other.sums().items():
        into.record(key, value)
    into.scenarios |= other.scenarios
    into.keyed.extend(other.keyed)
    for key, values in other.samples.items():
        for v in values:
            into.record_sample(key, v)
