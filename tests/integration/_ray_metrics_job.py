"""Run by test_ray_metrics.py in a subprocess: its own one-node Ray cluster with a metrics
export port, an aggregator with a known workload, then the node's Prometheus text on stdout.

Usage: ``python _ray_metrics_job.py <storage_dir> <timeout_s>``.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request

# Series the workload below must produce, with the value each must reach.
EXPECTED = {
    "ray_art_metrics_batches_total": 3.0,
    "ray_art_metrics_leaves_total": 6.0,
    "ray_art_metrics_duplicate_batches_total": 1.0,
    "ray_art_metrics_rejected_batches_total": 1.0,
    "ray_art_metrics_rows_total": 1.0,
    "ray_art_metrics_producers": 2.0,
    "ray_art_metrics_pending_steps": 1.0,
    "ray_art_metrics_unique_scenarios": 2.0,
    "ray_art_metrics_barrier_seconds_count": 1.0,
    "ray_art_metrics_checkpoint_commit_seconds_count": 1.0,
    "ray_art_metrics_wal_commit_seconds_count": 1.0,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """Series of this aggregator (tag aggregator="metrics-job"), summed over other labels."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if not line.startswith("ray_art_metrics_") or 'aggregator="metrics-job"' not in line:
            continue
        name = line.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("WANDB_MODE", "disabled")
    # a loaded CI machine can take longer than the defaults to start the raylet and its agent
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    # workers export their metrics every 10 s by default: the poll below waited that out; 1 s
    # is the shortest Ray allows
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    import ray

    import art_ray_metrics as arm
    from art_ray_metrics.core.wire import encode_batch
    from art_ray_metrics.testing import make_batch

    storage, timeout_s = sys.argv[1], float(sys.argv[2])
    port = free_port()
    for attempt in range(3):  # on an overloaded machine the node's metrics agent can start late
        try:
            ray.init(
                address="local",
                num_cpus=1,
                include_dashboard=False,
                log_to_driver=False,
                _metrics_export_port=port,
                _node_ip_address="127.0.0.1",
            )
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
            port = free_port()
    handle = arm.start_aggregator(
        name="metrics-job", namespace="metrics-job", storage_uri=storage, wandb_mode="disabled"
    )
    ingest = handle.actor.ingest
    a1 = encode_batch(
        make_batch(
            "a", 1, 0, leaves={"reward/x": 1.0, "costs/train/j": 0.5}, scenario_ids=["s1", "s2"]
        )
    )
    a2 = encode_batch(make_batch("a", 2, 0, leaves={"data/step_actor_tokens": 10.0}))
    b1 = encode_batch(
        make_batch(
            "b",
            1,
            1,
            leaves={"reward/x": 1.0, "reward/y": 2.0, "time/step_actor_s": 1.0},
            scenario_ids=["s3"],
        )
    )
    ray.get(ingest.remote(a1, True))  # durable: one WAL commit
    ray.get(ingest.remote(a1))  # a resend: duplicate
    ray.get(ingest.remote(a2))
    try:
        ray.get(ingest.remote(b"not a batch"))
    except Exception:
        pass  # rejected, as it should be
    ray.get(ingest.remote(b1))  # step 1 stays pending
    handle.log(0)  # barrier: closes step 0, checkpoints

    deadline = time.monotonic() + timeout_s
    seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            seen = scrape(port)
        except OSError:
            seen = {}
        if all(seen.get(k, 0.0) >= v for k, v in EXPECTED.items()):
            break
        time.sleep(1.0)
    for name in sorted(seen):
        print(f"{name} {seen[name]}")
    handle.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
