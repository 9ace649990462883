"""An upper bound of what one API call can cost, from its request, before it is sent.

Admission under a run budget (:mod:`art_ray_metrics.spend.admission`) reserves this bound and
settles it to the real cost afterwards. The bound is::

    input_bound × max(input prices) + max_tokens × completion price      (per million tokens)

* **Input.** Byte-level BPE tokenizers (OpenAI, Anthropic, Llama 3, Qwen) never make more
  tokens than the UTF-8 bytes they read, so the input is bounded by the bytes of the request's
  text (``messages``/``input``/``prompt``/``system``/``instructions``/``tools``, read from the
  call's keyword arguments) plus :data:`MESSAGE_OVERHEAD_TOKENS` per message for the chat
  template and :data:`CALL_OVERHEAD_TOKENS` per call. Input tokens are priced at the highest of
  the model's input prices (prompt, cache write, cache read), so caching never breaks the bound.
  Parts that are not text (images, audio, files) are not bounded: each counts
  :data:`MEDIA_PART_TOKENS`, which is a guess.
* **Output.** ``max_tokens`` (Chat Completions, Anthropic, most servers),
  ``max_completion_tokens`` (OpenAI, reasoning included) or ``max_output_tokens`` (Responses).
  A request that names none is given ``default_max_tokens``: then the estimate is not a bound,
  and a call that outputs more adds its excess to the budget's overshoot (README).
* ``n`` completions multiply the output bound.

Strings are measured without copying when they are ASCII (``len``); others are encoded once.

>>> pricing = TokenPricing.create(prompt_per_million=2, completion_per_million=8)
>>> request = request_bound({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})
>>> request
RequestBound(input_tokens=30, output_tokens=100)
>>> estimate_cost(pricing, request)
Decimal('0.000860')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from art_ray_metrics.spend.base import TokenPricing

__all__ = [
    "CALL_OVERHEAD_TOKENS",
    "DEFAULT_MAX_TOKENS",
    "MEDIA_PART_TOKENS",
    "MESSAGE_OVERHEAD_TOKENS",
    "RequestBound",
    "estimate_cost",
    "max_input_price",
    "request_bound",
]

MESSAGE_OVERHEAD_TOKENS: Final = 8
"""Chat-template tokens around one message (role markers, separators); OpenAI's are 3-4."""
CALL_OVERHEAD_TOKENS: Final = 16
"""Tokens a call adds once (the assistant's priming, a system preamble)."""
MEDIA_PART_TOKENS: Final = 2_000
"""What one image/audio/file part is assumed to cost in input tokens (not a bound)."""
DEFAULT_MAX_TOKENS: Final = 4_096
"""Output tokens assumed for a request that names no ``max_tokens`` (not a bound)."""

_TEXT_FIELDS: Final = ("messages", "input", "prompt", "system", "instructions", "tools")
_OUTPUT_FIELDS: Final = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_TEXT, _OUTPUT, _COPIES = 0, 1, 2
_FIELD_ROLES: Final = {
    **dict.fromkeys(_TEXT_FIELDS, _TEXT),
    **dict.fromkeys(_OUTPUT_FIELDS, _OUTPUT),
    "n": _COPIES,
}
_MEDIA_TYPES: Final = ("image", "input_image", "audio", "input_audio", "file", "input_file")


@dataclass(frozen=True, slots=True)
class RequestBound:
    """Token bounds of one request.

    Attributes:
        input_tokens: At most this many input tokens (text measured; media guessed).
        output_tokens: At most this many output tokens (``max_tokens`` × ``n``, or the
            default when the request names none).
    """

    input_tokens: int
    output_tokens: int


def _measure(value: Any, acc: list[int], depth: int = 0) -> None:
    """Add a request field's ``[bytes, messages, media parts]`` to ``acc`` (strings, lists,
    dicts, SDK objects). Plain types are tested by identity first: ABC checks are slow."""
    kind = type(value)
    if kind is str:
        acc[0] += len(value) if value.isascii() else len(value.encode("utf-8"))
    elif kind is list or kind is tuple:
        if depth < 8:
            for item in value:
                if type(item) is str:
                    acc[0] += len(item) if item.isascii() else len(item.encode("utf-8"))
                else:
                    _measure(item, acc, depth + 1)
    elif kind is dict or isinstance(value, Mapping):
        part = value.get("type")
        if isinstance(part, str) and part.startswith(_MEDIA_TYPES):
            acc[2] += 1
            return
        if "role" in value:
            acc[1] += 1
        if depth < 8:
            for item in value.values():
                if type(item) is str:
                    acc[0] += len(item) if item.isascii() else len(item.encode("utf-8"))
                else:
                    _measure(item, acc, depth + 1)
    elif value is None or kind is bool or kind is int or kind is float:
        return
    else:
        dump = getattr(value, "model_dump", None)  # an SDK pydantic object passed as a field
        if callable(dump):
            _measure(dump(), acc, depth + 1)
            return
        try:
            acc[0] += len(json.dumps(value, default=str).encode("utf-8"))
        except (TypeError, ValueError):
            return


def request_bound(
    kwargs: Mapping[str, Any], *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> RequestBound:
    """Bound the tokens of a request given as the API call's keyword arguments.

    >>> request_bound({"input": "héllo", "max_output_tokens": 10, "n": 2})
    RequestBound(input_tokens=22, output_tokens=20)
    """
    return RequestBound(*token_bounds(kwargs, default_max_tokens))


def token_bounds(kwargs: Mapping[str, Any], default_max_tokens: int) -> tuple[int, int]:
    """:func:`request_bound` as ``(input_tokens, output_tokens)``: the admission's hot path.

    It reads the request's own fields (not a fixed list of lookups) and measures the common
    shape, a list of plain messages whose values are strings, inline; anything else goes through
    :func:`_measure`, which defines the bound (a test checks the two agree)."""
    size = messages = 0
    acc = [0, 0, 0]  # what _measure adds: [bytes, messages, media parts]
    output = -1
    copies = 1
    for name, value in kwargs.items():
        role = _FIELD_ROLES.get(name)
        if role is None or value is None:
            continue
        if role == _TEXT:
            if type(value) is not list:
                _measure(value, acc)
                continue
            for item in value:
                if type(item) is dict and "type" not in item:  # a plain message
                    if "role" in item:
                        messages += 1
                    for field in item.values():
                        if type(field) is str:
                            size += len(field) if field.isascii() else len(field.encode("utf-8"))
                        elif field is not None:
                            _measure(field, acc, 2)
                elif type(item) is str:
                    size += len(item) if item.isascii() else len(item.encode("utf-8"))
                else:
                    _measure(item, acc, 1)
        elif isinstance(value, int) and not isinstance(value, bool):
            if role == _OUTPUT:
                if value > output:
                    output = value
            elif value > 1:  # n
                copies = value
    size += acc[0]
    messages += acc[1]
    media = acc[2]
    input_tokens = (
        size + messages * MESSAGE_OVERHEAD_TOKENS + media * MEDIA_PART_TOKENS + CALL_OVERHEAD_TOKENS
    )
    return input_tokens, (default_max_tokens if output < 0 else output) * copies


def max_input_price(pricing: TokenPricing) -> Decimal:
    """The highest price an input token can be billed at (prompt, cache write, cache read)."""
    price = pricing.prompt_per_million
    for other in (
        pricing.cached_prompt_per_million,
        pricing.cache_creation_per_million,
        pricing.cache_read_per_million,
    ):
        if other is not None and other > price:
            price = other
    return price


def estimate_cost(pricing: TokenPricing, request: RequestBound) -> Decimal:
    """The dollar bound of a request at ``pricing`` (exact)."""
    return bound_cost(estimate_prices(pricing), request.input_tokens, request.output_tokens)


def estimate_prices(pricing: TokenPricing) -> tuple[Decimal, Decimal]:
    """The dollars per input and per output token an estimate charges at ``pricing`` (the
    per-million prices moved six places: exact)."""
    return max_input_price(pricing).scaleb(-6), pricing.completion_per_million.scaleb(-6)


def bound_cost(prices: tuple[Decimal, Decimal], input_tokens: int, output_tokens: int) -> Decimal:
    """The dollar bound of ``input_tokens`` and ``output_tokens`` at :func:`estimate_prices`
    (exact: integers times decimals)."""
    return input_tokens * prices[0] + output_tokens * prices[1]
