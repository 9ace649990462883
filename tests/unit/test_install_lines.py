"""No documented install line names art-ray-metrics as if it were on a package index.

The package is installed from a clone (``pip install -e ".[art]"``) or from a wheel built from
it (``pip wheel --no-deps -w dist .``, then the file). A line such as
``pip install 'art-ray-metrics[art]'`` or a ``pip:`` list entry ``art-ray-metrics[demo]`` asks
an index for a package that is not there, so a newcomer following it gets "no matching
distribution". This scans every tracked text file a user reads or runs: the README, docs/,
cluster/, bench/, the package's docstrings and messages, the tests' skip reasons and .ci/.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()

# the package name followed by extras, not part of a path or a file name: what only an index
# could resolve (`.[art]`, `./dist/art_ray_metrics-0.1.0-py3-none-any.whl[demo]` do not match)
_NAME_WITH_EXTRAS = re.compile(r"(?<![\w./-])art[-_]ray[-_]metrics\s*\[")
# `pip install ... art-ray-metrics` (optionally quoted or with a version) on one line
_PIP_INSTALL = re.compile(r"\bpip3?\s+install\b(?P<args>[^\n]*)")
_BARE_NAME = re.compile(r"""^['"]?art[-_]ray[-_]metrics(?:\s*[<>=!~]=?[^'"\s]*)?['"]?$""")
# a YAML list entry (`pip:` of a runtime env) that is the bare name
_YAML_ENTRY = re.compile(r"""^\s*-\s+['"]?art[-_]ray[-_]metrics(?:\[[^\]]*\])?['"]?\s*$""", re.M)

SUFFIXES = {".md", ".py", ".yaml", ".yml", ".sh", ".txt", ".toml", ".json", ".cfg", ""}


def documented_files() -> list[Path]:
    """Every tracked text file except pyproject.toml (its `dev` extra names itself on purpose:
    pip resolves a project's own extras from the project being installed) and this test."""
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    files = []
    for name in out:
        path = ROOT / name
        if path.suffix not in SUFFIXES or not path.is_file():
            continue
        if name == "pyproject.toml" or path.resolve() == THIS:
            continue
        files.append(path)
    return files


def _requirements(args: str) -> list[str]:
    """The words of one ``pip install`` command: up to a shell separator, the end of an inline
    code span, or the first plain word of prose (``... '.[demo]' in your clone of ...``)."""
    command = re.split(r"&&|\|\||;|\||`|\)", args, maxsplit=1)[0]
    words = []
    for word in command.split():
        if re.fullmatch(r"[a-z]+", word) and word not in ("pip", "install"):
            break
        words.append(word)
    return words


def index_style_lines(text: str) -> list[str]:
    """The lines of ``text`` that ask an index for art-ray-metrics."""
    bad = []
    for number, line in enumerate(text.splitlines(), 1):
        if _NAME_WITH_EXTRAS.search(line):
            bad.append(f"{number}: {line.strip()}")
            continue
        for match in _PIP_INSTALL.finditer(line):
            if any(_BARE_NAME.match(word) for word in _requirements(match.group("args"))):
                bad.append(f"{number}: {line.strip()}")
    for match in _YAML_ENTRY.finditer(text):
        number = text.count("\n", 0, match.start()) + 1
        bad.append(f"{number}: {match.group(0).strip()}")
    return bad


@pytest.mark.parametrize(
    "line",
    [
        "pip install 'art-ray-metrics[art]'",
        'python -m pip install -U "ray[default]==2.60.0" "art-ray-metrics[demo]"',
        "`pip install art-ray-metrics`",
        "pip install art_ray_metrics==0.1.0",
        "pip:\n  - art-ray-metrics[demo]\n",
        "install `art-ray-metrics[demo]` in the image",
    ],
)
def test_the_check_catches_index_style_lines(line: str) -> None:
    """Each of these was in the repository once (or is a variant of one) and is flagged."""
    assert index_style_lines(line)


@pytest.mark.parametrize(
    "line",
    [
        'pip install -e ".[art]"',
        "pip install -e '.[demo]' in your clone of art-ray-metrics",
        'pip install "$(ls dist/art_ray_metrics-*.whl)[demo]"',
        "pip install ./dist/art_ray_metrics-0.1.0-py3-none-any.whl[demo]",
        "pip wheel --no-deps -w dist .",
        "art-ray-metrics demo --address auto",
        "# art-ray-metrics: the demo",
    ],
)
def test_the_check_accepts_clone_and_wheel_installs(line: str) -> None:
    """Installing from the clone or a built wheel, and running the command, are fine."""
    assert index_style_lines(line) == []


def test_no_documented_install_line_names_the_package_as_on_an_index() -> None:
    """README, docs/, cluster/, docstrings and messages install from the clone or a wheel."""
    files = documented_files()
    assert any(p.name == "README.md" for p in files)
    assert any(p.parent.name == "cluster" for p in files)
    found = {
        str(path.relative_to(ROOT)): bad
        for path in files
        if (bad := index_style_lines(path.read_text(errors="replace")))
    }
    assert found == {}
