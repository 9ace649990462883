"""The aggregator's answers as typed records: what crosses Ray from the actor to its callers.

Plain frozen dataclasses of builtins, so Ray pickles them as they are and both ends name the
fields. :meth:`IngestAck.from_reply` also reads the plain map an aggregator of an earlier
version answered with; :meth:`AggregatorStats.to_dict` is the map ``handle.stats()`` documents
(its keys and shapes unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["AggregatorStats", "IngestAck", "RefusedKey"]

RefusedKey = tuple[int, str, "str | None", str]
"""A key refused under the limits: ``(step, scope, key, reason)`` (``key`` None: the group)."""


class _ReadsAsMap:
    """Read access by key, as to the plain map earlier versions answered with: a caller of
    the actor written against that map (``reply["durable"]``, ``reply.get("node_id")``; an
    older worker client, a script calling the actor directly) keeps working."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def keys(self) -> Any:
        return self.to_dict().keys()


@dataclass(frozen=True, slots=True)
class IngestAck(_ReadsAsMap):
    """The actor's answer to ``ingest``.

    Attributes:
        producer_id: The batch's producer.
        seq: The batch's sequence number.
        duplicate: The batch had been applied before (a resend); nothing was applied again.
        durable: The batch is in the write-ahead log or a checkpoint.
        durable_upto: Every seq of this producer up to this one is durable (0: none known).
        late_leaves: Leaves of the batch for steps already closed (folded into the next row).
        conflicts: ``(key, ancestor)`` pairs renamed because of a leaf/ancestor conflict.
        refused: Keys refused under the limits (also told again on a resend).
    """

    producer_id: str
    seq: int
    duplicate: bool
    durable: bool
    durable_upto: int
    late_leaves: int = 0
    conflicts: tuple[tuple[str, str], ...] = ()
    refused: tuple[RefusedKey, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The plain map earlier versions answered with (tuples as lists)."""
        return {
            "producer_id": self.producer_id,
            "seq": self.seq,
            "duplicate": self.duplicate,
            "durable": self.durable,
            "durable_upto": self.durable_upto,
            "late_leaves": self.late_leaves,
            "conflicts": [list(c) for c in self.conflicts],
            "refused": [list(r) for r in self.refused],
        }

    @classmethod
    def from_reply(cls, reply: IngestAck | Mapping[str, Any]) -> IngestAck:
        """The record itself, or one read from an earlier version's map (missing keys: the
        answer promised nothing about them)."""
        if isinstance(reply, IngestAck):
            return reply
        refused = reply.get("refused") or ()
        return cls(
            producer_id=str(reply.get("producer_id", "")),
            seq=int(reply.get("seq", 0)),
            duplicate=bool(reply.get("duplicate", False)),
            durable=bool(reply.get("durable", False)),
            durable_upto=int(reply.get("durable_upto", 0)),
            late_leaves=int(reply.get("late_leaves", 0)),
            conflicts=tuple((str(c[0]), str(c[1])) for c in reply.get("conflicts") or ()),
            refused=tuple(
                (int(r[0]), str(r[1]), None if r[2] is None else str(r[2]), str(r[3]))
                for r in refused
            ),
        )


@dataclass(frozen=True, slots=True)
class AggregatorStats(_ReadsAsMap):
    """The actor's ``stats()``: identity, counters, queues, storage and W&B health.

    The fields are the keys of :meth:`to_dict`, the map ``AggregatorHandle.stats()`` returns
    and the README documents; ``counters``, ``gauges`` and ``health`` are rendered from the
    counter registry (:mod:`art_ray_metrics.core.counters`).
    """

    name: str
    namespace: str
    run_name: str
    storage_uri: str
    epoch: int
    fenced: str | None
    counters: dict[str, int]
    conflicts_by_key: dict[str, int]
    pending_steps: list[list[Any]]
    last_closed: dict[str, int]
    producers: int
    gauges: dict[str, float]
    health: dict[str, Any]
    wandb: dict[str, float] | None
    wandb_run_id: str | None
    unique_scenarios: int
    rewound: dict[str, Any]
    cum: dict[str, float]
    uptime_s: float
    pid: int
    node_id: str | None

    def to_dict(self) -> dict[str, Any]:
        """The documented plain map (a shallow copy: the record's maps are its own)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def as_map(reply: AggregatorStats | Mapping[str, Any]) -> dict[str, Any]:
        """The documented map from the record, or an earlier version's map as it was."""
        return reply.to_dict() if isinstance(reply, AggregatorStats) else dict(reply)
