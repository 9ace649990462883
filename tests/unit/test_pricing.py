"""Tests of art_ray_metrics.spend.pricing: formulas, usage shapes, pricing order, genai-prices parity."""

from __future__ import annotations

import math
import threading
from decimal import Decimal
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import genai_prices
import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from art_ray_metrics.errors import PricingError
from art_ray_metrics.spend import pricing as pricing_module
from art_ray_metrics.spend.pricing import (
    BUILTIN_PRICING,
    PriceOverrides,
    PricingRegistry,
    TokenPricing,
    UsageKind,
    anthropic_usage,
    extract_direct_cost,
    extract_response_id,
    genai_token_pricing,
    normalize_usage,
    openai_chat_usage,
    usage_cost,
)

if TYPE_CHECKING:
    import anthropic

# one pytest-xdist worker runs the tests that import the Anthropic SDK, ART or LiteLLM, so the
# other never imports them (tests/conftest.py); anthropic is imported where it is used
pytestmark = pytest.mark.xdist_group("sdk-imports")


def chat_completion(
    *,
    prompt: int,
    completion: int,
    cached: int | None = None,
    model: str = "gpt-4.1",
    rid: str = "chatcmpl-1",
    **usage_extra: Any,
) -> ChatCompletion:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        **usage_extra,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return ChatCompletion.model_validate(
        {
            "id": rid,
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [],
            "usage": usage,
        }
    )


def responses_response(
    *, inp: int, out: int, cached: int = 0, write: int = 0, model: str = "gpt-4.1"
) -> Response:
    return Response.model_validate(
        {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "model": model,
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "status": "completed",
            "usage": {
                "input_tokens": inp,
                "output_tokens": out,
                "total_tokens": inp + out,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": write},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }
    )


def anthropic_message(
    *, inp: int, out: int, write: int = 0, read: int = 0, model: str = "claude-sonnet-4-6"
) -> anthropic.types.Message:
    import anthropic

    return anthropic.types.Message.model_validate(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": inp,
                "output_tokens": out,
                "cache_creation_input_tokens": write,
                "cache_read_input_tokens": read,
            },
        }
    )


class TestArtWorkedNumbers:
    """ART's golden pricing examples hold exactly, in Decimal."""

    def test_openai_plain(self) -> None:
        """100 prompt / 50 completion at $1/$2 per million costs exactly $0.0002."""
        registry = PricingRegistry()
        registry.register_model_pricing(
            "m", TokenPricing.create(prompt_per_million=1, completion_per_million=2)
        )
        priced = registry.price_response(
            chat_completion(prompt=100, completion=50), provider="openai", model_name="m"
        )
        assert priced.cost == Decimal("0.0002")
        assert priced.method == "usage"

    def test_openai_cached(self) -> None:
        """2000 prompt (1500 cached) + 100 completion at 2/0.5/8 costs exactly $0.00255."""
        priced = PricingRegistry().price_response(
            chat_completion(prompt=2000, completion=100, cached=1500),
            provider="openai",
            model_name="openai/gpt-4.1",
        )
        assert priced.cost == Decimal("0.00255")

    def test_anthropic_cache(self) -> None:
        """Anthropic 100 in, 50 out, 1000 write, 500 read at 3/15/3.75/0.30 costs $0.00495."""
        priced = PricingRegistry().price_response(
            anthropic_message(inp=100, out=50, write=1000, read=500),
            provider="anthropic",
            model_name="anthropic/claude-sonnet-4-6",
        )
        assert priced.cost == Decimal("0.00495")
        assert isinstance(priced.cost, Decimal)

    def test_responses_api(self) -> None:
        """Responses API usage follows the chat formula (cached tokens are part of the input)."""
        priced = PricingRegistry().price_response(
            responses_response(inp=2000, out=100, cached=1500),
            provider="openai",
            model_name="openai/gpt-4.1",
        )
        assert priced.cost == Decimal("0.00255")


class TestUsageShapes:
    """Usage of each SDK shape normalises the same from objects and dicts."""

    def test_chat_object_equals_dict(self) -> None:
        """A ChatCompletion and its dict give identical usage."""
        response = chat_completion(prompt=2000, completion=100, cached=1500)
        assert normalize_usage(response, "openai") == normalize_usage(
            response.model_dump(), "openai"
        )

    def test_chat_split(self) -> None:
        """Cached tokens move from the prompt price to the cache price."""
        usage = normalize_usage(chat_completion(prompt=2000, completion=100, cached=1500), "openai")
        assert (usage.kind, usage.input_tokens, usage.cache_read_tokens, usage.output_tokens) == (
            UsageKind.OPENAI_CHAT,
            Decimal(500),
            Decimal(1500),
            Decimal(100),
        )

    def test_cached_capped_at_prompt(self) -> None:
        """More cached than prompt tokens is capped at the prompt tokens."""
        usage = openai_chat_usage(
            {
                "prompt_tokens": 10,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 50},
            }
        )
        assert usage is not None
        assert (usage.input_tokens, usage.cache_read_tokens) == (Decimal(0), Decimal(10))

    def test_responses_kind(self) -> None:
        """A Responses API object is recognised under provider openai."""
        usage = normalize_usage(responses_response(inp=10, out=5, cached=4), "openai")
        assert usage.kind is UsageKind.OPENAI_RESPONSES
        assert usage.input_tokens == Decimal(6)

    def test_openai_cache_write_defaults_to_prompt_price(self) -> None:
        """OpenAI cache_write_tokens cost the prompt price when no write price is known."""
        pricing = TokenPricing.create(prompt_per_million=1, completion_per_million=2)
        with_write = normalize_usage(responses_response(inp=100, out=50, write=40), "openai")
        without = normalize_usage(responses_response(inp=100, out=50), "openai")
        assert with_write.cache_write_tokens == Decimal(40)
        assert usage_cost(with_write, pricing) == usage_cost(without, pricing) == Decimal("0.0002")

    def test_anthropic_object_equals_dict(self) -> None:
        """An Anthropic Message and its dict give identical usage."""
        message = anthropic_message(inp=100, out=50, write=1000, read=500)
        assert normalize_usage(message, "anthropic") == normalize_usage(
            message.model_dump(), "anthropic"
        )

    def test_anthropic_cache_prices_default_to_prompt(self) -> None:
        """Without W and R, cache tokens cost the prompt price."""
        pricing = TokenPricing.create(prompt_per_million=3, completion_per_million=15)
        usage = anthropic_usage(
            {"input_tokens": 100, "output_tokens": 0, "cache_creation_input_tokens": 100}
        )
        assert usage is not None
        assert usage_cost(usage, pricing) == Decimal("0.0006")

    def test_other_provider_by_shape(self) -> None:
        """An OpenAI-compatible provider's chat usage is recognised by shape."""
        usage = normalize_usage({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, "together")
        assert usage.kind is UsageKind.OPENAI_CHAT

    @pytest.mark.parametrize(
        ("response", "provider"),
        [
            pytest.param({"id": "x"}, "openai", id="no-usage"),
            pytest.param({"usage": None}, "anthropic", id="null-usage"),
            pytest.param(
                {"usage": {"input_tokens": 1, "cache_read_input_tokens": 2}},
                "openai",
                id="anthropic-usage-as-openai",
            ),
            pytest.param(
                {"usage": {"prompt_tokens": 1, "completion_tokens": 2}},
                "anthropic",
                id="openai-usage-as-anthropic",
            ),
        ],
    )
    def test_mismatch_raises(self, response: Any, provider: str) -> None:
        """Missing usage or usage of another provider raises PricingError naming the provider."""
        with pytest.raises(PricingError, match=provider):
            normalize_usage(response, provider)


class TestValidation:
    """Bad token counts and prices raise clear PricingErrors."""

    @pytest.mark.parametrize(
        "value",
        [True, math.nan, math.inf, -1, Decimal("NaN"), "10", [1]],
        ids=["bool", "nan", "inf", "negative", "decimal-nan", "str", "list"],
    )
    def test_bad_token_count(self, value: object) -> None:
        """A bool, NaN, infinite, negative or non-numeric token count is rejected by name."""
        with pytest.raises(PricingError, match=r"usage\.prompt_tokens"):
            openai_chat_usage({"prompt_tokens": value, "completion_tokens": 1})

    @pytest.mark.parametrize(
        "value", [True, math.nan, -math.inf, -0.5], ids=["bool", "nan", "neg-inf", "negative"]
    )
    def test_bad_price(self, value: object) -> None:
        """A bad price in TokenPricing.create or PriceOverrides.create names the argument."""
        with pytest.raises(PricingError, match="completion_per_million"):
            TokenPricing.create(prompt_per_million=1, completion_per_million=value)  # type: ignore[arg-type]
        with pytest.raises(PricingError, match="cache_read_price_per_million"):
            PriceOverrides.create(cache_read_price_per_million=value)  # type: ignore[arg-type]

    def test_float_prices_are_exact(self) -> None:
        """Float prices convert through repr, so 0.30 is exactly Decimal('0.3')."""
        assert TokenPricing.create(
            prompt_per_million=0.1, completion_per_million=0.30
        ).completion_per_million == Decimal("0.3")

    @pytest.mark.parametrize(("provider", "model"), [("", "m"), ("openai", " "), (None, "m")])
    def test_empty_names(self, provider: Any, model: str) -> None:
        """Empty provider or model names are rejected."""
        with pytest.raises(PricingError, match="Expected a non-empty"):
            PricingRegistry().price_response({}, provider=provider, model_name=model)


class TestDirectCost:
    """A cost reported by the response wins over token pricing."""

    def test_usage_cost_number(self) -> None:
        """usage.cost (an extra field on the SDK object) is used as is."""
        response = chat_completion(prompt=1, completion=1, model="no-such-model", cost=0.0123)
        priced = PricingRegistry().price_response(
            response, provider="openrouter", model_name="no-such-model"
        )
        assert (priced.cost, priced.method) == (Decimal("0.0123"), "direct")

    def test_usage_cost_object(self) -> None:
        """usage.cost as an object with total_cost is used."""
        response = {"usage": {"cost": {"total_cost": "0.5", "input_cost": 0.1}}}
        assert extract_direct_cost(response) == Decimal("0.5")

    def test_model_extra(self) -> None:
        """usage.model_extra['cost'] is used."""
        assert extract_direct_cost({"usage": {"model_extra": {"cost": 2}}}) == Decimal(2)

    def test_litellm_header(self) -> None:
        """LiteLLM's response-cost header (a string) is used."""
        response = SimpleNamespace(
            usage=None,
            _hidden_params={"additional_headers": {"llm_provider-x-litellm-response-cost": "0.25"}},
        )
        assert extract_direct_cost(response) == Decimal("0.25")

    def test_bool_is_ignored(self) -> None:
        """A boolean cost is not a cost."""
        assert extract_direct_cost({"usage": {"cost": True}}) is None

    def test_negative_raises(self) -> None:
        """A negative reported cost raises."""
        with pytest.raises(PricingError, match=r"usage\.cost"):
            extract_direct_cost({"usage": {"cost": -1.0}})


class TestPricingOrder:
    """Registered → built-in → genai-prices → error; overrides replace fields."""

    def test_registered_beats_builtin(self) -> None:
        """Registered pricing for a built-in name wins."""
        registry = PricingRegistry()
        registry.register_model_pricing(
            "openai/gpt-4.1", TokenPricing.create(prompt_per_million=10, completion_per_million=10)
        )
        assert registry.require_pricing("openai", "openai/gpt-4.1").prompt_per_million == 10

    def test_builtin_table(self) -> None:
        """ART's two built-in names resolve to the table."""
        registry = PricingRegistry()
        for name, pricing in BUILTIN_PRICING.items():
            assert registry.require_pricing(name.split("/")[0], name) == pricing

    def test_genai_fallback(self) -> None:
        """A model only genai-prices knows is priced from its snapshot, cache read included."""
        pricing = PricingRegistry().require_pricing("openai", "gpt-4o-mini")
        assert pricing.prompt_per_million == Decimal("0.15")
        assert pricing.cached_prompt_per_million == Decimal("0.075")

    def test_provider_prefix_tolerated(self) -> None:
        """A LiteLLM-style 'provider/model' name reaches genai-prices without its prefix."""
        assert genai_token_pricing("openai", "openai/gpt-4o-mini") == genai_token_pricing(
            "openai", "gpt-4o-mini"
        )

    def test_unknown_model(self) -> None:
        """An unknown model raises ART's message."""
        with pytest.raises(PricingError, match="No pricing configured for model 'no-such-model'"):
            PricingRegistry().price_response(
                chat_completion(prompt=1, completion=1),
                provider="openai",
                model_name="no-such-model",
            )

    def test_overrides_replace_fields(self) -> None:
        """An explicit completion price replaces only that field."""
        pricing = PricingRegistry().require_pricing(
            "openai", "openai/gpt-4.1", PriceOverrides.create(completion_price_per_million=1)
        )
        assert (pricing.prompt_per_million, pricing.completion_per_million) == (
            Decimal(2),
            Decimal(1),
        )
        assert pricing.cached_prompt_per_million == Decimal("0.5")

    def test_complete_overrides_answer_can_price_without_a_lookup(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Whether a call with its own prompt and completion prices can be priced needs no price
        source (LiteLLM's import alone costs seconds per process); prices themselves still
        come from every source, which may add cache prices."""
        asked: list[str] = []

        def source(provider: str, name: str, tokens: Decimal) -> None:
            asked.append(name)

        monkeypatch.setattr(pricing_module, "PRICE_SOURCES", (source,))
        registry = PricingRegistry()
        own = PriceOverrides.create(prompt_price_per_million=1, completion_price_per_million=2)
        assert registry.can_price("openai", "self-hosted-model", own)
        assert asked == []
        half = PriceOverrides.create(prompt_price_per_million=1)
        assert not registry.can_price("openai", "self-hosted-model", half)
        assert asked == ["self-hosted-model"]

    def test_complete_overrides_price_unknown_model(self) -> None:
        """Prompt and completion overrides are enough for a model nobody knows."""
        registry = PricingRegistry()
        overrides = PriceOverrides.create(
            prompt_price_per_million=1, completion_price_per_million=2
        )
        assert registry.can_price("openai", "no-such-model", overrides)
        priced = registry.price_response(
            chat_completion(prompt=100, completion=50),
            provider="openai",
            model_name="no-such-model",
            overrides=overrides,
        )
        assert priced.cost == Decimal("0.0002")

    def test_extractor_before_usage(self) -> None:
        """A registered extractor's cost wins over usage pricing; None falls through."""
        registry = PricingRegistry()
        registry.register_cost_extractor("OpenAI", lambda r: 0.5 if r.id == "a" else None)
        a = chat_completion(prompt=100, completion=50, rid="a")
        b = chat_completion(prompt=2000, completion=100, cached=1500, rid="b")
        assert registry.price_response(a, provider="openai", model_name="x").cost == Decimal("0.5")
        assert registry.price_response(
            b, provider="openai", model_name="openai/gpt-4.1"
        ).cost == Decimal("0.00255")

    def test_extractor_bad_result(self) -> None:
        """An extractor returning NaN raises a PricingError naming the provider."""
        registry = PricingRegistry()
        registry.register_cost_extractor("p", lambda r: math.nan)
        with pytest.raises(PricingError, match="'p'"):
            registry.price_response({}, provider="p", model_name="m")

    def test_extractor_must_be_callable(self) -> None:
        """Registering a non-callable extractor raises."""
        with pytest.raises(PricingError, match="callable"):
            PricingRegistry().register_cost_extractor("p", 3)  # type: ignore[arg-type]


def _genai_price(response: Any, provider: str, flavor: str, model: str) -> Decimal:
    extracted = genai_prices.extract_usage(
        response.model_dump(), provider_id=provider, api_flavor=flavor
    )
    return genai_prices.calc_price(extracted.usage, model, provider_id=provider).total_price


_CROSS_CHECK = [
    ("openai", "chat", "gpt-4.1"),
    ("openai", "chat", "gpt-4.1-mini"),
    ("openai", "chat", "gpt-4.1-nano"),
    ("openai", "chat", "gpt-4o"),
    ("openai", "chat", "gpt-4o-mini"),
    ("openai", "responses", "gpt-5"),
    ("openai", "responses", "gpt-5-mini"),
    ("openai", "responses", "o3"),
    ("openai", "chat", "o4-mini"),
    ("anthropic", "default", "claude-sonnet-4-6"),
    ("anthropic", "default", "claude-opus-4-1"),
    ("anthropic", "default", "claude-haiku-4-5"),
    ("anthropic", "default", "claude-3-5-haiku-latest"),
]


class TestGenaiCrossCheck:
    """Our price equals genai-prices' own calc_price for the same response."""

    @pytest.mark.parametrize(("provider", "flavor", "model"), _CROSS_CHECK, ids=lambda v: str(v))
    def test_same_price(self, provider: str, flavor: str, model: str) -> None:
        """Usage with cache tokens prices identically through both paths."""
        if provider == "anthropic":
            response: Any = anthropic_message(inp=1234, out=567, write=3000, read=4000, model=model)
        elif flavor == "responses":
            response = responses_response(inp=9000, out=700, cached=6000, model=model)
        else:
            response = chat_completion(prompt=9000, completion=700, cached=6000, model=model)
        ours = PricingRegistry().price_response(response, provider=provider, model_name=model)
        assert ours.cost == _genai_price(response, provider, flavor, model)
        assert ours.cost > 0

    def test_long_context_tier(self) -> None:
        """A tiered model above its threshold uses the tier price, as genai-prices does."""
        response = anthropic_message(inp=250_000, out=1000, read=1000, model="claude-sonnet-4-5")
        ours = PricingRegistry().price_response(
            response, provider="anthropic", model_name="claude-sonnet-4-5"
        )
        base = PricingRegistry().require_pricing("anthropic", "claude-sonnet-4-5")
        assert ours.cost == _genai_price(response, "anthropic", "default", "claude-sonnet-4-5")
        assert ours.cost > usage_cost(normalize_usage(response, "anthropic"), base)


class TestResponseId:
    """Provider response ids are found for all three shapes."""

    def test_ids(self) -> None:
        """Chat, Responses and Anthropic ids; dicts; none."""
        assert extract_response_id(chat_completion(prompt=1, completion=1)) == "chatcmpl-1"
        assert extract_response_id(responses_response(inp=1, out=1)) == "resp_1"
        assert extract_response_id(anthropic_message(inp=1, out=1)) == "msg_1"
        assert extract_response_id({"id": "x"}) == "x"
        assert extract_response_id({"id": ""}) is None
        assert extract_response_id(object()) is None


class TestResponseLedger:
    """The registry remembers recorded response ids, bounded."""

    def test_claim_once(self) -> None:
        """The second claim of an id fails; forgetting re-allows it."""
        registry = PricingRegistry()
        assert registry.claim_response_id("openai:a")
        assert not registry.claim_response_id("openai:a")
        registry.forget_response_id("openai:a")
        assert registry.claim_response_id("openai:a")

    def test_bounded(self) -> None:
        """The oldest ids are forgotten beyond max_response_ids."""
        registry = PricingRegistry(max_response_ids=2)
        for key in ("a", "b", "c"):
            assert registry.claim_response_id(key)
        assert registry.claim_response_id("a")
        assert not registry.claim_response_id("c")

    def test_concurrent_claims(self) -> None:
        """Of many threads claiming one id, exactly one wins."""
        registry = PricingRegistry()
        wins: list[bool] = []
        threads = [
            threading.Thread(target=lambda: wins.append(registry.claim_response_id("same")))
            for _ in range(16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wins.count(True) == 1

    def test_bad_bound(self) -> None:
        """A non-positive bound is rejected."""
        with pytest.raises(PricingError, match="max_response_ids"):
            PricingRegistry(max_response_ids=0)


class TestArtFallbackTable:
    def test_tinker_models_are_priced_as_in_art(self) -> None:
        """ART's hosted-model table (prefill, sample) prices ported model names."""
        from art_ray_metrics import MetricsBuilder

        b = MetricsBuilder("train")
        usage = {"usage": {"prompt_tokens": 1_000_000, "completion_tokens": 2_000_000}}
        cost = b.add_response_cost("judge", usage, provider="openai", model_name="Qwen/Qwen3-8B")
        assert cost == 0.13 + 2 * 0.40
