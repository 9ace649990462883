"""Creating the aggregator actor: the bounded start wait's error (``distributed/launch.py``).

Ray's calls are replaced here (a unit test of the message); the real wait is tested on the
shared cluster in ``tests/integration/test_distributed.py``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import ray
from ray.exceptions import GetTimeoutError

import art_ray_metrics as arm
from art_ray_metrics.config import AggregatorConfig
from art_ray_metrics.distributed.launch import wait_started


def _never_ready(*_: Any, **__: Any) -> Any:
    raise GetTimeoutError("not started")


ACTOR = SimpleNamespace(__ray_ready__=SimpleNamespace(remote=lambda: "ref"))


def test_the_timeout_names_the_missing_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "get", _never_ready)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    cfg = AggregatorConfig(name="a1", actor_resources={"gpu_box": 1.0})
    with pytest.raises(arm.AggregatorStartTimeoutError, match="no alive node has resource"):
        wait_started(ACTOR, cfg, 1.0)


def test_a_node_list_that_fails_does_not_replace_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node list only explains the timeout: if Ray cannot give it, the error is still the
    timeout (it used to be the node list's own error)."""

    def broken() -> Any:
        raise ConnectionError("GCS unreachable")

    monkeypatch.setattr(ray, "get", _never_ready)
    monkeypatch.setattr(ray, "nodes", broken)
    cfg = AggregatorConfig(name="a2", actor_resources={"gpu_box": 1.0})
    with pytest.raises(arm.AggregatorStartTimeoutError) as info:
        wait_started(ACTOR, cfg, 1.0)
    assert "within start_timeout_s=1" in str(info.value)
    assert "ConnectionError: GCS unreachable" in str(info.value)
