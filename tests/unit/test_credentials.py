"""Credentials held in memory by the aggregator (no Ray: the actor class on a real S3 server)."""

from __future__ import annotations

import asyncio

import pytest

from art_ray_metrics import AggregatorConfig
from art_ray_metrics.distributed.actor import MetricsAggregator
from art_ray_metrics.errors import CredentialsRequiredError
from tests import s3server

DEAD = "http://127.0.0.1:9"  # nothing listens there


@pytest.mark.s3
def test_waits_for_credentials_then_uses_and_refreshes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with s3server.s3_env() as endpoint:
        bucket = s3server.make_bucket()
        monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD)  # the node's own environment is useless
        cfg = AggregatorConfig(
            storage_uri=f"{bucket}/run", wandb_mode="disabled", storage_timeout_s=2.0
        ).model_dump_json()
        agg = MetricsAggregator(cfg, await_credentials=True)
        with pytest.raises(CredentialsRequiredError, match="set_credentials"):
            asyncio.run(agg.stats())
        out = asyncio.run(agg.set_credentials({"AWS_ENDPOINT_URL": endpoint}))
        assert out["credentials"] == ["AWS_ENDPOINT_URL"]
        assert asyncio.run(agg.log(0, metrics={"loss/x": 1.0}))["loss/x"] == 1.0
        assert agg.health.checkpoints == 1
        # credentials that stop working, then fresh ones: the client is rebuilt each time
        asyncio.run(agg.set_credentials({"AWS_ENDPOINT_URL": DEAD}))
        asyncio.run(agg.log(1))
        assert agg.health.checkpoint_failures == 1
        asyncio.run(agg.set_credentials({"AWS_ENDPOINT_URL": endpoint}))
        asyncio.run(agg.log(2))
        assert agg.health.checkpoints == 2
        # a driver without secrets does not wipe what another one sent
        asyncio.run(agg.set_credentials({}))
        assert agg.credentials == {"AWS_ENDPOINT_URL": endpoint}
