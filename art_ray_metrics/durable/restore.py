"""Rebuild an aggregator's state from storage: the one restore path.

The aggregator calls :func:`rebuild_state` when it starts; the CLI (``inspect``, ``history``)
and the demo's ``--resume`` call :func:`read_run`, which uses the same function without claiming
the store, so both see the same totals, including after a rewind.

A write-ahead-log record is a msgpack list with one entry per batch, in the order the
aggregator decided them: the batch bytes for a batch it applied whole, ``[bytes, kind]`` for one
it refused whole (``kind`` is :data:`REFUSED_LIMIT` or :data:`REFUSED_INVALID`), and
``[bytes, "partial", limit, refusals]`` for one whose keys it partly refused (``refusals``: each
``[step, scope, key or None, reason]``; ``limit``: a configured limit refused something). Replay
repeats each decision: an applied batch is applied (no limit is checked again), a refused one is
counted and skipped, and a partial one is applied without the keys it names, whatever the
limits of the process replaying. Records written before refusals were marked hold bytes only;
their batches are decided again, with no limits. An entry ``["grant", producer, incarnation,
amount, seq]`` is a run-budget grant, logged before the producer was answered
(:data:`GRANT`), or with a negative amount budget a producer gave back; replay applies each
numbered entry once (one a checkpoint already counts is skipped), so a restart never grants
the same budget twice nor counts returned budget as held.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgpack

from art_ray_metrics import errors
from art_ray_metrics.core import wire
from art_ray_metrics.core.rewind import net_shards
from art_ray_metrics.core.state import AggregatorState, Decision
from art_ray_metrics.durable import checkpoint as ckpt_mod
from art_ray_metrics.durable.checkpoint import CheckpointManager, LoadedCheckpoint
from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.storage import open_store
from art_ray_metrics.errors import LimitExceededError, WireFormatError

__all__ = [
    "GRANT",
    "PARTIAL",
    "REFUSED_INVALID",
    "REFUSED_LIMIT",
    "GrantEntry",
    "RunInfo",
    "WalDecision",
    "encode_wal_record",
    "read_run",
    "rebuild_state",
    "refusal_kind",
]

GRANT = "grant"
"""WAL mark of a run-budget grant (:meth:`~art_ray_metrics.core.budget.BudgetLedger.grant`)."""
REFUSED_LIMIT = "limit"
"""WAL mark of a batch refused by a configured limit (:class:`LimitExceededError`)."""
REFUSED_INVALID = "invalid"
"""WAL mark of any other refused batch (a sum that would overflow, a bad field)."""
PARTIAL = "partial"
"""WAL mark of a batch applied without some of its keys (refused by a limit or an overflow)."""

WalDecision = str | Decision | None
"""How the live aggregator decided a batch: None (applied whole), a refusal kind (refused
whole), or a :data:`~art_ray_metrics.core.state.Decision` (applied without the keys it names)."""

log = logging.getLogger(__name__)


GrantEntry = tuple[str, str, str, int]
"""A logged grant: ``(producer, incarnation, amount as a decimal string, seq)``."""


def refusal_kind(exc: WireFormatError) -> str:
    """How a refused batch is marked in the write-ahead log."""
    return REFUSED_LIMIT if isinstance(exc, LimitExceededError) else REFUSED_INVALID


def encode_wal_record(
    entries: list[tuple[bytes, WalDecision]], grants: list[GrantEntry] | None = None
) -> bytes:
    """One WAL record: ``(batch bytes, decision)`` in decision order, then the run-budget
    grants (see the module)."""
    out: bytes = msgpack.packb(
        [_wal_entry(data, decided) for data, decided in entries]
        + [[GRANT, *grant] for grant in grants or ()],
        use_bin_type=True,
    )
    return out


def _wal_entry(data: bytes, decided: WalDecision) -> Any:
    if decided is None:
        return data
    if isinstance(decided, str):
        return [data, decided]
    limit, refusals = decided
    return [data, PARTIAL, limit, [list(r) for r in refusals]]


def rebuild_state(loaded: LoadedCheckpoint) -> tuple[AggregatorState, int]:
    """Return the state a checkpoint describes, with its write-ahead log replayed.

    Each logged decision is replayed as it was made (see the module docstring); the state
    replays with no limits, so the limits configured now never change a past decision.
    Rewind tombstones are netted out of the id shards, so an id removed by a rewind stays
    removed. Returns the state and the number of batches replayed (duplicates not counted).
    """
    state = (
        AggregatorState.from_checkpoint(loaded.state, net_shards(loaded.shards))
        if loaded.committed
        else AggregatorState()
    )
    replayed = 0
    for record in loaded.wal:
        entries = wire.unpack(
            record, what="a write-ahead-log record", error=errors.CheckpointCorruptError
        )
        for entry in entries:
            decided: Decision | None = None
            if isinstance(entry, list) and entry and entry[0] == GRANT:
                _, producer, incarnation, amount, seq = entry
                state.budget.replay_grant(
                    str(producer), str(incarnation), Decimal(amount), state.clock(), int(seq)
                )
                continue
            if isinstance(entry, list):
                if entry[1] != PARTIAL:  # refused whole when it arrived: refused again
                    data, kind = entry
                    state.refuse_bytes(data, limit=kind == REFUSED_LIMIT)
                    continue
                entry, _, limit, refusals = entry  # applied without the keys it names
                decided = (bool(limit), tuple((int(s), sc, k, r) for s, sc, k, r in refusals))
            try:
                if not state.ingest_bytes(entry, decided).duplicate:
                    replayed += 1
            except WireFormatError as exc:  # an unmarked (older) record's refused batch
                log.warning("art_ray_metrics: replayed a refused batch (counted): %s", exc)
    return state, replayed


@dataclass
class RunInfo:
    """What a run's storage says, as a restarted aggregator would see it (read-only)."""

    uri: str
    committed: bool
    epoch: int
    seq: int
    manifest: str | None
    checkpoint_format: int
    wire_format: int
    wal_records: int
    replayed_batches: int
    last_closed: dict[str, int]
    pending_steps: list[list[Any]]
    totals: dict[str, float]
    unique_scenarios: int
    response_ids: int
    wandb_run_id: str | None
    wandb_finished_upto: int | None
    restarts: int
    counters: dict[str, int]
    producers: int
    history_rows: int
    history_last_step: dict[str, int] = field(default_factory=dict)

    @property
    def last_train_step(self) -> int | None:
        """The last closed train step (state or history, whichever is further)."""
        steps = [
            s
            for s in (self.last_closed.get("train"), self.history_last_step.get("train"))
            if s is not None
        ]
        return max(steps) if steps else None


def read_run(uri: str, store: Any = None) -> RunInfo | None:
    """Load the latest checkpoint and replay its write-ahead log, without claiming the store.

    Returns:
        The run's state, or None when the store holds no checkpoint and no log.

    Raises:
        CheckpointCorruptError: Every checkpoint is unreadable (corrupt, or another format
            version).
        WireFormatError: The state blob or a batch has an unknown format version.
        StorageError: The store failed.
    """
    store = store if store is not None else open_store(uri)
    loaded = CheckpointManager(store).load_latest()
    if loaded is None:
        return None
    state, replayed = rebuild_state(loaded)
    history = HistoryStore(store)
    rows = 0
    last: dict[str, int] = {}
    records, _skipped = history.scan()  # a damaged row is reported by the commands reading rows
    for record in records:
        step, split = int(record["step"]), str(record["split"])
        rows += 1
        last[split] = max(step, last.get(split, step))
    meta = state.meta
    return RunInfo(
        uri=getattr(store, "uri", uri),
        committed=loaded.committed,
        epoch=loaded.epoch,
        seq=loaded.seq,
        manifest=loaded.manifest,
        checkpoint_format=ckpt_mod.FORMAT_VERSION,
        wire_format=wire.FORMAT_VERSION,
        wal_records=len(loaded.wal),
        replayed_batches=replayed,
        last_closed=dict(state.last_closed),
        pending_steps=sorted([s, sc] for s, sc in state.pending),
        totals={k: float(v) for k, v in sorted(state.cum.values.items())},
        unique_scenarios=len(state.cum.scenarios),
        response_ids=len(state.cum.cost_ids),
        wandb_run_id=meta.wandb_run_id,
        wandb_finished_upto=meta.wandb_finished_upto,
        restarts=max(meta.restarts, 0),
        counters=dict(state.counters),
        producers=len(state.producers),
        history_rows=rows,
        history_last_step=last,
    )
