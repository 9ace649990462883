"""Credentials held in memory by the aggregator (no Ray: the actor class on a real S3 server)."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from art_ray_metrics import AggregatorConfig
from art_ray_metrics.core.wire import encode_batch
from art_ray_metrics.distributed import credentials as credentials_module
from art_ray_metrics.distributed.actor import MetricsAggregator
from art_ray_metrics.durable.storage import open_store
from art_ray_metrics.errors import CredentialsRequiredError
from art_ray_metrics.testing import make_batch
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
        assert agg.gate.values == {"AWS_ENDPOINT_URL": endpoint}


def _batch(seq: int, usd: float) -> bytes:
    return encode_batch(make_batch("rollouts", seq, 0, leaves={"costs/train/judge": usd}))


async def _stop(agg: MetricsAggregator) -> None:
    for task in agg.tasks:
        task.cancel()
    await asyncio.gather(*agg.tasks, return_exceptions=True)


@pytest.mark.s3
def test_a_restarted_actor_holds_ingest_until_the_driver_sends_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 19, defect 12, the actor's half: an instance Ray (re)started asks the driver's
    watcher for credentials at once, and a durable ingest that arrives first waits for them
    (bounded) instead of failing, so the rollout's flush is acknowledged as soon as they come.
    """
    with s3server.s3_env() as endpoint:
        bucket = s3server.make_bucket()
        monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD)  # the node's own environment is useless
        cfg = AggregatorConfig(
            storage_uri=f"{bucket}/run", wandb_mode="disabled", storage_timeout_s=2.0
        ).model_dump_json()
        agg = MetricsAggregator(cfg, await_credentials=True)

        async def run() -> tuple[bool, dict[str, object], float, bool]:
            wanted = await agg.credentials_wanted(5.0)  # at once: nobody sent any yet
            started = time.monotonic()
            ingest = asyncio.ensure_future(agg.ingest(_batch(1, 0.25), durable=True))
            await asyncio.sleep(0.3)
            assert not ingest.done()  # waiting, not failed
            await agg.set_credentials({"AWS_ENDPOINT_URL": endpoint})
            ack = await ingest
            took = time.monotonic() - started
            later = await agg.credentials_wanted(0.01)  # received: nothing more wanted
            await _stop(agg)
            return wanted, ack, took, later

        wanted, ack, took, later = asyncio.run(run())
        assert wanted is True
        assert later is False
        assert ack.durable is True
        assert took < credentials_module.CREDENTIALS_WAIT_S
        assert agg.state.pending  # the batch was applied


@pytest.mark.s3
def test_without_credentials_ingest_fails_after_a_bounded_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No driver answers: CredentialsRequiredError after CREDENTIALS_WAIT_S, and the node's own
    credentials are not retried on every call meanwhile."""
    with s3server.s3_env():
        bucket = s3server.make_bucket()
        monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD)
        monkeypatch.setattr(credentials_module, "CREDENTIALS_WAIT_S", 0.2)
        cfg = AggregatorConfig(
            storage_uri=f"{bucket}/run", wandb_mode="disabled", storage_timeout_s=2.0
        ).model_dump_json()
        agg = MetricsAggregator(cfg, await_credentials=True)
        boots = []
        real_boot = agg.gate.boot

        def counting_boot(attempts: int = 6) -> None:
            boots.append(attempts)
            real_boot(attempts)

        agg.gate.boot = counting_boot

        async def run() -> list[float]:
            took = []
            for seq in (1, 2):
                started = time.monotonic()
                with pytest.raises(CredentialsRequiredError, match="set_credentials"):
                    await agg.ingest(_batch(seq, 0.25), durable=True)
                took.append(time.monotonic() - started)
            return took

        took = asyncio.run(run())
        assert all(0.2 <= t < 2.0 for t in took), took
        assert boots == [1]  # one try with the node's credentials, then only waits


@pytest.mark.s3
def test_worker_env_is_held_in_memory_and_handed_to_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 21: the variables named by worker_env travel with the credentials, are answered
    to workers, and are in no stored object (checkpoint, WAL, history)."""
    key = "sk-arm-" + secrets.token_hex(16)
    with s3server.s3_env() as endpoint:
        bucket = s3server.make_bucket()
        monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD)
        cfg = AggregatorConfig(
            storage_uri=f"{bucket}/run",
            wandb_mode="disabled",
            storage_timeout_s=2.0,
            worker_env=("OPENAI_API_KEY", "ANTHROPIC_API_KEY"),
        )
        agg = MetricsAggregator(cfg.model_dump_json(), await_credentials=True)

        async def run() -> dict[str, str]:
            await agg.set_credentials({"AWS_ENDPOINT_URL": endpoint, "OPENAI_API_KEY": key})
            await agg.ingest(_batch(1, 0.5), durable=True)
            await agg.log(0, metrics={"loss/x": 1.0})
            env = await agg.worker_env()
            await _stop(agg)
            return env

        assert asyncio.run(run()) == {"OPENAI_API_KEY": key}  # only the names configured
        store = open_store(f"{bucket}/run", env={"AWS_ENDPOINT_URL": endpoint})
        names = store.list()
        assert any(n.startswith("history/") for n in names)
        assert [n for n in names if key.encode() in store.get(n)] == []


@pytest.mark.s3
def test_worker_env_before_any_driver_sent_it_is_refused_not_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restarted instance no driver has reached yet does not answer an empty environment
    (the worker would take it as final): it waits, then refuses, and the worker asks later."""
    monkeypatch.setattr(credentials_module, "CREDENTIALS_WAIT_S", 0.2)
    monkeypatch.setattr(credentials_module, "WORKER_ENV_WAIT_S", 0.2)  # was waited out: 15 s
    cfg = AggregatorConfig(
        storage_uri="memory://worker-env-wait", wandb_mode="disabled", worker_env=("X_KEY",)
    )
    agg = MetricsAggregator(cfg.model_dump_json(), await_credentials=True)

    async def run() -> dict[str, str]:
        with pytest.raises(CredentialsRequiredError, match="worker_env"):
            await agg.worker_env()
        await agg.set_credentials({"X_KEY": "value"})
        env = await agg.worker_env()
        await _stop(agg)
        return env

    assert asyncio.run(run()) == {"X_KEY": "value"}


def test_worker_env_names_are_checked() -> None:
    """Names only, valid ones, in a list or tuple; a bare string is refused, not split."""
    assert AggregatorConfig(worker_env=["OPENAI_API_KEY", "OPENAI_API_KEY"]).worker_env == (
        "OPENAI_API_KEY",
    )
    with pytest.raises(ValueError, match="worker_env"):
        AggregatorConfig(worker_env=["OPENAI API KEY"])
    with pytest.raises(ValueError, match="worker_env"):
        AggregatorConfig(worker_env="OPENAI_API_KEY")  # type: ignore[arg-type]
