"""A real S3 endpoint on loopback for tests: moto's server over HTTP on 127.0.0.1.

If ``ARM_TEST_S3_ENDPOINT`` is set (CI runs ``python -m tests.s3server -H 127.0.0.1 -p PORT``,
moto's server with :func:`atomic_conditional_writes`, and exports ``http://127.0.0.1:PORT``),
that endpoint is used. Otherwise one in-process
``moto.server.ThreadedMotoServer`` is started lazily on a free port and kept for the session.

Outage tests: :func:`stop_server` stops the in-process server and :func:`start_server` starts a
new one on the SAME port, so clients configured with the old endpoint reconnect. moto keeps its
backends in process-wide state, so buckets and objects written before the outage are still there
after the restart. With an external endpoint (``ARM_TEST_S3_ENDPOINT``) both raise, because this
process does not own that server; outage tests should skip with :func:`can_restart_server`.

Register the fixtures once in ``tests/conftest.py``::

    pytest_plugins = ["tests.s3server"]
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

__all__ = [
    "S3_ENV",
    "atomic_conditional_writes",
    "can_restart_server",
    "make_bucket",
    "s3_bucket_uri",
    "s3_endpoint",
    "s3_env",
    "start_server",
    "stop_server",
]

ENDPOINT_ENV = "ARM_TEST_S3_ENDPOINT"

#: Fake credentials and checksum settings moto needs; the endpoint is added by :func:`s3_env`.
S3_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}

_lock = threading.Lock()
_server: Any = None  # moto.server.ThreadedMotoServer when we own it
_port: int | None = None
_endpoint: str | None = None
_bucket_counter = itertools.count(1)
_conditional = threading.Lock()


def atomic_conditional_writes() -> None:
    """Make moto decide conditional writes atomically, as S3 does. Idempotent.

    moto 5's ``PutObject`` checks ``If-Match`` / ``If-None-Match`` against the current object
    and writes the new one later in the same handler, with no lock: under its threaded server
    two puts racing with the same precondition can both succeed (reproduced: 2 winners of 4
    writers swapping from one version, on a loaded machine). S3 serialises them, and the
    stores' compare-and-swap (the checkpoint pointer, epoch claims) relies on exactly one
    winning. Every moto server these tests start runs its puts one at a time.
    """
    from moto.s3.responses import S3Response

    original = S3Response.put_object
    if getattr(original, "arm_atomic", False):
        return

    @functools.wraps(original)
    def put_object(self: Any) -> Any:
        with _conditional:
            return original(self)

    put_object.arm_atomic = True  # type: ignore[attr-defined]
    S3Response.put_object = put_object  # type: ignore[method-assign]


def _start_moto(port: int) -> Any:
    """A started in-process moto server on 127.0.0.1:``port`` (0: a free one)."""
    from moto.server import ThreadedMotoServer

    atomic_conditional_writes()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def s3_endpoint() -> str:
    """Return ``http://127.0.0.1:PORT`` of the test S3 server, starting it on first use."""
    global _endpoint, _port, _server
    with _lock:
        if _endpoint is not None:
            return _endpoint
        external = os.environ.get(ENDPOINT_ENV)
        if external:
            _endpoint = external.rstrip("/")
            return _endpoint
        server = _start_moto(0)
        host, port = server.get_host_and_port()
        _server, _port = server, int(port)
        _endpoint = f"http://{host}:{port}"
        return _endpoint


def can_restart_server() -> bool:
    """Whether this process owns the server (so stop/start outage tests can run)."""
    s3_endpoint()
    return _port is not None


def stop_server() -> None:
    """Stop the in-process server; the port stays reserved for :func:`start_server`."""
    global _server
    s3_endpoint()
    with _lock:
        if _port is None:
            raise RuntimeError(f"the S3 server at {_endpoint} is external ({ENDPOINT_ENV})")
        if _server is not None:
            _server.stop()
            _server = None


def start_server() -> None:
    """(Re)start the in-process server on the same port as before; a no-op if it runs."""
    global _server
    s3_endpoint()
    with _lock:
        if _port is None:
            raise RuntimeError(f"the S3 server at {_endpoint} is external ({ENDPOINT_ENV})")
        if _server is None:
            _server = _start_moto(_port)


def make_bucket(name: str | None = None) -> str:
    """Create a bucket on the test server and return its ``s3://name`` URI."""
    import boto3

    bucket = name if name is not None else f"arm-test-{os.getpid()}-{next(_bucket_counter)}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint(),
        region_name=S3_ENV["AWS_REGION"],
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    try:
        client.create_bucket(Bucket=bucket)
    finally:
        client.close()
    return f"s3://{bucket}"


@contextmanager
def s3_env() -> Iterator[str]:
    """Point the standard AWS environment at the test server for the block; yield the endpoint."""
    endpoint = s3_endpoint()
    values = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in [*values, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(values)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    try:
        yield endpoint
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@pytest.fixture
def s3_bucket_uri() -> Iterator[str]:
    """A fresh bucket's ``s3://`` URI with the AWS environment pointed at the test server."""
    with s3_env():
        yield make_bucket()


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
        if self._server is None:
            self._server = _start_moto(self.port)

    def stop(self) -> None:
        """Stop the server: connections to the port are refused until :meth:`start`."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self) -> dict[str, str]:
        """The AWS environment pointing at this server (forwarded to the actor by Ray)."""
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


if __name__ == "__main__":  # moto's server (same arguments as ``moto_server``), S3's atomic puts
    import sys

    from moto.server import main

    atomic_conditional_writes()
    sys.exit(main())
