"""Weights & Biases: the single writer of a run's rows (it runs inside the aggregator actor),
a best-effort :class:`~art_ray_metrics.export.sink.Sink`.

Rows are logged without ``step=`` on a ``training_step`` x-axis, so late or replayed rows land
instead of being dropped; cumulative keys summarise as ``last`` and rate keys as ``mean``. The
sink never raises into its caller: failures are counted and retried, and the history can
always rebuild W&B. ``docs/design.md`` explains why. The run's configuration
(:class:`WandbSinkConfig`), id, retry bounds and metric definitions are in :mod:`.wandb_config`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from art_ray_metrics.core import counters
from art_ray_metrics.core.backoff import WANDB_INIT
from art_ray_metrics.durable.history import STEP_METRIC, history_row_metrics
from art_ray_metrics.export.wandb_config import (
    COST_AXIS,
    INIT_TIMEOUT_S,
    RESET_AFTER_FAILURES,
    WALL_CLOCK_METRIC,
    WANDB_GLOBS,
    WandbSinkConfig,
    needs_own_definition,
    new_run_id,
    summary_for,
)

if TYPE_CHECKING:
    pass

__all__ = ["WandbSink", "WandbSinkConfig"]

log = logging.getLogger(__name__)


class WandbSink:
    """The single W&B writer; logs rows on a ``training_step`` axis and never raises.

    Lifecycle: :meth:`start` (returns the run id to persist), :meth:`log` per row,
    :meth:`relog` after an actor restart, :meth:`close`. ``wandb`` is imported lazily.

    Failure handling: a failed ``wandb.init`` is retried in a background thread with
    exponential backoff, so :meth:`log` never waits for an init (only for ``run.log``); rows
    logged meanwhile wait in a bounded queue and are sent once the run is up. A row whose
    ``run.log`` raised stays queued and is retried on the next call (it may then appear twice
    in W&B, never zero times). After :data:`~.wandb_config.RESET_AFTER_FAILURES` consecutive
    failures the run is abandoned and re-attached with the same id.

    Attributes:
        logged: Rows accepted by ``run.log``.
        failures: Failed W&B calls (init, define_metric, log, finish).
        dropped: Rows dropped because the pending queue was full.
        last_error: ``repr`` of the latest failure, or ``None``.
    """

    durable = False
    """A best-effort sink: :meth:`log` never raises (see :mod:`.sink`)."""

    def __init__(
        self,
        config: WandbSinkConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        api_key: str | None = None,
    ) -> None:
        self.config = config
        self._api_key = api_key  # in memory only; None: W&B reads its own environment
        self.run_id: str = config.run_id or new_run_id()
        self.logged = 0
        self.failures = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._clock = clock
        self._lock = threading.RLock()
        self._run: Any = None
        self._defined: set[str] = set()
        self._pending: deque[dict[str, float]] = deque()
        self._consecutive_failures = 0
        self._init_failures = 0
        self._next_init_at = 0.0
        self._init_thread: threading.Thread | None = None
        self._finishing: threading.Thread | None = None
        self._closed = False
        self._finished_ok = False
        self._config_updates: dict[str, Any] = {}

    # -- state ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether a W&B run is attached."""
        return self._run is not None

    @property
    def pending(self) -> int:
        """Rows waiting for W&B."""
        return len(self._pending)

    def stats(self) -> dict[str, float]:
        """Counters for the ``telemetry/`` section (declared in :mod:`~art_ray_metrics.core.counters`)."""
        return {f"telemetry/wandb/{k}": v for k, v in counters.read("wandb", self).items()}

    def _fail(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{what}: {exc!r}"
        log.warning("W&B %s failed for run %s: %r", what, self.run_id, exc)

    # -- init ----------------------------------------------------------------------------

    def _init_run(self) -> Any:
        import wandb

        cfg = self.config
        if cfg.dir is not None:
            Path(cfg.dir).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            console="off",  # the aggregator's stdout is not the experiment's
            x_disable_stats=True,  # host metrics of the aggregator node would mislead
            init_timeout=INIT_TIMEOUT_S,
            **({"api_key": self._api_key} if self._api_key else {}),
        )
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name,
            id=self.run_id,
            resume="allow",
            reinit="create_new",
            mode=cfg.mode,
            dir=cfg.dir,
            config=self._run_config(),
            settings=settings,
        )
        try:
            run.define_metric(STEP_METRIC)
            run.define_metric(WALL_CLOCK_METRIC)
            for glob in WANDB_GLOBS:
                run.define_metric(glob, step_metric=STEP_METRIC)
            run.define_metric(COST_AXIS, step_metric=STEP_METRIC, summary="last")
        except Exception:
            self._finish_run(run, 1)  # an open attach would block the next one ("in use")
            raise
        return run

    def _run_config(self) -> dict[str, Any] | None:
        with self._lock:
            merged = {**(self.config.config or {}), **self._config_updates}
        return merged or None

    def update_config(self, config: Mapping[str, Any]) -> None:
        """Merge ``config`` into the run's config: now if the run is up, else at its init (and
        every re-attach). Never raises (a failure is counted)."""
        try:
            with self._lock:
                self._config_updates.update(config)
                run = self._run
                if run is not None and config:
                    run.config.update(dict(config))
        except Exception as exc:
            self._fail("config", exc)

    def _attach(self) -> bool:
        """One init attempt; on success the run becomes current. Caller holds no lock."""
        finishing = self._finishing
        if finishing is not None:  # W&B refuses an id whose previous attach is still open
            finishing.join(self.config.finish_timeout_s)
        try:
            run = self._init_run()
        except Exception as exc:
            with self._lock:
                self._fail("init", exc)
                self._init_failures += 1
                self._next_init_at = self._clock() + WANDB_INIT.delay(self._init_failures)
            return False
        with self._lock:
            if self._closed:
                self._finish_run(run, 0)
                return False
            self._run = run
            self._defined = {COST_AXIS}
            self._init_failures = 0
            self._consecutive_failures = 0
            self._flush()  # rows queued while W&B was unavailable
        return True

    def start(self) -> str:
        """Create or re-attach the run (``resume="allow"``); return the run id to persist.

        Never raises: if W&B is unavailable the id is still returned and init is retried in
        the background by later :meth:`log` calls.
        """
        if self._run is None:
            self._attach()
        return self.run_id

    def _maybe_start_background_init(self) -> None:
        if self._closed or self._run is not None:
            return
        if self._init_thread is not None and self._init_thread.is_alive():
            return
        if self._clock() < self._next_init_at:
            return
        self._init_thread = threading.Thread(
            target=self._attach, name=f"wandb-init-{self.run_id}", daemon=True
        )
        self._init_thread.start()

    def wait_until_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a background init; return :attr:`ready`."""
        thread = self._init_thread
        if thread is not None:
            thread.join(timeout)
        return self._run is not None

    # -- logging -------------------------------------------------------------------------

    def _define(self, run: Any, key: str) -> None:
        if key in self._defined or not needs_own_definition(key):
            return
        summary = summary_for(key)
        if summary is None:
            run.define_metric(key, step_metric=STEP_METRIC)
        else:
            run.define_metric(key, step_metric=STEP_METRIC, summary=summary)
        self._defined.add(key)

    def _flush(self) -> None:
        """Send queued rows in order; stop at the first failure. Caller holds the lock."""
        run = self._run
        while run is not None and self._pending:
            payload = self._pending[0]
            try:
                for key in payload:
                    self._define(run, key)
                run.log(payload)
            except Exception as exc:
                self._fail("log", exc)
                self._consecutive_failures += 1
                if self._consecutive_failures >= RESET_AFTER_FAILURES:
                    self._abandon_run()
                return
            self._pending.popleft()
            self.logged += 1
            self._consecutive_failures = 0

    def _abandon_run(self) -> None:
        run, self._run = self._run, None
        log.warning("W&B run %s keeps failing; re-attaching it", self.run_id)
        self._finishing = threading.Thread(
            target=self._finish_run, args=(run, 1), name="wandb-abandon", daemon=True
        )
        self._finishing.start()
        self._next_init_at = 0.0
        self._init_failures = 0

    def _enqueue(self, row: Mapping[str, float], step: int | None) -> None:
        payload = {str(k): float(v) for k, v in row.items()}
        if step is not None:
            payload.setdefault(STEP_METRIC, float(step))
        if len(self._pending) >= self.config.max_pending_rows:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(payload)

    def log(
        self,
        row: Mapping[str, float],
        *,
        step: int,
        split: str,
        recorded_at: datetime | None = None,
    ) -> None:
        """Log one row (``run.log(row)``, no ``step=``); never raises.

        ``training_step`` is added from ``step`` if the row lacks it. ``split`` is only used
        in log messages: the keys already carry it; ``recorded_at`` is not logged (W&B stamps
        its own time).
        """
        try:
            with self._lock:
                if self._closed:
                    log.warning("W&B sink closed; dropping %s row of step %s", split, step)
                    return
                self._enqueue(row, step)
                if self._run is None:
                    self._maybe_start_background_init()
                    return
                self._flush()
        except Exception as exc:  # defensive: telemetry never crashes the caller
            self._fail("log", exc)

    def alert(self, title: str, text: str) -> bool:
        """Send one W&B alert (``run.alert``) if the run is open; never raises. Returns
        whether it was sent."""
        try:
            with self._lock:
                if self._closed or self._run is None:
                    return False
                self._run.alert(title=title, text=text)
                return True
        except Exception as exc:  # defensive: telemetry never crashes the caller
            self._fail("alert", exc)
            return False

    def relog(self, rows: Iterable[Mapping[str, float]]) -> int:
        """Re-log rows (e.g. from the history) that W&B may have lost; never raises.

        Each row must carry ``training_step``; history records may be passed as they are
        (``step``, ``split`` and ``recorded_at`` are dropped). A row may appear twice in W&B,
        never zero times.

        Returns:
            The number of rows queued.
        """
        count = 0
        try:
            with self._lock:
                for row in rows:
                    if STEP_METRIC not in row:
                        log.warning("W&B relog: skipping a row without %s", STEP_METRIC)
                        continue
                    self._enqueue(history_row_metrics(row), None)
                    count += 1
                if self._run is None:
                    self._maybe_start_background_init()
                else:
                    self._flush()
        except Exception as exc:
            self._fail("relog", exc)
        return count

    # -- close ---------------------------------------------------------------------------

    def _finish_run(self, run: Any, exit_code: int) -> None:
        try:
            run.finish(exit_code=exit_code)
            self._finished_ok = True
        except Exception as exc:  # BrokenPipeError among others (wandb#6449)
            with self._lock:
                self._fail("finish", exc)

    def close(self, exit_code: int = 0) -> None:
        """Flush what it can, then finish the run within ``finish_timeout_s``; never raises."""
        try:
            thread = self._init_thread
            if thread is not None and thread.is_alive():
                thread.join(min(1.0, self.config.finish_timeout_s))
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                self._flush()
                run, self._run = self._run, None
                if self._pending:
                    log.warning(
                        "W&B run %s closed with %d rows not logged (they are in the history)",
                        self.run_id,
                        len(self._pending),
                    )
            if run is None:
                return
            from art_ray_metrics.export.wandb_offline import offline_run_dir, wait_for_exit_record

            run_dir = offline_run_dir(run)
            started = self._clock()
            self._finished_ok = False
            finisher = threading.Thread(
                target=self._finish_run, args=(run, exit_code), name="wandb-finish", daemon=True
            )
            finisher.start()
            finisher.join(self.config.finish_timeout_s)
            if finisher.is_alive():
                self._fail(
                    "finish", TimeoutError(f"finish exceeded {self.config.finish_timeout_s}s")
                )
            elif run_dir is not None and self._finished_ok:
                # finish() returns before W&B's service has written the run file; an actor
                # killed right after close() would lose its tail, so wait for the exit record
                left = max(0.5, self.config.finish_timeout_s - (self._clock() - started))
                if not wait_for_exit_record(run_dir, timeout_s=left):
                    self._fail("finish", TimeoutError("the offline run file has no exit record"))
        except Exception as exc:
            self._fail("close", exc)
