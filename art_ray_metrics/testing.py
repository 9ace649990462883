"""Helpers for testing code that uses art_ray_metrics, without Ray.

- :class:`InProcessAggregator` runs the real aggregator (the actor class over real storage) in
  this process; ``connect`` in unchanged rollout code records into it, and ``log`` returns the
  real row. Its fault switches (:meth:`~InProcessAggregator.crash`,
  :meth:`~InProcessAggregator.replace`, :meth:`~InProcessAggregator.kill`) act as a Ray actor
  restart, a driver replacing the aggregator, and a killed actor.
- :func:`make_batch` builds a :class:`~art_ray_metrics.core.records.LeafBatch` from plain values.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Literal

from art_ray_metrics.config import AggregatorConfig, ClientConfig
from art_ray_metrics.core.dedupe import digest
from art_ray_metrics.core.records import KeyedCost, LeafBatch, StepGroup
from art_ray_metrics.core.replies import AggregatorStats
from art_ray_metrics.core.rollup import EXACT, to_decimal
from art_ray_metrics.core.samples import SampleStats
from art_ray_metrics.distributed import client as _client
from art_ray_metrics.distributed import clients as _clients
from art_ray_metrics.distributed import record as _record
from art_ray_metrics.distributed.actor import MetricsAggregator
from art_ray_metrics.distributed.transport import AggregatorGoneError, InProcessTransport

__all__ = ["InProcessAggregator", "make_batch", "make_group"]


def make_group(
    step: int,
    scope: str = "train",
    leaves: Mapping[str, float] | Iterable[tuple[str, float]] = (),
    *,
    scenario_ids: Iterable[object] = (),
    keyed_costs: Iterable[tuple[str, float, str]] = (),
    samples: Mapping[str, Iterable[float]] | None = None,
) -> StepGroup:
    """A group with repeated keys summed exactly, as a producer pre-aggregates them, and
    ``samples`` (per-rollout values by key) summarised as ``add_sample`` ships them."""
    items = leaves.items() if isinstance(leaves, Mapping) else leaves
    sums: dict[str, Decimal] = {}
    for key, value in items:
        sums[key] = EXACT.add(sums.get(key, Decimal(0)), to_decimal(value))
    keyed = tuple(KeyedCost(k, to_decimal(v), rid) for k, v, rid in keyed_costs)
    digests = b"".join(sorted({digest(s) for s in scenario_ids}))
    stats = {k: SampleStats.of(v) for k, v in (samples or {}).items()}
    return StepGroup(step, scope, sums, keyed, digests, stats)


def make_batch(
    producer_id: str,
    seq: int,
    step: int,
    scope: str = "train",
    leaves: Mapping[str, float] | Iterable[tuple[str, float]] = (),
    *,
    scenario_ids: Iterable[object] = (),
    keyed_costs: Iterable[tuple[str, float, str]] = (),
    samples: Mapping[str, Iterable[float]] | None = None,
) -> LeafBatch:
    """A one-group batch."""
    group = make_group(
        step, scope, leaves, scenario_ids=scenario_ids, keyed_costs=keyed_costs, samples=samples
    )
    return LeafBatch(producer_id, seq, (group,))


class _Instance:
    """What a Ray actor handle points at: one aggregator actor, which a crash restarts in
    place (same handle) and a shutdown or kill ends for good (handles to it fail)."""

    def __init__(self, owner: InProcessAggregator, agg: MetricsAggregator) -> None:
        self.owner = owner
        self.agg = agg
        self.dead = False
        self.calls: set[concurrent.futures.Future[Any]] = set()
        self.lock = threading.RLock()  # held while a crash swaps the actor object

    def submit(self, method: str, *args: Any) -> concurrent.futures.Future[Any]:
        """Run ``agg.<method>(*args)`` on the event loop; the future of its result.

        Raises:
            AggregatorGoneError: This actor was shut down, killed or replaced.
        """
        with self.lock:
            if self.dead:
                raise AggregatorGoneError(
                    f"the aggregator {self.owner.name!r} this handle pointed at is gone"
                )
            fut = asyncio.run_coroutine_threadsafe(
                getattr(self.agg, method)(*args), self.owner._loop
            )
            self.calls.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: concurrent.futures.Future[Any]) -> None:
        self.calls.discard(fut)  # no lock: runs on the loop thread, which a crash waits for

    def abort(self, *, dead: bool, then: Any = None) -> None:
        """The process dies: calls in flight fail, the background loops stop; ``then()``
        (a restart) runs before any new call gets through."""
        with self.lock:
            self.dead = self.dead or dead
            for fut in list(self.calls):
                fut.cancel()
            agg = self.agg

            async def stop() -> None:
                pending = set(getattr(agg, "tasks", []))
                while pending:  # again: asyncio.wait_for on 3.11 can swallow a cancellation
                    for task in pending:
                        task.cancel()
                    _, pending = await asyncio.wait(pending, timeout=0.2)

            asyncio.run_coroutine_threadsafe(stop(), self.owner._loop).result(timeout=30)
            if then is not None:
                self.agg = then()


class InProcessAggregator:
    """The aggregator in this process, for tests of rollout code without Ray.

    It runs :class:`~art_ray_metrics.distributed.actor.MetricsAggregator`, the actor class
    itself, on an event loop thread, over real storage (default: a fresh ``memory://`` store;
    W&B disabled unless configured). While it runs, :func:`art_ray_metrics.connect` with its
    name and namespace records into it through an in-process transport, so unchanged rollout
    code (connect, record, ``flush()``) works; :meth:`log` closes a step as
    ``AggregatorHandle.log`` does and returns the real row::

        with InProcessAggregator(name="unit") as agg:
            b = art_ray_metrics.connect(0, name="unit")
            b.add_cost("train/judge", 0.25)
            assert b.flush().ok
            assert agg.log(0)["costs/all"] == 0.25

    Fault switches: :meth:`crash` (the actor dies and is restarted from its storage under the
    same handle, as Ray restarts an actor), :meth:`replace` (shut down, then a new aggregator
    on the same storage, as a driver calling ``handle.shutdown()`` and ``start_aggregator()``
    again), :meth:`kill` (gone until :meth:`start`).
    """

    def __init__(
        self,
        config: AggregatorConfig | None = None,
        *,
        client_config: ClientConfig | None = None,
        install: bool = True,
        **fields: Any,
    ) -> None:
        """``fields`` override ``config`` fields. ``install``: route ``connect`` for this
        name and namespace here (undone by :meth:`close`)."""
        defaults: dict[str, Any] = {}
        if config is None:
            defaults = {"storage_uri": f"memory://in-process-{uuid.uuid4().hex[:12]}"}
            defaults["wandb_mode"] = "disabled"
        base = (config or AggregatorConfig()).model_dump()
        self.config = AggregatorConfig.model_validate({**base, **defaults, **fields}).resolved()
        self.name = self.config.name
        self.namespace = self.config.namespace
        self.client_config = client_config or ClientConfig(name=self.name, namespace=self.namespace)
        self.closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="art-ray-metrics-in-process", daemon=True
        )
        self._thread.start()
        self._current: _Instance | None = None
        self._installed = False
        self.start()
        if install:
            _clients.set_route(self.name, self.namespace, self.transport)
            self._installed = True

    # -- what transports see ----------------------------------------------------------------

    def lookup(self) -> _Instance | None:
        """The running aggregator (``ray.get_actor`` by name), or None."""
        current = self._current
        return None if current is None or current.dead else current

    def transport(self) -> InProcessTransport:
        """A new transport to this aggregator (one per client)."""
        return InProcessTransport(self)

    def client(
        self, producer_id: str | None = None, config: ClientConfig | None = None
    ) -> _client.MetricsClient:
        """A new client of its own (not the process-wide one ``connect`` uses)."""
        return _client.MetricsClient(
            config or self.client_config, producer_id=producer_id, transport=self.transport()
        )

    def connect(
        self,
        step: int,
        cost_context: str = "train",
        *,
        split: str | None = None,
        producer_id: str | None = None,
        group: object = None,
    ) -> _record.WorkerBuilder:
        """:func:`art_ray_metrics.connect` for this aggregator."""
        return _record.connect(
            step,
            cost_context,
            split=split,
            name=self.name,
            namespace=self.namespace,
            producer_id=producer_id,
            config=self.client_config,
            group=group,
        )

    # -- the trainer's calls ----------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> Any:
        current = self.lookup()
        if current is None:
            raise AggregatorGoneError(f"no in-process aggregator {self.name!r} is running")
        return current.submit(method, *args).result()

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
        """Close ``(step, split)`` and return its row (``AggregatorHandle.log``)."""
        fates = {str(g): f for g, f in (group_fates or {}).items()}
        derived = {str(g): f for g, f in (derived_fates or {}).items()}
        args: tuple[Any, ...] = (step, split, dict(metrics or {}), expect_producers, timeout_s)
        row: dict[str, float] = self._call("log", *args, on_timeout, fates, derived)
        return row

    def budget(self) -> dict[str, Any]:
        """``AggregatorHandle.budget``."""
        out: dict[str, Any] = self._call("budget_stats")
        return out

    def set_budget(
        self, budget_usd: float | None, budget_soft: float | None = None
    ) -> dict[str, Any]:
        """``AggregatorHandle.set_budget``."""
        out: dict[str, Any] = self._call("set_budget", budget_usd, budget_soft)
        return out

    def rewind(self, step: int) -> dict[str, Any]:
        """``AggregatorHandle.rewind``."""
        out: dict[str, Any] = self._call("rewind", step)
        return out

    def stats(self) -> dict[str, Any]:
        """The actor's ``stats()``, as the map ``AggregatorHandle.stats()`` returns."""
        return AggregatorStats.as_map(self._call("stats"))

    def checkpoint(self) -> dict[str, Any]:
        """Commit a checkpoint now."""
        out: dict[str, Any] = self._call("checkpoint")
        return out

    def history(self, split: str | None = None) -> list[dict[str, Any]]:
        """The rows in the run's history (what ``art-ray-metrics history`` reads)."""
        from art_ray_metrics.durable.history import HistoryStore
        from art_ray_metrics.durable.storage import open_store

        store = HistoryStore(open_store(self.config.storage_uri or ""))  # claims nothing
        return list(store.read(split=split))

    @property
    def aggregator(self) -> MetricsAggregator:
        """The running actor object (for inspection)."""
        current = self.lookup()
        if current is None:
            raise AggregatorGoneError(f"no in-process aggregator {self.name!r} is running")
        return current.agg

    # -- life and faults --------------------------------------------------------------------

    def _new_agg(self) -> MetricsAggregator:
        return MetricsAggregator(self.config.model_dump_json())

    def start(self) -> None:
        """Start an aggregator (restoring from the storage) if none runs."""
        if self.lookup() is None:
            self._current = _Instance(self, self._new_agg())

    def crash(self) -> None:
        """The actor process dies (no final checkpoint) and Ray restarts it: a new actor
        object restored from the storage, under the same handle; calls in flight fail."""
        current = self.lookup()
        if current is None:
            self.start()
            return
        current.abort(dead=False, then=self._new_agg)

    def kill(self) -> None:
        """The actor dies for good (``ray.kill``): handles to it fail until :meth:`start`."""
        current = self.lookup()
        if current is not None:
            current.abort(dead=True)
        self._current = None

    def shutdown(self) -> None:
        """Final checkpoint, then the actor is gone (``AggregatorHandle.shutdown``)."""
        current = self.lookup()
        if current is None:
            return
        current.submit("shutdown", 0).result()
        current.abort(dead=True)
        self._current = None

    def replace(self) -> None:
        """:meth:`shutdown`, then a new aggregator on the same storage: handles to the old
        one fail, and clients must look the name up again."""
        self.shutdown()
        self.start()

    def close(self) -> None:
        """Shut down, stop the event loop and give ``connect`` back to Ray."""
        if self.closed:
            return
        try:
            self.shutdown()
        finally:
            self.closed = True
            if self._installed:
                _clients.set_route(self.name, self.namespace, None)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():  # unclosed, it warns when collected
                self._loop.close()

    def __enter__(self) -> InProcessAggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
