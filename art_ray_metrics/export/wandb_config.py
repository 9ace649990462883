"""What a W&B run is before a row reaches it: its configuration, its id, and how keys are defined.

:class:`WandbSinkConfig` (the run's identity and place, and the two bounds an embedder sets),
:func:`new_run_id`, the retry and timeout constants of
:class:`~art_ray_metrics.export.wandb_sink.WandbSink`, the names of the ``WANDB_*`` environment
variables the aggregator is handed, and the metric definitions: the globs and axes declared when a
run starts (:data:`WANDB_GLOBS`) and which keys are defined one by one, with which summary
(:func:`needs_own_definition`, :func:`summary_for`). Pure: no W&B import, no I/O.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from art_ray_metrics.core.backoff import WANDB_INIT
from art_ray_metrics.core.keys import is_cumulative
from art_ray_metrics.durable.history import STEP_METRIC

__all__ = [
    "COST_AXIS",
    "FINISH_TIMEOUT_S",
    "INIT_RETRY_BACKOFF_MAX_S",
    "INIT_RETRY_BACKOFF_S",
    "INIT_TIMEOUT_S",
    "MAX_PENDING_ROWS",
    "RESET_AFTER_FAILURES",
    "WALL_CLOCK_METRIC",
    "WANDB_GLOBS",
    "WANDB_SECRETS",
    "WANDB_SETTINGS",
    "WandbSinkConfig",
    "needs_own_definition",
    "new_run_id",
    "summary_for",
]


WANDB_GLOBS: tuple[str, ...] = (
    "reward/*",
    "loss/*",
    "offpolicy/*",
    "pipeline/*",
    "throughput/*",
    "costs/*",
    "time/*",
    "data/*",
    "train/*",
    "val/*",
    "test/*",
    "discarded/*",
    "telemetry/*",
)
"""Globs declared with ``step_metric="training_step"`` when a W&B run starts."""

WALL_CLOCK_METRIC = "time/wall_clock_sec"
"""Seconds since the trainer started (attached ART models): an x-axis of its own, as ART
defines it (``define_metric`` without a step metric, before the globs)."""

COST_AXIS = "costs/cum/all"
"""The run's total spend: defined when a run starts, after the globs, summarised as ``last``."""

WANDB_SETTINGS: tuple[str, ...] = ("WANDB_BASE_URL", "WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")
"""W&B environment variables that are not secret (the aggregator's constructor carries them)."""
WANDB_SECRETS: tuple[str, ...] = ("WANDB_API_KEY",)
"""W&B credentials: handed to the aggregator in memory only (see ``AggregatorHandle``)."""


WandbMode = Literal["online", "offline", "disabled"]

INIT_TIMEOUT_S = 60.0
"""Upper bound W&B may spend in one ``wandb.init``."""
INIT_RETRY_BACKOFF_S = WANDB_INIT.initial
"""First delay before retrying a failed init; doubles per consecutive failure ..."""
INIT_RETRY_BACKOFF_MAX_S = WANDB_INIT.cap
"""... up to this."""
RESET_AFTER_FAILURES = 3
"""Consecutive ``log`` failures after which the run is abandoned and re-attached (same id)."""
FINISH_TIMEOUT_S = 30.0
"""Default of :attr:`WandbSinkConfig.finish_timeout_s`."""
MAX_PENDING_ROWS = 10_000
"""Default of :attr:`WandbSinkConfig.max_pending_rows`."""
_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_run_id() -> str:
    """Return a fresh 8-character W&B run id (lowercase letters and digits)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


@dataclass(frozen=True)
class WandbSinkConfig:
    """What :class:`~art_ray_metrics.export.wandb_sink.WandbSink` needs to start or re-attach a
    run (no credentials here).

    The run's identity and place come from the aggregator's configuration (or ``wandb-sync``'s
    flags); the two bounds are what an embedder sets to fit its own limits: how long closing
    may block its shutdown, and how much memory rows may hold while W&B is down. The retry
    policy (:data:`INIT_RETRY_BACKOFF_S`, :data:`RESET_AFTER_FAILURES`) and W&B's init timeout
    are constants: no caller had a reason to tune them.

    Attributes:
        project: W&B project.
        entity: W&B entity (team or user); ``None`` uses the default of the credentials.
        run_name: Display name of the run.
        run_id: Id to resume (``resume="allow"``); ``None`` creates a new id.
        mode: ``"online"``, ``"offline"``, ``"disabled"``, or ``None`` to let W&B decide
            (``WANDB_MODE``).
        dir: Parent directory of W&B's ``wandb/`` run directories.
        config: Run config (JSON-serialisable values).
        finish_timeout_s: Upper bound
            :meth:`~art_ray_metrics.export.wandb_sink.WandbSink.close` waits for ``finish``.
        max_pending_rows: Rows kept while W&B is unavailable; older ones are dropped (and
            counted) beyond this, the history still has them.
    """

    project: str
    entity: str | None = None
    run_name: str | None = None
    run_id: str | None = None
    mode: WandbMode | None = None
    dir: str | None = None
    config: Mapping[str, Any] | None = None
    finish_timeout_s: float = FINISH_TIMEOUT_S
    max_pending_rows: int = MAX_PENDING_ROWS


def summary_for(key: str) -> str | None:
    """The W&B summary of ``key``: ``"last"`` for a cumulative key, ``"mean"`` for a
    ``throughput/`` rate, else ``None`` (W&B's default)."""
    if is_cumulative(key):
        return "last"
    if key.startswith("throughput/"):
        return "mean"
    return None


def needs_own_definition(key: str) -> bool:
    """Keys defined one by one: costs, anything with a summary, keys outside every glob."""
    if key == STEP_METRIC:
        return False
    if key.startswith("costs/") or summary_for(key) is not None:
        return True
    return not any(key.startswith(glob[:-1]) for glob in WANDB_GLOBS)
