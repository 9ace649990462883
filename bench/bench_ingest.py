"""Distributed ingest benchmarks on one local Ray instance (2 CPUs): throughput, memory, barrier.

Everything below is measured in one run, on the same Ray instance, and printed as Markdown:

- **ceiling**: a no-op actor receiving pre-packed 1,000-leaf msgpack blobs (``[[key, value],
  ...]`` over a realistic key set) from the driver, with every call in flight at once;
- **naive**: one actor call per leaf (``add(key, value)`` on a trivial actor), likewise;
- **ours**: producer actors (0 CPUs each, one process each, so one ``MetricsClient`` each) run
  rollouts: ``connect(step)`` then ART's recording methods (4 ``add_cost``, 2 ``add_metric``,
  ``add_data`` with 2 counters and 1 scenario id, ``add_user_timing``, ``add_idle_times``:
  10 leaves and 1 scenario id per rollout), then ``flush()``, which returns once the
  aggregator (``start_aggregator`` with local tmp storage, W&B disabled) acknowledged every
  batch as durable. Leaves/s = leaves recorded by all producers / driver wall time from
  starting the producers to the last flush returning. The row is then closed with
  ``handle.log(step, expect_producers=P)`` and checked against the expected sums;
- **memory**: one producer recording 10 million leaves: its RSS and peak RSS growth;
- **add_cost on the worker**: µs per call in a producer process, shipping included;
- **barrier**: ``handle.log`` latency with 64 producers (64 ``MetricsClient`` s with distinct
  producer ids in the driver) having sent 2,000 distinct keys for the step, as a ratio to one
  no-op actor round trip.

Run: ``python bench/bench_ingest.py [--quick]``. Nothing here asserts a time.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("WANDB_MODE", "disabled")

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgpack
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import fmt_rate, md_table, realistic_keys

import art_ray_metrics
from art_ray_metrics.config import ClientConfig
from art_ray_metrics.distributed.client import MetricsClient

NAMESPACE = "arm-bench"
LEAVES_PER_ROLLOUT = 10


# -- remote classes (defined in __main__, so Ray pickles them by value) ----------------------


class NoOp:
    """The ceiling's receiver: accepts a blob and does nothing."""

    def ingest(self, data: bytes) -> None:
        """Drop the blob."""

    def ping(self) -> None:
        """Round trip."""


class Naive:
    """One call per leaf: the simplest correct design."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, key: str, value: float) -> None:
        """Sum one leaf."""
        self.sums[key] = self.sums.get(key, 0.0) + value

    def count(self) -> int:
        """Distinct keys seen."""
        return len(self.sums)


def _rss() -> tuple[int, int]:
    """(RSS, peak RSS) of this process in bytes."""
    rss = hwm = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


class Producer:
    """A rollout worker process: records through ``connect`` like user code does."""

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        self.rollouts = 0

    def _connect(self, step: int) -> Any:
        return art_ray_metrics.connect(step, name=self.name, namespace=self.namespace)

    def _rollout(self, step: int, sid: str, b: Any = None) -> None:
        if b is None:
            b = self._connect(step)
        b.add_cost("train/llm_judge/correctness", 0.0012)
        b.add_cost("train/llm_judge/hallucination", 0.0008)
        b.add_cost("train/llm_judge/format", 0.0002)
        b.add_cost("train/tinker_inference", 0.0031)
        b.add_metric("reward/mean", 0.5)
        b.add_metric("reward/format_ok", 1.0)
        b.add_data(step_num_scenarios=1, step_actor_tokens=812, scenario_ids=[sid])
        b.add_user_timing(step_actor_s=0.25)
        b.add_idle_times(step_actor_idle_s=0.01)

    def run(self, step: int, rollouts: int, tag: str, shared: bool = False) -> dict[str, float]:
        """Record ``rollouts`` rollouts for ``step`` and flush; return timings.

        ``shared``: one ``connect`` for all rollouts instead of one per rollout.
        """
        t0 = time.perf_counter()
        b = self._connect(step) if shared else None
        for i in range(rollouts):
            self._rollout(step, f"scenario-{tag}-{i}", b)
        t1 = time.perf_counter()
        result = art_ray_metrics.connect(step, name=self.name, namespace=self.namespace).flush()
        t2 = time.perf_counter()
        if not result.ok:
            raise RuntimeError(f"flush not durable: {result}")
        return {"record_s": t1 - t0, "flush_s": t2 - t1}

    def memory(self, step: int, leaves: int, tag: str) -> dict[str, float]:
        """Record ``leaves`` leaves (in rollouts) and report RSS growth of this process."""
        import gc

        gc.collect()
        rss0, _ = _rss()
        _reset_peak()
        rollouts = leaves // LEAVES_PER_ROLLOUT
        t0 = time.perf_counter()
        samples = []
        for i in range(rollouts):
            self._rollout(step, f"scenario-{tag}-{i}")
            if i % 100_000 == 0:
                samples.append(_rss()[0])
        result = art_ray_metrics.connect(step, name=self.name, namespace=self.namespace).flush()
        elapsed = time.perf_counter() - t0
        gc.collect()
        rss1, hwm = _rss()
        stats = art_ray_metrics.get_client(
            ClientConfig(name=self.name, namespace=self.namespace)
        ).stats()
        return {
            "leaves": rollouts * LEAVES_PER_ROLLOUT,
            "seconds": elapsed,
            "rss_before_mb": rss0 / 2**20,
            "rss_growth_mb": (rss1 - rss0) / 2**20,
            "peak_growth_mb": (hwm - rss0) / 2**20,
            "max_sampled_growth_mb": (max(samples) - rss0) / 2**20 if samples else 0.0,
            "ok": float(result.ok),
            "batches": float(stats["batches"]),
        }

    def add_cost_cost(self, step: int, calls: int) -> dict[str, float]:
        """µs per ``add_cost`` on a connected builder (shipping included, as configured)."""
        b = art_ray_metrics.connect(step, name=self.name, namespace=self.namespace)
        paths = [
            "train/llm_judge/correctness",
            "train/llm_judge/hallucination",
            "train/llm_judge/format",
            "train/tinker_inference",
        ]
        seq = [paths[i % 4] for i in range(calls)]
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for p in seq:
                b.add_cost(p, 0.0012)
            times.append((time.perf_counter() - t0) / calls * 1e6)
        b.flush()
        return {"median_us": statistics.median(times), "min_us": min(times)}

    def prof_add_cost(self, step: int, calls: int) -> str:
        """cProfile of ``add_cost`` calls (for the report's hot-spot table)."""
        import cProfile
        import io
        import pstats

        b = art_ray_metrics.connect(step, name=self.name, namespace=self.namespace)
        prof = cProfile.Profile()
        prof.enable()
        for i in range(calls):
            b.add_cost("train/llm_judge/correctness" if i % 2 else "train/tinker_inference", 0.001)
        prof.disable()
        b.flush()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        return out.getvalue()


# -- measurements ----------------------------------------------------------------------------


def _spawn(cls: type, *args: Any) -> Any:
    """Start a 0-CPU actor of ``cls`` (typed ``Any``: Ray's handle types are not generic enough)."""
    remote: Any = ray.remote(cls)
    return remote.options(num_cpus=0).remote(*args)


def _blob(keys: list[str]) -> bytes:
    leaves = [[keys[i % len(keys)], 0.001 * (i % 13)] for i in range(1_000)]
    data: bytes = msgpack.packb(leaves, use_bin_type=True)
    return data


def ceiling(calls: int, pipelined: bool, actor: Any = None) -> float:
    """Leaves/s into a no-op actor, 1,000-leaf blobs: all calls in flight, or one at a time.
    ``actor``: a running ``NoOp`` to reuse (kept alive); else one is started and killed."""
    own = actor is None
    if own:
        actor = _spawn(NoOp)
    ray.get(actor.ping.remote())
    blob = _blob(realistic_keys(50))
    ray.get([actor.ingest.remote(blob) for _ in range(50)])  # warm-up
    t0 = time.perf_counter()
    if pipelined:
        ray.get([actor.ingest.remote(blob) for _ in range(calls)])
    else:
        for _ in range(calls):
            ray.get(actor.ingest.remote(blob))
    elapsed = time.perf_counter() - t0
    if own:
        ray.kill(actor)
    return calls * 1_000 / elapsed


def naive(leaves: int, pipelined: bool) -> float:
    """Leaves/s with one actor call per leaf: all calls in flight, or one at a time."""
    actor = _spawn(Naive)
    keys = realistic_keys(50)
    ray.get([actor.add.remote(keys[i % 50], 0.001) for i in range(200)])  # warm-up
    t0 = time.perf_counter()
    if pipelined:
        ray.get([actor.add.remote(keys[i % 50], 0.001) for i in range(leaves)])
    else:
        for i in range(leaves):
            ray.get(actor.add.remote(keys[i % 50], 0.001))
    elapsed = time.perf_counter() - t0
    ray.kill(actor)
    return leaves / elapsed


def noop_round_trip(n: int = 200) -> float:
    """Median seconds of one ``ray.get(actor.ping.remote())``."""
    actor = _spawn(NoOp)
    ray.get(actor.ping.remote())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        ray.get(actor.ping.remote())
        times.append(time.perf_counter() - t0)
    ray.kill(actor)
    return statistics.median(times)


class Bench:
    """One aggregator and a pool of producer actors on the shared Ray instance."""

    def __init__(self, storage: str, pool: int) -> None:
        self.name = f"bench-{uuid.uuid4().hex[:8]}"
        self.handle = art_ray_metrics.start_aggregator(
            name=self.name,
            namespace=NAMESPACE,
            run_name=self.name,
            storage_uri=storage,
            wandb_mode="disabled",
        )
        self.producers = [_spawn(Producer, self.name, NAMESPACE) for _ in range(pool)]
        self.step = 0
        # warm up: every process imports, looks the actor up, ships and flushes once
        ray.get([p.run.remote(self.step, 2, f"warm{i}") for i, p in enumerate(self.producers)])
        self.handle.log(self.step, expect_producers=pool)
        self.scenarios = 2 * pool

    def throughput(self, producers: int, total_rollouts: int, shared: bool) -> dict[str, Any]:
        """Run ``total_rollouts`` rollouts split over ``producers`` processes; check the row."""
        self.step += 1
        step = self.step
        per = total_rollouts // producers
        tag = uuid.uuid4().hex[:6]
        t0 = time.perf_counter()
        timings = ray.get(
            [
                p.run.remote(step, per, f"{tag}{i}", shared)
                for i, p in enumerate(self.producers[:producers])
            ]
        )
        wall = time.perf_counter() - t0
        row = self.handle.log(step, expect_producers=producers, timeout_s=30)
        rollouts = per * producers
        self.scenarios += rollouts
        expected = {
            "data/step_num_scenarios": rollouts,
            "costs/train/llm_judge": round(rollouts * 0.0022, 10),
            "costs/all": round(rollouts * 0.0053, 10),
            "data/cum/num_unique_scenarios": self.scenarios,
        }
        bad = {k: (row.get(k), v) for k, v in expected.items() if abs(row.get(k, -1) - v) > 1e-9}
        if bad:
            raise RuntimeError(f"row mismatch at step {step}: {bad}")
        return {
            "producers": producers,
            "shared": shared,
            "leaves": rollouts * LEAVES_PER_ROLLOUT,
            "wall": wall,
            "record_s": max(t["record_s"] for t in timings),
            "flush_s": max(t["flush_s"] for t in timings),
        }

    def memory(self, leaves: int) -> dict[str, float]:
        """One producer records ``leaves`` leaves; its RSS growth."""
        self.step += 1
        out: dict[str, float] = ray.get(self.producers[0].memory.remote(self.step, leaves, "mem"))
        row = self.handle.log(self.step, timeout_s=30)
        self.scenarios += leaves // LEAVES_PER_ROLLOUT
        if row.get("data/cum/num_unique_scenarios") != self.scenarios:
            raise RuntimeError(f"memory run lost scenarios: {row}")
        return out

    def add_cost(self, calls: int) -> dict[str, float]:
        """µs per add_cost in a producer process."""
        self.step += 1
        out: dict[str, float] = ray.get(self.producers[0].add_cost_cost.remote(self.step, calls))
        self.handle.log(self.step, timeout_s=30)
        return out

    def prof_add_cost(self, calls: int) -> str:
        """A cProfile of add_cost in a producer process."""
        self.step += 1
        out: str = ray.get(self.producers[0].prof_add_cost.remote(self.step, calls))
        self.handle.log(self.step, timeout_s=30)
        return out

    def barrier(self, n_producers: int, n_keys: int, rounds: int) -> list[float]:
        """Seconds per ``log`` with ``n_producers`` clients having sent ``n_keys`` keys."""
        cfg = ClientConfig(name=self.name, namespace=NAMESPACE)
        keys = realistic_keys(n_keys)
        times = []
        for _ in range(rounds):
            self.step += 1
            step = self.step
            clients = [
                MetricsClient(cfg, producer_id=f"barrier-{step}-{i}", actor=self.handle.actor)
                for i in range(n_producers)
            ]
            for i, key in enumerate(keys):
                clients[i % n_producers].record(step, "train", key, _D001)
            for c in clients:
                c.touch(step, "train")
                c.ship()
            for c in clients:
                if not c.flush(30).ok:
                    raise RuntimeError(f"barrier client flush failed: {c.stats()}")
                c.close(1.0)  # stop its background thread: time the barrier alone
            t0 = time.perf_counter()
            row = self.handle.log(step, expect_producers=n_producers, timeout_s=30)
            times.append(time.perf_counter() - t0)
            leaves = sum(1 for k in row if k.startswith("costs/train/judge_") and k.count("/") == 3)
            if leaves != n_keys - 12:  # realistic_keys: 12 base keys, then judge_<i>/criterion_<j>
                raise RuntimeError(f"barrier row has {leaves} judge leaves, not {n_keys - 12}")
        return times

    def close(self) -> None:
        """Kill the producers and shut the aggregator down."""
        for p in self.producers:
            ray.kill(p)
        self.handle.shutdown()


_D001 = Decimal("0.001")


def _per_call(fn: Any, n: int, repeats: int = 5) -> float:
    """Median µs per call of ``fn(i)`` over ``n`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def hot_spots(bench: Bench, n: int) -> list[list[str]]:
    """µs per call of each layer a worker-side leaf goes through (driver process, real client)."""
    from art_ray_metrics.core import validate as V
    from art_ray_metrics.core.dedupe import digest
    from art_ray_metrics.core.rollup import to_decimal
    from art_ray_metrics.core.tape import PendingLeaves
    from art_ray_metrics.distributed.record import WorkerBuilder

    bench.step += 1
    step = bench.step
    cfg = ClientConfig(name=bench.name, namespace=NAMESPACE)
    client = MetricsClient(cfg, producer_id="hot-spots", actor=bench.handle.actor)
    b = WorkerBuilder(client, step, "train", "train")
    paths = ["train/llm_judge/correctness", "train/tinker_inference"]
    keys = [f"costs/{p}" for p in paths]
    pending = PendingLeaves()
    pending.record(keys[0], _D001)
    pending.record(keys[1], _D001)
    values = [0.0012 + i * 1e-7 for i in range(n)]
    rows: list[list[Any]] = [
        [
            "`connect(step)` (cached config, `get_client`, `WorkerBuilder`)",
            _per_call(
                lambda i: art_ray_metrics.connect(step, name=bench.name, namespace=NAMESPACE),
                n // 4,
            ),
        ],
        [
            "`ClientConfig()` (pydantic; `connect` caches one per name and namespace)",
            _per_call(lambda i: ClientConfig(), n // 4),
        ],
        [
            "`WorkerBuilder.add_cost` (whole call, shipping amortised)",
            _per_call(lambda i: b.add_cost(paths[i & 1], values[i]), n),
        ],
        [
            "`WorkerBuilder.add_metric`",
            _per_call(lambda i: b.add_metric(keys[i & 1], values[i]), n),
        ],
        [
            "`add_data(step_num_scenarios, step_actor_tokens, scenario_ids=[1 id])`",
            _per_call(lambda i: b.add_data(1, 812, [f"s-{i}"]), n // 4),
        ],
        [
            "`MetricsClient.record` (the slow path of a new key: lock, key registry, tape)",
            _per_call(lambda i: client.record(step, "train", keys[i & 1], _D001), n),
        ],
        [
            "`PendingLeaves.record` (existing key)",
            _per_call(lambda i: pending.record(keys[i & 1], _D001), n),
        ],
        ["`validate.validate_key` (cached)", _per_call(lambda i: V.validate_key(keys[i & 1]), n)],
        [
            "`validate.check_value` (float)",
            _per_call(lambda i: V.check_value(keys[i & 1], values[i]), n),
        ],
        [
            "`rollup.to_decimal` (float → Decimal via repr)",
            _per_call(lambda i: to_decimal(values[i]), n),
        ],
        ["`dedupe.digest` (one scenario id)", _per_call(lambda i: digest(f"scenario-{i}"), n // 4)],
    ]
    client.flush(30)
    client.close(1.0)
    bench.handle.log(step, timeout_s=30)
    return [[name, f"{us:.2f}"] for name, us in rows]


def main() -> None:
    """Run every measurement on one Ray instance and print Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument(
        "--profile", action="store_true", help="also print a cProfile of add_cost in a producer"
    )
    args = parser.parse_args()
    q = args.quick
    ray.init(
        address="local",  # always a fresh instance, never another process's cluster
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        namespace=NAMESPACE,
        log_to_driver=False,
    )
    tmp = tempfile.mkdtemp(prefix="arm-bench-")
    t_start = time.perf_counter()
    try:

        def references() -> tuple[float, float, float, float]:
            return (
                ceiling(500 if q else 2_000, pipelined=False),
                ceiling(500 if q else 3_000, pipelined=True),
                naive(1_000 if q else 3_000, pipelined=False),
                naive(2_000 if q else 5_000, pipelined=True),
            )

        before = references()
        rtt = noop_round_trip()
        bench = Bench(str(Path(tmp) / "run"), pool=16)
        total = 40_000 if q else 200_000  # rollouts per run (10 leaves each)
        # the machine's speed drifts within a run: each run also gets the one-at-a-time
        # ceiling measured right before and right after it (mean of the two)
        paired = _spawn(NoOp)
        runs = []
        for shared in (False, True):
            for p in (1, 4, 16):
                around = ceiling(300 if q else 1_000, pipelined=False, actor=paired)
                run = bench.throughput(p, total, shared)
                around += ceiling(300 if q else 1_000, pipelined=False, actor=paired)
                run["ceiling_around"] = around / 2
                runs.append(run)
        ray.kill(paired)
        after = references()  # the machine may be shared: measure the references twice
        ceil_sync, ceil_pipe, naive_sync, naive_pipe = (
            max(a, b) for a, b in zip(before, after, strict=True)
        )
        add_cost = bench.add_cost(200_000 if q else 1_000_000)
        mem = bench.memory(1_000_000 if q else 10_000_000)
        barrier = bench.barrier(64, 2_000, 3 if q else 7)
        spots = hot_spots(bench, 40_000 if q else 200_000)
        profile = bench.prof_add_cost(100_000) if args.profile else ""
        bench.close()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t_start

    def ratios(rate: float) -> list[str]:
        return [
            fmt_rate(rate),
            f"{rate / ceil_sync:.2f}×",
            f"{rate / ceil_pipe:.2f}×",
            f"{rate / naive_sync:,.0f}×",
            f"{rate / naive_pipe:,.0f}×",
        ]

    rows = [
        [
            "ceiling: no-op actor, 1,000-leaf msgpack blobs, one call at a time",
            "driver",
            *ratios(ceil_sync),
        ],
        [
            "ceiling: no-op actor, 1,000-leaf msgpack blobs, all calls in flight",
            "driver",
            *ratios(ceil_pipe),
        ],
        ["naive: one actor call per leaf, one at a time", "driver", *ratios(naive_sync)],
        ["naive: one actor call per leaf, all calls in flight", "driver", *ratios(naive_pipe)],
    ]
    for r in runs:
        how = "one `connect` per producer" if r["shared"] else "`connect(step)` per rollout"
        rows.append(
            [
                f"ours: {how}, record, `flush()`",
                str(r["producers"]),
                *ratios(r["leaves"] / r["wall"]),
            ]
        )
    headers = [
        "path",
        "producers",
        "leaves/s",
        "vs ceiling (1 at a time)",
        "vs ceiling (in flight)",
        "vs naive (1 at a time)",
        "vs naive (in flight)",
        "vs ceiling (1 at a time) measured around this run",
    ]
    for row in rows:
        row.append("")
    for row, r in zip(rows[4:], runs, strict=True):
        row[-1] = (
            f"{r['leaves'] / r['wall'] / r['ceiling_around']:.2f}× of {fmt_rate(r['ceiling_around'])}"
        )
    out = ["### Ingest throughput (one Ray instance, `num_cpus=2`)\n\n" + md_table(headers, rows)]
    detail = [
        [
            str(r["producers"]),
            "once" if r["shared"] else "per rollout",
            f"{r['leaves']:,}",
            f"{r['wall']:.2f}",
            f"{r['record_s']:.2f}",
            f"{r['flush_s'] * 1e3:.0f}",
        ]
        for r in runs
    ]
    four = [r["leaves"] / r["wall"] for r in runs if r["producers"] == 4]
    best4, worst4 = max(four), min(four)
    paired4 = sorted(
        r["leaves"] / r["wall"] / r["ceiling_around"] for r in runs if r["producers"] == 4
    )

    def verdict(rate: float, ref: float, times: float) -> str:
        ratio = f"{rate / ref:,.0f}" if times > 1 else f"{rate / ref:.2f}"
        return f"{ratio}× ({'met' if rate >= times * ref else 'MISSED'})"

    out.append(
        md_table(
            [
                "producers",
                "connect",
                "leaves",
                "wall s",
                "slowest producer recording s",
                "slowest flush ms",
            ],
            detail,
        )
        + "\n\n"
        + "- A rollout records 10 leaves and 1 scenario id: 4 `add_cost`, 2 `add_metric`, "
        "`add_data(step_num_scenarios, step_actor_tokens, scenario_ids=[id])`, "
        "`add_user_timing(step_actor_s)`, `add_idle_times(step_actor_idle_s)`. Producers are "
        "0-CPU actors (one process, one `MetricsClient` each), warmed up before timing. Wall "
        "time runs from starting the producers to the last `flush()` returning durable. Every "
        "row was checked after `handle.log(step, expect_producers=P)` (step sums, `costs/all`, "
        "run-wide unique scenarios).\n"
        "- Ceiling and naive were measured before and after our runs; the table shows the "
        "higher (stricter) of the two. Before / after, leaves/s: "
        + "; ".join(
            f"{label} {fmt_rate(b)} / {fmt_rate(a)}"
            for label, b, a in zip(
                (
                    "ceiling 1 at a time",
                    "ceiling in flight",
                    "naive 1 at a time",
                    "naive in flight",
                ),
                before,
                after,
                strict=True,
            )
        )
        + ".\n"
        "- The issue's reference figures (ceiling ~1.4–1.6M, naive ~3k leaves/s) match the "
        "*one call at a time* variants; the *in flight* variants are the stricter references.\n"
        f"- Targets with 4 producers (worst / best of the two `connect` patterns): ≥ 1.0× ceiling "
        f"(1 at a time): {verdict(worst4, ceil_sync, 1)} / {verdict(best4, ceil_sync, 1)}; "
        f"(in flight): {verdict(worst4, ceil_pipe, 1)} / {verdict(best4, ceil_pipe, 1)}. "
        f"≥ 300× naive (1 at a time): {verdict(worst4, naive_sync, 300)} / "
        f"{verdict(best4, naive_sync, 300)}; (in flight): {verdict(worst4, naive_pipe, 300)} / "
        f"{verdict(best4, naive_pipe, 300)}.\n"
        f"- The same target against the one-at-a-time ceiling measured right before and after "
        f"each run (last column; the machine's speed drifts during a run, so this pairs like "
        f"with like): {paired4[0]:.2f}× ({'met' if paired4[0] >= 1 else 'MISSED'}) / "
        f"{paired4[-1]:.2f}× ({'met' if paired4[-1] >= 1 else 'MISSED'})."
    )
    out.append(
        "### Producer memory and per-call cost\n\n"
        + md_table(
            ["measure", "value", "target"],
            [
                [
                    f"RSS growth of one producer recording {mem['leaves']:,.0f} leaves "
                    f"({mem['seconds']:.0f} s, {mem['batches']:,.0f} batches shipped)",
                    f"{mem['rss_growth_mb']:+.1f} MB at the end; peak {mem['peak_growth_mb']:+.1f} MB "
                    f"(RSS before: {mem['rss_before_mb']:.0f} MB)",
                    f"≤ +200 MB: {'met' if mem['peak_growth_mb'] <= 200 else 'MISSED'}",
                ],
                [
                    "`add_cost` on the worker (connected builder, shipping amortised), µs per call",
                    f"{add_cost['median_us']:.2f} median of 5 runs (best {add_cost['min_us']:.2f})",
                    f"≤ 2 µs: {'met' if add_cost['median_us'] <= 2 else 'MISSED'}",
                ],
            ],
        )
    )
    med = statistics.median(barrier)
    out.append(
        "### Barrier latency\n\n"
        + md_table(
            ["measure", "median ms", "min ms", "max ms", "× no-op round trip"],
            [
                [
                    "no-op actor round trip (`ray.get(actor.ping.remote())`)",
                    f"{rtt * 1e3:.2f}",
                    "",
                    "",
                    "1×",
                ],
                [
                    "`handle.log(step, expect_producers=64)`, 64 producers, 2,000 distinct keys",
                    f"{med * 1e3:.1f}",
                    f"{min(barrier) * 1e3:.1f}",
                    f"{max(barrier) * 1e3:.1f}",
                    f"{med / rtt:.0f}×",
                ],
            ],
        )
        + "\n\n- 64 `MetricsClient` s with distinct producer ids (in the driver) send the 2,000 "
        "keys (realistic cost keys, so rollups and cumulative twins: ~4,500 row keys) and flush; "
        "then `log` closes the step, adds telemetry, commits a checkpoint to local storage, "
        f"writes the history row and returns the row. {len(barrier)} rounds."
    )
    if spots:
        out.append(
            "### Worker hot spots (µs per call)\n\n" + md_table(["function", "µs/call"], spots)
        )
    if profile:
        out.append("### cProfile of `add_cost` in a producer\n\n```\n" + profile.strip() + "\n```")
    if spots:
        out[-1] += (
            "\n\n- Measured in the driver process with a real client shipping to the "
            "aggregator; each row is the median of 5 loops. `connect` here passes a non-default "
            "actor name and namespace, as the producers above do."
        )
    out.append(f"_bench_ingest ran in {elapsed:.0f} s._")
    print("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
