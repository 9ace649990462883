"""The one producer-window map (core/ingest.ProducerWindows): each producer incarnation's applied
and durable windows, kept apart, retired together."""

from __future__ import annotations

from art_ray_metrics.core.ingest import MAX_RETIRED, ProducerWindows, Window
from art_ray_metrics.core.records import LeafBatch
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.testing import make_group

KEY = ("p", "inc")


def _batch(seq: int, acked: int = 0, version: int = 3) -> LeafBatch:
    group = make_group(0, "train", {"costs/train/judge": 1.0})
    return LeafBatch("p", seq, (group,), "inc", acked, version=version)


def _applied(seq: int) -> ProducerWindows:
    """A map where batch ``seq`` of ``KEY`` was applied (and nothing is durable yet)."""
    windows = ProducerWindows()
    window = windows.for_batch(_batch(seq))
    assert window is not None
    window.mark(seq)
    return windows


class TestWindow:
    def test_gaps_settle_into_the_watermark(self) -> None:
        w = Window()
        for seq in (1, 3, 4):
            w.mark(seq)
        assert (w.watermark, w.above) == (1, {3, 4})
        w.mark(2)
        assert (w.watermark, w.above) == (4, None)

    def test_advance_counts_what_was_never_seen(self) -> None:
        w = Window(2, [4])
        assert w.advance(5) == 2  # 3 and 5 were given up, 4 was seen
        assert (w.watermark, w.above) == (5, None)
        assert w.advance(5) == 0

    def test_copy_is_independent(self) -> None:
        w = Window(1, [3])
        c = w.copy()
        c.mark(2)
        assert (w.watermark, w.above) == (1, {3})
        assert (c.watermark, c.above) == (3, None)


class TestProducerWindows:
    def test_applied_is_not_durable_until_the_shell_says_so(self) -> None:
        windows = _applied(1)
        assert not windows.durable_seen(KEY, 1)
        assert windows.durable_upto(KEY) == 0
        windows.logged(KEY, 1, 0)
        windows.made_durable([(KEY, 1)])
        assert windows.durable_seen(KEY, 1)
        assert windows.durable_upto(KEY) == 1

    def test_a_logged_header_moves_the_durable_watermark_once_durable(self) -> None:
        windows = ProducerWindows()
        windows.for_batch(_batch(1))
        windows.logged(KEY, 7, 5)  # batch 7 says the producer settled everything up to 5
        assert windows.durable_upto(KEY) == 0
        windows.made_durable([(KEY, 7)])
        assert windows.durable_upto(KEY) == 5
        assert windows.durable_seen(KEY, 7)
        assert windows[KEY].durable.above == {7}

    def test_durable_gaps_refuse_a_confirm(self) -> None:
        windows = ProducerWindows()
        windows.for_batch(_batch(1))
        windows.made_durable([(KEY, 2)])
        assert not windows.durable_confirmable(KEY, 2)  # seq 1 is not durable yet
        windows.made_durable([(KEY, 1)])
        assert windows.durable_confirmable(KEY, 2)
        assert not windows.durable_confirmable(KEY, 1)  # 2 is durable above acked_upto 1
        assert windows.durable_confirmable(("unknown", ""), 0)

    def test_confirm_retires_the_whole_entry(self) -> None:
        windows = _applied(1)
        windows.made_durable([(KEY, 1)])
        assert windows.confirm(KEY, 1)
        assert KEY not in windows
        assert len(windows) == 0
        assert windows.retired == {KEY: 1}
        # a copy of a settled batch: no window, and durable long ago
        assert windows.for_batch(_batch(1)) is None
        assert windows.durable_seen(KEY, 1)
        assert windows.durable_upto(KEY) == 1
        # the producer is back with a new batch: its window restarts at the floor
        back = windows.for_batch(_batch(2, acked=1))
        assert back is not None
        assert back.watermark == 1
        assert KEY not in windows.retired

    def test_confirm_keeps_a_window_with_applied_gaps(self) -> None:
        windows = _applied(2)
        assert not windows.confirm(KEY, 2)
        assert KEY in windows

    def test_retired_watermarks_are_bounded(self) -> None:
        windows = ProducerWindows()
        for i in range(MAX_RETIRED + 1):
            key = (f"p{i}", "")
            windows.restore(key, 1, ())
            assert windows.confirm(key, 1)
        assert len(windows.retired) == MAX_RETIRED
        assert ("p0", "") not in windows.retired

    def test_a_restored_state_is_durable_as_far_as_it_applied(self) -> None:
        state = AggregatorState()
        for seq in (1, 2, 4):
            state.ingest(_batch(seq))
        restored = AggregatorState.restore(state.snapshot())
        entry = restored.producers[KEY]
        assert (entry.applied.watermark, entry.applied.above) == (2, {4})
        assert restored.producers.durable_seen(KEY, 4)
        assert not restored.producers.durable_seen(KEY, 3)

    def test_assume_durable_copies_the_applied_windows(self) -> None:
        state = AggregatorState()
        state.ingest(_batch(1))
        state.ingest(_batch(3))
        assert not state.producers.durable_seen(KEY, 1)
        state.producers.assume_durable()
        assert state.producers.durable_seen(KEY, 3)
        state.producers[KEY].applied.mark(2)
        assert not state.producers.durable_seen(KEY, 2)  # a copy, not the same window
