"""The export stage: where a closed row goes, behind one small protocol.

A :class:`Sink` takes rows (``log``), reports what it did (``stats``) and ends (``close``).
Two kinds, by what a failure means:

- **durable** (``durable = True``): the system of record. ``log`` raises when the row was not
  stored (``StorageError``, ``FencedError``, ``InvalidMetricError``); the aggregator keeps the
  row in its checkpointed outbox and hands it over again after the next commit, so a row is
  written after the checkpoint that holds it and never lost. :class:`HistorySink` (the JSONL
  history) is the one durable sink.
- **best effort** (``durable = False``): ``log`` never raises; failures are counted and retried
  by the sink, and the history can always rebuild what it lost.
  :class:`~art_ray_metrics.export.wandb_sink.WandbSink` is one.

The aggregator actor logs each row to its best-effort sinks right after the barrier's commit,
drains the outbox into the durable sink in its persist order, and closes every sink at shutdown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Protocol, runtime_checkable

from art_ray_metrics.durable.history import HistoryStore

__all__ = ["HistorySink", "Sink"]


@runtime_checkable
class Sink(Protocol):
    """Where closed rows go (see the module docstring for ``durable``)."""

    durable: bool
    """Whether :meth:`log` raises when the row was not stored (else it never raises)."""

    def log(
        self,
        row: Mapping[str, float],
        *,
        step: int,
        split: str,
        recorded_at: datetime | None = None,
    ) -> None:
        """Hand over the row of ``(step, split)``, closed at ``recorded_at`` (``None``: now)."""
        ...

    def stats(self) -> dict[str, float]:
        """What the sink did, as flat counters."""
        ...

    def close(self, exit_code: int = 0) -> None:
        """End the sink (bounded in time); later rows are dropped. Never raises."""
        ...


class HistorySink:
    """The JSONL history as a durable :class:`Sink`: each row is a fenced history object.

    Args:
        history: The history of the run's storage.
        epoch: The aggregator's current writer epoch (asked at each write: it fences the row,
            so a stale aggregator never replaces a newer one's; see :mod:`.history`).

    Attributes:
        written: Rows stored.
    """

    durable = True

    def __init__(self, history: HistoryStore, epoch: Callable[[], int]) -> None:
        self.history = history
        self._epoch = epoch
        self.written = 0

    def log(
        self,
        row: Mapping[str, float],
        *,
        step: int,
        split: str,
        recorded_at: datetime | None = None,
    ) -> None:
        """Write the row of ``(step, split)`` (replacing an older write of it).

        Raises:
            FencedError: A newer writer epoch wrote this row.
            InvalidMetricError: The row cannot be stored (nothing is written).
            StorageError: The store failed; the caller hands the row over again later.
        """
        self.history.write(step, split, row, recorded_at, epoch=self._epoch())
        self.written += 1

    def stats(self) -> dict[str, float]:
        """``{"written": rows stored}`` (the actor's health counts the failures)."""
        return {"written": float(self.written)}

    def close(self, exit_code: int = 0) -> None:
        """Nothing to end: every write is complete when :meth:`log` returns."""
