"""The aggregator's bookkeeping as typed records: checkpointed metadata and health counters.

:class:`AggregatorMeta` travels in every checkpoint as a plain msgpack map (:meth:`to_dict` /
:meth:`from_dict`); the map keeps the field names and shapes of earlier versions, so older
checkpoints load and keys this version does not know are carried through unchanged.
:class:`Health` is in memory only (``stats()["health"]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

__all__ = [
    "AggregatorMeta",
    "Health",
    "LastRow",
    "OutboxEntry",
    "RewindEntry",
    "RewoundTotals",
]


@dataclass(slots=True)
class OutboxEntry:
    """A closed row committed to the checkpoint but not yet written to the history."""

    step: int
    split: str
    row: dict[str, float]
    recorded_at: str  # ISO-8601, UTC

    def to_wire(self) -> list[Any]:
        return [self.step, self.split, self.row, self.recorded_at]


@dataclass(slots=True)
class LastRow:
    """The last row closed for a split: a retried barrier call returns it again."""

    step: int
    row: dict[str, float]


@dataclass(slots=True)
class RewindEntry:
    """One close in the rewind window and the object holding the state right after it."""

    step: int
    split: str
    key: str


@dataclass(slots=True)
class RewoundTotals:
    """What rewinds discarded so far."""

    rewinds: int = 0
    steps: int = 0
    costs_usd: Decimal = Decimal(0)

    def to_dict(self) -> dict[str, Any]:
        """The ``stats()["rewound"]`` and on-disk form (money as a decimal string)."""
        return {"rewinds": self.rewinds, "steps": self.steps, "costs_usd": str(self.costs_usd)}


@dataclass(slots=True)
class AggregatorMeta:
    """Checkpointed metadata of the aggregator (everything but the metric state itself).

    Attributes:
        outbox: Committed rows not yet in the history, oldest first.
        last_rows: Per split, the last closed row.
        restarts: Starts of the aggregator after the first (-1 before the first start).
        wandb_run_id: The W&B run every restart resumes.
        wandb_finished_upto: Last step of a clean W&B finish (``None``: never finished).
        rewind: The rewind window, oldest close first.
        rewind_drop: Rewind objects to delete after the next commit.
        rewind_floor: Step of the newest close that left the window (-1: none did).
        history_drop: ``(step, split)`` history rows of discarded steps to mark discarded.
        close_seq: Number of the last close (makes rewind object keys unique).
        rewound: What rewinds discarded.
        gpu_since: Wall-clock time GPU cost is next charged from (``None``: not started).
        baseline_cum: Cumulative values adopted before the first close (an existing ART run
            moved over, :func:`~art_ray_metrics.core.adopt.adopt`); a rewind to before every
            close kept returns to them.
        wandb_run: The W&B run adopted from an ART model (``project``, ``name``, ``entity``)
            and the model's W&B ``config``; ``None``: the configuration's run.
        extra: Keys this version does not know, kept as they were.
    """

    outbox: list[OutboxEntry] = field(default_factory=list)
    last_rows: dict[str, LastRow] = field(default_factory=dict)
    restarts: int = -1
    wandb_run_id: str | None = None
    wandb_finished_upto: int | None = None
    rewind: list[RewindEntry] = field(default_factory=list)
    rewind_drop: list[str] = field(default_factory=list)
    rewind_floor: int = -1
    history_drop: list[tuple[int, str]] = field(default_factory=list)
    close_seq: int = 0
    rewound: RewoundTotals = field(default_factory=RewoundTotals)
    gpu_since: float | None = None
    baseline_cum: dict[str, Decimal] = field(default_factory=dict)
    wandb_run: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The msgpack-able map stored in checkpoints (``None`` fields are left out)."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            {
                "outbox": [e.to_wire() for e in self.outbox],
                "last_rows": {sp: [r.step, r.row] for sp, r in self.last_rows.items()},
                "restarts": self.restarts,
                "rewind": [[r.step, r.split, r.key] for r in self.rewind],
                "rewind_drop": list(self.rewind_drop),
                "rewind_floor": self.rewind_floor,
                "history_drop": [[st, sp] for st, sp in self.history_drop],
                "close_seq": self.close_seq,
                "rewound": self.rewound.to_dict(),
            }
        )
        if self.wandb_run_id is not None:
            out["wandb_run_id"] = self.wandb_run_id
        if self.wandb_finished_upto is not None:
            out["wandb_finished_upto"] = self.wandb_finished_upto
        if self.gpu_since is not None:
            out["gpu_since"] = self.gpu_since
        if self.baseline_cum:
            out["baseline_cum"] = {k: str(v) for k, v in self.baseline_cum.items()}
        if self.wandb_run is not None:
            out["wandb_run"] = dict(self.wandb_run)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> AggregatorMeta:
        """Inverse of :meth:`to_dict`; missing keys (older checkpoints) take their defaults."""
        known = set(cls.__dataclass_fields__) - {"extra"}
        rewound = raw.get("rewound") or {}
        finished = raw.get("wandb_finished_upto")
        since = raw.get("gpu_since")
        return cls(
            outbox=[
                OutboxEntry(int(st), str(sp), dict(row), str(at))
                for st, sp, row, at in raw.get("outbox", [])
            ],
            last_rows={
                str(sp): LastRow(int(st), dict(row))
                for sp, (st, row) in raw.get("last_rows", {}).items()
            },
            restarts=int(raw.get("restarts", -1)),
            wandb_run_id=raw.get("wandb_run_id"),
            wandb_finished_upto=int(finished) if finished is not None else None,
            rewind=[RewindEntry(int(st), str(sp), str(k)) for st, sp, k in raw.get("rewind", [])],
            rewind_drop=[str(k) for k in raw.get("rewind_drop", [])],
            rewind_floor=int(raw.get("rewind_floor", -1)),
            history_drop=[(int(st), str(sp)) for st, sp in raw.get("history_drop", [])],
            close_seq=int(raw.get("close_seq", 0)),
            rewound=RewoundTotals(
                int(rewound.get("rewinds", 0)),
                int(rewound.get("steps", 0)),
                Decimal(str(rewound.get("costs_usd", "0"))),
            ),
            gpu_since=float(since) if since is not None else None,
            baseline_cum={
                str(k): Decimal(str(v)) for k, v in (raw.get("baseline_cum") or {}).items()
            },
            wandb_run=dict(raw["wandb_run"]) if raw.get("wandb_run") is not None else None,
            extra={k: v for k, v in raw.items() if k not in known},
        )


@dataclass(slots=True)
class Health:
    """The aggregator's storage and barrier health counters (``stats()["health"]``)."""

    wal_writes: int = 0
    wal_failures: int = 0
    checkpoints: int = 0
    checkpoint_failures: int = 0
    history_failures: int = 0
    replayed_batches: int = 0
    last_storage_error: str | None = None
    barrier_timeouts: int = 0
    rewind_refused: int = 0
    backpressure: int = 0
    history_rejected: int = 0
    loop_restarts: int = 0

    def storage_failed(self, exc: BaseException) -> None:
        """Remember the latest storage error (its first 300 characters)."""
        self.last_storage_error = str(exc)[:300]

    def to_dict(self) -> dict[str, Any]:
        """The plain map ``stats()`` returns."""
        return asdict(self)
