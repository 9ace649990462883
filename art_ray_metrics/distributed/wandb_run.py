"""Which W&B run the aggregator logs to, and opening its sink.

The run is the configuration's (``wandb_run_id``, project, name), or an ART model's run adopted
with ``art.attach`` (``AggregatorMeta.wandb_run``), checkpointed so a restarted aggregator
resumes the same run. A restarted aggregator re-logs every row since the last clean finish:
W&B buffers rows in its own process, so a killed actor may have lost some (twice is fine, never
zero). Used by the actor (:mod:`art_ray_metrics.distributed.actor`); no Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from art_ray_metrics.config import AggregatorConfig
from art_ray_metrics.core.meta import AggregatorMeta
from art_ray_metrics.durable.history import HistoryStore, history_row_metrics
from art_ray_metrics.export.wandb_config import WandbSinkConfig
from art_ray_metrics.export.wandb_sink import WandbSink

__all__ = ["RunChoice", "adopted_run", "choose_run", "open_sink", "run_config"]


def adopted_run(config: AggregatorConfig, meta: AggregatorMeta) -> dict[str, Any] | None:
    """The ART model's W&B run (project, name, entity) this aggregator logs to, if any: an
    explicit ``wandb_run_id`` in the configuration wins over it."""
    held = meta.wandb_run
    if held is None or "project" not in held or config.wandb_run_id is not None:
        return None
    return held


def run_config(config: AggregatorConfig, meta: AggregatorMeta) -> dict[str, Any]:
    """The run's config: an adopted ART run gets the model's config only, as under ART;
    otherwise the aggregator's configuration plus any model config sent by ``attach``."""
    model_config = dict((meta.wandb_run or {}).get("config") or {})
    if adopted_run(config, meta) is not None:
        return model_config
    return {"art_ray_metrics": config.model_dump(mode="json"), **model_config}


def open_sink(
    config: AggregatorConfig,
    meta: AggregatorMeta,
    history: HistoryStore,
    *,
    api_key: str | None,
    restarted: bool,
) -> WandbSink | None:
    """Start the sink of the chosen run (None: W&B is off); a restarted aggregator re-logs the
    rows since the last clean finish, from the history and the checkpointed outbox."""
    mode = config.wandb_enabled_mode()
    if mode == "disabled":
        return None
    cfg = config
    adopted = adopted_run(config, meta)
    sink = WandbSink(
        WandbSinkConfig(
            project=adopted["project"] if adopted else cfg.wandb_project,
            entity=cfg.wandb_entity or (adopted.get("entity") if adopted else None),
            run_name=adopted["name"] if adopted else (cfg.wandb_name or cfg.run_name),
            run_id=cfg.wandb_run_id or meta.wandb_run_id,
            mode=mode,
            dir=cfg.wandb_dir,
            config=run_config(config, meta),
        ),
        api_key=api_key,
    )
    meta.wandb_run_id = sink.run_id
    sink.start()
    if restarted:
        since = meta.wandb_finished_upto if meta.wandb_finished_upto is not None else -1
        rows = {
            (int(r["step"]), str(r["split"])): history_row_metrics(r)
            for r in history.read(start_step=since + 1)
        }
        # committed rows whose history write had not happened yet
        for entry in meta.outbox:
            if entry.step > since:
                rows[(entry.step, entry.split)] = {
                    **entry.row,
                    "training_step": float(entry.step),
                }
        sink.relog(rows[k] for k in sorted(rows))
    return sink


@dataclass(frozen=True, slots=True)
class RunChoice:
    """What :func:`choose_run` decided: switch to the model's run, or keep the current one
    (``note`` says why, when it matters)."""

    switched: bool
    note: str | None


def choose_run(
    config: AggregatorConfig,
    meta: AggregatorMeta,
    sink: WandbSink | None,
    *,
    project: str | None,
    name: str | None,
    run_id: str | None,
    entity: str | None,
    model_config: dict[str, Any],
) -> RunChoice:
    """Adopt an ART model's run (recorded in ``meta``) when the configuration names no
    ``wandb_run_id`` and no row was logged yet; merge the model's ``config`` either way."""
    held = dict(meta.wandb_run or {})
    held["config"] = {**(held.get("config") or {}), **model_config}
    current = adopted_run(config, meta)
    switched, note = False, None
    wanted = run_id is not None and (
        current is None or meta.wandb_run_id != run_id or current["project"] != project
    )
    if wanted and config.wandb_run_id is not None:
        note = f"the configured wandb_run_id {config.wandb_run_id!r} is kept"
    elif wanted and (meta.last_rows or meta.rewind or (sink and sink.logged)):
        if sink is not None:  # with W&B off there is no run to speak of
            note = (
                f"rows were already logged to W&B run {meta.wandb_run_id!r}; it is kept (the "
                f"model's run is {project}/{run_id})"
            )
    elif wanted:
        held.update(project=project, name=name, entity=entity)
        meta.wandb_run_id = run_id
        switched = True
    meta.wandb_run = held
    return RunChoice(switched, note)
