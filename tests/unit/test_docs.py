"""The README documents what the code has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from art_ray_metrics import AggregatorConfig, ClientConfig
from art_ray_metrics.core.counters import DECLARED

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

    @pytest.mark.parametrize("counter", sorted({d.name for d in DECLARED if "row" in d.shows}))
    def test_every_row_counter_is_documented(self, counter: str) -> None:
        """Each telemetry number in rows (the registry's ``row`` view) is listed."""
        assert f"`{counter}`" in README


class TestReadingOrder:
    """A newcomer reads the README top down (issue 21, item 7)."""

    def test_the_demo_and_the_ray_quickstart_begin_in_the_first_80_lines(self) -> None:
        """A guard as sections move (the reorder kept both there, and put the demo's
        description next to its command)."""
        head = README.splitlines()[:80]
        assert any("art-ray-metrics demo" in line for line in head)
        assert "### On a Ray cluster" in head
        assert "```python" in head[head.index("### On a Ray cluster") :]

    def test_leaf_is_defined_where_first_used(self) -> None:
        """Was: "leaf" used throughout and never defined."""
        first = re.search(r"\bleaf|\bleaves", README)
        assert first is not None
        assert README[first.start() : first.start() + 8] == "leaves*:", README[: first.end()]

    def test_sections_in_reading_order(self) -> None:
        """What it is, the two commands, the demo, the quickstarts (in process, Ray, ART), the
        command line, the cluster; the protocol and figures are linked from docs/."""
        headings = [line for line in README.splitlines() if line.startswith("## ")]
        wanted = ["## Two commands", "## The demo", "## Quickstart", "## Command line",
                  "## Run on a cluster"]  # fmt: skip
        assert [h for h in headings if h in wanted] == wanted
        art = next(i for i, h in enumerate(headings) if "ART" in h)
        assert headings.index("## Quickstart") < art < headings.index("## Command line")
        for page in ("docs/protocol.md", "docs/benchmarks.md", "docs/design.md"):
            assert f"]({page})" in README
