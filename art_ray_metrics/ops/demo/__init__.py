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
:mod:`art_ray_metrics.durable.history`), plus ``demo/params.json`` (seed and sizes, so
``--resume`` replays the same workload). The chart goes to ``<local run dir>/chart.png``.

Modules: :mod:`.workload` (pure: what each rollout records, and the totals a run must end with,
the demo's test oracle), :mod:`.judges` (the SDK calls to the fake API and the in-process
reference), :mod:`.ui` (step table, summary, chart), :mod:`.files` (what the demo keeps in the
run's storage), :mod:`.options` (settings, result, errors) and :mod:`.run` (Ray, the aggregator,
the workers and the step loop).
"""

from __future__ import annotations

from art_ray_metrics.ops.demo.files import EVENTS_KEY, PARAMS_KEY, record_events
from art_ray_metrics.ops.demo.judges import (
    ANTHROPIC_JUDGE,
    OPENAI_JUDGE,
    JudgeClients,
    judge_calls,
    reference_rows,
)
from art_ray_metrics.ops.demo.options import (
    DemoError,
    DemoInterrupted,
    DemoOptions,
    DemoResult,
    default_options,
)
from art_ray_metrics.ops.demo.run import run_demo
from art_ray_metrics.ops.demo.ui import aggregator_starts, chart_figure, write_chart
from art_ray_metrics.ops.demo.workload import (
    RolloutPlan,
    compare_totals,
    expected_data_totals,
    plan_rollout,
    record_rollout,
    trainer_loss,
)

__all__ = [
    "ANTHROPIC_JUDGE",
    "EVENTS_KEY",
    "OPENAI_JUDGE",
    "PARAMS_KEY",
    "DemoError",
    "DemoInterrupted",
    "DemoOptions",
    "DemoResult",
    "JudgeClients",
    "RolloutPlan",
    "aggregator_starts",
    "chart_figure",
    "compare_totals",
    "default_options",
    "expected_data_totals",
    "judge_calls",
    "plan_rollout",
    "record_events",
    "record_rollout",
    "reference_rows",
    "run_demo",
    "trainer_loss",
    "write_chart",
]
