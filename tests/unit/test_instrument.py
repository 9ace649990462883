"""Tests of track_api_cost and ApiCostMixin with real OpenAI/Anthropic clients over MockTransport."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx2
import openai
import pytest

from art_ray_metrics.core.active import get_active_builder, reset_active_builder, set_active_builder
from art_ray_metrics.errors import InvalidMetricError, PricingError
from art_ray_metrics.spend.pricing import PricingRegistry
from art_ray_metrics.spend.track import (
    ApiCostMixin,
    UnpricedCallWarning,
    UnpricedModelWarning,
    bind_context,
    track_api_cost,
)

if TYPE_CHECKING:
    import anthropic

# one pytest-xdist worker runs the tests that import the Anthropic SDK, ART or LiteLLM, so the
# other never imports them (tests/conftest.py); anthropic is imported where it is used
pytestmark = pytest.mark.xdist_group("sdk-imports")

OPENAI_MODEL = "openai/gpt-4.1"  # built in: 2 / 0.5 cached / 8
ANTHROPIC_MODEL = "claude-sonnet-4-6"  # genai-prices: 3 / 15 / 3.75 write / 0.30 read


# --------------------------------------------------------------------------- fake host


@dataclass
class FakeBuilder(ApiCostMixin):
    """Implements the three host hooks and records what it got."""

    cost_context: str = "train"
    registry: PricingRegistry = field(default_factory=PricingRegistry)
    leaves: list[tuple[str, Decimal, str | None]] = field(default_factory=list)
    unpriced: list[str] = field(default_factory=list)

    def _pricing(self) -> PricingRegistry:
        return self.registry

    def _add_cost_leaf(self, path: str, usd: Decimal, *, response_id: str | None) -> None:
        self.leaves.append((path, usd, response_id))

    def _add_unpriced_call(self, path: str) -> None:
        self.unpriced.append(path)

    def total(self) -> Decimal:
        return sum((usd for _, usd, _ in self.leaves), Decimal(0))


@pytest.fixture
def builder() -> Iterator[FakeBuilder]:
    b = FakeBuilder()
    token = set_active_builder(b)
    yield b
    reset_active_builder(token)


# --------------------------------------------------------------------------- mock servers


def _sse(events: list[tuple[str | None, dict[str, Any]]], done: bool = False) -> bytes:
    parts = []
    for name, data in events:
        head = f"event: {name}\n" if name else ""
        parts.append(f"{head}data: {json.dumps(data)}\n\n")
    if done:
        parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


@dataclass
class OpenAIServer:
    """A MockTransport handler speaking enough of the OpenAI API; counts requests."""

    requests: int = 0
    rid: str = "chatcmpl-1"
    usage: dict[str, Any] | None = field(
        default_factory=lambda: {
            "prompt_tokens": 2000,
            "completion_tokens": 100,
            "total_tokens": 2100,
            "prompt_tokens_details": {"cached_tokens": 1500},
        }
    )

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests += 1
        body = json.loads(request.content)
        if request.url.path.endswith("/responses"):
            done = self._response_body(body)
            if not body.get("stream"):
                return httpx2.Response(200, json=done)
            created = {**done, "status": "in_progress", "usage": None}
            events: list[tuple[str | None, dict[str, Any]]] = [
                (
                    "response.created",
                    {"type": "response.created", "sequence_number": 0, "response": created},
                ),
                (
                    "response.completed",
                    {"type": "response.completed", "sequence_number": 1, "response": done},
                ),
            ]
            return httpx2.Response(
                200, content=_sse(events), headers={"content-type": "text/event-stream"}
            )
        base = {"id": self.rid, "created": 1, "model": body["model"]}
        if body.get("stream"):
            chunk = {**base, "object": "chat.completion.chunk"}
            events: list[tuple[str | None, dict[str, Any]]] = [
                (None, {**chunk, "choices": [{"index": 0, "delta": {"content": f"t{i}"}}]})
                for i in range(3)
            ]
            events.append(
                (None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            )
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append((None, {**chunk, "choices": [], "usage": self.usage}))
            return httpx2.Response(
                200, content=_sse(events, done=True), headers={"content-type": "text/event-stream"}
            )
        message = {"role": "assistant", "content": "ok"}
        return httpx2.Response(
            200,
            json={
                **base,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": self.usage,
            },
        )

    def _response_body(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "model": body["model"],
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "status": "completed",
            "usage": {
                "input_tokens": 2000,
                "output_tokens": 100,
                "total_tokens": 2100,
                "input_tokens_details": {"cached_tokens": 1500, "cache_write_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }


@dataclass
class AnthropicServer:
    """A MockTransport handler speaking enough of the Anthropic Messages API."""

    requests: int = 0
    rid: str = "msg_1"
    unique_ids: bool = False

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests += 1
        body = json.loads(request.content)
        rid = f"{self.rid}_{self.requests}" if self.unique_ids else self.rid
        usage = {
            "input_tokens": 100,
            "output_tokens": 50,
            "cache_creation_input_tokens": 1000,
            "cache_read_input_tokens": 500,
        }
        message = {
            "id": rid,
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        if not body.get("stream"):
            return httpx2.Response(
                200,
                json={
                    **message,
                    "content": [{"type": "text", "text": "ok"}],
                    "stop_reason": "end_turn",
                    "usage": usage,
                },
            )
        events: list[tuple[str | None, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": message}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "ok"},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 50},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return httpx2.Response(
            200, content=_sse(events), headers={"content-type": "text/event-stream"}
        )


def openai_client(server: OpenAIServer) -> openai.OpenAI:
    transport = httpx2.MockTransport(server)
    return openai.OpenAI(
        api_key="k",
        base_url="http://mock/v1",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def async_openai_client(server: OpenAIServer) -> openai.AsyncOpenAI:
    transport = httpx2.MockTransport(server)
    return openai.AsyncOpenAI(
        api_key="k",
        base_url="http://mock/v1",
        http_client=httpx2.AsyncClient(transport=transport),
        max_retries=0,
    )


def anthropic_client(server: AnthropicServer) -> anthropic.Anthropic:
    import anthropic

    transport = httpx2.MockTransport(server)
    return anthropic.Anthropic(
        api_key="k",
        base_url="http://mock",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def async_anthropic_client(server: AnthropicServer) -> anthropic.AsyncAnthropic:
    import anthropic

    transport = httpx2.MockTransport(server)
    return anthropic.AsyncAnthropic(
        api_key="k",
        base_url="http://mock",
        http_client=httpx2.AsyncClient(transport=transport),
        max_retries=0,
    )


MESSAGES: Any = [{"role": "user", "content": "hi"}]
OPENAI_COST = Decimal("0.00255")  # 500·2 + 1500·0.5 + 100·8 per million
ANTHROPIC_COST = Decimal("0.00495")  # 100·3 + 1000·3.75 + 500·0.30 + 50·15 per million


# --------------------------------------------------------------------------- tests


class TestAddResponseCost:
    """The mixin prices, records, de-duplicates and counts failures."""

    def test_records_leaf(self, builder: FakeBuilder) -> None:
        """A chat completion becomes costs/train/judge with its provider-scoped id."""
        response = openai_client(OpenAIServer()).chat.completions.create(
            model="gpt-4.1", messages=MESSAGES
        )
        cost = builder.add_response_cost(
            "judge/", response, provider="OpenAI", model_name=OPENAI_MODEL
        )
        assert cost == pytest.approx(0.00255)
        assert builder.leaves == [("train/judge", OPENAI_COST, "openai:chatcmpl-1")]

    def test_duplicate_adds_nothing(self, builder: FakeBuilder) -> None:
        """The same response recorded twice costs once; the second call returns 0.0."""
        response = anthropic_client(AnthropicServer()).messages.create(
            model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES
        )
        kwargs: dict[str, Any] = {"provider": "anthropic", "model_name": ANTHROPIC_MODEL}
        assert builder.add_response_cost("judge", response, **kwargs) == pytest.approx(0.00495)
        assert builder.add_response_cost("other", response.model_dump(), **kwargs) == 0.0
        assert builder.total() == ANTHROPIC_COST
        assert len(builder.leaves) == 1

    def test_unknown_model_counts_and_raises(self, builder: FakeBuilder) -> None:
        """As in ART it raises (a ValueError); first it counts one unpriced call."""
        response = openai_client(OpenAIServer()).chat.completions.create(
            model="x", messages=MESSAGES
        )
        with pytest.raises(ValueError, match="No pricing configured for model 'no-such'"):
            builder.add_response_cost("judge", response, provider="openai", model_name="no-such")
        assert builder.unpriced == ["train/judge"]
        assert builder.leaves == []

    def test_explicit_prices(self, builder: FakeBuilder) -> None:
        """Explicit prices price a model nobody knows."""
        response = openai_client(OpenAIServer()).chat.completions.create(
            model="x", messages=MESSAGES
        )
        cost = builder.add_response_cost(
            "judge",
            response,
            provider="openai",
            model_name="no-such",
            prompt_price_per_million=2,
            completion_price_per_million=8,
            cached_prompt_price_per_million=0.5,
        )
        assert builder.leaves[0][1] == OPENAI_COST
        assert cost == float(OPENAI_COST)

    def test_registration_methods(self, builder: FakeBuilder) -> None:
        """register_model_pricing and register_cost_extractor feed the shared registry."""
        builder.register_model_pricing("mine", prompt_per_million=1, completion_per_million=2)
        builder.register_cost_extractor("acme", lambda r: 0.75)
        assert builder.add_response_cost(
            "a",
            {"usage": {"prompt_tokens": 100, "completion_tokens": 50}},
            provider="openai",
            model_name="mine",
        ) == pytest.approx(0.0002)
        assert builder.add_response_cost("b", {}, provider="acme", model_name="m") == 0.75
        with pytest.raises(PricingError, match="completion_per_million"):
            builder.register_model_pricing("bad", prompt_per_million=1, completion_per_million=-2)

    def test_empty_source(self, builder: FakeBuilder) -> None:
        """An empty source is a key error, not an unpriced call."""
        with pytest.raises(InvalidMetricError, match="cost source"):
            builder.add_response_cost("/", {}, provider="openai", model_name=OPENAI_MODEL)
        assert builder.unpriced == []

    def test_failed_leaf_releases_id(self, builder: FakeBuilder) -> None:
        """If recording the leaf fails, the id is released and an unpriced call counted."""
        calls = {"n": 0}
        original = builder._add_cost_leaf

        def flaky(path: str, usd: Decimal, *, response_id: str | None) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise InvalidMetricError("Expected a free path but got a clash")
            original(path, usd, response_id=response_id)

        builder._add_cost_leaf = flaky  # type: ignore[method-assign]
        response = {"id": "r1", "usage": {"prompt_tokens": 2000, "completion_tokens": 100}}
        kwargs: dict[str, Any] = {"provider": "openai", "model_name": OPENAI_MODEL}
        with pytest.raises(InvalidMetricError):
            builder.add_response_cost("judge", response, **kwargs)
        assert builder.unpriced == ["train/judge"]
        assert builder.add_response_cost("judge", response, **kwargs) == pytest.approx(0.0048)
        assert len(builder.leaves) == 1


class TestDecoratorCalls:
    """Sync and async functions through real clients."""

    def test_sync_openai(self, builder: FakeBuilder) -> None:
        """A sync chat call records the exact cost and returns the SDK object untouched."""
        client = openai_client(OpenAIServer())

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL)
        def judge() -> Any:
            return client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

        result = judge()
        assert isinstance(result, openai.types.chat.ChatCompletion)
        assert builder.leaves == [("train/judge", OPENAI_COST, "openai:chatcmpl-1")]

    def test_sync_responses_api(self, builder: FakeBuilder) -> None:
        """A Responses API call is priced from input/output/cached tokens."""
        client = openai_client(OpenAIServer())

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL)
        def judge() -> Any:
            return client.responses.create(model="gpt-4.1", input="hi")

        judge()
        assert builder.leaves == [("train/judge", OPENAI_COST, "openai:resp_1")]

    def test_async_anthropic(self, builder: FakeBuilder) -> None:
        """An async Anthropic call records the exact cost with cache write/read."""
        client = async_anthropic_client(AnthropicServer())

        @track_api_cost(source="judge", provider="anthropic", model_name=ANTHROPIC_MODEL)
        async def judge() -> Any:
            return await client.messages.create(
                model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES
            )

        result = asyncio.run(judge())
        import anthropic

        assert isinstance(result, anthropic.types.Message)
        assert builder.leaves == [("train/judge", ANTHROPIC_COST, "anthropic:msg_1")]

    def test_response_getter(self, builder: FakeBuilder) -> None:
        """response_getter picks the response out of the function's result."""
        client = openai_client(OpenAIServer())

        @track_api_cost(
            source="judge",
            provider="openai",
            model_name=OPENAI_MODEL,
            response_getter=lambda r: r[1],
        )
        def judge() -> tuple[str, Any]:
            return ("score", client.chat.completions.create(model="gpt-4.1", messages=MESSAGES))

        assert judge()[0] == "score"
        assert builder.total() == OPENAI_COST

    def test_no_active_builder(self) -> None:
        """Without an active builder the call runs and nothing is recorded anywhere."""
        server = OpenAIServer()
        client = openai_client(server)
        idle = FakeBuilder()

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL)
        def judge() -> Any:
            return client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

        assert judge().id == "chatcmpl-1"
        assert server.requests == 1
        assert idle.leaves == []
        assert get_active_builder() is None

    def test_cost_context(self) -> None:
        """The cost path uses the active builder's cost context."""
        evaluator = FakeBuilder(cost_context="eval")
        client = openai_client(OpenAIServer())

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL)
        def judge() -> Any:
            return client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

        token = set_active_builder(evaluator)
        try:
            judge()
        finally:
            reset_active_builder(token)
        assert evaluator.leaves[0][0] == "eval/judge"

    def test_decoration_errors(self) -> None:
        """Empty source, provider or model and bad prices fail at decoration."""
        with pytest.raises(InvalidMetricError, match="source"):
            track_api_cost(source=" ", provider="openai", model_name="m")
        with pytest.raises(PricingError, match="provider"):
            track_api_cost(source="s", provider="", model_name="m")
        with pytest.raises(PricingError, match="prompt_price_per_million"):
            track_api_cost(
                source="s", provider="openai", model_name="m", prompt_price_per_million=float("nan")
            )


class TestStreams:
    """Streams are returned unchanged and priced when they end."""

    def test_openai_sync_stream(self, builder: FakeBuilder) -> None:
        """The caller gets the very openai.Stream; the final usage chunk is priced once."""
        client = openai_client(OpenAIServer())

        @track_api_cost(source="gen", provider="openai", model_name=OPENAI_MODEL)
        def generate() -> Any:
            return client.chat.completions.create(
                model="gpt-4.1",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )

        stream = generate()
        assert type(stream) is openai.Stream
        assert builder.leaves == []
        chunks = list(stream)
        assert len(chunks) == 5
        stream.close()
        assert builder.leaves == [("train/gen", OPENAI_COST, "openai:chatcmpl-1")]

    def test_responses_stream(self, builder: FakeBuilder) -> None:
        """A Responses API stream is priced from its response.completed event."""
        client = openai_client(OpenAIServer())

        @track_api_cost(source="gen", provider="openai", model_name=OPENAI_MODEL)
        def generate() -> Any:
            return client.responses.create(model="gpt-4.1", input="hi", stream=True)

        events = [e.type for e in generate()]
        assert events == ["response.created", "response.completed"]
        assert builder.leaves == [("train/gen", OPENAI_COST, "openai:resp_1")]

    def test_openai_stream_without_usage(self, builder: FakeBuilder) -> None:
        """A stream that never reports usage is an unpriced call with a warning."""
        client = openai_client(OpenAIServer())

        @track_api_cost(source="gen", provider="openai", model_name=OPENAI_MODEL)
        def generate() -> Any:
            return client.chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True)

        with pytest.warns(UnpricedCallWarning, match="include_usage"):
            for _ in generate():
                pass
        assert builder.unpriced == ["train/gen"]
        assert builder.leaves == []

    def test_early_stop_with_close(self, builder: FakeBuilder) -> None:
        """A consumer that breaks and closes records what was reported (here: nothing)."""
        client = openai_client(OpenAIServer())

        @track_api_cost(source="gen", provider="openai", model_name=OPENAI_MODEL)
        def generate() -> Any:
            return client.chat.completions.create(
                model="gpt-4.1",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )

        def consume_one() -> None:
            with generate() as stream:
                for _ in stream:
                    break

        with pytest.warns(UnpricedCallWarning):
            consume_one()
        assert builder.unpriced == ["train/gen"]

    def test_anthropic_early_stop_gc(self, builder: FakeBuilder) -> None:
        """An Anthropic stream dropped after message_start is priced from its input usage."""
        client = anthropic_client(AnthropicServer())

        @track_api_cost(source="gen", provider="anthropic", model_name=ANTHROPIC_MODEL)
        def generate() -> Any:
            return client.messages.create(
                model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES, stream=True
            )

        stream = generate()
        assert next(iter(stream)).type == "message_start"
        del stream
        gc.collect()
        # 100·3 + 1000·3.75 + 500·0.30 + 1 output token·15, per million
        assert builder.leaves == [("train/gen", Decimal("0.004215"), "anthropic:msg_1")]

    def test_anthropic_sync_stream(self, builder: FakeBuilder) -> None:
        """message_start + message_delta usage price a raw Anthropic stream exactly."""
        client = anthropic_client(AnthropicServer())

        @track_api_cost(source="gen", provider="anthropic", model_name=ANTHROPIC_MODEL)
        def generate() -> Any:
            return client.messages.create(
                model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES, stream=True
            )

        stream = generate()
        import anthropic

        assert type(stream) is anthropic.Stream
        assert [e.type for e in stream][-1] == "message_stop"
        assert builder.leaves == [("train/gen", ANTHROPIC_COST, "anthropic:msg_1")]

    def test_anthropic_stream_manager(self, builder: FakeBuilder) -> None:
        """messages.stream() works as a context manager and is priced on exit."""
        client = anthropic_client(AnthropicServer())

        @track_api_cost(source="gen", provider="anthropic", model_name=ANTHROPIC_MODEL)
        def generate() -> Any:
            return client.messages.stream(model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES)

        with generate() as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == "ok"
        assert final.usage.output_tokens == 50
        assert builder.leaves == [("train/gen", ANTHROPIC_COST, "anthropic:msg_1")]

    def test_async_openai_stream(self, builder: FakeBuilder) -> None:
        """An async openai.AsyncStream is returned as is and priced at its end."""
        client = async_openai_client(OpenAIServer())

        @track_api_cost(source="gen", provider="openai", model_name=OPENAI_MODEL)
        async def generate() -> Any:
            return await client.chat.completions.create(
                model="gpt-4.1",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )

        async def main() -> int:
            stream = await generate()
            assert type(stream) is openai.AsyncStream
            return len([c async for c in stream])

        assert asyncio.run(main()) == 5
        assert builder.leaves == [("train/gen", OPENAI_COST, "openai:chatcmpl-1")]

    def test_async_anthropic_stream_manager(self, builder: FakeBuilder) -> None:
        """An async messages.stream() manager is priced when its block exits."""
        client = async_anthropic_client(AnthropicServer())

        @track_api_cost(source="gen", provider="anthropic", model_name=ANTHROPIC_MODEL)
        def generate() -> Any:
            return client.messages.stream(model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES)

        async def main() -> None:
            async with generate() as stream:
                async for _ in stream:
                    pass

        asyncio.run(main())
        assert builder.total() == ANTHROPIC_COST

    def test_async_generator_function(self, builder: FakeBuilder) -> None:
        """An async generator yielding Anthropic events is priced when it finishes."""
        client = async_anthropic_client(AnthropicServer())

        @track_api_cost(source="gen", provider="anthropic", model_name=ANTHROPIC_MODEL)
        async def generate() -> AsyncIterator[Any]:
            stream = await client.messages.create(
                model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES, stream=True
            )
            async for event in stream:
                yield event

        async def main() -> list[str]:
            return [e.type async for e in generate()]

        assert asyncio.run(main())[0] == "message_start"
        assert builder.leaves == [("train/gen", ANTHROPIC_COST, "anthropic:msg_1")]

    def test_sync_generator_function(self, builder: FakeBuilder) -> None:
        """A sync generator yielding OpenAI chunks is priced when it finishes."""
        client = openai_client(OpenAIServer())

        @track_api_cost(source="gen", provider="openai", model_name=OPENAI_MODEL)
        def generate() -> Iterator[Any]:
            yield from client.chat.completions.create(
                model="gpt-4.1",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )

        assert len(list(generate())) == 5
        assert builder.total() == OPENAI_COST

    def test_strict_stream_raises_at_end(self, builder: FakeBuilder) -> None:
        """In strict mode a stream with no usage raises to the consumer at its end."""
        client = openai_client(OpenAIServer())

        @track_api_cost(source="gen", provider="openai", model_name=OPENAI_MODEL, strict=True)
        def generate() -> Any:
            return client.chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True)

        seen: list[Any] = []

        def consume() -> None:
            for chunk in generate():
                seen.append(chunk)

        with pytest.raises(PricingError, match="none arrived"):
            consume()
        assert len(seen) == 4
        assert builder.unpriced == ["train/gen"]


class TestFailBeforePay:
    """No API call is made that cannot be priced."""

    def test_warns_at_decoration_and_raises_before_call(self, builder: FakeBuilder) -> None:
        """An unknown model warns when decorated and raises before any request is sent."""
        server = OpenAIServer()
        client = openai_client(server)
        with pytest.warns(UnpricedModelWarning, match="mystery-model"):

            @track_api_cost(source="judge", provider="openai", model_name="mystery-model")
            def judge() -> Any:
                return client.chat.completions.create(model="mystery-model", messages=MESSAGES)

        with pytest.raises(PricingError, match="refusing to make an API call"):
            judge()
        assert server.requests == 0
        assert builder.unpriced == []
        assert builder.leaves == []

    def test_registered_after_decoration(self, builder: FakeBuilder) -> None:
        """Pricing registered between decoration and the first call lets the call through."""
        client = openai_client(OpenAIServer())
        with pytest.warns(UnpricedModelWarning):

            @track_api_cost(source="judge", provider="openai", model_name="mystery-model")
            def judge() -> Any:
                return client.chat.completions.create(model="mystery-model", messages=MESSAGES)

        builder.register_model_pricing(
            "mystery-model",
            prompt_per_million=2,
            completion_per_million=8,
            cached_prompt_per_million=0.5,
        )
        judge()
        assert builder.total() == OPENAI_COST

    def test_async_raises_before_call(self, builder: FakeBuilder) -> None:
        """The async wrapper checks before awaiting the API call."""
        server = AnthropicServer()
        client = async_anthropic_client(server)
        with pytest.warns(UnpricedModelWarning):

            @track_api_cost(source="judge", provider="anthropic", model_name="claude-nonexistent")
            async def judge() -> Any:
                return await client.messages.create(
                    model="claude-nonexistent", max_tokens=5, messages=MESSAGES
                )

        with pytest.raises(PricingError):
            asyncio.run(judge())
        assert server.requests == 0

    def test_check_pricing_off_uses_direct_cost(self, builder: FakeBuilder) -> None:
        """check_pricing=False trusts a cost the response reports itself."""
        server = OpenAIServer()
        server.usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "cost": 0.01}
        client = openai_client(server)

        @track_api_cost(
            source="judge", provider="openrouter", model_name="vendor/x", check_pricing=False
        )
        def judge() -> Any:
            return client.chat.completions.create(model="vendor/x", messages=MESSAGES)

        judge()
        assert builder.total() == Decimal("0.01")

    def test_extractor_counts_as_pricing(self, builder: FakeBuilder) -> None:
        """A registered cost extractor satisfies the pre-call check."""
        builder.register_cost_extractor("acme", lambda r: 0.5)

        @track_api_cost(source="judge", provider="acme", model_name="acme-1")
        def judge() -> dict[str, Any]:
            return {"id": "a1"}

        judge()
        assert builder.leaves == [("train/judge", Decimal("0.5"), "acme:a1")]


class TestNeverLosePaidResponse:
    """A pricing failure after the call never drops the result."""

    def test_missing_usage_returns_result(self, builder: FakeBuilder) -> None:
        """A response without usage is returned, counted unpriced and warned about."""
        server = OpenAIServer()
        server.usage = None
        client = openai_client(server)

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL)
        def judge() -> Any:
            return client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

        with pytest.warns(UnpricedCallWarning, match="costs/train/judge"):
            result = judge()
        assert result.id == "chatcmpl-1"
        assert builder.unpriced == ["train/judge"]

    def test_strict_raises_after_counting(self, builder: FakeBuilder) -> None:
        """strict=True raises the PricingError, after counting the unpriced call."""
        server = OpenAIServer()
        server.usage = None
        client = openai_client(server)

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL, strict=True)
        def judge() -> Any:
            return client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

        with pytest.raises(PricingError, match="token usage"):
            judge()
        assert builder.unpriced == ["train/judge"]

    def test_failing_getter(self, builder: FakeBuilder) -> None:
        """A response_getter that raises still returns the result and counts once."""

        @track_api_cost(
            source="judge",
            provider="openai",
            model_name=OPENAI_MODEL,
            response_getter=lambda r: r["x"],
        )
        def judge() -> dict[str, Any]:
            return {"paid": True}

        with pytest.warns(UnpricedCallWarning, match="'x'"):
            assert judge() == {"paid": True}
        assert builder.unpriced == ["train/judge"]


class TestIdempotency:
    """A response id is charged once however often it is recorded."""

    def test_retry_wrapper(self, builder: FakeBuilder) -> None:
        """Decorated inner call + decorated retry wrapper returning the same response: once."""
        client = openai_client(OpenAIServer())

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL)
        def attempt() -> Any:
            return client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL)
        def with_retry() -> Any:
            return attempt()

        with_retry()
        assert builder.leaves == [("train/judge", OPENAI_COST, "openai:chatcmpl-1")]

    def test_distinct_ids_both_count(self, builder: FakeBuilder) -> None:
        """Two responses with different ids both count."""
        server = OpenAIServer()
        client = openai_client(server)

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL)
        def judge() -> Any:
            return client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

        judge()
        server.rid = "chatcmpl-2"
        judge()
        assert builder.total() == 2 * OPENAI_COST

    def test_id_reaches_aggregator_after_eviction(self) -> None:
        """Past the local LRU the id is still passed on for the aggregator to de-duplicate."""
        b = FakeBuilder(registry=PricingRegistry(max_response_ids=1))
        one = {"id": "a", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        two = {"id": "b", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        for response in (one, two, one):
            b.add_response_cost("j", response, provider="openai", model_name=OPENAI_MODEL)
        assert [rid for _, _, rid in b.leaves] == ["openai:a", "openai:b", "openai:a"]


class TestContextPropagation:
    """asyncio tasks inherit the active builder; threads need bind_context."""

    def test_asyncio_tasks(self, builder: FakeBuilder) -> None:
        """Calls gathered as tasks all record into the builder active at creation."""
        client = async_anthropic_client(AnthropicServer(unique_ids=True))

        @track_api_cost(source="judge", provider="anthropic", model_name=ANTHROPIC_MODEL)
        async def judge(i: int) -> Any:
            return await client.messages.create(
                model=ANTHROPIC_MODEL, max_tokens=5, messages=MESSAGES
            )

        async def main() -> None:
            await asyncio.gather(*(asyncio.create_task(judge(i)) for i in range(4)))

        asyncio.run(main())
        assert len(builder.leaves) == 4

    def test_plain_thread_sees_no_builder(self, builder: FakeBuilder) -> None:
        """A plain thread starts without the active builder: its call records nothing."""
        client = openai_client(OpenAIServer())

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL)
        def judge() -> Any:
            return client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

        t = threading.Thread(target=judge)
        t.start()
        t.join()
        assert builder.leaves == []

    def test_bind_context_threads(self, builder: FakeBuilder) -> None:
        """bind_context carries the builder into pool threads, concurrently."""
        server = OpenAIServer()
        client = openai_client(server)

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL)
        def judge(i: int) -> Any:
            response = client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
            return response.model_copy(update={"id": f"chatcmpl-{i}"})

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(bind_context(judge), range(8)))
        assert len(builder.leaves) == 8

    def test_copy_context_run(self, builder: FakeBuilder) -> None:
        """contextvars.copy_context().run works too."""
        seen: list[Any] = []
        ctx = copy_context()
        t = threading.Thread(target=ctx.run, args=(lambda: seen.append(get_active_builder()),))
        t.start()
        t.join()
        assert seen == [builder]

    def test_to_thread(self, builder: FakeBuilder) -> None:
        """asyncio.to_thread copies the context itself."""
        client = openai_client(OpenAIServer())

        @track_api_cost(source="judge", provider="openai", model_name=OPENAI_MODEL)
        def judge() -> Any:
            return client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

        asyncio.run(asyncio.to_thread(judge))
        assert builder.total() == OPENAI_COST
