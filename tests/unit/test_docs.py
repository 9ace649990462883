"""The README documents what the code has."""

from __future__ import annotations

from pathlib import Path

import pytest

from art_ray_metrics import AggregatorConfig, ClientConfig
from art_ray_metrics.core.state import COUNTER_NAMES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


class TestReadme:
    @pytest.mark.parametrize("field", sorted(AggregatorConfig.model_fields))
    def test_every_aggregator_field_is_documented(self, field: str) -> None:
        """Each AggregatorConfig field appears in the configuration table."""
        assert f"`{field}`" in README

    @pytest.mark.parametrize("field", sorted(ClientConfig.model_fields))
    def test_every_client_field_is_documented(self, field: str) -> None:
        """Each ClientConfig field is named in the README."""
        assert f"`{field}`" in README or field in ("name", "namespace")

    @pytest.mark.parametrize("counter", COUNTER_NAMES)
    def test_every_row_counter_is_documented(self, counter: str) -> None:
        """Each telemetry counter in rows is listed."""
        assert f"`{counter}`" in README
