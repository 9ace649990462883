"""The public surface and the import boundary are locked."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import art_ray_metrics

ROOT = Path(__file__).resolve().parents[2]


class TestPublicApi:
    def test_all_is_locked(self) -> None:
        """__all__ changes only on purpose."""
        assert sorted(art_ray_metrics.__all__) == [
            "AggregatorConfig",
            "AggregatorHandle",
            "AggregatorStartTimeoutError",
            "AggregatorUnavailableError",
            "BackPressureError",
            "BarrierTimeoutError",
            "CheckpointCorruptError",
            "ClientConfig",
            "ConditionalWritesUnsupportedError",
            "ConfigError",
            "ConfigMismatchError",
            "CredentialsRequiredError",
            "FencedError",
            "FlushResult",
            "InvalidMetricError",
            "LimitExceededError",
            "MetricConflictError",
            "MetricsAggregator",
            "MetricsBuilder",
            "MetricsError",
            "PricingError",
            "StorageError",
            "WireFormatError",
            "WorkerBuilder",
            "__version__",
            "bind_context",
            "close_clients",
            "connect",
            "get_client",
            "start_aggregator",
            "track_api_cost",
        ]
        for name in art_ray_metrics.__all__:
            assert hasattr(art_ray_metrics, name)

    def test_errors_form_one_tree(self) -> None:
        """Every public error derives from MetricsError; ART's ValueErrors stay ValueErrors."""
        errors = [
            getattr(art_ray_metrics, n) for n in art_ray_metrics.__all__ if n.endswith("Error")
        ]
        assert all(issubclass(e, art_ray_metrics.MetricsError) for e in errors)
        for name in ("InvalidMetricError", "WireFormatError", "PricingError", "ConfigError"):
            assert issubclass(getattr(art_ray_metrics, name), ValueError)


class TestImportBoundary:
    @pytest.mark.slow  # a fresh interpreter each (test_layers checks the imports statically)
    @pytest.mark.parametrize(
        "module",
        [
            "art_ray_metrics",
            "art_ray_metrics.core.state",
            "art_ray_metrics.builder",
            "art_ray_metrics.core.wire",
            "art_ray_metrics.durable.checkpoint",
        ],
    )
    def test_core_imports_neither_ray_nor_wandb(self, module: str) -> None:
        """Importing the package or the pure core loads neither ray nor wandb."""
        code = (
            f"import sys, {module}\n"
            "bad = [m for m in ('ray', 'wandb', 'boto3') if m in sys.modules]\n"
            "assert not bad, bad\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

    @pytest.mark.parametrize(
        "name",
        [
            "core/keys",
            "core/rollup",
            "core/dedupe",
            "core/records",
            "core/state",
            "core/wire",
            "errors",
            "durable/checkpoint",
            "core/rewind",
        ],
    )
    def test_pure_core_third_party_imports(self, name: str) -> None:
        """Core modules import only the standard library, msgpack, numpy and each other."""
        tree = ast.parse((ROOT / "art_ray_metrics" / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        allowed = {"msgpack", "numpy", "__future__", "art_ray_metrics"}
        extra = imported - set(sys.stdlib_module_names) - allowed
        assert not extra


@pytest.mark.slow
class TestPackaging:
    def test_wheel_contents(self, tmp_path: Path) -> None:
        """The wheel ships the package with py.typed and nothing from tests/, bench/ or cluster/."""
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(tmp_path),
                str(ROOT),
            ],
            check=True,
        )
        (wheel,) = tmp_path.glob("art_ray_metrics-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        assert "art_ray_metrics/py.typed" in names
        assert "art_ray_metrics/core/state.py" in names
        assert not [n for n in names if n.startswith(("tests/", "bench/", "cluster/"))]
