"""The aggregator's own health as Ray metrics (``ray.util.metrics``), for Ray's dashboard,
Prometheus and Grafana.

The metrics are those the counter registry (:mod:`art_ray_metrics.core.counters`) declares
for ``ray``. Created inside the actor; every metric carries the tags ``aggregator`` (the actor name) and
``namespace``. Ray exports them from each node's metrics endpoint with a ``ray_`` prefix (and a
``_total`` suffix on counters). Counters are published as deltas of the aggregator's own
counters, at most once per :data:`PUBLISH_INTERVAL_S` from the actor's WAL loop and at every
barrier, so the ingest hot path makes no metric calls. Outside a Ray worker, or if Ray's metrics
fail, every method is a no-op: telemetry never breaks the aggregator. :class:`ActorReadings`
reads the values from the actor's stages by owner, for Ray and for the actor's own gauges (the
``telemetry/*`` keys of rows and ``stats()``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

from art_ray_metrics.core import counters as C
from art_ray_metrics.core import keys as K
from art_ray_metrics.core.meta import Health
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.durable.wal_writer import WalWriter
from art_ray_metrics.export.wandb_sink import WandbSink

__all__ = [
    "COUNTERS",
    "FAILURES",
    "GAUGES",
    "HISTOGRAMS",
    "PREFIX",
    "ActorReadings",
    "AggregatorTelemetry",
]

log = logging.getLogger(__name__)

PREFIX: Final = "art_metrics_"
PUBLISH_INTERVAL_S: Final = 1.0

_TABLE: Final = tuple(C.ray_table())

COUNTERS: Final[Mapping[str, str]] = {
    m.name: m.description for m in _TABLE if m.kind == "counter" and m.owner == "state"
}
"""Counter name (after :data:`PREFIX`) → description; fed from the aggregator's counters."""

FAILURES: Final[Mapping[str, str]] = {
    m.name: m.description for m in _TABLE if m.kind == "counter" and m.owner != "state"
}
"""Failure counters of the actor's storage (tagged by ``operation``) and of W&B."""

GAUGES: Final[Mapping[str, str]] = {m.name: m.description for m in _TABLE if m.kind == "gauge"}

HISTOGRAMS: Final[Mapping[str, str]] = {
    m.name: m.description for m in _TABLE if m.kind == "histogram"
}

_BOUNDARIES: Final = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class AggregatorTelemetry:
    """Ray metrics of one aggregator actor; methods never raise."""

    def __init__(self, aggregator: str, namespace: str) -> None:
        """Create the metrics if this process runs inside Ray; otherwise stay disabled."""
        self._metrics: dict[str, Any] = {}
        self._published: dict[str, float] = {}
        self._last_publish = 0.0
        ray = sys.modules.get("ray")  # not imported: certainly not inside a Ray worker
        if ray is None:
            return
        try:
            if not ray.is_initialized():
                return
            from ray.util import metrics as ray_metrics

            tags = {"aggregator": aggregator, "namespace": namespace}
            keys = tuple(tags)
            made: dict[str, Any] = {}
            for m in _TABLE:
                tag_keys = (*keys, "operation") if m.tagged else keys
                if m.kind == "histogram":
                    made[m.name] = ray_metrics.Histogram(
                        PREFIX + m.name,
                        description=m.description,
                        boundaries=_BOUNDARIES,
                        tag_keys=tag_keys,
                    )
                else:
                    kind = ray_metrics.Counter if m.kind == "counter" else ray_metrics.Gauge
                    made[m.name] = kind(
                        PREFIX + m.name, description=m.description, tag_keys=tag_keys
                    )
            for metric in made.values():
                metric.set_default_tags(tags)
        except Exception as exc:
            log.warning("art_ray_metrics: Ray metrics unavailable (%s); not exported", exc)
            return
        self._metrics = made

    @property
    def enabled(self) -> bool:
        """Whether metrics are exported."""
        return bool(self._metrics)

    def due(self) -> bool:
        """An unforced :meth:`publish` now would publish (the interval has passed): callers
        skip gathering the values otherwise (the WAL writer asks at every wake-up)."""
        return time.monotonic() - self._last_publish >= PUBLISH_INTERVAL_S

    def baseline(self, counters: Mapping[str, float]) -> None:
        """Values already counted before this process started (restored): not re-published."""
        self._published.update(counters)

    def publish(
        self,
        counters: Mapping[str, float],
        gauges: Mapping[str, float],
        *,
        force: bool = False,
    ) -> None:
        """Publish counter deltas and gauge values (at most once per interval unless ``force``).

        Args:
            counters: Running totals by counter name; ``storage_failures/<operation>`` names
                feed the ``storage_failures`` counter with that ``operation`` tag.
            gauges: Current gauge values by name.
            force: Publish even if the last publish was less than an interval ago.
        """
        if not self._metrics:
            return
        now = time.monotonic()
        if not force and now - self._last_publish < PUBLISH_INTERVAL_S:
            return
        self._last_publish = now
        try:
            for key, total in counters.items():
                delta = total - self._published.get(key, 0)
                self._published[key] = total
                if delta <= 0:  # nothing new, or a total that went back (a rewind): rebase
                    continue
                name, _, operation = key.partition("/")
                metric = self._metrics.get(name)
                if metric is not None:
                    metric.inc(delta, tags={"operation": operation} if operation else None)
            for name, value in gauges.items():
                metric = self._metrics.get(name)
                if metric is not None:
                    metric.set(value)
        except Exception as exc:
            self._disable(exc)

    def observe(self, name: str, seconds: float) -> None:
        """Record one latency of histogram ``name``."""
        metric = self._metrics.get(name)
        if metric is None:
            return
        try:
            metric.observe(seconds)
        except Exception as exc:
            self._disable(exc)

    def _disable(self, exc: Exception) -> None:
        log.warning("art_ray_metrics: Ray metrics failed (%s); no longer exported", exc)
        self._metrics = {}


class ActorReadings:
    """Every number the actor declares, read by owner (:mod:`~art_ray_metrics.core.counters`).

    Args:
        state: The aggregator's state (its counters and sizes).
        health: The actor's storage and loop health.
        wal: The write-ahead log's queue.
        telemetry: Where the Ray metrics go.
        wandb: The current W&B sink (None: off, or fenced).
    """

    def __init__(
        self,
        state: AggregatorState,
        health: Health,
        wal: WalWriter,
        telemetry: AggregatorTelemetry,
        wandb: Callable[[], WandbSink | None],
    ) -> None:
        self.state = state
        self.health = health
        self.wal = wal
        self.telemetry = telemetry
        self.wandb = wandb
        self.ingest_times: deque[float] = deque(maxlen=4096)

    def ingested(self) -> None:
        """One ingest call arrived (the ingest rate's gauge)."""
        self.ingest_times.append(time.monotonic())

    def publish(self, *, force: bool = False) -> None:
        """Push the counters and gauges declared for Ray (see :class:`AggregatorTelemetry`)."""
        if not self.telemetry.enabled or not (force or self.telemetry.due()):
            return
        sources = self.counted()
        totals = C.ray_values(sources, "counter")
        self.telemetry.publish(totals, C.ray_values(sources, "gauge"), force=force)

    def counted(self) -> dict[str, Mapping[str, float]]:
        """Every declared number by owner."""
        state = self.state
        sink = self.wandb()
        return {
            "state": {
                **state.counters,
                "pending_steps": len(state.pending),
                "producers": len(state.producers),
                "unique_scenarios": len(state.cum.scenarios),
            },
            "health": C.read("health", self.health),
            "actor": self.actor_values(),
            "wandb": C.read("wandb", sink) if sink is not None else C.zeros("wandb"),
        }

    def actor_values(self) -> dict[str, float]:
        """The actor's own gauges, by declared name."""
        now = time.monotonic()
        recent = sum(1 for t in self.ingest_times if now - t <= 10.0)
        queued = float(len(self.wal.queue))
        return {
            "ingest_batches_per_s": recent / 10.0,
            "wal_queue": queued,
            "wal_queue_batches": queued,
            "inflight_durable_calls": float(self.wal.inflight),
            "checkpoint_failures": float(self.health.checkpoint_failures),
            "restarts": float(max(self.state.meta.restarts, 0)),
        }

    def gauges(self) -> dict[str, float]:
        """The actor's gauges as ``telemetry/...`` keys (rows and ``stats()["gauges"]``)."""
        return C.row_values("actor", self.actor_values(), K.TELEMETRY_PREFIX)
