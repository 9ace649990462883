"""Every use of Ray's internals in ``ops``: finding this machine's clusters, and the GCS probe.

Ray has no public API for either, so the private modules they need (``ray._private.services``,
``ray.core.generated``) are imported here only, lazily, and each function degrades to "unknown"
when another Ray layout lacks them. The callers (``ops/cli/cluster.py``) turn the answers into
the CLI's one-line errors; nothing here prints or raises a CLI error.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

__all__ = ["GcsAnswer", "cluster_file_address", "gcs_handshake", "running_gcs_addresses"]

log = logging.getLogger(__name__)

GcsAnswer = Literal["ray", "unauthenticated", "silent", "unknown"]
"""What a GCS handshake found: Ray answered, Ray wants a token, nothing answered as Ray does
(another service listens there), or this Ray cannot be probed (or answered another error)."""


def running_gcs_addresses() -> list[str]:
    """The GCS addresses of the Ray clusters running on this machine, sorted."""
    from ray._private.services import find_gcs_addresses

    return sorted(str(a) for a in find_gcs_addresses())  # type: ignore[no-untyped-call]


def cluster_file_address() -> str | None:
    """The address in the cluster file ``ray start --head`` left on this machine, if any."""
    from ray._private.services import find_bootstrap_address

    address = find_bootstrap_address(None)
    return str(address) if address else None


def gcs_handshake(host: str, port: int, timeout_s: float) -> tuple[GcsAnswer, str]:
    """Ask the GCS at ``host:port`` for its cluster id over plain-text gRPC (Ray's first
    request of a driver), within ``timeout_s``; return the answer and the gRPC status name
    (``""`` without one).

    The caller skips this for TLS clusters and when the shell carries a token: the probe speaks
    neither.
    """
    try:
        import grpc  # type: ignore[import-untyped]
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # another Ray layout: leave it to ray.init
        return "unknown", ""
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        stub: Any = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)  # type: ignore[no-untyped-call]
        request: Any = gcs_service_pb2.GetClusterIdRequest()  # type: ignore[attr-defined]
        stub.GetClusterId(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return "unauthenticated", code.name
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            return "silent", code.name
        log.debug("GCS handshake with %s:%s: %s", host, port, code)
        return "unknown", code.name
    finally:
        channel.close()
    return "ray", ""
