"""Tests of WandbSink against real wandb in offline mode, and of the offline-run reader."""

from __future__ import annotations

import importlib
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from art_ray_metrics.errors import WireFormatError
from art_ray_metrics.export.sink import Sink
from art_ray_metrics.export.wandb_config import (
    INIT_RETRY_BACKOFF_S,
    RESET_AFTER_FAILURES,
    WANDB_GLOBS,
)
from art_ray_metrics.export.wandb_offline import (
    BLOCK_SIZE,
    FILE_HEADER,
    find_offline_run_files,
    iter_records,
    read_offline_history,
    read_offline_metric_definitions,
    read_offline_summary,
    wait_for_exit_record,
)
from art_ray_metrics.export.wandb_sink import WandbSink, WandbSinkConfig
from tests.wandb_env import forget_wandb_settings

wandb = pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Run W&B offline and silent inside tmp_path, with no credentials (W&B's process-wide
    settings forgotten before and after: sinks here leave the mode to W&B)."""
    forget_wandb_settings()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    forget_wandb_settings()


@pytest.fixture
def make_sink(tmp_path: Path) -> Iterator[Callable[..., WandbSink]]:
    """Build sinks writing under tmp_path; close any left open."""
    made: list[WandbSink] = []

    def make(**overrides: Any) -> WandbSink:
        fields: dict[str, Any] = {"project": "art-ray-metrics-test", "dir": str(tmp_path)}
        fields.update(overrides)
        sink = WandbSink(WandbSinkConfig(**fields))
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def _row(step: int, **metrics: float) -> dict[str, float]:
    return {"training_step": float(step), **metrics}


def _finished_files(wandb_dir: str | Path | None, run_id: str) -> list[Path]:
    """The run's files, once wandb-core has flushed each (finish returns before that)."""
    files = find_offline_run_files(wandb_dir or "", run_id)
    for file in files:
        assert wait_for_exit_record(file), f"{file} never got its exit record"
    return files


def _metric_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop W&B's own underscore keys."""
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in history]


class TestSinkProtocol:
    def test_a_best_effort_sink(self, make_sink: Callable[..., WandbSink]) -> None:
        """WandbSink is a Sink whose log never raises, even once closed."""
        sink = make_sink(mode="disabled")
        assert isinstance(sink, Sink)
        assert sink.durable is False
        sink.close()
        sink.log(_row(0), step=0, split="train")  # dropped, not raised
        assert sink.stats()["telemetry/wandb/logged"] == 0.0


class TestOfflineRoundTrip:
    def test_rows_read_back_with_training_step(
        self, make_sink: Callable[..., WandbSink], tmp_path: Path
    ) -> None:
        """Three logged rows come back from the .wandb file, each with training_step."""
        sink = make_sink(run_name="roundtrip")
        run_id = sink.start()
        rows = [
            _row(0, **{"reward/mean": 0.5, "costs/train/judge": 0.01}),
            _row(1, **{"reward/mean": 0.75, "costs/train/judge": 0.02}),
            _row(1, **{"val/reward": 0.9}),
        ]
        for row, split in zip(rows, ["train", "train", "val"], strict=True):
            sink.log(row, step=int(row["training_step"]), split=split)
        sink.close()
        assert (sink.logged, sink.failures, sink.pending) == (3, 0, 0)
        (file,) = _finished_files(tmp_path, run_id)
        history = read_offline_history(file)
        assert _metric_rows(history) == rows
        assert [row["_step"] for row in history] == [0, 1, 2]  # no step= given

    def test_training_step_added_from_step(self, make_sink: Callable[..., WandbSink]) -> None:
        """A row without training_step gets it from step=."""
        sink = make_sink()
        run_id = sink.start()
        sink.log({"loss/train": 1.5}, step=7, split="train")
        sink.close()
        (file,) = _finished_files(sink.config.dir, run_id)
        assert _metric_rows(read_offline_history(file)) == [{"loss/train": 1.5, "training_step": 7}]

    def test_older_training_step_is_not_dropped(self, make_sink: Callable[..., WandbSink]) -> None:
        """A late row for an older step still lands (W&B's _step keeps increasing)."""
        sink = make_sink()
        run_id = sink.start()
        sink.log(_row(5, **{"reward/mean": 1.0}), step=5, split="train")
        sink.log(_row(3, **{"val/reward": 0.5}), step=3, split="val")
        sink.close()
        (file,) = _finished_files(sink.config.dir, run_id)
        assert [r["training_step"] for r in read_offline_history(file)] == [5, 3]

    def test_metric_definitions_recorded(self, make_sink: Callable[..., WandbSink]) -> None:
        """Globs, the cost axis and per-key cost/cum/rate definitions reach the run file."""
        sink = make_sink()
        run_id = sink.start()
        sink.log(
            _row(
                0,
                **{
                    "costs/train/judge": 0.5,
                    "costs/cum/train/judge": 0.5,
                    "throughput/step_tokens_per_s": 10.0,
                    "reward/mean": 1.0,
                    "myeval/score": 2.0,
                },
            ),
            step=0,
            split="train",
        )
        sink.close()
        (file,) = _finished_files(sink.config.dir, run_id)
        defs = read_offline_metric_definitions(file)
        by_glob = {d["glob_name"]: d for d in defs if "glob_name" in d}
        by_name = {d["name"]: d for d in defs if "name" in d}
        assert set(by_glob) == set(WANDB_GLOBS)
        assert {d["step_metric"] for d in by_glob.values()} == {"training_step"}
        assert by_name["training_step"]["step_metric"] == ""
        assert by_name["costs/cum/all"] == {
            "name": "costs/cum/all",
            "step_metric": "training_step",
            "summary": ["last"],
        }
        assert by_name["costs/train/judge"]["summary"] == []
        assert by_name["costs/cum/train/judge"]["summary"] == ["last"]
        assert by_name["throughput/step_tokens_per_s"]["summary"] == ["mean"]
        assert by_name["myeval/score"]["step_metric"] == "training_step"
        assert "reward/mean" not in by_name  # the glob covers it
        assert "costs/train/judge" in by_name  # defined once, even if logged again

    def test_summaries_last_for_cumulative_mean_for_rates(
        self, make_sink: Callable[..., WandbSink]
    ) -> None:
        """The run summary keeps the last cumulative value and the mean of a rate."""
        sink = make_sink()
        run_id = sink.start()
        for step, (cum, rate) in enumerate([(1.0, 10.0), (3.0, 20.0), (6.0, 60.0)]):
            sink.log(
                _row(step, **{"costs/cum/all": cum, "throughput/step_tokens_per_s": rate}),
                step=step,
                split="train",
            )
        sink.close()
        (file,) = _finished_files(sink.config.dir, run_id)
        summary = read_offline_summary(file)
        assert summary["costs/cum/all"] == {"last": 6}
        assert summary["throughput/step_tokens_per_s"] == {"mean": 30}

    def test_large_row_spans_blocks(self, make_sink: Callable[..., WandbSink]) -> None:
        """A row larger than a 32 KiB block is reassembled from FIRST/MIDDLE/LAST pieces."""
        sink = make_sink()
        run_id = sink.start()
        big = _row(0, **{f"train/k{i:04d}": float(i) for i in range(2500)})
        sink.log(big, step=0, split="train")
        sink.close()
        (file,) = _finished_files(sink.config.dir, run_id)
        assert file.stat().st_size > 2 * BLOCK_SIZE
        assert _metric_rows(read_offline_history(file)) == [big]


class TestResume:
    def test_same_run_id_twice_gives_same_id_and_two_files(
        self, make_sink: Callable[..., WandbSink], tmp_path: Path
    ) -> None:
        """Restarting with a persisted id re-attaches it; both attaches are found in order."""
        first = make_sink()
        run_id = first.start()
        first.log(_row(0, **{"reward/mean": 0.1}), step=0, split="train")
        first.close()
        second = make_sink(run_id=run_id)
        assert second.start() == run_id
        second.log(_row(1, **{"reward/mean": 0.2}), step=1, split="train")
        second.close()
        files = _finished_files(tmp_path, run_id)
        assert len(files) == 2
        steps = [r["training_step"] for f in files for r in read_offline_history(f)]
        assert steps == [0, 1]

    def test_new_run_id_when_none_given(
        self, make_sink: Callable[..., WandbSink], tmp_path: Path
    ) -> None:
        """Without a run_id the sink creates one and W&B uses it."""
        sink = make_sink()
        run_id = sink.start()
        assert len(run_id) == 8
        assert run_id.isalnum()
        sink.close()
        assert [f.name for f in find_offline_run_files(tmp_path)] == [f"run-{run_id}.wandb"]

    def test_relog_history_rows(self, make_sink: Callable[..., WandbSink], tmp_path: Path) -> None:
        """relog re-sends history records (record fields dropped) and skips rows without axis."""
        sink = make_sink()
        run_id = sink.start()
        records: list[dict[str, Any]] = [
            {"step": 4, "split": "train", "training_step": 4, "recorded_at": "x", "loss/a": 1.0},
            {"loss/a": 2.0},  # no training_step: skipped
            {"step": 5, "split": "val", "training_step": 5, "recorded_at": "y", "val/r": 0.5},
        ]
        assert sink.relog(records) == 2
        sink.close()
        (file,) = _finished_files(tmp_path, run_id)
        assert _metric_rows(read_offline_history(file)) == [
            {"training_step": 4, "loss/a": 1.0},
            {"training_step": 5, "val/r": 0.5},
        ]


class TestDisabled:
    def test_disabled_mode_logs_nothing(
        self, make_sink: Callable[..., WandbSink], tmp_path: Path
    ) -> None:
        """mode='disabled' accepts rows without failures and writes no run files."""
        sink = make_sink(mode="disabled")
        sink.start()
        sink.log(_row(0, **{"reward/mean": 1.0}), step=0, split="train")
        sink.close()
        assert sink.failures == 0
        assert not (tmp_path / "wandb").exists() or find_offline_run_files(tmp_path) == []


class TestFailures:
    def test_failing_log_is_counted_then_retried(
        self, make_sink: Callable[..., WandbSink], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A raising run.log is counted, not raised; the row is sent on the next call."""
        sink = make_sink()
        run_id = sink.start()
        run = sink._run
        real_log = run.log

        def broken(*args: Any, **kwargs: Any) -> None:
            raise BrokenPipeError("socket closed")

        monkeypatch.setattr(run, "log", broken)
        sink.log(_row(0, **{"reward/mean": 1.0}), step=0, split="train")
        assert sink.failures == 1
        assert "BrokenPipeError" in (sink.last_error or "")
        assert (sink.logged, sink.pending) == (0, 1)
        monkeypatch.setattr(run, "log", real_log)
        sink.log(_row(1, **{"reward/mean": 2.0}), step=1, split="train")
        assert (sink.logged, sink.pending) == (2, 0)
        sink.close()
        (file,) = _finished_files(sink.config.dir, run_id)
        assert [r["training_step"] for r in read_offline_history(file)] == [0, 1]

    def test_run_reattached_after_repeated_failures(
        self, make_sink: Callable[..., WandbSink], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After RESET_AFTER_FAILURES failures the run is re-attached with the same id."""
        assert RESET_AFTER_FAILURES == 3
        sink = make_sink()
        run_id = sink.start()

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("wandb service gone")

        monkeypatch.setattr(sink._run, "log", broken)
        sink.log(_row(0), step=0, split="train")
        sink.log(_row(1), step=1, split="train")
        assert sink.ready  # two failures: not yet
        sink.log(_row(2), step=2, split="train")
        assert not sink.ready
        sink.log(_row(3), step=3, split="train")  # starts the background re-attach
        assert sink.wait_until_ready(30)
        assert (sink.logged, sink.pending, sink.failures) == (4, 0, 3)
        sink.close()
        files = _finished_files(sink.config.dir, run_id)
        assert [r["training_step"] for r in read_offline_history(files[-1])] == [0, 1, 2, 3]

    def test_failed_init_retried_with_backoff(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A failed init returns the id, queues rows and retries only after the backoff."""
        now = [100.0]
        calls = [0]
        real_init = wandb.init

        def flaky_init(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise ConnectionError("api.wandb.ai unreachable")
            time.sleep(3.0)  # a slow retry: a log that waited for it would take this long
            return real_init(*args, **kwargs)

        monkeypatch.setattr(wandb, "init", flaky_init)
        cfg = WandbSinkConfig(project="p", dir=str(tmp_path), run_id="fixedid1")
        sink = WandbSink(cfg, clock=lambda: now[0])
        try:
            assert sink.start() == "fixedid1"
            assert (sink.ready, sink.failures) == (False, 1)
            now[0] += INIT_RETRY_BACKOFF_S * 0.9
            sink.log(_row(0, **{"reward/mean": 1.0}), step=0, split="train")
            assert calls[0] == 1  # still inside the backoff: no attempt
            now[0] += INIT_RETRY_BACKOFF_S * 0.1
            started = time.monotonic()
            sink.log(_row(1, **{"reward/mean": 2.0}), step=1, split="train")
            assert time.monotonic() - started < 1.5  # init runs in the background
            assert sink.wait_until_ready(30)
            assert calls[0] == 2
            assert (sink.logged, sink.pending) == (2, 0)
        finally:
            sink.close()
        (file,) = _finished_files(tmp_path, "fixedid1")
        assert [r["training_step"] for r in read_offline_history(file)] == [0, 1]

    def test_failed_define_metric_closes_attach_and_retries(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If define_metric fails right after init, that attach is finished and retried."""
        now = [0.0]
        real_define = wandb.Run.define_metric
        calls = [0]

        def flaky_define(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("define_metric failed")
            return real_define(self, *args, **kwargs)

        monkeypatch.setattr(wandb.Run, "define_metric", flaky_define)
        cfg = WandbSinkConfig(project="p", dir=str(tmp_path), run_id="defid001")
        sink = WandbSink(cfg, clock=lambda: now[0])
        try:
            sink.start()
            assert (sink.ready, sink.failures) == (False, 1)
            now[0] += INIT_RETRY_BACKOFF_S
            sink.log(_row(0, **{"reward/mean": 1.0}), step=0, split="train")
            assert sink.wait_until_ready(30)
            assert (sink.logged, sink.pending) == (1, 0)
        finally:
            sink.close()
        first, second = _finished_files(tmp_path, "defid001")
        assert read_offline_history(first) == []
        assert [r["training_step"] for r in read_offline_history(second)] == [0]

    def test_close_survives_broken_pipe(
        self, make_sink: Callable[..., WandbSink], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A finish that raises BrokenPipeError is counted and close returns."""
        sink = make_sink()
        sink.start()
        run = sink._run
        real_finish = run.finish

        def broken(*args: Any, **kwargs: Any) -> None:
            raise BrokenPipeError("finish")

        monkeypatch.setattr(run, "finish", broken)
        sink.close()
        assert sink.failures == 1
        assert "finish" in (sink.last_error or "")
        real_finish()

    def test_close_bounded_when_finish_hangs(
        self, make_sink: Callable[..., WandbSink], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A finish that hangs is abandoned after finish_timeout_s."""
        sink = make_sink(finish_timeout_s=0.2)
        sink.start()
        run = sink._run
        real_finish = run.finish
        release = threading.Event()

        def hanging(*args: Any, **kwargs: Any) -> None:
            release.wait(10)
            real_finish()

        monkeypatch.setattr(run, "finish", hanging)
        started = time.monotonic()
        sink.close()
        assert time.monotonic() - started < 5.0  # the 0.2 s bound, not the 10 s hang
        assert "TimeoutError" in (sink.last_error or "")
        release.set()

    def test_log_after_close_is_dropped(self, make_sink: Callable[..., WandbSink]) -> None:
        """Rows logged after close are dropped without raising or re-opening the run."""
        sink = make_sink()
        sink.start()
        sink.close()
        sink.log(_row(0), step=0, split="train")
        assert (sink.ready, sink.logged, sink.failures) == (False, 0, 0)

    def test_pending_queue_is_bounded(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """While W&B is down, at most max_pending_rows wait; older rows are counted dropped."""

        def down(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("down")

        monkeypatch.setattr(wandb, "init", down)
        cfg = WandbSinkConfig(project="p", dir=str(tmp_path), max_pending_rows=2)
        sink = WandbSink(cfg, clock=lambda: 0.0)
        sink.start()
        for step in range(5):
            sink.log(_row(step), step=step, split="train")
        assert (sink.pending, sink.dropped) == (2, 3)
        assert sink.stats()["telemetry/wandb/dropped"] == 3.0
        sink.close()


def _frame(payload: bytes, rtype: int = 1) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes([rtype])))
    return struct.pack("<IHB", crc, len(payload), rtype) + payload


def _new_record() -> Any:
    pb: Any = importlib.import_module("wandb.proto.wandb_internal_pb2")
    return pb.Record()


def _history_payload(**items: float) -> bytes:
    record = _new_record()
    for key, value in items.items():
        item = record.history.item.add()
        item.nested_key.append(key)
        item.value_json = repr(value)
    data: bytes = record.SerializeToString()
    return data


def _padding_payload(n: int) -> bytes:
    record = _new_record()
    item = record.history.item.add()
    item.key = "pad"
    item.value_json = '"' + "x" * n + '"'
    data: bytes = record.SerializeToString()
    return data


class TestReader:
    def test_header_bytes(self) -> None:
        """The file header is ':W&B', magic 0xBEE1 little-endian, version 0."""
        assert FILE_HEADER == b":W&B\xe1\xbe\x00"

    def test_reads_synthetic_file(self, tmp_path: Path) -> None:
        """A hand-built file with one FULL history record reads back."""
        path = tmp_path / "run-x.wandb"
        path.write_bytes(FILE_HEADER + _frame(_history_payload(**{"reward/a": 1.5})))
        assert read_offline_history(path) == [{"reward/a": 1.5}]
        assert read_offline_history(tmp_path) == [{"reward/a": 1.5}]  # the run directory

    def test_block_trailer_padding_skipped(self, tmp_path: Path) -> None:
        """Fewer than 7 bytes left in a block are padding; the next record starts a block."""
        first = _frame(_history_payload(**{"reward/a": 1.0}))
        # a filler record sized so that 3 bytes remain in block 0 after `first`
        target = BLOCK_SIZE - len(FILE_HEADER) - len(first) - 3 - 7
        filler = next(
            p for n in range(target - 20, target) if len(p := _padding_payload(n)) == target
        )
        body = FILE_HEADER + _frame(filler) + first
        assert BLOCK_SIZE - len(body) == 3
        body += b"\x00" * 3 + _frame(_history_payload(**{"reward/a": 2.0}))
        path = tmp_path / "run-x.wandb"
        path.write_bytes(body)
        rows = [r for r in read_offline_history(path) if "reward/a" in r]
        assert [r["reward/a"] for r in rows] == [1.0, 2.0]

    def test_bad_header_rejected(self, tmp_path: Path) -> None:
        """A file without the W&B header raises WireFormatError."""
        path = tmp_path / "run-x.wandb"
        path.write_bytes(b"LEVELDB" + _frame(b""))
        with pytest.raises(WireFormatError, match="header"):
            read_offline_history(path)

    def test_crc_mismatch_rejected(self, tmp_path: Path) -> None:
        """A corrupted payload byte raises WireFormatError naming the CRC."""
        frame = bytearray(_frame(_history_payload(**{"reward/a": 1.0})))
        frame[-1] ^= 0xFF
        path = tmp_path / "run-x.wandb"
        path.write_bytes(FILE_HEADER + bytes(frame))
        with pytest.raises(WireFormatError, match="CRC"):
            read_offline_history(path)

    def test_truncated_tail_tolerated(self, tmp_path: Path) -> None:
        """A record cut off at EOF (a killed writer) ends the read after the good records."""
        good = _frame(_history_payload(**{"reward/a": 1.0}))
        cut = _frame(_history_payload(**{"reward/a": 2.0}))[:-3]
        path = tmp_path / "run-x.wandb"
        path.write_bytes(FILE_HEADER + good + cut)
        assert read_offline_history(path) == [{"reward/a": 1.0}]

    def test_orphan_fragment_rejected(self, tmp_path: Path) -> None:
        """A MIDDLE record without a FIRST raises WireFormatError."""
        path = tmp_path / "run-x.wandb"
        path.write_bytes(FILE_HEADER + _frame(b"abc", rtype=3))
        with pytest.raises(WireFormatError, match="FIRST"):
            list(iter_records(path))

    def test_wait_for_exit_record_times_out(self, tmp_path: Path) -> None:
        """A run file without an exit record (still open, or killed) is reported unfinished."""
        path = tmp_path / "run-x.wandb"
        path.write_bytes(FILE_HEADER + _frame(_history_payload(**{"reward/a": 1.0})))
        assert not wait_for_exit_record(path, timeout_s=0.05)
        assert not wait_for_exit_record(tmp_path / "missing.wandb", timeout_s=0.0)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A directory without a run file raises FileNotFoundError."""
        with pytest.raises(FileNotFoundError):
            read_offline_history(tmp_path)

    def test_find_orders_by_time_then_collision_suffix(self, tmp_path: Path) -> None:
        """Run dirs sort by timestamp, then W&B's -N suffix; latest-run links are skipped."""
        names = [
            "offline-run-20250102_000000-abc",
            "offline-run-20250101_000000-abc-1",
            "offline-run-20250101_000000-abc",
            "offline-run-20250101_000000-other",
        ]
        for name in names:
            (tmp_path / "wandb" / name).mkdir(parents=True)
        for name in names[:3]:
            (tmp_path / "wandb" / name / "run-abc.wandb").write_bytes(FILE_HEADER)
        (tmp_path / "wandb" / names[3] / "run-other.wandb").write_bytes(FILE_HEADER)
        (tmp_path / "wandb" / "latest-run").symlink_to(tmp_path / "wandb" / names[0])
        found = find_offline_run_files(tmp_path, "abc")
        assert [p.parent.name for p in found] == [names[2], names[1], names[0]]
        assert len(find_offline_run_files(tmp_path / "wandb")) == 4
