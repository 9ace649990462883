"""The ART adapter's fate of each trajectory group (``group_fates``), from openpipe-art's own
``TrajectoryGroup`` (installed with the ``[art]`` extra, which CI installs)."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from art_ray_metrics.integrations.art import group_fates

# found, not imported: ART takes about 6 CPU-seconds to import, which every pytest-xdist worker
# would pay while collecting; the tests take the fixture, on the worker that runs every test
# importing ART, LiteLLM or the Anthropic SDK (tests/conftest.py)
pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("art") is None, reason="openpipe-art is not installed"
    ),
    pytest.mark.xdist_group("sdk-imports"),
]


@pytest.fixture(scope="module")
def art() -> Any:
    """The art module."""
    import art

    return art


def _t(art: Any, reward: float, scenario: str | None = None) -> Any:
    meta = {} if scenario is None else {"scenario_id": scenario}
    return art.Trajectory(
        messages_and_choices=[{"role": "user", "content": "q"}], reward=reward, metadata=meta
    )


def test_fates_follow_rewards_and_exceptions(art: Any) -> None:
    groups = [
        art.TrajectoryGroup([_t(art, 0.0, "a"), _t(art, 1.0, "a")]),
        art.TrajectoryGroup([_t(art, 0.5, "b"), _t(art, 0.5, "b")]),
        art.TrajectoryGroup([_t(art, 0.5, "c")]),  # one trajectory: nothing to compare
        art.TrajectoryGroup([_t(art, 0.0, "d"), _t(art, 1.0)], exceptions=[RuntimeError("x")]),
        art.TrajectoryGroup([_t(art, 0.0), _t(art, 1.0)]),  # no id: left out
        art.TrajectoryGroup([_t(art, 0.0), _t(art, 1.0)], metadata={"scenario_id": 7}),
    ]
    assert group_fates(groups) == {
        "a": "trained",
        "b": "zero_variance",
        "c": "zero_variance",
        "d": "errored",
        "7": "trained",
    }


def test_a_trained_group_wins_over_another_of_the_same_id(art: Any) -> None:
    groups = [
        art.TrajectoryGroup([_t(art, 0.5, "a"), _t(art, 0.5, "a")]),
        art.TrajectoryGroup([_t(art, 0.0, "a"), _t(art, 1.0, "a")]),
    ]
    assert group_fates(groups) == {"a": "trained"}
