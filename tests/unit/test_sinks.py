"""Tests of the JSONL history store and of the history as a durable sink."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from art_ray_metrics.durable import storage
from art_ray_metrics.durable.history import HistoryStore, history_row_metrics
from art_ray_metrics.errors import FencedError, InvalidMetricError, WireFormatError
from art_ray_metrics.export.sink import HistorySink, Sink

T0 = datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=UTC)


@pytest.fixture(params=["memory", "localdir"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[storage.ObjectStore]:
    """An empty object store: in memory and a local directory."""
    if request.param == "memory":
        yield storage.InMemoryStore()
    else:
        yield storage.open_store(str(tmp_path / "store"))


@pytest.fixture
def history(store: storage.ObjectStore) -> HistoryStore:
    """A history over the store with a fixed clock."""
    return HistoryStore(store, clock=lambda: T0)


def _row(step: int, **metrics: float) -> dict[str, float]:
    return {"training_step": float(step), **metrics}


class TestWriteFormat:
    def test_object_key_and_single_json_line(
        self, history: HistoryStore, store: storage.ObjectStore
    ) -> None:
        """A row becomes history/<step:012d>-<split>.json holding one JSON line."""
        key = history.write(42, "train", _row(42, **{"costs/all": 1.83, "loss/train": 0.5}))
        assert key == "history/000000000042-train.json"
        data = store.get(key).decode("utf-8")
        assert data.endswith("\n")
        assert data.count("\n") == 1
        assert json.loads(data) == {
            "step": 42,
            "split": "train",
            "training_step": 42,
            "recorded_at": "2025-01-02T03:04:05.000006+00:00",
            "costs/all": 1.83,
            "loss/train": 0.5,
        }

    def test_training_step_added_when_missing(self, history: HistoryStore) -> None:
        """A row without training_step gets it from the step."""
        history.write(7, "val", {"val/reward": 1.0})
        (record,) = history.read()
        assert record["training_step"] == 7

    def test_recorded_at_converted_to_utc(self, history: HistoryStore) -> None:
        """An aware recorded_at in another zone is stored in UTC."""
        when = datetime(2025, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
        history.write(1, "train", _row(1), recorded_at=when)
        (record,) = history.read()
        assert record["recorded_at"] == "2025-06-01T10:00:00.000000+00:00"

    def test_decimal_and_int_values_stored_as_floats(self, history: HistoryStore) -> None:
        """Decimal money and int counters are written as JSON numbers."""
        history.write(1, "train", _row(1, **{"costs/all": Decimal("0.25"), "data/step_n": 3}))  # type: ignore[arg-type]
        (record,) = history.read()
        assert record["costs/all"] == 0.25
        assert record["data/step_n"] == 3.0

    def test_default_clock_is_utc_now(self, store: storage.ObjectStore) -> None:
        """Without a clock, recorded_at is the current UTC time."""
        before = datetime.now(UTC)
        HistoryStore(store).write(0, "train", _row(0))
        (record,) = HistoryStore(store).read()
        when = datetime.fromisoformat(record["recorded_at"])
        assert when.utcoffset() == timedelta(0)
        assert before <= when <= datetime.now(UTC)

    def test_custom_prefix(self, store: storage.ObjectStore) -> None:
        """Rows go under the given prefix and are read back from it only."""
        runs = HistoryStore(store, prefix="runs/a/history/", clock=lambda: T0)
        other = HistoryStore(store, prefix="runs/b/history/", clock=lambda: T0)
        assert runs.write(3, "train", _row(3)) == "runs/a/history/000000000003-train.json"
        assert [r["step"] for r in runs.read()] == [3]
        assert list(other.read()) == []


class TestValidation:
    @pytest.mark.parametrize(
        "value",
        [math.nan, math.inf, -math.inf, Decimal("NaN"), Decimal("Infinity")],
        ids=["nan", "inf", "-inf", "decimal-nan", "decimal-inf"],
    )
    def test_non_finite_rejected_naming_key(self, history: HistoryStore, value: Any) -> None:
        """NaN and infinities are rejected with the key in the message and nothing written."""
        with pytest.raises(InvalidMetricError, match="costs/train/judge"):
            history.write(1, "train", _row(1, **{"costs/train/judge": value}))
        assert list(history.read()) == []

    @pytest.mark.parametrize("value", ["1.0", None, True], ids=["str", "none", "bool"])
    def test_non_numbers_rejected(self, history: HistoryStore, value: Any) -> None:
        """Strings, None and booleans are not metric values."""
        with pytest.raises(InvalidMetricError, match="reward/x"):
            history.write(1, "train", {"reward/x": value})

    @pytest.mark.parametrize("key", ["step", "split", "recorded_at", ""])
    def test_reserved_or_empty_keys_rejected(self, history: HistoryStore, key: str) -> None:
        """Keys that would clash with the record's own fields are rejected."""
        with pytest.raises(InvalidMetricError):
            history.write(1, "train", {key: 1.0})

    def test_training_step_mismatch_rejected(self, history: HistoryStore) -> None:
        """A row whose training_step differs from its step is rejected."""
        with pytest.raises(InvalidMetricError, match="training_step"):
            history.write(5, "train", _row(4))

    @pytest.mark.parametrize("step", [-1, 10**12, True, 1.0], ids=["neg", "huge", "bool", "float"])
    def test_bad_steps_rejected(self, history: HistoryStore, step: Any) -> None:
        """Steps must be ints in [0, 10**12)."""
        with pytest.raises(InvalidMetricError, match="step"):
            history.write(step, "train", {})

    @pytest.mark.parametrize(
        "split", ["", "a/b", "tr ain", "x-y"], ids=["empty", "slash", "space", "dash"]
    )
    def test_bad_splits_rejected(self, history: HistoryStore, split: str) -> None:
        """Splits must be safe single path segments."""
        with pytest.raises(InvalidMetricError, match="split"):
            history.write(1, split, {})

    def test_naive_recorded_at_rejected(self, history: HistoryStore) -> None:
        """A naive datetime is ambiguous and rejected."""
        with pytest.raises(InvalidMetricError, match="recorded_at"):
            history.write(1, "train", {}, recorded_at=datetime(2025, 1, 1))

    def test_prefix_must_end_with_slash(self, store: storage.ObjectStore) -> None:
        """A prefix without a trailing slash is rejected."""
        with pytest.raises(InvalidMetricError, match="prefix"):
            HistoryStore(store, prefix="history")


class TestReadOrder:
    def _fill(self, history: HistoryStore) -> None:
        for step, split in [(10, "val"), (2, "train"), (10, "train"), (1, "test"), (2, "val")]:
            history.write(step, split, _row(step, **{f"{split}/x": float(step)}))

    def test_step_then_split_order(self, history: HistoryStore) -> None:
        """Rows come back ordered by (step, split) whatever the write order."""
        self._fill(history)
        assert [(r["step"], r["split"]) for r in history.read()] == [
            (1, "test"),
            (2, "train"),
            (2, "val"),
            (10, "train"),
            (10, "val"),
        ]

    def test_step_order_is_numeric_across_digit_counts(self, history: HistoryStore) -> None:
        """Step 100 sorts after step 99 (zero padding)."""
        for step in (100, 9, 99):
            history.write(step, "train", _row(step))
        assert [r["step"] for r in history.read()] == [9, 99, 100]

    def test_filter_by_split(self, history: HistoryStore) -> None:
        """read(split=...) yields only that split."""
        self._fill(history)
        assert [r["step"] for r in history.read(split="val")] == [2, 10]

    def test_filter_by_start_step(self, history: HistoryStore) -> None:
        """read(start_step=...) yields steps >= start_step."""
        self._fill(history)
        assert [(r["step"], r["split"]) for r in history.read(start_step=2, split="train")] == [
            (2, "train"),
            (10, "train"),
        ]

    def test_empty_history(self, history: HistoryStore) -> None:
        """An empty store reads as no rows and no last step."""
        assert list(history.read()) == []
        assert history.last_step() is None

    def test_foreign_objects_ignored(
        self, history: HistoryStore, store: storage.ObjectStore
    ) -> None:
        """Objects under the prefix that are not rows are skipped."""
        store.put("history/README.txt", b"hello")
        store.put("checkpoints/000000000001-train.json", b"{}")
        history.write(1, "train", _row(1))
        assert [r["step"] for r in history.read()] == [1]

    def test_corrupt_row_raises_wire_format_error(
        self, history: HistoryStore, store: storage.ObjectStore
    ) -> None:
        """A row object that is not a JSON record raises WireFormatError naming the key."""
        store.put("history/000000000001-train.json", b"{not json")
        with pytest.raises(WireFormatError, match="000000000001-train"):
            list(history.read())


class TestOverwrite:
    def test_rewrite_same_step_split_latest_wins(self, history: HistoryStore) -> None:
        """Writing (step, split) again replaces the row instead of adding one."""
        history.write(3, "train", _row(3, **{"costs/all": 1.0}))
        history.write(3, "train", _row(3, **{"costs/all": 2.0}))
        rows = list(history.read())
        assert len(rows) == 1
        assert rows[0]["costs/all"] == 2.0

    def test_replay_identical_row_is_idempotent(self, history: HistoryStore) -> None:
        """Replaying the same row leaves the history byte-identical."""
        history.write(3, "train", _row(3, **{"costs/all": 1.0}))
        first = io.StringIO()
        history.export_jsonl(first)
        history.write(3, "train", _row(3, **{"costs/all": 1.0}))
        second = io.StringIO()
        history.export_jsonl(second)
        assert first.getvalue() == second.getvalue()

    def test_other_split_same_step_kept(self, history: HistoryStore) -> None:
        """Rows of the same step in other splits are separate objects."""
        history.write(3, "train", _row(3))
        history.write(3, "val", _row(3))
        assert [r["split"] for r in history.read()] == ["train", "val"]


class TestLastStep:
    def test_last_step_overall_and_per_split(self, history: HistoryStore) -> None:
        """last_step is the highest step, optionally for one split."""
        for step, split in [(1, "train"), (5, "val"), (3, "train")]:
            history.write(step, split, _row(step))
        assert history.last_step() == 5
        assert history.last_step("train") == 3
        assert history.last_step("val") == 5
        assert history.last_step("test") is None


class TestExport:
    def test_export_jsonl_one_line_per_row(self, history: HistoryStore) -> None:
        """export_jsonl writes every row as one JSON line in (step, split) order."""
        history.write(2, "train", _row(2, **{"reward/mean": 0.5}))
        history.write(1, "val", _row(1, **{"val/reward": 0.25}))
        out = io.StringIO()
        assert history.export_jsonl(out) == 2
        lines = out.getvalue().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2]
        assert json.loads(lines[1])["reward/mean"] == 0.5

    def test_export_empty(self, history: HistoryStore) -> None:
        """An empty history exports nothing."""
        out = io.StringIO()
        assert history.export_jsonl(out) == 0
        assert out.getvalue() == ""

    def test_history_row_metrics_strips_record_fields(self, history: HistoryStore) -> None:
        """history_row_metrics returns the loggable metrics of a stored record."""
        history.write(4, "train", _row(4, **{"costs/all": 1.5}))
        (record,) = history.read()
        assert history_row_metrics(record) == {"training_step": 4.0, "costs/all": 1.5}


class TestHistorySink:
    def test_a_durable_sink_writing_fenced_rows(self, history: HistoryStore) -> None:
        """log writes the row with the writer epoch asked at that moment; read drops it."""
        epoch = [3]
        sink = HistorySink(history, epoch=lambda: epoch[0])
        assert isinstance(sink, Sink)
        assert sink.durable is True
        sink.log(_row(1, **{"loss/train": 0.5}), step=1, split="train", recorded_at=T0)
        (record,) = history.read()
        assert record == {
            "step": 1,
            "split": "train",
            "training_step": 1,
            "recorded_at": "2025-01-02T03:04:05.000006+00:00",
            "loss/train": 0.5,
        }
        assert sink.stats() == {"written": 1.0}
        epoch[0] = 2  # a stale aggregator: its write of the same row is refused
        with pytest.raises(FencedError):
            sink.log(_row(1, **{"loss/train": 9.0}), step=1, split="train")
        assert next(history.read())["loss/train"] == 0.5
        assert sink.stats() == {"written": 1.0}

    def test_a_row_it_cannot_store_raises_and_writes_nothing(self, history: HistoryStore) -> None:
        """The caller keeps what was not stored: a durable sink says so by raising."""
        sink = HistorySink(history, epoch=lambda: 1)
        with pytest.raises(InvalidMetricError, match="loss"):
            sink.log({"loss": math.nan}, step=0, split="train")
        assert list(history.read()) == []
        sink.close()  # nothing to end
