"""Durable flush at rollout concurrency vs a no-op actor round trip, on local storage and on S3.

The rollout pattern of a worker: ``connect(step)``, 4 ``add_cost``, 1 ``add_metric``,
``add_data`` with 1 scenario id, ``add_user_timing``, then a durable ``flush()`` (``aflush()``
for coroutines). Measured at 1 process x 32 threads, 1 process x 64 asyncio coroutines and
4 processes x 8 threads (producer processes are Ray actors with 0 CPUs), each for a fixed time
after a warm-up, against the aggregator (``start_aggregator``, W&B disabled) on a local
directory and on a moto S3 server on 127.0.0.1.

The reference, measured right before at the same concurrency from the same processes: a no-op
async actor round trip carrying a batch of the same size (``ingest(bytes, True)`` returning at
once). Printed: durable flushes/s vs no-op round trips/s (ratio), flush p50/p99 vs no-op
p50/p99, one storage write (p50 of 30 small puts) and the bound ``3 x no-op p99 + one write``.
Each configuration's totals are checked exactly at the barrier afterwards.

Also printed: the aggregator's resident memory per idle producer (20,000 producers that sent
one batch each: never confirmed, as after a crash; then confirmed, as a client does when idle).

Run: ``python bench/bench_flush.py [--quick] [--no-s3]``. Nothing here asserts a time.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("WANDB_MODE", "disabled")

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import ray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import art_ray_metrics  # noqa: E402
from art_ray_metrics.core.records import LeafBatch  # noqa: E402
from art_ray_metrics.core.wire import encode_batch  # noqa: E402
from art_ray_metrics.durable.storage import open_store  # noqa: E402
from art_ray_metrics.testing import make_group  # noqa: E402

NAMESPACE = "arm-bench-flush"
COST = 0.001  # per add_cost; 4 per rollout


def _payload() -> bytes:
    """A batch like one rollout's (the no-op reference carries the same bytes)."""
    group = make_group(
        0,
        "train",
        {
            "costs/train/llm_judge/correctness": COST,
            "costs/train/llm_judge/hallucination": COST,
            "costs/train/llm_judge/format": COST,
            "costs/train/tinker_inference": COST,
            "reward/mean": 0.5,
            "time/step_actor_s": 0.25,
        },
        scenario_ids=["s-1"],
    )
    return encode_batch(LeafBatch("bench", 1, (group,), "x" * 16, 0, 0))


class NoOp:
    """The reference: an async actor (as the aggregator) that answers at once."""

    async def ingest(self, data: bytes, durable: bool = False) -> dict[str, Any]:
        """Accept a batch and answer."""
        return {"durable": True, "durable_upto": 0}


class Runner:
    """A producer process: runs rollouts from threads or coroutines for a fixed time."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.payload = _payload()
        self.noop: Any = None

    def _rollout(self, name: str, step: int, sid: str) -> Any:
        b = art_ray_metrics.connect(step, name=name, namespace=self.namespace)
        b.add_cost("train/llm_judge/correctness", COST)
        b.add_cost("train/llm_judge/hallucination", COST)
        b.add_cost("train/llm_judge/format", COST)
        b.add_cost("train/tinker_inference", COST)
        b.add_metric("reward/mean", 0.5)
        b.add_data(scenario_ids=[sid])
        b.add_user_timing(step_actor_s=0.25)
        return b

    def _noop(self) -> Any:
        if self.noop is None:
            self.noop = ray.get_actor("arm-bench-noop", namespace=self.namespace)
        return self.noop

    def threads(
        self, name: str, mode: str, n: int, warmup_s: float, run_s: float, step: int
    ) -> tuple[int, list[float], int]:
        """(operations in the window, their latencies, rollouts in all)."""
        start = time.monotonic() + warmup_s
        stop = start + run_s
        lat: list[list[float]] = [[] for _ in range(n)]
        total = [0] * n
        failed = [0] * n
        noop = self._noop()

        def work(i: int) -> None:
            k = 0
            while True:
                t0 = time.monotonic()
                if t0 >= stop:
                    return
                if mode == "flush":
                    ok = self._rollout(name, step, f"{i}-{k}").flush(timeout_s=60).ok
                    failed[i] += not ok
                else:
                    ray.get(noop.ingest.remote(self.payload, True))
                t1 = time.monotonic()
                total[i] += 1
                k += 1
                if t0 >= start:
                    lat[i].append(t1 - t0)

        ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        flat = [x for xs in lat for x in xs]
        return len(flat), flat, sum(total) if not any(failed) else -sum(failed)

    def coroutines(
        self, name: str, mode: str, n: int, warmup_s: float, run_s: float, step: int
    ) -> tuple[int, list[float], int]:
        """:meth:`threads` with ``n`` coroutines on one event loop (``aflush``)."""
        noop = self._noop()

        async def main() -> tuple[int, list[float], int]:
            start = time.monotonic() + warmup_s
            stop = start + run_s
            lat: list[float] = []
            counts = [0, 0]

            async def one(i: int) -> None:
                k = 0
                while True:
                    t0 = time.monotonic()
                    if t0 >= stop:
                        return
                    if mode == "flush":
                        b = self._rollout(name, step, f"a{i}-{k}")
                        counts[1] += not (await b.aflush(timeout_s=60)).ok
                    else:
                        await noop.ingest.remote(self.payload, True)
                    t1 = time.monotonic()
                    counts[0] += 1
                    k += 1
                    if t0 >= start:
                        lat.append(t1 - t0)

            await asyncio.gather(*(one(i) for i in range(n)))
            return len(lat), lat, counts[0] if not counts[1] else -counts[1]

        return asyncio.run(main())


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def _storage_write_s(uri: str) -> float:
    store = open_store(uri)
    times = []
    for i in range(30):
        t0 = time.perf_counter()
        store.put(f"bench-probe/{i:04d}", b"x" * 600)
        times.append(time.perf_counter() - t0)
    for i in range(30):
        store.delete(f"bench-probe/{i:04d}")
    return statistics.median(times)


CONFIGS = (
    ("1 x 32 threads", 1, 32, "threads"),
    ("1 x 64 asyncio", 1, 64, "coroutines"),
    ("4 x 8 threads", 4, 8, "threads"),
)


def measure(
    label: str, uri: str, runners: list[Any], run_s: float, warmup_s: float
) -> list[dict[str, Any]]:
    """Every configuration against one aggregator on ``uri``."""
    name = f"arm-bench-{uuid.uuid4().hex[:6]}"
    handle = art_ray_metrics.start_aggregator(
        name=name, namespace=NAMESPACE, run_name=name, storage_uri=uri, wandb_mode="disabled"
    )
    write_s = _storage_write_s(uri)
    out = []
    try:
        for step, (cfg, procs, n, kind) in enumerate(CONFIGS):
            use = runners[:procs]
            res = {}
            for mode in ("noop", "flush"):
                refs = [getattr(r, kind).remote(name, mode, n, warmup_s, run_s, step) for r in use]
                parts = ray.get(refs)
                lat = [x for p in parts for x in p[1]]
                res[mode] = (sum(p[0] for p in parts) / run_s, lat, sum(p[2] for p in parts))
            row = handle.log(step, timeout_s=60)
            rollouts = res["flush"][2]
            got = Decimal(str(row.get("costs/train/llm_judge/correctness", 0.0)))
            exact = rollouts > 0 and got == Decimal(str(float(Decimal(str(COST)) * rollouts)))
            noop_rate, noop_lat, _ = res["noop"]
            rate, lat, _ = res["flush"]
            bound = 3 * _pct(noop_lat, 0.99) + write_s
            out.append(
                {
                    "storage": label,
                    "config": cfg,
                    "rate": rate,
                    "noop": noop_rate,
                    "ratio": rate / noop_rate,
                    "p50": _pct(lat, 0.5),
                    "p99": _pct(lat, 0.99),
                    "noop_p50": _pct(noop_lat, 0.5),
                    "noop_p99": _pct(noop_lat, 0.99),
                    "write": write_s,
                    "bound": bound,
                    "exact": exact,
                    "rollouts": rollouts,
                }
            )
            print(f"  {label} {cfg}: {rate:,.0f}/s vs {noop_rate:,.0f}/s", file=sys.stderr)
        stats = handle.stats()
        out[-1]["wal_writes"] = stats["health"]["wal_writes"]
    finally:
        handle.shutdown()
    return out


def state_bytes_per_producer(producers: int) -> tuple[float, float]:
    """Python heap bytes per idle producer in the aggregator's state (tracemalloc): (never
    confirmed, after confirm)."""
    import tracemalloc

    from art_ray_metrics.core.state import AggregatorState

    state = AggregatorState()
    state.close_step(0)
    batches = [
        LeafBatch(
            f"host-{i:06d}",
            1,
            (make_group(1, "train", {"costs/train/judge": COST}),),
            uuid.uuid4().hex[:16],
            0,
            0,
        )
        for i in range(producers)
    ]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for b in batches:
        state.ingest(b)
    state.close_step(1)
    kept = (tracemalloc.get_traced_memory()[0] - base) / producers
    for b in batches:
        state.confirm(b.producer_id, b.incarnation, 1)
    confirmed = (tracemalloc.get_traced_memory()[0] - base) / producers
    tracemalloc.stop()
    return kept, confirmed


def producer_memory(uri: str, producers: int) -> tuple[float, float]:
    """Aggregator RSS growth per idle producer: (never confirmed, confirmed)."""
    name = f"arm-bench-mem-{uuid.uuid4().hex[:6]}"
    handle = art_ray_metrics.start_aggregator(
        name=name, namespace=NAMESPACE, run_name=name, storage_uri=uri, wandb_mode="disabled"
    )

    def rss() -> int:
        pid = handle.stats()["pid"]
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    try:
        steps = iter(range(1, 100))
        handle.log(0)

        steps_done = [1]

        def wave(prefix: str, confirm: bool) -> float:
            before = rss()
            for i in range(0, producers, 1000):
                step_group = make_group(steps_done[0], "train", {"costs/train/judge": COST})
                batches = [
                    LeafBatch(f"{prefix}-{j:06d}", 1, (step_group,), uuid.uuid4().hex[:16], 0, 0)
                    for j in range(i, min(producers, i + 1000))
                ]
                ray.get([handle.actor.ingest.remote(encode_batch(b)) for b in batches])
                if confirm:
                    ray.get(
                        [
                            handle.actor.confirm.remote(b.producer_id, b.incarnation, 1)
                            for b in batches
                        ]
                    )
            handle.log(next(steps))
            steps_done[0] += 1
            return (rss() - before) / producers

        wave("warm", True)  # allocator and Ray warm-up
        return wave("crashed", False), wave("confirmed", True)
    finally:
        handle.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows")
    parser.add_argument("--no-s3", action="store_true", help="local storage only")
    args = parser.parse_args()
    run_s, warmup_s = (3.0, 1.0) if args.quick else (6.0, 1.5)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        namespace=NAMESPACE,
        log_to_driver=False,
    )
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    tmp = tempfile.mkdtemp(prefix="arm-bench-flush-")
    s3 = None
    started = time.perf_counter()
    try:
        noop = (
            ray.remote(NoOp)
            .options(name="arm-bench-noop", namespace=NAMESPACE, num_cpus=0, max_concurrency=1000)
            .remote()
        )
        runners = [
            ray.remote(Runner).options(num_cpus=0, max_concurrency=4).remote(NAMESPACE)
            for _ in range(4)
        ]
        ray.get(noop.ingest.remote(b""))
        ray.get([r.threads.remote("-", "noop", 1, 0.0, 0.2, 0) for r in runners])
        results = measure("local", str(Path(tmp) / "run"), runners, run_s, warmup_s)
        if not args.no_s3:
            from tests.s3server import OwnedS3

            s3 = OwnedS3()
            os.environ.update(s3.env())
            results += measure("S3", f"{s3.bucket()}/run", runners, run_s, warmup_s)
        mem_n = 5_000 if args.quick else 20_000
        kept, confirmed = producer_memory(str(Path(tmp) / "mem"), mem_n)
        heap_kept, heap_confirmed = state_bytes_per_producer(mem_n)
    finally:
        ray.shutdown()
        if s3 is not None:
            s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print("## Durable flush at rollout concurrency\n")
    print(
        "| storage | producers x concurrent rollouts | durable flushes/s | no-op round trips/s "
        "| ratio | flush p50 / p99 | no-op p50 / p99 | 3 x no-op p99 + one write | totals exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['storage']} | {r['config']} | {r['rate']:,.0f} | {r['noop']:,.0f} "
            f"| {r['ratio']:.2f}x | {r['p50'] * 1e3:.1f} / {r['p99'] * 1e3:.1f} ms "
            f"| {r['noop_p50'] * 1e3:.1f} / {r['noop_p99'] * 1e3:.1f} ms "
            f"| {r['bound'] * 1e3:.1f} ms (write {r['write'] * 1e3:.1f} ms) "
            f"| {'yes' if r['exact'] else 'NO'} |"
        )
    print(
        "\nTargets: ratio >= 0.5x on local storage and >= 0.35x on S3; flush p99 <= 3 x no-op "
        "p99 + one storage write (last column)."
    )
    print(
        f"\nAggregator memory per idle producer ({mem_n:,} producers, one batch each): "
        f"actor RSS growth {kept:,.0f} B per producer that never confirmed (died first), "
        f"{confirmed:,.0f} B per producer that confirmed (what an idle client does; RSS is "
        f"coarse: freed memory is reused, not returned). State heap (tracemalloc): "
        f"{heap_kept:,.0f} B per unconfirmed producer window, {heap_confirmed:,.0f} B after "
        "confirm."
    )
    print(
        f"\nTotal time {time.perf_counter() - started:.0f} s. Command: "
        f"`python bench/bench_flush.py{' --quick' if args.quick else ''}"
        f"{' --no-s3' if args.no_s3 else ''}`"
    )


if __name__ == "__main__":
    main()
