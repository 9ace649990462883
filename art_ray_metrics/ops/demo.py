"""``art-ray-metrics demo``: an ART-style RL loop on Ray, recorded with art_ray_metrics.

What runs (one driver, any number of Ray nodes)::

    driver (trainer)                      rollout tasks (N per step, SPREAD)     judge actors (M, SPREAD)
    ----------------                      ----------------------------------     ------------------------
    start_aggregator(run, storage)
    for step in steps:
        submit N rollouts  ───────────►   connect(step)
                                          judge.judge(step, plan) ───────────►   connect(step); activate
                                                                                 OpenAI + Anthropic SDK calls
                                                                                 to a local fake API server,
                                                                                 @track_api_cost -> costs/...
                                                                                 flush() (durable)
                                          add_data / add_user_timing /
                                          add_metric("reward/...")
                                          flush() (durable)
        handle.log(step, {loss, reward/mean})   # the barrier: one row per step
    shutdown (final checkpoint, W&B finish), chart

The workload is a pure function of ``--seed``, the step and the rollout index (scenario ids,
token counts, the prompts, hence the fake API's usage and response ids), so the same leaves can
be recomputed in process: ``--chaos`` kills one rollout worker after its judge was paid and
before it flushed (Ray retries the task; the judge's response has the same id and is counted
once) and kills the aggregator actor mid-step (Ray restarts it from its checkpoint and log;
clients resend what was not durable), then compares every ``costs/cum/*`` and ``data/cum/*``
total with an in-process :class:`~art_ray_metrics.MetricsBuilder` fed the same leaves.
Timings (``time/``) are wall-clock and not compared.

Files: ``<storage>`` holds the aggregator's checkpoint, log and history (see
:mod:`art_ray_metrics.export.wandb_sink`), plus ``demo/params.json`` (seed and sizes, so ``--resume``
replays the same workload). The chart goes to ``<local run dir>/chart.png``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anthropic
import openai
import ray
from anthropic.types import Message
from openai.types.chat import ChatCompletion
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from art_ray_metrics.builder import LeafRecorder, MetricsBuilder
from art_ray_metrics.config import (
    DEFAULT_NAME,
    DEFAULT_NAMESPACE,
    AggregatorConfig,
    ClientConfig,
)
from art_ray_metrics.distributed.handle import AggregatorHandle, start_aggregator
from art_ray_metrics.distributed.record import connect
from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.storage import open_store
from art_ray_metrics.export.wandb_offline import offline_sync_command
from art_ray_metrics.ops.fakellm import FakeLLMServer, score_from_text
from art_ray_metrics.spend.track import track_api_cost

__all__ = [
    "ANTHROPIC_JUDGE",
    "OPENAI_JUDGE",
    "DemoOptions",
    "DemoResult",
    "JudgeClients",
    "RolloutPlan",
    "compare_totals",
    "judge_calls",
    "plan_rollout",
    "record_rollout",
    "reference_rows",
    "run_demo",
    "write_chart",
]

log = logging.getLogger(__name__)

OPENAI_JUDGE = "gpt-4.1-mini"
ANTHROPIC_JUDGE = "claude-sonnet-4-6"
PARAMS_KEY = "demo/params.json"
EVENTS_KEY = "demo/events.json"
"""Where the demo lists the steps at which a session resumed the run or ``--chaos`` killed
things (``[{"step": 4, "what": "resumed"}, ...]``), for the chart."""
STORE_LOCK = ".arm-store.lock"
"""The lock file a local store keeps in its directory (removed with a failed run's stub)."""
COMPARED_PREFIXES = ("costs/cum/", "data/cum/")


# --------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class RolloutPlan:
    """Everything one rollout does, derived from ``(seed, step, index)``."""

    step: int
    index: int
    scenario_id: str
    tokens: int
    actor_s: float
    answer: str
    quality: float

    @property
    def prompt(self) -> str:
        """The judge prompt (it determines the fake API's usage and response id)."""
        return (
            f"Grade this answer to {self.scenario_id} (step {self.step}, rollout {self.index}):"
            f" {self.answer} (quality={self.quality:.2f})"
        )


def plan_rollout(seed: int, step: int, index: int, rollouts: int) -> RolloutPlan:
    """The deterministic plan of rollout ``index`` at ``step``.

    Scenario ids are drawn from a pool of ``3 * rollouts`` ids, so the unique count grows over
    the first steps and then saturates.

    >>> plan_rollout(0, 1, 2, 4) == plan_rollout(0, 1, 2, 4)
    True
    """
    rng = random.Random(f"{seed}:{step}:{index}")
    pool = max(4, 3 * rollouts)
    tokens = rng.randrange(300, 1200)
    return RolloutPlan(
        step=step,
        index=index,
        scenario_id=f"scenario-{rng.randrange(pool):04d}",
        tokens=tokens,
        actor_s=round(tokens / rng.uniform(800.0, 1600.0), 3),
        answer=f"answer-{rng.getrandbits(32):08x}",
        # the policy "learns": answers get better with training (the fake judge scores this)
        quality=min(0.95, 0.3 + 0.55 * (1 - 0.75**step) + rng.uniform(-0.1, 0.1)),
    )


@track_api_cost(source="llm_judge/correctness", provider="openai", model_name=OPENAI_JUDGE)
def _grade(client: openai.OpenAI, prompt: str) -> ChatCompletion:
    return client.chat.completions.create(
        model=OPENAI_JUDGE, messages=[{"role": "user", "content": prompt}]
    )


@track_api_cost(source="llm_judge/style", provider="anthropic", model_name=ANTHROPIC_JUDGE)
def _style(client: anthropic.Anthropic, prompt: str) -> Message:
    return client.messages.create(
        model=ANTHROPIC_JUDGE, max_tokens=64, messages=[{"role": "user", "content": prompt}]
    )


class JudgeClients:
    """Real OpenAI and Anthropic SDK clients pointed at a :class:`FakeLLMServer`."""

    def __init__(self, server: FakeLLMServer) -> None:
        self.openai = openai.OpenAI(api_key="demo", base_url=server.openai_base_url, max_retries=2)
        self.anthropic = anthropic.Anthropic(
            api_key="demo", base_url=server.anthropic_base_url, max_retries=2
        )


def judge_calls(clients: JudgeClients, plan: RolloutPlan) -> float:
    """Two judge calls (OpenAI correctness, Anthropic style); returns the mean score.

    Costs are recorded by ``@track_api_cost`` on the builder active in the caller's context.
    """
    correctness = _grade(clients.openai, plan.prompt)
    style = _style(clients.anthropic, plan.prompt)
    text_a = correctness.choices[0].message.content or ""
    block = style.content[0] if style.content else None
    text_b = block.text if block is not None and block.type == "text" else ""
    return round((score_from_text(text_a) + score_from_text(text_b)) / 2, 4)


def record_rollout(builder: LeafRecorder, plan: RolloutPlan, score: float) -> None:
    """The leaves a rollout records (also used, unchanged, by the in-process reference)."""
    builder.add_data(
        step_num_scenarios=1, step_actor_tokens=plan.tokens, scenario_ids=[plan.scenario_id]
    )
    builder.add_user_timing(step_actor_s=plan.actor_s)
    builder.add_metric("reward/judge_score_sum", score)  # summed, as add_metric always is
    builder.add_sample("reward/judge_score", score)  # averaged over the step's rollouts


def trainer_loss(seed: int, step: int) -> float:
    """A made-up, decreasing training loss."""
    return round(2.0 * 0.85**step + random.Random(f"loss:{seed}:{step}").uniform(0, 0.05), 6)


# --------------------------------------------------------------------------- Ray workers


class Judge:
    """A judge worker (a Ray actor): its own fake API server, real SDK clients."""

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        self.server = FakeLLMServer().start()
        self.clients = JudgeClients(self.server)

    def judge(self, step: int, plan: RolloutPlan) -> float:
        """Judge one rollout; its API spend is durable at the aggregator when this returns."""
        builder = connect(step, name=self.name, namespace=self.namespace)
        with builder.activate_context(), builder.measure("time/step_eval_s"):
            score = judge_calls(self.clients, plan)
        builder.flush(timeout_s=120)
        return score

    def node_id(self) -> str:
        """The Ray node this judge runs on."""
        return str(ray.get_runtime_context().get_node_id())


class ChaosLatch:
    """Says "die" exactly once, to the rollout it was armed for (a Ray actor)."""

    def __init__(self, step: int, index: int) -> None:
        self.target = (step, index)
        self.fired = False

    def claim(self, step: int, index: int) -> bool:
        """True the first time ``(step, index)`` asks."""
        if not self.fired and (step, index) == self.target:
            self.fired = True
            return True
        return False


def _rollout(
    step: int,
    index: int,
    seed: int,
    rollouts: int,
    name: str,
    namespace: str,
    judge: Any,
    latch: Any,
) -> dict[str, Any]:
    plan = plan_rollout(seed, step, index, rollouts)
    # ship only at flush(): a rollout that crashes before flushing contributes nothing, and
    # its retry contributes everything once
    config = ClientConfig(name=name, namespace=namespace, flush_interval_s=3600.0)
    builder = connect(step, config=config)
    score: float = ray.get(judge.judge.remote(step, plan))
    record_rollout(builder, plan, score)
    if latch is not None and ray.get(latch.claim.remote(step, index)):
        os._exit(1)  # --chaos: the worker process dies; Ray retries the task
    result = builder.flush(timeout_s=120)
    return {"score": score, "node_id": ray.get_runtime_context().get_node_id(), "ok": result.ok}


def _warm_up() -> str:
    """A no-op task: makes Ray start a worker process before the first step."""
    return str(ray.get_runtime_context().get_node_id())


# --------------------------------------------------------------------------- reference


def reference_rows(seed: int, rollouts: int, steps: Iterable[int]) -> list[dict[str, float]]:
    """The rows one in-process :class:`MetricsBuilder` computes for the same leaves."""
    builder = MetricsBuilder("train")
    rows: list[dict[str, float]] = []
    with FakeLLMServer() as server:
        clients = JudgeClients(server)
        for step in steps:
            for index in range(rollouts):
                plan = plan_rollout(seed, step, index, rollouts)
                with builder.activate_context():
                    score = judge_calls(clients, plan)
                record_rollout(builder, plan, score)
            rows.append(asyncio.run(builder.flush()))
    return rows


def compare_totals(
    row: Mapping[str, float], reference: Mapping[str, float]
) -> list[tuple[str, float | None, float | None, bool]]:
    """``(key, aggregator, reference, equal)`` for every compared cumulative key of either row."""
    keys = sorted(k for k in {*row, *reference} if k.startswith(COMPARED_PREFIXES))
    out = []
    for key in keys:
        got, want = row.get(key), reference.get(key)
        equal = got is not None and want is not None and math.isclose(got, want, rel_tol=1e-12)
        out.append((key, got, want, equal))
    return out


# --------------------------------------------------------------------------- chart


def write_chart(
    rows: Sequence[Mapping[str, Any]],
    paths: Iterable[str],
    title: str,
    events: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """Plot ``costs/cum/all`` and ``reward/mean`` against ``training_step``; return the paths.

    ``events`` (``{"step": s, "what": "resumed"}``, see :data:`EVENTS_KEY`) are marked with a
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
    per_step = [float(r.get("costs/all", 0.0)) for r in rows]
    cum = [float(r.get("costs/cum/all", 0.0)) for r in rows]
    ax.bar(steps, per_step, width=0.6, color="#c6dbef", label="costs/all (per step)")
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


# --------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class DemoOptions:
    """The demo's settings (the CLI flags)."""

    run: str
    storage_uri: str
    local_dir: str
    steps: int = 8
    rollouts: int = 4
    judges: int = 2
    seed: int = 0
    resume: bool = False
    chaos: bool = False
    keep: bool = False
    address: str | None = None
    num_cpus: int = 2
    expect_nodes: int | None = None
    name: str = DEFAULT_NAME
    namespace: str = DEFAULT_NAMESPACE
    wandb_mode: Literal["online", "offline", "disabled"] = "disabled"
    wandb_dir: str | None = None
    charts: tuple[str, ...] = ()
    summary_json: str | None = None
    storage_flag: bool = False
    """Whether ``--storage`` was given (the "continue it" hint repeats it)."""
    ray_label: str | None = None
    """The joined cluster's address as printed (for ``auto``: with where it was found)."""

    def resume_command(self) -> str:
        """The command that continues this run: on the same cluster, storage and aggregator."""
        extra = f" --storage {self.storage_uri}" if self.storage_flag else ""
        if self.address:
            extra += f" --address {self.address}"
        if self.name != DEFAULT_NAME:
            extra += f" --name {self.name}"
        if self.namespace != DEFAULT_NAMESPACE:
            extra += f" --namespace {self.namespace}"
        return f"art-ray-metrics demo --run {self.run} --resume{extra}"


@dataclass
class DemoResult:
    """What the demo did (also written as JSON with ``--summary-json``)."""

    run: str
    storage_uri: str
    first_step: int
    last_step: int
    rows: int
    totals: dict[str, float]
    unique_scenarios: int
    nodes_used: int
    wandb_run_id: str | None
    counters: dict[str, int]
    charts: list[str]
    chaos: dict[str, Any] | None = None
    seconds: float = 0.0
    startup_seconds: float = 0.0
    """Of ``seconds``: starting Ray (when local), the aggregator, judges and worker processes."""
    params: dict[str, Any] = field(default_factory=dict)


class DemoError(Exception):
    """A problem the user can fix (printed as one line by the CLI)."""


class DemoInterrupted(Exception):
    """Ctrl-C during the demo; the message says what was saved and how to continue."""


def _fmt_usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}"


def _fmt(value: float | None, spec: str = ",.1f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _step_table(rows: list[dict[str, Any]]) -> Table:
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
            _fmt_usd(r["row"].get("costs/all")),
            _fmt_usd(r["row"].get("costs/cum/all")),
            _fmt(r["row"].get("data/cum/num_unique_scenarios"), ",.0f"),
            _fmt(r["row"].get("throughput/avg_actor_tok_per_s")),
            _fmt(r["row"].get("reward/mean"), ".3f"),
            str(r["nodes"]),
            f"{r['seconds']:.1f}",
        )
    return table


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


def _load_params(opts: DemoOptions) -> dict[str, Any]:
    from art_ray_metrics.durable.restore import read_run

    store = open_store(opts.storage_uri)
    info = read_run(opts.storage_uri)
    params = {"seed": opts.seed, "rollouts": opts.rollouts}
    if info is None:
        if opts.resume:
            raise DemoError(f"Expected a run to resume at {opts.storage_uri!r} but found none")
        store.put(PARAMS_KEY, json.dumps(params).encode())
        return {**params, "start": 0, "starts_before": 0}
    if not opts.resume:
        raise DemoError(
            f"Expected a new run but {opts.storage_uri!r} already holds run {opts.run!r}; "
            "pass --resume to continue it or --run NAME for a new one"
        )
    try:
        params.update(json.loads(store.get(PARAMS_KEY)))
    except Exception:  # an older or foreign run: keep the flags
        log.warning("no %s in %s; using the command-line workload", PARAMS_KEY, opts.storage_uri)
    last = info.last_train_step
    # starts of the aggregator after the first, before this session (a resume is one more)
    return {**params, "start": 0 if last is None else last + 1, "starts_before": info.restarts}


def record_events(opts: DemoOptions, first: int, chaos_step: int | None) -> list[dict[str, Any]]:
    """Add this session's resume point and ``--chaos`` step to :data:`EVENTS_KEY`; return all.

    Best effort: the chart is drawn without marks if the storage cannot be read or written.
    """
    store = open_store(opts.storage_uri)
    try:
        events = list(json.loads(store.get(EVENTS_KEY)))
    except Exception:
        events = []
    new = [{"step": first, "what": "resumed"}] if opts.resume else []
    if chaos_step is not None:
        new.append({"step": chaos_step, "what": "--chaos: worker and aggregator killed"})
    if new:
        events = [e for e in events if e not in new] + new
        try:
            store.put(EVENTS_KEY, json.dumps(events).encode())
        except Exception as exc:
            log.warning("could not record the demo's events in %s: %s", opts.storage_uri, exc)
    return [e for e in events if isinstance(e, dict) and {"step", "what"} <= e.keys()]


def _remove_stub(opts: DemoOptions) -> None:
    """After a new run failed before its first checkpoint: remove what the demo wrote."""
    from art_ray_metrics.durable.restore import read_run

    try:
        if read_run(opts.storage_uri) is not None:
            return  # something was recorded: keep it (``--resume`` continues it)
        open_store(opts.storage_uri).delete(PARAMS_KEY)
    except Exception as exc:  # best effort: never hide the original failure
        log.debug("could not remove the demo's stub in %s: %s", opts.storage_uri, exc)
        return
    for root in {opts.storage_uri, opts.local_dir}:
        if "://" in root or not os.path.isdir(root):
            continue
        for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda w: -len(w[0])):
            try:
                if os.listdir(dirpath) == [STORE_LOCK]:
                    os.remove(os.path.join(dirpath, STORE_LOCK))  # the store's own lock file
                os.rmdir(dirpath)  # only empty directories
            except OSError:
                pass


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def run_demo(opts: DemoOptions, console: Console | None = None) -> DemoResult:
    """Run the demo end to end; raises :class:`DemoError` for problems the user can fix.

    Ctrl-C raises :class:`DemoInterrupted` saying whether the aggregator had started and
    checkpointed. A new run that fails before anything was recorded leaves no directory behind.
    """
    console = console or (Console() if sys.stdout.isatty() else Console(width=120))
    started = time.monotonic()
    params = _load_params(opts)
    try:
        return _run(opts, console, params, started)
    except BaseException:
        if not opts.resume:
            _remove_stub(opts)
        raise


def _run(
    opts: DemoOptions, console: Console, params: Mapping[str, Any], started: float
) -> DemoResult:
    seed, rollouts, first = int(params["seed"]), int(params["rollouts"]), int(params["start"])
    if opts.resume:
        console.print(f"[bold]resuming[/] run {opts.run!r} at step {first} (seed {seed})")
    last = first + opts.steps - 1
    progress: dict[str, Any] = {"step": None}

    if not ray.is_initialized():
        console.print(
            f"starting a local Ray instance ({opts.num_cpus} CPUs; usually 10-20 s, longer on a "
            "busy machine) ..."
        )
    try:
        _init_ray(opts)
    except KeyboardInterrupt:
        raise DemoInterrupted("while Ray was starting; nothing was recorded") from None
    try:
        if opts.expect_nodes:
            _wait_for_nodes(opts.expect_nodes)
        nodes = _alive_nodes()
        where = opts.ray_label or (
            f"{ray.get_runtime_context().gcs_address} (a local Ray for this demo; it stops with it)"
        )
        console.print(
            f"Ray: {nodes} node(s) at {where}; aggregator {opts.name!r} (namespace "
            f"{opts.namespace!r}); storage {opts.storage_uri}"
        )
        try:
            handle = start_aggregator(
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
        try:
            result = _loop(opts, console, handle, seed, rollouts, first, last, progress)
        except BaseException as exc:
            saved = False
            if not opts.keep:
                try:
                    handle.shutdown()  # final checkpoint: --resume continues from here
                    saved = True
                except BaseException as shut_exc:
                    console.print(f"[red]aggregator shutdown failed:[/] {shut_exc}")
            if isinstance(exc, KeyboardInterrupt):
                step = progress["step"]
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
            raise
        stats = handle.stats()
        if opts.keep:
            handle.checkpoint()
        else:
            handle.shutdown()
    finally:
        ray.shutdown()

    history = list(HistoryStore(open_store(opts.storage_uri)).read(split="train"))
    events = record_events(opts, first, result.get("chaos_step"))
    charts = write_chart(
        history,
        [os.path.join(opts.local_dir, "chart.png"), *opts.charts],
        f"art-ray-metrics demo: run {opts.run!r}, {rollouts} rollouts/step, {opts.judges} judges",
        events,
    )
    final = history[-1] if history else {}
    totals = {k: float(v) for k, v in final.items() if isinstance(k, str) and "/cum/" in k}
    chaos = None
    if opts.chaos:
        chaos = _check_chaos(console, final, seed, rollouts, last)
    out = DemoResult(
        run=opts.run,
        storage_uri=opts.storage_uri,
        first_step=first,
        last_step=last,
        rows=len(history),
        totals=totals,
        unique_scenarios=int(stats.get("unique_scenarios", 0)),
        nodes_used=result["nodes_used"],
        wandb_run_id=stats.get("wandb_run_id"),
        counters={k: int(v) for k, v in stats.get("counters", {}).items()},
        charts=charts,
        chaos=chaos,
        seconds=time.monotonic() - started,
        startup_seconds=float(progress.get("ready_at", started)) - started,
        params={
            "seed": seed,
            "rollouts": rollouts,
            "judges": opts.judges,
            "starts_before": int(params.get("starts_before", 0)),
        },
    )
    _print_summary(console, out, stats, opts)
    if opts.summary_json:
        with open(opts.summary_json, "w", encoding="utf-8") as fp:
            json.dump(asdict(out), fp, indent=2, sort_keys=True)
    if chaos is not None and not chaos["equal"]:
        raise DemoError("--chaos: the aggregator's totals differ from the in-process reference")
    return out


def _loop(
    opts: DemoOptions,
    console: Console,
    handle: AggregatorHandle,
    seed: int,
    rollouts: int,
    first: int,
    last: int,
    progress_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    judge_cls: Any = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(Judge)
    judges = [
        judge_cls.options(scheduling_strategy="SPREAD").remote(opts.name, opts.namespace)
        for _ in range(opts.judges)
    ]
    rollout_fn = ray.remote(num_cpus=0, max_retries=3)(_rollout)
    chaos_step = first + opts.steps // 2 if opts.chaos else None
    latch = None
    if chaos_step is not None:
        latch = ray.remote(num_cpus=0)(ChaosLatch).remote(chaos_step, 0)
    nodes_used: set[str] = set(ray.get([j.node_id.remote() for j in judges]))
    # start the rollouts' worker processes now, so step timings do not include Ray starting
    # them (seconds each on a busy machine); idle workers are reused by the first step
    console.print(f"starting {rollouts} rollout worker processes ...")
    warm = ray.remote(num_cpus=0)(_warm_up)
    ray.get([warm.options(scheduling_strategy="SPREAD").remote() for _ in range(rollouts)])
    if progress_state is not None:
        progress_state["ready_at"] = time.monotonic()

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    steps_task = progress.add_task("steps", total=opts.steps)
    step_task = progress.add_task("rollouts", total=rollouts)
    done: list[dict[str, Any]] = []
    live = Live(Group(_step_table(done), progress), console=console, refresh_per_second=8)
    with live:
        for step in range(first, last + 1):
            if progress_state is not None:
                progress_state["step"] = step
            t0 = time.monotonic()
            if step == chaos_step:
                # said before Ray's own "worker died ... (OOM killer?)" report of the kill
                progress.console.print(
                    f"[yellow]chaos:[/] step {step}: rollout 0 will end its worker process on "
                    "purpose after its judge was paid (Ray will report a worker that died "
                    "unexpectedly, possibly naming the OOM killer: that is this demo, not a "
                    "memory problem) and Ray retries it; the aggregator actor is killed "
                    "mid-step and restarts from its checkpoint and write-ahead log"
                )
            progress.reset(step_task, total=rollouts, description=f"step {step} rollouts")
            refs = [
                rollout_fn.options(scheduling_strategy="SPREAD").remote(
                    step,
                    i,
                    seed,
                    rollouts,
                    opts.name,
                    opts.namespace,
                    judges[i % len(judges)],
                    latch if step == chaos_step else None,
                )
                for i in range(rollouts)
            ]
            if step == chaos_step:
                time.sleep(0.3)
                progress.console.print("[yellow]chaos:[/] killing the aggregator actor now")
                ray.kill(handle.actor, no_restart=False)
            results = []
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=300)
                if not ready:
                    raise DemoError(f"Expected rollouts of step {step} to finish within 300s")
                results.extend(ray.get(ready))
                progress.advance(step_task, len(ready))
            step_nodes = {r["node_id"] for r in results}
            nodes_used |= step_nodes
            scores = [float(r["score"]) for r in results]
            row = handle.log(
                step,
                metrics={
                    "loss": trainer_loss(seed, step),
                    "reward/mean": sum(scores) / len(scores),
                },
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
            live.update(Group(_step_table(done[-12:]), progress))
            if not console.is_terminal:
                console.print(
                    f"step {step}: costs/cum/all {_fmt_usd(row.get('costs/cum/all'))}, "
                    f"reward/mean {_fmt(row.get('reward/mean'), '.3f')}, "
                    f"{len(step_nodes)} node(s)"
                )
    console.print()
    for judge in judges:
        ray.kill(judge)
    return {"nodes_used": len(nodes_used), "rows": done, "chaos_step": chaos_step}


def _check_chaos(
    console: Console, final: Mapping[str, Any], seed: int, rollouts: int, last: int
) -> dict[str, Any]:
    console.print("computing the same leaves in process (MetricsBuilder) for comparison ...")
    reference = reference_rows(seed, rollouts, range(0, last + 1))[-1]
    rows = compare_totals(
        {
            k: float(v)
            for k, v in final.items()
            if k != "recorded_at" and isinstance(v, int | float)
        },
        reference,
    )
    table = Table(title="--chaos: totals after a killed worker and a killed aggregator")
    table.add_column("key")
    table.add_column("aggregator", justify="right")
    table.add_column("in-process reference", justify="right")
    table.add_column("", justify="center")
    for key, got, want, equal in rows:
        table.add_row(key, _fmt(got, ",.6f"), _fmt(want, ",.6f"), "✓" if equal else "✗")
    console.print(table)
    equal = bool(rows) and all(r[3] for r in rows)
    return {"equal": equal, "keys": len(rows), "mismatches": [r[0] for r in rows if not r[3]]}


def _print_summary(
    console: Console, out: DemoResult, stats: Mapping[str, Any], opts: DemoOptions
) -> None:
    t = out.totals
    table = Table(title=f"run {out.run!r}: summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    judge = {k: v for k, v in t.items() if k.startswith("costs/cum/train/llm_judge/")}
    lines: list[tuple[str, str]] = [
        ("steps", f"{out.first_step}..{out.last_step} this session; {out.rows} rows in history"),
        ("costs/cum/all", _fmt_usd(t.get("costs/cum/all"))),
        *[(k, _fmt_usd(v)) for k, v in sorted(judge.items())],
        ("data/cum/actor_tokens", _fmt(t.get("data/cum/actor_tokens"), ",.0f")),
        ("data/cum/num_scenarios", _fmt(t.get("data/cum/num_scenarios"), ",.0f")),
        ("unique scenario ids", f"{out.unique_scenarios:,}"),
        ("nodes used", str(out.nodes_used)),
        ("storage", out.storage_uri),
        ("W&B", _wandb_summary(opts, out.wandb_run_id)),
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


def _wandb_summary(opts: DemoOptions, run_id: str | None) -> str:
    if run_id is None:
        return "off"
    if opts.wandb_mode == "offline" and opts.wandb_dir is not None:
        return f"offline run {run_id}, files in {os.path.join(opts.wandb_dir, 'wandb')}"
    return f"{opts.wandb_mode} run {run_id}"


def default_options(**fields: Any) -> DemoOptions:
    """Options with the CLI's defaults (used by tests)."""
    run = fields.pop("run", "demo")
    local = fields.pop("local_dir", os.path.abspath(os.path.join("runs", run)))
    storage = fields.pop("storage_uri", local)
    return DemoOptions(run=run, storage_uri=storage, local_dir=local, **fields)
