"""What the README's rollout pattern costs a training step, against what a user writes without us.

All sides run on the same local Ray with the same warm pool of 4 rollout actors (threaded
actors, 0 CPUs each, up to 128 concurrent rollouts inside each), and their steps alternate
(A B C A B C ...), so a drift of the machine's speed falls on all of them.

- **pattern** (the README): each rollout does ``connect(step)``, 4 ``add_cost``, one
  ``add_metric``, ``add_data`` with its scenario id, ``add_user_timing``, a durable ``flush()``,
  and returns its reward; the driver calls ``handle.log(step, metrics=...)`` once per step.
- **baseline** (no library): each rollout returns its leaves in a dict; the driver sums them
  exactly (``Decimal``), keeps a set of scenario ids and appends one JSON line per step.

- **transport floor** (Ray alone, no library): each rollout makes one ``ray.get`` round trip to
  a no-op actor with a payload the size of its leaves, and the driver makes one more per step in
  place of the barrier. It is what the pattern's calls cost with nothing done at either end, so
  ``pattern / floor`` is what the library adds over the calls, and ``floor / baseline`` is what
  the calls alone cost the step.

Two workloads: 32 rollouts of 0.2 s of work per step (``time.sleep``: an LLM call's wait), and
256 rollouts with no work per step. Printed: the median step time of each side and their
ratio; for the no-work case the time the pattern adds per rollout, and the barrier
(``handle.log``) alone. Each pattern step's row is checked exactly against the leaves recorded.

Run: ``python bench/bench_pattern.py [--quick]``. Nothing here asserts a time.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.pop("RAY_ADDRESS", None)

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import ray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import art_ray_metrics  # noqa: E402

NAMESPACE = "arm-bench-pattern"
POOL = 4
COSTS = {
    "train/llm_judge/correctness": "0.0011",
    "train/llm_judge/hallucination": "0.0007",
    "train/llm_judge/format": "0.0003",
    "train/tinker_inference": "0.0020",
}
PER_ROLLOUT = sum(Decimal(v) for v in COSTS.values())


@ray.remote(num_cpus=0, max_concurrency=128)
class RolloutWorker:
    """A warm rollout process: each call is one rollout, run in the actor's thread pool."""

    def ready(self, sink: Any = None) -> bool:
        self.sink = sink  # the transport floor's no-op actor, handed over once
        return True

    def pattern(self, name: str, step: int, sid: str, work_s: float) -> tuple[float, bool]:
        if work_s:
            time.sleep(work_s)
        b = art_ray_metrics.connect(step, name=name, namespace=NAMESPACE)
        for path, usd in COSTS.items():
            b.add_cost(path, float(usd))
        b.add_metric("reward/judge_score", 0.5)
        b.add_data(step_actor_tokens=812, scenario_ids=[sid])
        b.add_user_timing(step_actor_s=work_s)
        return 0.5, b.flush(timeout_s=60).ok

    def floor(self, step: int, sid: str, work_s: float) -> float:
        if work_s:
            time.sleep(work_s)
        payload = {f"costs/{k}": v for k, v in COSTS.items()}
        payload.update({"sid": sid, "step": step})
        ray.get(self.sink.ack.remote(payload))
        return 0.5

    def baseline(self, step: int, sid: str, work_s: float) -> dict[str, Any]:
        if work_s:
            time.sleep(work_s)
        leaves: dict[str, Any] = {f"costs/{k}": v for k, v in COSTS.items()}
        leaves["reward/judge_score"] = 0.5
        leaves["data/step_actor_tokens"] = 812
        leaves["time/step_actor_s"] = work_s
        return {"reward": 0.5, "leaves": leaves, "scenario_ids": [sid]}


def _pattern_step(
    handle: Any, pool: list[Any], name: str, step: int, n: int, work_s: float
) -> tuple[float, float]:
    t0 = time.perf_counter()
    refs = [pool[i % POOL].pattern.remote(name, step, f"p{step}-{i}", work_s) for i in range(n)]
    results = ray.get(refs)
    t1 = time.perf_counter()
    rewards = [r for r, _ in results]
    row = handle.log(step, metrics={"reward/mean": sum(rewards) / len(rewards)})
    t2 = time.perf_counter()
    if not all(ok for _, ok in results):
        raise SystemExit(f"step {step}: a flush was not ok")
    want = float(PER_ROLLOUT * n)
    if abs(row["costs/all"] - want) > 1e-12:
        raise SystemExit(f"step {step}: costs/all {row['costs/all']} != {want}")
    return t2 - t0, t2 - t1


@ray.remote(num_cpus=0, max_concurrency=128)
class NoOpSink:
    """The transport floor's far end: answers every call at once."""

    def ack(self, payload: dict[str, Any]) -> bool:
        return True

    def barrier(self, step: int) -> int:
        return step


def _floor_step(sink: Any, pool: list[Any], step: int, n: int, work_s: float) -> float:
    t0 = time.perf_counter()
    refs = [pool[i % POOL].floor.remote(step, f"f{step}-{i}", work_s) for i in range(n)]
    ray.get(refs)
    ray.get(sink.barrier.remote(step))
    return time.perf_counter() - t0


class Baseline:
    """What the driver does without the library: exact sums, a set of ids, one JSON line."""

    def __init__(self, path: Path) -> None:
        self.cum = Decimal(0)
        self.ids: set[str] = set()
        self.out = path.open("a")

    def step(self, pool: list[Any], step: int, n: int, work_s: float) -> float:
        t0 = time.perf_counter()
        refs = [pool[i % POOL].baseline.remote(step, f"b{step}-{i}", work_s) for i in range(n)]
        results = ray.get(refs)
        sums: dict[str, Decimal] = {}
        for res in results:
            for k, v in res["leaves"].items():
                sums[k] = sums.get(k, Decimal(0)) + Decimal(str(v))
            self.ids.update(res["scenario_ids"])
        costs = sum((v for k, v in sums.items() if k.startswith("costs/")), Decimal(0))
        self.cum += costs
        row = {k: float(v) for k, v in sums.items()}
        row.update(
            {
                "training_step": step,
                "costs/all": float(costs),
                "costs/cum/all": float(self.cum),
                "data/cum/num_unique_scenarios": len(self.ids),
                "reward/mean": sum(r["reward"] for r in results) / len(results),
            }
        )
        self.out.write(json.dumps(row) + "\n")
        self.out.flush()
        return time.perf_counter() - t0


def _workload(
    handle: Any,
    base: Baseline,
    sink: Any,
    pool: list[Any],
    name: str,
    first: int,
    steps: int,
    n: int,
    work_s: float,
) -> dict[str, Any]:
    pat: list[float] = []
    bar: list[float] = []
    bas: list[float] = []
    flo: list[float] = []
    for i in range(steps + 1):  # the first round warms every path up and is not counted
        step = first + i
        p, b_ = _pattern_step(handle, pool, name, step, n, work_s)
        b = base.step(pool, step, n, work_s)
        f = _floor_step(sink, pool, step, n, work_s)
        if i:
            pat.append(p)
            bar.append(b_)
            bas.append(b)
            flo.append(f)
    ratios = [p / b for p, b in zip(pat, bas, strict=True)]
    return {
        "floor_ms": statistics.median(flo) * 1e3,
        "floor_ratio": statistics.median([f / b for f, b in zip(flo, bas, strict=True)]),
        "over_floor": statistics.median([p / f for p, f in zip(pat, flo, strict=True)]),
        "n": n,
        "work_s": work_s,
        "pattern_ms": statistics.median(pat) * 1e3,
        "baseline_ms": statistics.median(bas) * 1e3,
        "barrier_ms": statistics.median(bar) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "added_per_rollout_ms": (statistics.median(pat) - statistics.median(bas)) * 1e3 / n,
        "steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    args = ap.parse_args()
    steps = 5 if args.quick else 15
    ray.init(
        address="local",
        num_cpus=2,
        namespace=NAMESPACE,
        include_dashboard=False,
        log_to_driver=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix="arm-bench-pattern-"))
    name = f"bench-pattern-{uuid.uuid4().hex[:6]}"
    handle = art_ray_metrics.start_aggregator(
        name=name,
        namespace=NAMESPACE,
        run_name=name,
        storage_uri=str(tmp / "run"),
        wandb_mode="disabled",
    )
    sink = NoOpSink.remote()  # type: ignore[attr-defined]
    ray.get(sink.barrier.remote(0))
    pool = [RolloutWorker.remote() for _ in range(POOL)]  # type: ignore[attr-defined]
    ray.get([w.ready.remote(sink) for w in pool])
    base = Baseline(tmp / "baseline.jsonl")
    t0 = time.perf_counter()
    rows = [
        _workload(handle, base, sink, pool, name, 0, steps, 32, 0.2),
        _workload(handle, base, sink, pool, name, 1000, steps, 256, 0.0),
    ]
    took = time.perf_counter() - t0
    handle.shutdown()
    ray.shutdown()
    print(
        f"# README pattern vs a dict-returning baseline and the transport floor ({steps} alternating steps each, {took:.0f} s, load {os.getloadavg()[0]:.1f})\n"
    )
    print(
        "| rollouts × work | pattern step (median) | baseline step (median) | ratio median (min–max) | barrier alone | added per rollout | transport floor step | floor / baseline | pattern / floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} × {r['work_s']} s | {r['pattern_ms']:.1f} ms | {r['baseline_ms']:.1f} ms | "
            f"{r['ratio']:.3f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | {r['barrier_ms']:.1f} ms | "
            f"{r['added_per_rollout_ms']:.3f} ms | {r['floor_ms']:.1f} ms | {r['floor_ratio']:.3f}× | "
            f"{r['over_floor']:.3f}× |"
        )


if __name__ == "__main__":
    main()
