"""``s3://bucket/prefix`` (and ``s3a://``) through obstore's ``S3Store``.

Settings come from the standard ``AWS_*`` environment variables; the credential variables can
be overridden in memory (``env``). Create-only is ``If-None-Match: *``, compare-and-swap is
``If-Match: <etag>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from art_ray_metrics.durable.stores import cloud
from art_ray_metrics.durable.stores.base import Backend

__all__ = ["BACKEND", "CREDENTIALS", "open_s3"]

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "access_key_id",
    "AWS_SECRET_ACCESS_KEY": "secret_access_key",
    "AWS_SESSION_TOKEN": "session_token",
}
"""The secret variables and the obstore config key each one sets."""


def _client(bucket: str, prefix: str, env: Mapping[str, str], timeout_s: float) -> Any:
    from obstore.store import S3Store

    endpoint = cloud.env_lookup(env, "AWS_ENDPOINT_URL_S3") or cloud.env_lookup(
        env, "AWS_ENDPOINT_URL"
    )
    region = cloud.env_lookup(env, "AWS_REGION") or cloud.env_lookup(env, "AWS_DEFAULT_REGION")
    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["endpoint"] = endpoint
    if region:
        kwargs["region"] = region
    allow_http = bool(endpoint) and str(endpoint).lower().startswith("http://")
    return S3Store(
        bucket,
        prefix=prefix or None,
        config=cloud.obstore_config(env, CREDENTIALS),  # type: ignore[arg-type]
        client_options=cloud.client_options(timeout_s, allow_http=allow_http),
        retry_config=cloud.retry_config(timeout_s),
        **kwargs,
    )


def open_s3(uri: str, timeout_s: float, env: Mapping[str, str]) -> cloud.ObstoreStore:
    """Open ``s3://bucket/prefix``; ``env`` overrides the process environment."""
    return cloud.open_bucket(uri, "S3", env, lambda b, p, e: _client(b, p, e, timeout_s))


BACKEND = Backend(
    ("s3", "s3a"),
    open_s3,
    settings=(
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ALLOW_HTTP",
        "AWS_REQUEST_CHECKSUM_CALCULATION",
        "AWS_RESPONSE_CHECKSUM_VALIDATION",
    ),
    secrets=tuple(CREDENTIALS),
)
