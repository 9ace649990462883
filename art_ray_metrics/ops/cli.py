"""The ``art-ray-metrics`` command line: the demo and the operations on a run's storage.

Commands::

    art-ray-metrics demo [--steps 8 --rollouts 4 --judges 2 --address ADDR --storage URI
                          --run NAME --resume --chaos --wandb [MODE] --chart PATH ...]
    art-ray-metrics inspect URI [--json]          checkpoint: steps, totals, unique ids, W&B run id
    art-ray-metrics history URI [--format table|jsonl|csv] [--split S] [--columns a,b]
    art-ray-metrics wandb-sync URI [--new-run] [--mode online|offline] [--project P]
    art-ray-metrics status [--address ADDR] [--name N] [--namespace NS] [--json]

``URI`` is what the aggregator was given as ``storage_uri``: a directory, ``file://``,
``s3://bucket/prefix``, ``gs://bucket/prefix``. ``inspect``, ``history`` and ``wandb-sync``
read storage only (no Ray; they never take the writer epoch, so they are safe next to a running
aggregator); ``status`` asks a running aggregator actor.

Exit codes: 0 success; 1 the command ran but its check failed (a W&B sync that did not log
every row, a ``--chaos`` mismatch); 2 a problem with the input (wrong URI, no checkpoint, a
checkpoint or state of another format version, no aggregator running), printed as one line
``art-ray-metrics <command>: error: ...`` on stderr, without a traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from art_ray_metrics.config import DEFAULT_NAME, DEFAULT_NAMESPACE
from art_ray_metrics.durable import checkpoint as ckpt_mod
from art_ray_metrics.durable.checkpoint import CheckpointManager
from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.restore import RunInfo, read_run
from art_ray_metrics.durable.storage import open_store
from art_ray_metrics.errors import (
    AggregatorUnavailableError,
    CheckpointCorruptError,
    ConfigError,
    MetricsError,
    StorageError,
    WireFormatError,
)
from art_ray_metrics.export.wandb_sink import WandbSink, WandbSinkConfig

__all__ = ["CliError", "build_parser", "main"]

DEFAULT_COLUMNS = (
    "costs/all",
    "costs/cum/all",
    "reward/mean",
    "loss/train",
    "data/cum/num_unique_scenarios",
    "throughput/avg_actor_tok_per_s",
)


class CliError(Exception):
    """A problem with the user's input; printed as one line, exit code 2."""


def _is_local(uri: str) -> bool:
    return "://" not in uri or urlsplit(uri).scheme.lower() == "file"


def _local_path(uri: str) -> str:
    return urlsplit(uri).path if uri.lower().startswith("file://") else uri


def _open_existing(uri: str) -> Any:
    """Open a store for reading; a local directory must exist (open_store would create it)."""
    if _is_local(uri):
        path = _local_path(uri)
        if not os.path.isdir(path):
            raise CliError(
                f"Expected an existing run directory but got {uri!r} (no such directory)"
            )
    return open_store(uri)


def _require_run(uri: str) -> tuple[Any, RunInfo]:
    store = _open_existing(uri)
    info = read_run(uri, store)
    if info is None:
        raise CliError(f"Expected a checkpoint at {uri!r} but found none (not a run directory?)")
    return store, info


# --------------------------------------------------------------------------- commands


def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=160)


def cmd_inspect(args: argparse.Namespace) -> int:
    """``inspect URI``: the checkpoint a restarted aggregator would load."""
    _store, info = _require_run(args.uri)
    if args.json:
        data = asdict(info)
        data["last_train_step"] = info.last_train_step
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    console = _console()
    table = Table(title=f"checkpoint of {info.uri}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    steps = ", ".join(f"{k}: {v}" for k, v in sorted(info.last_closed.items())) or "none"
    rows = [
        ("last closed step", steps),
        ("pending steps", ", ".join(f"{s}/{sc}" for s, sc in info.pending_steps) or "none"),
        ("costs/cum/all", f"${info.totals.get('costs/cum/all', 0.0):,.6f}"),
        ("unique scenario ids", f"{info.unique_scenarios:,}"),
        ("priced response ids", f"{info.response_ids:,}"),
        ("W&B run id", info.wandb_run_id or "none (W&B was off)"),
        ("writer epoch / commit", f"{info.epoch} / {info.seq} ({info.manifest or 'WAL only'})"),
        ("WAL records to replay", f"{info.wal_records} ({info.replayed_batches} new batches)"),
        ("format versions", f"checkpoint {info.checkpoint_format}, wire {info.wire_format}"),
        ("aggregator restarts", str(info.restarts)),
        ("producers seen", str(info.producers)),
        ("counters", ", ".join(f"{k}={v}" for k, v in sorted(info.counters.items()))),
        ("history rows", f"{info.history_rows} (last: {info.history_last_step or 'none'})"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    totals = Table(title="cumulative totals", title_justify="left")
    totals.add_column("key")
    totals.add_column("value", justify="right")
    for key, total in info.totals.items():
        totals.add_row(key, f"{total:,.6f}")
    console.print(totals)
    return 0


def _history_records(args: argparse.Namespace) -> list[dict[str, Any]]:
    store = _open_existing(args.uri)
    records = list(HistoryStore(store).read(split=args.split))
    if not records and CheckpointManager(store).load_latest() is None:
        raise CliError(f"Expected a run at {args.uri!r} but found no history and no checkpoint")
    return records


def cmd_history(args: argparse.Namespace) -> int:
    """``history URI``: the logged rows, as a table, JSON lines or CSV."""
    records = _history_records(args)
    if args.format == "jsonl":
        out = sys.stdout
        for rec in records:
            out.write(json.dumps(rec, allow_nan=False, separators=(",", ":")) + "\n")
        return 0
    fixed = ["step", "split", "training_step", "recorded_at"]
    if args.format == "csv":
        metrics = sorted({k for r in records for k in r} - set(fixed))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fixed + metrics, lineterminator="\n")
        writer.writeheader()
        for rec in records:
            writer.writerow(rec)
        sys.stdout.write(buf.getvalue())
        return 0
    columns = (
        [c.strip() for c in args.columns.split(",") if c.strip()]
        if args.columns
        else [c for c in DEFAULT_COLUMNS if any(c in r for r in records)]
    )
    table = Table(title=f"history of {args.uri} ({len(records)} rows)", title_justify="left")
    table.add_column("step", justify="right")
    table.add_column("split")
    for col in columns:
        table.add_column(col, justify="right")
    for rec in records:
        cells = []
        for col in columns:
            value = rec.get(col)
            cells.append("-" if value is None else f"{float(value):,.6g}")
        table.add_row(str(rec["step"]), str(rec["split"]), *cells)
    _console().print(table)
    return 0


def cmd_wandb_sync(args: argparse.Namespace) -> int:
    """``wandb-sync URI``: rebuild or repair the W&B run from the history."""
    store = _open_existing(args.uri)
    info = read_run(args.uri, store)
    run_id = None if args.new_run else (info.wandb_run_id if info is not None else None)
    if run_id is None and not args.new_run:
        raise CliError(
            f"Expected a W&B run id in the checkpoint at {args.uri!r} but got none "
            "(W&B was off for this run); pass --new-run to create a run"
        )
    records = list(HistoryStore(store).read())
    if not records:
        raise CliError(f"Expected history rows at {args.uri!r} but found none")
    run_name = args.run_name or os.path.basename(_local_path(args.uri).rstrip("/")) or None
    sink = WandbSink(
        WandbSinkConfig(
            project=args.project,
            entity=args.entity,
            run_name=run_name,
            run_id=run_id,
            mode=args.mode,
            dir=args.dir,
        )
    )
    sink.start()
    queued = sink.relog(records)
    sink.close()
    print(
        f"W&B run {sink.run_id} ({args.mode or os.environ.get('WANDB_MODE') or 'online'}): "
        f"{sink.logged} of {queued} rows logged, {sink.failures} failures"
        + (f"; last error: {sink.last_error}" if sink.last_error else "")
    )
    if sink.logged < queued:
        print(
            f"art-ray-metrics wandb-sync: error: {queued - sink.logged} rows not logged",
            file=sys.stderr,
        )
        return 1
    return 0


def _check_reachable(address: str) -> None:
    """Fail fast (instead of Ray's long retries) when nothing listens at ``host:port``."""
    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise CliError(f"Expected a Ray address 'host:port' or 'auto' but got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise CliError(f"Expected a Ray cluster at {address!r} but got: {exc}") from exc


def cmd_status(args: argparse.Namespace) -> int:
    """``status``: a running aggregator's stats()."""
    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    _check_reachable(address)
    import ray

    try:
        ray.init(
            address=address,
            namespace=args.namespace,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
    except Exception as exc:
        raise CliError(f"Expected a running Ray cluster at {address!r} but got: {exc}") from exc
    try:
        try:
            actor = ray.get_actor(args.name, namespace=args.namespace)
        except ValueError as exc:
            raise CliError(
                f"Expected an aggregator named {args.name!r} in namespace {args.namespace!r} "
                f"on the cluster at {address!r} but found none (is a run in progress?)"
            ) from exc
        try:
            stats: dict[str, Any] = ray.get(actor.stats.remote(), timeout=args.timeout)  # type: ignore[assignment]
        except Exception as exc:
            raise AggregatorUnavailableError(
                f"Expected the aggregator {args.name!r} to answer within {args.timeout}s but "
                f"got {type(exc).__name__}"
            ) from exc
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True, default=str))
        return 0
    table = Table(title=f"aggregator {args.name!r} ({args.namespace})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("run_name", "storage_uri", "epoch", "fenced", "producers", "unique_scenarios"):
        table.add_row(key, str(stats.get(key)))
    table.add_row("last closed", json.dumps(stats.get("last_closed")))
    table.add_row("pending steps", json.dumps(stats.get("pending_steps")))
    table.add_row("costs/cum/all", f"${stats.get('cum', {}).get('costs/cum/all', 0.0):,.6f}")
    table.add_row("W&B run id", str(stats.get("wandb_run_id")))
    for group in ("counters", "gauges", "health"):
        values = stats.get(group) or {}
        table.add_row(group, ", ".join(f"{k}={v}" for k, v in sorted(values.items())))
    table.add_row("uptime", f"{float(stats.get('uptime_s', 0.0)):.1f}s (pid {stats.get('pid')})")
    _console().print(table)
    return 0


def _latest_local_run(root: str = "runs") -> str | None:
    if not os.path.isdir(root):
        return None
    runs = [
        d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, ckpt_mod.POINTER_KEY))
    ]
    return max(runs, key=lambda d: os.path.getmtime(os.path.join(root, d))) if runs else None


def _wandb_mode(args: argparse.Namespace) -> Literal["online", "offline", "disabled"]:
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if args.no_wandb:
        return "disabled"
    if args.wandb == "online":
        return "online"
    if args.wandb == "offline":
        return "offline"
    if args.wandb == "auto":
        return "online" if has_key else "offline"
    return "online" if has_key else "disabled"


def cmd_demo(args: argparse.Namespace) -> int:
    """``demo``: the ART-style loop on Ray (see :mod:`art_ray_metrics.ops.demo`)."""
    if args.steps < 1 or args.rollouts < 1 or args.judges < 1:
        raise CliError(
            "Expected --steps, --rollouts and --judges >= 1 but got "
            f"{args.steps}, {args.rollouts}, {args.judges}"
        )
    run = args.run
    if run is None and args.resume and args.storage is None:
        run = _latest_local_run()
        if run is None:
            raise CliError("Expected a run under ./runs to resume but found none; pass --run")
    if run is None:
        run = "demo-" + time.strftime("%Y%m%d-%H%M%S")
    storage = args.storage or os.path.abspath(os.path.join("runs", run))
    if _is_local(storage):
        storage = os.path.abspath(_local_path(storage))
        local_dir = storage
    else:
        local_dir = os.path.abspath(os.path.join("runs", run))
    if not args.address:
        # a local Ray instance: keep it on loopback and without token auth (Ray 2.60 turns it on)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        from art_ray_metrics.ops import demo
    except ImportError as exc:
        raise CliError(
            f"Expected the demo extras but got {exc}; install them with "
            "pip install 'art-ray-metrics[demo]'"
        ) from exc
    mode = _wandb_mode(args)
    opts = demo.DemoOptions(
        run=run,
        storage_uri=storage,
        local_dir=local_dir,
        steps=args.steps,
        rollouts=args.rollouts,
        judges=args.judges,
        seed=args.seed,
        resume=args.resume,
        chaos=args.chaos,
        keep=args.keep,
        address=args.address,
        num_cpus=args.num_cpus,
        expect_nodes=args.expect_nodes,
        name=args.name,
        namespace=args.namespace,
        wandb_mode=mode,
        wandb_dir=os.path.join(local_dir, "wandb") if mode != "disabled" else None,
        charts=tuple(args.chart or ()),
        summary_json=args.summary_json,
    )
    try:
        demo.run_demo(opts)
    except KeyboardInterrupt:
        print(
            f"\nart-ray-metrics demo: interrupted; the aggregator checkpointed run {run!r}: "
            f"continue it with art-ray-metrics demo --run {run} --resume"
            + (f" --storage {storage}" if args.storage else ""),
            file=sys.stderr,
        )
        return 130
    except demo.DemoError as exc:
        if "--chaos" in str(exc):
            print(f"art-ray-metrics demo: error: {exc}", file=sys.stderr)
            return 1
        raise CliError(str(exc)) from exc
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-parser per command)."""
    parser = argparse.ArgumentParser(
        prog="art-ray-metrics",
        description="Distributed, crash-safe ART metrics on Ray: demo and run operations.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the library's warnings and info logs"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        "--keep", action="store_true", help="leave the aggregator running (with --address)"
    )
    d.add_argument("--summary-json", help="write the summary as JSON to this file")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("inspect", help="show a run's checkpoint")
    i.add_argument("uri", help="storage URI of the run")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)

    h = sub.add_parser("history", help="print a run's logged rows")
    h.add_argument("uri", help="storage URI of the run")
    h.add_argument("--format", choices=["table", "jsonl", "csv"], default="table")
    h.add_argument("--split", help="only rows of this split (train, val, ...)")
    h.add_argument("--columns", help="comma-separated metric columns for --format table")
    h.set_defaults(func=cmd_history)

    w = sub.add_parser("wandb-sync", help="rebuild or repair the W&B run from the history")
    w.add_argument("uri", help="storage URI of the run")
    w.add_argument("--new-run", action="store_true", help="log to a new run id")
    w.add_argument("--mode", choices=["online", "offline"], help="W&B mode (default: WANDB_MODE)")
    w.add_argument("--project", default="art-ray-metrics", help="W&B project")
    w.add_argument("--entity", help="W&B entity")
    w.add_argument("--run-name", help="W&B display name (default: the run directory name)")
    w.add_argument("--dir", help="parent directory of W&B's local files")
    w.set_defaults(func=cmd_wandb_sync)

    s = sub.add_parser("status", help="show a running aggregator's stats")
    s.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS or 'auto')")
    s.add_argument("--name", default=DEFAULT_NAME, help="aggregator actor name")
    s.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="aggregator namespace")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for stats()")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 500 else text[:497] + "..."


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CheckpointCorruptError):
        return (
            f"unreadable checkpoint (corrupt, or written by another format version): "
            f"{_one_line(exc)}"
        )
    if isinstance(exc, WireFormatError):
        return f"unreadable state (another format version?): {_one_line(exc)}"
    if isinstance(exc, StorageError):
        return f"storage failed: {_one_line(exc)}"
    return _one_line(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``art-ray-metrics``; returns the exit code."""
    args = build_parser().parse_args(argv)
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
        print(f"art-ray-metrics {args.command}: error: {_describe(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"art-ray-metrics {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `history ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
