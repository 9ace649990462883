"""The ``art-ray-metrics`` argument parser and entry point (``main``).

One sub-parser per command; the commands themselves are in :mod:`.storage` (``inspect``,
``history``, ``wandb-sync``), :mod:`.cluster` (``status``, ``stop``) and :mod:`.launch`
(``demo``, ``fake-llm``). ``main`` turns every error into one line and an exit code (see the
package docstring).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from art_ray_metrics.config import DEFAULT_NAME, DEFAULT_NAMESPACE
from art_ray_metrics.errors import (
    CheckpointCorruptError,
    ConfigError,
    MetricsError,
    StorageError,
    WireFormatError,
)
from art_ray_metrics.ops.cli.cluster import cmd_status, cmd_stop
from art_ray_metrics.ops.cli.common import CliError, one_line
from art_ray_metrics.ops.cli.launch import cmd_demo, cmd_fake_llm
from art_ray_metrics.ops.cli.storage import (
    cmd_history,
    cmd_inspect,
    cmd_wandb_sync,
    storage_reason,
)

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-parser per command)."""
    parser = _Parser(
        prog="art-ray-metrics",
        description="Distributed, crash-safe ART metrics on Ray: demo and run operations.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the library's warnings and info logs"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_demo,
        _add_inspect,
        _add_history,
        _add_wandb_sync,
        _add_fake_llm,
        _add_status,
        _add_stop,
    ):
        add(sub)
    for command in sub.choices.values():  # `-v` after the command name works too
        command.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the library's warnings and info logs",
        )
    parser.set_defaults(commands=dict(sub.choices))
    return parser


def _add_demo(sub: Any) -> None:
    """``demo``: sizes, run and storage, cluster, W&B, chaos, outputs."""
    d = sub.add_parser("demo", help="run an ART-style RL loop on Ray and record its metrics")
    d.add_argument("--steps", type=int, default=8, help="training steps to run (default 8)")
    d.add_argument("--rollouts", type=int, default=4, help="rollout tasks per step (default 4)")
    d.add_argument("--judges", type=int, default=2, help="judge actors (default 2)")
    d.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    d.add_argument("--run", help="run name (default demo-<timestamp>; --resume: latest)")
    d.add_argument("--storage", help="storage URI (default ./runs/<run>; s3://, gs:// work)")
    d.add_argument("--address", help="join this Ray cluster ('auto', host:port) instead of local")
    d.add_argument("--num-cpus", type=int, default=2, help="CPUs of a local Ray (default 2)")
    d.add_argument("--expect-nodes", type=int, help="wait until this many Ray nodes are alive")
    d.add_argument("--name", default=DEFAULT_NAME, help="aggregator actor name")
    d.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="aggregator namespace")
    d.add_argument(
        "--wandb",
        nargs="?",
        const="auto",
        choices=["auto", "online", "offline"],
        help="log to W&B (bare flag: online with WANDB_API_KEY, else offline)",
    )
    d.add_argument("--no-wandb", action="store_true", help="never log to W&B")
    d.add_argument("--chart", action="append", help="also write the PNG chart here")
    d.add_argument("--resume", action="store_true", help="continue a stopped run")
    d.add_argument("--chaos", action="store_true", help="kill a worker and the aggregator mid-run")
    d.add_argument(
        "--keep",
        action="store_true",
        help="leave the aggregator running (with --address; `art-ray-metrics stop` ends it)",
    )
    d.add_argument("--summary-json", help="write the summary as JSON to this file")
    d.set_defaults(func=cmd_demo)


def _add_inspect(sub: Any) -> None:
    """``inspect URI``."""
    i = sub.add_parser("inspect", help="show a run's checkpoint")
    i.add_argument("uri", help="storage URI of the run")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)


def _add_history(sub: Any) -> None:
    """``history URI``."""
    h = sub.add_parser("history", help="print a run's logged rows")
    h.add_argument("uri", help="storage URI of the run")
    h.add_argument("--format", choices=["table", "jsonl", "csv"], default="table")
    h.add_argument("--split", help="only rows of this split (train, val, ...)")
    h.add_argument("--columns", help="comma-separated metric columns for --format table")
    h.set_defaults(func=cmd_history)


def _add_wandb_sync(sub: Any) -> None:
    """``wandb-sync URI``."""
    w = sub.add_parser("wandb-sync", help="rebuild or repair the W&B run from the history")
    w.add_argument("uri", help="storage URI of the run")
    w.add_argument("--new-run", action="store_true", help="log to a new run id")
    w.add_argument("--mode", choices=["online", "offline"], help="W&B mode (default: WANDB_MODE)")
    w.add_argument("--project", default="art-ray-metrics", help="W&B project")
    w.add_argument("--entity", help="W&B entity")
    w.add_argument("--run-name", help="W&B display name (default: the run directory name)")
    w.add_argument("--dir", help="parent directory of W&B's local files")
    w.set_defaults(func=cmd_wandb_sync)


def _add_fake_llm(sub: Any) -> None:
    """``fake-llm``."""
    f = sub.add_parser(
        "fake-llm",
        help="serve a local fake OpenAI/Anthropic API and print the export lines that use it",
    )
    f.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: a free port)")
    f.set_defaults(func=cmd_fake_llm)


def _add_aggregator_options(command: argparse.ArgumentParser) -> None:
    """``--address``, ``--name``, ``--namespace``: which running aggregator to ask."""
    command.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS or 'auto')")
    command.add_argument("--name", default=DEFAULT_NAME, help="aggregator actor name")
    command.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="aggregator namespace")


def _add_status(sub: Any) -> None:
    """``status``."""
    s = sub.add_parser("status", help="show a running aggregator's stats")
    _add_aggregator_options(s)
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for stats()")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)


def _add_stop(sub: Any) -> None:
    """``stop``."""
    t = sub.add_parser(
        "stop", help="stop an aggregator left running with demo --keep (final checkpoint)"
    )
    _add_aggregator_options(t)
    t.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the final checkpoint"
    )
    t.set_defaults(func=cmd_stop)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CheckpointCorruptError):
        return (
            f"unreadable checkpoint (corrupt, or written by another format version): "
            f"{one_line(exc)}"
        )
    if isinstance(exc, WireFormatError):
        return f"unreadable state (corrupt, or another format version): {one_line(exc)}"
    if isinstance(exc, StorageError):
        return f"storage failed: {storage_reason(exc)}"
    if isinstance(exc, CliError):
        return one_line(exc, limit=None)  # ours: whole (e.g. every valid --columns name)
    return one_line(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``art-ray-metrics``; returns the exit code."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # said by the command's own parser: names the command and its --help
        args.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    # storage fallbacks (e.g. skipping an unreadable manifest) log warnings; the command's own
    # one-line error says what matters, -v shows the detail
    quiet = args.command != "demo" and not args.verbose
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR if quiet else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (CliError, ConfigError, MetricsError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"art-ray-metrics {args.command}: error: {_describe(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"art-ray-metrics {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `history ... | head`
        return 0
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        print(
            f"art-ray-metrics {args.command}: error: {type(exc).__name__}: {one_line(exc)}"
            + ("" if args.verbose else " (-v shows the traceback)"),
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
