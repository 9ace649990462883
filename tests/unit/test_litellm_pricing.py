"""LiteLLM's price map as the last price source, offline: same numbers as LiteLLM (and ART)."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import sys
from decimal import Decimal
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from art_ray_metrics.errors import PricingError
from art_ray_metrics.spend import pricing as pricing_module
from art_ray_metrics.spend.base import Provider
from art_ray_metrics.spend.pricing import PricingRegistry, genai_token_pricing
from art_ray_metrics.spend.providers import PRICE_SOURCES, PROVIDERS
from art_ray_metrics.spend.providers import litellm as litellm_provider
from art_ray_metrics.spend.track import UnpricedModelWarning, track_api_cost

# tests/conftest.py sets this before anything imports litellm: no network for the price map.
assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
# found, not imported: importing LiteLLM takes about 5 CPU-seconds, which every pytest-xdist
# worker would pay while collecting; the tests that call it take the fixture below, on the worker
# that runs every test importing ART, LiteLLM or the Anthropic SDK (tests/conftest.py)
pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("litellm") is None, reason="litellm is not installed"
    ),
    pytest.mark.xdist_group("sdk-imports"),
]


@pytest.fixture(scope="module")
def litellm() -> Any:
    """The litellm module."""
    import litellm

    return litellm


# Names genai-prices does not know, from several LiteLLM providers (prefixes resolved by LiteLLM).
LITELLM_ONLY = [
    "groq/llama-3.1-8b-instant",
    "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "mistral/mistral-small-latest",
    "deepseek/deepseek-chat",
    "bedrock/anthropic.claude-3-haiku-20240307-v1:0",
    "xai/grok-3-mini",
    "openrouter/anthropic/claude-3.5-sonnet",
    "azure/gpt-4o-mini",
]


def chat(prompt: int, completion: int, cached: int, model: str) -> ChatCompletion:
    return ChatCompletion.model_validate(
        {
            "id": f"chatcmpl-{model}",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }
    )


def test_litellm_is_the_last_price_source() -> None:
    """Registered → built-in → genai-prices → LiteLLM: LiteLLM's source is consulted last."""
    assert PROVIDERS[-1] is litellm_provider.PROVIDER
    assert PRICE_SOURCES[-1] is litellm_provider.PROVIDER.price_source
    assert isinstance(litellm_provider.PROVIDER, Provider)


@pytest.mark.parametrize("model", LITELLM_ONLY)
def test_same_cost_as_litellm_cost_per_token(litellm: Any, model: str) -> None:
    """A model only LiteLLM prices costs what LiteLLM's own cost_per_token says, exactly in Decimal."""
    assert genai_token_pricing("openai", model) is None  # so the price comes from LiteLLM
    info = litellm.get_model_info(model)
    has_cache_price = info.get("cache_read_input_token_cost") is not None
    # LiteLLM prices cached tokens at 0 when the map has no cache price; ART and we charge P.
    cached = 200 if has_cache_price else 0
    ours = PricingRegistry().price_response(
        chat(1234, 567, cached, model), provider="openai", model_name=model
    )
    prompt_cost, completion_cost = litellm.cost_per_token(
        model=model, prompt_tokens=1234, completion_tokens=567, cache_read_input_tokens=cached
    )
    assert ours.method == "usage"
    assert math.isclose(float(ours.cost), prompt_cost + completion_cost, rel_tol=1e-12)
    # Exact: the map's literals as decimals, per token, no binary-float residue.
    p = Decimal(str(info["input_cost_per_token"]))
    o = Decimal(str(info["output_cost_per_token"]))
    c = Decimal(str(info["cache_read_input_token_cost"])) if has_cache_price else p
    assert ours.cost == (1234 - cached) * p + cached * c + 567 * o


def test_same_cost_as_litellm_completion_cost(litellm: Any) -> None:
    """completion_cost on LiteLLM's own response object agrees too."""
    model = "groq/llama-3.1-8b-instant"
    response = litellm.ModelResponse(
        id="chatcmpl-x",
        model=model,
        usage=litellm.Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500),
    )
    theirs = litellm.completion_cost(completion_response=response, model=model)
    ours = PricingRegistry().price_response(response, provider="groq", model_name=model)
    assert ours.cost == Decimal("0.00009")  # 1000 × $0.05/M + 500 × $0.08/M
    assert math.isclose(float(ours.cost), theirs, rel_tol=1e-12)


def test_per_million_prices_are_the_map_literals(litellm: Any) -> None:
    """2.5e-06 per token becomes exactly 2.5 per million (shortest repr, not the float's binary)."""
    priced = litellm_provider.litellm_token_pricing("deepseek/deepseek-chat")
    assert priced is not None
    info = litellm.get_model_info("deepseek/deepseek-chat")
    assert priced.prompt_per_million == Decimal(repr(info["input_cost_per_token"])) * 1_000_000
    assert priced.cache_read_per_million == priced.cached_prompt_per_million


def test_genai_prices_win_when_both_know_the_model() -> None:
    """Where both sources know a model, genai-prices (consulted first) gives the price."""
    model = "o1-mini-2024-09-12"  # genai-prices: $1.10/M input; LiteLLM's map: $3/M
    via_litellm = litellm_provider.litellm_token_pricing(model)
    via_genai = genai_token_pricing("openai", model)
    assert via_litellm is not None
    assert via_genai is not None
    assert via_litellm.prompt_per_million != via_genai.prompt_per_million
    assert PricingRegistry().resolve_pricing("openai", model) == via_genai


def test_decorator_passes_pre_call_check_for_a_litellm_model() -> None:
    """Fail-before-pay counts LiteLLM's map: no warning at decoration, the call is priced."""
    import warnings

    from art_ray_metrics.builder import MetricsBuilder

    model = "mistral/mistral-small-latest"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnpricedModelWarning)

        @track_api_cost(source="judge", provider="openai", model_name=model)
        def call() -> ChatCompletion:
            return chat(1_000_000, 0, 0, model)

    builder = MetricsBuilder(cost_context="train")
    with builder.activate_context():
        call()
    row = asyncio.run(builder.flush())
    assert row["costs/train/judge"] == 0.1  # 1M prompt tokens × $0.10/M


def test_unknown_everywhere_fails_before_paying() -> None:
    """A model no source prices raises PricingError before the wrapped function runs."""
    from art_ray_metrics.builder import MetricsBuilder

    calls = []
    with pytest.warns(UnpricedModelWarning):

        @track_api_cost(source="judge", provider="openai", model_name="no-such-model-anywhere")
        def call() -> None:
            calls.append(1)

    with (
        MetricsBuilder(cost_context="train").activate_context(),
        pytest.raises(PricingError, match="no-such-model-anywhere"),
    ):
        call()
    assert calls == []


def test_without_litellm_the_map_is_not_consulted(monkeypatch: pytest.MonkeyPatch) -> None:
    """litellm not importable: a model only it knows is unpriced, with the usual error."""
    monkeypatch.setitem(sys.modules, "litellm", None)  # makes `import litellm` fail
    monkeypatch.setattr(litellm_provider, "_cache", {})
    with pytest.raises(PricingError, match="No pricing configured"):
        PricingRegistry().require_pricing("openai", "groq/llama-3.1-8b-instant")
    assert (
        pricing_module.PricingRegistry().can_price("openai", "groq/llama-3.1-8b-instant") is False
    )


def test_network_names_are_not_looked_up(litellm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names whose LiteLLM lookup goes to the network are never passed to it."""
    seen: list[str] = []
    monkeypatch.setattr(litellm_provider, "_cache", {})
    monkeypatch.setattr(litellm, "get_model_info", lambda name: seen.append(name))
    for name in ("huggingface/x/y", "ollama/llama3", "github_copilot/gpt-4o", "chatgpt/gpt-4o"):
        assert litellm_provider.litellm_token_pricing(name) is None
    assert seen == []
