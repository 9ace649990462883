"""The ``art-ray-metrics`` command line: the demo and the operations on a run's storage.

Commands::

    art-ray-metrics demo [--steps 8 --rollouts 4 --judges 2 --address ADDR --storage URI
                          --run NAME --resume --chaos --wandb [MODE] --chart PATH ...]
    art-ray-metrics inspect URI [--json]          checkpoint: steps, totals, unique ids, W&B run id
    art-ray-metrics history URI [--format table|jsonl|csv] [--split S] [--columns a,b]
    art-ray-metrics wandb-sync URI [--new-run] [--mode online|offline] [--project P]
    art-ray-metrics fake-llm [--port 0]           the demo's fake OpenAI/Anthropic API, for your code
    art-ray-metrics status [--address ADDR] [--name N] [--namespace NS] [--json]
    art-ray-metrics stop [--address ADDR] [--name N] [--namespace NS]

``URI`` is what the aggregator was given as ``storage_uri``: a directory, ``file://``,
``s3://bucket/prefix``, ``gs://bucket/prefix``. ``inspect``, ``history`` and ``wandb-sync``
read storage only (no Ray; they never take the writer epoch, so they are safe next to a running
aggregator); ``status`` and ``stop`` ask a running aggregator actor.

Before any work, every command checks what it will talk to, with a short timeout: a Ray
address must accept a TCP connection within 3 s (``auto`` must resolve to exactly one cluster:
``RAY_ADDRESS``, or this machine's ``ray start`` cluster file with no other cluster running),
and a storage URI must be reachable. ``status``, ``stop`` and ``demo`` print the address they
acted on.

Exit codes: 0 success; 1 the command ran but its check failed (a W&B sync that did not log
every row, a ``--chaos`` mismatch); 2 a problem with the input (wrong URI, no checkpoint, a
checkpoint or state of another format version, no Ray cluster, no aggregator running), printed
as one line ``art-ray-metrics <command>: error: ...`` on stderr, without a traceback (``-v``
shows it); 130 interrupted.
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
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from art_ray_metrics.config import DEFAULT_NAME, DEFAULT_NAMESPACE
from art_ray_metrics.core.replies import AggregatorStats
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
    ObjectNotFoundError,
    StorageError,
    WireFormatError,
)
from art_ray_metrics.export.wandb_offline import offline_sync_command
from art_ray_metrics.export.wandb_sink import WandbSink, WandbSinkConfig

__all__ = ["CliError", "build_parser", "connect_ray", "main", "probe_storage", "read_history"]

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
    store = _open_existing(uri)
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


# --------------------------------------------------------------------------- commands


def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=160)


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
    store = _open_existing(args.uri)
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
    _console().print(table)
    return 0


WANDB_SYNC_KEY = "wandb-sync/run.json"
"""Where ``wandb-sync`` keeps the W&B run id it logged to, in the run's storage."""


def local_run_dir(uri: str) -> str:
    """The run's local directory: the storage itself if local, else ``./runs/<name>``.

    Offline W&B files of the demo and of ``wandb-sync`` go to ``<this>/wandb/``.
    """
    if _is_local(uri):
        return os.path.abspath(_local_path(uri))
    name = os.path.basename(urlsplit(uri).path.rstrip("/")) or urlsplit(uri).netloc
    return os.path.abspath(os.path.join("runs", name))


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
    store = _open_existing(args.uri)
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
    run_name = args.run_name or os.path.basename(_local_path(args.uri).rstrip("/")) or None
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


RAY_CONNECT_TIMEOUT_S = 3.0
"""How long a Ray address may take to accept a TCP connection."""
RAY_HANDSHAKE_TIMEOUT_S = 10.0
"""How long a reachable address may take to answer Ray's first request (the cluster id)."""
RAY_INIT_TIMEOUT_S = 45.0
"""How long joining a reachable Ray cluster may take before the command gives up."""
STORAGE_PROBE_TIMEOUT_S = 10.0
"""How long the first request to a run's storage may take."""
AUTH_HINT = (
    "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) with the "
    "cluster's token in this shell"
)


def resolve_auto(
    env_address: str | None, cluster_file: str | None, running: Sequence[str]
) -> tuple[str, str]:
    """``(address, where it came from)`` for ``--address auto``, only when it is unambiguous.

    ``RAY_ADDRESS`` (an explicit choice) wins. Otherwise the cluster file ``ray start --head``
    wrote is used when no other Ray cluster runs on this machine (``running`` are the GCS
    addresses of running clusters). A running cluster alone is never taken: on a shared
    machine it may be someone else's (Ray's own ``auto`` takes any of them).

    >>> resolve_auto(None, "10.0.0.5:6379", ["10.0.0.5:6379"])
    ('10.0.0.5:6379', 'the cluster file of `ray start`')

    Raises:
        CliError: Nothing or more than one cluster was found; one line lists what was found
            and asks for ``--address``.
    """
    if env_address and env_address != "auto":
        return env_address, "RAY_ADDRESS"
    others = sorted(set(running) - {cluster_file})
    if cluster_file and not others:
        return cluster_file, "the cluster file of `ray start`"
    found = ([f"cluster file: {cluster_file}"] if cluster_file else []) + [
        f"running: {a}" for a in others
    ]
    if not found:
        raise CliError(
            "Expected a Ray cluster on this machine for --address auto (a `ray start` cluster "
            "file or RAY_ADDRESS) but found none; start one with `ray start --head`, pass "
            "--address host:port, or leave out --address for a local Ray"
        )
    raise CliError(
        f"Expected exactly one Ray cluster for --address auto but found {len(found)} "
        f"({'; '.join(found)}); pass --address host:port (or set RAY_ADDRESS) to choose"
        + ("" if cluster_file else ": with no `ray start` cluster file it may be another user's")
    )


def find_auto_address() -> tuple[str, str]:
    """Resolve ``--address auto`` on this machine with :func:`resolve_auto`."""
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    running = sorted(str(a) for a in find_gcs_addresses())  # type: ignore[no-untyped-call]
    cluster_file = find_bootstrap_address(None)
    return resolve_auto(
        os.environ.get("RAY_ADDRESS"), str(cluster_file) if cluster_file else None, running
    )


def _check_reachable(address: str) -> tuple[str, str]:
    """Fail fast (instead of Ray's long retries) unless a Ray cluster listens at ``address``.

    ``address`` is ``host:port``, ``ray://host:port`` or ``auto`` (``RAY_ADDRESS``, or the
    cluster ``ray start`` left on this machine when it is the only one: see
    :func:`resolve_auto`). Returns the address to give ``ray.init`` and how to name it to the
    user (with where ``auto`` found it).
    """
    resolved, label = address, address
    if address == "auto":
        resolved, source = find_auto_address()
        label = f"{resolved} (--address auto: {source})"
    target = resolved[len("ray://") :] if resolved.lower().startswith("ray://") else resolved
    host, sep, port = target.rpartition(":")
    if "://" in target or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(
            f"Expected a Ray address 'host:port', 'ray://host:port' or 'auto' but got {address!r}"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        where = address if resolved == address else f"{address} ({resolved})"
        stale = " (a stale cluster file? see `ray status`)" if address == "auto" else ""
        raise CliError(
            f"Expected a Ray cluster at {where} but nothing accepted a connection within "
            f"{RAY_CONNECT_TIMEOUT_S:g}s ({exc.strerror or exc}){stale}"
        ) from exc
    if not resolved.lower().startswith("ray://"):
        _check_auth(address, host.strip("[]"), int(port))
    return resolved, label


def _check_auth(address: str, host: str, port: int) -> None:
    """One line, at once, when the address does not answer Ray's first request (something
    else listens there), or when the cluster needs a token this shell does not give.

    Otherwise ``ray.init`` would retry for :data:`RAY_INIT_TIMEOUT_S` (a silent listener) or
    about 30 s (a refused token), logging a warning each second.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return  # the driver sends its token; Ray reports a wrong one itself
    if os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true"):
        return  # this plain-text probe cannot speak to a TLS cluster: ray.init checks it
    try:
        import grpc  # type: ignore[import-untyped]
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # another Ray layout: leave it to ray.init (bounded by the watchdog)
        return
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        stub: Any = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)  # type: ignore[no-untyped-call]
        request: Any = gcs_service_pb2.GetClusterIdRequest()  # type: ignore[attr-defined]
        stub.GetClusterId(request, timeout=RAY_HANDSHAKE_TIMEOUT_S)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise CliError(
                f"Expected to join the Ray cluster at {address} but it requires token "
                f"authentication; {AUTH_HINT}"
            ) from exc
        if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            raise CliError(
                f"Expected a Ray cluster at {address} ({host}:{port}) but it accepted the "
                f"connection without answering as Ray does within "
                f"{RAY_HANDSHAKE_TIMEOUT_S:g}s ({exc.code().name}): another service listens there"
            ) from exc
    finally:
        channel.close()


def connect_ray(address: str, namespace: str, *, verbose: bool = False) -> str:
    """Join the Ray cluster at ``address`` after a reachability check; bounded in time.

    Returns the address joined as the commands print it (for ``auto``: with where it was
    found).

    Raises:
        CliError: Nothing listens there, or Ray refused or did not finish joining within
            :data:`RAY_INIT_TIMEOUT_S` (the message names token authentication, the usual
            cause since Ray 2.60).
    """
    resolved, label = _check_reachable(address)
    import ray

    def give_up() -> None:
        print(
            f"art-ray-metrics: error: Expected to join the Ray cluster at {address} within "
            f"{RAY_INIT_TIMEOUT_S:g}s but it did not answer as Ray does (if it uses token "
            f"authentication: {AUTH_HINT})",
            file=sys.stderr,
            flush=True,
        )
        os._exit(2)

    watchdog = threading.Timer(RAY_INIT_TIMEOUT_S, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        ray.init(
            address=resolved,
            namespace=namespace,
            log_to_driver=False,
            logging_level=logging.DEBUG if verbose else logging.ERROR,
        )
    except Exception as exc:
        text = _one_line(exc)
        hint = f"; {AUTH_HINT}" if "auth" in text.lower() or "token" in text.lower() else ""
        raise CliError(
            f"Expected to join the Ray cluster at {address} but got: {text}{hint}"
        ) from exc
    finally:
        watchdog.cancel()
    return label


def probe_storage(uri: str) -> None:
    """Fail fast when a remote storage URI cannot be read (no bucket, no credentials, no network).

    Local paths are not probed (they are created on demand).
    """
    if _is_local(uri):
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
    text = _one_line(exc)
    if not _METADATA_SERVICE.search(text):
        return text
    head = text.split(" failed: ", 1)[0] + " failed: " if " failed: " in text else ""
    return (
        f"{head}no credentials (none in the environment, and no instance metadata service on "
        "this machine gave any)"
    )


def _get_aggregator(args: argparse.Namespace, address: str) -> Any:
    import ray

    try:
        return ray.get_actor(args.name, namespace=args.namespace)
    except ValueError as exc:
        raise CliError(
            f"Expected an aggregator named {args.name!r} in namespace {args.namespace!r} "
            f"on the cluster at {address} but found none (is a run in progress?)"
        ) from exc


def _default_address(args: argparse.Namespace) -> str:
    """``--address``, else ``auto`` (which takes ``RAY_ADDRESS`` first, and says so)."""
    return str(args.address or "auto")


def cmd_status(args: argparse.Namespace) -> int:
    """``status``: a running aggregator's stats()."""
    address = connect_ray(_default_address(args), args.namespace, verbose=args.verbose)
    import ray

    try:
        actor = _get_aggregator(args, address)
        try:
            stats = AggregatorStats.as_map(ray.get(actor.stats.remote(), timeout=args.timeout))
        except Exception as exc:
            raise AggregatorUnavailableError(
                f"Expected the aggregator {args.name!r} to answer within {args.timeout}s but "
                f"got {type(exc).__name__}"
            ) from exc
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps({**stats, "ray_address": address}, indent=2, sort_keys=True, default=str))
        return 0
    table = Table(title=f"aggregator {args.name!r} ({args.namespace})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("Ray cluster", address)
    for key in ("run_name", "storage_uri", "epoch", "producers", "unique_scenarios"):
        table.add_row(key, str(stats.get(key)))
    fenced = stats.get("fenced")
    table.add_row(
        "writer",
        "fenced: another aggregator took over this storage; this one no longer writes"
        if fenced
        else "active (holds the writer epoch)",
    )
    table.add_row("last closed", json.dumps(stats.get("last_closed")))
    table.add_row("pending steps", json.dumps(stats.get("pending_steps")))
    table.add_row("costs/cum/all", f"${stats.get('cum', {}).get('costs/cum/all', 0.0):,.6f}")
    table.add_row("W&B run id", str(stats.get("wandb_run_id") or "none (W&B is off)"))
    for group in ("counters", "gauges", "health"):
        values = stats.get(group) or {}
        table.add_row(group, ", ".join(f"{k}={v}" for k, v in sorted(values.items())))
    table.add_row("uptime", f"{float(stats.get('uptime_s', 0.0)):.1f}s (pid {stats.get('pid')})")
    _console().print(table)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """``stop``: final checkpoint and W&B finish of a kept aggregator, then kill it."""
    address = connect_ray(_default_address(args), args.namespace, verbose=args.verbose)
    import ray

    try:
        actor = _get_aggregator(args, address)
        graceful = True
        detail = ""
        try:
            stats: dict[str, Any] = AggregatorStats.as_map(
                ray.get(actor.stats.remote(), timeout=args.timeout)
            )
            ray.get(actor.shutdown.remote(), timeout=args.timeout)
        except Exception as exc:
            graceful = False
            detail = f"{type(exc).__name__}: {_one_line(exc)}"
            stats = {}
        ray.kill(actor, no_restart=True)
    finally:
        ray.shutdown()
    if not graceful:
        print(
            f"art-ray-metrics stop: error: the aggregator {args.name!r} on the Ray cluster at "
            f"{address} did not shut down "
            f"within {args.timeout:g}s ({detail}); killed it without a final checkpoint (its "
            "write-ahead log still holds every acknowledged flush)",
            file=sys.stderr,
        )
        return 1
    last = stats.get("last_closed") or {}
    print(
        f"stopped aggregator {args.name!r} ({args.namespace}) on the Ray cluster at {address}, "
        f"run {stats.get('run_name')!r}: "
        f"final checkpoint in {stats.get('storage_uri')} (last closed {json.dumps(last)})"
    )
    return 0


def cmd_fake_llm(args: argparse.Namespace) -> int:
    """``fake-llm``: serve the local fake OpenAI/Anthropic API until Ctrl-C (or SIGTERM).

    Prints the two ``export`` lines that point the SDKs at it on stdout (nothing else goes
    there, so ``art-ray-metrics fake-llm > fake-llm.env`` keeps them), the rest on stderr.
    """
    import signal

    from art_ray_metrics.ops.fakellm import FakeLLMServer

    if not 0 <= args.port < 65536:
        raise CliError(f"Expected --port between 0 (a free port) and 65535 but got {args.port}")
    try:
        server = FakeLLMServer(args.port).start()
    except OSError as exc:
        raise CliError(
            f"Expected to serve on 127.0.0.1:{args.port} but got: {exc.strerror or exc} "
            "(pass another --port, or 0 for a free one)"
        ) from exc
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for line in server.export_lines():
            print(line)
        sys.stdout.flush()
        print(
            f"art-ray-metrics fake-llm: serving fake OpenAI and Anthropic APIs on "
            f"127.0.0.1:{server.port} (no network; any key is accepted); run the export lines "
            "above in the shell that runs your code; Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        served = server.requests
        server.stop()
    print(f"art-ray-metrics fake-llm: stopped after {served} requests", file=sys.stderr)
    return 0


def _local_runs(root: str = "runs") -> list[str]:
    """The runs under ``root`` with a checkpoint, oldest first."""
    if not os.path.isdir(root):
        return []
    runs = [
        d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, ckpt_mod.POINTER_KEY))
    ]
    return sorted(runs, key=lambda d: os.path.getmtime(os.path.join(root, d)))


def _latest_local_run(root: str = "runs") -> str | None:
    runs = _local_runs(root)
    return runs[-1] if runs else None


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


MAX_ROLLOUTS_PER_CPU = 8
"""Rollout tasks of one step run at once, one Python worker each: at most this many per CPU."""
MAX_JUDGES_PER_CPU = 2
"""Judge actors (a process and a fake API server each): at most this many per CPU."""


def demo_limits(cpus: float) -> tuple[int, int]:
    """``(max rollouts, max judges)`` a Ray with ``cpus`` CPUs can run at once."""
    whole = max(1, int(cpus))
    return MAX_ROLLOUTS_PER_CPU * whole, MAX_JUDGES_PER_CPU * whole


def check_demo_sizes(rollouts: int, judges: int, cpus: float, where: str) -> None:
    """Raise :class:`CliError` for sizes that would swamp a Ray with ``cpus`` CPUs."""
    max_rollouts, max_judges = demo_limits(cpus)
    if rollouts > max_rollouts or judges > max_judges:
        raise CliError(
            f"Expected --rollouts <= {max_rollouts} and --judges <= {max_judges} on {where} "
            f"with {cpus:g} CPUs (each runs at once in its own Python process) but got "
            f"{rollouts} and {judges}; join a bigger cluster with --address"
        )


def cmd_demo(args: argparse.Namespace) -> int:
    """``demo``: the ART-style loop on Ray (see :mod:`art_ray_metrics.ops.demo`)."""
    if args.steps < 1 or args.rollouts < 1 or args.judges < 1:
        raise CliError(
            "Expected --steps, --rollouts and --judges >= 1 but got "
            f"{args.steps}, {args.rollouts}, {args.judges}"
        )
    max_cpus = 4 * (os.cpu_count() or 1)
    if not args.address and not 1 <= args.num_cpus <= max_cpus:
        raise CliError(
            f"Expected --num-cpus between 1 and {max_cpus} (4x this machine's "
            f"{os.cpu_count()} CPUs) but got {args.num_cpus}"
        )
    if not args.address:
        check_demo_sizes(args.rollouts, args.judges, args.num_cpus, "a local Ray")
    if args.keep and not args.address:
        raise CliError(
            "Expected --keep with --address (a local Ray stops with the demo, and the "
            "aggregator with it)"
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
    local_dir = (
        local_run_dir(storage) if args.storage else os.path.abspath(os.path.join("runs", run))
    )
    if args.resume and _is_local(storage) and not os.path.isdir(storage):
        # said before anything is created: opening the store would make the directory
        runs = _local_runs()
        raise CliError(
            f"Expected a run to resume at {storage} but found no such directory"
            + (f" (runs under ./runs: {', '.join(runs)})" if runs else "")
        )
    if args.address:
        _check_reachable(args.address)  # seconds, before the slow imports below (and Ray's)
    probe_storage(storage)
    try:
        from art_ray_metrics.ops import demo
    except ImportError as exc:
        raise CliError(
            f"Expected the demo extras but got {exc}; install them with "
            "pip install -e '.[demo]' in your clone of art-ray-metrics"
        ) from exc
    address, ray_label = args.address, None
    if args.address:
        ray_label = connect_ray(args.address, args.namespace, verbose=args.verbose)
        import ray

        address = str(ray.get_runtime_context().gcs_address)  # "auto" resolved, for the hints
        cpus = float(ray.cluster_resources().get("CPU", 0.0))  # type: ignore[no-untyped-call]
        try:
            check_demo_sizes(args.rollouts, args.judges, cpus, f"the cluster at {ray_label}")
        except CliError:
            ray.shutdown()
            raise
    else:
        # a local Ray instance: keep it on loopback and without token auth (Ray 2.60 turns it on)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
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
        address=address,
        ray_label=ray_label,
        num_cpus=args.num_cpus,
        expect_nodes=args.expect_nodes,
        name=args.name,
        namespace=args.namespace,
        wandb_mode=mode,
        wandb_dir=local_dir if mode != "disabled" else None,
        charts=tuple(args.chart or ()),
        summary_json=args.summary_json,
        storage_flag=args.storage is not None,
    )
    try:
        demo.run_demo(opts)
    except demo.DemoInterrupted as exc:
        print(f"\nart-ray-metrics demo: interrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(
            "\nart-ray-metrics demo: interrupted before the aggregator started; nothing was "
            "recorded",
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

    f = sub.add_parser(
        "fake-llm",
        help="serve a local fake OpenAI/Anthropic API and print the export lines that use it",
    )
    f.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: a free port)")
    f.set_defaults(func=cmd_fake_llm)

    s = sub.add_parser("status", help="show a running aggregator's stats")
    s.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS or 'auto')")
    s.add_argument("--name", default=DEFAULT_NAME, help="aggregator actor name")
    s.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="aggregator namespace")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for stats()")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)

    t = sub.add_parser(
        "stop", help="stop an aggregator left running with demo --keep (final checkpoint)"
    )
    t.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS or 'auto')")
    t.add_argument("--name", default=DEFAULT_NAME, help="aggregator actor name")
    t.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="aggregator namespace")
    t.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the final checkpoint"
    )
    t.set_defaults(func=cmd_stop)
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


def _one_line(exc: BaseException, limit: int | None = 500) -> str:
    text = " ".join(str(exc).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CheckpointCorruptError):
        return (
            f"unreadable checkpoint (corrupt, or written by another format version): "
            f"{_one_line(exc)}"
        )
    if isinstance(exc, WireFormatError):
        return f"unreadable state (corrupt, or another format version): {_one_line(exc)}"
    if isinstance(exc, StorageError):
        return f"storage failed: {storage_reason(exc)}"
    if isinstance(exc, CliError):
        return _one_line(exc, limit=None)  # ours: whole (e.g. every valid --columns name)
    return _one_line(exc)


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
            f"art-ray-metrics {args.command}: error: {type(exc).__name__}: {_one_line(exc)}"
            + ("" if args.verbose else " (-v shows the traceback)"),
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
