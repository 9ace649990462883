"""Tinker: list prices of hosted open-weight models (prefill and sampling per 1M tokens).

These are the figures OpenPipe ART 0.5.18 falls back to (``art/costs.py``), so ported code
pricing these names gets ART's numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Final

from art_ray_metrics.spend.base import Provider, TokenPricing

__all__ = ["PRICES", "PROVIDER"]

_PREFILL_SAMPLE: Final[Mapping[str, tuple[str, str]]] = {
    "Qwen/Qwen3.6-35B-A3B": ("0.36", "0.89"),
    "Qwen/Qwen3.6-27B": ("1.24", "3.73"),
    "Qwen/Qwen3.5-4B": ("0.22", "0.67"),
    "Qwen/Qwen3.5-27B": ("1.24", "3.73"),
    "Qwen/Qwen3.5-35B-A3B": ("0.36", "0.89"),
    "Qwen/Qwen3.5-397B-A17B": ("2", "5"),
    "Qwen/Qwen3.5-397B-A17B:peft:262144": ("4", "10"),
    "Qwen/Qwen3-4B-Instruct-2507": ("0.07", "0.22"),
    "Qwen/Qwen3-8B": ("0.13", "0.4"),
    "Qwen/Qwen3-8B-Base": ("0.13", "0.4"),
    "Qwen/Qwen3-30B-A3B": ("0.12", "0.3"),
    "Qwen/Qwen3-30B-A3B-Base": ("0.12", "0.3"),
    "Qwen/Qwen3-30B-A3B-Instruct-2507": ("0.12", "0.3"),
    "Qwen/Qwen3-32B": ("0.49", "1.47"),
    "Qwen/Qwen3-235B-A22B-Instruct-2507": ("0.68", "1.7"),
    "Qwen/Qwen3-VL-30B-A3B-Instruct": ("0.18", "0.44"),
    "Qwen/Qwen3-VL-235B-A22B-Instruct": ("1.02", "2.56"),
    "meta-llama/Llama-3.2-1B": ("0.03", "0.09"),
    "meta-llama/Llama-3.2-3B": ("0.06", "0.18"),
    "meta-llama/Llama-3.1-8B": ("0.13", "0.4"),
    "meta-llama/Llama-3.1-8B-Instruct": ("0.13", "0.4"),
    "meta-llama/Llama-3.1-70B": ("1.05", "3.16"),
    "meta-llama/Llama-3.3-70B-Instruct": ("1.05", "3.16"),
    "deepseek-ai/DeepSeek-V3.1": ("1.13", "2.81"),
    "deepseek-ai/DeepSeek-V3.1-Base": ("1.13", "2.81"),
    "openai/gpt-oss-120b": ("0.18", "0.44"),
    "openai/gpt-oss-120b:peft:131072": ("0.63", "1.54"),
    "openai/gpt-oss-20b": ("0.12", "0.3"),
    "moonshotai/Kimi-K2-Thinking": ("0.98", "2.44"),
    "moonshotai/Kimi-K2.5": ("1.47", "3.66"),
    "moonshotai/Kimi-K2.5:peft:131072": ("5.15", "12.81"),
    "moonshotai/Kimi-K2.6": ("1.47", "3.66"),
    "moonshotai/Kimi-K2.6:peft:131072": ("5.15", "12.81"),
    "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": ("0.13", "0.33"),
    "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16": ("0.38", "0.96"),
    "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16:peft:262144": ("0.76", "1.92"),
}
PRICES: Final[Mapping[str, TokenPricing]] = {
    name: TokenPricing.create(
        prompt_per_million=Decimal(prefill), completion_per_million=Decimal(sample)
    )
    for name, (prefill, sample) in _PREFILL_SAMPLE.items()
}

PROVIDER: Final = Provider(name="tinker", prices=PRICES)
