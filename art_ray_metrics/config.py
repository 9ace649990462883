"""Configuration: frozen pydantic models validated once, at start-up.

:class:`AggregatorConfig` configures the named aggregator actor (``start_aggregator``);
:class:`ClientConfig` configures the worker-side batching client (``connect``). A bare
``AggregatorConfig()`` works on a laptop: actor ``art_ray_metrics`` in namespace
``art_ray_metrics``, run ``default``, storage under ``./runs/default`` (made absolute), W&B
online only when ``WANDB_API_KEY`` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["DEFAULT_NAME", "DEFAULT_NAMESPACE", "AggregatorConfig", "ClientConfig"]

DEFAULT_NAME = "art_ray_metrics"
DEFAULT_NAMESPACE = "art_ray_metrics"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


_BUDGET_FIELDS = ("budget_usd", "budget_soft", "budget_planned_steps", "budget_silence_timeout_s")


class AggregatorConfig(BaseModel):
    """Everything the aggregator actor needs; its fingerprint guards against silent reuse."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(DEFAULT_NAME, description="Ray actor name.")
    namespace: str = Field(DEFAULT_NAMESPACE, description="Ray namespace of the actor.")
    run_name: str = Field("default", description="Run name: W&B run name, default storage dir.")
    storage_uri: str | None = Field(
        None,
        description="Where checkpoints, the WAL and the JSONL history live: a local path, "
        "file://, s3://bucket/prefix, gs://bucket/prefix or memory://name. Default "
        "./runs/<run_name> (absolute). A multi-node cluster needs shared storage.",
    )
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="None: online if WANDB_API_KEY is set, else disabled."
    )
    wandb_project: str = "art-ray-metrics"
    wandb_entity: str | None = None
    wandb_name: str | None = Field(None, description="W&B run display name; None: run_name.")
    wandb_run_id: str | None = Field(
        None,
        description="W&B run id to create or continue (resume='allow'); None: a new random id, "
        "kept across restarts, or the attached ART model's run (art_ray_metrics.art.attach).",
    )
    wandb_dir: str | None = None
    checkpoint_interval_s: float = Field(
        30.0, gt=0, description="Checkpoint on this timer too (always at every barrier)."
    )
    checkpoint_retention: int = Field(3, ge=1)
    checkpoint_prune_every: int = Field(
        4, ge=1, description="Delete unreferenced checkpoint objects every N commits (lists cost)."
    )
    rewind_window: int = Field(
        64,
        ge=0,
        description="Closed steps that stay restorable for a trainer resuming from an older "
        "step (see 'Resume from an older step' in art_ray_metrics.distributed.actor); 0: never rewind, "
        "older steps are folded in as late leaves.",
    )
    wal_interval_s: float = Field(
        0.2, gt=0, description="Group-commit interval of the write-ahead log."
    )
    storage_timeout_s: float = Field(10.0, gt=0)
    require_conditional_writes: bool = Field(
        True,
        description="At start, check that the storage refuses losing create-only and "
        "compare-and-swap writes (what fences a stale aggregator off) and refuse to run "
        "otherwise; False skips the check and runs unfenced on such storage.",
    )
    barrier_timeout_s: float = Field(
        60.0, gt=0, description="Default wait for expected producers at a barrier."
    )
    telemetry_in_rows: bool = Field(True, description="Add telemetry/* counters to each row.")
    max_keys_per_step: int = Field(
        10_000, ge=1, description="Distinct leaf keys pending for one (step, split scope)."
    )
    max_keys_per_run: int = Field(
        20_000,
        ge=1,
        description="Distinct leaf keys producers may send in a run (they size every checkpoint "
        "and rewind object).",
    )
    max_open_scopes: int = Field(
        64, ge=1, description="Split scopes with pending leaves (splits the trainer never logs)."
    )
    max_wal_queue_bytes: int = Field(
        128 * 2**20,
        ge=1,
        description="Bytes of batches waiting for the write-ahead log; above it ingest answers "
        "BackPressureError and producers resend later.",
    )
    on_driver_node: bool = Field(True, description="Pin the actor to the driver's node.")
    max_restarts: int = -1
    actor_resources: dict[str, float] | None = Field(
        None, description="Custom Ray resources the actor requires (to pin it to node types)."
    )
    gpu_type: str | None = Field(
        None,
        description="GPU type for costs/gpu ('H100', ...), or 'auto' to read GPU types and "
        "counts from Ray's cluster resources; None: no GPU cost.",
    )
    gpu_count: int | None = Field(
        None, ge=0, description="GPUs charged; None: the count Ray reports for the cluster."
    )
    gpu_hourly_usd: float | None = Field(None, ge=0, description="Override of the price table.")
    worker_env: tuple[str, ...] = Field(
        (),
        description="Names of environment variables the rollout and judge workers need (API "
        "keys such as OPENAI_API_KEY): the driver's handle sends their values to the aggregator "
        "in memory, and connect()/worker_context set them in a worker process that lacks them. "
        "They never go through Ray's runtime env, the storage or W&B. Names only here.",
    )

    budget_usd: float | None = Field(
        None,
        ge=0,
        description="Hard limit of the run's spend in dollars: a paid call made through the "
        "project (track_api_cost, the stream taps) whose estimate does not fit raises "
        "BudgetExceededError before it is sent. None: no limit (leases still bound the spend "
        "of crashed workers). Raise it on a live run with handle.set_budget().",
    )
    budget_soft: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Fraction of budget_usd whose crossing logs one line and sends one W&B alert.",
    )
    budget_planned_steps: int | None = Field(
        None, ge=1, description="Planned train steps, for costs/projected_total."
    )
    budget_silence_timeout_s: float = Field(
        300.0,
        gt=0,
        description="A worker process silent this long while holding budget is taken for gone: "
        "its lease becomes costs/unreconciled.",
    )

    @field_validator("worker_env")
    @classmethod
    def _env_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise ValueError(
                    f"expected environment variable names (letters, digits, _) but got {name!r}"
                )
        return tuple(dict.fromkeys(value))

    @field_validator("name", "namespace", "run_name")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be non-empty")
        return value

    @field_validator("wandb_name", "wandb_run_id")
    @classmethod
    def _non_empty_if_set(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be non-empty when set (None: the default)")
        return value

    def resolved(self) -> AggregatorConfig:
        """A copy with ``storage_uri`` defaulted and local paths made absolute."""
        uri = self.storage_uri or os.path.join("runs", self.run_name)
        if "://" not in uri:
            uri = os.path.abspath(uri)
        elif uri.startswith("file://"):
            uri = "file://" + os.path.abspath(uri[len("file://") :])
        return self.model_copy(update={"storage_uri": uri})

    def fingerprint(self) -> str:
        """A stable hash of the configuration (what a second driver must agree on). Budget
        fields left at their defaults are not hashed, so configurations from before the
        budget existed keep their fingerprint."""
        dump = self.model_dump(mode="json")
        for name in _BUDGET_FIELDS:
            if dump[name] == type(self).model_fields[name].default:
                del dump[name]
        data = json.dumps(dump, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def wandb_enabled_mode(self) -> Literal["online", "offline", "disabled"]:
        """The W&B mode in effect."""
        if self.wandb_mode is not None:
            return self.wandb_mode
        env = os.environ.get("WANDB_MODE")
        if env in ("online", "offline", "disabled"):
            return env  # type: ignore[return-value]
        return "online" if os.environ.get("WANDB_API_KEY") else "disabled"


class ClientConfig(BaseModel):
    """The worker-side batching client."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = DEFAULT_NAME
    namespace: str = DEFAULT_NAMESPACE
    max_batch_leaves: int = Field(25_000, ge=1, description="Ship when this many leaves wait.")
    flush_interval_s: float = Field(1.0, gt=0, description="Ship at least this often.")
    max_in_flight: int = Field(8, ge=1, description="Unacknowledged calls before ship() blocks.")
    max_retained_batches: int = Field(
        10_000, ge=1, description="Shipped, not yet durable batches kept for resends."
    )
    lookup_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Log an error when no aggregator was found for this long (lookups go on, "
        "with back-off, on the background thread; no call waits for them).",
    )
    flush_timeout_s: float = Field(60.0, gt=0, description="An explicit flush waits this long.")
    budget_lease_calls: int = Field(
        8,
        ge=1,
        description="Under a run budget, a worker process holds budget for this many of its "
        "largest calls and asks for more (without waiting) at half.",
    )
    budget_wait_s: float = Field(
        30.0, gt=0, description="A call short of budget waits this long for the aggregator."
    )
    budget_first_wait_s: float = Field(
        5.0,
        ge=0,
        description="A worker process's first paid call waits this long for the aggregator to "
        "say whether the run has a budget (then it is admitted under it). Past it, calls go "
        "unadmitted until the answer arrives (the README's overshoot bound counts them); the "
        "process waits once.",
    )
    default_max_tokens: int = Field(
        4096,
        ge=1,
        description="Output tokens assumed for a request that names no max_tokens when its "
        "cost is estimated under a budget (not a bound).",
    )
