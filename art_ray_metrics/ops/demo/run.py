"""The demo's run: Ray (joined or started), the aggregator, judge actors, rollout tasks, the
step loop, and ``--chaos``.

:func:`run_demo` is the whole demo: it loads the session's workload (:mod:`.files`), runs the
steps on Ray (:func:`_on_ray`), then reads the history back for the chart and the summary
(:mod:`.ui`). A Ray this module started is shut down when the steps end; a Ray the caller had
joined (the CLI's ``--address``, or a test's cluster) is left to the caller.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import ray
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from art_ray_metrics.config import AggregatorConfig
from art_ray_metrics.distributed.handle import AggregatorHandle, start_aggregator
from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.storage import open_store
from art_ray_metrics.ops.demo import ui
from art_ray_metrics.ops.demo.files import load_params, record_events, remove_stub
from art_ray_metrics.ops.demo.judges import reference_rows
from art_ray_metrics.ops.demo.options import DemoError, DemoInterrupted, DemoOptions, DemoResult
from art_ray_metrics.ops.demo.workers import ChaosLatch, Judge, rollout, warm_up
from art_ray_metrics.ops.demo.workload import (
    compare_totals,
    step_fates,
    trainer_loss,
)

__all__ = ["ROLLOUT_TIMEOUT_S", "run_demo"]

log = logging.getLogger(__name__)

ROLLOUT_TIMEOUT_S = 300.0
"""How long the rollouts of one step may take before the demo gives up."""


# --------------------------------------------------------------------------- Ray


def _init_ray(opts: DemoOptions) -> None:
    kwargs: dict[str, Any] = {
        "namespace": opts.namespace,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if ray.is_initialized():
        return  # the CLI joined the cluster already (after checking the address)
    if opts.address:
        ray.init(address=opts.address, **kwargs)
    else:
        # "local": always a new instance, even if `ray start` left a cluster on this machine
        ray.init(address="local", num_cpus=opts.num_cpus, include_dashboard=False, **kwargs)


def _start_ray(opts: DemoOptions, console: Console) -> bool:
    """Join or start Ray unless this process is connected; return whether the demo did."""
    owned = not ray.is_initialized()
    if owned:
        console.print(
            f"starting a local Ray instance ({opts.num_cpus} CPUs; usually 10-20 s, longer on "
            "a busy machine) ..."
        )
    try:
        _init_ray(opts)
    except KeyboardInterrupt:
        raise DemoInterrupted("while Ray was starting; nothing was recorded") from None
    return owned


def _alive_nodes() -> int:
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return sum(1 for n in nodes if n.get("Alive"))


def _wait_for_nodes(expected: int, timeout_s: float = 120.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = _alive_nodes()
        if alive >= expected:
            return alive
        if time.monotonic() > deadline:
            raise DemoError(
                f"Expected {expected} alive Ray nodes but got {alive} after {timeout_s}s"
            )
        time.sleep(0.5)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# --------------------------------------------------------------------------- the driver


@dataclass
class _Session:
    """This session's steps and where it is (for the Ctrl-C message and the summary)."""

    seed: int
    rollouts: int
    first: int
    last: int
    step: int | None = None
    ready_at: float | None = None


def run_demo(opts: DemoOptions, console: Console | None = None) -> DemoResult:
    """Run the demo end to end; raises :class:`DemoError` for problems the user can fix.

    Ctrl-C raises :class:`DemoInterrupted` saying whether the aggregator had started and
    checkpointed. A new run that fails before anything was recorded leaves no directory behind.
    """
    console = console or (Console() if sys.stdout.isatty() else Console(width=120))
    started = time.monotonic()
    params = load_params(opts)
    try:
        return _run(opts, console, params, started)
    except BaseException:
        if not opts.resume:
            remove_stub(opts)
        raise


def _run(
    opts: DemoOptions, console: Console, params: Mapping[str, Any], started: float
) -> DemoResult:
    seed, rollouts, first = int(params["seed"]), int(params["rollouts"]), int(params["start"])
    if opts.resume:
        console.print(f"[bold]resuming[/] run {opts.run!r} at step {first} (seed {seed})")
    session = _Session(seed, rollouts, first, first + opts.steps - 1)
    started_ray = _start_ray(opts, console)
    try:
        result, stats = _on_ray(opts, console, session)
    finally:
        if started_ray:  # a Ray the caller joined is the caller's to shut down
            ray.shutdown()
    return _finish(opts, console, session, result, stats, params, started)


def _on_ray(
    opts: DemoOptions, console: Console, session: _Session
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The steps, on a connected Ray; returns the loop's result and the aggregator's stats."""
    if opts.expect_nodes:
        _wait_for_nodes(opts.expect_nodes)
    where = opts.ray_label or (
        f"{ray.get_runtime_context().gcs_address} (a local Ray for this demo; it stops with it)"
    )
    console.print(
        f"Ray: {_alive_nodes()} node(s) at {where}; aggregator {opts.name!r} (namespace "
        f"{opts.namespace!r}); storage {opts.storage_uri}"
    )
    handle = _start_aggregator(opts)
    result = _loop_or_save(opts, console, handle, session)
    stats = handle.stats()
    if opts.keep:
        handle.checkpoint()
    else:
        handle.shutdown()
    return result, stats


def _start_aggregator(opts: DemoOptions) -> AggregatorHandle:
    try:
        return start_aggregator(
            AggregatorConfig(
                name=opts.name,
                namespace=opts.namespace,
                run_name=opts.run,
                storage_uri=opts.storage_uri,
                wandb_mode=opts.wandb_mode,
                wandb_dir=opts.wandb_dir,
            )
        )
    except KeyboardInterrupt:
        raise DemoInterrupted(
            "while the aggregator was starting; no step was run (the aggregator may "
            f"have written its first checkpoint to {opts.storage_uri})"
        ) from None
    except (DemoError, DemoInterrupted):
        raise
    except Exception as exc:
        raise DemoError(
            f"Expected the aggregator to start with storage {opts.storage_uri} but got "
            f"{_first_line(exc)} (-v shows Ray's traceback)"
        ) from exc


def _loop_or_save(
    opts: DemoOptions, console: Console, handle: AggregatorHandle, session: _Session
) -> dict[str, Any]:
    """:func:`_loop`; if it fails, the aggregator's final checkpoint (unless ``--keep``), and
    Ctrl-C as :class:`DemoInterrupted` saying what was saved and how to continue."""
    try:
        return _loop(opts, console, handle, session)
    except BaseException as exc:
        saved = False
        if not opts.keep:
            try:
                handle.shutdown()  # final checkpoint: --resume continues from here
                saved = True
            except BaseException as shut_exc:
                console.print(f"[red]aggregator shutdown failed:[/] {shut_exc}")
        if not isinstance(exc, KeyboardInterrupt):
            raise
        step = session.step
        where = f"during step {step}" if step is not None else "before the first step"
        if saved:
            done = f"the aggregator checkpointed run {opts.run!r} and stopped"
        elif opts.keep:
            done = f"the aggregator of run {opts.run!r} keeps running (--keep)"
        else:
            done = (
                "the aggregator did not confirm its final checkpoint; what rollouts "
                "flushed is in its write-ahead log"
            )
        raise DemoInterrupted(
            f"{where}; {done}: continue it with {opts.resume_command()}"
        ) from None


@dataclass
class _Workers:
    """The Ray side of the loop: judge actors, the rollout task, the ``--chaos`` latch."""

    judges: list[Any]
    rollout: Any
    chaos_step: int | None
    latch: Any


def _start_workers(
    opts: DemoOptions, console: Console, session: _Session
) -> tuple[_Workers, set[str]]:
    """Judges, the rollout task and the latch; warm worker processes. Returns the nodes used."""
    judge_cls: Any = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(Judge)
    judges = [
        judge_cls.options(scheduling_strategy="SPREAD").remote(opts.name, opts.namespace)
        for _ in range(opts.judges)
    ]
    chaos_step = session.first + opts.steps // 2 if opts.chaos else None
    latch = None
    if chaos_step is not None:
        latch = ray.remote(num_cpus=0)(ChaosLatch).remote(chaos_step, 0)
    nodes_used: set[str] = set(ray.get([j.node_id.remote() for j in judges]))
    # start the rollouts' worker processes now, so step timings do not include Ray starting
    # them (seconds each on a busy machine); idle workers are reused by the first step
    console.print(f"starting {session.rollouts} rollout worker processes ...")
    warm = ray.remote(num_cpus=0)(warm_up)
    ray.get([warm.options(scheduling_strategy="SPREAD").remote() for _ in range(session.rollouts)])
    rollout_task = ray.remote(num_cpus=0, max_retries=3)(rollout)
    return _Workers(judges, rollout_task, chaos_step, latch), nodes_used


def _loop(
    opts: DemoOptions, console: Console, handle: AggregatorHandle, session: _Session
) -> dict[str, Any]:
    workers, nodes_used = _start_workers(opts, console, session)
    session.ready_at = time.monotonic()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    steps_task = progress.add_task("steps", total=opts.steps)
    step_task = progress.add_task("rollouts", total=session.rollouts)
    done: list[dict[str, Any]] = []
    live = Live(Group(ui.step_table(done), progress), console=console, refresh_per_second=8)
    with live:
        for step in range(session.first, session.last + 1):
            session.step = step
            t0 = time.monotonic()
            results = _run_step(opts, handle, session, workers, (progress, step_task), step)
            step_nodes = {r["node_id"] for r in results}
            nodes_used |= step_nodes
            scores = [float(r["score"]) for r in results]
            row = handle.log(
                step,
                metrics={
                    "loss": trainer_loss(session.seed, step),
                    "reward/mean": sum(scores) / len(scores),
                },
                group_fates=step_fates(session.seed, step, session.rollouts),
            )
            done.append(
                {
                    "step": step,
                    "row": row,
                    "nodes": len(step_nodes),
                    "seconds": time.monotonic() - t0,
                }
            )
            progress.advance(steps_task)
            live.update(Group(ui.step_table(done[-12:]), progress))
            if not console.is_terminal:
                console.print(ui.step_line(step, row, len(step_nodes)))
    console.print()
    for judge in workers.judges:
        ray.kill(judge)
    return {"nodes_used": len(nodes_used), "rows": done, "chaos_step": workers.chaos_step}


def _run_step(
    opts: DemoOptions,
    handle: AggregatorHandle,
    session: _Session,
    workers: _Workers,
    bar: tuple[Progress, TaskID],
    step: int,
) -> list[dict[str, Any]]:
    """Submit the rollouts of ``step`` (and the ``--chaos`` kills); wait for their results."""
    progress, step_task = bar
    chaos = step == workers.chaos_step
    if chaos:
        progress.console.print(ui.CHAOS_NOTICE.format(step=step))
    rollouts = session.rollouts
    progress.reset(step_task, total=rollouts, description=f"step {step} rollouts")
    refs = [
        workers.rollout.options(scheduling_strategy="SPREAD").remote(
            step,
            i,
            session.seed,
            rollouts,
            opts.name,
            opts.namespace,
            workers.judges[i % len(workers.judges)],
            workers.latch if chaos else None,
        )
        for i in range(rollouts)
    ]
    if chaos:
        time.sleep(0.3)
        progress.console.print("[yellow]chaos:[/] killing the aggregator actor now")
        ray.kill(handle.actor, no_restart=False)
    results: list[dict[str, Any]] = []
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=ROLLOUT_TIMEOUT_S)
        if not ready:
            raise DemoError(
                f"Expected rollouts of step {step} to finish within {ROLLOUT_TIMEOUT_S:g}s"
            )
        results.extend(ray.get(ready))
        progress.advance(step_task, len(ready))
    return results


def _finish(
    opts: DemoOptions,
    console: Console,
    session: _Session,
    result: Mapping[str, Any],
    stats: Mapping[str, Any],
    params: Mapping[str, Any],
    started: float,
) -> DemoResult:
    """After Ray: the chart, the ``--chaos`` check and the summary, from the stored history."""
    rollouts = session.rollouts
    history = list(HistoryStore(open_store(opts.storage_uri)).read(split="train"))
    events = record_events(opts, session.first, result.get("chaos_step"))
    charts = ui.write_chart(
        history,
        [os.path.join(opts.local_dir, "chart.png"), *opts.charts],
        f"art-ray-metrics demo: run {opts.run!r}, {rollouts} rollouts/step, {opts.judges} judges",
        events,
    )
    final = history[-1] if history else {}
    chaos = None
    if opts.chaos:
        chaos = _check_chaos(console, final, session.seed, rollouts, session.last)
    out = DemoResult(
        run=opts.run,
        storage_uri=opts.storage_uri,
        first_step=session.first,
        last_step=session.last,
        rows=len(history),
        totals={k: float(v) for k, v in final.items() if isinstance(k, str) and "/cum/" in k},
        unique_scenarios=int(stats.get("unique_scenarios", 0)),
        nodes_used=result["nodes_used"],
        wandb_run_id=stats.get("wandb_run_id"),
        counters={k: int(v) for k, v in stats.get("counters", {}).items()},
        charts=charts,
        chaos=chaos,
        seconds=time.monotonic() - started,
        startup_seconds=float(session.ready_at or started) - started,
        params={
            "seed": session.seed,
            "rollouts": rollouts,
            "judges": opts.judges,
            "starts_before": int(params.get("starts_before", 0)),
        },
    )
    ui.print_summary(console, out, stats, opts)
    if opts.summary_json:
        with open(opts.summary_json, "w", encoding="utf-8") as fp:
            json.dump(asdict(out), fp, indent=2, sort_keys=True)
    if chaos is not None and not chaos["equal"]:
        raise DemoError("--chaos: the aggregator's totals differ from the in-process reference")
    return out


def _check_chaos(
    console: Console, final: Mapping[str, Any], seed: int, rollouts: int, last: int
) -> dict[str, Any]:
    console.print("computing the same leaves in process (MetricsBuilder) for comparison ...")
    reference = reference_rows(seed, rollouts, range(0, last + 1))[-1]
    row = {
        k: float(v) for k, v in final.items() if k != "recorded_at" and isinstance(v, int | float)
    }
    rows = compare_totals(row, reference)
    console.print(ui.chaos_table(rows))
    equal = bool(rows) and all(r[3] for r in rows)
    return {"equal": equal, "keys": len(rows), "mismatches": [r[0] for r in rows if not r[3]]}
