"""Secrets never reach a file: not Ray's session directory, not the run's storage, not W&B.

The storage is a real S3 server (moto, loopback); the secrets are unique random tokens set in
the driver's environment after the cluster started, so the only way the actor can get them is
what ``start_aggregator`` sends. The actor is also killed and restarted, which makes Ray
replay its creation and the handle re-send the credentials.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import ray

import art_ray_metrics as arm
from art_ray_metrics.durable.storage import open_store


def _files_containing(root: Path, tokens: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        try:
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
        except OSError:  # sockets, files removed while walking
            continue
        hits.extend(f"{path}: {t[:12]!r}..." for t in tokens if t in data)
    return hits


def _session_dir() -> Path:
    return Path(ray._private.worker._global_node.get_session_dir_path())


@pytest.mark.s3
def test_secrets_are_in_no_file(
    run_config: dict[str, Any],
    owned_s3: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    aws_secret = "armsecret" + secrets.token_hex(16)
    wandb_key = secrets.token_hex(20)  # W&B keys are 40 characters
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    uri = owned_s3.bucket() + "/runs/secret"
    wandb_dir = tmp_path / "wandb"
    handle = arm.start_aggregator(
        **{**run_config, "storage_uri": uri, "wandb_mode": "offline", "wandb_dir": str(wandb_dir)}
    )
    try:
        for step in range(3):
            handle.log(step, metrics={"loss/x": float(step), "costs/train/judge": 0.25})
        pid = handle.stats()["pid"]
        ray.kill(handle.actor, no_restart=False)  # Ray restarts it from its creation arguments
        deadline = time.monotonic() + 60
        while handle.stats()["pid"] == pid:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        row = handle.log(3, metrics={"loss/x": 3.0, "costs/train/judge": 0.25})
        assert row["costs/cum/all"] == pytest.approx(1.0)
        # a refreshed secret (e.g. a new session token) is sent again and used
        monkeypatch.setenv("AWS_SESSION_TOKEN", "armtoken" + secrets.token_hex(16))
        handle.log(4, metrics={"loss/x": 4.0})
        assert handle.checkpoint()["fenced"] is None
    finally:
        handle.shutdown()
    tokens = [aws_secret.encode(), wandb_key.encode(), os.environ["AWS_SESSION_TOKEN"].encode()]
    session = _session_dir()
    assert any(session.rglob("*.log")), f"no Ray logs under {session}"
    assert _files_containing(session, tokens) == []
    assert _files_containing(wandb_dir, tokens) == []
    store = open_store(uri)
    keys = store.list()
    assert any(k.startswith("history/") for k in keys)
    leaked = [k for k in keys for t in tokens if t in store.get(k)]
    assert leaked == []
