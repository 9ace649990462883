"""The commands that start something: ``demo`` (an ART-style loop on Ray) and ``fake-llm``.

``cmd_demo`` checks every flag, the Ray address and the storage before the demo's slow imports
(its own Ray, the SDKs), then hands :class:`~art_ray_metrics.ops.demo.DemoOptions` to
:func:`~art_ray_metrics.ops.demo.run_demo` and maps its outcome to an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any, Literal

from art_ray_metrics.durable.checkpoint import POINTER_KEY
from art_ray_metrics.ops.cli.cluster import check_reachable, connect_ray
from art_ray_metrics.ops.cli.common import CliError, is_local, local_path, local_run_dir
from art_ray_metrics.ops.cli.storage import probe_storage

__all__ = [
    "MAX_JUDGES_PER_CPU",
    "MAX_ROLLOUTS_PER_CPU",
    "check_demo_sizes",
    "cmd_demo",
    "cmd_fake_llm",
    "demo_limits",
]


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
    runs = [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, POINTER_KEY))]
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


def _check_demo_flags(args: argparse.Namespace) -> None:
    """The flags alone (no I/O): sizes, a local Ray's CPUs, ``--keep`` only with ``--address``."""
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


def _demo_run_paths(args: argparse.Namespace) -> tuple[str, str, str]:
    """``(run name, storage URI, local run directory)`` of the demo; checks a ``--resume``."""
    run = args.run
    if run is None and args.resume and args.storage is None:
        run = _latest_local_run()
        if run is None:
            raise CliError("Expected a run under ./runs to resume but found none; pass --run")
    if run is None:
        run = "demo-" + time.strftime("%Y%m%d-%H%M%S")
    storage = args.storage or os.path.abspath(os.path.join("runs", run))
    if is_local(storage):
        storage = os.path.abspath(local_path(storage))
    local_dir = (
        local_run_dir(storage) if args.storage else os.path.abspath(os.path.join("runs", run))
    )
    if args.resume and is_local(storage) and not os.path.isdir(storage):
        # said before anything is created: opening the store would make the directory
        runs = _local_runs()
        raise CliError(
            f"Expected a run to resume at {storage} but found no such directory"
            + (f" (runs under ./runs: {', '.join(runs)})" if runs else "")
        )
    return run, storage, local_dir


def _join_for_demo(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """Join ``--address`` (checking it has room for the demo), or prepare a local Ray.

    Returns the address (``auto`` resolved, for the hints) and how to name it, or
    ``(None, None)`` for a local Ray.
    """
    if not args.address:
        # a local Ray instance: keep it on loopback and without token auth (Ray 2.60 turns it on)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        return None, None
    ray_label = connect_ray(args.address, args.namespace, verbose=args.verbose)
    import ray

    address = str(ray.get_runtime_context().gcs_address)
    cpus = float(ray.cluster_resources().get("CPU", 0.0))  # type: ignore[no-untyped-call]
    try:
        check_demo_sizes(args.rollouts, args.judges, cpus, f"the cluster at {ray_label}")
    except CliError:
        ray.shutdown()
        raise
    return address, ray_label


def cmd_demo(args: argparse.Namespace) -> int:
    """``demo``: the ART-style loop on Ray (see :mod:`art_ray_metrics.ops.demo`)."""
    _check_demo_flags(args)
    run, storage, local_dir = _demo_run_paths(args)
    if args.address:
        check_reachable(args.address)  # seconds, before the slow imports below (and Ray's)
    probe_storage(storage)
    try:
        from art_ray_metrics.ops import demo
    except ImportError as exc:
        raise CliError(
            f"Expected the demo extras but got {exc}; install them with "
            "pip install -e '.[demo]' in your clone of art-ray-metrics"
        ) from exc
    address, ray_label = _join_for_demo(args)
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
        return _run_demo(demo, opts)
    finally:
        if address is not None:  # the Ray this command joined (the demo leaves it up)
            import ray

            ray.shutdown()


def _run_demo(demo: Any, opts: Any) -> int:
    """Run the demo; its interruptions and errors as the CLI's exit codes."""
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
