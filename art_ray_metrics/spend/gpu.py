"""GPU cost: ``costs/gpu`` = wall seconds × hourly price per GPU × GPU count ÷ 3600.

Pure except :func:`detect_gpus`, which asks Ray (imported lazily, only if the caller already
imported and initialised it). Money is :class:`~decimal.Decimal`.

GPU types are Ray's ``accelerator_type`` names (``H100``, ``A100``, ``L40S``...); device names
such as ``"NVIDIA H100 80GB HBM3"`` are normalised with :func:`normalize_gpu_type`. Ray labels
both A100 variants ``A100``; the table prices a bare ``A100`` as the 80 GB part (the usual RL
training card) and knows ``A100-40G``/``A100-80G`` for configs that say which.

Unknown hardware gets no cost (``None``) and one logging warning per type per process. Prices
are an estimate of what the hardware would cost on demand, not your bill: pass ``overrides``
with your contracted rates.

>>> gpu_cost_usd(1800, "H100", 8, overrides={"H100": 2.5})
Decimal('10.0')
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Final

from art_ray_metrics.errors import ConfigError, InvalidMetricError

__all__ = [
    "GPU_HOURLY_USD",
    "detect_gpus",
    "gpu_cost_usd",
    "gpu_hourly_price",
    "gpus_cost_usd",
    "gpus_from_cluster_resources",
    "gpus_from_node_resources",
    "normalize_gpu_type",
]

_log = logging.getLogger(__name__)

# On-demand list prices in USD per GPU-hour, for one GPU of an 8-GPU instance where the provider
# sells them that way. Figures are the providers' public pricing pages as of mid-2025; they were
# written from those pages without re-checking at commit time (no network in the build), so treat
# them as estimates and override them with your own rates.
GPU_HOURLY_USD: Final[Mapping[str, Decimal]] = {
    # Lambda on-demand, 8x NVIDIA B200 SXM6 instance: $4.99/GPU/hr
    # (https://lambda.ai/pricing, mid-2025).
    "B200": Decimal("4.99"),
    # RunPod on-demand, H200 SXM 141 GB: $3.99/hr (https://www.runpod.io/pricing, mid-2025).
    "H200": Decimal("3.99"),
    # Lambda on-demand, 8x NVIDIA H100 SXM 80 GB instance: $2.99/GPU/hr
    # (https://lambda.ai/pricing, mid-2025).
    "H100": Decimal("2.99"),
    # Lambda on-demand, 8x NVIDIA A100 SXM 80 GB instance: $1.79/GPU/hr
    # (https://lambda.ai/pricing, mid-2025). Ray reports both A100 sizes as "A100".
    "A100-80G": Decimal("1.79"),
    "A100": Decimal("1.79"),
    # Lambda on-demand, 8x NVIDIA A100 SXM 40 GB instance: $1.29/GPU/hr
    # (https://lambda.ai/pricing, mid-2025).
    "A100-40G": Decimal("1.29"),
    # RunPod on-demand, L40S 48 GB: $0.86/hr (https://www.runpod.io/pricing, mid-2025).
    "L40S": Decimal("0.86"),
}

_SECONDS_PER_HOUR: Final = Decimal(3600)
_warned: set[str] = set()
_warned_lock = threading.Lock()


def normalize_gpu_type(name: str) -> str:
    """Map a Ray accelerator type or a device name onto this module's table keys.

    >>> normalize_gpu_type("NVIDIA H100 80GB HBM3")
    'H100'
    >>> normalize_gpu_type("NVIDIA A100-SXM4-40GB")
    'A100-40G'
    >>> normalize_gpu_type("l40s")
    'L40S'
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"Expected a non-empty GPU type but got {name!r}")
    tokens = [t for t in re.split(r"[\s_\-]+", name.strip().upper()) if t]
    while len(tokens) > 1 and tokens[0] in ("NVIDIA", "TESLA"):
        tokens.pop(0)
    base = tokens[0]
    if base == "A100":
        rest = tokens[1:]
        if any(t.startswith("80G") for t in rest):
            return "A100-80G"
        if any(t.startswith("40G") for t in rest):
            return "A100-40G"
        return "A100"
    if base in GPU_HOURLY_USD:
        return base
    return "-".join(tokens)


def _price(value: object, gpu_type: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ConfigError(f"Expected a GPU hourly price for {gpu_type!r} but got {value!r}")
    result = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not result.is_finite() or result < 0:
        raise ConfigError(f"Expected a GPU hourly price for {gpu_type!r} but got {value!r}")
    return result


def gpu_hourly_price(
    gpu_type: str, overrides: Mapping[str, float | Decimal] | None = None
) -> Decimal | None:
    """Hourly USD price of one GPU of ``gpu_type``: override first, then the table.

    Returns:
        The price, or ``None`` for unknown hardware (logged once per type).

    Raises:
        ConfigError: An override price is not a finite non-negative number.
    """
    key = normalize_gpu_type(gpu_type)
    if overrides:
        for name, value in overrides.items():
            if normalize_gpu_type(name) == key:
                return _price(value, name)
    price = GPU_HOURLY_USD.get(key)
    if price is None:
        with _warned_lock:
            first = key not in _warned
            _warned.add(key)
        if first:
            _log.warning(
                "No hourly price for GPU type %r (from %r); costs/gpu is not recorded for it. "
                "Pass a price override to price it. Known types: %s",
                key,
                gpu_type,
                ", ".join(sorted(GPU_HOURLY_USD)),
            )
    return price


def gpu_cost_usd(
    wall_s: float,
    gpu_type: str,
    gpu_count: int,
    overrides: Mapping[str, float | Decimal] | None = None,
) -> Decimal | None:
    """Dollar cost of ``gpu_count`` GPUs of ``gpu_type`` held for ``wall_s`` seconds.

    Args:
        wall_s: Wall-clock seconds (e.g. between two barriers of the train split).
        gpu_type: Ray accelerator type or device name.
        gpu_count: Number of GPUs.
        overrides: ``{gpu_type: usd_per_gpu_hour}`` replacing table prices.

    Returns:
        The cost, or ``None`` for unknown hardware.

    Raises:
        InvalidMetricError: ``wall_s`` or ``gpu_count`` is negative, NaN, infinite or a bool.
    """
    if isinstance(wall_s, bool) or not isinstance(wall_s, int | float | Decimal):
        raise InvalidMetricError(f"Expected non-negative wall seconds but got {wall_s!r}")
    if not math.isfinite(wall_s) or wall_s < 0:
        raise InvalidMetricError(f"Expected non-negative wall seconds but got {wall_s!r}")
    if isinstance(gpu_count, bool) or not isinstance(gpu_count, int) or gpu_count < 0:
        raise InvalidMetricError(f"Expected a non-negative integer gpu_count but got {gpu_count!r}")
    price = gpu_hourly_price(gpu_type, overrides)
    if price is None:
        return None
    seconds = Decimal(repr(wall_s)) if isinstance(wall_s, float) else Decimal(wall_s)
    return seconds * price * gpu_count / _SECONDS_PER_HOUR


def gpus_cost_usd(
    wall_s: float,
    gpus: Mapping[str, int],
    overrides: Mapping[str, float | Decimal] | None = None,
) -> Decimal | None:
    """Sum :func:`gpu_cost_usd` over ``{gpu_type: count}``; unknown types add nothing.

    Returns:
        The total, or ``None`` if no type could be priced.

    >>> gpus_cost_usd(3600, {"H100": 8, "L40S": 2})
    Decimal('25.64')
    """
    total: Decimal | None = None
    for gpu_type, count in gpus.items():
        cost = gpu_cost_usd(wall_s, gpu_type, count, overrides)
        if cost is not None:
            total = cost if total is None else total + cost
    return total


def _gpu_count(value: Any) -> int:
    try:
        count = float(value)
    except (TypeError, ValueError):
        return 0
    return int(count) if math.isfinite(count) and count > 0 else 0


def _accelerator_of(resources: Mapping[str, Any]) -> str | None:
    for key in resources:
        if key.startswith("accelerator_type:"):
            return key.partition(":")[2]
    return None


def gpus_from_node_resources(nodes: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Count GPUs per type from per-node resource dicts (Ray's ``ray.nodes()[i]["Resources"]``).

    Each node's ``GPU`` count is attributed to its ``accelerator_type:<X>`` resource; GPUs on a
    node without one are counted as ``"unknown"``.

    >>> gpus_from_node_resources([{"GPU": 8.0, "accelerator_type:H100": 1.0}, {"CPU": 4.0}])
    {'H100': 8}
    """
    counts: dict[str, int] = {}
    for resources in nodes:
        count = _gpu_count(resources.get("GPU"))
        if count:
            accel = _accelerator_of(resources) or "unknown"
            counts[accel] = counts.get(accel, 0) + count
    return counts


def gpus_from_cluster_resources(resources: Mapping[str, Any]) -> dict[str, int]:
    """Count GPUs from ``ray.cluster_resources()`` (exact for a single-type cluster).

    With several ``accelerator_type`` entries the per-type split is unknown; the total is then
    attributed to ``"mixed"`` (which has no price). Prefer :func:`gpus_from_node_resources`.

    >>> gpus_from_cluster_resources({"GPU": 16.0, "accelerator_type:A100": 2.0})
    {'A100': 16}
    """
    count = _gpu_count(resources.get("GPU"))
    if not count:
        return {}
    types = [k.partition(":")[2] for k in resources if k.startswith("accelerator_type:")]
    if len(types) == 1:
        return {types[0]: count}
    return {"mixed" if types else "unknown": count}


def detect_gpus(configured: Mapping[str, int] | None = None) -> dict[str, int]:
    """GPUs to charge for: the configured ``{gpu_type: count}``, else what Ray reports.

    Ray is consulted only if the process already imported it and ``ray.is_initialized()``;
    this function never imports or starts Ray.

    Args:
        configured: Explicit GPU counts from the config; they win over detection (a trainer may
            use only part of the cluster).

    Returns:
        ``{gpu_type: count}``, empty when nothing is configured and Ray is not running.

    Raises:
        ConfigError: A configured count is not a non-negative integer.
    """
    if configured:
        result: dict[str, int] = {}
        for gpu_type, count in configured.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ConfigError(f"Expected a GPU count for {gpu_type!r} but got {count!r}")
            if count:
                result[normalize_gpu_type(gpu_type)] = count
        return result
    ray: Any = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
        return gpus_from_node_resources(nodes)
    except Exception:  # an old or partial Ray API: fall back to the cluster totals
        return gpus_from_cluster_resources(ray.cluster_resources())
