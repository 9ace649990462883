"""``gs://bucket/prefix`` through obstore's ``GCSStore``.

Create-only is ``ifGenerationMatch=0``, compare-and-swap is ``ifGenerationMatch=<generation>``.
``GOOGLE_BASE_URL`` points it at an emulator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from art_ray_metrics.durable.stores import cloud
from art_ray_metrics.durable.stores.base import Backend

__all__ = ["BACKEND", "CREDENTIALS", "open_gcs"]

CREDENTIALS = {
    "GOOGLE_SERVICE_ACCOUNT_KEY": "service_account_key",
    "GOOGLE_SERVICE_ACCOUNT": "service_account",
    "GOOGLE_APPLICATION_CREDENTIALS": "application_credentials",
}
"""The credential variables and the obstore config key each one sets (only the key is secret:
the other two name files)."""


def _client(bucket: str, prefix: str, env: Mapping[str, str], timeout_s: float) -> Any:
    from obstore.store import GCSStore

    base_url = cloud.env_lookup(env, "GOOGLE_BASE_URL") or ""
    return GCSStore(
        bucket,
        prefix=prefix or None,
        config=cloud.obstore_config(env, CREDENTIALS),  # type: ignore[arg-type]
        client_options=cloud.client_options(
            timeout_s, allow_http=base_url.lower().startswith("http://")
        ),
        retry_config=cloud.retry_config(timeout_s),
    )


def open_gcs(uri: str, timeout_s: float, env: Mapping[str, str]) -> cloud.ObstoreStore:
    """Open ``gs://bucket/prefix``; ``env`` overrides the process environment."""
    return cloud.open_bucket(uri, "GCS", env, lambda b, p, e: _client(b, p, e, timeout_s))


BACKEND = Backend(
    ("gs",),
    open_gcs,
    settings=("GOOGLE_BASE_URL", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT"),
    secrets=("GOOGLE_SERVICE_ACCOUNT_KEY",),
)
