"""What every command of the CLI shares: the one-line input error, URIs, the console."""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

from rich.console import Console

__all__ = ["CliError", "is_local", "local_path", "local_run_dir", "one_line", "table_console"]


class CliError(Exception):
    """A problem with the user's input; printed as one line, exit code 2."""


def is_local(uri: str) -> bool:
    """Whether ``uri`` names a local directory (a path or ``file://``)."""
    return "://" not in uri or urlsplit(uri).scheme.lower() == "file"


def local_path(uri: str) -> str:
    """The path of a local ``uri`` (``file://`` stripped)."""
    return urlsplit(uri).path if uri.lower().startswith("file://") else uri


def table_console() -> Console:
    """A console for tables: the terminal's width, or 160 columns when piped."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def one_line(exc: BaseException, limit: int | None = 500) -> str:
    """``exc``'s message on one line, cut at ``limit`` characters (``None``: whole)."""
    text = " ".join(str(exc).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def local_run_dir(uri: str) -> str:
    """The run's local directory: the storage itself if local, else ``./runs/<name>``.

    Offline W&B files of the demo and of ``wandb-sync`` go to ``<this>/wandb/``.
    """
    if is_local(uri):
        return os.path.abspath(local_path(uri))
    name = os.path.basename(urlsplit(uri).path.rstrip("/")) or urlsplit(uri).netloc
    return os.path.abspath(os.path.join("runs", name))
