"""The trainer's side of the aggregator: :func:`start_aggregator` and :class:`AggregatorHandle`.

``start_aggregator`` checks the storage, creates (or re-attaches to) the named, detached actor and
hands it the driver's credentials in memory; the handle's calls retry while the actor restarts,
and a watcher thread of the handle sends the credentials again, from memory, as soon as Ray
restarts the actor (rollouts flushing across a restart never wait for the trainer's next call).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any, Literal

from art_ray_metrics.config import AggregatorConfig
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.backoff import WATCH
from art_ray_metrics.core.replies import AggregatorStats
from art_ray_metrics.distributed.actor import MetricsAggregator
from art_ray_metrics.distributed.launch import (
    START_TIMEOUT_S,
    actor_options,
    actor_settings,
    probe_remote_storage,
    wait_started,
)
from art_ray_metrics.durable.storage import (
    backend_for,
)
from art_ray_metrics.errors import (
    ConfigError,
    ConfigMismatchError,
    CredentialsRequiredError,
)
from art_ray_metrics.export.wandb_config import (
    WANDB_SECRETS,
)

__all__ = ["AggregatorHandle", "credentials_from_env", "start_aggregator"]

log = logging.getLogger(__name__)

WATCH_POLL_S = 30.0
"""How long one long-poll call of the credentials watcher waits in a running actor."""


class AggregatorHandle:
    """The trainer's handle on the aggregator actor."""

    def __init__(self, actor: Any, config: AggregatorConfig) -> None:
        self.actor = actor
        self.config = config
        self._sent: str | None = None  # digest of the credentials last sent (never the values)
        self._creds: dict[str, str] | None = None  # what was last sent: this process's memory
        self._watcher: _CredentialsWatcher | None = None

    def set_credentials(self, env: Mapping[str, str] | None = None) -> None:
        """Send credentials to the aggregator, in memory (default: read from this process's env).

        Call it after refreshing short-lived credentials; :meth:`log` also re-sends them when
        this process's environment changed. From the first call on, the handle keeps what it
        sent in memory and a watcher thread sends it again as soon as Ray restarts the actor,
        without waiting for the trainer's next call. Only the variables the storage back end
        and W&B declare as secrets, and those named by ``worker_env``, are read.
        """
        import ray

        creds = dict(env) if env is not None else credentials_from_env(self.config)
        ray.get(self.actor.set_credentials.remote(creds))
        self._creds = creds
        self._sent = _digest(creds)
        if self._watcher is None:
            self._watcher = _CredentialsWatcher(self)

    def _push(self) -> None:
        """Send what was last sent (from memory) again; the environment's if nothing was."""
        self.set_credentials(self._creds)

    def _sync_credentials(self) -> None:
        creds = credentials_from_env(self.config)
        if creds and _digest(creds) != self._sent:
            self.set_credentials(creds)

    def log(
        self,
        step: int,
        split: str = "train",
        metrics: Mapping[str, float] | None = None,
        *,
        expect_producers: int | list[str] | None = None,
        timeout_s: float | None = None,
        on_timeout: Literal["close", "raise"] = "close",
        group_fates: Mapping[str, str] | None = None,
        derived_fates: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """The step barrier: close ``(step, split)``, merge ``metrics``, return the logged row.

        ``group_fates`` (``{group_id: fate}``, fates ``trained``, ``zero_variance``, ``stale``,
        ``errored``, ``discarded``) splits the row's spend into ``costs/outcome/<fate>`` (see
        the README's "Controlling spend"); spend without a fate is ``costs/outcome/unknown``.
        ``derived_fates`` are fates an integration derived itself (the ART adapter passes
        them): attributed the same way (``group_fates`` win for a group in both), but they do
        not turn the outcome keys on for a run whose spend carries no group id.

        ``expect_producers`` waits (up to ``timeout_s``) until that many producers, or that set
        of producer ids, reported for the step. When they don't, the step is closed with what
        arrived (``on_timeout="close"``, counted in ``stats()["health"]["barrier_timeouts"]``) or
        left open and :class:`~art_ray_metrics.errors.BarrierTimeoutError` raised
        (``on_timeout="raise"``). Retried on an actor restart; a retried call for
        the step just closed returns the same row. Invalid ``metrics`` raise
        :class:`~art_ray_metrics.errors.InvalidMetricError`.
        """
        V.check_step(step)
        V.check_split(split)
        self._sync_credentials()
        fates = {str(g): f for g, f in (group_fates or {}).items()}
        derived = {str(g): f for g, f in (derived_fates or {}).items()}
        args: tuple[Any, ...] = (step, split, dict(metrics or {}), expect_producers, timeout_s)
        row: dict[str, float] = self._call("log", *args, on_timeout, fates, derived)
        return row

    def budget(self) -> dict[str, Any]:
        """The run budget's figures: ``limit``, ``soft``, ``spent``, ``committed`` (spend plus
        the leases workers hold), ``unreconciled`` (the crash bound) and ``leases``."""
        out: dict[str, Any] = self._call("budget_stats")
        return out

    def set_budget(
        self, budget_usd: float | None, budget_soft: float | None = None
    ) -> dict[str, Any]:
        """Change the run's hard limit (and soft fraction) while it runs; kept over restarts.

        Raising it lets refused calls through again and re-arms the soft alert; lowering it
        below what is committed stops new grants (leases already held stay spendable).
        Returns the budget's figures (``limit``, ``soft``, ``spent``, ``committed``,
        ``unreconciled``, ``leases``).

        Raises:
            ConfigError: a negative or non-finite limit, or a soft fraction outside (0, 1].
        """
        out: dict[str, Any] = self._call("set_budget", budget_usd, budget_soft)
        return out

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """Call a remote method; retry while the actor restarts (about 50 s at most).

        A restarted actor that cannot open its storage with its node's credentials asks for
        them (CredentialsRequiredError): they are sent from this process, then the call retried.
        """
        import ray

        attempts = 0
        while True:
            try:
                return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                attempts += 1
                if attempts > 30:
                    raise
                time.sleep(min(0.2 * attempts, 2.0))
            except CredentialsRequiredError:
                attempts += 1
                if attempts > 30:
                    raise
                self._push()

    async def alog(
        self,
        step: int,
        split: str = "train",
        metrics: Mapping[str, float] | None = None,
        *,
        expect_producers: int | list[str] | None = None,
        timeout_s: float | None = None,
        on_timeout: Literal["close", "raise"] = "close",
        group_fates: Mapping[str, str] | None = None,
        derived_fates: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """:meth:`log` for asyncio trainers."""
        return await asyncio.to_thread(
            self.log,
            step,
            split,
            metrics,
            expect_producers=expect_producers,
            timeout_s=timeout_s,
            on_timeout=on_timeout,
            group_fates=group_fates,
            derived_fates=derived_fates,
        )

    def rewind(self, step: int) -> dict[str, Any]:
        """The trainer restored its checkpoint of ``step``: discard every step closed after it.

        Call it after restoring the trainer's checkpoint and before rollouts of the next step
        start. Cumulative values, unique ids and the history go back to right after ``step``
        (``-1``: before the first step), so the rows that follow equal those of a run without
        the failure. Returns ``{"discarded_steps", "discarded_buffers", "costs_usd"}``.

        Raises:
            InvalidMetricError: ``step`` is older than the ``rewind_window`` closes kept.
        """
        out: dict[str, Any] = self._call("rewind", step)
        return out

    def stats(self) -> dict[str, Any]:
        """The actor's :meth:`MetricsAggregator.stats` as a map (retried while the actor
        restarts): its keys are the fields of :class:`~art_ray_metrics.core.replies.AggregatorStats`."""
        return AggregatorStats.as_map(self._call("stats"))

    def checkpoint(self) -> dict[str, Any]:
        """Commit a checkpoint now (retried while the actor restarts)."""
        out: dict[str, Any] = self._call("checkpoint")
        return out

    def shutdown(self, exit_code: int = 0, *, kill: bool = True) -> None:
        """Final checkpoint, finish W&B, then kill the detached actor (frees the name)."""
        import ray

        if kill and self._watcher is not None:
            self._watcher.stop()
        try:
            self._call("shutdown", exit_code, timeout_s=120)
        finally:
            if kill:
                ray.kill(self.actor, no_restart=True)
                if self._watcher is not None:  # out of Ray before the caller's ray.shutdown()
                    self._watcher.stop(join_s=2.0)


class _CredentialsWatcher:
    """The handle's daemon thread that gives a restarted aggregator its credentials back.

    It keeps one long-poll call (``credentials_wanted``) pending on the actor. The call fails
    when the actor dies; the next one reaches the instance Ray restarts, which answers True
    before anything else (no driver has sent it credentials yet), and the watcher sends what
    the handle last sent, from memory. It stops with the handle (``shutdown``, or the handle
    garbage-collected), when the actor is gone for good or replaced under its name, and when
    Ray is no longer initialised: it never starts Ray.
    """

    def __init__(self, handle: AggregatorHandle) -> None:
        self._handle = weakref.ref(handle)
        self.actor = handle.actor
        self.name = (handle.config.name, handle.config.namespace)
        self.pushes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="art-ray-metrics-credentials", daemon=True
        )
        # atexit runs last-registered first: this stops the thread before Ray's own exit hook
        # shuts Ray down (a thread inside Ray then makes Ray end the process with status 1)
        atexit.register(self._at_exit)
        self._thread.start()

    def stop(self, join_s: float = 0.0) -> None:
        self._stop.set()
        if join_s > 0 and threading.current_thread() is not self._thread:
            self._thread.join(timeout=join_s)

    def _at_exit(self) -> None:
        self.stop(join_s=2.0)

    def _gone(self, ray: Any) -> bool:
        """The actor is dead for good, or another actor holds its name."""
        try:
            current = ray.get_actor(self.name[0], namespace=self.name[1])
        except ValueError:
            return True
        except Exception:  # GCS unreachable for a moment: try again later
            return False
        return bool(current._actor_id != self.actor._actor_id)

    def _run(self) -> None:
        # Waiting is on the call's concurrent future, not in ray.wait: a thread inside Ray's
        # core worker when the driver calls ray.shutdown() makes Ray end the process. Ray is
        # only called when the long poll completes (every WATCH_POLL_S, or on a restart).
        ref: Any = None
        fut: concurrent.futures.Future[Any] | None = None
        backoff = WATCH.start()
        last_error = ""
        while not self._stop.is_set():
            ray = sys.modules.get("ray")
            if ray is None or not ray.is_initialized() or self._handle() is None:
                return
            try:
                if fut is None:
                    ref = self.actor.credentials_wanted.remote(WATCH_POLL_S)
                    fut = ref.future()
                done, _ = concurrent.futures.wait([fut], timeout=0.5)
                if not done:
                    continue
                finished, fut, ref = fut, None, None
                wanted = finished.result()
            except Exception as exc:  # the actor died (ask the restarted one), or Ray stops
                fut = ref = None
                log.debug("art_ray_metrics: credentials watcher: %s", type(exc).__name__)
                # first: an error caused by ray.shutdown() is seen as such
                self._stop.wait(backoff.next_delay())
                if self._stop.is_set() or not ray.is_initialized() or self._gone(ray):
                    return
                continue
            backoff.reset()
            handle = self._handle()
            if wanted and handle is not None and not self._stop.is_set():
                try:
                    handle._push()
                    self.pushes += 1
                except Exception as exc:  # storage down: the actor asks again, so do we
                    text = " ".join(str(exc).split())[:300]
                    log.log(
                        logging.DEBUG if text == last_error else logging.WARNING,
                        "art_ray_metrics: could not send credentials to the restarted "
                        "aggregator (%s); retrying",
                        text,
                    )
                    last_error = text
                    self._stop.wait(1.0)
            del handle


def _secret_names(cfg: AggregatorConfig) -> tuple[str, ...]:
    return backend_for(cfg.storage_uri or "").secrets + WANDB_SECRETS


def credentials_from_env(cfg: AggregatorConfig) -> dict[str, str]:
    """The secret variables the aggregator of ``cfg`` needs, and those its workers need
    (``cfg.worker_env``), as set in this process's env."""
    names = _secret_names(cfg) + tuple(cfg.worker_env)
    return {k: os.environ[k] for k in names if os.environ.get(k)}


def _digest(creds: Mapping[str, str]) -> str:
    import hashlib

    blob = "\x00".join(f"{k}={v}" for k, v in sorted(creds.items()))
    return hashlib.sha256(blob.encode()).hexdigest()


def start_aggregator(
    config: AggregatorConfig | None = None,
    *,
    start_timeout_s: float | None = START_TIMEOUT_S,
    **fields: Any,
) -> AggregatorHandle:
    """Get or create the named aggregator actor (run by the trainer/driver).

    ``fields`` override ``config`` fields. Initialises Ray locally if needed. An actor of that
    name already running with a different configuration raises
    :class:`~art_ray_metrics.errors.ConfigMismatchError` instead of being reused silently.

    ``start_timeout_s`` bounds the wait for Ray to place and start a new actor (``None``: no
    bound, e.g. while an autoscaler adds the node it needs); opening and restoring its storage
    afterwards is not bounded by it. Past it,
    :class:`~art_ray_metrics.errors.AggregatorStartTimeoutError` says why (no node has a
    resource in ``actor_resources``, or none is free) and the pending actor is removed.
    """
    if start_timeout_s is not None and not start_timeout_s > 0:
        raise ConfigError(f"Expected start_timeout_s > 0 or None but got {start_timeout_s!r}")
    import ray

    base = config or AggregatorConfig()
    cfg = AggregatorConfig.model_validate({**base.model_dump(), **fields}).resolved()
    if not ray.is_initialized():
        ray.init(namespace=cfg.namespace)
    unset = [k for k in cfg.worker_env if not os.environ.get(k)]
    if unset:
        log.warning("art_ray_metrics: worker_env names %s not set here: not sent", unset)
    handle = _attach(cfg)
    if handle is not None:
        return handle
    probe_remote_storage(cfg)
    try:
        actor: Any = (
            ray.remote(MetricsAggregator)
            .options(**actor_options(cfg))
            .remote(cfg.model_dump_json(), await_credentials=True, settings=actor_settings(cfg))
        )
    except ValueError:  # created concurrently by another driver
        handle = _attach(cfg)
        if handle is None:
            raise
        return handle
    handle = AggregatorHandle(actor, cfg)
    try:
        wait_started(actor, cfg, start_timeout_s)
        handle.set_credentials()  # opens, checks and restores the storage: ready afterwards
    except BaseException:
        ray.kill(actor, no_restart=True)  # frees the name; the error says why it cannot run
        raise
    return handle


def _attach(cfg: AggregatorConfig) -> AggregatorHandle | None:
    """A handle on the running aggregator of that name (None: none runs), which must run
    with this configuration; it is sent this driver's credentials."""
    import ray

    try:
        actor = ray.get_actor(cfg.name, namespace=cfg.namespace)
    except ValueError:
        return None
    fingerprint = cfg.fingerprint()
    running: str = ray.get(actor.config_fingerprint.remote())  # type: ignore[assignment]
    if running != fingerprint:
        raise ConfigMismatchError(
            f"An aggregator named {cfg.name!r} (namespace {cfg.namespace!r}) already runs with "
            f"a different configuration (fingerprint {running} != {fingerprint}); shut it "
            "down first (AggregatorHandle.shutdown or ray.kill) or use another name"
        )
    attached = AggregatorHandle(actor, cfg)
    attached.set_credentials()
    return attached
