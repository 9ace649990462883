"""An existing ART run moves over to the aggregator (used by :func:`~art_ray_metrics.integrations.
art.attach`).

:func:`adopt_art_state`: on an aggregator that has closed nothing yet, the cumulative values and
unique scenario ids of the model's ``state.json`` (ART's builder state) become the
aggregator's, once, and ``state.json`` notes it under :data:`ADOPTED_KEY`; an aggregator with a
state of its own keeps it and a difference is logged in one line. :func:`use_art_wandb_run`:
the aggregator logs to the model's W&B run, with the model's W&B config.
"""

from __future__ import annotations

import logging
import os
from decimal import Decimal
from typing import Any

from art_ray_metrics.core import adopt as A
from art_ray_metrics.core.dedupe import digest
from art_ray_metrics.distributed.handle import AggregatorHandle
from art_ray_metrics.errors import InvalidMetricError

__all__ = ["ADOPTED_KEY", "adopt_art_state", "art_builder_state", "use_art_wandb_run"]

log = logging.getLogger("art_ray_metrics.integrations.art")  # the adapter's one logger


ADOPTED_KEY = "art_ray_metrics"
"""Key of ``state.json`` where :func:`attach` notes which aggregator adopted ART's totals."""


def art_builder_state(model: Any, state_key: str) -> tuple[dict[str, Decimal], list[str]] | None:
    """ART's builder state in the model's ``state.json`` (under ``state_key``): cumulative
    values and unique scenario ids (``None``: there is none).

    Raises:
        InvalidMetricError: the state is not in ART's format (naming the key and value).
    """
    state = model.read_state() or {}
    key = state_key
    raw = state.get(key)
    if raw is None:
        return None
    where = os.path.join(model._get_output_dir(), "state.json")
    cum, ids = (
        (raw.get("cum_state", {}), raw.get("unique_scenario_ids", []))
        if isinstance(raw, dict)
        else (None, None)
    )
    if not isinstance(cum, dict) or not isinstance(ids, list):
        raise InvalidMetricError(
            f"Expected ART's builder state in {where} ({key!r}: a map with 'cum_state' and "
            f"'unique_scenario_ids') but got {raw!r:.200}"
        )
    try:
        values = A.check_cumulative(cum)
    except InvalidMetricError as exc:
        raise InvalidMetricError(f"{where}: {exc}") from None
    return values, [str(i) for i in ids]


def adopt_art_state(model: Any, handle: AggregatorHandle, state_key: str) -> dict[str, Any] | None:
    """Move the model's ART totals (``state.json`` under ``state_key``) into a fresh
    aggregator, once; report a mismatch in one line when the aggregator already has a state of
    its own."""
    found = art_builder_state(model, state_key)
    if found is None:
        return None
    values, ids = found
    where = os.path.join(model._get_output_dir(), "state.json")
    target = handle.config.storage_uri
    digests = b"".join(digest(i) for i in sorted(set(ids)))
    out: dict[str, Any] = handle._call(
        "adopt_cumulative", {k: str(v) for k, v in values.items()}, digests, where
    )
    note = (model.read_state() or {}).get(ADOPTED_KEY)
    moved = isinstance(note, dict) and note.get("adopted_by") == target
    if out["adopted"]:
        model.merge_state({ADOPTED_KEY: {"adopted_by": target}})
        if not out["durable"]:
            log.warning(
                "art_ray_metrics: the totals adopted from %s are not checkpointed yet; they "
                "are with the next checkpoint",
                where,
            )
    elif out["mismatch"] and not moved:  # moved: the aggregator's totals went on from these
        log.warning(
            "art_ray_metrics: %s differs from the aggregator's state, which is kept: %s",
            where,
            out["mismatch"],
        )
    return out


def use_art_wandb_run(model: Any, handle: AggregatorHandle, adopt: bool) -> None:
    """The aggregator logs to the model's W&B run (as ART: project, name and id from the
    model, entity from ``WANDB_ENTITY``), with the model's W&B config. Never raises."""
    try:
        identity: tuple[Any, ...] = (
            (model.project, model.name, model.name, os.environ.get("WANDB_ENTITY"))
            if adopt
            else (None, None, None, None)
        )
        config = dict(getattr(model, "_wandb_config", None) or {})
        out = handle._call("use_wandb_run", *identity, config)
        if out["note"]:
            log.warning("art_ray_metrics: W&B: %s", out["note"])
    except Exception as exc:  # telemetry: training goes on without it
        log.warning("art_ray_metrics: W&B run of model %r not set up: %r", model.name, exc)
