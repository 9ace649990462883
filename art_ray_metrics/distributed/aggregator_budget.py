"""The run budget's side in the aggregator: the ledger's decisions, logged before they are answered.

The ledger (:class:`~art_ray_metrics.core.budget.BudgetLedger`, in the state) decides grants,
give-backs and limits; this class makes them durable around it: a grant is in the write-ahead log
before its answer (a restart never grants it twice), a give-back is logged as a numbered grant of
a negative amount but not awaited (a lost one only keeps the bound conservative), and a limit
changed while the run runs is committed before it is answered. Used by the actor's ``budget_*``
remote methods (:mod:`art_ray_metrics.distributed.actor`); the worker's side is :mod:`.budget`.
No Ray here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.durable.commit import Committer
from art_ray_metrics.durable.wal_writer import WalWriter

__all__ = ["AggregatorBudget"]

log = logging.getLogger(__name__)


class AggregatorBudget:
    """The actor's budget calls over the ledger.

    Args:
        state: The aggregator's state; its ``budget`` ledger decides.
        wal: Logs grants and give-backs.
        committer: Commits a limit changed while the run runs.
        start: Starts the actor's background loops (the WAL writer's) before a grant is logged.
    """

    def __init__(
        self,
        state: AggregatorState,
        wal: WalWriter,
        committer: Committer,
        *,
        start: Callable[[], None],
    ) -> None:
        self.state = state
        self.wal = wal
        self.committer = committer
        self.start = start

    async def grant(
        self, producer: str, incarnation: str, want: str, need: str, held: str
    ) -> list[Any]:
        """Grant budget to a producer incarnation: ``[amount, exhausted, limit, spent,
        committed]`` (amounts as decimal strings, ``limit`` None without one)."""
        grant = self.state.budget.grant(
            producer,
            incarnation,
            want=Decimal(want),
            need=Decimal(need),
            held=Decimal(held),
            now=time.monotonic(),
        )
        if grant.seq:  # logged before the answer: a restart never grants it twice
            self.start()
            self.wal.log_grant((producer, incarnation, str(grant.amount), grant.seq))
            if not await self.wal.await_grant(grant.seq):
                log.warning(
                    "art_ray_metrics: budget grant %s to %s is not in the write-ahead log yet "
                    "(storage failing); answered anyway, the next checkpoint holds it",
                    grant.seq,
                    producer,
                )
        limit = None if grant.limit is None else str(grant.limit)
        return [str(grant.amount), grant.exhausted, limit, str(grant.spent), str(grant.committed)]

    def give_back(self, producer: str, incarnation: str, amount: str) -> None:
        """A producer incarnation gives unused budget back (idle, or closing)."""
        returned, seq = self.state.budget.give_back(
            producer, incarnation, Decimal(amount), now=time.monotonic()
        )
        if seq:  # logged (not awaited: a lost give-back only keeps the bound conservative)
            self.start()
            self.wal.log_grant((producer, incarnation, str(-returned), seq))

    async def set_limit(
        self, budget_usd: float | str | None, budget_soft: float | str | None
    ) -> dict[str, Any]:
        """Change the run's limits (kept over restarts: committed before the answer); the
        budget's :meth:`figures` after."""
        self.state.budget.set_limit(
            None if budget_usd is None else Decimal(str(budget_usd)),
            None if budget_soft is None else Decimal(str(budget_soft)),
            live=True,
        )
        await self.committer.persist()
        return self.figures()

    def figures(self) -> dict[str, Any]:
        """The run budget's figures (:meth:`AggregatorHandle.budget`)."""
        budget = self.state.budget
        return {
            "limit": None if budget.limit is None else float(budget.limit),
            "soft": float(budget.soft),
            "spent": float(budget.spent),
            "committed": float(budget.committed()),
            "unreconciled": float(budget.unreconciled()),
            "leases": len(budget.accounts),
        }
