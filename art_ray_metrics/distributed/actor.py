"""The aggregator: a named, detached Ray actor that is a thin shell over ``AggregatorState``.

It owns no policy: ingest, barriers and rewinds are the pure core's (:mod:`~art_ray_metrics.core`).
This module boots and answers the remote methods, each delegating; the I/O around the core is
scheduled on one asyncio event loop, with slow I/O in threads, by the stages it wires together:
when the storage opens and with whose credentials (:mod:`.credentials`), opening it, the restore
and the writer epoch (:mod:`.boot`), the write-ahead log
(:mod:`~art_ray_metrics.durable.wal_writer`) and the persist order
(:mod:`~art_ray_metrics.durable.commit`), barriers and rewinds (:mod:`.barrier`), the run
budget's grants (:mod:`.aggregator_budget`), GPU cost (:mod:`~art_ray_metrics.spend.gpu_meter`),
the W&B run (:mod:`.wandb_run`) and the counters (:mod:`~art_ray_metrics.core.counters`, read
and exported by :mod:`.telemetry`). The remote methods, the commit protocol and the failure
semantics are described once, in ``docs/design.md``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from art_ray_metrics.config import AggregatorConfig
from art_ray_metrics.core import adopt as A
from art_ray_metrics.core.backoff import LOOP_RESTART
from art_ray_metrics.core.dedupe import split_digests
from art_ray_metrics.core.meta import Health
from art_ray_metrics.core.replies import AggregatorStats, IngestAck
from art_ray_metrics.distributed import boot, wandb_run
from art_ray_metrics.distributed.aggregator_budget import AggregatorBudget
from art_ray_metrics.distributed.barrier import Barriers
from art_ray_metrics.distributed.credentials import CredentialGate
from art_ray_metrics.distributed.telemetry import ActorReadings, AggregatorTelemetry
from art_ray_metrics.durable.restore import refusal_kind
from art_ray_metrics.durable.storage import ObstoreStore
from art_ray_metrics.errors import (
    BackPressureError,
    FencedError,
    InvalidMetricError,
    WireFormatError,
)
from art_ray_metrics.export.sink import Sink
from art_ray_metrics.export.wandb_sink import WandbSink
from art_ray_metrics.spend.gpu_meter import GpuMeter

__all__ = ["MetricsAggregator"]

log = logging.getLogger(__name__)


def _wall_clock() -> float:
    return time.time()


class MetricsAggregator:
    """The actor class (wrapped with ``ray.remote`` by :func:`start_aggregator`).

    ``await_credentials``: open the storage at the first call instead of in the constructor,
    so the driver's :meth:`set_credentials` can come first (credentials never travel through
    the constructor, which Ray keeps and replays on every restart). ``settings``: non-secret
    environment variables (:func:`~.launch.actor_settings`) set in this process first.
    """

    def __init__(
        self,
        config_json: str,
        await_credentials: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if settings:
            os.environ.update(settings)  # the actor's own process: Ray gives it no other task
        self.config = AggregatorConfig.model_validate_json(config_json)
        self.started_at = time.time()
        self.gate = CredentialGate(self.config.storage_uri, self._boot)
        if not await_credentials:
            self.gate.open()

    def _boot(self, attempts: int = 6) -> None:
        """Open the storage, restore the state, claim the next writer epoch, build the stages
        (:mod:`.boot`); the gate calls it with the credentials in hand."""
        cfg = self.config
        storage = boot.open_storage(cfg, self.gate.values)
        self.store, self.ckpt, self.history, self.history_sink = storage
        self.state, replayed = boot.restore(self.ckpt, cfg, attempts)
        self.restarted = self.state.meta.restarts > 0 or replayed > 0
        self.health = Health(replayed_batches=replayed)
        self.telemetry = AggregatorTelemetry(cfg.name, cfg.namespace)
        self.state.producers.assume_durable()  # what the restored state applied is stored
        self.fence, self.wal, self.committer = boot.commit_stage(
            cfg,
            storage,
            self.state,
            self.health,
            self.telemetry.observe,
            on_fenced=self._stop_wandb,
        )
        self.readings = ActorReadings(
            self.state, self.health, self.wal, self.telemetry, lambda: self.wandb
        )
        self.tasks: list[asyncio.Task[None]] = []
        self.gpu = GpuMeter(
            self.state.meta,
            _wall_clock(),
            gpu_type=cfg.gpu_type,
            gpu_count=cfg.gpu_count,
            hourly_usd=cfg.gpu_hourly_usd,
        )
        self.wandb: WandbSink | None = None  # opened below, once the stages exist
        self.barriers = Barriers(
            cfg,
            self.state,
            self.committer,
            self.gpu,
            self.health,
            self.telemetry,
            gauges=self.readings.gauges,
            row_sinks=self.row_sinks,
            published=lambda: self.readings.publish(force=True),
            clock=lambda: _wall_clock(),  # looked up per call: tests move the clock
        )
        self.budget = AggregatorBudget(
            self.state, self.wal, self.committer, start=self._ensure_tasks
        )
        self.wandb = self._make_wandb()
        self.telemetry.baseline(self.state.counters)  # restored totals were published before

    def _make_wandb(self) -> WandbSink | None:
        return wandb_run.open_sink(
            self.config,
            self.state.meta,
            self.history,
            api_key=self.gate.values.get("WANDB_API_KEY"),
            restarted=self.restarted,
        )

    # -- an existing ART run moved over (art_ray_metrics.art.attach) ------------------------

    async def adopt_cumulative(
        self, values: dict[str, str], scenarios: bytes, source: str
    ) -> dict[str, Any]:
        """Start a fresh aggregator from another run's totals (an ART model's ``state.json``).

        ``values``: cumulative keys to decimal strings; ``scenarios``: concatenated 16-byte
        digests of the unique scenario ids. A fresh aggregator (nothing closed, no totals)
        adopts them and checkpoints at once; one that has a state keeps it. Returns
        ``{"adopted", "durable", "mismatch"}`` (``mismatch``: one line, or ``None``).

        Raises:
            InvalidMetricError: a key that is not cumulative, or a value that is not a finite
                number (naming both).
            WireFormatError: ``scenarios`` is not a whole number of digests.
        """
        self._ensure_tasks()
        checked = A.check_cumulative(values)
        digests = split_digests(scenarios)
        if not A.is_fresh(self.state):
            return {
                "adopted": False,
                "durable": True,
                "mismatch": A.mismatch(self.state, checked, digests),
            }
        A.adopt(self.state, checked, digests)
        log.warning(
            "art_ray_metrics: adopted %d cumulative values and %d unique scenario ids from %s",
            len(checked),
            len(set(digests)),
            source,
        )
        before = self.health.checkpoints
        await self.committer.persist()
        return {"adopted": True, "durable": self.health.checkpoints > before, "mismatch": None}

    async def use_wandb_run(
        self,
        project: str | None,
        name: str | None,
        run_id: str | None,
        entity: str | None,
        config: dict[str, Any],
    ) -> dict[str, Any]:
        """Log to an ART model's W&B run and merge the model's W&B ``config`` into the run's.

        The run (``project``, ``name``, ``run_id``; ``None``: keep the current one) is adopted
        when the configuration names no ``wandb_run_id`` and no row was closed yet; otherwise
        the current run is kept and ``note`` says why. The choice is checkpointed: a restarted
        aggregator resumes the same run. Returns ``{"run_id", "project", "switched", "note"}``.
        """
        self._ensure_tasks()
        meta = self.state.meta
        choice = wandb_run.choose_run(
            self.config,
            meta,
            self.wandb,
            project=project,
            name=name,
            run_id=run_id,
            entity=entity,
            model_config=config,
        )
        if choice.switched:
            old = self.wandb
            self.wandb = await asyncio.to_thread(self._make_wandb)
            if old is not None:  # a run with no row: finish it off the loop
                await asyncio.to_thread(old.close, 0)
        elif self.wandb is not None:
            self.wandb.update_config(wandb_run.run_config(self.config, meta))
        await self.committer.persist()
        adopted = wandb_run.adopted_run(self.config, meta)
        return {
            "run_id": meta.wandb_run_id,
            "project": adopted["project"] if adopted else self.config.wandb_project,
            "switched": choice.switched,
            "note": choice.note,
        }

    async def set_credentials(self, env: dict[str, str]) -> dict[str, Any]:
        """Hold credential variables in memory and use them from now on.

        Before the storage is open, it is opened with them; after, the storage client is rebuilt
        with them (fresh session tokens). Returns the epoch and the variable names; the values
        are never logged, returned or persisted.
        """
        await self.gate.keep(env)  # workers waiting for their variables get them first
        if self.gate.booted:
            if isinstance(self.store, ObstoreStore):
                self.store.use_env(self.gate.values)
        else:
            self.gate.open()  # errors propagate to the driver as they are
        self._ensure_tasks()
        self.gate.opened()  # wake the calls waiting for them
        return {"epoch": self.ckpt.epoch, "credentials": sorted(self.gate.values)}

    async def credentials_wanted(self, wait_s: float = 10.0) -> bool:
        """Long poll of the driver's handle (its credentials watcher): True at once while no
        driver has sent credentials to this instance (Ray just started or restarted it), else
        False after ``wait_s`` seconds. A watcher whose call fails because the actor died asks
        the restarted instance, and meets True with :meth:`set_credentials` from its memory."""
        return await self.gate.wanted(wait_s)

    async def worker_env(self) -> dict[str, str]:
        """The variables named by ``config.worker_env`` that a driver sent (the API keys its
        rollouts need), for :func:`~art_ray_metrics.connect` to set in a worker process that
        lacks them. Held in memory only; a restarted instance first waits (bounded) for the
        driver's handle to send them again.

        Raises:
            CredentialsRequiredError: Names are configured but no driver sent values to this
                instance in time (the worker asks again later).
        """
        return await self.gate.worker_env(self.config.worker_env)

    def _ensure_tasks(self) -> None:
        self.gate.ensure()
        if self.tasks:
            return
        self.wal.start()
        self.committer.start()
        self.barriers.start()
        loop = asyncio.get_running_loop()
        cfg = self.config
        self.tasks = [
            loop.create_task(
                self._supervised("wal", self.wal.run, cfg.wal_interval_s, self.readings.publish)
            ),
            loop.create_task(
                self._supervised("checkpoint", self.committer.run, cfg.checkpoint_interval_s)
            ),
        ]

    async def _supervised(self, name: str, body: Any, *args: Any) -> None:
        """Run a background loop forever: a loop that raises is logged, counted and restarted."""
        backoff = LOOP_RESTART.start()
        while True:
            try:
                await body(*args)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.health.loop_restarts += 1
                log.error("art_ray_metrics: %s loop died (%r); restarting", name, exc)
                await asyncio.sleep(backoff.next_delay())

    # -- ingest -----------------------------------------------------------------------------

    async def ingest(self, data: bytes, durable: bool = False) -> IngestAck:
        """Apply one batch (idempotent on ``(producer_id, incarnation, seq)``); with ``durable``,
        answer once it is in the write-ahead log (group commit: one storage write for every
        batch that arrived meanwhile). A malformed batch is logged too, so the producer's window
        moves past it for good, then :class:`WireFormatError` is raised to the producer. Keys
        refused under the limits are named in the answer's ``refused`` (also on a resend), the
        rest of the batch applies."""
        if not self.gate.booted:  # (re)started: a driver's handle sends the credentials at once
            await self.gate.wait()
        self._ensure_tasks()
        self.readings.ingested()
        if self.fence:  # a newer aggregator owns the run: accept nothing
            raise FencedError(self.fenced)
        if self.wal.full(len(data)):
            self.health.backpressure += 1
            raise BackPressureError(
                f"The write-ahead queue holds {self.wal.queue_bytes} bytes "
                f"(max_wal_queue_bytes={self.config.max_wal_queue_bytes}); storage is slow or "
                "down: resend later"
            )
        try:
            result = self.state.ingest_bytes(data)  # raises WireFormatError: counted
        except WireFormatError as exc:
            logged = self.wal.log_refused(data, refusal_kind(exc))
            if logged is not None:
                await self.wal.await_durable(*logged)
            raise
        key = (result.producer_id, result.incarnation)
        if result.duplicate and key not in self.state.producers:
            # a copy of a batch its confirmed (retired) window settled: durable long ago
            return IngestAck(
                producer_id=result.producer_id,
                seq=result.seq,
                duplicate=True,
                durable=True,
                durable_upto=self.state.producers.durable_upto(key),
                refused=result.refused,
            )
        self.wal.log_applied(data, result)
        if durable:
            await self.wal.await_durable(key, result.seq)
        return self.wal.ack(result)

    async def confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
        """A producer holds durable acknowledgements up to ``acked_upto``: forget its window
        when nothing above it was applied (see ``AggregatorState.confirm``)."""
        if not self.state.producers.durable_confirmable((producer_id, incarnation), acked_upto):
            return False
        return self.state.confirm(producer_id, incarnation, int(acked_upto))

    @property
    def fenced(self) -> str | None:
        """Why this aggregator stopped writing (a newer one owns the run); None: it did not."""
        return self.fence.reason

    def _stop_wandb(self) -> None:
        """Fenced: two writers must never log to one W&B run; finish it off the loop."""
        sink, self.wandb = self.wandb, None
        if sink is not None:
            threading.Thread(target=sink.close, args=(1,), daemon=True).start()

    # -- barrier and resume (distributed/barrier.py) ---------------------------------------

    async def log(
        self,
        step: int,
        split: str = "train",
        metrics: Mapping[str, float] | None = None,
        expect_producers: int | list[str] | None = None,
        timeout_s: float | None = None,
        on_timeout: str = "close",
        group_fates: Mapping[str, str] | None = None,
        derived_fates: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """Close ``(step, split)`` and return its row; see :meth:`AggregatorHandle.log`."""
        if on_timeout not in ("close", "raise"):
            raise InvalidMetricError(
                f"Expected on_timeout 'close' or 'raise' but got {on_timeout!r}"
            )
        self._ensure_tasks()
        return await self.barriers.close(
            step,
            split,
            metrics,
            expect_producers,
            timeout_s,
            on_timeout,
            group_fates,
            derived_fates,
        )

    # -- the run budget (leases; see core/budget.py) -----------------------------------------

    async def budget_info(self) -> str | None:
        """The run's hard limit as a decimal string (``None``: no budget)."""
        await self.gate.wait()
        limit = self.state.budget.limit
        return None if limit is None else str(limit)

    async def budget_grant(
        self, producer: str, incarnation: str, want: str, need: str, held: str
    ) -> list[Any]:
        """Grant budget to a producer incarnation: ``[amount, exhausted, limit, spent,
        committed]`` (amounts as decimal strings, ``limit`` None without one)."""
        await self.gate.wait()
        return await self.budget.grant(producer, incarnation, want, need, held)

    async def budget_return(self, producer: str, incarnation: str, amount: str) -> None:
        """A producer incarnation gives unused budget back (idle, or closing)."""
        await self.gate.wait()
        self.budget.give_back(producer, incarnation, amount)

    async def budget_gone(self, producer: str, incarnation: str) -> bool:
        """Take a producer incarnation for gone (its process died): its lease is reported as
        ``costs/unreconciled`` on the next row. Returns whether it held any."""
        await self.gate.wait()
        return self.state.budget.declare_gone(producer, incarnation)

    async def set_budget(
        self, budget_usd: float | str | None, budget_soft: float | str | None = None
    ) -> dict[str, Any]:
        """Change the run's limits while it runs (kept over restarts); see
        :meth:`AggregatorHandle.set_budget`."""
        await self.gate.wait()
        return await self.budget.set_limit(budget_usd, budget_soft)

    async def budget_stats(self) -> dict[str, Any]:
        """The run budget's figures (:meth:`AggregatorHandle.budget`)."""
        await self.gate.wait()
        return self.budget.figures()

    async def rewind(self, step: int) -> dict[str, Any]:
        """The trainer resumed from its checkpoint of ``step``; see the module docstring."""
        self._ensure_tasks()
        return await self.barriers.rewind(step)

    # -- operations -------------------------------------------------------------------------

    async def stats(self) -> AggregatorStats:
        """Counters, rates, queue depths, storage and W&B health (``.to_dict()``: the map
        :meth:`AggregatorHandle.stats` returns)."""
        self.gate.ensure()
        state = self.state
        return AggregatorStats(
            name=self.config.name,
            namespace=self.config.namespace,
            run_name=self.config.run_name,
            storage_uri=self.store.uri,
            epoch=self.ckpt.epoch,
            fenced=self.fenced,
            counters=dict(state.counters),
            conflicts_by_key=dict(state.conflict_names),
            pending_steps=sorted([s, sc] for s, sc in state.pending),
            last_closed=dict(state.last_closed),
            producers=len(state.producers),
            gauges=self.readings.gauges(),
            health=self.health.to_dict(),
            wandb=self.wandb.stats() if self.wandb is not None else None,
            wandb_run_id=state.meta.wandb_run_id,
            unique_scenarios=len(state.cum.scenarios),
            rewound=state.meta.rewound.to_dict(),
            cum={k: float(v) for k, v in state.cum.values.items()},
            uptime_s=time.time() - self.started_at,
            pid=os.getpid(),
            node_id=_node_id(),
        )

    async def checkpoint(self) -> dict[str, Any]:
        """Commit a checkpoint now (and flush the WAL and the history outbox)."""
        self._ensure_tasks()
        await self.wal.write()
        await self.committer.persist()
        await self.committer.settled()
        return {"checkpoints": self.health.checkpoints, "fenced": self.fenced}

    async def config_fingerprint(self) -> str:
        """The hash of the configuration this actor runs with."""
        return self.config.fingerprint()

    async def shutdown(self, exit_code: int = 0) -> None:
        """Final checkpoint and W&B finish; call before ``ray.kill``."""
        self._ensure_tasks()
        last = max((r.step for r in self.state.meta.last_rows.values()), default=-1)
        self.state.meta.wandb_finished_upto = last
        await self.checkpoint()
        for sink in self.row_sinks():
            await asyncio.to_thread(sink.close, exit_code)

    def row_sinks(self) -> list[Sink]:
        """The best-effort sinks a closed row goes to right after its commit (W&B, when on);
        the durable one, the history, is written from the outbox by the committer."""
        if self.fenced or self.wandb is None:
            return []
        return [self.wandb]


def _node_id() -> str | None:
    """The Ray node this runs on; None outside Ray (never starts it: ``get_runtime_context``
    would, in a process that imported Ray without joining a cluster, e.g. the in-process
    aggregator's)."""
    ray = sys.modules.get("ray")
    try:
        if ray is None or not ray.is_initialized():
            return None
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return None
