"""``art_ray_metrics.art`` without openpipe-art: importing works, using it says what to install."""

from __future__ import annotations

import sys

import pytest

import art_ray_metrics.art as arm_art
from art_ray_metrics.integrations import art as integration


@pytest.fixture
def no_art(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import art`` fail as when openpipe-art is not installed."""
    for name in [m for m in sys.modules if m == "art" or m.startswith("art.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "art", None)
    monkeypatch.setattr(integration, "_BRIDGE_TYPE", None)


def test_the_module_imports_without_openpipe_art() -> None:
    assert arm_art.__all__ == ["ART_VERSION", "attach", "worker_context"]
    assert arm_art.ART_VERSION == "0.5.18"


@pytest.mark.usefixtures("no_art")
def test_attach_says_what_to_install() -> None:
    with pytest.raises(ImportError, match=r"pip install -e '\.\[art\]'"):
        arm_art.attach(object(), object())  # type: ignore[arg-type]


@pytest.mark.usefixtures("no_art")
def test_worker_context_says_what_to_install() -> None:
    with pytest.raises(ImportError, match=r"openpipe-art==0\.5\.18"):
        arm_art.worker_context(0)


def test_an_unrelated_art_package_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyPI's ASCII-art package is also imported as ``art``: say it is the wrong one."""
    import types

    fake = types.ModuleType("art")
    fake.metrics = types.ModuleType("art.metrics")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "art", fake)
    monkeypatch.setitem(sys.modules, "art.metrics", fake.metrics)  # type: ignore[attr-defined]
    monkeypatch.setattr(integration, "_BRIDGE_TYPE", None)
    with pytest.raises(ImportError, match="not openpipe-art"):
        arm_art.worker_context(0)
