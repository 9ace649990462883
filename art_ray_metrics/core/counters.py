"""Every counter and gauge of the aggregator, declared once, and the views rendered from them.

Each :class:`Declared` names one number: what kind it is, who counts it (its *owner*), what it
means, and where it shows. The owners keep their numbers where they are counted (the state's
``counters`` map, the actor's :class:`~art_ray_metrics.core.meta.Health`, the W&B sink's own
attributes, the actor's gauges); the views below read them by name:

- ``row``: a closed row's ``telemetry/<name>`` keys (:func:`row_values`),
- ``stats``: ``stats()["counters"]``, ``["gauges"]`` and ``["health"]``,
- ``ray``: the Ray metrics of :mod:`art_ray_metrics.distributed.telemetry`
  (:func:`ray_table` to create them, :func:`ray_values` to feed them),
- ``wandb``: the sink's ``stats()`` (``telemetry/wandb/<name>``).

Adding a counter is one line in :data:`DECLARED` plus the line that counts it. The order of the
state's counters is the order of their map in checkpoints: append, never reorder.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "DECLARED",
    "HEALTH_FIELDS",
    "RAY_FAMILIES",
    "STATE_COUNTERS",
    "Declared",
    "RayMetric",
    "declared",
    "ray_table",
    "ray_values",
    "read",
    "row_values",
    "zeros",
]

Kind = Literal["counter", "gauge", "histogram"]
Owner = Literal["state", "close", "health", "actor", "wandb"]


@dataclass(frozen=True, slots=True)
class Declared:
    """One number the aggregator keeps.

    Attributes:
        name: Its name in its owner (a state counter key, a ``Health`` field, an actor gauge,
            a W&B sink attribute).
        kind: ``counter`` (a running total), ``gauge`` (a current value) or ``histogram``
            (latencies, Ray only).
        owner: Who counts it: ``state`` (``AggregatorState``), ``close`` (the close report of
            the row it shows in), ``health`` (the actor's ``Health``), ``actor`` (computed by
            the actor when shown) or ``wandb`` (the sink).
        description: What it counts (also the Ray metric's description).
        shows: Where it shows: any of ``row``, ``stats``, ``ray``, ``wandb``.
        ray: Its key in the Ray metrics when that differs from ``name``: ``family/tag`` feeds
            the counter ``family`` with that ``operation`` tag (see :data:`RAY_FAMILIES`).
    """

    name: str
    kind: Kind
    owner: Owner
    description: str
    shows: frozenset[str]
    ray: str | None = None

    @property
    def ray_key(self) -> str:
        """Its key in :func:`ray_values`."""
        return self.ray or self.name


def _d(
    name: str, kind: Kind, owner: Owner, shows: str, description: str, ray: str | None = None
) -> Declared:
    return Declared(name, kind, owner, description, frozenset(shows.split()), ray)


DECLARED: Final[tuple[Declared, ...]] = (
    # the state's counters: checkpointed, in rows as telemetry/<name> and in stats()["counters"]
    _d("batches", "counter", "state", "row stats ray",
       "Leaf batches applied (each (producer, seq) once)"),
    _d("duplicate_batches", "counter", "state", "row stats ray",
       "Batches received again (a resend) and acknowledged without applying"),
    _d("rejected_batches", "counter", "state", "row stats ray",
       "Batches rejected as malformed or of an unknown wire version"),
    _d("limit_rejections", "counter", "state", "row stats",
       "Batches with keys refused under max_keys_per_step / max_keys_per_run"),
    _d("leaves", "counter", "state", "row stats ray", "Leaves in the applied batches"),
    _d("late_leaves", "counter", "state", "row stats ray",
       "Leaves that arrived for a step already closed (folded into the next row)"),
    _d("conflicts", "counter", "state", "row stats ray",
       "Leaves whose key conflicts with an existing key (renamed)"),
    _d("duplicate_costs", "counter", "state", "row stats ray",
       "Cost leaves skipped because their response id was already applied"),
    _d("rows", "counter", "state", "row stats ray", "Rows produced (steps closed)"),
    _d("dropped_batches", "counter", "state", "row stats",
       "Batches a producer gave up at its retained-batch cap (never applied)"),
    # the state's sizes
    _d("pending_steps", "gauge", "state", "row ray",
       "Steps with received leaves that are not closed yet"),
    _d("producers", "gauge", "state", "row ray",
       "Producers (workers) that have sent at least one batch in this run"),
    _d("unique_scenarios", "gauge", "state", "ray", "Unique scenario ids in the run"),
    # one row's own counts (the close report), in that row only
    _d("late_leaves_in_row", "gauge", "close", "row", "Late leaves folded into this row"),
    _d("lost_leaves_in_row", "gauge", "close", "row",
       "Leaves of this row's step refused at ingest or given up at a producer's cap"),
    _d("conflicts_in_row", "gauge", "close", "row", "Keys renamed by conflicts in this row"),
    _d("producers_in_row", "gauge", "close", "row", "Distinct producer ids in this row"),
    # the actor's gauges: in rows as telemetry/<name> and in stats()["gauges"]
    _d("ingest_batches_per_s", "gauge", "actor", "row stats",
       "Batches received per second over the last 10 seconds"),
    _d("wal_queue", "gauge", "actor", "row stats", "Batches waiting for the write-ahead log"),
    _d("inflight_durable_calls", "gauge", "actor", "row stats",
       "Durable ingest calls waiting for a write-ahead-log write"),
    _d("checkpoint_failures", "gauge", "actor", "row stats",
       "Failed checkpoint commits (as stats()['health']['checkpoint_failures'])"),
    _d("restarts", "gauge", "actor", "row stats", "Starts of the aggregator after the first"),
    _d("wal_queue_batches", "gauge", "actor", "ray",
       "Applied batches not yet in the write-ahead log"),
    # the actor's health: stats()["health"] (Health's fields, in this order)
    _d("wal_writes", "counter", "health", "stats", "Write-ahead-log records written"),
    _d("wal_failures", "counter", "health", "stats ray", "Failed write-ahead-log appends",
       ray="storage_failures/wal"),
    _d("checkpoints", "counter", "health", "stats", "Checkpoints committed"),
    _d("checkpoint_failures", "counter", "health", "stats ray", "Failed checkpoint commits",
       ray="storage_failures/checkpoint"),
    _d("history_failures", "counter", "health", "stats ray", "Failed history row writes",
       ray="storage_failures/history"),
    _d("replayed_batches", "counter", "health", "stats",
       "Batches replayed from the write-ahead log at start"),
    _d("barrier_timeouts", "counter", "health", "stats",
       "Barriers whose expected producers did not all report in time"),
    _d("rewind_refused", "counter", "health", "stats",
       "Implicit rewinds refused or failed (the step was folded in as late)"),
    _d("backpressure", "counter", "health", "stats",
       "Ingests refused because the write-ahead queue was full"),
    _d("history_rejected", "counter", "health", "stats", "Rows the history refused"),
    _d("loop_restarts", "counter", "health", "stats", "Background loops restarted after an error"),
    # the W&B sink: stats()["wandb"] as telemetry/wandb/<name>
    _d("logged", "counter", "wandb", "wandb", "Rows accepted by run.log"),
    _d("failures", "counter", "wandb", "wandb ray",
       "Failed W&B calls (init, define_metric, log, finish)", ray="wandb_failures"),
    _d("dropped", "counter", "wandb", "wandb", "Rows dropped from the sink's bounded queue"),
    _d("pending", "gauge", "wandb", "wandb", "Rows waiting for W&B"),
    # latencies, Ray only (observed by the actor)
    _d("wal_commit_seconds", "histogram", "actor", "ray",
       "Time to append one write-ahead-log record to storage"),
    _d("checkpoint_commit_seconds", "histogram", "actor", "ray",
       "Time to commit one checkpoint to storage"),
    _d("barrier_seconds", "histogram", "actor", "ray",
       "Time of one step barrier (handle.log): close, checkpoint, history"),
)  # fmt: skip
"""The registry: every number, once."""

RAY_FAMILIES: Final[Mapping[str, str]] = {
    "storage_failures": "Failed object-storage writes, by operation (wal, checkpoint, history)",
}
"""Ray counters fed by several declared numbers, one ``operation`` tag each."""


def declared(owner: Owner, where: str | None = None, kind: Kind | None = None) -> list[Declared]:
    """The declarations of ``owner`` (that show in ``where``, of ``kind``), in registry order."""
    return [
        d
        for d in DECLARED
        if d.owner == owner
        and (where is None or where in d.shows)
        and (kind is None or d.kind == kind)
    ]


STATE_COUNTERS: Final[tuple[str, ...]] = tuple(d.name for d in declared("state", kind="counter"))
"""The state's counters, in the order of their checkpointed map."""

HEALTH_FIELDS: Final[tuple[str, ...]] = tuple(d.name for d in declared("health"))
"""The numeric fields of the actor's ``Health`` (its ``last_storage_error`` is a text)."""


def read(owner: Owner, source: object) -> dict[str, float]:
    """The numbers of ``owner`` read from the attributes of ``source`` (``Health``, the sink)."""
    return {d.name: float(getattr(source, d.name)) for d in declared(owner)}


def zeros(owner: Owner) -> dict[str, float]:
    """The numbers of ``owner``, all zero (an owner that does not exist, e.g. W&B off)."""
    return dict.fromkeys((d.name for d in declared(owner)), 0.0)


def row_values(owner: Owner, values: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``prefix + name`` → value for the numbers of ``owner`` that show in rows.

    ``values`` holds the owner's numbers by name; every declared one must be there.
    """
    return {prefix + d.name: float(values[d.name]) for d in declared(owner, "row")}


@dataclass(frozen=True, slots=True)
class RayMetric:
    """One Ray metric to create: its name (before the exporter's prefix), kind, description,
    whether it carries the ``operation`` tag, and the owner of what feeds it."""

    name: str
    kind: Kind
    description: str
    tagged: bool
    owner: Owner


def ray_table() -> Iterator[RayMetric]:
    """The Ray metrics to create, each once, in registry order."""
    seen: set[str] = set()
    for d in DECLARED:
        if "ray" not in d.shows:
            continue
        family, _, operation = d.ray_key.partition("/")
        if family in seen:
            continue
        seen.add(family)
        description = RAY_FAMILIES[family] if operation else d.description
        yield RayMetric(family, d.kind, description, bool(operation), d.owner)


def ray_values(sources: Mapping[str, Mapping[str, float]], kind: Kind) -> dict[str, float]:
    """Ray key → value of every number of ``kind`` shown in Ray, read from its owner's map in
    ``sources`` (``{"state": ..., "health": ..., "actor": ..., "wandb": ...}``)."""
    return {
        d.ray_key: float(sources[d.owner][d.name])
        for d in DECLARED
        if "ray" in d.shows and d.kind == kind
    }
