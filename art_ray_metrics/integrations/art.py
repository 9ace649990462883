"""OpenPipe ART's own training loop on the aggregator: :func:`attach` and :func:`worker_context`.

Install from a clone of this repository with ``pip install -e '.[art]'`` (openpipe-art 0.5.18
and what its ``Model.log`` imports without declaring: pyarrow, numpy). ``openpipe-art`` is
imported on first use, not when this module is imported.

On the trainer::

    handle = art_ray_metrics.start_aggregator(run_name="my-run", storage_uri="s3://bucket/run")
    art_ray_metrics.art.attach(model, handle)       # model: art.Model / art.TrainableModel
    ...
    await model.log(trajectory_groups, split="train", step=step)   # one row, via the aggregator

In a Ray task or actor method (sync ``with`` or ``async with``)::

    with art_ray_metrics.art.worker_context(step) as builder:
        ...   # ART's MetricsBuilder.get_active(), @track_api_cost, RULER, TrainableModel
              # completion costs and our own builder all record into the aggregator
    # leaving the block flushed the leaves durably

How ``model.log`` runs once attached: ART's own ``Model.log`` computes the row's averages
(reward, exception rate, trajectory and group metrics, ``reward_std_dev``), its default data
metrics and the backend's automatic ``time/step_wall_s``/``costs/gpu``; the builder-managed
leaves it records go to the aggregator with this process's other leaves of the step; the row is
closed with ``handle.log(step, split, averages)``, so it also holds every worker's leaves, the
rollups, cumulative values and exact unique counts. The row is appended to ART's
``history.jsonl`` (ART reads it to pick checkpoints to keep) and written to W&B only by the
aggregator. ART's ``state.json`` no longer carries the builder state: the aggregator's
checkpoint does. An existing ART run moves over: a fresh aggregator adopts the totals of the
model's ``state.json`` at ``attach`` and logs to the model's W&B run (see :func:`attach`;
the code is in :mod:`~art_ray_metrics.integrations.art_run`). The fates of a step's trajectory
groups (:mod:`~art_ray_metrics.integrations.art_fates`) split the row's spend by outcome.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from datetime import datetime
from types import TracebackType
from typing import Any

from art_ray_metrics.builder import LeafRecorder, PendingLeaves
from art_ray_metrics.core import active as _active
from art_ray_metrics.core import keys as K
from art_ray_metrics.distributed.handle import AggregatorHandle
from art_ray_metrics.distributed.record import WorkerBuilder, connect
from art_ray_metrics.integrations.art_fates import group_fates
from art_ray_metrics.integrations.art_leaves import TrainerLeaves, merge_pending
from art_ray_metrics.integrations.art_run import ADOPTED_KEY as ADOPTED_KEY  # re-exported
from art_ray_metrics.integrations.art_run import adopt_art_state, use_art_wandb_run
from art_ray_metrics.spend.pricing import PricingRegistry

__all__ = ["ART_VERSION", "attach", "worker_context"]

log = logging.getLogger(__name__)

ART_VERSION = "0.5.18"
"""The openpipe-art release this adapter is written and tested against."""

_INSTALL_HINT = (
    "art_ray_metrics.art needs openpipe-art: in your clone of art-ray-metrics, "
    "pip install -e '.[art]' "
    f"(openpipe-art=={ART_VERSION}, pyarrow, numpy)"
)


def _art() -> Any:
    """Import openpipe-art (``art`` and ``art.metrics``) or raise a clear ImportError."""
    try:
        import art
        import art.metrics
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT}; importing it failed: {exc}") from exc
    if not hasattr(art.metrics, "_active_builder") or not hasattr(art, "Model"):
        raise ImportError(f"The installed 'art' package is not openpipe-art. {_INSTALL_HINT}")
    return art


# -- ART's MetricsBuilder over one of our recorders -----------------------------------------

_BRIDGE_TYPE: type | None = None


def _bridge_type() -> type:
    """A subclass of ART's ``MetricsBuilder`` whose leaves go to one of our recorders.

    ART's pricing (``add_response_cost``, used by ``track_api_cost`` and RULER), ``add_cost``,
    timings and ``measure`` all end in ``add_metric``/``add_data``, which forward; so costs are
    priced exactly as ART prices them and validated as we validate them.

    It is one unit because ART's base class is only known after the lazy import, so the class
    statement (whose ``super()`` and self-referencing ``for_cost_context`` need a real class
    body) must run inside this function; its methods are one-line forwards of ART's signatures.
    """
    global _BRIDGE_TYPE
    if _BRIDGE_TYPE is not None:
        return _BRIDGE_TYPE
    art_builder: type = _art().metrics.MetricsBuilder

    class ArtBuilderBridge(art_builder):  # type: ignore[misc]
        """ART's ``MetricsBuilder`` API recording into an art_ray_metrics recorder."""

        def __init__(
            self,
            target: LeafRecorder,
            on_flush: Callable[[LeafRecorder], dict[str, float]],
            shared_state: Any = None,
        ) -> None:
            scope = getattr(target, "scope", None) or getattr(target, "_buffer_scope", None)
            super().__init__(target.cost_context, _shared_state=shared_state, _buffer_scope=scope)
            self.target = target
            self._on_flush = on_flush

        def add_metric(self, key: str, value: float) -> None:
            self.target.add_metric(key, value)

        def add_sample(self, key: str, value: float) -> None:
            self.target.add_sample(key, value)

        def add_data(
            self,
            step_num_scenarios: int | None = None,
            step_actor_tokens: int | None = None,
            scenario_ids: list[str] | None = None,
            *,
            step_rollout_tokens: int | None = None,
        ) -> None:
            self.target.add_data(
                step_num_scenarios,
                step_actor_tokens,
                scenario_ids,
                step_rollout_tokens=step_rollout_tokens,
            )

        def add_user_timing(
            self,
            step_wall_s: float | None = None,
            step_actor_s: float | None = None,
            step_eval_s: float | None = None,
            *,
            step_rollout_s: float | None = None,
        ) -> None:
            self.target.add_user_timing(
                step_wall_s, step_actor_s, step_eval_s, step_rollout_s=step_rollout_s
            )

        def add_idle_times(
            self,
            step_trainer_idle_s: float | None = None,
            step_actor_idle_s: float | None = None,
            *,
            step_rollout_idle_s: float | None = None,
        ) -> None:
            self.target.add_idle_times(
                step_trainer_idle_s, step_actor_idle_s, step_rollout_idle_s=step_rollout_idle_s
            )

        async def flush(self) -> dict[str, float]:
            return self._on_flush(self.target)

        def for_cost_context(
            self, cost_context: str, *, buffer_scope: str | None = None
        ) -> ArtBuilderBridge:
            view = self.target.for_cost_context(cost_context, buffer_scope=buffer_scope)  # type: ignore[attr-defined]
            if view is self.target:
                return self
            return ArtBuilderBridge(view, self._on_flush, self._shared_state)

        def state_dict(self) -> dict[str, Any]:
            return {}  # the cumulative state lives in the aggregator's checkpoint

        def load_state_dict(self, state: dict[str, Any]) -> None:
            return None

    _BRIDGE_TYPE = ArtBuilderBridge
    return ArtBuilderBridge


# -- worker side ------------------------------------------------------------------------------


def _worker_flush(target: LeafRecorder) -> dict[str, float]:
    if isinstance(target, WorkerBuilder):
        target.flush()
    return {}  # a worker has no row: the trainer's barrier closes the step


class worker_context:  # lower case: used like a function, ``with worker_context(step):``
    """Inside the block our active builder and ART's are one worker builder for ``step``.

    ``cost_context`` is the first segment under ``costs/`` of API costs (ART's cost context);
    the buffer scope is the split's (``val``/``test`` share ``eval``) when ``split`` is given,
    else the cost context, as in :func:`~art_ray_metrics.connect`. Works as ``with`` and
    ``async with``; on exit the leaves are flushed durably (``flush``/``aflush``, which never
    raise on telemetry failure). The block's value is the
    :class:`~art_ray_metrics.WorkerBuilder`. Built with :func:`~art_ray_metrics.connect`, so the
    first one in a worker process also sets the API keys the driver shares
    (``AggregatorConfig.worker_env``) that the process lacks, before the block runs.
    ``group`` names the rollout's trajectory group (:meth:`~art_ray_metrics.WorkerBuilder.
    set_group`; the attached model's ``log`` derives its fate), by default the scenario id
    the block records with ``add_data(scenario_ids=[id])``.
    """

    def __init__(
        self,
        step: int,
        cost_context: str = "train",
        *,
        split: str | None = None,
        name: str | None = None,
        namespace: str | None = None,
        group: object = None,
    ) -> None:
        art = _art()
        self.builder = connect(
            step, cost_context, split=split, name=name, namespace=namespace, group=group
        )
        self.art_builder = _bridge_type()(self.builder, _worker_flush)
        self._art_var: ContextVar[Any] = art.metrics._active_builder
        self._tokens: list[tuple[Token[Any], Token[Any]]] = []

    def _enter(self) -> WorkerBuilder:
        ours = _active.set_active_builder(self.builder)
        theirs = self._art_var.set(self.art_builder)
        self._tokens.append((ours, theirs))
        return self.builder

    def _exit(self) -> None:
        ours, theirs = self._tokens.pop()
        self._art_var.reset(theirs)
        _active.reset_active_builder(ours)

    def __enter__(self) -> WorkerBuilder:
        return self._enter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit()
        self.builder.flush()

    async def __aenter__(self) -> WorkerBuilder:
        return self._enter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit()
        await self.builder.aflush()


# -- trainer side ---------------------------------------------------------------------------


_CAPTURE: ContextVar[dict[str, Any] | None] = ContextVar("art_ray_metrics_art_log", default=None)
"""What ART's ``Model.log`` handed over during one attached call: its row and its leaves."""


class _Attached:
    """The state :func:`attach` adds to a model."""

    def __init__(self, model: Any, handle: AggregatorHandle) -> None:
        self.model = model
        self.handle = handle
        self.pending: dict[str, PendingLeaves] = {}
        self.leaves = TrainerLeaves("train", "train", self.pending, PricingRegistry())
        self.original_log = type(model).log
        self.original_auto = type(model)._collect_automatic_backend_metrics

    def flush_hook(self, target: LeafRecorder) -> dict[str, float]:
        """ART's ``builder.flush()`` inside ``Model.log``: hand the scope's leaves over."""
        capture = _CAPTURE.get()
        scope = getattr(target, "scope", "train")
        pending = self.pending.pop(scope, None)
        if capture is not None and pending is not None:
            held = capture.setdefault("pending", PendingLeaves())
            merge_pending(held, pending)
        elif pending is not None:  # flushed outside model.log (user code): keep for the next row
            self.pending.setdefault(scope, pending)
        return {}

    def log_metrics(self, metrics: dict[str, float], split: str, step: int, **options: Any) -> None:
        """ART's ``_log_metrics``: keep the row for the aggregator instead of writing it.

        ``custom_metric_keys`` (passed by ART after 0.5.18 to define W&B axes) needs nothing:
        the aggregator's W&B sink puts every key outside its globs on ``training_step``. Other
        keywords a newer ART passes are ignored, with one warning per keyword.
        """
        _warn_unknown_options(options)
        capture = _CAPTURE.get()
        if capture is None:
            raise RuntimeError("art_ray_metrics: _log_metrics called outside an attached log")
        capture["metrics"] = dict(metrics)

    def update_wandb_config(self, config: dict[str, Any]) -> None:
        """ART's ``update_wandb_config`` (merge, refuse a changed value), then the aggregator's
        W&B run gets the model's config. Only the W&B part never raises."""
        type(self.model).update_wandb_config(self.model, config)
        use_art_wandb_run(self.model, self.handle, adopt=False)

    def automatic_metrics(self, **kwargs: Any) -> dict[str, float]:
        metrics: dict[str, float] = self.original_auto(self.model, **kwargs)
        if self.handle.config.gpu_type:  # the aggregator charges the GPUs: never twice
            metrics.pop("costs/gpu", None)
        return metrics

    async def log(
        self,
        trajectories: Any = None,
        split: str = "val",
        *,
        metrics: dict[str, float] | None = None,
        step: int | None = None,
    ) -> None:
        model = self.model
        if trajectories is None and metrics is None:
            return  # ART logs nothing either
        if step is None:
            step = await model.get_step() if model.trainable else 0
        fates: dict[str, str] = {}
        if trajectories is not None:
            trajectories = model._normalize_trajectory_groups(trajectories)  # read it once
            if split == "train":
                fates = group_fates(trajectories)
        capture: dict[str, Any] = {}
        token = _CAPTURE.set(capture)
        try:
            await self.original_log(model, trajectories, split, metrics=metrics, step=step)
        finally:
            _CAPTURE.reset(token)
        await self.close(
            step, split, capture.get("metrics", {}), capture.get("pending"), fates or None
        )

    async def close(
        self,
        step: int,
        split: str,
        metrics: Mapping[str, float],
        pending: PendingLeaves | None,
        fates: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """Ship the trainer's leaves of the step, close it on the aggregator (with the fates
        derived from its trajectory groups), append history."""
        cfg = self.handle.config
        if pending is not None:
            builder = connect(step, split=split, name=cfg.name, namespace=cfg.namespace)
            builder.replay(pending)
            result = await builder.aflush()
            if not result.ok:
                log.warning(
                    "art_ray_metrics: the trainer's leaves of step %s are not confirmed; "
                    "they count in a later row (%s)",
                    step,
                    result.error,
                )
        wall = time.time() - self.model._run_start_time
        # ART's own key prefixing, applied here so backend names keep ART's keys
        # (loss -> train/loss) instead of the aggregator's mapping (loss -> loss/train), with
        # the installed ART's sections (a section ART adds passes through as ART passes it)
        sections = getattr(_art().model, "METRIC_SECTIONS", K.SECTIONS)
        routed = (
            {_route(k, split, sections): v for k, v in metrics.items()}
            if split in K.SPLITS
            else dict(metrics)
        )
        routed["time/wall_clock_sec"] = wall
        row = await self.handle.alog(step, split, routed, derived_fates=fates)
        self.write_history(row, step)
        return row

    def write_history(self, row: Mapping[str, float], step: int) -> None:
        """Append the row to ART's ``history.jsonl`` in ART's format."""
        record: dict[str, Any] = {k: v for k, v in row.items() if v == v}
        record["training_step"] = step
        record |= {"step": step, "recorded_at": datetime.now().isoformat()}
        out = self.model._get_output_dir()
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "history.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def _route(key: str, split: str, sections: Any) -> str:
    """ART's prefixing of a key logged for ``split`` (one of train/val/test)."""
    head, sep, _ = key.partition("/")
    if sep and (head in sections or head in K.SPLITS):
        return key
    return f"{split}/{key}"


_KNOWN_OPTIONS = frozenset({"custom_metric_keys"})
_WARNED_OPTIONS: set[str] = set()


def _warn_unknown_options(options: Mapping[str, Any]) -> None:
    """Warn once per process and keyword that a newer ART passed a keyword we ignore."""
    for name in sorted(set(options) - _KNOWN_OPTIONS - _WARNED_OPTIONS):
        _WARNED_OPTIONS.add(name)
        log.warning(
            "art_ray_metrics: ART's _log_metrics passed %r, which this adapter (written for "
            "openpipe-art %s) does not know; it is ignored and the row logged as before",
            name,
            ART_VERSION,
        )


def attach(model: Any, handle: AggregatorHandle, *, wandb_run: bool = True) -> None:
    """Route ``model.log`` rows through the aggregator behind ``handle``.

    Afterwards ART's ``Model.log`` still computes its averages, default data metrics and
    backend metrics, writes the trajectories' parquet files and appends the row to
    ``history.jsonl``; the row itself is the aggregator's (``handle.log``), so it also holds
    every worker's leaves, rollups, cumulative values and unique counts, and W&B is written
    once, by the aggregator. The model's builder (``model.metrics_builder()``,
    ``model.activate_metrics_context()``) records into the aggregator too. When the aggregator
    charges GPUs itself (``gpu_type``), the backend's automatic ``costs/gpu`` is dropped. Keys
    keep ART's names: a backend ``loss`` is ``train/loss``, as ART logs it.

    An existing ART run moves over: on an aggregator that has closed nothing yet, the
    cumulative values and unique scenario ids of the model's ``state.json`` (ART's
    ``_metrics_builder_state``) become the aggregator's, once, before the first row
    (``state.json`` then notes it under ``"art_ray_metrics"``); an aggregator with a state of
    its own keeps it and a difference is logged in one line (not when ``state.json`` notes that
    this aggregator took it over: its totals went on from there).

    ``wandb_run`` (default): the aggregator logs to the model's W&B run, as ART does
    (project ``model.project``, name and id ``model.name``, ``resume="allow"``, entity from
    ``WANDB_ENTITY``), unless the configuration sets ``wandb_run_id`` or rows were already
    logged to another run. Either way the model's W&B config (``model.update_wandb_config``,
    before and after ``attach``) goes to the run's config.

    Raises:
        ImportError: openpipe-art is not installed.
        TypeError: ``model`` is not an ``art.Model`` or is already attached.
        InvalidMetricError: the model's ``state.json`` holds a builder state that is not
            ART's format (naming the key and value).
    """
    art = _art()
    if not isinstance(model, art.Model):
        raise TypeError(f"Expected an art.Model but got {type(model).__name__}")
    if not isinstance(handle, AggregatorHandle):
        raise TypeError(f"Expected an AggregatorHandle but got {type(handle).__name__}")
    if "_arm_attached" in model.__dict__:
        raise TypeError(f"Model {model.name!r} is already attached to an aggregator")
    state_key = getattr(art.model, "METRICS_BUILDER_STATE_KEY", "_metrics_builder_state")
    adopt_art_state(model, handle, state_key)  # before the first row; bad input raises here
    use_art_wandb_run(model, handle, wandb_run)
    state = _Attached(model, handle)
    bridge = _bridge_type()(state.leaves, state.flush_hook)
    for attr, value in (
        ("_arm_attached", state),
        ("_metrics_builder", bridge),
        ("_metrics_builder_state_loaded", True),
        ("log", state.log),
        ("_log_metrics", state.log_metrics),
        ("_persist_metrics_builder_state", lambda: None),
        ("_collect_automatic_backend_metrics", state.automatic_metrics),
        ("update_wandb_config", state.update_wandb_config),
    ):
        object.__setattr__(model, attr, value)
