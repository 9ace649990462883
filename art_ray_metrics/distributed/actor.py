"""The aggregator: a named, detached Ray actor that is a thin shell over ``AggregatorState``.

It owns no policy: ingest, barriers and rewinds are the pure core's (:mod:`~art_ray_metrics.core`);
this module schedules the I/O around them (write-ahead log, checkpoints, history, W&B) on one
asyncio event loop, with slow I/O in threads. The remote methods, the commit protocol and the
failure semantics are described once, in ``docs/design.md``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from art_ray_metrics.config import AggregatorConfig
from art_ray_metrics.core import adopt as A
from art_ray_metrics.core import keys as K
from art_ray_metrics.core import rewind as R
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.backoff import LOOP_RESTART, STORAGE_READY
from art_ray_metrics.core.dedupe import split_digests
from art_ray_metrics.core.meta import Health, LastRow, OutboxEntry
from art_ray_metrics.core.outcome import FateTable
from art_ray_metrics.core.rewind import TOMBSTONES
from art_ray_metrics.core.state import (
    AggregatorState,
    Limits,
    ProducerKey,
    split_trainer_metrics,
)
from art_ray_metrics.core.wire import batch_identity
from art_ray_metrics.distributed.telemetry import AggregatorTelemetry
from art_ray_metrics.durable.checkpoint import CheckpointManager, CheckpointParts
from art_ray_metrics.durable.history import HistoryStore, history_row_metrics
from art_ray_metrics.durable.restore import (
    WalDecision,
    encode_wal_record,
    rebuild_state,
    refusal_kind,
)
from art_ray_metrics.durable.storage import (
    ObstoreStore,
    check_conditional_writes,
    open_store,
)
from art_ray_metrics.errors import (
    BackPressureError,
    BarrierTimeoutError,
    ConditionalWritesUnsupportedError,
    ConfigError,
    CredentialsRequiredError,
    FencedError,
    InvalidMetricError,
    StorageError,
    WireFormatError,
)
from art_ray_metrics.export.sink import HistorySink, Sink
from art_ray_metrics.export.wandb_sink import (
    WandbSink,
    WandbSinkConfig,
)

__all__ = ["MetricsAggregator"]

log = logging.getLogger(__name__)

CLOSES_PER_EPOCH = 10**9
"""Close numbers of writer epoch E start at E * this (rewind object keys never collide)."""


CREDENTIALS_WAIT_S = 5.0
"""How long a call that needs the storage waits in a restarted actor for the driver's handle to
send credentials (its watcher does so at once) before answering CredentialsRequiredError."""
WORKER_ENV_WAIT_S = 15.0
"""How long :meth:`MetricsAggregator.worker_env` waits for a driver's values on a restarted
instance (within the worker's own bound, ``workerenv.FETCH_TIMEOUT_S``): a restart on a loaded
machine can take longer than the storage's wait."""

NODE_CREDENTIALS_RETRY_S = 30.0
"""A restarted actor whose node's own credentials could not open the storage tries them again
after this long (a call meanwhile waits for the driver's instead)."""


def _wall_clock() -> float:
    return time.time()


class MetricsAggregator:
    """The actor class (wrapped with ``ray.remote`` by :func:`start_aggregator`).

    ``await_credentials``: open the storage at the first call instead of in the constructor,
    so the driver's :meth:`set_credentials` can come first (credentials never travel through
    the constructor, which Ray keeps and replays on every restart).
    """

    def __init__(self, config_json: str, await_credentials: bool = False) -> None:
        self.config = AggregatorConfig.model_validate_json(config_json)
        self.started_at = time.time()
        self.credentials: dict[str, str] = {}  # in memory only: never logged or persisted
        self.booted = False
        self.received = False  # a driver's handle sent credentials to this instance
        self.node_retry_at = 0.0  # when the node's own credentials may be tried again
        self.boot_error = ""  # why they could not open the storage (no values in it)
        self.boot_event: asyncio.Event | None = None  # set when credentials arrive
        # the workers' variables arrive with the credentials, but do not wait for the storage
        self.env_received = False
        self.env_event: asyncio.Event | None = None
        if not await_credentials:
            self._boot()

    def _ensure_booted(self) -> None:
        """Open, check, claim and restore the storage once, with the credentials in hand.

        Raises:
            CredentialsRequiredError: The storage cannot be opened with the credentials this
                process has (the node's environment or identity, or what a driver sent).
        """
        if self.booted:
            return
        try:
            self._boot(attempts=1)  # fail fast: the driver's handle answers with credentials
        except (FencedError, ConditionalWritesUnsupportedError):
            raise
        except (StorageError, ConfigError) as exc:
            self.boot_error = " ".join(str(exc).split())[:300]
            raise CredentialsRequiredError(self._credentials_required()) from exc

    def _credentials_required(self) -> str:
        return (
            f"The aggregator cannot open {self.config.storage_uri} with the credentials it "
            f"has ({self.boot_error}); the driver's handle sends them with set_credentials"
        )

    async def _await_boot(self) -> None:
        """Open the storage before a call that needs it, in a (re)started actor.

        The node's own credentials are tried first (at most every
        :data:`NODE_CREDENTIALS_RETRY_S`); if they cannot open it, the call waits up to
        :data:`CREDENTIALS_WAIT_S` for a driver's handle to send credentials: its watcher
        (:meth:`credentials_wanted`) does so as soon as this instance starts, so rollouts
        flushing across a restart never wait for the trainer's next call.

        Raises:
            CredentialsRequiredError: No credentials that open the storage arrived in time.
        """
        if self.booted:
            return
        if time.monotonic() >= self.node_retry_at:
            try:
                self._ensure_booted()
                return
            except CredentialsRequiredError:
                self.node_retry_at = time.monotonic() + NODE_CREDENTIALS_RETRY_S
        await self._wait_for_credentials()
        if not self.booted:
            raise CredentialsRequiredError(self._credentials_required())

    async def _wait_for_credentials(self, timeout_s: float | None = None) -> None:
        """Until a driver's :meth:`set_credentials` succeeded, at most ``timeout_s``
        (:data:`CREDENTIALS_WAIT_S` when None)."""
        if timeout_s is None:
            timeout_s = CREDENTIALS_WAIT_S
        if self.boot_event is None:
            self.boot_event = asyncio.Event()
        event = self.boot_event
        try:
            await asyncio.wait_for(event.wait(), timeout=timeout_s)
        except TimeoutError:
            pass

    def _boot(self, attempts: int = 6) -> None:
        self.store = open_store(
            self.config.storage_uri or "",
            timeout_s=self.config.storage_timeout_s,
            env=self.credentials,
        )
        if self.config.require_conditional_writes:
            check_conditional_writes(self.store)  # raises ConditionalWritesUnsupportedError
        self.ckpt = CheckpointManager(
            self.store,
            retention=self.config.checkpoint_retention,
            prune_every=self.config.checkpoint_prune_every,
        )
        self.history = HistoryStore(self.store)
        self.history_sink = HistorySink(self.history, epoch=lambda: self.ckpt.epoch)
        self.state, replayed = self._restore(attempts)
        self.state.limits = Limits(
            max_keys_per_step=self.config.max_keys_per_step,
            max_keys_per_run=self.config.max_keys_per_run,
            max_open_scopes=self.config.max_open_scopes,
        )
        cfg = self.config
        self.state.budget.configure(
            limit=None if cfg.budget_usd is None else Decimal(repr(cfg.budget_usd)),
            soft=Decimal(repr(cfg.budget_soft)),
            silence_timeout_s=cfg.budget_silence_timeout_s,
            planned_steps=cfg.budget_planned_steps,
        )
        meta = self.state.meta
        # every start claims the next writer epoch, durably, before anything else: so epoch - 1
        # counts the restarts even when an instance died before its first checkpoint
        meta.restarts = max(meta.restarts + 1, self.ckpt.epoch - 1)
        # close numbers (and so rewind object keys) are unique per writer epoch: a stale
        # aggregator can never overwrite a rewind object this one names
        meta.close_seq = max(meta.close_seq, self.ckpt.epoch * CLOSES_PER_EPOCH)
        self.rewind_queue: dict[str, bytes] = {}  # rewind objects not yet written
        self.tombstones: dict[str, bytes] = dict.fromkeys(TOMBSTONES.values(), b"")
        self.restarted = meta.restarts > 0 or replayed > 0
        self.state.producers.assume_durable()  # what the restored state applied is stored
        # (batch bytes, producer, seq, decision: None when applied whole, else see WalDecision)
        self.wal_queue: list[tuple[bytes, ProducerKey, int, WalDecision]] = []
        self.wal_queue_bytes = 0
        self.closing: dict[tuple[int, str], asyncio.Future[dict[str, float]]] = {}
        self.since_ckpt: list[tuple[ProducerKey, int]] = []
        # group commit: batches queued while a write is in flight go out together in the next
        # one; each write resolves the future of its generation
        self.wal_gen = 0
        self.wal_done: dict[int, asyncio.Future[None]] = {}
        self.wal_wake: asyncio.Event | None = None
        self.fenced: str | None = None
        self.health = Health(replayed_batches=replayed)
        self.ingest_times: deque[float] = deque(maxlen=4096)
        self.inflight = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.wal_lock: asyncio.Lock | None = None
        self.persist_lock: asyncio.Lock | None = None
        self.barrier_lock: asyncio.Lock | None = None  # rewinds and closes, one at a time
        # GPU time is charged from the last train barrier, on the wall clock and persisted, so
        # the time between a barrier and a restart is charged once, at the next barrier
        if meta.gpu_since is None:
            meta.gpu_since = _wall_clock()
        self.gpus: dict[str, int] | None = None
        self.wandb = self._make_wandb()
        self.booted = True
        self.telemetry = AggregatorTelemetry(self.config.name, self.config.namespace)
        self.telemetry.baseline(self.state.counters)  # restored totals were published before

    # -- start-up ---------------------------------------------------------------------------

    def _restore(self, max_attempts: int) -> tuple[AggregatorState, int]:
        backoff = STORAGE_READY.start()
        while True:
            try:
                loaded = self.ckpt.acquire()
                break
            except FencedError:
                raise
            except StorageError as exc:
                if backoff.failures + 1 >= max_attempts:
                    raise
                log.warning("art_ray_metrics: storage not ready (%s); retrying", exc)
                time.sleep(backoff.next_delay())
        if loaded is None:
            return AggregatorState(), 0
        state, replayed = rebuild_state(loaded)
        if replayed:
            log.warning("art_ray_metrics: replayed %d batches from the write-ahead log", replayed)
        return state, replayed

    def _adopted_wandb_run(self) -> dict[str, Any] | None:
        """The ART model's W&B run (project, name, entity) this aggregator logs to, if any: an
        explicit ``wandb_run_id`` in the configuration wins over it."""
        held = self.state.meta.wandb_run
        if held is None or "project" not in held or self.config.wandb_run_id is not None:
            return None
        return held

    def _wandb_run_config(self) -> dict[str, Any]:
        """The run's config: an adopted ART run gets the model's config only, as under ART;
        otherwise the aggregator's configuration plus any model config sent by ``attach``."""
        model_config = dict((self.state.meta.wandb_run or {}).get("config") or {})
        if self._adopted_wandb_run() is not None:
            return model_config
        return {"art_ray_metrics": self.config.model_dump(mode="json"), **model_config}

    def _make_wandb(self) -> WandbSink | None:
        mode = self.config.wandb_enabled_mode()
        if mode == "disabled":
            return None
        meta = self.state.meta
        cfg = self.config
        adopted = self._adopted_wandb_run()
        sink = WandbSink(
            WandbSinkConfig(
                project=adopted["project"] if adopted else cfg.wandb_project,
                entity=cfg.wandb_entity or (adopted.get("entity") if adopted else None),
                run_name=adopted["name"] if adopted else (cfg.wandb_name or cfg.run_name),
                run_id=cfg.wandb_run_id or meta.wandb_run_id,
                mode=mode,
                dir=cfg.wandb_dir,
                config=self._wandb_run_config(),
            ),
            api_key=self.credentials.get("WANDB_API_KEY"),
        )
        meta.wandb_run_id = sink.run_id
        sink.start()
        if self.restarted:
            # W&B buffers rows in its own process until finish(); a killed actor may have lost
            # some. Re-log every row since the last clean finish: twice is fine, never zero.
            since = meta.wandb_finished_upto if meta.wandb_finished_upto is not None else -1
            rows = {
                (int(r["step"]), str(r["split"])): history_row_metrics(r)
                for r in self.history.read(start_step=since + 1)
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
        await self._persist()
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
        held = dict(meta.wandb_run or {})
        held["config"] = {**(held.get("config") or {}), **config}
        current = self._adopted_wandb_run()
        switched, note = False, None
        wanted = run_id is not None and (
            current is None or meta.wandb_run_id != run_id or current["project"] != project
        )
        if wanted and self.config.wandb_run_id is not None:
            note = f"the configured wandb_run_id {self.config.wandb_run_id!r} is kept"
        elif wanted and (meta.last_rows or meta.rewind or (self.wandb and self.wandb.logged)):
            if self.wandb is not None:  # with W&B off there is no run to speak of
                note = (
                    f"rows were already logged to W&B run {meta.wandb_run_id!r}; it is kept (the "
                    f"model's run is {project}/{run_id})"
                )
        elif wanted:
            held.update(project=project, name=name, entity=entity)
            meta.wandb_run_id = run_id
            switched = True
        meta.wandb_run = held
        if switched:
            old = self.wandb
            self.wandb = await asyncio.to_thread(self._make_wandb)
            if old is not None:  # a run with no row: finish it off the loop
                await asyncio.to_thread(old.close, 0)
        elif self.wandb is not None:
            self.wandb.update_config(self._wandb_run_config())
        await self._persist()
        adopted = self._adopted_wandb_run()
        return {
            "run_id": meta.wandb_run_id,
            "project": adopted["project"] if adopted else self.config.wandb_project,
            "switched": switched,
            "note": note,
        }

    async def set_credentials(self, env: dict[str, str]) -> dict[str, Any]:
        """Hold credential variables in memory and use them from now on.

        Before the storage is open, it is opened with them; after, the storage client is rebuilt
        with them (fresh session tokens). Returns the epoch and the variable names; the values
        are never logged, returned or persisted.
        """
        if env or not self.booted:  # a driver without secrets must not wipe another's
            self.credentials = {str(k): str(v) for k, v in env.items()}
        if not self.env_received:
            # workers waiting for their variables get them before the storage is opened (which
            # blocks this loop; a restart's restore can take seconds)
            self.env_received = True
            if self.env_event is not None:
                self.env_event.set()
                self.env_event = None
                await asyncio.sleep(0)
        if self.booted:
            if isinstance(self.store, ObstoreStore):
                self.store.use_env(self.credentials)
        else:
            self._boot()  # errors propagate to the driver as they are
        self._ensure_tasks()
        self.received = True
        if self.boot_event is not None:  # wake the calls waiting for them
            self.boot_event.set()
            self.boot_event = None
        return {"epoch": self.ckpt.epoch, "credentials": sorted(self.credentials)}

    async def credentials_wanted(self, wait_s: float = 10.0) -> bool:
        """Long poll of the driver's handle (its credentials watcher): True at once while no
        driver has sent credentials to this instance (Ray just started or restarted it), else
        False after ``wait_s`` seconds. A watcher whose call fails because the actor died asks
        the restarted instance, and meets True with :meth:`set_credentials` from its memory."""
        if not self.received:
            return True
        await asyncio.sleep(max(0.0, min(float(wait_s), 60.0)))
        return not self.received

    async def worker_env(self) -> dict[str, str]:
        """The variables named by ``config.worker_env`` that a driver sent (the API keys its
        rollouts need), for :func:`~art_ray_metrics.connect` to set in a worker process that
        lacks them. Held in memory only; a restarted instance first waits (bounded) for the
        driver's handle to send them again.

        Raises:
            CredentialsRequiredError: Names are configured but no driver sent values to this
                instance in time (the worker asks again later).
        """
        if self.config.worker_env and not self.env_received:
            if self.env_event is None:
                self.env_event = asyncio.Event()
            try:
                await asyncio.wait_for(self.env_event.wait(), timeout=WORKER_ENV_WAIT_S)
            except TimeoutError:
                pass
            if not self.env_received:
                raise CredentialsRequiredError(
                    "No driver has sent the worker_env values to this aggregator yet (its "
                    "handle does so at start_aggregator and after every restart)"
                )
        return {k: self.credentials[k] for k in self.config.worker_env if k in self.credentials}

    def _ensure_tasks(self) -> None:
        self._ensure_booted()
        if self.tasks:
            return
        self.wal_lock = asyncio.Lock()
        self.persist_lock = asyncio.Lock()
        self.barrier_lock = asyncio.Lock()
        self.wal_wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(self._supervised("wal", self._wal_loop)),
            loop.create_task(self._supervised("checkpoint", self._ckpt_loop)),
        ]

    async def _supervised(self, name: str, body: Any) -> None:
        """Run a background loop forever: a loop that raises is logged, counted and restarted."""
        backoff = LOOP_RESTART.start()
        while True:
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.health.loop_restarts += 1
                log.error("art_ray_metrics: %s loop died (%r); restarting", name, exc)
                await asyncio.sleep(backoff.next_delay())

    # -- ingest -----------------------------------------------------------------------------

    async def ingest(self, data: bytes, durable: bool = False) -> dict[str, Any]:
        """Apply one batch (idempotent on ``(producer_id, incarnation, seq)``); with ``durable``,
        answer once it is in the write-ahead log (group commit: one storage write for every
        batch that arrived meanwhile). A malformed batch is logged too, so the producer's window
        moves past it for good, then :class:`WireFormatError` is raised to the producer. Keys
        refused under the limits are named in the answer's ``refused`` (also on a resend), the
        rest of the batch applies."""
        if not self.booted:  # (re)started: a driver's handle sends the credentials at once
            await self._await_boot()
        self._ensure_tasks()
        self.ingest_times.append(time.monotonic())
        if self.fenced:  # a newer aggregator owns the run: accept nothing
            raise FencedError(self.fenced)
        if self.wal_queue_bytes + len(data) > self.config.max_wal_queue_bytes and self.wal_queue:
            self.health.backpressure += 1
            raise BackPressureError(
                f"The write-ahead queue holds {self.wal_queue_bytes} bytes "
                f"(max_wal_queue_bytes={self.config.max_wal_queue_bytes}); storage is slow or "
                "down: resend later"
            )
        try:
            result = self.state.ingest_bytes(data)  # raises WireFormatError: counted
        except WireFormatError as exc:
            ident = batch_identity(data)
            if ident is not None:  # logged as refused: a replay refuses it again, whatever
                key = (ident[0], ident[1])  # the limits of the restarted aggregator
                self.wal_queue.append((data, key, ident[2], refusal_kind(exc)))
                self.wal_queue_bytes += len(data)
                self.since_ckpt.append((key, ident[2]))
                await self._await_wal(key, ident[2])
            raise
        key = (result.producer_id, result.incarnation)
        refused = [list(r) for r in result.refused]
        if result.duplicate and key not in self.state.producers:
            # a copy of a batch its confirmed (retired) window settled: durable long ago
            return {
                "producer_id": result.producer_id,
                "seq": result.seq,
                "duplicate": True,
                "durable": True,
                "durable_upto": self.state.producers.durable_upto(key),
                "late_leaves": 0,
                "conflicts": [],
                "refused": refused,
            }
        if not result.duplicate:
            decided = (result.limit, result.refused) if result.refused else None
            self.wal_queue.append((data, key, result.seq, decided))
            self.wal_queue_bytes += len(data)
            self.since_ckpt.append((key, result.seq))
            self.state.producers.logged(key, result.seq, result.acked_upto)
        if durable:
            await self._await_wal(key, result.seq)
        windows = self.state.producers
        return {
            "producer_id": result.producer_id,
            "seq": result.seq,
            "duplicate": result.duplicate,
            "durable": windows.durable_seen(key, result.seq),
            "durable_upto": windows.durable_upto(key),
            "late_leaves": result.late_leaves,
            "conflicts": [list(c) for c in result.conflicts],
            "refused": refused,
        }

    async def confirm(self, producer_id: str, incarnation: str, acked_upto: int) -> bool:
        """A producer holds durable acknowledgements up to ``acked_upto``: forget its window
        when nothing above it was applied (see ``AggregatorState.confirm``)."""
        if not self.state.producers.durable_confirmable((producer_id, incarnation), acked_upto):
            return False
        return self.state.confirm(producer_id, incarnation, int(acked_upto))

    async def _await_wal(self, key: ProducerKey, seq: int) -> None:
        """Wait until ``seq`` is durable or a write that should have covered it failed."""
        for _ in range(2):  # the write in flight may predate the batch: then the next one
            if self.state.producers.durable_seen(key, seq) or self.fenced:
                return
            self.inflight += 1
            try:
                await asyncio.shield(self._wal_future())
            finally:
                self.inflight -= 1

    def _wal_future(self) -> asyncio.Future[None]:
        """The future of the next write (the one that will take what is queued now)."""
        fut = self.wal_done.get(self.wal_gen)
        if fut is None:
            fut = self.wal_done[self.wal_gen] = asyncio.get_running_loop().create_future()
        assert self.wal_wake is not None
        self.wal_wake.set()
        return fut

    def _mark_durable(self, items: list[tuple[ProducerKey, int]]) -> None:
        self.state.producers.made_durable(items)

    async def _write_wal(self) -> None:
        assert self.wal_lock is not None
        async with self.wal_lock:
            gen = self.wal_gen
            self.wal_gen += 1  # batches arriving during this write wait for the next one
            try:
                await self._write_wal_locked()
            finally:
                fut = self.wal_done.pop(gen, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def _write_wal_locked(self) -> None:
        if not self.wal_queue or self.fenced:
            return
        batch, self.wal_queue = self.wal_queue, []
        self.wal_queue_bytes = 0
        record = encode_wal_record([(d, refused) for d, _, _, refused in batch])
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.ckpt.append_wal, record)
        except FencedError as exc:
            self._fence(exc)
            return
        except StorageError as exc:
            self.wal_queue[:0] = batch  # keep for the next attempt or the next checkpoint
            self._count_wal_bytes()
            self.health.wal_failures += 1
            self.health.storage_failed(exc)
            return
        self.health.wal_writes += 1
        self.telemetry.observe("wal_commit_seconds", time.monotonic() - started)
        self._mark_durable([(p, s) for _, p, s, _ in batch])

    def _count_wal_bytes(self) -> None:
        self.wal_queue_bytes = sum(len(item[0]) for item in self.wal_queue)

    async def _wal_loop(self) -> None:
        """Write at once when woken by a durable ingest; else every ``wal_interval_s``."""
        assert self.wal_wake is not None
        while True:
            try:
                await asyncio.wait_for(self.wal_wake.wait(), self.config.wal_interval_s)
            except TimeoutError:
                pass
            self.wal_wake.clear()
            self._publish_telemetry()
            if self.wal_queue or self.wal_done:
                await self._write_wal()

    async def _ckpt_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_interval_s)
            if self.since_ckpt or self.state.meta.outbox:
                await self._persist()

    def _fence(self, exc: FencedError) -> None:
        """A newer aggregator owns the storage: stop every write, W&B included."""
        if not self.fenced:
            log.error("art_ray_metrics: %s", exc)
        self.fenced = str(exc)
        self.wal_queue.clear()
        self.wal_queue_bytes = 0
        sink, self.wandb = self.wandb, None
        if sink is not None:  # two writers must never log to one W&B run; finish off-loop
            threading.Thread(target=sink.close, args=(1,), daemon=True).start()

    # -- barrier ----------------------------------------------------------------------------

    async def log(
        self,
        step: int,
        split: str = "train",
        metrics: Mapping[str, float] | None = None,
        expect_producers: int | list[str] | None = None,
        timeout_s: float | None = None,
        on_timeout: str = "close",
        group_fates: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """Close ``(step, split)`` and return its row; see :meth:`AggregatorHandle.log`."""
        if on_timeout not in ("close", "raise"):
            raise InvalidMetricError(
                f"Expected on_timeout 'close' or 'raise' but got {on_timeout!r}"
            )
        self._ensure_tasks()
        V.check_step(step)
        V.check_split(split)
        split_trainer_metrics(metrics)  # invalid metrics raise before anything happens
        FateTable.from_trainer(group_fates)  # and so do invalid fates
        last = self.state.meta.last_rows.get(split)
        if last is not None and last.step == step:
            return dict(last.row)  # a retried barrier call: same row, nothing closed twice
        running = self.closing.get((step, split))
        if running is not None:  # the same barrier still in flight (a retried call)
            return dict(await asyncio.shield(running))
        future: asyncio.Future[dict[str, float]] = asyncio.get_running_loop().create_future()
        self.closing[(step, split)] = future
        try:
            row = await self._close(
                step,
                split,
                metrics,
                expect_producers,
                timeout_s,
                on_timeout == "raise",
                group_fates,
            )
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without a waiter
            raise
        finally:
            del self.closing[(step, split)]
        future.set_result(row)
        return dict(row)

    async def _close(
        self,
        step: int,
        split: str,
        metrics: Mapping[str, float] | None,
        expect_producers: int | list[str] | None,
        timeout_s: float | None,
        strict: bool = False,
        group_fates: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        started = time.monotonic()
        assert self.barrier_lock is not None
        async with self.barrier_lock:  # decided after any rewind in flight has applied
            # a resume: this split closes a step at or below its own last one (another split
            # of the same scope at the same step, e.g. test after val, is not one)
            closed = self.state.last_closed_split.get(split)
            if closed is not None and 0 <= step <= closed and self.config.rewind_window > 0:
                await self._implicit_rewind(step, split)
        if expect_producers is not None:
            missing = await self._wait_for(step, split, expect_producers, timeout_s)
            if missing is not None and strict:  # nothing closed: the step stays open
                raise BarrierTimeoutError(
                    f"Step {step} ({split}) is still open: expected producers {missing} did not "
                    "report in time; call log() again to wait longer, or with on_timeout='close'"
                )
        metrics = dict(metrics or {})
        now = _wall_clock()
        if split == "train":
            gpu = self._gpu_cost(max(0.0, now - self.last_train_barrier))
            if gpu is not None and "costs/gpu" not in metrics:
                metrics["costs/gpu"] = gpu
        async with self.barrier_lock:  # never while a rewind reads its records
            return await self._close_now(step, split, metrics, started, now, group_fates)

    async def _close_now(
        self,
        step: int,
        split: str,
        metrics: dict[str, float],
        started: float,
        now: float,
        group_fates: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """Close, record and commit; the state changes in one synchronous stretch."""
        ledgers = (self.state.cum.scenarios, self.state.cum.cost_ids)
        before = [len(ledger.journal_bytes()) for ledger in ledgers]
        for producer, incarnation in self.state.budget.sweep(time.monotonic()):
            log.warning(
                "art_ray_metrics: producer %s (incarnation %s) silent with budget leased: "
                "its lease is reported as costs/unreconciled",
                producer,
                incarnation,
            )
        report = self.state.close_step(step, split, metrics, group_fates)  # InvalidMetricError
        if self.config.rewind_window > 0:
            added = [ledger.journal_bytes()[n:] for ledger, n in zip(ledgers, before, strict=True)]
            key, data, evicted = R.record_close(
                self.state, step, split, added[0], added[1], window=self.config.rewind_window
            )
            self.rewind_queue[key] = data
            self._forget_rewind_objects(evicted)
        if split == "train":
            self.last_train_barrier = now  # committed with the row that charged up to it
        row = report.row
        if self.config.telemetry_in_rows:
            row.update(self.state.telemetry())
            row.update(self._gauges())
            row[f"{K.TELEMETRY_PREFIX}late_leaves_in_row"] = float(report.late_leaves)
            row[f"{K.TELEMETRY_PREFIX}lost_leaves_in_row"] = float(report.lost_leaves)
            row[f"{K.TELEMETRY_PREFIX}conflicts_in_row"] = float(len(report.conflicts))
            row[f"{K.TELEMETRY_PREFIX}producers_in_row"] = float(len(report.producers))
        if self.state.budget.cross_soft():
            self._soft_limit_crossed()
        recorded_at = datetime.now(UTC).isoformat()
        self.state.meta.outbox.append(OutboxEntry(step, split, row, recorded_at))
        self.state.meta.last_rows[split] = LastRow(step, row)
        await self._persist()
        for sink in self.row_sinks():
            sink.log(row, step=step, split=split)
        self.telemetry.observe("barrier_seconds", time.monotonic() - started)
        self._publish_telemetry(force=True)
        return row

    def _soft_limit_crossed(self) -> None:
        """One log line and one W&B alert when the spend first reaches the soft limit."""
        budget = self.state.budget
        text = (
            f"Run {self.config.run_name!r} spent ${budget.spent:.2f} of its ${budget.limit} "
            f"budget (soft limit {budget.soft:%}); calls are refused past the limit"
        )
        log.warning("art_ray_metrics: %s", text)
        if self.wandb is not None:
            self.wandb.alert("art_ray_metrics: budget soft limit", text)

    # -- the run budget (leases; see core/budget.py) -----------------------------------------

    async def budget_grant(
        self, producer: str, incarnation: str, want: str, need: str, held: str
    ) -> list[Any]:
        """Grant budget to a producer incarnation: ``[amount, exhausted, limit, spent,
        committed]`` (amounts as decimal strings, ``limit`` None without one)."""
        await self._await_boot()
        grant = self.state.budget.grant(
            producer,
            incarnation,
            want=Decimal(want),
            need=Decimal(need),
            held=Decimal(held),
            now=time.monotonic(),
        )
        limit = None if grant.limit is None else str(grant.limit)
        return [str(grant.amount), grant.exhausted, limit, str(grant.spent), str(grant.committed)]

    async def budget_info(self) -> str | None:
        """The run's hard limit as a decimal string (``None``: no budget)."""
        await self._await_boot()
        limit = self.state.budget.limit
        return None if limit is None else str(limit)

    async def budget_return(self, producer: str, incarnation: str, amount: str) -> None:
        """A producer incarnation gives unused budget back (idle, or closing)."""
        await self._await_boot()
        self.state.budget.give_back(producer, incarnation, Decimal(amount), now=time.monotonic())

    async def budget_gone(self, producer: str, incarnation: str) -> bool:
        """Take a producer incarnation for gone (its process died): its lease is reported as
        ``costs/unreconciled`` on the next row. Returns whether it held any."""
        await self._await_boot()
        return self.state.budget.declare_gone(producer, incarnation)

    async def set_budget(
        self, budget_usd: float | str | None, budget_soft: float | str | None = None
    ) -> dict[str, Any]:
        """Change the run's limits while it runs (kept over restarts); see
        :meth:`AggregatorHandle.set_budget`."""
        await self._await_boot()
        budget = self.state.budget
        budget.set_limit(
            None if budget_usd is None else Decimal(str(budget_usd)),
            None if budget_soft is None else Decimal(str(budget_soft)),
            live=True,
        )
        await self._persist()
        return self._budget_stats()

    def _budget_stats(self) -> dict[str, Any]:
        budget = self.state.budget
        return {
            "limit": None if budget.limit is None else float(budget.limit),
            "soft": float(budget.soft),
            "spent": float(budget.spent),
            "committed": float(budget.committed()),
            "unreconciled": float(budget.unreconciled()),
            "leases": len(budget.accounts),
        }

    # -- resume from an older step ----------------------------------------------------------

    def _forget_rewind_objects(self, keys: Iterable[str]) -> None:
        """Unqueue rewind objects not written yet; delete the others after the next commit."""
        for key in keys:
            if self.rewind_queue.pop(key, None) is None:
                self.state.meta.rewind_drop.append(key)

    def _read_rewind(self, key: str) -> R.RewindRecord:
        """One rewind object, from the queue or the store (runs in a thread)."""
        data = self.rewind_queue.get(key)
        if data is None:
            data = self.store.get(key)
        try:
            return R.decode_record(data)
        except WireFormatError as exc:
            raise StorageError(f"Unreadable rewind object at {key!r}: {exc}") from exc

    async def _implicit_rewind(self, step: int, split: str) -> None:
        try:
            await self._rewind(step - 1, keep_late=True)
        except InvalidMetricError as exc:
            self.health.rewind_refused += 1
            log.warning("art_ray_metrics: %s; step %s/%s is folded in as late", exc, step, split)
        except StorageError as exc:
            self.health.rewind_refused += 1
            self.health.storage_failed(exc)
            log.warning("art_ray_metrics: rewind failed (%s); step %s/%s is late", exc, step, split)

    async def rewind(self, step: int) -> dict[str, Any]:
        """The trainer resumed from its checkpoint of ``step``; see the module docstring."""
        self._ensure_tasks()
        if isinstance(step, bool) or not isinstance(step, int) or step < -1:
            raise InvalidMetricError(f"Expected a step >= -1 to rewind to but got {step!r}")
        assert self.barrier_lock is not None
        async with self.barrier_lock:  # a barrier closes before or after, never in between
            result = await self._rewind(step, keep_late=False)
        await self._persist()
        return result

    async def _rewind(self, step: int, *, keep_late: bool) -> dict[str, Any]:
        """Go back to the state right after the last close of a step <= ``step``."""
        plan = R.plan_rewind(
            self.state, step, keep_late=keep_late, window=self.config.rewind_window
        )  # raises InvalidMetricError
        if plan is None:
            return {"discarded_steps": 0}
        names = ([plan.base_key] if plan.base_key else []) + list(plan.keys)
        loaded = await asyncio.to_thread(lambda: [self._read_rewind(k) for k in names])
        base = loaded[0] if plan.base_key else None
        records = loaded[1:] if plan.base_key else loaded
        # -- from here on no await: the state changes in one synchronous stretch
        result = R.apply_rewind(self.state, plan, base, records, keep_late=keep_late)
        for family, removed in result.tombstones.items():
            self.tombstones[family] += removed
        self._forget_rewind_objects(result.dropped_keys)
        self.rewind_queue.update(result.rewritten)  # kept closes, recorded on the new base
        log.warning(
            "art_ray_metrics: rewound to step %s: discarded %d closed steps and %d pending "
            "buffers (%s USD of their spend leaves the totals)",
            step,
            result.discarded_steps,
            result.discarded_buffers,
            result.costs_usd,
        )
        return result.summary()

    @property
    def last_train_barrier(self) -> float:
        """Wall-clock time (epoch seconds) GPU cost is next charged from; in the checkpoint."""
        since = self.state.meta.gpu_since
        return float(since) if since is not None else _wall_clock()

    @last_train_barrier.setter
    def last_train_barrier(self, when: float) -> None:
        self.state.meta.gpu_since = float(when)

    def _gpu_cost(self, wall_s: float) -> float | None:
        """``costs/gpu`` for ``wall_s`` seconds of the configured (or detected) GPUs."""
        cfg = self.config
        if not cfg.gpu_type:
            return None
        if self.gpus is None:  # resolved once: the cluster's GPUs do not change per step
            from art_ray_metrics.spend.gpu import detect_gpus

            detected = detect_gpus() if cfg.gpu_count is None else {}
            if cfg.gpu_type == "auto":
                self.gpus = detected
            else:
                count = cfg.gpu_count if cfg.gpu_count is not None else sum(detected.values())
                self.gpus = {cfg.gpu_type: count} if count else {}
            if not self.gpus:
                log.warning("art_ray_metrics: gpu_type=%r but no GPUs to charge", cfg.gpu_type)
        if not self.gpus:
            return None
        from art_ray_metrics.spend.gpu import gpus_cost_usd

        price = cfg.gpu_hourly_usd
        overrides = {t: price for t in self.gpus} if price is not None else None
        cost = gpus_cost_usd(wall_s, self.gpus, overrides)
        return float(cost) if cost is not None else None

    async def _wait_for(
        self, step: int, split: str, expect: int | list[str], timeout_s: float | None
    ) -> str | None:
        """Wait for the expected producers; return None, or a description of who is missing."""
        deadline = time.monotonic() + (timeout_s or self.config.barrier_timeout_s)
        while True:
            seen = self.state.producers_reported(step, split)
            ok = len(seen) >= expect if isinstance(expect, int) else set(expect) <= seen
            if ok:
                return None
            if time.monotonic() >= deadline:
                self.health.barrier_timeouts += 1
                missing = (
                    expect - len(seen) if isinstance(expect, int) else sorted(set(expect) - seen)
                )
                log.warning(
                    "art_ray_metrics: step %s/%s: %s expected producers did not report",
                    step,
                    split,
                    missing,
                )
                return f"{missing} of {expect}" if isinstance(expect, int) else str(missing)
            await asyncio.sleep(0.01)

    async def _persist(self) -> None:
        """Checkpoint, then write the outbox to the history. Bounded; never raises."""
        assert self.persist_lock is not None
        async with self.persist_lock:
            if self.fenced:
                return
            state_blob, shards, token = self.state.checkpoint_parts()
            tombstones = {f: b for f, b in self.tombstones.items() if b}
            shards.update(tombstones)
            rewind_objects = dict(self.rewind_queue)
            meta = self.state.meta
            rewind_drop, history_drop = list(meta.rewind_drop), list(meta.history_drop)
            wal_next = self.ckpt.wal_next
            covered, self.since_ckpt = self.since_ckpt, []
            outbox = list(meta.outbox)
            try:
                for key, data in rewind_objects.items():  # before the commit that names them
                    await asyncio.to_thread(self.store.put, key, data)
                started = time.monotonic()
                await asyncio.to_thread(
                    self.ckpt.commit, CheckpointParts(state_blob, shards), wal_next=wal_next
                )
                self.telemetry.observe("checkpoint_commit_seconds", time.monotonic() - started)
            except FencedError as exc:
                self._fence(exc)
                return
            except StorageError as exc:
                self.since_ckpt[:0] = covered
                self.health.checkpoint_failures += 1
                self.health.storage_failed(exc)
                log.warning("art_ray_metrics: checkpoint failed, will retry: %s", exc)
                return
            self.state.checkpoint_committed(token)
            for family, data in tombstones.items():
                self.tombstones[family] = self.tombstones[family][len(data) :]
            for key in rewind_objects:
                self.rewind_queue.pop(key, None)
            self.health.checkpoints += 1
            self._mark_durable(covered)
            done = set(covered)
            self.wal_queue = [item for item in self.wal_queue if (item[1], item[2]) not in done]
            self._count_wal_bytes()
            await self._drop_objects(rewind_drop, history_drop)
            written = []
            for entry in outbox:
                try:
                    await asyncio.to_thread(
                        self.history_sink.log,
                        entry.row,
                        step=entry.step,
                        split=entry.split,
                        recorded_at=datetime.fromisoformat(entry.recorded_at),
                    )
                    written.append((entry.step, entry.split))
                except InvalidMetricError as exc:  # cannot happen for our rows; never blocks
                    self.health.history_rejected += 1
                    log.error(
                        "art_ray_metrics: history refused row %s/%s: %s",
                        entry.step,
                        entry.split,
                        exc,
                    )
                    written.append((entry.step, entry.split))
                except FencedError as exc:
                    self._fence(exc)
                    return
                except StorageError as exc:
                    self.health.history_failures += 1
                    self.health.storage_failed(exc)
                    break
            if written:
                box = self.state.meta.outbox
                self.state.meta.outbox = [e for e in box if (e.step, e.split) not in set(written)]

    async def _drop_objects(
        self, rewind_keys: list[str], history_rows: list[tuple[int, str]]
    ) -> None:
        """Delete rewind objects that left the window; mark history rows of discarded steps.

        Both are safe from a stale aggregator: the rewind objects were dropped by a commit that
        succeeded, so any newer aggregator restored that commit and dropped them too; history
        rows are replaced by a fenced marker (a plain delete could remove a newer row).
        """
        if not rewind_keys and not history_rows:
            return
        epoch = self.ckpt.epoch

        def delete() -> None:
            for key in rewind_keys:
                self.store.delete(key)
            for st, sp in history_rows:
                self.history.discard(st, sp, epoch=epoch)

        try:
            await asyncio.to_thread(delete)
        except FencedError as exc:
            self._fence(exc)
            return
        except StorageError as exc:
            self.health.storage_failed(exc)
            return  # retried after the next commit
        meta = self.state.meta
        meta.rewind_drop = [k for k in meta.rewind_drop if k not in set(rewind_keys)]
        done = set(history_rows)
        meta.history_drop = [e for e in meta.history_drop if e not in done]

    # -- operations -------------------------------------------------------------------------

    def _publish_telemetry(self, *, force: bool = False) -> None:
        """Push counters and gauges to Ray's metrics (see :mod:`.telemetry`)."""
        if not self.telemetry.enabled:
            return
        health = self.health
        counters = {
            **self.state.counters,
            "storage_failures/wal": health.wal_failures,
            "storage_failures/checkpoint": health.checkpoint_failures,
            "storage_failures/history": health.history_failures,
            "wandb_failures": self.wandb.failures if self.wandb is not None else 0,
        }
        gauges = {
            "producers": len(self.state.producers),
            "pending_steps": len(self.state.pending),
            "unique_scenarios": len(self.state.cum.scenarios),
            "wal_queue_batches": len(self.wal_queue),
        }
        self.telemetry.publish(counters, gauges, force=force)

    def _gauges(self) -> dict[str, float]:
        now = time.monotonic()
        recent = sum(1 for t in self.ingest_times if now - t <= 10.0)
        p = K.TELEMETRY_PREFIX
        return {
            f"{p}ingest_batches_per_s": recent / 10.0,
            f"{p}wal_queue": float(len(self.wal_queue)),
            f"{p}inflight_durable_calls": float(self.inflight),
            f"{p}checkpoint_failures": float(self.health.checkpoint_failures),
            f"{p}restarts": float(max(self.state.meta.restarts, 0)),
        }

    async def stats(self) -> dict[str, Any]:
        """Counters, rates, queue depths, storage and W&B health."""
        self._ensure_booted()
        return {
            "name": self.config.name,
            "namespace": self.config.namespace,
            "run_name": self.config.run_name,
            "storage_uri": self.store.uri,
            "epoch": self.ckpt.epoch,
            "fenced": self.fenced,
            "counters": dict(self.state.counters),
            "conflicts_by_key": dict(self.state.conflict_names),
            "pending_steps": sorted([s, sc] for s, sc in self.state.pending),
            "last_closed": dict(self.state.last_closed),
            "producers": len(self.state.producers),
            "gauges": self._gauges(),
            "health": self.health.to_dict(),
            "wandb": self.wandb.stats() if self.wandb is not None else None,
            "wandb_run_id": self.state.meta.wandb_run_id,
            "unique_scenarios": len(self.state.cum.scenarios),
            "rewound": self.state.meta.rewound.to_dict(),
            "budget": self._budget_stats(),
            "cum": {k: float(v) for k, v in self.state.cum.values.items()},
            "uptime_s": time.time() - self.started_at,
            "pid": os.getpid(),
            "node_id": _node_id(),
        }

    async def checkpoint(self) -> dict[str, Any]:
        """Commit a checkpoint now (and flush the WAL and the history outbox)."""
        self._ensure_tasks()
        await self._write_wal()
        await self._persist()
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
        the durable one, the history, is written from the outbox by :meth:`_persist`."""
        if self.fenced or self.wandb is None:
            return []
        return [self.wandb]


def _node_id() -> str | None:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return None
