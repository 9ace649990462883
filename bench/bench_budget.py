"""The run budget: measured overshoot under concurrency, and the per-call admission cost.

Two measurements, in one process and one run (no Ray: the aggregator's ledger answers in
process through :class:`~art_ray_metrics.spend.admission.LocalBudget`, so the figures are the
protocol's, not the network's):

1. **Overshoot.** ``--threads`` threads in each of ``--producers`` producers (each its own
   lease, as worker processes are) make paid calls through ``@track_api_cost`` until the
   budget refuses them. Each call costs a random share of its estimate (``--real-share``;
   1.0 is the worst case) and its batch is shipped after it. The script prints what was paid
   past the limit (the README's bound says 0 for calls whose estimate is an upper bound), the
   calls refused, and how much of the budget was used.
2. **Admission cost.** The same decorated call, timed with no budget (the baseline: the
   decorator as it was) and with a budget (reserve from the lease, settle to the cost), in the
   same run: short blocks of calls alternate between the two, and the admission cost is the
   median of the paired differences per call (target: under 5 µs, no round trip). The estimate is computed from a request with ``messages`` and
   ``max_tokens``, as a judge would send.

Usage: ``python bench/bench_budget.py [--producers 4 --threads 8 --budget 5.0 --calls 200
--rounds 300]``; ``--quick`` is a smoke run with small sizes (2 producers x 2 threads, a $0.50
budget, 20 pairs of blocks of 100 calls): it checks the script works, its figures are not the ones to report.
Do not run it while others use the machine for tests (the lead runs it).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from decimal import Decimal
from typing import Any

# the judge's model is one no bundled table knows, so its first call asks LiteLLM (when it is
# installed), whose import would otherwise try to download its price map
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from art_ray_metrics.core.active import reset_active_builder, set_active_builder
from art_ray_metrics.core.budget import BudgetLedger
from art_ray_metrics.errors import BudgetExceededError
from art_ray_metrics.spend.admission import Admission, LocalBudget
from art_ray_metrics.spend.pricing import PricingRegistry
from art_ray_metrics.spend.track import ApiCostMixin, track_api_cost

PRICE = 3  # dollars per million tokens, prompt and completion
MESSAGES = [
    {"role": "system", "content": "You are a strict judge. Answer with a score from 0 to 10."},
    {"role": "user", "content": "Question: what is 2 + 2?\nAnswer: 4\nScore it." * 4},
]
MAX_TOKENS = 256


class _Builder(ApiCostMixin):
    """A builder that records into a shared total (and ships after each call)."""

    cost_context = "train"

    def __init__(self, budget: LocalBudget | None) -> None:
        self.budget = budget
        self.registry = PricingRegistry()
        self.lock = threading.Lock()
        self.recorded = Decimal(0)

    def _pricing(self) -> PricingRegistry:
        return self.registry

    def _admission(self) -> Admission | None:
        return None if self.budget is None else self.budget.admission

    def _add_cost_leaf(self, path: str, usd: Decimal, *, response_id: str | None) -> None:
        with self.lock:
            self.recorded += usd

    def _add_unpriced_call(self, path: str) -> None:
        raise AssertionError("every call is priced here")


def _response(share: float) -> dict[str, Any]:
    completion = int(MAX_TOKENS * share)
    return {"usage": {"prompt_tokens": 64, "completion_tokens": completion}}


@track_api_cost(
    source="judge",
    provider="openai",
    model_name="bench",
    prompt_price_per_million=PRICE,
    completion_price_per_million=PRICE,
)
def judge(*, messages: list[dict[str, str]], max_tokens: int, share: float) -> dict[str, Any]:
    return _response(share)


def overshoot(producers: int, threads: int, budget_usd: Decimal, real_share: float) -> None:
    ledger = BudgetLedger(limit=budget_usd)
    lock = threading.Lock()
    counts = threading.Lock()
    refused = 0
    calls = 0

    def producer(index: int) -> None:
        budget = LocalBudget(ledger, producer=f"p{index}", lock=lock)
        builder = _Builder(budget)
        rng = random.Random(index)

        def rollouts() -> None:
            nonlocal refused, calls
            token = set_active_builder(builder)
            try:
                while True:
                    share = real_share if real_share >= 1 else rng.uniform(real_share, 1.0)
                    try:
                        judge(messages=MESSAGES, max_tokens=MAX_TOKENS, share=share)
                    except BudgetExceededError:
                        with counts:
                            refused += 1
                        return
                    with builder.lock:
                        shipped, builder.recorded = builder.recorded, Decimal(0)
                    with counts:
                        calls += 1
                    budget.ship(shipped)
            finally:
                reset_active_builder(token)

        workers = [threading.Thread(target=rollouts) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()

    started = time.perf_counter()
    runs = [threading.Thread(target=producer, args=(i,)) for i in range(producers)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    spent = ledger.spent
    print(
        f"overshoot: {producers} producers x {threads} threads, budget ${budget_usd}, "
        f"real cost {real_share:g}..1 of the estimate"
    )
    print(f"  calls made {calls}, refused {refused}, in {time.perf_counter() - started:.2f} s")
    print(f"  paid ${spent:.6f} = {spent / budget_usd:.2%} of the budget")
    print(f"  overshoot ${max(spent - budget_usd, Decimal(0)):.6f} (the stated bound: $0)")


def admission_cost(calls: int, rounds: int) -> None:
    """Blocks of ``calls`` decorated calls alternate between the two builders (the order
    flips every round), so both sides see the same machine; the admission cost is the median
    of the ``rounds`` paired differences (a slow moment lands on both sides of a pair)."""
    unlimited = LocalBudget(BudgetLedger(limit=None), lease_calls=1_000_000)
    with_budget = _Builder(unlimited)
    baseline = _Builder(None)

    def block(builder: _Builder) -> float:
        token = set_active_builder(builder)
        try:
            started = time.perf_counter()
            for _ in range(calls):
                judge(messages=MESSAGES, max_tokens=MAX_TOKENS, share=0.5)
            return (time.perf_counter() - started) / calls * 1e6
        finally:
            reset_active_builder(token)

    pairs: list[tuple[float, float]] = []
    for index in range(rounds):
        if index % 2:
            base = block(baseline)
            pairs.append((base, block(with_budget)))
        else:
            budget = block(with_budget)
            pairs.append((block(baseline), budget))
        unlimited.ship(with_budget.recorded)
        with_budget.recorded = Decimal(0)
    diffs = [budget - base for base, budget in pairs]
    low, _, high = statistics.quantiles(diffs, n=4)
    print(f"admission: {rounds} pairs of blocks of {calls} calls, interleaved")
    print(
        f"  decorated call without a budget {statistics.median(b for b, _ in pairs):.2f} us, "
        f"with a budget {statistics.median(g for _, g in pairs):.2f} us"
    )
    print(
        f"  admission (estimate + reserve + settle) {statistics.median(diffs):.2f} us per call "
        f"(median of the pairs; quartiles {low:.2f}..{high:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--budget", type=Decimal, default=Decimal("5.0"))
    parser.add_argument("--real-share", type=float, default=0.3)
    parser.add_argument("--calls", type=int, default=200, help="calls per timed block")
    parser.add_argument("--rounds", type=int, default=300, help="pairs of blocks")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run with small sizes (figures not reported)"
    )
    args = parser.parse_args()
    if args.quick:
        args.producers, args.threads, args.budget = 2, 2, Decimal("0.5")
        args.calls, args.rounds = 100, 20
    for share in (args.real_share, 1.0):
        overshoot(args.producers, args.threads, args.budget, share)
    admission_cost(args.calls, args.rounds)


if __name__ == "__main__":
    main()
