"""The demo's Ray workers: judge actors, the rollout task and the ``--chaos`` latch.

They record through :func:`~art_ray_metrics.connect` as any rollout code does; the driver
(:mod:`.run`) makes them remote and schedules them.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from art_ray_metrics.config import ClientConfig
from art_ray_metrics.distributed.record import connect
from art_ray_metrics.ops.demo.judges import JudgeClients, judge_calls
from art_ray_metrics.ops.demo.workload import RolloutPlan, plan_rollout, record_rollout
from art_ray_metrics.ops.fakellm import FakeLLMServer

__all__ = ["ChaosLatch", "Judge", "rollout", "warm_up"]


class Judge:
    """A judge worker (a Ray actor): its own fake API server, real SDK clients."""

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        self.server = FakeLLMServer().start()
        self.clients = JudgeClients(self.server)

    def judge(self, step: int, plan: RolloutPlan) -> float:
        """Judge one rollout; its API spend is durable at the aggregator when this returns,
        tagged with the rollout's group (its scenario id), whose fate the trainer gives."""
        builder = connect(step, name=self.name, namespace=self.namespace, group=plan.scenario_id)
        with builder.activate_context(), builder.measure("time/step_eval_s"):
            score = judge_calls(self.clients, plan)
        builder.flush(timeout_s=120)
        return score

    def node_id(self) -> str:
        """The Ray node this judge runs on."""
        return str(ray.get_runtime_context().get_node_id())


class ChaosLatch:
    """Says "die" exactly once, to the rollout it was armed for (a Ray actor)."""

    def __init__(self, step: int, index: int) -> None:
        self.target = (step, index)
        self.fired = False

    def claim(self, step: int, index: int) -> bool:
        """True the first time ``(step, index)`` asks."""
        if not self.fired and (step, index) == self.target:
            self.fired = True
            return True
        return False


def rollout(
    step: int,
    index: int,
    seed: int,
    rollouts: int,
    name: str,
    namespace: str,
    judge: Any,
    latch: Any,
) -> dict[str, Any]:
    """One rollout (a Ray task): its plan, its judge's score, its leaves, a durable flush.

    With ``latch`` (``--chaos``) the worker process dies after the judge was paid and before
    the flush, once; Ray retries the task.
    """
    plan = plan_rollout(seed, step, index, rollouts)
    # ship only at flush(): a rollout that crashes before flushing contributes nothing, and
    # its retry contributes everything once
    config = ClientConfig(name=name, namespace=namespace, flush_interval_s=3600.0)
    builder = connect(step, config=config)
    score: float = ray.get(judge.judge.remote(step, plan))
    record_rollout(builder, plan, score)
    if latch is not None and ray.get(latch.claim.remote(step, index)):
        os._exit(1)  # --chaos: the worker process dies; Ray retries the task
    result = builder.flush(timeout_s=120)
    return {"score": score, "node_id": ray.get_runtime_context().get_node_id(), "ok": result.ok}


def warm_up() -> str:
    """A no-op task: makes Ray start a worker process before the first step."""
    return str(ray.get_runtime_context().get_node_id())
