"""``gs://bucket/prefix`` through obstore's ``GCSStore``.

Create-only is ``ifGenerationMatch=0``, compare-and-swap is ``ifGenerationMatch=<generation>``.
``GOOGLE_BASE_URL`` points it at an emulator.
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

__all__ = ["BACKEND", "CREDENTIALS", "open_gcs"]

CREDENTIALS = {
    "GOOGLE_SERVICE_ACCOUNT_KEY": "service_account_key",
    "GOOGLE_SERVICE_ACCOUNT": "service_account",
    "GOOGLE_APPLICATION_CREDENTIALS": "application_credentials",
}
"""The credential variables and the obstore config key each one sets (only the key is secret:
the other two name files)."""


def open_gcs(uri: str, timeout_s: float, env: Mapping[str, str]) -> ObstoreStore:
    """Open ``gs://bucket/prefix``; ``env`` overrides the process environment."""
    bucket, prefix = split_bucket(uri)

    def build(env: Mapping[str, str]) -> Any:
        from obstore.store import GCSStore

        base_url = env_lookup(env, "GOOGLE_BASE_URL") or ""
        try:
            return GCSStore(
                bucket,
                prefix=prefix or None,
                config=obstore_config(env, CREDENTIALS),  # type: ignore[arg-type]
                client_options=client_options(
                    timeout_s, allow_http=base_url.lower().startswith("http://")
                ),
                retry_config=retry_config(timeout_s),
            )
        except Exception as exc:
            raise errors.ConfigError(
                f"Expected a usable GCS configuration for {redact(uri)!r} but got: "
                f"{first_line(exc)}"
            ) from exc

    return ObstoreStore(build(env), redact(uri), build)


BACKEND = Backend(
    ("gs",),
    open_gcs,
    settings=("GOOGLE_BASE_URL", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT"),
    secrets=("GOOGLE_SERVICE_ACCOUNT_KEY",),
)
