"""One real multi-node Ray cluster per test session: a head and two worker nodes on 127.0.0.1.

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
    from art_ray_metrics.client import _reset_clients

    _reset_clients()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def run_config(ray_cluster: Any, tmp_path: Path) -> dict[str, Any]:
    """Fields for a fresh aggregator: a unique name and storage in tmp_path."""
    name = f"agg-{uuid.uuid4().hex[:8]}"
    return {
        "name": name,
        "run_name": name,
        "storage_uri": str(tmp_path / "run"),
        "wandb_mode": "disabled",
    }


class OwnedS3:
    """An S3 server this process owns (moto, HTTP on 127.0.0.1), so a test can take it down.

    Independent of the shared server of ``tests.s3server`` (which may be external in CI), so
    outage tests always run. moto keeps its backend in process-wide state, so objects written
    before :meth:`stop` are there again after :meth:`start` (same port).
    """

    def __init__(self) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: Any = None
        self.start()

    def start(self) -> None:
        """Start (or restart) the server on its port."""
        from moto.server import ThreadedMotoServer

        if self._server is None:
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            server.start()
            self._server = server

    def stop(self) -> None:
        """Stop the server: connections to the port are refused until :meth:`start`."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self) -> dict[str, str]:
        """The AWS environment pointing at this server (forwarded to the actor by Ray)."""
        from tests.s3server import S3_ENV

        return {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true"}

    def bucket(self) -> str:
        """Create a fresh bucket; return its ``s3://`` URI."""
        import boto3

        name = f"arm-owned-{uuid.uuid4().hex[:10]}"
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()
        return f"s3://{name}"


@pytest.fixture
def owned_s3() -> Iterator[OwnedS3]:
    """A restartable S3 server of this test, with its AWS environment set for the test."""
    server = OwnedS3()
    env = server.env()
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(env)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    try:
        yield server
    finally:
        server.stop()
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@pytest.fixture
def wandb_dir(tmp_path: Path) -> Path:
    """A directory for offline W&B runs of one test."""
    path = tmp_path / "wandb"
    path.mkdir()
    return path
