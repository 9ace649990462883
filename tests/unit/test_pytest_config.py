"""The test configuration in pyproject.toml works where other common pytest plugins are installed.

``filterwarnings = error`` applies at configure time too, so a plugin that warns while pytest
configures turns into an INTERNALERROR before any test runs. pytest-asyncio does: it warns that
its ``asyncio_default_fixture_loop_scope`` option is unset. The plugin is not a dependency, so a
stand-in package of the same name warns as it does; the real one behaves the same (checked by
hand with ``pip install --target``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PLUGIN = """
import warnings

import pytest


def pytest_configure(config):
    warnings.warn(pytest.PytestDeprecationWarning(
        'The configuration option "asyncio_default_fixture_loop_scope" is unset.'
    ))
"""

TESTS = """
import warnings


def test_runs():
    assert True


def test_our_own_deprecation_still_fails():
    warnings.warn("still an error", DeprecationWarning)
"""


@pytest.mark.slow  # a pytest run in a fresh interpreter
def test_a_plugin_warning_at_configure_time_is_not_an_internal_error(tmp_path: Path) -> None:
    """With the repository's pytest config, the plugin's warning is ignored; ours still fail."""
    package = tmp_path / "site" / "pytest_asyncio"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(PLUGIN)
    work = tmp_path / "work"
    work.mkdir()
    (work / "test_sample.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "CI"))}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), env.get("PYTHONPATH", "")])
    # only the plugins named here: pytest-timeout because the config sets its `timeout` option,
    # pytest-xdist because its addopts name `-n` (overridden by `-n 0`: one process is enough)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    proc = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "-p", "pytest_timeout", "-p", "xdist.plugin", "-p", "pytest_asyncio.plugin", "-n", "0",
            "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(work), str(work),
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "INTERNALERROR" not in out, out[-3000:]
    assert proc.returncode == 1, out[-3000:]
    assert "1 failed, 1 passed" in out, out[-3000:]
    assert "still an error" in out
