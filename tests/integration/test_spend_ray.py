"""track_api_cost inside Ray workers, recording through the remote builder of connect()."""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import ray
import ray.cloudpickle as cloudpickle

import art_ray_metrics as arm

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.ray

USAGE = {
    "prompt_tokens": 2000,
    "completion_tokens": 100,
    "total_tokens": 2100,
    "prompt_tokens_details": {"cached_tokens": 1500},
}


def _client(response_id: str) -> Any:
    import httpx2
    import openai

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = {
            "id": response_id,
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4.1",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "8/10"},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
        return httpx2.Response(200, json=body)

    return openai.OpenAI(
        api_key="demo",
        base_url="http://judge.invalid/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )


@arm.track_api_cost(source="llm_judge/correctness", provider="openai", model_name="openai/gpt-4.1")
def judge(client: Any) -> Any:
    return client.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "grade"}]
    )


@ray.remote(num_cpus=0)
def judge_task(name: str, step: int, n: int) -> int:
    builder = arm.connect(step, name=name)
    with builder.activate_context():
        for i in range(n):
            judge(_client(f"chatcmpl-{step}-{i}"))
        judge(_client(f"chatcmpl-{step}-0"))  # a replayed response: costs once
        # threads do not inherit the context: bind_context carries the builder over
        with ThreadPoolExecutor(2) as pool:
            list(
                pool.map(
                    arm.bind_context(judge), [_client(f"chatcmpl-{step}-t{j}") for j in range(2)]
                )
            )

        async def in_tasks() -> None:  # asyncio tasks inherit it
            await asyncio.gather(
                *(asyncio.to_thread(judge, _client(f"chatcmpl-{step}-a{j}")) for j in range(2))
            )

        asyncio.run(in_tasks())
    assert builder.flush(timeout_s=30).ok
    return n


class TestSpendInWorkers:
    def test_costs_from_workers_are_exact_and_idempotent(self, run_config: dict[str, Any]) -> None:
        """Decorated calls in tasks on two nodes: each paid response once, exact to the cent."""
        handle = arm.start_aggregator(**run_config)
        try:
            refs = [
                judge_task.options(resources={res: 1}).remote(run_config["name"], 0, 3)
                for res in ("node_a", "node_b")
            ]
            ray.get(refs)
            row = handle.log(0)
            # ART's worked number: 2000 prompt (1500 cached) + 100 completion at 2/0.5/8 -> 0.00255
            per_call = 0.00255
            calls = 3 + 2 + 2  # distinct response ids per step: both tasks use the same ids
            assert row["costs/train/llm_judge/correctness"] == pytest.approx(calls * per_call)
            assert row["costs/cum/all"] == pytest.approx(calls * per_call)
            assert row["telemetry/duplicate_costs"] >= 7.0  # the second task's responses + replays
        finally:
            handle.shutdown()
