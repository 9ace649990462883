"""Tests of art_ray_metrics.spend.gpu: price table, cost formula, GPU detection (no Ray needed)."""

from __future__ import annotations

import logging
import math
import sys
import types
from decimal import Decimal
from typing import Any

import pytest

from art_ray_metrics.errors import ConfigError, InvalidMetricError
from art_ray_metrics.spend.gpu import (
    GPU_HOURLY_USD,
    detect_gpus,
    gpu_cost_usd,
    gpu_hourly_price,
    gpus_cost_usd,
    gpus_from_cluster_resources,
    gpus_from_node_resources,
    normalize_gpu_type,
)


class TestTable:
    """The table covers the required hardware with positive Decimal prices."""

    @pytest.mark.parametrize(
        "gpu", ["H100", "H200", "A100", "A100-40G", "A100-80G", "L40S", "B200"]
    )
    def test_required_types(self, gpu: str) -> None:
        """Each required type has a positive Decimal hourly price."""
        price = GPU_HOURLY_USD[gpu]
        assert isinstance(price, Decimal)
        assert price > 0

    def test_ordering_is_plausible(self) -> None:
        """Newer, larger parts cost more per hour than older ones."""
        t = GPU_HOURLY_USD
        assert t["B200"] > t["H200"] > t["H100"] > t["A100-80G"] > t["A100-40G"] > t["L40S"]


class TestCost:
    """costs/gpu = wall_s × hourly × count ÷ 3600, exact."""

    def test_formula(self) -> None:
        """Half an hour on 8 H100s at the table price."""
        assert gpu_cost_usd(1800, "H100", 8) == GPU_HOURLY_USD["H100"] * 4

    def test_float_seconds_exact(self) -> None:
        """Float seconds go through repr: 0.1 s is exactly a tenth."""
        assert gpu_cost_usd(0.1, "H100", 1, overrides={"H100": 36}) == Decimal("0.001")

    def test_override(self) -> None:
        """An override (matched after normalisation) replaces the table price."""
        assert gpu_cost_usd(3600, "NVIDIA H100 80GB HBM3", 2, overrides={"h100": 1.5}) == 3

    def test_override_prices_unknown(self) -> None:
        """An override prices hardware the table lacks."""
        assert gpu_cost_usd(
            3600, "RTX-PRO-6000", 1, overrides={"RTX-PRO-6000": Decimal("1.1")}
        ) == (Decimal("1.1"))

    def test_zero_gpus(self) -> None:
        """No GPUs cost nothing."""
        assert gpu_cost_usd(100, "B200", 0) == 0

    def test_mixed_cluster(self) -> None:
        """Costs of several types add; unknown types add nothing."""
        total = gpus_cost_usd(3600, {"H100": 8, "L40S": 2, "Mystery-X1": 4})
        assert total == GPU_HOURLY_USD["H100"] * 8 + GPU_HOURLY_USD["L40S"] * 2

    @pytest.mark.parametrize(
        ("wall_s", "count"),
        [(-1, 1), (math.nan, 1), (math.inf, 1), (True, 1), (1, -1), (1, 1.5), (1, True)],
        ids=["neg-wall", "nan", "inf", "bool-wall", "neg-count", "float-count", "bool-count"],
    )
    def test_bad_input(self, wall_s: Any, count: Any) -> None:
        """Bad wall time or count raises InvalidMetricError."""
        with pytest.raises(InvalidMetricError, match="Expected"):
            gpu_cost_usd(wall_s, "H100", count)

    @pytest.mark.parametrize("price", [-1, math.nan, True, "2"], ids=["neg", "nan", "bool", "str"])
    def test_bad_override(self, price: Any) -> None:
        """A bad override price is a ConfigError naming the type."""
        with pytest.raises(ConfigError, match="'H100'"):
            gpu_hourly_price("H100", {"H100": price})


class TestUnknownHardware:
    """Unknown hardware gives no cost and one warning per type."""

    def test_none_and_one_warning(self, caplog: pytest.LogCaptureFixture) -> None:
        """Three calls for one unknown type log once; another unknown type logs again."""
        with caplog.at_level(logging.WARNING, logger="art_ray_metrics.spend.gpu"):
            for _ in range(3):
                assert gpu_cost_usd(60, "Quantum-QPU-7", 1) is None
            assert gpu_cost_usd(60, "Quantum-QPU-8", 1) is None
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 2
        assert "QUANTUM-QPU-7" in messages[0]


class TestNormalize:
    """Device names and Ray accelerator types map onto table keys."""

    @pytest.mark.parametrize(
        ("name", "key"),
        [
            ("H100", "H100"),
            ("NVIDIA H100 80GB HBM3", "H100"),
            ("NVIDIA H200", "H200"),
            ("NVIDIA B200", "B200"),
            ("A100", "A100"),
            ("NVIDIA A100-SXM4-80GB", "A100-80G"),
            ("A100-40G", "A100-40G"),
            ("nvidia l40s", "L40S"),
            ("RTX PRO 6000", "RTX-PRO-6000"),
        ],
    )
    def test_names(self, name: str, key: str) -> None:
        """Known spellings normalise to the table key."""
        assert normalize_gpu_type(name) == key

    def test_empty(self) -> None:
        """An empty name is a ConfigError."""
        with pytest.raises(ConfigError, match="GPU type"):
            normalize_gpu_type(" ")


class TestDetection:
    """GPU counts come from the config, else from Ray's resources."""

    def test_node_resources(self) -> None:
        """Per-node GPU counts are attributed to each node's accelerator type."""
        nodes = [
            {"GPU": 8.0, "CPU": 96.0, "accelerator_type:H100": 1.0},
            {"GPU": 8.0, "accelerator_type:H100": 1.0},
            {"GPU": 4.0, "accelerator_type:L40S": 1.0},
            {"GPU": 2.0},
            {"CPU": 4.0},
        ]
        assert gpus_from_node_resources(nodes) == {"H100": 16, "L40S": 4, "unknown": 2}

    def test_cluster_resources(self) -> None:
        """Cluster totals work for one type and say 'mixed' for several."""
        assert gpus_from_cluster_resources({"GPU": 8.0, "accelerator_type:B200": 1.0}) == {
            "B200": 8
        }
        assert gpus_from_cluster_resources(
            {"GPU": 8.0, "accelerator_type:B200": 1.0, "accelerator_type:H100": 1.0}
        ) == {"mixed": 8}
        assert gpus_from_cluster_resources({"CPU": 2.0}) == {}

    def test_config_wins(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Configured counts are used (normalised) even when Ray reports others."""
        monkeypatch.setitem(sys.modules, "ray", _fake_ray([{"GPU": 8.0}]))
        assert detect_gpus({"NVIDIA H100 80GB HBM3": 4, "L40S": 0}) == {"H100": 4}

    def test_bad_config(self) -> None:
        """A negative configured count is a ConfigError."""
        with pytest.raises(ConfigError, match="'H100'"):
            detect_gpus({"H100": -1})

    def test_no_ray(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without Ray imported, nothing is detected and Ray is not imported."""
        monkeypatch.delitem(sys.modules, "ray", raising=False)
        assert detect_gpus() == {}
        assert "ray" not in sys.modules

    def test_ray_not_initialised(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An imported but uninitialised Ray is not asked."""
        monkeypatch.setitem(sys.modules, "ray", _fake_ray(None))
        assert detect_gpus() == {}

    def test_from_ray_nodes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An initialised Ray is asked for its alive nodes."""
        nodes = [{"GPU": 8.0, "accelerator_type:H200": 1.0}]
        monkeypatch.setitem(sys.modules, "ray", _fake_ray(nodes))
        assert detect_gpus() == {"H200": 8}


def _fake_ray(nodes: list[dict[str, float]] | None) -> Any:
    """A stand-in exposing the three Ray calls detect_gpus uses (unit tests run without Ray)."""
    listed: list[dict[str, Any]] = [{"Alive": True, "Resources": r} for r in (nodes or [])]
    listed.append({"Alive": False, "Resources": {"GPU": 99.0}})
    module: Any = types.ModuleType("ray")
    module.is_initialized = lambda: nodes is not None
    module.nodes = lambda: listed
    module.cluster_resources = dict
    return module
