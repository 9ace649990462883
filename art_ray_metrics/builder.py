"""``MetricsBuilder``: OpenPipe ART's in-process builder API on the exact core.

Porting from ART means changing the import::

    from art_ray_metrics import MetricsBuilder      # was: from art.metrics import MetricsBuilder

    builder = MetricsBuilder(cost_context="train")
    builder.add_cost("train/llm_judge/correctness", 0.0012)
    builder.add_data(step_actor_tokens=1200, scenario_ids=["s-1", "s-2"])
    row = await builder.flush()     # {"costs/train/llm_judge/correctness": 0.0012, "costs/all": ...}

Differences from ART, all on purpose and documented in the README:

- NaN, ±inf, ``bool`` and non-numeric values, and negative costs, raise
  :class:`~art_ray_metrics.errors.InvalidMetricError` (ART stores them or drops NaN later).
- Sums are exact decimals (``0.1 + 0.2`` is ``0.3``); rows hold the nearest floats.
- Unique scenarios are kept as 128-bit digests (16 bytes each), not strings.
- Leaf/ancestor conflict checks cost O(depth of the key), not O(pending keys).

:class:`LeafRecorder` holds the recording methods shared with the Ray worker-side builder
(:func:`art_ray_metrics.connect`): both only differ in where a validated leaf goes.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import Token
from decimal import Decimal
from typing import Any

from art_ray_metrics.core import active as _active
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.dedupe import DigestLedger, digest
from art_ray_metrics.core.rollup import to_decimal
from art_ray_metrics.core.samples import check_sample_key
from art_ray_metrics.core.state import CumulativeState, StepBuffer, close_buffer
from art_ray_metrics.core.tape import Number, PendingLeaves
from art_ray_metrics.errors import InvalidMetricError
from art_ray_metrics.spend.pricing import PricingRegistry
from art_ray_metrics.spend.track import ApiCostMixin

__all__ = ["LeafRecorder", "MetricsBuilder", "Number", "PendingLeaves"]

UNPRICED_CALLS_KEY = "data/step_unpriced_api_calls"
"""Counts API calls whose cost could not be determined (cumulative: data/cum/unpriced_api_calls)."""


def scenario_digests(scenario_ids: Iterable[Any]) -> list[bytes]:
    if isinstance(scenario_ids, (str, bytes)):
        raise InvalidMetricError(
            f"Expected scenario_ids as a list of ids but got a single string {scenario_ids!r}"
        )
    try:
        return [digest(s) for s in scenario_ids]
    except UnicodeEncodeError as exc:
        raise InvalidMetricError(
            f"Expected scenario ids that encode as UTF-8 but got {exc.object!r}"
        ) from None


def resolve_alias(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    """One of ``name`` (ours, ART 0.5.18's) and ``alias`` (ART's newer keyword for it).

    Raises:
        InvalidMetricError: both were given.
    """
    if alias_value is None:
        return value
    if value is not None:
        raise InvalidMetricError(
            f"Expected one of {name} and {alias} (the newer name of the same leaf) but got "
            f"both: {name}={value!r}, {alias}={alias_value!r}"
        )
    return alias_value


COST_KEYS: dict[str, str] = {}
"""Validated ``costs/<path>`` keys by path (paths repeat: the hot path is one dict lookup)."""


class LeafRecorder(ApiCostMixin):
    """ART's recording methods over four hooks: ``_record``, ``_record_scenarios``,
    ``_record_keyed_cost`` (a cost that must be applied once per provider response id) and
    ``_record_sample`` (a value averaged across rollouts)."""

    __slots__ = ()
    cost_context: str

    # -- hooks ----------------------------------------------------------------------------

    def _record(self, key: str, value: Number) -> None:
        raise NotImplementedError

    def _record_scenarios(self, digests: list[bytes]) -> None:
        raise NotImplementedError

    def _record_keyed_cost(self, key: str, value: Decimal, response_id: str) -> None:
        raise NotImplementedError

    def _record_sample(self, key: str, value: float) -> None:
        raise NotImplementedError

    def replay(self, pending: PendingLeaves) -> None:
        """Record another recorder's pending leaves here through the four hooks, with their
        exact values (the ART adapter hands the trainer's own leaves to a worker builder)."""
        for key, value in pending.sums().items():
            self._record(key, value)
        if pending.scenarios:
            self._record_scenarios(sorted(pending.scenarios))
        for cost in pending.keyed:
            self._record_keyed_cost(cost.key, cost.value, cost.response_id)
        for key, values in pending.samples.items():
            for v in values:
                self._record_sample(key, v)

    # -- ApiCostMixin host hooks ----------------------------------------------------------

    def _add_cost_leaf(self, path: str, usd: Decimal, *, response_id: str | None) -> None:
        key = V.validate_key(f"costs/{path}")
        V.check_value(key, usd)
        if response_id:
            self._record_keyed_cost(key, usd, response_id)
        else:
            self._record(key, usd)

    def _add_unpriced_call(self, path: str) -> None:
        self._record(UNPRICED_CALLS_KEY, Decimal(1))

    # -- ART's API ------------------------------------------------------------------------

    def add_metric(self, key: str, value: float) -> None:
        """Add ``value`` to leaf ``key`` of the current step (repeated writes are summed)."""
        V.validate_key(key)
        kind: type = type(value)
        if kind is float or kind is int:
            if value - value != 0 or (value < 0 and key.startswith("costs/")):
                V.check_value(key, value)  # raises, naming the key and the value
        elif kind is Decimal:
            V.check_value(key, value)
        else:
            value = V.check_value(key, value)
        self._record(key, value)

    def add_sample(self, key: str, value: float) -> None:
        """Record one per-rollout value of ``key``; the row gets the step's average.

        Where ``add_metric`` sums (four rollouts logging 0.5 give 2.0), the row of a sampled key
        holds the mean over every value of the step from every worker, as ART averages rewards
        and trajectory metrics, plus ``<key>_std_dev`` (population), ``<key>_count``,
        ``<key>_min`` and ``<key>_max``. A key is either summed or sampled within a step.

        Raises:
            InvalidMetricError: invalid key or non-finite value, or a key the builder sums
                (``costs/``, ``time/step_``, ``data/step_``, ``throughput/step_``).
            MetricConflictError: ``key`` is pending as a summed leaf.
        """
        check_sample_key(V.validate_key(key))
        self._record_sample(key, V.check_value(key, value, cost=False))

    def add_cost(self, path: str, usd: float) -> None:
        """Record ``usd`` dollars under ``costs/<path>``, e.g. ``train/llm_judge/correctness``."""
        key = COST_KEYS.get(path) if type(path) is str else None
        if key is None:
            if not isinstance(path, str) or not path.strip("/"):
                raise InvalidMetricError(f"Expected a non-empty cost path but got {path!r}")
            key = V.validate_key(f"costs/{path}")
            if len(COST_KEYS) < 65_536:
                COST_KEYS[path] = key
        self.add_metric(key, usd)

    def add_data(
        self,
        step_num_scenarios: int | None = None,
        step_actor_tokens: int | None = None,
        scenario_ids: Iterable[Any] | None = None,
        *,
        step_rollout_tokens: int | None = None,
    ) -> None:
        """Record scenario and token counts and the step's scenario ids (deduplicated run-wide).

        ``step_rollout_tokens`` (ART's name after 0.5.18) records ``data/step_actor_tokens``.
        """
        step_actor_tokens = resolve_alias(
            "step_actor_tokens", step_actor_tokens, "step_rollout_tokens", step_rollout_tokens
        )
        digests = scenario_digests(scenario_ids) if scenario_ids is not None else None
        if step_num_scenarios is not None:
            self.add_metric("data/step_num_scenarios", step_num_scenarios)
        if step_actor_tokens is not None:
            self.add_metric("data/step_actor_tokens", step_actor_tokens)
        if digests:
            self._record_scenarios(digests)

    def add_user_timing(
        self,
        step_wall_s: float | None = None,
        step_actor_s: float | None = None,
        step_eval_s: float | None = None,
        *,
        step_rollout_s: float | None = None,
    ) -> None:
        """Record step timings in seconds under ``time/step_*``.

        ``step_rollout_s`` (ART's name after 0.5.18) records ``time/step_actor_s``.
        """
        step_actor_s = resolve_alias("step_actor_s", step_actor_s, "step_rollout_s", step_rollout_s)
        for key, value in (
            ("time/step_wall_s", step_wall_s),
            ("time/step_actor_s", step_actor_s),
            ("time/step_eval_s", step_eval_s),
        ):
            if value is not None:
                self.add_metric(key, value)

    def add_idle_times(
        self,
        step_trainer_idle_s: float | None = None,
        step_actor_idle_s: float | None = None,
        *,
        step_rollout_idle_s: float | None = None,
    ) -> None:
        """Record idle seconds under ``throughput/step_*_idle_s``.

        ``step_rollout_idle_s`` (ART's name after 0.5.18) records
        ``throughput/step_actor_idle_s``.
        """
        step_actor_idle_s = resolve_alias(
            "step_actor_idle_s", step_actor_idle_s, "step_rollout_idle_s", step_rollout_idle_s
        )
        if step_trainer_idle_s is not None:
            self.add_metric("throughput/step_trainer_idle_s", step_trainer_idle_s)
        if step_actor_idle_s is not None:
            self.add_metric("throughput/step_actor_idle_s", step_actor_idle_s)

    @contextmanager
    def measure(self, key: str) -> Iterator[None]:
        """Time the block and add the seconds to ``key``, also when the block raises."""
        V.validate_key(key)
        started = time.monotonic()
        try:
            yield
        finally:
            self.add_metric(key, time.monotonic() - started)

    def activate(self) -> Token[Any]:
        """Make this builder the one ``track_api_cost`` records into (in this context)."""
        return _active.set_active_builder(self)

    @contextmanager
    def activate_context(self) -> Iterator[Any]:
        """Activate this builder for the block, then restore the previous one."""
        token = self.activate()
        try:
            yield self
        finally:
            _active.reset_active_builder(token)


class _SharedState:
    """What every ``for_cost_context`` view of one builder shares."""

    __slots__ = ("buffers", "cum", "lock", "pricing")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.buffers: dict[str, PendingLeaves] = {}
        # state_dict() serialises the whole ledgers: no incremental-checkpoint journal to keep
        self.cum = CumulativeState(journal=False)
        self.pricing = PricingRegistry()


class MetricsBuilder(LeafRecorder):
    """In-process step metrics with ART's API, results and state format."""

    def __init__(
        self,
        cost_context: str,
        *,
        _shared_state: _SharedState | None = None,
        _buffer_scope: str | None = None,
    ) -> None:
        V.check_cost_context(cost_context)
        self.cost_context = cost_context
        self._buffer_scope = _buffer_scope if _buffer_scope is not None else cost_context
        self._shared = _shared_state if _shared_state is not None else _SharedState()

    # -- hooks ----------------------------------------------------------------------------

    def _pending(self) -> PendingLeaves:
        pending = self._shared.buffers.get(self._buffer_scope)
        if pending is None:
            pending = self._shared.buffers[self._buffer_scope] = PendingLeaves()
        return pending

    def _record(self, key: str, value: Number) -> None:
        pending = self._shared.buffers.get(self._buffer_scope)
        (pending or self._pending()).record(key, value)

    def _record_scenarios(self, digests: list[bytes]) -> None:
        self._pending().scenarios.update(digests)

    def _record_keyed_cost(self, key: str, value: Decimal, response_id: str) -> None:
        d = digest(response_id)
        if d in self._shared.cum.cost_ids or any(
            d in p.cost_ids for p in self._shared.buffers.values()
        ):
            return
        pending = self._pending()
        pending.record(key, value)
        pending.cost_ids.add(d)

    def _record_sample(self, key: str, value: float) -> None:
        self._pending().record_sample(key, value)

    def _pricing(self) -> PricingRegistry:
        return self._shared.pricing

    # -- ART's API ------------------------------------------------------------------------

    async def flush(self) -> dict[str, float]:
        """Close this builder's scope: return its row and fold it into the cumulative state."""
        async with self._shared.lock:
            pending = self._shared.buffers.pop(self._buffer_scope, None)
            buf = pending.to_buffer() if pending is not None else StepBuffer()
            return close_buffer(buf, self._shared.cum)

    @staticmethod
    def get_active() -> MetricsBuilder:
        """Return the active builder; raise ``LookupError`` if none is active (as ART)."""
        builder = _active.get_active_builder()
        if builder is None:
            raise LookupError("No active MetricsBuilder in this context")
        return builder  # type: ignore[no-any-return]

    def for_cost_context(
        self, cost_context: str, *, buffer_scope: str | None = None
    ) -> MetricsBuilder:
        """A view recording under another cost context (and buffer scope), sharing all state."""
        context = cost_context.strip() if isinstance(cost_context, str) else ""
        if not context:
            raise InvalidMetricError(f"Expected a non-empty cost_context but got {cost_context!r}")
        scope = buffer_scope.strip() if buffer_scope is not None else context
        if not scope:
            raise InvalidMetricError(f"Expected a non-empty buffer_scope but got {buffer_scope!r}")
        if context == self.cost_context and scope == self._buffer_scope:
            return self
        return MetricsBuilder(context, _shared_state=self._shared, _buffer_scope=scope)

    def state_dict(self) -> dict[str, Any]:
        """Cumulative state, JSON-serialisable.

        ``cum_state`` holds floats as in ART; ``cum_state_exact`` the exact decimals and
        ``unique_scenario_digests`` the base64 digests (ART's ``unique_scenario_ids`` strings are
        not kept: we store 16-byte digests).
        """
        cum = self._shared.cum
        return {
            "cum_state": {k: float(v) for k, v in cum.values.items()},
            "cum_state_exact": {k: str(v) for k, v in cum.values.items()},
            "unique_scenario_digests": base64.b64encode(cum.scenarios.to_bytes()).decode(),
            "response_id_digests": base64.b64encode(cum.cost_ids.to_bytes()).decode(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore cumulative state from ours or from ART's ``{"cum_state", "unique_scenario_ids"}``.

        Pending (unflushed) leaves are dropped, as in ART.
        """
        exact = state.get("cum_state_exact")
        if exact is not None:
            values = {str(k): Decimal(str(v)) for k, v in exact.items()}
        else:
            values = {}
            for k, v in state.get("cum_state", {}).items():
                values[str(k)] = to_decimal(V.check_value(str(k), v, cost=False))
        scenarios = DigestLedger(journal=False)
        scenarios.add_many(digest(s) for s in state.get("unique_scenario_ids", []))
        scenarios.add_bytes(base64.b64decode(state.get("unique_scenario_digests", "")))
        cost_ids = DigestLedger.from_bytes(
            base64.b64decode(state.get("response_id_digests", "")), journal=False
        )
        cum = self._shared.cum
        cum.values = values
        cum.scenarios = scenarios
        cum.cost_ids = cost_ids
        self._shared.buffers.clear()
