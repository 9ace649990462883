"""Overhead of ``@track_api_cost`` per call, as a ratio to the same undecorated call.

Each case calls the real ``openai``/``anthropic`` client over ``httpx2.MockTransport`` (no
network), once plain and once through the decorator with an active builder, so the ratio
includes the whole pricing path: usage normalisation, the pricing lookup (built-in table or
genai-prices), the Decimal arithmetic, the response-id claim and the builder's leaf record.
The mock returns a fresh response id per request, so no call is skipped as a duplicate.

Rounds alternate plain and decorated runs; the table shows the median per-call time over the
rounds. Target: decorated/plain ≤ 1.2.

Run: ``python bench/bench_decorator.py [--quick] [--calls 300] [--rounds 7]``; ``--quick`` is
``--calls 100 --rounds 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anthropic
import httpx2
import openai

from art_ray_metrics.core.active import reset_active_builder, set_active_builder
from art_ray_metrics.spend.pricing import PricingRegistry
from art_ray_metrics.spend.track import ApiCostMixin, track_api_cost

_ids = itertools.count()
MESSAGES: Any = [{"role": "user", "content": "hi"}]


def _openai_handler(request: httpx2.Request) -> httpx2.Response:
    body = json.loads(request.content)
    rid = f"chatcmpl-{next(_ids)}"
    usage = {
        "prompt_tokens": 2000,
        "completion_tokens": 100,
        "total_tokens": 2100,
        "prompt_tokens_details": {"cached_tokens": 1500},
    }
    if body.get("stream"):
        base = {"id": rid, "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        chunks = [
            {**base, "choices": [{"index": 0, "delta": {"content": f"t{i}"}}]} for i in range(8)
        ]
        chunks.append({**base, "choices": [], "usage": usage})
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx2.Response(
            200, content=sse.encode(), headers={"content-type": "text/event-stream"}
        )
    return httpx2.Response(
        200,
        json={
            "id": rid,
            "object": "chat.completion",
            "created": 1,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        },
    )


def _anthropic_handler(request: httpx2.Request) -> httpx2.Response:
    body = json.loads(request.content)
    return httpx2.Response(
        200,
        json={
            "id": f"msg_{next(_ids)}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 100,
                "output_tokens": 50,
                "cache_creation_input_tokens": 1000,
                "cache_read_input_tokens": 500,
            },
        },
    )


class _ListHost(ApiCostMixin):
    """Minimal builder host used when the package's MetricsBuilder is unavailable."""

    def __init__(self) -> None:
        self.cost_context = "train"
        self.registry = PricingRegistry()
        self.leaves: list[tuple[str, Decimal, str | None]] = []

    def _pricing(self) -> PricingRegistry:
        return self.registry

    def _add_cost_leaf(self, path: str, usd: Decimal, *, response_id: str | None) -> None:
        self.leaves.append((path, usd, response_id))

    def _add_unpriced_call(self, path: str) -> None:
        raise AssertionError(f"unexpected unpriced call for {path}")


def _make_builder() -> tuple[Any, str]:
    try:
        from art_ray_metrics.builder import MetricsBuilder

        return MetricsBuilder(cost_context="train"), "MetricsBuilder"
    except Exception:
        return _ListHost(), "list host"


def _time_sync(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _time_async(fn: Callable[[], Any], calls: int) -> float:
    async def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            await fn()
        return (time.perf_counter() - start) / calls

    return asyncio.run(run())


def main() -> None:
    """Run all cases and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="--calls 100 --rounds 3")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.rounds = 100, 3

    oai = openai.OpenAI(
        api_key="k",
        base_url="http://mock/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(_openai_handler)),
        max_retries=0,
    )
    aoai = openai.AsyncOpenAI(
        api_key="k",
        base_url="http://mock/v1",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(_openai_handler)),
        max_retries=0,
    )
    ant = anthropic.Anthropic(
        api_key="k",
        base_url="http://mock",
        http_client=httpx2.Client(transport=httpx2.MockTransport(_anthropic_handler)),
        max_retries=0,
    )

    def chat() -> Any:
        return oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

    async def achat() -> Any:
        return await aoai.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

    def stream() -> int:
        s = oai.chat.completions.create(
            model="gpt-4.1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        return sum(1 for _ in s)

    def claude() -> Any:
        return ant.messages.create(model="claude-sonnet-4-6", max_tokens=5, messages=MESSAGES)

    def stream_decorated() -> int:
        s = stream_source()
        return sum(1 for _ in s)

    @track_api_cost(source="bench", provider="openai", model_name="gpt-4.1")
    def stream_source() -> Any:
        return oai.chat.completions.create(
            model="gpt-4.1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )

    deco = track_api_cost(source="bench", provider="openai", model_name="gpt-4.1")
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any], bool]] = [
        ("openai chat, sync (genai-prices)", chat, deco(chat), False),
        ("openai chat, async (genai-prices)", achat, deco(achat), True),
        ("openai chat stream, sync, 9 chunks", stream, stream_decorated, False),
        (
            "anthropic messages, sync (genai-prices)",
            claude,
            track_api_cost(source="bench", provider="anthropic", model_name="claude-sonnet-4-6")(
                claude
            ),
            False,
        ),
    ]

    builder, host = _make_builder()
    token = set_active_builder(builder)
    try:
        rows = []
        for name, plain, decorated, is_async in cases:
            timer = _time_async if is_async else _time_sync
            timer(plain, 20)
            timer(decorated, 20)  # warm-up: imports, genai-prices lookup cache
            plain_t, deco_t = [], []
            for _ in range(args.rounds):
                plain_t.append(timer(plain, args.calls))
                deco_t.append(timer(decorated, args.calls))
            p, d = statistics.median(plain_t), statistics.median(deco_t)
            rows.append((name, p, d))
    finally:
        reset_active_builder(token)

    print(f"track_api_cost overhead: {args.calls} calls × {args.rounds} rounds, host: {host}")
    print(f"{'case':42} {'plain µs':>10} {'decorated µs':>13} {'added µs':>9} {'ratio':>6}")
    for name, p, d in rows:
        print(f"{name:42} {p * 1e6:10.1f} {d * 1e6:13.1f} {(d - p) * 1e6:9.1f} {d / p:6.3f}")
    worst = max(d / p for _, p, d in rows)
    print(f"worst ratio {worst:.3f} (target ≤ 1.2): {'OK' if worst <= 1.2 else 'OVER'}")


if __name__ == "__main__":
    main()
