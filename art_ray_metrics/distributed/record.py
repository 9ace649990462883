"""The record stage, worker side: ``connect(step)`` and the :class:`WorkerBuilder` it returns.

Life of a leaf::

    builder = connect(step)                      # cached per arguments: one dict lookup
    builder.add_cost("train/judge", 0.002)       # validated here; raises before anything is sent
      -> the client's tape                        # one atomic list.extend: no lock, no GC object
      -> MetricsClient: batches, acks, resends    # see distributed/client.py (the transport stage)

**The hot path takes no lock.** A valid leaf whose key is already registered for its slot is
one ``extend`` of the client's tape (:mod:`art_ray_metrics.core.tape`); the first use of a key
per slot goes through the client's lock, where it is checked against the slot's other keys
(:mod:`art_ray_metrics.core.keytree`), so a leaf/ancestor conflict raises at the call that
made it, even across batches (while the slot's registry is kept).

A builder uses the client through its public surface only: :meth:`MetricsClient.open_rollout`
(its context and the slot's registered keys), :attr:`MetricsClient.tape` and
:attr:`~MetricsClient.tape_cap`, the ``record_*`` methods (the slow paths), :meth:`ship`,
:meth:`rollout_range` and :meth:`flush_range` / :meth:`aflush_range`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from art_ray_metrics.builder import COST_KEYS, LeafRecorder, resolve_alias, scenario_digests
from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core import keys as K
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.outcome import group_digest
from art_ray_metrics.core.tape import Number
from art_ray_metrics.distributed.batches import FlushResult
from art_ray_metrics.distributed.client import MetricsClient
from art_ray_metrics.distributed.clients import get_client, named_config
from art_ray_metrics.distributed.workerenv import load_worker_env
from art_ray_metrics.errors import InvalidMetricError
from art_ray_metrics.spend.admission import Admission
from art_ray_metrics.spend.pricing import PricingRegistry

__all__ = ["WorkerBuilder", "connect"]

log = logging.getLogger(__name__)

_FAST = V.MAX_MAGNITUDE  # the fast paths' bound; larger values have their sums checked

# the fixed keys of add_data, add_user_timing and add_idle_times (none is a cost)
_NUM_SCENARIOS = V.validate_key("data/step_num_scenarios")
_ACTOR_TOKENS = V.validate_key("data/step_actor_tokens")
_WALL_S = V.validate_key("time/step_wall_s")
_ACTOR_S = V.validate_key("time/step_actor_s")
_EVAL_S = V.validate_key("time/step_eval_s")
_TRAINER_IDLE = V.validate_key("throughput/step_trainer_idle_s")
_ACTOR_IDLE = V.validate_key("throughput/step_actor_idle_s")


_DATA_KEYS = (_NUM_SCENARIOS, _ACTOR_TOKENS)
_TIMING_KEYS = (_WALL_S, _ACTOR_S, _EVAL_S)
_IDLE_KEYS = (_TRAINER_IDLE, _ACTOR_IDLE)


class WorkerBuilder(LeafRecorder):
    """ART's ``MetricsBuilder`` methods bound to one step and cost context, recording into
    the process-wide client. ``flush()`` blocks until this builder's leaves are durable;
    ``aflush()`` awaits it on the event loop.

    The hot path takes no lock: a valid leaf whose key is already registered for the step
    is one ``extend`` of the client's tape (see :class:`MetricsClient`)."""

    # one per rollout: no instance dict; __weakref__ keeps the builder weak-referenceable
    __slots__ = (
        "__weakref__",
        "_cap",
        "_ctx",
        "_known",
        "_rid",
        "_slot",
        "_tape",
        "client",
        "cost_context",
        "scope",
        "step",
    )

    def __init__(
        self,
        client: MetricsClient,
        step: int,
        cost_context: str,
        scope: str,
        _rollout: tuple[int, int, int] | None = None,
    ) -> None:
        self._bind(
            client,
            V.check_step(step),
            V.check_cost_context(cost_context),
            V.check_text("scope", scope),
            _rollout,
        )

    def _bind(
        self,
        client: MetricsClient,
        step: int,
        cost_context: str,
        scope: str,
        rollout: tuple[int, int, int] | None,
    ) -> None:
        """Set up from arguments already checked (``connect`` caches what it checked)."""
        self.client = client
        self.step = step
        self.cost_context = cost_context
        self.scope = scope
        ctx, self._known = client.open_rollout((step, scope), rollout)
        self._ctx = ctx
        # copies of what _ctx and the client hold, so the hot path reads one attribute each
        self._slot = slot = ctx[0]
        self._rid = rid = ctx[1]
        self._cap = client.tape_cap
        self._tape = tape = client.tape
        tape.extend((slot, rid, None, None))  # the next batch reports this producer for the step
        if len(tape) >= self._cap:
            client.ship()

    @property
    def _rollout(self) -> tuple[int, int, int]:
        """This builder's rollout (id, lo, generation), shared with its views."""
        return self._ctx[1:]

    # -- the hot path: validation inlined, then one atomic extend of the tape --------------

    def add_metric(self, key: str, value: float) -> None:
        """Add ``value`` to leaf ``key`` of this step (repeated writes are summed)."""
        kind = type(value)
        if (
            (kind is float or kind is int)
            and type(key) is str
            and self._known.get(key) is True  # registered for the step, so valid
            and -_FAST < value < _FAST  # finite, and no realistic sum can pass the bound
            and (value >= 0 or not key.startswith("costs/"))
        ):
            tape = self._tape
            tape.extend((self._slot, self._rid, key, value))
            if len(tape) >= self._cap:
                self.client.ship()
        else:
            super().add_metric(key, value)  # validates, raising with the key and value

    def add_cost(self, path: str, usd: float) -> None:
        """Record ``usd`` dollars under ``costs/<path>``, e.g. ``train/llm_judge/correctness``."""
        key = COST_KEYS.get(path) if type(path) is str else None
        if (
            key is not None
            and type(usd) is float
            and 0 <= usd < _FAST
            and self._known.get(key) is True
        ):
            tape = self._tape
            tape.extend((self._slot, self._rid, key, usd))
            if len(tape) >= self._cap:
                self.client.ship()
        else:
            super().add_cost(path, usd)

    def _put_fixed(self, keys: tuple[str, ...], values: tuple[object, ...]) -> bool:
        """Record each given value under its fixed key if all are plain ``int``/``float``
        inside the fast bound (known keys onto the tape, a new one registered first). Returns
        False, having recorded nothing, if one needs the general checks."""
        for value in values:
            if value is not None:
                kind = type(value)
                if not ((kind is float or kind is int) and -_FAST < value < _FAST):  # type: ignore[operator]
                    return False
        known = self._known
        tape = self._tape
        slot = self._slot
        rid = self._rid
        for i, value in enumerate(values):  # not zip(strict=True): that doubles the cost
            if value is not None:
                key = keys[i]
                if known.get(key) is True:
                    tape.extend((slot, rid, key, value))
                else:
                    self.client.record_into(self._ctx, key, value)  # type: ignore[arg-type]
        if len(tape) >= self._cap:
            self.client.ship()
        return True

    def add_data(
        self,
        step_num_scenarios: int | None = None,
        step_actor_tokens: int | None = None,
        scenario_ids: Iterable[Any] | None = None,
        *,
        step_rollout_tokens: int | None = None,
    ) -> None:
        """Record scenario and token counts and the step's scenario ids (deduplicated run-wide)."""
        step_actor_tokens = resolve_alias(
            "step_actor_tokens", step_actor_tokens, "step_rollout_tokens", step_rollout_tokens
        )
        # ids are digested before anything is recorded (a bad one raises); they are added
        # after the counts, as on the general path
        # (once: scenario_ids may be an iterator)
        digests = scenario_digests(scenario_ids) if scenario_ids is not None else None
        if digests and len(set(digests)) == 1:  # the rollout's one scenario: its default group
            self.client.set_group(self._ctx, digests[0], explicit=False)
        if not self._put_fixed(_DATA_KEYS, (step_num_scenarios, step_actor_tokens)):
            super().add_data(step_num_scenarios, step_actor_tokens)  # checks; may raise
            if digests:
                self._record_scenarios(digests)
        elif digests:
            self.client.record_scenarios(self._ctx, digests)

    def add_user_timing(
        self,
        step_wall_s: float | None = None,
        step_actor_s: float | None = None,
        step_eval_s: float | None = None,
        *,
        step_rollout_s: float | None = None,
    ) -> None:
        """Record step timings in seconds under ``time/step_*``."""
        step_actor_s = resolve_alias("step_actor_s", step_actor_s, "step_rollout_s", step_rollout_s)
        if not self._put_fixed(_TIMING_KEYS, (step_wall_s, step_actor_s, step_eval_s)):
            super().add_user_timing(step_wall_s, step_actor_s, step_eval_s)

    def add_idle_times(
        self,
        step_trainer_idle_s: float | None = None,
        step_actor_idle_s: float | None = None,
        *,
        step_rollout_idle_s: float | None = None,
    ) -> None:
        """Record idle seconds under ``throughput/step_*_idle_s``."""
        step_actor_idle_s = resolve_alias(
            "step_actor_idle_s", step_actor_idle_s, "step_rollout_idle_s", step_rollout_idle_s
        )
        if not self._put_fixed(_IDLE_KEYS, (step_trainer_idle_s, step_actor_idle_s)):
            super().add_idle_times(step_trainer_idle_s, step_actor_idle_s)

    def set_group(self, group_id: object) -> WorkerBuilder:
        """Name the trajectory group this rollout belongs to (any id; compared as a string).

        Its cost leaves then count as that group's spend, which the barrier splits by the fate
        the trainer gives the group (``handle.log(step, group_fates={group_id: fate})``:
        ``costs/outcome/<fate>``). Covers the rollout's views (``for_step``,
        ``for_cost_context``) and its leaves recorded from now on (not those recorded
        before): set it before the rollout's first paid call, or pass
        ``connect(step, group=...)``. Without it, a rollout's group is the scenario id it
        records with ``add_data(scenario_ids=[id])`` (one id), from then on. Returns ``self``.

        Raises:
            InvalidMetricError: ``None``, a bool or an empty id.
        """
        self.client.set_group(self._ctx, group_digest(group_id))
        return self

    def _record(self, key: str, value: Number) -> None:
        if -V.MAX_MAGNITUDE < value < V.MAX_MAGNITUDE:
            self.client.record_into(self._ctx, key, value)
        else:  # refuse a value whose pending sum would overflow, before it is accepted
            self.client.record_big(self._ctx, key, value)

    def _record_scenarios(self, digests: list[bytes]) -> None:
        self.client.record_scenarios(self._ctx, digests)

    def _record_keyed_cost(self, key: str, value: Decimal, response_id: str) -> None:
        self.client.record_keyed_cost(self._ctx, key, value, response_id)

    def _record_sample(self, key: str, value: float) -> None:
        self.client.record_sample(self._ctx, key, value)

    def _pricing(self) -> PricingRegistry:
        return self.client.pricing

    def _admission(self) -> Admission | None:
        """The process's admission under the run budget (``None``: no budget)."""
        return self.client.budget.active()

    def for_cost_context(
        self, cost_context: str, *, buffer_scope: str | None = None
    ) -> WorkerBuilder:
        """The same step under another cost context (and scope); flushed with this builder.
        The scope is the one a barrier closes (``val``/``test`` are ``eval``)."""
        context = V.check_cost_context(cost_context)
        scope = (
            closable_scope(context)
            if buffer_scope is None
            else K.scope_for_cost_context(buffer_scope)
        )
        return WorkerBuilder(self.client, self.step, context, scope, self._rollout)

    def for_step(self, step: int) -> WorkerBuilder:
        """The same cost context for another step; flushed with this builder."""
        return WorkerBuilder(self.client, step, self.cost_context, self.scope, self._rollout)

    def flush(self, timeout_s: float | None = None) -> FlushResult:
        """Ship this builder's leaves and wait until the aggregator holds them durably (other
        rollouts' batches are not waited for). Never raises on telemetry failure."""
        lo, hi = self.client.rollout_range(self._ctx)
        result = self.client.flush_range(lo, hi, timeout_s, self._ctx[1])
        if not result.ok:
            log.warning("art_ray_metrics: flush not confirmed durable: %s", result)
        return result

    async def aflush(self, timeout_s: float | None = None) -> FlushResult:
        """``flush`` for asyncio code: awaits the acknowledgements on the event loop."""
        lo, hi = self.client.rollout_range(self._ctx)
        result = await self.client.aflush_range(lo, hi, timeout_s, self._ctx[1])
        if not result.ok:
            log.warning("art_ray_metrics: flush not confirmed durable: %s", result)
        return result


def connect(
    step: int,
    cost_context: str = "train",
    *,
    split: str | None = None,
    name: str | None = None,
    namespace: str | None = None,
    producer_id: str | None = None,
    config: ClientConfig | None = None,
    group: object = None,
) -> WorkerBuilder:
    """A builder for one step in a worker, recording into the named aggregator.

    ``cost_context`` is the first segment under ``costs/`` for API costs; the buffer scope is
    ``scope_for_split(split)`` when a split is given, else ``scope_for_cost_context`` of the
    cost context (the context's own name, but ``val`` and ``test`` are ``eval``: a barrier
    always closes it); with no split, a context that is no split name (letters, digits, ``_``,
    ``.``) raises :class:`InvalidMetricError`, since no barrier could close its leaves. The
    actor is looked up lazily, on the first send. The first call in a Ray worker process
    also sets the variables the driver shares with ``AggregatorConfig.worker_env`` (API keys)
    that the process lacks, in ``os.environ``. ``group`` names the rollout's trajectory group
    (:meth:`WorkerBuilder.set_group`).
    """
    if group is not None:
        return connect(
            step,
            cost_context,
            split=split,
            name=name,
            namespace=namespace,
            producer_id=producer_id,
            config=config,
        ).set_group(group)
    cache_key = (cost_context, split, name, namespace, producer_id)
    cacheable = config is None
    if config is None:
        try:
            bound = _CONNECTED.get(cache_key)
        except TypeError:  # an unhashable argument: the checks below name it
            bound = None
        if (
            bound is not None
            and not bound[0].stopped.is_set()
            and type(step) is int
            and 0 <= step <= V.MAX_STEP
        ):
            builder = _new_builder(WorkerBuilder)
            builder._bind(bound[0], step, bound[1], bound[2], None)
            return builder
        config = named_config(name, namespace)
    elif name is not None or namespace is not None:
        updates = {k: v for k, v in (("name", name), ("namespace", namespace)) if v is not None}
        config = config.model_copy(update=updates)
    scope = K.scope_for_split(V.check_split(split)) if split is not None else None
    if scope is None:
        scope = closable_scope(V.check_cost_context(cost_context))
    # the API keys the driver shares (worker_env), before the rollout's code needs them
    env_ready = load_worker_env(config.name, config.namespace)
    builder = WorkerBuilder(get_client(config, producer_id=producer_id), step, cost_context, scope)
    if cacheable and env_ready and len(_CONNECTED) < 4096:
        _CONNECTED[cache_key] = (builder.client, builder.cost_context, builder.scope)
    return builder


def closable_scope(context: str) -> str:
    """The scope leaves recorded under ``context`` (with no split given) wait in, which the
    barrier of the split of that name closes; a context that is no split name could never be
    closed (its leaves would be acknowledged and then wait forever), so it is refused here.

    Raises:
        InvalidMetricError: ``context`` is not letters, digits, ``_`` or ``.``.
    """
    scope = K.scope_for_cost_context(context)
    try:
        V.check_split(scope)
    except InvalidMetricError:
        raise InvalidMetricError(
            f"cost_context {context!r} names no split (letters, digits, '_' or '.'), so no "
            "barrier could close its leaves; use such a name, or pass split= as well"
        ) from None
    return scope


_new_builder = object.__new__  # WorkerBuilder defines no __new__: skip the class lookup

_CONNECTED: dict[tuple[Any, ...], tuple[MetricsClient, str, str]] = {}
"""What ``connect`` checked, by its arguments: the client, cost context and scope. An entry
is used while its client runs (a closed client is replaced through :func:`get_client`)."""
