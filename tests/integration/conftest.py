"""One real multi-node Ray cluster per test session: a head and two worker nodes on 127.0.0.1.

Under pytest-xdist every test that uses it runs on one worker (``tests/conftest.py`` groups them),
so one cluster serves the run.

Nodes carry custom resources so tests can place producers: ``head``, ``node_a``, ``node_b``.
Tests that remove nodes add their own extra node first and remove only that one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Keep every node on loopback: without this Ray resolves 127.0.0.1 to the host's interface IP.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "disabled")

NODE_ARGS: dict[str, Any] = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
#: a disconnect that works takes 1-3 s here; a stuck one never returns (see ray_cluster)
SHUTDOWN_WAIT_S = 10


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """Head + 2 worker nodes, shared by every Ray test of the session."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={**NODE_ARGS, "num_cpus": 1, "resources": {"head": 100}},
    )
    cluster.add_node(**NODE_ARGS, num_cpus=2, resources={"node_a": 100})
    cluster.add_node(**NODE_ARGS, num_cpus=2, resources={"node_b": 100})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="arm-tests", log_to_driver=False)
    yield cluster
    from art_ray_metrics.distributed.clients import reset_clients

    reset_clients()
    # Bounded: in the full suite Ray's disconnect was seen to block in its GCS error
    # subscriber's close. The run must end either way; Ray's own exit hook is dropped if the
    # shutdown is still stuck (it would wait on the same lock at interpreter exit).
    import atexit
    import threading

    from ray._private import worker as ray_worker

    closer = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
    closer.start()
    closer.join(SHUTDOWN_WAIT_S)
    if not closer.is_alive():
        cluster.shutdown()
        return
    # the stuck shutdown holds Ray's connect/shutdown lock, which Cluster.shutdown() would
    # wait on too: stop the nodes' processes directly instead (the stuck call then fails)
    atexit.unregister(ray_worker.shutdown)
    print(
        f"ray.shutdown() did not return within {SHUTDOWN_WAIT_S} s; "
        "the test cluster's processes are killed"
    )
    for node in [*cluster.worker_nodes, cluster.head_node]:
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=False)
    closer.join(10)


@pytest.fixture(autouse=True)
def _clients_end_with_their_test() -> Iterator[None]:
    """The clients a test made in this process stop when it ends (its aggregators are gone by
    then), so no background thread or lookup of an earlier test runs beside later ones in the
    worker process that holds the shared cluster."""
    yield
    from art_ray_metrics.distributed.clients import reset_clients

    reset_clients(timeout_s=0)


@pytest.fixture
def own_run_config(tmp_path: Path) -> dict[str, Any]:
    """Fields for a fresh aggregator (a unique name and storage in tmp_path), for a test that
    starts its own Ray: it stays off the shared cluster's pytest-xdist worker."""
    name = f"agg-{uuid.uuid4().hex[:8]}"
    return {
        "name": name,
        "run_name": name,
        "storage_uri": str(tmp_path / "run"),
        "wandb_mode": "disabled",
    }


@pytest.fixture
def run_config(ray_cluster: Any, own_run_config: dict[str, Any]) -> dict[str, Any]:
    """Fields for a fresh aggregator on the shared cluster: a unique name and storage in
    tmp_path."""
    return own_run_config


@pytest.fixture
def wandb_dir(tmp_path: Path) -> Path:
    """A directory for offline W&B runs of one test."""
    path = tmp_path / "wandb"
    path.mkdir()
    return path
