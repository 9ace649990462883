"""``s3://bucket/prefix`` (and ``s3a://``) through obstore's ``S3Store``.

Settings come from the standard ``AWS_*`` environment variables; the credential variables can
be overridden in memory (``env``). Create-only is ``If-None-Match: *``, compare-and-swap is
``If-Match: <etag>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from art_ray_metrics import errors
from art_ray_metrics.durable.stores.base import Backend, first_line, redact
from art_ray_metrics.durable.stores.cloud import (
    ObstoreStore,
    client_options,
    env_lookup,
    obstore_config,
    retry_config,
    split_bucket,
)

__all__ = ["BACKEND", "CREDENTIALS", "open_s3"]

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "access_key_id",
    "AWS_SECRET_ACCESS_KEY": "secret_access_key",
    "AWS_SESSION_TOKEN": "session_token",
}
"""The secret variables and the obstore config key each one sets."""


def open_s3(uri: str, timeout_s: float, env: Mapping[str, str]) -> ObstoreStore:
    """Open ``s3://bucket/prefix``; ``env`` overrides the process environment."""
    bucket, prefix = split_bucket(uri)

    def build(env: Mapping[str, str]) -> Any:
        from obstore.store import S3Store

        endpoint = env_lookup(env, "AWS_ENDPOINT_URL_S3") or env_lookup(env, "AWS_ENDPOINT_URL")
        region = env_lookup(env, "AWS_REGION") or env_lookup(env, "AWS_DEFAULT_REGION")
        kwargs: dict[str, Any] = {}
        if endpoint:
            kwargs["endpoint"] = endpoint
        if region:
            kwargs["region"] = region
        allow_http = bool(endpoint) and str(endpoint).lower().startswith("http://")
        try:
            return S3Store(
                bucket,
                prefix=prefix or None,
                config=obstore_config(env, CREDENTIALS),  # type: ignore[arg-type]
                client_options=client_options(timeout_s, allow_http=allow_http),
                retry_config=retry_config(timeout_s),
                **kwargs,
            )
        except Exception as exc:
            raise errors.ConfigError(
                f"Expected a usable S3 configuration for {redact(uri)!r} but got: {first_line(exc)}"
            ) from exc

    return ObstoreStore(build(env), redact(uri), build)


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
