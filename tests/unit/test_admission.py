"""Admission of paid calls: a local lease, refusals before the call, estimates, the decorator."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from art_ray_metrics.core.active import reset_active_builder, set_active_builder
from art_ray_metrics.core.budget import BudgetLedger
from art_ray_metrics.errors import AggregatorUnavailableError, BudgetExceededError, PricingError
from art_ray_metrics.spend.admission import Admission, LocalBudget
from art_ray_metrics.spend.base import TokenPricing
from art_ray_metrics.spend.estimate import (
    CALL_OVERHEAD_TOKENS,
    DEFAULT_MAX_TOKENS,
    MEDIA_PART_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    _measure,
    estimate_cost,
    request_bound,
    token_bounds,
)
from art_ray_metrics.spend.pricing import PricingRegistry
from art_ray_metrics.spend.track import ApiCostMixin, track_api_cost
from tests.hypothesis_profiles import examples

D = Decimal


def test_concurrent_calls_never_reserve_past_the_limit() -> None:
    budget = LocalBudget(BudgetLedger(limit=D("1.00")), lease_calls=4)
    estimate = D("0.03")
    admitted: list[Decimal] = []
    refused: list[BudgetExceededError] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(20):
            try:
                reservation = budget.admission.reserve(estimate)
            except BudgetExceededError as exc:
                with lock:
                    refused.append(exc)
                continue
            reservation.settle(estimate)  # the worst case: every call costs its estimate
            with lock:
                admitted.append(estimate)
            budget.ship(estimate)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted, D(0)) <= D("1.00")
    assert len(admitted) == 33  # floor(1.00 / 0.03): nothing that fits is refused
    assert refused
    assert all(e.budget == D("1.00") and e.estimate == estimate for e in refused)
    assert budget.ledger.spent == D("0.99")
    assert budget.ledger.committed() == D("1.00")


def test_refusal_names_the_budget_spend_and_estimate() -> None:
    ledger = BudgetLedger(limit=D(2))
    ledger.on_trainer_cost(D("1.5"))
    admission = LocalBudget(ledger).admission
    with pytest.raises(BudgetExceededError) as info:
        admission.reserve(D("0.75"))
    err = info.value
    assert (err.budget, err.spent, err.estimate) == (D(2), D("1.5"), D("0.75"))
    assert "$2" in str(err)
    assert "0.750000" in str(err)
    assert "not sent" in str(err)
    assert admission.reserve(D("0.5")).estimate == D("0.5")  # a smaller call still fits


def test_top_ups_are_asked_ahead_of_need_and_not_waited_for() -> None:
    asked: list[tuple[Decimal, Decimal, Decimal]] = []
    answers: list[Any] = []
    ledger = BudgetLedger(limit=None)

    def request(want: Decimal, need: Decimal, held: Decimal) -> None:
        asked.append((want, need, held))
        answers.append(ledger.grant("p", "i", want=want, need=need, held=held, now=0))

    admission = Admission(request, lease_calls=4)
    first = threading.Thread(target=admission.reserve, args=(D(1),))
    first.start()
    while not answers:
        threading.Event().wait(0.01)
    admission.on_grant(answers.pop())
    first.join()
    assert asked == [(D(4), D(1), D(0))]
    for _ in range(2):
        admission.reserve(D(1))  # balance 3, then 2: below half a lease -> one top-up asked
    assert len(asked) == 2
    assert asked[1][1] == 0
    admission.reserve(D(1))  # served from the balance while the top-up is in flight
    assert len(asked) == 2


def test_no_answer_is_an_unavailable_aggregator_and_nothing_is_sent() -> None:
    admission = Admission(lambda want, need, held: None, wait_s=0.05)
    with pytest.raises(AggregatorUnavailableError, match="not sent"):
        admission.reserve(D(1))


def test_a_failing_request_is_retried_until_the_wait_ends() -> None:
    calls = []

    def request(want: Decimal, need: Decimal, held: Decimal) -> None:
        calls.append(want)
        raise ConnectionError("down")

    admission = Admission(request, wait_s=0.5)
    with pytest.raises(AggregatorUnavailableError, match="down"):
        admission.reserve(D(1))
    assert 2 <= len(calls) <= 5  # backs off between attempts


def test_async_reserve_does_not_block_the_loop() -> None:
    budget = LocalBudget(BudgetLedger(limit=D(1)))

    async def main() -> list[Decimal]:
        reservations = await asyncio.gather(
            *(budget.admission.areserve(D("0.2")) for _ in range(5))
        )
        with pytest.raises(BudgetExceededError):
            await budget.admission.areserve(D("0.2"))
        return [r.estimate for r in reservations]

    assert sum(asyncio.run(main()), D(0)) == D(1)


def test_idle_give_back_returns_the_balance_once_nothing_moves() -> None:
    now = [0.0]
    budget = LocalBudget(BudgetLedger(limit=D(10)), lease_calls=4, clock=lambda: now[0])
    budget.admission.reserve(D(1)).settle(D("0.5"))
    assert budget.admission.give_back(idle_s=5) == 0  # admitted cost not shipped
    budget.ship(D("0.5"))
    assert budget.admission.give_back(idle_s=5) == 0  # first look: starts the idle clock
    now[0] = 6
    amount = budget.admission.give_back(idle_s=5)
    assert amount == D("3.5")
    budget.ledger.give_back("local", "", amount, now=now[0])
    assert budget.ledger.committed() == D("0.5")
    assert budget.ledger.accounts == {}


# --------------------------------------------------------------------------- estimates


@settings(max_examples=examples(100), deadline=None)
@given(
    texts=st.lists(st.text(max_size=50), max_size=5),
    max_tokens=st.integers(0, 10_000),
    n=st.integers(1, 4),
)
def test_the_input_bound_covers_every_utf8_byte(texts: list[str], max_tokens: int, n: int) -> None:
    messages = [{"role": "user", "content": t} for t in texts]
    bound = request_bound({"messages": messages, "max_tokens": max_tokens, "n": n})
    assert bound.input_tokens >= sum(len(t.encode()) for t in texts) + CALL_OVERHEAD_TOKENS
    assert bound.output_tokens == max_tokens * n


def _walk_every_field(kwargs: dict[str, Any], default_max_tokens: int) -> tuple[int, int]:
    """The bound as the module docstring defines it: every text field through ``_measure``."""
    acc = [0, 0, 0]
    for name in ("messages", "input", "prompt", "system", "instructions", "tools"):
        if kwargs.get(name) is not None:
            _measure(kwargs[name], acc)
    outputs = [
        v
        for name in ("max_tokens", "max_completion_tokens", "max_output_tokens")
        if isinstance(v := kwargs.get(name), int) and not isinstance(v, bool) and v >= 0
    ]
    output = max(outputs) if outputs else default_max_tokens
    n = kwargs.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        output *= n
    size, messages, media = acc
    tokens_in = size + messages * MESSAGE_OVERHEAD_TOKENS + media * MEDIA_PART_TOKENS
    return tokens_in + CALL_OVERHEAD_TOKENS, output


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(), st.text(max_size=8))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(
            st.sampled_from(["role", "content", "type", "text", "name", "image"]), inner, max_size=3
        ),
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image", "input_audio", "file", "tool_use"])},
            optional={"text": st.text(max_size=8)},
        ),
    ),
    max_leaves=12,
)
_FIELDS = st.sampled_from(
    [
        "messages",
        "input",
        "prompt",
        "system",
        "instructions",
        "tools",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "temperature",
        "model",
    ]
)


@settings(max_examples=examples(300), deadline=None)
@given(kwargs=st.dictionaries(_FIELDS, st.one_of(_VALUES, st.integers(-3, 5_000)), max_size=6))
def test_the_fast_walk_agrees_with_the_definition(kwargs: dict[str, Any]) -> None:
    """token_bounds measures plain messages inline for speed; every request, of any shape,
    gets the bound the field-by-field definition gives."""
    assert token_bounds(kwargs, 4_096) == _walk_every_field(kwargs, 4_096)


def test_request_shapes_of_the_major_apis() -> None:
    anthropic = request_bound(
        {
            "system": "be brief",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hé"}, {"type": "image"}]}
            ],
            "max_tokens": 10,
        }
    )
    assert anthropic.input_tokens >= len("be brief") + 3 + MEDIA_PART_TOKENS
    assert request_bound({"input": "x", "max_output_tokens": 7}).output_tokens == 7
    assert request_bound({"prompt": "x"}).output_tokens == DEFAULT_MAX_TOKENS
    assert request_bound({"max_completion_tokens": 5, "max_tokens": 3}).output_tokens == 5


def test_input_is_priced_at_the_highest_input_price() -> None:
    pricing = TokenPricing.create(
        prompt_per_million=3, completion_per_million=15, cache_creation_per_million=3.75
    )
    bound = request_bound({"prompt": "x" * 984, "max_tokens": 0})
    assert estimate_cost(pricing, bound) == D(1000) * D("3.75") / D(1_000_000)


# --------------------------------------------------------------------------- the decorator


class _Builder(ApiCostMixin):
    cost_context = "train"

    def __init__(self, budget: LocalBudget | None) -> None:
        self.budget = budget
        self.registry = PricingRegistry()
        self.registry.register_model_pricing(
            "m", TokenPricing.create(prompt_per_million=1000, completion_per_million=1000)
        )
        self.leaves: list[tuple[str, Decimal]] = []
        self.unpriced: list[str] = []

    def _pricing(self) -> PricingRegistry:
        return self.registry

    def _admission(self) -> Admission | None:
        return None if self.budget is None else self.budget.admission

    def _add_cost_leaf(self, path: str, usd: Decimal, *, response_id: str | None) -> None:
        self.leaves.append((path, usd))

    def _add_unpriced_call(self, path: str) -> None:
        self.unpriced.append(path)


@pytest.fixture
def active() -> Iterator[_Builder]:
    builder = _Builder(LocalBudget(BudgetLedger(limit=D("0.05")), lease_calls=1))
    token = set_active_builder(builder)
    yield builder
    reset_active_builder(token)


def _response(tokens: int) -> dict[str, Any]:
    return {"usage": {"prompt_tokens": tokens, "completion_tokens": 0}}


def test_the_decorator_admits_before_and_settles_to_the_recorded_cost(active: _Builder) -> None:
    sent: list[int] = []

    @track_api_cost(source="judge", provider="openai", model_name="m")
    def judge(*, prompt: str, max_tokens: int) -> dict[str, Any]:
        sent.append(max_tokens)
        return _response(10)  # $0.01 at $1000 per million

    # estimate: (1 + 16 + 4) tokens -> $0.021 each; real $0.01. Nothing is shipped here, so
    # the ledger holds the leases granted: 0.021 + 0.021 (a one-call lease never tops up
    # ahead); the balance (0.012 returned by settles) is short of a fourth estimate and the
    # 0.008 left under the limit does not cover what it needs.
    for _ in range(3):
        judge(prompt="x", max_tokens=4)
    assert active.leaves == [("train/judge", D("0.01"))] * 3
    with pytest.raises(BudgetExceededError) as info:
        judge(prompt="x", max_tokens=4)
    assert len(sent) == 3  # the refused call was never made
    assert info.value.estimate == D("0.021")
    assert info.value.committed == D("0.042")
    lease = active.budget.admission.lease  # type: ignore[union-attr]
    assert lease.admitted == D("0.03")
    assert lease.open == 0
    assert lease.balance == D("0.012")


def test_a_call_that_raises_gives_its_reservation_back(active: _Builder) -> None:
    @track_api_cost(source="judge", provider="openai", model_name="m", max_cost_usd=0.02)
    def judge() -> dict[str, Any]:
        raise TimeoutError("no answer")

    for _ in range(5):
        with pytest.raises(TimeoutError):
            judge()
    lease = active.budget.admission.lease  # type: ignore[union-attr]
    assert lease.open == 0
    assert lease.admitted == 0
    assert not active.leaves


def test_an_unpriced_call_keeps_its_reservation_as_spent(active: _Builder) -> None:
    @track_api_cost(source="judge", provider="openai", model_name="m", max_cost_usd=0.02)
    def judge() -> dict[str, Any]:
        return {"no": "usage"}

    with pytest.warns(UserWarning, match="unpriced"):
        judge()
    lease = active.budget.admission.lease  # type: ignore[union-attr]
    assert lease.unpriced == D("0.02")
    assert active.unpriced == ["train/judge"]


def test_a_stream_settles_when_it_ends(active: _Builder) -> None:
    @track_api_cost(source="judge", provider="openai", model_name="m", max_cost_usd=0.03)
    def stream() -> Iterator[dict[str, Any]]:
        yield {"id": "r1"}
        yield {"id": "r1", **_response(20)}

    chunks = stream()
    lease = active.budget.admission.lease  # type: ignore[union-attr]
    next(chunks)
    assert lease.open == D("0.03")
    list(chunks)
    assert lease.open == 0
    assert lease.admitted == D("0.02")


@pytest.mark.xdist_group("sdk-imports")  # a model no bundled table knows: LiteLLM is asked
def test_an_unestimable_model_is_refused_under_a_budget(active: _Builder) -> None:
    @track_api_cost(source="judge", provider="openrouter", model_name="x/y", check_pricing=False)
    def judge() -> dict[str, Any]:
        raise AssertionError("must not be called")

    with pytest.raises(PricingError, match="max_cost_usd"):
        judge()


def test_async_calls_are_admitted_too(active: _Builder) -> None:
    @track_api_cost(source="judge", provider="openai", model_name="m", max_cost_usd=0.02)
    async def judge() -> dict[str, Any]:
        return _response(20)  # costs its estimate

    async def main() -> None:
        await asyncio.gather(judge(), judge())
        with pytest.raises(BudgetExceededError):
            await judge()

    asyncio.run(main())
    assert len(active.leaves) == 2


def test_without_a_budget_nothing_changes() -> None:
    builder = _Builder(None)
    token = set_active_builder(builder)
    try:

        @track_api_cost(source="judge", provider="openai", model_name="m")
        def judge() -> dict[str, Any]:
            return _response(10)

        judge()
    finally:
        reset_active_builder(token)
    assert builder.leaves == [("train/judge", D("0.01"))]
