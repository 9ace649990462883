"""What the demo shows: the live step table and progress lines, the summary, the charts.

Nothing here starts Ray or touches storage; each function renders what it is given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from art_ray_metrics.export.wandb_offline import offline_sync_command
from art_ray_metrics.ops.demo.options import DemoOptions, DemoResult

__all__ = [
    "CHAOS_NOTICE",
    "aggregator_starts",
    "chaos_table",
    "chart_figure",
    "fmt",
    "fmt_usd",
    "print_summary",
    "step_line",
    "step_table",
    "wandb_summary",
    "write_chart",
]

CHAOS_NOTICE = (
    "[yellow]chaos:[/] step {step}: rollout 0 will end its worker process on "
    "purpose after its judge was paid (Ray will report a worker that died "
    "unexpectedly, possibly naming the OOM killer: that is this demo, not a "
    "memory problem) and Ray retries it; the aggregator actor is killed "
    "mid-step and restarts from its checkpoint and write-ahead log"
)
"""Said before Ray's own "worker died ... (OOM killer?)" report of the ``--chaos`` kill."""


def fmt_usd(value: float | None) -> str:
    """Dollars to the hundredth of a cent, or ``-``."""
    return "-" if value is None else f"${value:,.4f}"


def fmt(value: float | None, spec: str = ",.1f") -> str:
    """``value`` formatted with ``spec``, or ``-`` (none, or NaN)."""
    return "-" if value is None or math.isnan(value) else format(value, spec)


def step_table(rows: list[dict[str, Any]]) -> Table:
    """The live table of the steps closed so far (``step``, ``row``, ``nodes``, ``seconds``)."""
    table = Table(title="steps", title_justify="left", expand=False)
    for col, justify in (
        ("step", "right"),
        ("costs/all", "right"),
        ("costs/cum/all", "right"),
        ("unique ids", "right"),
        ("actor tok/s", "right"),
        ("reward/mean", "right"),
        ("nodes", "right"),
        ("seconds", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            str(r["step"]),
            fmt_usd(r["row"].get("costs/all")),
            fmt_usd(r["row"].get("costs/cum/all")),
            fmt(r["row"].get("data/cum/num_unique_scenarios"), ",.0f"),
            fmt(r["row"].get("throughput/avg_actor_tok_per_s")),
            fmt(r["row"].get("reward/mean"), ".3f"),
            str(r["nodes"]),
            f"{r['seconds']:.1f}",
        )
    return table


def step_line(step: int, row: Mapping[str, float], nodes: int) -> str:
    """The progress line of a closed step when the console is not a terminal (no live table)."""
    return (
        f"step {step}: costs/cum/all {fmt_usd(row.get('costs/cum/all'))}, "
        f"reward/mean {fmt(row.get('reward/mean'), '.3f')}, "
        f"{nodes} node(s)"
    )


def chaos_table(rows: Sequence[tuple[str, float | None, float | None, bool]]) -> Table:
    """The ``--chaos`` comparison (see :func:`~.workload.compare_totals`) as a table."""
    table = Table(title="--chaos: totals after a killed worker and a killed aggregator")
    table.add_column("key")
    table.add_column("aggregator", justify="right")
    table.add_column("in-process reference", justify="right")
    table.add_column("", justify="center")
    for key, got, want, equal in rows:
        table.add_row(key, fmt(got, ",.6f"), fmt(want, ",.6f"), "✓" if equal else "✗")
    return table


def write_chart(
    rows: Sequence[Mapping[str, Any]],
    paths: Iterable[str],
    title: str,
    events: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """Plot ``costs/cum/all``, each step's spend by outcome (``costs/outcome/<fate>``
    stacked; ``costs/all`` for rows without outcomes) and ``reward/mean`` against
    ``training_step``; return the paths.

    ``events`` (``{"step": s, "what": "resumed"}``, see :data:`~.files.EVENTS_KEY`) are marked with a
    dashed vertical line at their step, labelled.
    """
    import matplotlib.pyplot as plt

    fig = chart_figure(rows, title, events)
    written = []
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path)
        written.append(path)
    plt.close(fig)
    return written


def chart_figure(
    rows: Sequence[Mapping[str, Any]], title: str, events: Sequence[Mapping[str, Any]] = ()
) -> Any:
    """The chart's matplotlib figure (see :func:`write_chart`); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [float(r["training_step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    cum = [float(r.get("costs/cum/all", 0.0)) for r in rows]
    _spend_bars(ax, steps, rows)
    ax.plot(steps, cum, marker="o", color="#08519c", label="costs/cum/all")
    ax.set_xlabel("training_step")
    ax.set_ylabel("judge spend (USD)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    reward = [float(r.get("reward/mean", math.nan)) for r in rows]
    ax2.plot(steps, reward, marker="s", color="#d94801", label="reward/mean")
    ax2.set_ylabel("reward/mean")
    ax2.set_ylim(0, 1)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=10)
    for event in events:
        # a resume starts at its step: mark just before it; a kill happens during its step
        x = float(event["step"]) - (0.5 if event["what"] == "resumed" else 0.0)
        color = "#2ca02c" if event["what"] == "resumed" else "#d62728"
        ax.axvline(x, linestyle="--", linewidth=1, color=color)
        ax.annotate(
            str(event["what"]),
            xy=(x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -12),
            textcoords="offset points",
            fontsize=7,
            color=color,
        )
    fig.tight_layout()
    return fig


_OUTCOME_COLORS = {
    "trained": "#9ecae1",
    "zero_variance": "#fdae6b",
    "stale": "#bcbddc",
    "errored": "#fc9272",
    "discarded": "#d9d9d9",
    "unknown": "#c7e9c0",
}
"""Bar colours of the ``costs/outcome/<fate>`` keys, in stacking order."""


def _spend_bars(ax: Any, steps: list[float], rows: Sequence[Mapping[str, Any]]) -> None:
    """Each step's spend as bars: stacked by outcome where a row has them (the fates that
    ever held spend), else ``costs/all``."""
    fates = [
        fate
        for fate in _OUTCOME_COLORS
        if any(float(r.get(f"costs/outcome/{fate}", 0.0)) > 0 for r in rows)
    ]
    has = [any(f"costs/outcome/{f}" in r for f in _OUTCOME_COLORS) for r in rows]
    plain = [0.0 if h else float(r.get("costs/all", 0.0)) for r, h in zip(rows, has, strict=True)]
    if any(plain) or not fates:
        ax.bar(steps, plain, width=0.6, color="#c6dbef", label="costs/all (per step)")
    bottom = [0.0] * len(rows)
    for fate in fates:
        values = [float(r.get(f"costs/outcome/{fate}", 0.0)) for r in rows]
        ax.bar(
            steps,
            values,
            width=0.6,
            bottom=bottom,
            color=_OUTCOME_COLORS[fate],
            label=f"costs/outcome/{fate}",
        )
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]


def print_summary(
    console: Console, out: DemoResult, stats: Mapping[str, Any], opts: DemoOptions
) -> None:
    """The end-of-run summary table and the commands that inspect, continue or stop the run."""
    t = out.totals
    table = Table(title=f"run {out.run!r}: summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    judge = {k: v for k, v in t.items() if k.startswith("costs/cum/train/llm_judge/")}
    lines: list[tuple[str, str]] = [
        ("steps", f"{out.first_step}..{out.last_step} this session; {out.rows} rows in history"),
        ("costs/cum/all", fmt_usd(t.get("costs/cum/all"))),
        *[(k, fmt_usd(v)) for k, v in sorted(judge.items())],
        ("data/cum/actor_tokens", fmt(t.get("data/cum/actor_tokens"), ",.0f")),
        ("data/cum/num_scenarios", fmt(t.get("data/cum/num_scenarios"), ",.0f")),
        ("unique scenario ids", f"{out.unique_scenarios:,}"),
        ("nodes used", str(out.nodes_used)),
        ("storage", out.storage_uri),
        ("W&B", wandb_summary(opts, out.wandb_run_id)),
        (
            "aggregator counters",
            ", ".join(f"{k}={v}" for k, v in sorted(out.counters.items())),
        ),
        ("aggregator", aggregator_starts(stats, opts.resume, out.params["starts_before"])),
        ("chart", ", ".join(out.charts)),
        (
            "time",
            f"{out.seconds:.1f}s (of which {out.startup_seconds:.1f}s starting Ray, the "
            "aggregator and worker processes, before the first step)",
        ),
    ]
    for what, value in lines:
        table.add_row(what, value)
    console.print(table)
    console.print(
        f"inspect it: [bold]art-ray-metrics inspect {out.storage_uri}[/]  ·  "
        f"continue it: [bold]{opts.resume_command()}[/]"
    )
    if opts.wandb_mode == "offline" and opts.wandb_dir is not None:
        console.print(
            f"upload W&B: [bold]{offline_sync_command(opts.wandb_dir, out.wandb_run_id)}[/]"
        )
    if opts.keep:
        console.print(
            f"the aggregator keeps running: [bold]art-ray-metrics stop --address "
            f"{opts.address} --name {opts.name} --namespace {opts.namespace}[/] ends it"
        )


def aggregator_starts(stats: Mapping[str, Any], resumed: bool, starts_before: int) -> str:
    """The summary's line on the aggregator: resumed or new, and its restarts after a crash.

    ``telemetry/restarts`` counts every start after the run's first, a clean ``--resume``
    included; only what is left after this session's resume were crashes Ray recovered from.

    >>> aggregator_starts({"gauges": {"telemetry/restarts": 1.0}}, True, 0)
    'resumed from its checkpoint; no crash restarts this session'
    >>> aggregator_starts({"gauges": {"telemetry/restarts": 2.0}}, False, 0)
    'new run; 2 crash restarts this session (Ray restarted it from its checkpoint and log)'
    """
    total = int(stats.get("gauges", {}).get("telemetry/restarts", 0))
    crashes = max(0, total - starts_before - (1 if resumed else 0))
    how = "resumed from its checkpoint" if resumed else "new run"
    if crashes == 0:
        return f"{how}; no crash restarts this session"
    plural = "restart" if crashes == 1 else "restarts"
    return (
        f"{how}; {crashes} crash {plural} this session (Ray restarted it from its checkpoint "
        "and log)"
    )


def wandb_summary(opts: DemoOptions, run_id: str | None) -> str:
    """The summary's W&B line: off, or the run and (offline) where its files are."""
    if run_id is None:
        return "off"
    if opts.wandb_mode == "offline" and opts.wandb_dir is not None:
        return f"offline run {run_id}, files in {os.path.join(opts.wandb_dir, 'wandb')}"
    return f"{opts.wandb_mode} run {run_id}"
