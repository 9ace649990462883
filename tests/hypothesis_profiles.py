"""Hypothesis profiles for the property and stateful tests.

- ``ci``: the example counts written in the tests (hypothesis's default of 100 for a test that
  names none). Chosen when the ``CI`` environment variable is set (``.ci/run`` sets it).
- ``dev``: a quarter of those counts (at least 5), for the edit-and-rerun loop. The default when
  ``CI`` is unset.

``HYPOTHESIS_PROFILE=ci`` or ``=dev`` picks one explicitly. Both profiles have no deadline: the
test machine is shared, and a deadline there fails on load, not on code (the tests with counts
of their own already set ``deadline=None``). Tests write their counts as ``examples(n)`` so that
the profile scales them.
"""

from __future__ import annotations

import os

from hypothesis import settings

#: hypothesis's own default ``max_examples``; the counts in the tests are meant at this level
FULL = 100

# hypothesis's own ``ci`` profile (no deadline, no example database, failures print a blob to
# reproduce them) but random: CI is where the full counts run, a fixed seed would repeat them
settings.register_profile(
    "ci", parent=settings.get_profile("ci"), max_examples=FULL, derandomize=False
)
settings.register_profile("dev", max_examples=FULL // 4, deadline=None)


def _chosen() -> str:
    explicit = os.environ.get("HYPOTHESIS_PROFILE", "").strip()
    if explicit:
        return explicit
    ci = os.environ.get("CI", "").strip().lower()
    return "ci" if ci not in ("", "0", "false", "no") else "dev"


PROFILE = _chosen()
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """``n`` under the ``ci`` profile, scaled down with the loaded profile (at least 5)."""
    return max(5, n * settings().max_examples // FULL)
