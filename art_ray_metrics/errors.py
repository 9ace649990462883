"""The exception tree of art_ray_metrics.

Every error the package raises on purpose derives from :class:`MetricsError`. Where OpenPipe
ART raises ``ValueError`` for the same input, ours also derives from ``ValueError`` so ported
``except ValueError`` blocks keep working::

    MetricsError
    ├── InvalidMetricError (ValueError)      bad key or value, raised before anything is sent
    │   └── MetricConflictError              leaf / ancestor clash inside one step and scope
    ├── WireFormatError (ValueError)         malformed, truncated or unknown-version bytes
    │   └── LimitExceededError               (no longer raised: limits refuse keys)
    ├── PricingError (ValueError)            no price for a model, usage that does not match
    ├── ConfigError (ValueError)             bad configuration, raised at start-up
    │   ├── ConfigMismatchError              a running aggregator has another config
    │   └── ConditionalWritesUnsupportedError   storage ignores If-None-Match/If-Match
    ├── StorageError                         object storage failed (retried by the caller)
    │   ├── ObjectNotFoundError (KeyError)   no object at that key
    │   ├── PreconditionFailedError          a create-only or compare-and-swap write lost
    │   ├── CheckpointCorruptError           a checkpoint blob failed its checks
    │   └── FencedError                      a newer writer epoch owns the storage
    ├── AggregatorUnavailableError           the aggregator actor cannot be reached
    │   ├── CredentialsRequiredError         it cannot open its storage with what it has
    │   └── AggregatorStartTimeoutError (TimeoutError)   Ray did not start it in time
    ├── BackPressureError                    the aggregator is full: resend the batch later
    ├── BudgetExceededError                  a paid call refused before it was sent
    └── BarrierTimeoutError (TimeoutError)   expected producers did not report in time

This module has no dependencies so the pure core can raise these errors.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

__all__ = [
    "AggregatorStartTimeoutError",
    "AggregatorUnavailableError",
    "BackPressureError",
    "BarrierTimeoutError",
    "BudgetExceededError",
    "CheckpointCorruptError",
    "ConditionalWritesUnsupportedError",
    "ConfigError",
    "ConfigMismatchError",
    "CredentialsRequiredError",
    "FencedError",
    "InvalidMetricError",
    "LimitExceededError",
    "MetricConflictError",
    "MetricsError",
    "ObjectNotFoundError",
    "PreconditionFailedError",
    "PricingError",
    "StorageError",
    "WireFormatError",
]


class MetricsError(Exception):
    """Base class of every error raised by art_ray_metrics."""


class InvalidMetricError(MetricsError, ValueError):
    """A metric key or value was rejected at the producer; nothing was recorded."""


class MetricConflictError(InvalidMetricError):
    """A leaf is an ancestor or a descendant of another pending leaf of the same step."""


class WireFormatError(MetricsError, ValueError):
    """Bytes that are not a valid batch or snapshot of a known format version."""


class LimitExceededError(WireFormatError):
    """A batch that would exceed a configured limit (distinct keys, open scopes).

    Kept for callers that catch it: the aggregator no longer refuses whole batches over a
    limit. It refuses the offending keys and names them in its answer (``refused``), and the
    flush of every rollout that recorded them says ``ok=False`` (see docs/design.md).
    """


class PricingError(MetricsError, ValueError):
    """A response could not be priced (no pricing for the model, usage of another provider)."""


class ConfigError(MetricsError, ValueError):
    """Invalid configuration; raised at start-up, never during training."""


class ConfigMismatchError(ConfigError):
    """An aggregator with the same name already runs with a different configuration."""


class ConditionalWritesUnsupportedError(ConfigError):
    """The storage accepted a create-only or compare-and-swap write it had to refuse.

    Without those refusals a stale aggregator cannot be fenced off, so the aggregator does not
    start (unless ``AggregatorConfig.require_conditional_writes`` is False).
    """


class StorageError(MetricsError):
    """Object storage failed; callers retry and never crash training on it."""


class ObjectNotFoundError(StorageError, KeyError):
    """No object exists at the requested key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "object not found"


class PreconditionFailedError(StorageError):
    """A create-only write found an object, or a compare-and-swap found another version."""


class CheckpointCorruptError(StorageError):
    """A checkpoint blob is truncated, corrupted or of an unknown format version."""


class FencedError(StorageError):
    """A writer with a newer epoch owns this storage URI; this writer must stop writing."""


class AggregatorUnavailableError(MetricsError):
    """The aggregator actor could not be found or did not answer."""


class BackPressureError(MetricsError):
    """The aggregator's write-ahead queue is full (storage is slow or down); the batch was not
    applied and the client resends it later."""


class BudgetExceededError(MetricsError):
    """A paid call was refused before it was sent: the run's budget cannot cover its estimate.

    Nothing was sent and nothing was recorded. Raised where the call was made (inside the
    rollout), so the rollout can stop, skip the judge, or end the run.

    Attributes:
        budget: The run's hard limit in dollars.
        spent: The run's spend the aggregator knew of when it refused.
        estimate: The call's upper-bound estimate in dollars.
        committed: Spend plus the budget leased to producers and not yet spent.
    """

    def __init__(
        self,
        budget: Decimal | None,
        spent: Decimal,
        estimate: Decimal,
        committed: Decimal | None = None,
        detail: str = "",
    ) -> None:
        self.budget = budget
        self.spent = spent
        self.estimate = estimate
        self.committed = spent if committed is None else committed
        self.detail = detail
        message = (
            f"Run budget exceeded: the call's estimate ${estimate:.6f} does not fit under the "
            f"budget ${budget} (spent ${spent:.6f}, committed ${self.committed:.6f} including "
            "leases other producers hold); the call was not sent"
        )
        super().__init__(f"{message}: {detail}" if detail else message)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray with its fields
        return (
            type(self),
            (self.budget, self.spent, self.estimate, self.committed, self.detail),
        )


class CredentialsRequiredError(AggregatorUnavailableError):
    """The aggregator cannot open its storage with the credentials it holds.

    The trainer's handle answers it by sending the driver's credentials (in memory) and retrying.
    """


class AggregatorStartTimeoutError(AggregatorUnavailableError, TimeoutError):
    """Ray did not start the aggregator actor within ``start_aggregator``'s ``start_timeout_s``
    (no node has the resources it asks for, or none is free); the pending actor was removed, so
    its name is free again."""


class BarrierTimeoutError(MetricsError, TimeoutError):
    """The barrier waited for expected producers and the timeout ran out."""
