"""The storage commands: ``inspect``, ``history`` and ``wandb-sync`` (no Ray).

They read a run's storage only and never take the writer epoch, so they are safe next to a
running aggregator. :func:`probe_storage` (used by every command that names a storage URI)
fails fast, in one line, when a remote store cannot be read.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from rich.table import Table

from art_ray_metrics.durable.checkpoint import CheckpointManager
from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.restore import RunInfo, read_run
from art_ray_metrics.durable.storage import open_store
from art_ray_metrics.errors import ObjectNotFoundError, StorageError
from art_ray_metrics.export.wandb_config import WandbSinkConfig
from art_ray_metrics.export.wandb_offline import offline_sync_command
from art_ray_metrics.export.wandb_sink import WandbSink
from art_ray_metrics.ops.cli.common import (
    CliError,
    is_local,
    local_path,
    local_run_dir,
    one_line,
    table_console,
)

__all__ = [
    "DEFAULT_COLUMNS",
    "STORAGE_PROBE_TIMEOUT_S",
    "WANDB_SYNC_KEY",
    "cmd_history",
    "cmd_inspect",
    "cmd_wandb_sync",
    "format_total",
    "open_existing",
    "probe_storage",
    "read_history",
    "storage_reason",
]

log = logging.getLogger(__name__)

DEFAULT_COLUMNS = (
    "costs/all",
    "costs/cum/all",
    "reward/mean",
    "train/reward",  # ART's names, in rows closed through art_ray_metrics.art.attach
    "val/reward",
    "loss/train",
    "train/loss",
    "data/cum/num_unique_scenarios",
    "throughput/avg_actor_tok_per_s",
)
"""The ``history`` table's columns without ``--columns``: those of these the run has."""


def open_existing(uri: str) -> Any:
    """Open a store for reading; a local directory must exist (open_store would create it)."""
    if is_local(uri):
        path = local_path(uri)
        if not os.path.isdir(path):
            raise CliError(
                f"Expected an existing run directory but got {uri!r} (no such directory)"
            )
    return open_store(uri)


class _Recoveries(logging.Handler):
    """Collects the library's warnings while a run is read (what storage recovered from)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


@contextlib.contextmanager
def _collect_recoveries(verbose: bool) -> Iterator[list[str]]:
    """Record the library's warnings (e.g. a corrupt manifest skipped) while reading a run.

    Without ``-v`` they are not printed by logging; the command reports them itself.
    """
    lib = logging.getLogger("art_ray_metrics")
    handler = _Recoveries()
    saved = (lib.level, lib.propagate)
    lib.addHandler(handler)
    if lib.getEffectiveLevel() > logging.WARNING:
        lib.setLevel(logging.WARNING)
    lib.propagate = verbose
    try:
        yield handler.messages
    finally:
        lib.removeHandler(handler)
        lib.setLevel(saved[0])
        lib.propagate = saved[1]


def _require_run(uri: str, verbose: bool = False) -> tuple[Any, RunInfo, list[str]]:
    store = open_existing(uri)
    probe_storage(uri)
    with _collect_recoveries(verbose) as recovered:
        info = read_run(uri, store)
    if info is None:
        raise CliError(f"Expected a checkpoint at {uri!r} but found none (not a run directory?)")
    return store, info, list(recovered)


def _bad_value(record: Mapping[str, Any]) -> str | None:
    for key, value in record.items():
        if key in ("split", "recorded_at"):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"value of {key!r} is {value!r}, not a number"
        if not math.isfinite(value):
            return f"value of {key!r} is {value!r}, not a finite number"
    return None


def read_history(
    store: Any, split: str | None = None
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The readable history records in step order, and ``(key, reason)`` of each skipped one.

    A corrupt row (not JSON, not a record, a non-numeric value) is skipped, so one damaged
    object never hides the rest of the system of record.
    """
    history = HistoryStore(store)
    readable, skipped = history.scan(split)
    records: list[dict[str, Any]] = []
    for record in readable:
        reason = _bad_value(record)
        if reason is not None:
            skipped.append((history.key_for(record["step"], record["split"]), reason))
            continue
        records.append(record)
    return records, skipped


def _report_skipped(command: str, skipped: Sequence[tuple[str, str]]) -> None:
    for key, reason in skipped:
        print(f"art-ray-metrics {command}: skipped corrupt row {key}: {reason}", file=sys.stderr)


def cmd_inspect(args: argparse.Namespace) -> int:
    """``inspect URI``: the checkpoint a restarted aggregator would load."""
    _store, info, recovered = _require_run(args.uri, args.verbose)
    for message in recovered:
        print(f"art-ray-metrics inspect: recovered: {message}", file=sys.stderr)
    if args.json:
        data = asdict(info)
        data["last_train_step"] = info.last_train_step
        data["recovered"] = recovered
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    console = table_console()
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
        (
            "aggregator starts after the first",
            f"{info.restarts} (clean resumes and restarts after a crash alike)",
        ),
        ("producers seen", str(info.producers)),
        ("counters", ", ".join(f"{k}={v}" for k, v in sorted(info.counters.items()))),
        ("history rows", f"{info.history_rows} (last: {info.history_last_step or 'none'})"),
        ("recovered from", "; ".join(recovered) or "nothing (every object read cleanly)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    totals = Table(title="cumulative totals", title_justify="left")
    totals.add_column("key")
    totals.add_column("value", justify="right")
    for key, total in info.totals.items():
        totals.add_row(key, format_total(key, total))
    console.print(totals)
    return 0


def format_total(key: str, value: float) -> str:
    """A cumulative total as ``inspect`` prints it: money to the micro-dollar, counts whole.

    >>> format_total("costs/cum/all", 0.0123), format_total("data/cum/actor_tokens", 120512.0)
    ('$0.012300', '120,512')
    >>> format_total("time/cum/wall_s", 12.3456789)
    '12.3457'
    """
    if key.startswith("costs/"):
        return f"${value:,.6f}"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.6g}"


def _history_records(args: argparse.Namespace) -> list[dict[str, Any]]:
    store = open_existing(args.uri)
    probe_storage(args.uri)
    records, skipped = read_history(store, args.split)
    _report_skipped("history", skipped)
    every = records if args.split is None or records else read_history(store)[0]
    if not every and not skipped and CheckpointManager(store).load_latest() is None:
        raise CliError(f"Expected a run at {args.uri!r} but found no history and no checkpoint")
    if args.split is not None and not records and args.format == "table":
        # (jsonl and csv print nothing, or the header: what a script expects of no rows)
        splits = sorted({str(r["split"]) for r in every})
        raise CliError(
            f"Expected rows of split {args.split!r} in {args.uri} but found none (the run has "
            + (f"rows of: {', '.join(splits)})" if splits else "no rows yet)")
        )
    return records


def _csv_cell(value: Any) -> Any:
    """Floats with at most 15 significant digits: 0.45799999999999996 prints as 0.458."""
    if isinstance(value, float):
        text = f"{value:.15g}"
        return text
    return value


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
            writer.writerow({k: _csv_cell(v) for k, v in rec.items()})
        sys.stdout.write(buf.getvalue())
        return 0
    available = sorted({k for r in records for k in r} - set(fixed))
    if args.columns:
        columns = [c.strip() for c in args.columns.split(",") if c.strip()]
        unknown = [c for c in columns if c not in available]
        if unknown and records:
            raise CliError(
                f"Expected --columns from the run's metrics but got {', '.join(unknown)} "
                f"(available: {', '.join(available)})"
            )
    else:
        columns = [c for c in DEFAULT_COLUMNS if c in available]
    if not records:
        print(f"history of {args.uri}: no rows yet")
        return 0
    # the title as a line of its own: a rich title wraps to the width of a narrow table
    print(f"history of {args.uri} ({len(records)} row{'' if len(records) == 1 else 's'})")
    table = Table()
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
    table_console().print(table)
    return 0


WANDB_SYNC_KEY = "wandb-sync/run.json"
"""Where ``wandb-sync`` keeps the W&B run id it logged to, in the run's storage."""


def _saved_sync_run(store: Any) -> dict[str, Any] | None:
    try:
        data = json.loads(store.get(WANDB_SYNC_KEY))
    except ObjectNotFoundError:
        return None
    except (ValueError, StorageError) as exc:
        log.warning("ignoring unreadable %s: %s", WANDB_SYNC_KEY, exc)
        return None
    return data if isinstance(data, dict) and isinstance(data.get("run_id"), str) else None


def cmd_wandb_sync(args: argparse.Namespace) -> int:
    """``wandb-sync URI``: rebuild or repair the W&B run from the history."""
    store = open_existing(args.uri)
    probe_storage(args.uri)
    with _collect_recoveries(args.verbose):
        info = read_run(args.uri, store)
    saved = _saved_sync_run(store)
    if args.new_run:
        run_id, source = None, "a new run"
    elif saved is not None:
        run_id, source = saved["run_id"], f"the run of the last wandb-sync ({WANDB_SYNC_KEY})"
    elif info is not None and info.wandb_run_id:
        run_id, source = info.wandb_run_id, "the run id in the checkpoint"
    else:
        raise CliError(
            f"Expected a W&B run id in the checkpoint at {args.uri!r} but got none "
            "(W&B was off for this run); pass --new-run to create a run"
        )
    records, skipped = read_history(store)
    _report_skipped("wandb-sync", skipped)
    if not records:
        raise CliError(f"Expected history rows at {args.uri!r} but found none")
    run_name = args.run_name or os.path.basename(local_path(args.uri).rstrip("/")) or None
    wandb_dir = args.dir or local_run_dir(args.uri)
    mode = args.mode or os.environ.get("WANDB_MODE") or "online"
    sink = WandbSink(
        WandbSinkConfig(
            project=args.project,
            entity=args.entity,
            run_name=run_name,
            run_id=run_id,
            mode=args.mode,
            dir=wandb_dir,
        )
    )
    sink.start()
    queued = sink.relog(records)
    sink.close()
    if sink.run_id and sink.logged:
        record = {"run_id": sink.run_id, "project": args.project, "entity": args.entity}
        store.put(WANDB_SYNC_KEY, json.dumps(record).encode())
    print(
        f"W&B run {sink.run_id} ({mode}; {source}): {sink.logged} of {queued} rows logged, "
        f"{sink.failures} failures"
        + (f", {len(skipped)} corrupt rows skipped" if skipped else "")
        + (f"; last error: {sink.last_error}" if sink.last_error else "")
    )
    if mode == "offline":
        print(
            f"offline files in {wandb_dir}/wandb; upload them with: {offline_sync_command(wandb_dir, sink.run_id)}"
        )
    if sink.logged < queued:
        print(
            f"art-ray-metrics wandb-sync: error: {queued - sink.logged} rows not logged",
            file=sys.stderr,
        )
        return 1
    return 0


STORAGE_PROBE_TIMEOUT_S = 10.0
"""How long the first request to a run's storage may take."""


def probe_storage(uri: str) -> None:
    """Fail fast when a remote storage URI cannot be read (no bucket, no credentials, no network).

    Local paths are not probed (they are created on demand).
    """
    if is_local(uri):
        return
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            open_store(uri, timeout_s=3.0).list("CHECKPOINT")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True, name="arm-storage-probe")
    worker.start()
    worker.join(STORAGE_PROBE_TIMEOUT_S)
    if not outcome:
        raise CliError(
            f"Expected to reach the storage {uri} but it did not answer within "
            f"{STORAGE_PROBE_TIMEOUT_S:g}s (check the endpoint, e.g. AWS_ENDPOINT_URL_S3, and "
            "the network)"
        )
    exc = outcome[0]
    if exc is not None:
        raise CliError(
            f"Expected to read the storage {uri} but got: {storage_reason(exc)} (does the "
            "bucket exist, and are the credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS) set?)"
        ) from exc


_METADATA_SERVICE = re.compile(
    r"169\.254\.169\.254|fd00:ec2::254|metadata\.google\.internal|/latest/api/token", re.I
)


def storage_reason(exc: BaseException) -> str:
    """One line on why storage failed, without the object store's internals.

    With no credentials in the environment the S3/GCS client falls back to the cloud's instance
    metadata service, and its error names that service's internal URL: said plainly instead.

    >>> reason = storage_reason(OSError("list of 'CHECKPOINT' in s3://b/r failed: Generic S3 "
    ...     "error: Error performing PUT http://169.254.169.254/latest/api/token in 7ms - 403"))
    >>> reason.startswith("list of 'CHECKPOINT' in s3://b/r failed: no credentials (none in")
    True
    >>> "169.254" in reason
    False
    """
    text = one_line(exc)
    if not _METADATA_SERVICE.search(text):
        return text
    head = text.split(" failed: ", 1)[0] + " failed: " if " failed: " in text else ""
    return (
        f"{head}no credentials (none in the environment, and no instance metadata service on "
        "this machine gave any)"
    )
