"""Starting an aggregator instance over its storage: open it, restore the state, wire the commit.

Every start (the first one, or Ray's restart) takes these steps in order, with the credentials
in hand: open the storage and check its conditional writes; claim the next writer epoch while
loading the newest commit and replaying its write-ahead log
(:mod:`~art_ray_metrics.durable.restore`), and count the start in the metadata; then wire the
commit stage, the fence, the WAL writer and the committer
(:mod:`~art_ray_metrics.durable.commit`). The actor (:mod:`art_ray_metrics.distributed.actor`)
runs them at boot and keeps what they return; when it boots, and with whose credentials, is
:mod:`.credentials`'s. No Ray here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from decimal import Decimal
from typing import NamedTuple

from art_ray_metrics.config import AggregatorConfig
from art_ray_metrics.core.backoff import STORAGE_READY
from art_ray_metrics.core.meta import Health
from art_ray_metrics.core.state import AggregatorState, Limits
from art_ray_metrics.durable.checkpoint import CheckpointManager
from art_ray_metrics.durable.commit import Committer
from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.restore import rebuild_state
from art_ray_metrics.durable.storage import ObjectStore, check_conditional_writes, open_store
from art_ray_metrics.durable.wal_writer import Fence, Observe, WalWriter
from art_ray_metrics.errors import FencedError, StorageError
from art_ray_metrics.export.sink import HistorySink

__all__ = ["CLOSES_PER_EPOCH", "CommitStage", "Storage", "commit_stage", "open_storage", "restore"]

log = logging.getLogger(__name__)

CLOSES_PER_EPOCH = 10**9
"""Close numbers of writer epoch E start at E * this (rewind object keys never collide)."""


class Storage(NamedTuple):
    """The run's storage, opened: the store and what reads and writes it."""

    store: ObjectStore
    ckpt: CheckpointManager
    history: HistoryStore
    history_sink: HistorySink


class CommitStage(NamedTuple):
    """The commit stage (see :mod:`art_ray_metrics.durable.commit`)."""

    fence: Fence
    wal: WalWriter
    committer: Committer


def open_storage(config: AggregatorConfig, env: dict[str, str]) -> Storage:
    """Open the storage with the credential variables ``env`` (empty: the node's own).

    Raises:
        ConditionalWritesUnsupportedError: The configuration requires conditional writes and
            the storage does not honour them.
    """
    store = open_store(config.storage_uri or "", timeout_s=config.storage_timeout_s, env=env)
    if config.require_conditional_writes:
        check_conditional_writes(store)  # raises ConditionalWritesUnsupportedError
    ckpt = CheckpointManager(
        store,
        retention=config.checkpoint_retention,
        prune_every=config.checkpoint_prune_every,
    )
    history = HistoryStore(store)
    return Storage(store, ckpt, history, HistorySink(history, epoch=lambda: ckpt.epoch))


def restore(
    ckpt: CheckpointManager, config: AggregatorConfig, max_attempts: int
) -> tuple[AggregatorState, int]:
    """Claim the next writer epoch and rebuild the state from the newest commit and its WAL (a
    fresh state without one), under the configured limits and budget; count this start in the
    metadata. Returns the state and the number of batches replayed from the WAL.

    Raises:
        FencedError: A newer aggregator claimed the run meanwhile.
        StorageError: The storage failed ``max_attempts`` times.
    """
    state, replayed = _acquire(ckpt, max_attempts)
    state.limits = Limits(
        max_keys_per_step=config.max_keys_per_step,
        max_keys_per_run=config.max_keys_per_run,
        max_open_scopes=config.max_open_scopes,
    )
    state.budget.configure(
        limit=None if config.budget_usd is None else Decimal(repr(config.budget_usd)),
        soft=Decimal(repr(config.budget_soft)),
        silence_timeout_s=config.budget_silence_timeout_s,
        planned_steps=config.budget_planned_steps,
    )
    meta = state.meta
    # every start claims the next writer epoch, durably, before anything else: so epoch - 1
    # counts the restarts even when an instance died before its first checkpoint
    meta.restarts = max(meta.restarts + 1, ckpt.epoch - 1)
    # close numbers (and so rewind object keys) are unique per writer epoch: a stale
    # aggregator can never overwrite a rewind object this one names
    meta.close_seq = max(meta.close_seq, ckpt.epoch * CLOSES_PER_EPOCH)
    return state, replayed


def _acquire(ckpt: CheckpointManager, max_attempts: int) -> tuple[AggregatorState, int]:
    backoff = STORAGE_READY.start()
    while True:
        try:
            loaded = ckpt.acquire()
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


def commit_stage(
    config: AggregatorConfig,
    storage: Storage,
    state: AggregatorState,
    health: Health,
    observe: Observe,
    *,
    on_fenced: Callable[[], None],
) -> CommitStage:
    """The fence (calling ``on_fenced`` when it trips), the WAL writer (moving the producers'
    durable windows) and the committer."""
    fence = Fence()
    fence.listen(on_fenced)
    wal = WalWriter(
        storage.ckpt,
        health,
        fence,
        state.producers,
        max_queue_bytes=config.max_wal_queue_bytes,
        observe=observe,
    )
    committer = Committer(
        storage.store,
        storage.ckpt,
        storage.history,
        storage.history_sink.log,
        state,
        wal,
        health,
        fence,
        observe,
    )
    return CommitStage(fence, wal, committer)
