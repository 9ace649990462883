"""The aggregator's GPU meter: ``costs/gpu`` of each train barrier, from the last one.

GPU time is charged from the last train barrier, on the wall clock, and the time it is charged
from is kept in the checkpointed metadata (``AggregatorMeta.gpu_since``), so the time between a
barrier and a restart is charged once, at the next barrier. Prices and detection are
:mod:`art_ray_metrics.spend.gpu`'s; the GPUs are resolved once, at the first charge (the
cluster's GPUs do not change per step).
"""

from __future__ import annotations

import logging

from art_ray_metrics.core.meta import AggregatorMeta
from art_ray_metrics.spend.gpu import detect_gpus, gpus_cost_usd

__all__ = ["GpuMeter"]

log = logging.getLogger(__name__)


class GpuMeter:
    """Charges the configured (or detected) GPUs per train barrier.

    Args:
        meta: The checkpointed metadata holding the time charged from (set to ``now`` when
            unset: a first start).
        now: The wall clock now (epoch seconds).
        gpu_type: A GPU type, ``"auto"`` (detect from Ray) or None (no GPU cost).
        gpu_count: How many; None: as many as detected.
        hourly_usd: The price per GPU-hour, overriding the table's.
    """

    def __init__(
        self,
        meta: AggregatorMeta,
        now: float,
        *,
        gpu_type: str | None,
        gpu_count: int | None,
        hourly_usd: float | None,
    ) -> None:
        self.meta = meta
        self.gpu_type = gpu_type
        self.gpu_count = gpu_count
        self.hourly_usd = hourly_usd
        self.gpus: dict[str, int] | None = None  # None: not resolved yet
        if meta.gpu_since is None:
            meta.gpu_since = now

    @property
    def since(self) -> float:
        """Wall-clock time (epoch seconds) GPU cost is next charged from; in the checkpoint."""
        since = self.meta.gpu_since
        assert since is not None  # set at construction, never unset
        return float(since)

    @since.setter
    def since(self, when: float) -> None:
        self.meta.gpu_since = float(when)

    def charge(self, now: float) -> float | None:
        """``costs/gpu`` from :attr:`since` to ``now`` (the caller moves :attr:`since` once the
        row that holds it is committed); None when there are no GPUs to charge."""
        return self.cost(max(0.0, now - self.since))

    def cost(self, wall_s: float) -> float | None:
        """``costs/gpu`` for ``wall_s`` seconds of the configured (or detected) GPUs."""
        if not self.gpu_type:
            return None
        gpus = self._resolve(self.gpu_type)
        if not gpus:
            return None
        price = self.hourly_usd
        overrides = {t: price for t in gpus} if price is not None else None
        cost = gpus_cost_usd(wall_s, gpus, overrides)
        return float(cost) if cost is not None else None

    def _resolve(self, gpu_type: str) -> dict[str, int]:
        if self.gpus is None:
            detected = detect_gpus() if self.gpu_count is None else {}
            if gpu_type == "auto":
                self.gpus = detected
            else:
                count = self.gpu_count if self.gpu_count is not None else sum(detected.values())
                self.gpus = {gpu_type: count} if count else {}
            if not self.gpus:
                log.warning("art_ray_metrics: gpu_type=%r but no GPUs to charge", gpu_type)
        return self.gpus
