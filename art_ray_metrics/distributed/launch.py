"""Creating the aggregator actor on Ray: its options, the storage probe before it, and the
bounded wait for Ray to start it (:func:`~.handle.start_aggregator` runs these in order)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from art_ray_metrics.config import AggregatorConfig
from art_ray_metrics.durable.storage import backend_for, open_store
from art_ray_metrics.errors import AggregatorStartTimeoutError, StorageError
from art_ray_metrics.export.wandb_config import WANDB_SETTINGS

__all__ = [
    "START_TIMEOUT_S",
    "actor_options",
    "actor_settings",
    "probe_remote_storage",
    "unplaced_reason",
    "wait_started",
]


#: how long :func:`~.handle.start_aggregator` waits for Ray to start the actor by default
START_TIMEOUT_S = 120.0


def probe_remote_storage(cfg: AggregatorConfig) -> None:
    """Fail fast, in the driver and in one line, on S3/GCS storage that cannot be read.

    Without this, the actor's constructor fails after its storage retries and Ray reports a
    long actor-creation traceback.
    """
    uri = cfg.storage_uri or ""
    if "://" not in uri or uri.split("://", 1)[0].lower() in ("file", "memory"):
        return
    try:
        open_store(uri, timeout_s=min(cfg.storage_timeout_s, 5.0)).list("CHECKPOINT")
    except StorageError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise StorageError(
            f"Expected to read the aggregator's storage {uri} but got: {detail} (does the "
            "bucket exist, and are the credentials and endpoint set in this environment?)"
        ) from exc


def actor_options(cfg: AggregatorConfig) -> dict[str, Any]:
    """The Ray options of the aggregator actor: named, detached, restarted by Ray."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {
        "name": cfg.name,
        "namespace": cfg.namespace,
        "lifetime": "detached",
        "max_restarts": cfg.max_restarts,
        "max_task_retries": 0,
        "num_cpus": 0,
        "max_concurrency": 1000,
    }
    if cfg.actor_resources:
        options["resources"] = dict(cfg.actor_resources)
    if cfg.on_driver_node and not cfg.actor_resources:
        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
    return options


def actor_settings(cfg: AggregatorConfig) -> dict[str, str]:
    """The non-secret settings (storage endpoints and regions, W&B mode and directory) of this
    driver's environment that the actor sets in its own before it opens anything.

    They travel as a constructor argument, so a restart by Ray gets them again. Not as a Ray
    runtime env: Ray then starts the actor through a runtime-env worker, which made a start
    take 2.0 s instead of 1.3 s (median) and 0.5 CPU-seconds more on a 2-core machine, and
    Ray writes runtime envs to its logs. Secrets take neither way (see :mod:`.workerenv`).
    """
    names = backend_for(cfg.storage_uri or "").settings + WANDB_SETTINGS
    return {k: os.environ[k] for k in names if k in os.environ}


def wait_started(actor: Any, cfg: AggregatorConfig, timeout_s: float | None) -> None:
    """Wait until Ray started ``actor`` (its constructor ran), within ``timeout_s``; past it,
    raise why it did not start (the caller removes the pending actor)."""
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        ray.get(actor.__ray_ready__.remote(), timeout=timeout_s)
    except GetTimeoutError:
        try:
            alive: list[dict[str, Any]] = [
                n.get("Resources", {})
                for n in ray.nodes()  # type: ignore[no-untyped-call]
                if n.get("Alive")
            ]
            reason = unplaced_reason(cfg.actor_resources, alive)
        except Exception as exc:  # the reason is a detail: the timeout is the error
            reason = f"Ray's node list could not be read to say why ({type(exc).__name__}: {exc})"
        raise AggregatorStartTimeoutError(
            f"Ray did not start aggregator {cfg.name!r} (namespace {cfg.namespace!r}) within "
            f"start_timeout_s={timeout_s:g}: {reason}; the pending actor was removed"
        ) from None


def unplaced_reason(
    wanted: Mapping[str, float] | None, nodes: Sequence[Mapping[str, float]]
) -> str:
    """Why an actor asking for the custom resources ``wanted`` may not have been placed, given
    the resources of the cluster's alive ``nodes``.

    >>> unplaced_reason({"agg": 1.0}, [{"CPU": 2.0, "node:127.0.0.1": 1.0}])
    "no alive node has resource 'agg' (actor_resources={'agg': 1.0}; the nodes have ['CPU'])"
    >>> unplaced_reason({"agg": 2.0}, [{"CPU": 2.0, "agg": 1.0}])
    "no alive node has agg=2 (actor_resources={'agg': 2.0})"
    """
    wanted = dict(wanted or {})
    if not wanted:
        return "Ray could not schedule it in time (the cluster may be overloaded or starting)"
    missing = sorted(k for k in wanted if not any(k in res for res in nodes))
    if missing:
        have = sorted({k for res in nodes for k in res if not k.startswith("node:")})
        return (
            f"no alive node has resource {missing[0]!r} (actor_resources={wanted!r}; "
            f"the nodes have {have!r})"
        )
    short = sorted(k for k in wanted if not any(res.get(k, 0) >= wanted[k] for res in nodes))
    if short:
        return f"no alive node has {short[0]}={wanted[short[0]]:g} (actor_resources={wanted!r})"
    return f"the nodes with actor_resources={wanted!r} are busy or still starting"
