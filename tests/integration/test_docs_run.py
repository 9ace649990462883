"""Every code block in README.md and docs/*.md that claims to run does run.

The convention (what a block's fence and the line before it mean):

- ```` ```python ```` blocks are executed as written, each in a fresh ``python`` process whose
  current directory is an empty temporary directory. Where a real API key would be needed, the
  environment points the SDKs at the local fake server (:mod:`art_ray_metrics.ops.fakellm`):
  ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ``ANTHROPIC_BASE_URL``, ``ANTHROPIC_API_KEY``.
  A block that starts Ray starts its own local instance (on loopback, without token auth,
  with a private ``RAY_TMPDIR`` so ``ray.init()`` never joins another cluster on the machine).
- ```` ```bash ```` blocks are commands: every ``art-ray-metrics`` command is parsed by the
  real argument parser (its full runs are the tests in ``test_cli.py``), every ``python
  script.py ...`` must exist and accept its arguments (``--help`` after them exits 0), every
  file a command names must exist, and ``pip install -e ".[extra]"`` must name an extra of
  ``pyproject.toml``. A command of any other kind fails the test, so nothing slips through.
- A block preceded by the line ``<!-- doc-test: skip -->`` is not meant to run (output, a
  sketch, a command for a machine this test does not have). ```` ```text ```` and fences
  without a language are never run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest

from art_ray_metrics.ops.cli import build_parser
from art_ray_metrics.ops.fakellm import FakeLLMServer

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = "<!-- doc-test: skip -->"
_FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*$")


def code_blocks(path: Path) -> list[tuple[str, int, str, bool]]:
    """``(language, first line number, source, skipped)`` of every fenced block in ``path``."""
    lines = path.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        lang, start = match.group(1), i + 1
        j = start
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        blocks.append((lang, start + 1, "\n".join(lines[start:j]) + "\n", prev == SKIP))
        i = j + 1
    return blocks


def _params(lang: str) -> list[Any]:
    out = []
    for path in DOCS:
        for block_lang, line, source, skipped in code_blocks(path):
            if block_lang == lang and not skipped:
                out.append(pytest.param(source, id=f"{path.relative_to(ROOT)}:{line}"))
    return out


def test_the_convention_finds_the_quickstarts() -> None:
    """The extraction sees the README's Python quickstarts and its command blocks."""
    assert len(_params("python")) >= 2
    assert len(_params("bash")) >= 3
    skipped = [b for p in DOCS for b in code_blocks(p) if b[3]]
    assert all(lang for lang, *_ in skipped), "a skip marker before a plain fence is pointless"


def test_extraction_honours_the_skip_marker(tmp_path: Path) -> None:
    """A block right after the marker is skipped; the next one is not."""
    doc = tmp_path / "x.md"
    doc.write_text(f"{SKIP}\n\n```python\nraise SystemExit(1)\n```\n\n```python\nx = 1\n```\n")
    assert [(b[0], b[3]) for b in code_blocks(doc)] == [("python", True), ("python", False)]


@pytest.fixture(scope="module")
def fake_api() -> Any:
    with FakeLLMServer() as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("source", _params("python"))
def test_python_block_runs_as_written(source: str, fake_api: Any, tmp_path: Path) -> None:
    """The block exits 0 in a fresh process with no key but the fake server's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "WANDB_"))}
    env.update(
        OPENAI_BASE_URL=fake_api.openai_base_url,
        OPENAI_API_KEY="doc-test",
        ANTHROPIC_BASE_URL=fake_api.anthropic_base_url,
        ANTHROPIC_API_KEY="doc-test",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    # a private Ray temp dir: ray.init() must start its own instance, never join a cluster
    # another process left on this machine (short path: Ray's socket names must stay < 108 B)
    ray_tmp = tempfile.mkdtemp(prefix="arm-doc-", dir="/tmp")
    env["RAY_TMPDIR"] = ray_tmp
    script = tmp_path / "block.py"
    script.write_text(source)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _commands(source: str) -> list[list[str]]:
    """The commands of a bash block: comments dropped, ``&&`` chains split."""
    out = []
    for raw in source.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(word)
    return out


def _check_command(cmd: list[str]) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    while cmd and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", cmd[0]):  # VAR=value before a command
        cmd = cmd[1:]
    if cmd[0] == "art-ray-metrics":
        try:
            build_parser().parse_args(cmd[1:])
        except SystemExit as exc:
            raise AssertionError(f"{shlex.join(cmd)} does not parse (exit {exc.code})") from exc
        return
    if cmd[:3] == ["pip", "install", "-e"]:
        spec = cmd[3]
        wanted = re.fullmatch(r"\.\[([a-z,]+)\]", spec)
        assert wanted, spec
        assert set(wanted.group(1).split(",")) <= set(extras), spec
        return
    if cmd[:3] == ["python", "-m", "pytest"]:
        for arg in cmd[3:]:
            if not arg.startswith("-") and "/" in arg:
                assert (ROOT / arg).exists(), arg
        return
    if cmd[0] == "python" and cmd[1].endswith(".py"):
        assert (ROOT / cmd[1]).is_file(), cmd[1]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        proc = subprocess.run(
            [sys.executable, *cmd[1:], "--help"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"{shlex.join(cmd)} --help: {proc.stderr[-1500:]}"
        return
    if cmd[0] == "bash" and cmd[1].endswith(".sh"):
        assert (ROOT / cmd[1]).is_file(), cmd[1]
        return
    raise AssertionError(f"no check for the command {shlex.join(cmd)!r}: mark the block skipped")


@pytest.mark.parametrize("source", _params("bash"))
def test_bash_block_commands_are_valid(source: str) -> None:
    """Each command parses, names existing files and known extras."""
    commands = _commands(source)
    assert commands
    for cmd in commands:
        _check_command(cmd)
