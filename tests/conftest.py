"""Shared fixtures. No Ray here: the Ray cluster fixture lives in tests/integration/conftest.py."""

from __future__ import annotations

import os

import pytest

# litellm fetches its price map from the network at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from art_ray_metrics.core import active as _active

pytest_plugins = ["tests.s3server"]


@pytest.fixture(autouse=True)
def _no_active_builder() -> None:
    """Every test starts with no active builder in its context."""
    token = _active.set_active_builder(None)
    yield
    _active.reset_active_builder(token)
