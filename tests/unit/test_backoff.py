"""The one back-off policy type and the named policies every retry loop uses."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from art_ray_metrics.core import backoff as B
from art_ray_metrics.core.backoff import BackoffPolicy


class TestPolicy:
    def test_doubles_to_the_cap(self) -> None:
        assert [B.LOOP_RESTART.delay(n) for n in range(1, 9)] == [
            0.1,
            0.2,
            0.4,
            0.8,
            1.6,
            3.2,
            5.0,
            5.0,
        ]

    def test_same_waits_as_the_hand_written_loops(self) -> None:
        """Each named policy waits what its loop waited before it was written once."""

        def doubling(first: float, cap: float, n: int) -> list[float]:
            out, wait = [], first
            for _ in range(n):
                out.append(wait)
                wait = min(wait * 2, cap)
            return out

        for policy, first, cap in (
            (B.WATCH, 0.05, 2.0),
            (B.LOOP_RESTART, 0.1, 5.0),
            (B.WORKER_ENV, 1.0, 30.0),
            (B.WORKER_ENV_FETCH, 0.1, 2.0),
            (B.WANDB_INIT, 1.0, 60.0),
            (B.STORAGE_REQUEST, 0.1, 1.0),
            (B.STORAGE_READY, 0.5, float("inf")),
        ):
            assert [policy.delay(n) for n in range(1, 12)] == doubling(first, cap, 11), policy

    def test_jitter_comes_from_the_injected_generator(self) -> None:
        state = random.getstate()
        waits = [B.RESEND.delay(n, random.Random(7)) for n in (1, 2, 10)]
        assert random.getstate() == state  # the global generator is never drawn from
        assert waits == [B.RESEND.delay(n, random.Random(7)) for n in (1, 2, 10)]
        assert 0.05 <= waits[0] <= 0.15
        assert 2.5 <= waits[2] <= 7.5

    def test_jitter_needs_a_generator(self) -> None:
        with pytest.raises(ValueError, match=r"random\.Random"):
            B.LOOKUP.delay(1)

    def test_a_long_outage_stays_at_the_cap(self) -> None:
        assert BackoffPolicy(0.1, factor=10.0, cap=5.0).delay(10_000) == 5.0
        assert B.STORAGE_READY.delay(5_000) == float("inf")

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"initial": -1.0},
            {"initial": 1.0, "factor": 0.5},
            {"initial": 1.0, "cap": -1.0},
            {"initial": 1.0, "jitter": (1.5, 0.5)},
        ],
    )
    def test_bad_policy(self, kwargs: dict[str, float]) -> None:
        with pytest.raises(ValueError):
            BackoffPolicy(**kwargs)  # type: ignore[arg-type]

    def test_failures_start_at_one(self) -> None:
        with pytest.raises(ValueError, match="failures >= 1"):
            B.WATCH.delay(0)

    @given(
        st.floats(0.001, 10.0),
        st.floats(1.0, 4.0),
        st.floats(0.001, 100.0),
        st.integers(1, 200),
    )
    def test_never_shrinks_and_never_passes_the_cap(
        self, initial: float, factor: float, cap: float, n: int
    ) -> None:
        policy = BackoffPolicy(initial, factor=factor, cap=cap)
        assert policy.delay(n) <= policy.delay(n + 1) <= max(cap, 0.0)


class TestBackoff:
    def test_counts_and_resets(self) -> None:
        b = B.WATCH.start()
        assert [b.next_delay() for _ in range(3)] == [0.05, 0.1, 0.2]
        assert b.failures == 3
        b.reset()
        assert b.next_delay() == 0.05

    def test_within_a_deadline(self) -> None:
        b = B.WORKER_ENV_FETCH.start()
        assert b.next_delay_within(deadline=10.0, now=9.0) == 0.1
        assert b.next_delay_within(deadline=10.0, now=9.0) == 0.2
        assert b.next_delay_within(deadline=10.0, now=9.7) is None  # 0.4 s would pass it

    def test_jittered_loop_draws_from_its_generator(self) -> None:
        one, two = B.LOOKUP.start(random.Random(3)), B.LOOKUP.start(random.Random(3))
        assert [one.next_delay() for _ in range(5)] == [two.next_delay() for _ in range(5)]
