"""Shared fixtures and markers. No Ray here: the cluster fixture is in tests/integration/conftest.py.

Markers are made true here rather than by hand in each file: a test that uses the shared Ray
cluster (the ``ray_cluster`` fixture, directly or through another fixture such as
``run_config``) is marked ``ray``, so ``pytest -m "not ray and not slow"`` (the quick loop)
never starts Ray. Hypothesis profiles (``ci``, ``dev``) are loaded from
``tests/hypothesis_profiles.py`` before any test module is imported.
"""

from __future__ import annotations

import os

import pytest

# litellm fetches its price map from the network at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from art_ray_metrics.core import active as _active
from tests import hypothesis_profiles

pytest_plugins = ["tests.s3server"]

#: the pytest-xdist group of every test on the shared Ray cluster
CLUSTER_GROUP = "ray-cluster"


@pytest.fixture(autouse=True)
def _no_active_builder() -> None:
    """Every test starts with no active builder in its context."""
    token = _active.set_active_builder(None)
    yield
    _active.reset_active_builder(token)


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis profile: {hypothesis_profiles.PROFILE}"


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker, before xdist groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``ray`` every test whose fixtures include the shared cluster, and keep those tests
    on one pytest-xdist worker (``xdist_group``): one 3-node test cluster for the run, while
    the other worker runs the tests without it. Two such clusters side by side drove the
    2-core machine to a load of 25, where Ray's own start-up timeouts fail."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.xdist_group(CLUSTER_GROUP))
