"""The JSONL history: the system of record, one object per ``(step, split)``.

Object stores cannot append, so every row is its own object, ``history/<step:012d>-<split>.json``,
holding one JSON line with ``step``, ``split``, ``training_step``, ``recorded_at`` (ISO-8601,
UTC) and the row's metrics as finite floats in sorted key order. Writing a ``(step, split)``
again replaces it, so replays are idempotent. The layout is described in ``docs/design.md``.

Fenced writes: the aggregator passes its writer ``epoch``; the record then carries
``writer_epoch`` and is written by compare-and-swap only over a record of the same or an older
epoch, so a stale aggregator can never replace a newer one's row (it gets ``FencedError``). A
row a rewind discarded is replaced the same way by a ``{"discarded": true}`` marker, which
readers skip: a plain delete could not be fenced.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from art_ray_metrics.core import validate as V
from art_ray_metrics.errors import (
    FencedError,
    InvalidMetricError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    WireFormatError,
)

if TYPE_CHECKING:
    from art_ray_metrics.durable.storage import ObjectStore

__all__ = ["STEP_METRIC", "WRITER_EPOCH", "HistoryStore", "history_row_metrics"]

STEP_METRIC = "training_step"
"""The x-axis of every chart; every row carries it."""

log = logging.getLogger(__name__)

WRITER_EPOCH = "writer_epoch"
"""Field of a fenced record: the writer epoch of the aggregator that wrote it."""
_DISCARDED = "discarded"
_RESERVED_FIELDS = V.RESERVED_ROW_KEYS
assert {WRITER_EPOCH, _DISCARDED} <= _RESERVED_FIELDS
_CAS_ATTEMPTS = 8
_NAME_RE = re.compile(r"(\d{12})-([A-Za-z0-9_.]+)\.json")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _clean_row(step: int, row: Mapping[str, float]) -> dict[str, float]:
    """Validate a row for the history; return its metrics as floats in sorted key order."""
    out: dict[str, float] = {}
    for key in sorted(row):
        if not isinstance(key, str) or not key:
            raise InvalidMetricError(f"Expected a non-empty string key but got {key!r}")
        V.check_row_key(key)
        out[key] = V.finite_float(key, row[key])
    if STEP_METRIC in out and out[STEP_METRIC] != step:
        raise InvalidMetricError(
            f"Expected {STEP_METRIC!r} == step {step} but got {row[STEP_METRIC]!r}"
        )
    out.pop(STEP_METRIC, None)
    return out


def _writer_epoch(data: bytes) -> int:
    """The writer epoch of a stored record (0: unfenced, or unreadable and thus replaceable)."""
    try:
        value = json.loads(data.decode("utf-8")).get(WRITER_EPOCH, 0)
    except (UnicodeDecodeError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def history_row_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Return the loggable metrics of a history record (drops ``step``, ``split``, ``recorded_at``).

    ``training_step`` is kept, so the result can be handed to :meth:`WandbSink.relog`.

    >>> history_row_metrics({"step": 3, "split": "train", "training_step": 3,
    ...                      "recorded_at": "2025-01-01T00:00:00+00:00", "loss/train": 0.5})
    {'training_step': 3.0, 'loss/train': 0.5}
    """
    return {
        key: float(value)
        for key, value in record.items()
        if key not in _RESERVED_FIELDS and isinstance(value, int | float)
    }


class HistoryStore:
    """The JSONL history: one object per ``(step, split)`` under ``prefix`` in an object store.

    Args:
        store: Where the objects live (local directory, S3, in memory, ...).
        prefix: Key prefix of the history objects; must end with ``/`` unless empty.
        clock: Source of ``recorded_at`` when :meth:`write` is not given one.
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix: str = "history/",
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            raise InvalidMetricError(f"Expected a prefix ending with '/' but got {prefix!r}")
        self._store = store
        self._prefix = prefix
        self._clock = clock

    @property
    def prefix(self) -> str:
        """Key prefix of the history objects."""
        return self._prefix

    def key_for(self, step: int, split: str) -> str:
        """Return the object key of the row for ``(step, split)``.

        Raises:
            InvalidMetricError: If the step or the split cannot be stored.
        """
        return f"{self._prefix}{V.check_step(step):0{V.STEP_DIGITS}d}-{V.check_split(split)}.json"

    def write(
        self,
        step: int,
        split: str,
        row: Mapping[str, float],
        recorded_at: datetime | None = None,
        *,
        epoch: int | None = None,
    ) -> str:
        """Write (or overwrite) the row for ``(step, split)``; return its object key.

        ``epoch``: fence the write (see the module docstring).

        Raises:
            FencedError: A newer writer epoch wrote this row (only with ``epoch``).
            InvalidMetricError: A value is not a finite number (the message names the key), a
                key is reserved, ``training_step`` disagrees with ``step``, or ``recorded_at``
                is naive. Nothing is written then.
        """
        key = self.key_for(step, split)
        metrics = _clean_row(step, row)
        when = self._clock() if recorded_at is None else recorded_at
        if when.tzinfo is None or when.utcoffset() is None:
            raise InvalidMetricError(
                f"Expected a timezone-aware recorded_at but got {recorded_at!r}"
            )
        record: dict[str, Any] = {
            "step": step,
            "split": split,
            STEP_METRIC: step,
            "recorded_at": when.astimezone(UTC).isoformat(timespec="microseconds"),
        }
        if epoch is not None:
            record[WRITER_EPOCH] = epoch
        record.update(metrics)
        line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
        if epoch is None:
            self._store.put(key, line.encode("utf-8"))
        else:
            self._put_fenced(key, line.encode("utf-8"), epoch, create=True)
        return key

    def discard(self, step: int, split: str, *, epoch: int) -> None:
        """Mark the row of ``(step, split)`` discarded (readers skip it), fenced by ``epoch``.

        Raises:
            FencedError: A newer writer epoch wrote this row; it is left alone.
        """
        key = self.key_for(step, split)
        marker = {"step": step, "split": split, _DISCARDED: True, WRITER_EPOCH: epoch}
        line = json.dumps(marker, separators=(",", ":")) + "\n"
        self._put_fenced(key, line.encode("utf-8"), epoch, create=False)

    def _put_fenced(self, key: str, data: bytes, epoch: int, *, create: bool) -> None:
        """Write ``data`` over a record of epoch <= ``epoch`` only, by compare-and-swap."""
        for _attempt in range(_CAS_ATTEMPTS):
            try:
                current, version = self._store.get_versioned(key)
            except ObjectNotFoundError:
                if not create:
                    return
                try:
                    self._store.put_if_absent(key, data)
                    return
                except PreconditionFailedError:
                    continue  # created meanwhile: check whose it is
            owner = _writer_epoch(current)
            if owner > epoch:
                raise FencedError(
                    f"history row {key!r} in {self._store.uri} was written by a newer "
                    f"aggregator (epoch {owner}); this one (epoch {epoch}) stops writing"
                )
            try:
                self._store.put_if_version(key, data, version)
                return
            except PreconditionFailedError:
                continue
        raise PreconditionFailedError(
            f"Expected to write history row {key!r} in {self._store.uri} but it kept changing"
        )

    def _entries(self) -> list[tuple[int, str, str]]:
        entries: list[tuple[int, str, str]] = []
        plen = len(self._prefix)
        for key in self._store.list(self._prefix):
            if not key.startswith(self._prefix):
                continue
            match = _NAME_RE.fullmatch(key[plen:])
            if match is None:
                log.warning("history: ignoring foreign object %r", key)
                continue
            entries.append((int(match.group(1)), match.group(2), key))
        entries.sort()
        return entries

    def read(
        self, split: str | None = None, start_step: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield history records in ``(step, split)`` order, optionally filtered.

        Discarded rows are skipped; ``writer_epoch`` is not part of the yielded records.

        Args:
            split: Only rows of this split.
            start_step: Only rows with ``step >= start_step``.

        Raises:
            WireFormatError: An object is not one JSON object of the expected shape.
        """
        for step, row_split, key in self._entries():
            if split is not None and row_split != split:
                continue
            if start_step is not None and step < start_step:
                continue
            try:
                record = self._decode(key, self._store.get(key))
            except ObjectNotFoundError:
                continue  # deleted after the listing
            if not record.get(_DISCARDED):
                record.pop(WRITER_EPOCH, None)  # fencing bookkeeping, not part of the row
                yield record

    def scan(self, split: str | None = None) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Like :meth:`read`, but a row that cannot be decoded is skipped and reported, so one
        damaged object never hides the rest of the system of record.

        Returns:
            The readable records in ``(step, split)`` order, and ``(key, reason)`` per skipped
            object.
        """
        records: list[dict[str, Any]] = []
        skipped: list[tuple[str, str]] = []
        for _step, row_split, key in self._entries():
            if split is not None and row_split != split:
                continue
            try:
                record = self._decode(key, self._store.get(key))
            except ObjectNotFoundError:
                continue  # deleted after the listing
            except (WireFormatError, StorageError) as exc:
                skipped.append((key, str(exc).splitlines()[0] if str(exc) else repr(exc)))
                continue
            if not record.get(_DISCARDED):
                record.pop(WRITER_EPOCH, None)
                records.append(record)
        return records, skipped

    @staticmethod
    def _decode(key: str, data: bytes) -> dict[str, Any]:
        try:
            record = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WireFormatError(
                f"Expected one JSON line in {key!r} but got {data[:80]!r}"
            ) from exc
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise WireFormatError(f"Expected a history record in {key!r} but got {record!r}")
        return record

    def row(self, step: int, split: str) -> dict[str, float] | None:
        """The metrics of the row of ``(step, split)`` as :func:`history_row_metrics` gives
        them; None if it was never written or was discarded.

        Raises:
            WireFormatError: The object is not one JSON object of the expected shape.
        """
        key = self.key_for(step, split)
        try:
            record = self._decode(key, self._store.get(key))
        except ObjectNotFoundError:
            return None
        return None if record.get(_DISCARDED) else history_row_metrics(record)

    def last_step(self, split: str | None = None) -> int | None:
        """Return the highest step written (for ``split`` if given), or ``None`` if none."""
        steps = [int(r["step"]) for r in self.read(split=split)]
        return max(steps) if steps else None

    def export_jsonl(self, fp: IO[str]) -> int:
        """Write every record as one JSON line to ``fp`` in ``(step, split)`` order.

        Returns:
            The number of lines written.
        """
        count = 0
        for record in self.read():
            fp.write(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
            count += 1
        return count
