"""Shared fixtures and markers. No Ray here: the cluster fixture is in tests/integration/conftest.py.

Markers are made true here rather than by hand in each file: a test that uses the shared Ray
cluster (the ``ray_cluster`` fixture, directly or through another fixture such as
``run_config``) is marked ``ray``, so ``pytest -m "not ray and not slow"`` (the quick loop)
never starts Ray. Hypothesis profiles (``ci``, ``dev``) are loaded from
``tests/hypothesis_profiles.py`` before any test module is imported.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

# litellm fetches its price map from the network at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from art_ray_metrics.core import active as _active
from tests import hypothesis_profiles

pytest_plugins = ["tests.s3server"]

#: the pytest-xdist group of every test on the shared Ray cluster
CLUSTER_GROUP = "ray-cluster"
# The tests that import the Anthropic SDK, ART or LiteLLM (directly, or by pricing a model no
# bundled table knows) carry ``xdist_group("sdk-imports")`` and import them where they use them:
# one worker pays those imports (about 2, 6 and 5 CPU-seconds, and LiteLLM's exit hooks 1-3 s
# more) instead of both.


@pytest.fixture(autouse=True)
def _no_active_builder() -> None:
    """Every test starts with no active builder in its context."""
    token = _active.set_active_builder(None)
    yield
    _active.reset_active_builder(token)


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis profile: {hypothesis_profiles.PROFILE}"


def _xdist_can_tag_groups() -> bool:
    """Whether a test id pytest-xdist rewrites (it sets ``Node._nodeid`` to ``<id>@<group>``
    for ``--dist loadgroup``) is the id this pytest reports: not on pytest 9.2, which keeps
    ids in ``Node._id``."""

    class Probe(pytest.Item):
        def runtest(self) -> None:  # pragma: no cover - never run
            pass

    probe = object.__new__(Probe)
    probe._nodeid = "probe@group"  # type: ignore[attr-defined]
    try:
        return bool(probe.nodeid == "probe@group")
    except AttributeError:
        return False


def pytest_configure(config: pytest.Config) -> None:
    dist = config.getoption("dist", "no") if config.pluginmanager.has_plugin("xdist") else "no"
    if (
        dist == "loadgroup"
        and config.getoption("numprocesses", None)
        and not _xdist_can_tag_groups()
    ):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} keeps test ids where pytest-xdist's --dist loadgroup "
            "does not write its group tags, so every xdist_group would spread over all workers "
            "(two Ray test clusters at once): install the versions the 'test' extra of "
            "pyproject.toml allows (pip install -e '.[test]'), or run with -n 0"
        )


@pytest.hookimpl(wrapper=True)  # first: before ``-m`` deselects, before xdist tags groups
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Generator[None, None, None]:
    """Mark ``ray`` every test whose fixtures include the shared cluster, and keep those tests
    on one pytest-xdist worker (``xdist_group``): one 3-node test cluster for the run, while
    the other worker runs the tests without it. Two such clusters side by side drove the
    2-core machine to a load of 25, where Ray's own start-up timeouts fail.

    Then (after every other plugin's hook), under ``--dist loadgroup``, refuse to run if
    pytest-xdist's group tags did not reach the test ids its scheduler reads
    (``<id>@<group>``): a pytest that keeps ids where xdist does not write them (9.2 with
    xdist 3.8) spreads every group over all workers without a word, two test clusters at
    once and each worker running the demo runs its tests need.
    """
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.xdist_group(CLUSTER_GROUP))
    yield
    if not getattr(config.option, "loadgroup", False):  # set in pytest-xdist workers
        return
    lost = [
        item.nodeid
        for item in items
        if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid
    ]
    if lost:
        pytest.exit(
            f"pytest-xdist's --dist loadgroup did not tag {len(lost)} grouped tests with their "
            f"group (first: {lost[0]}): pytest {pytest.__version__} keeps test ids where this "
            "pytest-xdist does not write; install the versions the 'test' extra of "
            "pyproject.toml allows, or run with -n 0",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
