"""Core benchmarks (no Ray): unique-id memory, core ingest rate, ``add_metric`` per-call cost.

Prints Markdown tables, all measured in one run, with OpenPipe ART 0.5.18's own
``MetricsBuilder`` beside ours on the same inputs where it has an equivalent (ART is fetched by
``bench/_art.py`` into ``bench/.cache``; it is never a dependency of the package).

1. **Bytes per unique scenario id.** Ids look like ``scenario-<uuid4>`` (45 characters, drawn
   from a seeded RNG so ART sees the very same ids). At 1M and 10M ids they go through the real
   path: one wire batch per step of 10k ids (``encode_batch`` → ``AggregatorState.ingest_bytes``
   → ``close_step`` → incremental checkpoint commit, as the actor does at every barrier); the
   ids are hashed before the measured run (that is the producers' work). Resident bytes are
   ``DigestLedger.nbytes``, cross-checked with the ``tracemalloc`` delta of the whole state
   and the process RSS and peak-RSS deltas; serialised bytes are ``to_bytes()``, the
   incremental checkpoint shards, and the whole ``snapshot()``. ART's figure is its real path
   too: ``add_data`` + ``flush`` per step, then the size of its ``set[str]`` (``sys.getsizeof``
   of the set and the strings, cross-checked by RSS) and of its ``state_dict()`` ids as JSON.
   **In-process builder** (section ``builder_ids``): the same ids through the public
   ``MetricsBuilder.add_data(scenario_ids=...)`` + ``flush()`` per 10k-id step, at 10M ids
   (1M with ``--quick``): RSS growth per id, beside the same builder keeping a checkpoint
   journal (how it was before; measured in the same run).
2. **Core ingest rate.** Pre-built batches through ``AggregatorState.ingest`` and, encoded,
   through ``ingest_bytes``; ``MetricsBuilder.add_metric`` in a loop.
3. **``add_metric`` per call** at 10 / 100 / 1,000 pending keys, re-adding existing keys and
   adding new ones, ours vs ART.

Run: ``python bench/bench_core.py [--quick]`` (``--quick``: 100k/1M ids, fewer repeats).
Figures are wall-clock medians on whatever machine runs them; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _art import art_metrics_builder

from art_ray_metrics import MetricsBuilder
from art_ray_metrics.core.dedupe import DigestLedger, digest
from art_ray_metrics.core.records import LeafBatch, StepGroup
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.core.wire import encode_batch

# -- shared helpers (bench_ingest imports these) ---------------------------------------------


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render a Markdown table; floats are formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_rate(x: float) -> str:
    """Format a rate like 1,234,567."""
    return f"{x:,.0f}"


def realistic_keys(n: int) -> list[str]:
    """``n`` distinct leaf keys as a rollout/judge worker records them (no ancestor clashes)."""
    base = [
        "costs/train/llm_judge/correctness",
        "costs/train/llm_judge/hallucination",
        "costs/train/llm_judge/format",
        "costs/train/tinker_inference",
        "costs/train/openai/gpt_4o_mini",
        "time/step_actor_s",
        "time/step_eval_s",
        "data/step_actor_tokens",
        "data/step_num_scenarios",
        "reward/mean",
        "reward/format_ok",
        "throughput/step_actor_idle_s",
    ]
    keys = base[:n]
    i = 0
    while len(keys) < n:
        keys.append(f"costs/train/judge_{i // 8}/criterion_{i % 8}")
        i += 1
    return keys


def scenario_ids(rng: random.Random, n: int) -> list[str]:
    """``n`` ids like ``scenario-<uuid4>`` from a seeded RNG (reproducible)."""
    bits = rng.getrandbits
    return [f"scenario-{uuid.UUID(int=bits(128), version=4)}" for _ in range(n)]


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (GC collected before each)."""
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- 1. bytes per unique id ------------------------------------------------------------------

SEED = 20240601
STEP_IDS = 10_000


def _chunks(total: int, size: int) -> Iterator[int]:
    done = 0
    while done < total:
        yield min(size, total - done)
        done += size


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since the last :func:`_reset_peak_rss` (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class _Probe:
    """Measures memory held after a block: tracemalloc (optional), RSS Δ and peak RSS Δ."""

    def __init__(self, trace: bool) -> None:
        self.trace = trace

    def __enter__(self) -> _Probe:
        gc.collect()
        if self.trace:
            tracemalloc.start()
            self.base = tracemalloc.get_traced_memory()[0]
        self.rss0 = rss_bytes()
        _reset_peak_rss()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        gc.collect()
        overhead = 0
        self.traced = float("nan")
        if self.trace:
            self.traced = tracemalloc.get_traced_memory()[0] - self.base
            overhead = tracemalloc.get_tracemalloc_memory()
        self.rss = rss_bytes() - self.rss0 - overhead
        self.peak = peak_rss_bytes() - self.rss0 - overhead
        if self.trace:
            tracemalloc.stop()


def _digest_blobs(n: int, size: int) -> list[bytes]:
    """Concatenated digests of the seeded ids, ``size`` ids per blob."""
    rng = random.Random(SEED)
    blobs = []
    for part in _chunks(n, size):
        pieces = [
            b"".join(digest(s) for s in scenario_ids(rng, sub)) for sub in _chunks(part, STEP_IDS)
        ]
        blobs.append(b"".join(pieces))
    return blobs


def ours_real_path(n: int) -> dict[str, float]:
    """Ingest ``n`` ids, 10k per step, through wire batches, barriers and checkpoint commits."""
    blobs = _digest_blobs(n, STEP_IDS)  # hashing the ids is the producer's work: not measured
    shard_bytes = 0
    step_times: list[float] = []
    with _Probe(trace=True) as probe:
        state = AggregatorState()
        for step, digests in enumerate(blobs):
            t0 = time.perf_counter()
            sums = {"data/step_num_scenarios": Decimal(len(digests) // 16)}
            group = StepGroup(step, "train", sums, (), digests)
            state.ingest_bytes(encode_batch(LeafBatch("bench", step + 1, (group,))))
            state.close_step(step, "train")
            _, shards, token = state.checkpoint_parts()
            shard_bytes += sum(len(b) for b in shards.values())
            state.checkpoint_committed(token)
            step_times.append(time.perf_counter() - t0)
    ledger = state.cum.scenarios
    assert len(ledger) == n, (len(ledger), n)
    return {
        "n": n,
        "resident": ledger.nbytes / n,
        "traced": probe.traced / n,
        "rss": probe.rss / n,
        "peak": probe.peak / n,
        "serialised": len(ledger.to_bytes()) / n,
        "shards": shard_bytes / n,
        "snapshot": len(state.snapshot()) / n,
        "seconds": probe.seconds,
        "first_step_ms": statistics.median(step_times[:10]) * 1e3,
        "last_step_ms": statistics.median(step_times[-10:]) * 1e3,
    }


def art_real_path(n: int) -> dict[str, float]:
    """ART's ``add_data(scenario_ids=...)`` + ``flush()`` per 10k-id step on the same ids."""
    art_builder_cls = art_metrics_builder()
    rng = random.Random(SEED)
    with _Probe(trace=False) as probe:  # the ids are ART's state: their creation is measured
        builder = art_builder_cls(cost_context="train")

        async def run() -> None:
            for size in _chunks(n, STEP_IDS):
                builder.add_data(step_num_scenarios=size, scenario_ids=scenario_ids(rng, size))
                await builder.flush()

        asyncio.run(run())
    ids: set[str] = builder._shared_state.unique_scenario_ids
    assert len(ids) == n
    sized = sys.getsizeof(ids) + sum(sys.getsizeof(s) for s in ids)
    serialised = len(json.dumps(builder.state_dict()["unique_scenario_ids"]).encode())
    return {
        "n": n,
        "resident": sized / n,
        "traced": float("nan"),
        "rss": probe.rss / n,
        "peak": probe.peak / n,
        "serialised": serialised / n,
        "shards": float("nan"),
        "snapshot": float("nan"),
        "seconds": probe.seconds,
    }


def bench_ids(quick: bool) -> str:
    """Section 1."""
    small, large = (100_000, 1_000_000) if quick else (1_000_000, 10_000_000)
    results = [
        ("ours, real path (wire batch + barrier + checkpoint per 10k ids)", ours_real_path(small)),
        ("ART 0.5.18 `set[str]`, real path (add_data + flush per 10k ids)", art_real_path(small)),
        ("ours, real path (wire batch + barrier + checkpoint per 10k ids)", ours_real_path(large)),
    ]

    def f(x: float) -> str:
        return "–" if x != x else f"{x:.1f}"

    rows = [
        [
            name,
            f"{int(r['n']):,}",
            f(r["resident"]),
            f(r["traced"]),
            f(r["rss"]),
            f(r["peak"]),
            f(r["serialised"]),
            f(r["shards"]),
            f(r["snapshot"]),
            f"{r['seconds']:.1f}",
            f"{r['first_step_ms']:.2f} / {r['last_step_ms']:.1f}" if "last_step_ms" in r else "–",
        ]
        for name, r in results
    ]
    headers = [
        "path",
        "ids",
        "resident B/id",
        "tracemalloc B/id",
        "RSS Δ B/id",
        "peak RSS Δ B/id",
        "serialised B/id",
        "ckpt shards B/id",
        "snapshot B/id",
        "s",
        "ms per step, first / last 10",
    ]
    ours_small, art_small, ours_large = (r for _, r in results)
    notes = [
        "",
        "- *resident*: ours = `DigestLedger.nbytes` (sorted runs + uncommitted journal); "
        "ART = `sys.getsizeof(set)` + Σ `sys.getsizeof(id)`.",
        "- *tracemalloc*: traced Python+NumPy memory the whole `AggregatorState` (or ledger) "
        "still holds after the run. *RSS Δ*: process RSS after − before (tracemalloc's own "
        "memory subtracted). *peak RSS Δ*: the kernel's peak-RSS mark (reset before the run) − "
        "RSS before: ours includes the scratch of a run merge (at most 2 × 2²⁰ digests, 32 MiB, "
        "whatever the ledger's size: a large share at 1M ids, a small one at 10M). Ours hashes "
        "the ids before the measured run (that is the producer's work); ART's ids are created "
        "inside it because the strings are ART's state.",
        "- *serialised*: ours = `DigestLedger.to_bytes()`; ART = JSON of "
        "`state_dict()['unique_scenario_ids']`. *ckpt shards*: Σ bytes of the incremental "
        "ledger shards written over the run (each id once). *snapshot*: the whole "
        "`AggregatorState.snapshot()`.",
        f"- ART/ours resident at {int(art_small['n']):,} ids: "
        f"{art_small['resident'] / ours_small['resident']:.1f}×; by RSS Δ: "
        f"{art_small['rss'] / ours_small['rss']:.1f}×.",
        f"- Target ≤ 20 B/id at {int(ours_large['n']):,} ids: resident "
        f"{ours_large['resident']:.1f} ({'met' if ours_large['resident'] <= 20 else 'MISSED'}), "
        f"serialised {ours_large['serialised']:.1f} "
        f"({'met' if ours_large['serialised'] <= 20 else 'MISSED'}); peak RSS Δ "
        f"{ours_large['peak']:.1f}.",
        "- *ms per step*: ingest + barrier + checkpoint parts of one 10k-id step, median of the "
        "first and of the last 10 steps. New ids are looked up in every run of the ledger (runs "
        "of at most 2²⁰ ids), so a step's search grows with the ids so far (first vs last); "
        "merges copy only runs of similar size, never the whole ledger.",
    ]
    return (
        "### Bytes per unique scenario id\n\n" + md_table(headers, rows) + "\n" + "\n".join(notes)
    )


def builder_public_path(n: int, *, journal: bool) -> dict[str, float]:
    """``MetricsBuilder.add_data(scenario_ids=...)`` + ``flush()`` per 10k-id step, in process.

    The ids are created and hashed inside the measured block (the public API takes strings);
    each step's strings are freed after its flush, so what stays is the builder's state.
    ``journal=True`` swaps in journaling ledgers: the builder as it was before it stopped
    keeping the incremental-checkpoint journal (the baseline).
    """
    rng = random.Random(SEED)
    with _Probe(trace=False) as probe:
        builder = MetricsBuilder("train")
        if journal:
            cum = builder._shared.cum
            cum.scenarios, cum.cost_ids = DigestLedger(), DigestLedger()

        async def run() -> None:
            for size in _chunks(n, STEP_IDS):
                builder.add_data(step_num_scenarios=size, scenario_ids=scenario_ids(rng, size))
                await builder.flush()

        asyncio.run(run())
    ledger = builder._shared.cum.scenarios
    assert len(ledger) == n, (len(ledger), n)
    return {
        "n": n,
        "resident": ledger.nbytes / n,
        "rss": probe.rss / n,
        "peak": probe.peak / n,
        "seconds": probe.seconds,
    }


def bench_builder_ids(quick: bool) -> str:
    """Section 1b: the in-process builder's memory per unique id, through the public API."""
    n = 1_000_000 if quick else 10_000_000
    ours = builder_public_path(n, journal=False)
    base = builder_public_path(n, journal=True)
    rows = [
        [
            name,
            f"{int(r['n']):,}",
            f"{r['resident']:.1f}",
            f"{r['rss']:.1f}",
            f"{r['peak']:.1f}",
            f"{r['seconds']:.1f}",
        ]
        for name, r in (
            ("ours: `MetricsBuilder` (ledger without journal)", ours),
            ("baseline: the same builder with a checkpoint journal (before)", base),
        )
    ]
    headers = ["path", "ids", "resident B/id", "RSS Δ B/id", "peak RSS Δ B/id", "s"]
    notes = [
        "",
        "- Public API only: `add_data(step_num_scenarios=10_000, scenario_ids=[...])` then "
        "`await flush()` per step; ids are `scenario-<uuid4>` strings made and hashed inside "
        "the measured block. *RSS Δ*: process RSS after − before; *peak*: the kernel's "
        "peak-RSS mark (reset before) − RSS before.",
        f"- RSS Δ ours / baseline: {ours['rss'] / base['rss']:.2f}×. Target ≤ 20 B/id of RSS "
        f"growth at {n:,} ids: {ours['rss']:.1f} ({'met' if ours['rss'] <= 20 else 'MISSED'}).",
    ]
    return (
        "### In-process `MetricsBuilder`: bytes per unique scenario id\n\n"
        + md_table(headers, rows)
        + "\n"
        + "\n".join(notes)
    )


# -- 2. core ingest rate ---------------------------------------------------------------------


def _batches(n_batches: int, leaves: int, keys: list[str], digests_per_batch: int) -> list[Any]:
    rng = random.Random(7)
    out = []
    per_key = leaves // len(keys)
    for seq in range(1, n_batches + 1):
        sums = {k: Decimal(per_key) * Decimal("0.0001") for k in keys}
        digests = b"".join(digest(s) for s in scenario_ids(rng, digests_per_batch))
        out.append(LeafBatch("bench", seq, (StepGroup(0, "train", sums, (), digests),)))
    return out


def bench_ingest_rate(quick: bool) -> str:
    """Section 2."""
    n_batches = 200 if quick else 1_000
    repeats = 3 if quick else 5
    cases = [
        ("1,000 leaves over 50 keys, pre-aggregated to 50 sums", 1_000, realistic_keys(50)),
        ("1,000 distinct keys (no pre-aggregation possible)", 1_000, realistic_keys(1_000)),
    ]
    rows = []
    for name, leaves, keys in cases:
        batches = _batches(n_batches, leaves, keys, 10)
        blobs = [encode_batch(b) for b in batches]

        def run_objects(batches: list[Any] = batches) -> None:
            state = AggregatorState()
            for b in batches:
                state.ingest(b)

        def run_bytes(blobs: list[bytes] = blobs) -> None:
            state = AggregatorState()
            for b in blobs:
                state.ingest_bytes(b)

        for path, fn in (("`ingest(LeafBatch)`", run_objects), ("`ingest_bytes(wire)`", run_bytes)):
            t = median_time(fn, repeats)
            rows.append(
                [
                    name,
                    path,
                    f"{len(keys)}",
                    fmt_rate(n_batches * leaves / t),
                    fmt_rate(n_batches * len(keys) / t),
                    f"{t / n_batches * 1e6:.0f}",
                ]
            )
    # the in-process builder: 1,000 leaves over 50 keys, repeated
    keys50 = realistic_keys(50)
    calls = [(keys50[i % 50], 0.0001 * (i % 7 + 1)) for i in range(20_000 if quick else 100_000)]
    art_cls = art_metrics_builder()
    for label, cls in (("ours", MetricsBuilder), ("ART 0.5.18", art_cls)):

        def run_builder(cls: Any = cls) -> None:
            b = cls(cost_context="train")
            add = b.add_metric
            for k, v in calls:
                add(k, v)

        t = median_time(run_builder, repeats)
        rows.append(
            [
                "`MetricsBuilder.add_metric`, 50 keys",
                label,
                "50",
                fmt_rate(len(calls) / t),
                fmt_rate(len(calls) / t),
                f"{t / len(calls) * 1e6:.2f} per leaf",
            ]
        )
    headers = ["input", "path", "sums/batch", "leaves/s", "applied sums/s", "µs/batch"]
    notes = [
        "",
        f"- {n_batches:,} batches per run, each also carrying 10 scenario digests; all for "
        "step 0 of scope `train` (the buffer re-adds existing keys). Median of "
        f"{repeats} runs.",
        "- *leaves/s* counts recorded leaves (a producer pre-aggregates repeated keys, so "
        "one applied sum can stand for many leaves); *applied sums/s* counts what the state "
        "actually adds.",
    ]
    return "### Core ingest rate\n\n" + md_table(headers, rows) + "\n" + "\n".join(notes)


# -- 3. add_metric per call -------------------------------------------------------------------


def _filled(cls: Any, keys: list[str]) -> Any:
    b = cls(cost_context="train")
    for k in keys:
        b.add_metric(k, 0.001)
    return b


def _art_filled(cls: Any, template: Any) -> Any:
    """A copy of an ART builder's pending buffer (filling ART at 1,000 keys is O(n²))."""
    b = cls(cost_context="train")
    b._pending_state().step_buffer.update(template._pending_state().step_buffer)
    return b


def per_call_existing(cls: Any, keys: list[str], calls: int, repeats: int) -> float:
    """µs per ``add_metric`` re-adding already-pending keys."""
    b = _filled(cls, keys)
    seq = [(keys[i % len(keys)], 0.0001) for i in range(calls)]
    add = b.add_metric

    def run() -> None:
        for k, v in seq:
            add(k, v)

    return median_time(run, repeats) / calls * 1e6


def per_call_new(cls: Any, keys: list[str], builders: int, per: int, repeats: int) -> float:
    """µs per ``add_metric`` of a new key with ``len(keys)`` keys pending (±``per``)."""
    times = []
    is_art = cls is not MetricsBuilder
    template = _filled(cls, keys) if is_art else None
    for r in range(repeats):
        bs = [_art_filled(cls, template) if is_art else _filled(cls, keys) for _ in range(builders)]
        pairs = [(b.add_metric, f"costs/train/new_{r}_{j}/leaf") for b in bs for j in range(per)]
        gc.collect()
        t0 = time.perf_counter()
        for add, k in pairs:
            add(k, 0.0001)
        times.append((time.perf_counter() - t0) / len(pairs))
    return statistics.median(times) * 1e6


def bench_add_metric(quick: bool) -> str:
    """Section 3."""
    art_cls = art_metrics_builder()
    repeats = 3 if quick else 7
    rows = []
    verdict = ""
    for n in (10, 100, 1_000):
        keys = realistic_keys(n)
        calls = 20_000 if quick else 100_000
        art_calls = max(2_000, calls // max(1, n // 10)) if n >= 100 else calls
        ours_e = per_call_existing(MetricsBuilder, keys, calls, repeats)
        art_e = per_call_existing(art_cls, keys, art_calls, repeats)
        builders = 100 if quick else 200
        ours_n = per_call_new(MetricsBuilder, keys, builders, 5, repeats)
        art_n = per_call_new(art_cls, keys, builders, 5, repeats)
        rows.append(
            [
                f"{n:,}",
                f"{ours_e:.2f}",
                f"{art_e:.2f}",
                f"{art_e / ours_e:.1f}×",
                f"{ours_n:.2f}",
                f"{art_n:.2f}",
                f"{art_n / ours_n:.1f}×",
            ]
        )
        if n == 1_000:
            worst = max(ours_e, ours_n)
            verdict = (
                f"- Target ≤ 2 µs per call at 1,000 pending keys: worst of ours {worst:.2f} µs "
                f"({'met' if worst <= 2 else 'MISSED'})."
            )
    headers = [
        "pending keys",
        "ours µs (re-add)",
        "ART µs (re-add)",
        "ART/ours",
        "ours µs (new key)",
        "ART µs (new key)",
        "ART/ours (new)",
    ]
    notes = [
        "",
        "- Keys are a realistic worker set (`costs/train/llm_judge/...`, `time/step_*`, "
        "`data/step_*`, `reward/*`, then `costs/train/judge_<i>/criterion_<j>`).",
        "- *re-add*: cycling through the pending keys. *new key*: 5 new, unrelated keys added "
        "to each of many builders pre-filled with that many keys (ART's buffers are copied, "
        "not re-filled, to keep its O(n²) setup out of the run). Median of "
        f"{repeats} runs; ART and ours both do their full validation.",
        verdict,
    ]
    return (
        "### `MetricsBuilder.add_metric` per call\n\n"
        + md_table(headers, rows)
        + "\n"
        + "\n".join(notes)
    )


def main() -> None:
    """Run every section and print Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument(
        "--only",
        choices=("ids", "builder_ids", "ingest", "add_metric"),
        help="run one section only",
    )
    args = parser.parse_args()
    sections: list[tuple[str, Callable[[bool], str]]] = [
        ("add_metric", bench_add_metric),
        ("ingest", bench_ingest_rate),
        ("ids", bench_ids),
        ("builder_ids", bench_builder_ids),
    ]
    out = []
    for name, fn in sections:
        if args.only in (None, name):
            out.append(fn(args.quick))
            print(out[-1] + "\n", flush=True)


if __name__ == "__main__":
    main()
