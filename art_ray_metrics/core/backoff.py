"""Retry back-off, written once: one policy type, the named policies of every retry loop.

A :class:`BackoffPolicy` is pure: the wait after the ``n``-th consecutive failure is
``min(initial * factor ** (n - 1), cap)``, times a factor drawn uniformly from ``jitter`` when
the policy has one. Jitter comes from a ``random.Random`` the caller injects (the client's is
``distributed.transport.JITTER``, a generator of its own), never from the process's global
``random`` state. A :class:`Backoff` is one loop's state: its failure count, reset on success.

Each loop keeps the constants it was tuned with; they are named here so they are read in one
place:

| policy | the loop | waits |
|---|---|---|
| RESEND | the worker client resending after a failed send | 0.1 s doubling to 5 s, ×0.5–1.5 |
| LOOKUP | a transport looking the aggregator up after a miss | 0.05 s doubling to 2 s, ×0.75–1.25 |
| WATCH | the driver's credentials watcher after a failed call | 0.05 s doubling to 2 s |
| STORAGE_READY | the aggregator claiming its storage at start | 0.5 s doubling (attempts bounded) |
| LOOP_RESTART | the aggregator restarting a loop that raised | 0.1 s doubling to 5 s |
| WORKER_ENV | a worker asking for the workers' variables again | 1 s doubling to 30 s |
| WORKER_ENV_FETCH | that request while the aggregator restarts | 0.1 s doubling to 2 s, deadline |
| WANDB_INIT | the W&B sink re-initialising its run | 1 s doubling to 60 s |
| STORAGE_REQUEST | obstore retrying one S3/GCS request | 0.1 s doubling to 1 s |
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

__all__ = [
    "LOOKUP",
    "LOOP_RESTART",
    "RESEND",
    "STORAGE_READY",
    "STORAGE_REQUEST",
    "WANDB_INIT",
    "WATCH",
    "WORKER_ENV",
    "WORKER_ENV_FETCH",
    "Backoff",
    "BackoffPolicy",
]


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """How long to wait after consecutive failures.

    Attributes:
        initial: The wait after the first failure, in seconds (>= 0).
        factor: Each further failure multiplies the wait by this (>= 1).
        cap: The longest wait before jitter (below ``initial``, every wait is ``cap``).
        jitter: ``(low, high)``: the wait is multiplied by a uniform draw from it; None: none.

    >>> [BackoffPolicy(0.5, cap=3.0).delay(n) for n in (1, 2, 3, 4, 5)]
    [0.5, 1.0, 2.0, 3.0, 3.0]
    """

    initial: float
    factor: float = 2.0
    cap: float = math.inf
    jitter: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not (self.initial >= 0 and self.factor >= 1 and self.cap >= 0):
            raise ValueError(f"Expected initial >= 0, factor >= 1 and cap >= 0 but got {self!r}")
        if self.jitter is not None and not 0 <= self.jitter[0] <= self.jitter[1]:
            raise ValueError(f"Expected jitter as (low, high) with 0 <= low <= high: {self!r}")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """The wait after the ``failures``-th consecutive failure (1 for the first).

        Args:
            failures: Consecutive failures so far, >= 1.
            rng: The generator jitter is drawn from; required when the policy has jitter.

        Raises:
            ValueError: ``failures < 1``, or jitter without ``rng``.
        """
        if failures < 1:
            raise ValueError(f"Expected failures >= 1 but got {failures!r}")
        try:
            base = min(self.initial * self.factor ** (failures - 1), self.cap)
        except OverflowError:  # a very long outage: the cap long since reached
            base = self.cap
        if self.jitter is None:
            return base
        if rng is None:
            raise ValueError("Expected a random.Random to draw this policy's jitter from")
        return base * rng.uniform(*self.jitter)

    def start(self, rng: random.Random | None = None) -> Backoff:
        """A fresh :class:`Backoff` of this policy (no failure yet)."""
        return Backoff(self, rng)


class Backoff:
    """One retry loop's state: consecutive failures under a policy.

    Args:
        policy: The policy.
        rng: Where jitter is drawn from (policies with jitter only).

    >>> b = BackoffPolicy(0.1, cap=0.3).start()
    >>> b.next_delay(), b.next_delay(), b.next_delay()
    (0.1, 0.2, 0.3)
    >>> b.reset(); b.next_delay()
    0.1
    """

    __slots__ = ("failures", "policy", "rng")

    def __init__(self, policy: BackoffPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng
        self.failures = 0

    def next_delay(self) -> float:
        """Count a failure and return the wait before the next attempt."""
        self.failures += 1
        return self.policy.delay(self.failures, self.rng)

    def next_delay_within(self, deadline: float, now: float | None = None) -> float | None:
        """Like :meth:`next_delay`, but None when the wait would not end before ``deadline``.

        Args:
            deadline: A ``time.monotonic()`` instant.
            now: The current ``time.monotonic()`` (read when omitted).

        >>> BackoffPolicy(1.0).start().next_delay_within(deadline=10.5, now=10.0) is None
        True
        """
        wait = self.next_delay()
        current = time.monotonic() if now is None else now
        return None if deadline - current <= wait else wait

    def reset(self) -> None:
        """A success: the next failure waits the initial delay again."""
        self.failures = 0


RESEND = BackoffPolicy(0.1, cap=5.0, jitter=(0.5, 1.5))
"""The worker client resending retained batches after a failed send."""
LOOKUP = BackoffPolicy(0.05, cap=2.0, jitter=(0.75, 1.25))
"""A transport looking the aggregator up again after a miss."""
WATCH = BackoffPolicy(0.05, cap=2.0)
"""The driver's credentials watcher calling the aggregator again after a failed call."""
STORAGE_READY = BackoffPolicy(0.5)
"""The aggregator claiming its storage at start (the number of attempts bounds it)."""
LOOP_RESTART = BackoffPolicy(0.1, cap=5.0)
"""The aggregator restarting its write-ahead-log or checkpoint loop after it raised."""
WORKER_ENV = BackoffPolicy(1.0, cap=30.0)
"""A worker's next ``connect`` asking for the workers' variables after a failed fetch."""
WORKER_ENV_FETCH = BackoffPolicy(0.1, cap=2.0)
"""One fetch of the workers' variables asking a restarting aggregator again, within a deadline."""
WANDB_INIT = BackoffPolicy(1.0, cap=60.0)
"""The W&B sink's run init after a failure."""
STORAGE_REQUEST = BackoffPolicy(0.1, cap=1.0)
"""obstore's own retries of one S3/GCS request."""
