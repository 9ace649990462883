"""The cluster commands: ``status`` and ``stop``, and joining a Ray cluster for any command.

Before ``ray.init`` (whose retries take a minute), an address is checked in seconds: ``auto``
must resolve to exactly one cluster (:func:`resolve_auto`), the address must accept a TCP
connection, and its GCS must answer Ray's first request (the probe is in
:mod:`art_ray_metrics.ops.rayprobe`, which owns every use of Ray's internals).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from art_ray_metrics.core.replies import AggregatorStats
from art_ray_metrics.errors import AggregatorUnavailableError
from art_ray_metrics.ops import rayprobe
from art_ray_metrics.ops.cli.common import CliError, one_line, table_console

__all__ = [
    "AUTH_HINT",
    "RAY_CONNECT_TIMEOUT_S",
    "RAY_HANDSHAKE_TIMEOUT_S",
    "RAY_INIT_TIMEOUT_S",
    "check_reachable",
    "cmd_status",
    "cmd_stop",
    "connect_ray",
    "find_auto_address",
    "resolve_auto",
]

RAY_CONNECT_TIMEOUT_S = 3.0
"""How long a Ray address may take to accept a TCP connection."""
RAY_HANDSHAKE_TIMEOUT_S = 10.0
"""How long a reachable address may take to answer Ray's first request (the cluster id)."""
RAY_INIT_TIMEOUT_S = 45.0
"""How long joining a reachable Ray cluster may take before the command gives up."""

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
    return resolve_auto(
        os.environ.get("RAY_ADDRESS"),
        rayprobe.cluster_file_address(),
        rayprobe.running_gcs_addresses(),
    )


def check_reachable(address: str) -> tuple[str, str]:
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
    answer, status = rayprobe.gcs_handshake(host, port, RAY_HANDSHAKE_TIMEOUT_S)
    if answer == "unauthenticated":
        raise CliError(
            f"Expected to join the Ray cluster at {address} but it requires token "
            f"authentication; {AUTH_HINT}"
        )
    if answer == "silent":
        raise CliError(
            f"Expected a Ray cluster at {address} ({host}:{port}) but it accepted the "
            f"connection without answering as Ray does within "
            f"{RAY_HANDSHAKE_TIMEOUT_S:g}s ({status}): another service listens there"
        )


def connect_ray(address: str, namespace: str, *, verbose: bool = False) -> str:
    """Join the Ray cluster at ``address`` after a reachability check; bounded in time.

    Returns the address joined as the commands print it (for ``auto``: with where it was
    found).

    Raises:
        CliError: Nothing listens there, or Ray refused or did not finish joining within
            :data:`RAY_INIT_TIMEOUT_S` (the message names token authentication, the usual
            cause since Ray 2.60).
    """
    resolved, label = check_reachable(address)
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
        text = one_line(exc)
        hint = f"; {AUTH_HINT}" if "auth" in text.lower() or "token" in text.lower() else ""
        raise CliError(
            f"Expected to join the Ray cluster at {address} but got: {text}{hint}"
        ) from exc
    finally:
        watchdog.cancel()
    return label


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
            stats: dict[str, Any] = AggregatorStats.as_map(
                ray.get(actor.stats.remote(), timeout=args.timeout)
            )
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
    table_console().print(table)
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
            detail = f"{type(exc).__name__}: {one_line(exc)}"
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
