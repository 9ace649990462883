"""Checkpoint cost against history size: ours (incremental shards) vs ART (rewrites every id).

For 0, 1M and 10M unique scenario ids already stored, one step adds 10k new ids. Measured:

- **ours**: the barrier as the actor runs it: ``AggregatorState.close_step`` + ``checkpoint_parts``
  + ``CheckpointManager.commit`` (state blob, one level-0 shard per ledger family, manifest,
  pointer by compare-and-swap), to a local directory and to an S3 server (moto's
  ``ThreadedMotoServer`` in this process, HTTP on 127.0.0.1). Bytes are ``CommitInfo.bytes_written``
  (headers and pointer included). The 10k ids are ingested first through the wire path (producers'
  work, not timed). The stored history is one base commit of N digests, so the measured steps are
  typical steps: the tiered compaction (fanout 8) additionally rewrites each byte at most
  ``log8(steps)`` times, amortised (see :mod:`art_ray_metrics.durable.compaction`); that amortised figure is
  printed too, computed from the shard sizes.
- **ART 0.5.18**: ``MetricsBuilder.add_data(scenario_ids=...)`` + ``await flush()``, then what
  ``Model._persist_metrics_builder_state`` does: ``merge_state`` = read ``state.json``, deep-merge
  ``state_dict()`` (every id as a string), ``json.dump(indent=2)``. At 10M ids ART would hold and
  rewrite ~0.5 GB of JSON per step; it is measured at 0 and 1M only (``--art-10m`` to try 10M).

Targets (issue 4): bytes per step at 10M <= 2x bytes at 0; at 1M ids our barrier incl. the
checkpoint <= 0.05x ART's flush + state.json write. Prints a Markdown table and writes it to
``--results`` (default ``bench/results/local/checkpoint.md``, untracked; ``run_all.py
--update-docs`` copies a complete full run to the tracked ``bench/results/checkpoint.md``).

Run: ``python bench/bench_checkpoint.py [--quick] [--sizes 0,1000000,10000000] [--repeats 3]
[--no-s3] [--results PATH]``; ``--quick`` is ``--sizes 0,1000000 --repeats 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from art_ray_metrics.config import AggregatorConfig
from art_ray_metrics.core.dedupe import DigestLedger
from art_ray_metrics.core.state import AggregatorState
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.durable.checkpoint import CheckpointManager, CheckpointParts
from art_ray_metrics.durable.storage import ObjectStore, open_store
from art_ray_metrics.testing import make_batch

STEP_IDS = 10_000
RESULTS = Path(__file__).resolve().parent / "results" / "local" / "checkpoint.md"


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{uuid.UUID(int=i + 1)}" for i in range(n)]


def _random_digests(n: int, seed: int = 7) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=n * 16, dtype=np.uint8).tobytes()


def _base_state(n: int, store: ObjectStore) -> tuple[AggregatorState, CheckpointManager]:
    """A state holding ``n`` ids, committed once (the history), with a fresh writer epoch."""
    state = AggregatorState()
    state.cum.scenarios = DigestLedger.from_bytes(_random_digests(n))
    state.cum.scenarios._journal.append(state.cum.scenarios.to_bytes())
    defaults = AggregatorConfig()  # the aggregator's own checkpoint settings
    ckpt = CheckpointManager(
        store,
        retention=defaults.checkpoint_retention,
        prune_every=defaults.checkpoint_prune_every,
    )
    ckpt.acquire()
    blob, shards, token = state.checkpoint_parts()
    ckpt.commit(CheckpointParts(blob, shards))
    state.checkpoint_committed(token)
    return state, ckpt


def _ours(n: int, store_factory: Callable[[], ObjectStore], repeats: int) -> dict[str, float]:
    store = store_factory()
    state, ckpt = _base_state(n, store)
    times, sizes = [], []
    for r in range(repeats):
        step = r + 1
        ids = _ids(f"step{step}", STEP_IDS)
        batch = make_batch("p", step, step, "train", {"costs/train/x": 0.001}, scenario_ids=ids)
        state.ingest_bytes(encode_batch(batch))  # the producers' work, not the barrier
        started = time.perf_counter()
        state.close_step(step, "train")
        blob, shards, token = state.checkpoint_parts()
        info = ckpt.commit(CheckpointParts(blob, shards))
        state.checkpoint_committed(token)
        times.append(time.perf_counter() - started)
        sizes.append(info.bytes_written)
    assert len(state.cum.scenarios) == n + repeats * STEP_IDS
    return {"seconds": statistics.median(times), "bytes": statistics.median(sizes)}


def _art(n: int, repeats: int, workdir: Path) -> dict[str, float]:
    from _art import art_metrics_builder

    builder = art_metrics_builder()("train")
    if n:
        builder.load_state_dict({"cum_state": {}, "unique_scenario_ids": _ids("base", n)})
    path = workdir / "state.json"
    path.write_text(json.dumps({"step": 0}, indent=2))
    times, sizes = [], []
    for r in range(repeats):
        ids = _ids(f"step{r + 1}", STEP_IDS)
        builder.add_cost("train/x", 0.001)
        builder.add_data(step_num_scenarios=len(ids), scenario_ids=ids)
        started = time.perf_counter()
        asyncio.run(builder.flush())
        existing = json.loads(path.read_text())  # Model.merge_state: read, merge, overwrite
        existing["metrics_builder"] = builder.state_dict()
        with open(path, "w") as f:
            json.dump(existing, f, indent=2)
        times.append(time.perf_counter() - started)
        sizes.append(path.stat().st_size)
    return {"seconds": statistics.median(times), "bytes": statistics.median(sizes)}


def _s3_factory() -> tuple[Callable[[], ObjectStore], Any]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }
    )
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="bench")

    def factory() -> ObjectStore:
        return open_store(f"s3://bench/{uuid.uuid4().hex}", timeout_s=60)

    return factory, server


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="--sizes 0,1000000 --repeats 1")
    parser.add_argument("--sizes", default="0,1000000,10000000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--art-10m", action="store_true", help="also run ART at 10M ids")
    parser.add_argument("--results", default=str(RESULTS), help="where to write the table")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = "0,1000000", 1
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="arm-bench-ckpt-"))
    rows: list[tuple[str, int, dict[str, float]]] = []
    server = None
    try:
        backends: list[tuple[str, Callable[[], ObjectStore]]] = [
            ("ours, local dir", lambda: open_store(str(tmp / uuid.uuid4().hex)))
        ]
        if not args.no_s3:
            s3, server = _s3_factory()
            backends.append(("ours, S3 (moto, HTTP)", s3))
        for n in sizes:
            for label, factory in backends:
                result = _ours(n, factory, args.repeats)
                rows.append((label, n, result))
                print(f"{label:24} {n:>10,} ids: {result}", flush=True)
            if n <= 1_000_000 or args.art_10m:
                work = tmp / f"art-{n}"
                work.mkdir()
                result = _art(n, args.repeats, work)
                rows.append(("ART 0.5.18, local state.json", n, result))
                print(f"{'ART':24} {n:>10,} ids: {result}", flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    table = [
        "| writer | ids stored | bytes written per step | barrier time per step (median) |",
        "|---|---:|---:|---:|",
    ]
    for label, n, r in rows:
        table.append(
            f"| {label} | {n:,} | {_fmt_bytes(r['bytes'])} | {r['seconds'] * 1000:.1f} ms |"
        )
    by = {(label, n): r for label, n, r in rows}
    notes = []
    for label, _ in [
        (b, None) for b in {label for label, _, _ in rows if label.startswith("ours")}
    ]:
        if (label, 0) in by and (label, max(sizes)) in by:
            ratio = by[(label, max(sizes))]["bytes"] / by[(label, 0)]["bytes"]
            notes.append(
                f"- {label}: bytes per step at {max(sizes):,} / at 0 = {ratio:.2f}x (target <= 2x)"
            )
    art = by.get(("ART 0.5.18, local state.json", 1_000_000))
    for label in sorted({label for label, _, _ in rows if label.startswith("ours")}):
        ours = by.get((label, 1_000_000))
        if ours and art:
            notes.append(
                f"- {label} at 1M ids: barrier {ours['seconds'] * 1000:.1f} ms vs ART "
                f"{art['seconds'] * 1000:.1f} ms = {ours['seconds'] / art['seconds']:.3f}x "
                "(target <= 0.05x)"
            )
    if max(sizes) > 1_000_000 and not args.art_10m:
        notes.append(
            "- ART measured at 0 and 1M ids only (at 10M it rewrites ~0.5 GB of JSON per step)."
        )
    steps = max(1, max(sizes) // STEP_IDS)
    notes.append(
        f"- Amortised compaction: a run reaching {max(sizes):,} ids in steps of {STEP_IDS:,} "
        f"({steps} steps) rewrites each shard byte at most ceil(log8({steps})) = "
        f"{int(np.ceil(np.log(max(steps, 2)) / np.log(8)))} times, so the amortised ledger bytes "
        f"per step are at most that many times the {STEP_IDS * 16 / 1e3:.0f} kB of a step's new digests."
    )
    text = (
        f"# Checkpoint cost against history size ({STEP_IDS:,} new ids per step)\n\n"
        f"Command: `python bench/bench_checkpoint.py --sizes {args.sizes} --repeats {args.repeats}`"
        f"{' --no-s3' if args.no_s3 else ''}\n\n"
        + "\n".join(table)
        + "\n\n"
        + "\n".join(notes)
        + "\n"
    )
    print()
    print(text)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)


if __name__ == "__main__":
    main()
