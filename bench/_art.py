"""Load OpenPipe ART's own ``MetricsBuilder`` as a baseline for the benchmarks.

ART is never a dependency of ``art_ray_metrics``: this script fetches the pinned wheel with
``pip download --no-deps openpipe-art==0.5.18`` into ``bench/.cache`` (gitignored) on first use,
unpacks it, and loads only ``art/costs.py``, ``art/api_costs.py`` and ``art/metrics.py`` (they
need nothing but the standard library). The package's ``__init__`` (which imports the whole
training stack) is never run: a synthetic ``art`` package module whose ``__path__`` points at
the unpacked folder stands in for it, so ``from .api_costs import ...`` still resolves.

The synthetic package is registered in ``sys.modules`` under the name ``_art_baseline`` (not
``art``), so it can never shadow a real ``art`` installation in the same process.

Run ``python bench/_art.py`` to fetch and print where the baseline was loaded from.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import zipfile
from pathlib import Path

ART_VERSION = "0.5.18"
CACHE = Path(__file__).resolve().parent / ".cache"
PACKAGE = "_art_baseline"
MODULES = ("costs", "api_costs", "metrics")


def _wheel() -> Path:
    found = sorted(CACHE.glob(f"openpipe_art-{ART_VERSION}-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            f"openpipe-art=={ART_VERSION}",
            "-d",
            str(CACHE),
        ],
        check=True,
    )
    found = sorted(CACHE.glob(f"openpipe_art-{ART_VERSION}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download left no openpipe-art {ART_VERSION} wheel in {CACHE}")
    return found[0]


def art_dir() -> Path:
    """The unpacked ``art/`` folder of the pinned wheel (downloaded and unpacked if needed)."""
    target = CACHE / f"openpipe_art-{ART_VERSION}"
    art = target / "art"
    if all((art / f"{m}.py").exists() for m in MODULES):
        return art
    with zipfile.ZipFile(_wheel()) as zf:
        for m in MODULES:
            zf.extract(f"art/{m}.py", target)
    return art


def load_art_metrics() -> types.ModuleType:
    """Return ART's ``art.metrics`` module, loaded standalone (no package ``__init__``)."""
    if f"{PACKAGE}.metrics" in sys.modules:
        return sys.modules[f"{PACKAGE}.metrics"]
    folder = art_dir()
    pkg = types.ModuleType(PACKAGE)
    pkg.__path__ = [str(folder)]
    pkg.__package__ = PACKAGE
    sys.modules[PACKAGE] = pkg
    for name in MODULES:
        full = f"{PACKAGE}.{name}"
        spec = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"Cannot load {folder / name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(pkg, name, module)
    return sys.modules[f"{PACKAGE}.metrics"]


def art_metrics_builder() -> type:
    """ART's ``MetricsBuilder`` class."""
    cls: type = load_art_metrics().MetricsBuilder
    return cls


if __name__ == "__main__":
    mod = load_art_metrics()
    print(f"ART {ART_VERSION} MetricsBuilder loaded from {mod.__file__}")
