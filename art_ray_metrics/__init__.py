"""art_ray_metrics: OpenPipe ART's metrics taxonomy, aggregated across a Ray cluster.

In process (porting from ART is changing the import)::

    from art_ray_metrics import MetricsBuilder, track_api_cost

On a Ray cluster: the trainer calls :func:`start_aggregator` and ``handle.log(step)`` at each
step barrier; workers call :func:`connect` and record with the same methods.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from art_ray_metrics.builder import MetricsBuilder
from art_ray_metrics.config import AggregatorConfig, ClientConfig
from art_ray_metrics.distributed.actor import MetricsAggregator
from art_ray_metrics.distributed.batches import FlushResult
from art_ray_metrics.distributed.clients import close_clients, get_client
from art_ray_metrics.distributed.handle import AggregatorHandle, start_aggregator
from art_ray_metrics.distributed.record import WorkerBuilder, connect
from art_ray_metrics.errors import (
    AggregatorStartTimeoutError,
    AggregatorUnavailableError,
    BackPressureError,
    BarrierTimeoutError,
    CheckpointCorruptError,
    ConditionalWritesUnsupportedError,
    ConfigError,
    ConfigMismatchError,
    CredentialsRequiredError,
    FencedError,
    InvalidMetricError,
    LimitExceededError,
    MetricConflictError,
    MetricsError,
    PricingError,
    StorageError,
    WireFormatError,
)
from art_ray_metrics.spend.track import bind_context, track_api_cost

try:
    __version__ = version("art-ray-metrics")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

__all__ = [
    "AggregatorConfig",
    "AggregatorHandle",
    "AggregatorStartTimeoutError",
    "AggregatorUnavailableError",
    "BackPressureError",
    "BarrierTimeoutError",
    "CheckpointCorruptError",
    "ClientConfig",
    "ConditionalWritesUnsupportedError",
    "ConfigError",
    "ConfigMismatchError",
    "CredentialsRequiredError",
    "FencedError",
    "FlushResult",
    "InvalidMetricError",
    "LimitExceededError",
    "MetricConflictError",
    "MetricsAggregator",
    "MetricsBuilder",
    "MetricsError",
    "PricingError",
    "StorageError",
    "WireFormatError",
    "WorkerBuilder",
    "__version__",
    "bind_context",
    "close_clients",
    "connect",
    "get_client",
    "start_aggregator",
    "track_api_cost",
]
