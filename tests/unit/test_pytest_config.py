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


def run_with_our_config(
    work: Path, *options: str, timeout: float, **env_vars: str
) -> subprocess.CompletedProcess[str]:
    """pytest on ``work`` in a fresh interpreter with this repository's config and only the
    plugins named: pytest-timeout because the config sets its options, pytest-xdist because
    its addopts name ``-n``; then ``options``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "CI"))}
    env.update(env_vars, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    return subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "-p", "pytest_timeout", "-p", "xdist.plugin", *options,
            "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(work), str(work),
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )  # fmt: skip


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
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    # `-n 0`: one process is enough here
    proc = run_with_our_config(
        work, "-p", "pytest_asyncio.plugin", "-n", "0", timeout=120, PYTHONPATH=path
    )
    out = proc.stdout + proc.stderr
    assert "INTERNALERROR" not in out, out[-3000:]
    assert proc.returncode == 1, out[-3000:]
    assert "1 failed, 1 passed" in out, out[-3000:]
    assert "still an error" in out


STUCK = """
import time

import pytest


@pytest.mark.timeout(4)
def test_stuck_in_a_call():
    time.sleep(60)


def test_after_it():
    assert True
"""


@pytest.mark.slow  # a pytest run with two xdist workers in fresh interpreters
def test_a_worker_killed_by_the_timeout_ends_the_run_and_its_stacks_are_shown(
    tmp_path: Path,
) -> None:
    """pytest-timeout's thread method ends a stuck test's worker process. With the repository's
    config the run then ends at once, names the test, and the run's own stderr shows where the
    test was stuck (pytest's faulthandler, set here to fire before the timeout as the config's
    ``faulthandler_timeout`` does before ``timeout``). Without ``--max-worker-restart=0``,
    pytest-xdist gave the stuck test to a new worker eight times over (at CI's 300 s each)."""
    (tmp_path / "test_stuck.py").write_text(STUCK)
    try:
        proc = run_with_our_config(tmp_path, "-o", "faulthandler_timeout=2", timeout=90)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the run did not end after its worker died: {exc.stdout!r}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "crashed while running 'test_stuck.py::test_stuck_in_a_call'" in out, out[-3000:]
    assert "worker restarting disabled" in out, out[-3000:]
    assert 'test_stuck.py", line 9 in test_stuck_in_a_call' in out, out[-3000:]


def test_the_stack_dump_comes_before_the_timeout_ends_the_worker() -> None:
    """The config's faulthandler dump fires before pytest-timeout's thread method ends the
    worker process (whose own dump pytest-xdist drops)."""
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    ini = options["ini_options"]
    assert ini["timeout_method"] == "thread"
    assert 0 < ini["faulthandler_timeout"] < ini["timeout"]
    assert "--max-worker-restart=0" in ini["addopts"]
