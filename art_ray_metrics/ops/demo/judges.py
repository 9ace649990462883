"""The demo's judges: real OpenAI and Anthropic SDK calls to the local fake API, priced by
``@track_api_cost``, and the in-process reference a ``--chaos`` run is compared with.

No Ray here: the judge actor (:class:`~art_ray_metrics.ops.demo.run.Judge`) wraps
:func:`judge_calls`, and :func:`reference_rows` runs the same calls and the same leaves through
one in-process :class:`~art_ray_metrics.MetricsBuilder`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

from art_ray_metrics.builder import MetricsBuilder
from art_ray_metrics.ops.demo.workload import RolloutPlan, plan_rollout, record_rollout
from art_ray_metrics.ops.fakellm import FakeLLMServer, score_from_text
from art_ray_metrics.spend.track import track_api_cost

if TYPE_CHECKING:
    import anthropic
    import openai
    from anthropic.types import Message
    from openai.types.chat import ChatCompletion

__all__ = ["ANTHROPIC_JUDGE", "OPENAI_JUDGE", "JudgeClients", "judge_calls", "reference_rows"]

OPENAI_JUDGE = "gpt-4.1-mini"
ANTHROPIC_JUDGE = "claude-sonnet-4-6"


@track_api_cost(source="llm_judge/correctness", provider="openai", model_name=OPENAI_JUDGE)
def _grade(client: openai.OpenAI, prompt: str) -> ChatCompletion:
    return client.chat.completions.create(
        model=OPENAI_JUDGE, messages=[{"role": "user", "content": prompt}]
    )


@track_api_cost(source="llm_judge/style", provider="anthropic", model_name=ANTHROPIC_JUDGE)
def _style(client: anthropic.Anthropic, prompt: str) -> Message:
    return client.messages.create(
        model=ANTHROPIC_JUDGE, max_tokens=64, messages=[{"role": "user", "content": prompt}]
    )


class JudgeClients:
    """Real OpenAI and Anthropic SDK clients pointed at a :class:`FakeLLMServer`."""

    def __init__(self, server: FakeLLMServer) -> None:
        # imported here: the SDKs take seconds to import, and every CLI command imports the
        # demo package, while only judges (and a --chaos run's reference) call them
        import anthropic
        import openai

        self.openai = openai.OpenAI(api_key="demo", base_url=server.openai_base_url, max_retries=2)
        self.anthropic = anthropic.Anthropic(
            api_key="demo", base_url=server.anthropic_base_url, max_retries=2
        )


def judge_calls(clients: JudgeClients, plan: RolloutPlan) -> float:
    """Two judge calls (OpenAI correctness, Anthropic style); returns the mean score.

    Costs are recorded by ``@track_api_cost`` on the builder active in the caller's context.
    """
    correctness = _grade(clients.openai, plan.prompt)
    style = _style(clients.anthropic, plan.prompt)
    text_a = correctness.choices[0].message.content or ""
    block = style.content[0] if style.content else None
    text_b = block.text if block is not None and block.type == "text" else ""
    return round((score_from_text(text_a) + score_from_text(text_b)) / 2, 4)


def reference_rows(seed: int, rollouts: int, steps: Iterable[int]) -> list[dict[str, float]]:
    """The rows one in-process :class:`MetricsBuilder` computes for the same leaves."""
    builder = MetricsBuilder("train")
    rows: list[dict[str, float]] = []
    with FakeLLMServer() as server:
        clients = JudgeClients(server)
        for step in steps:
            for index in range(rollouts):
                plan = plan_rollout(seed, step, index, rollouts)
                with builder.activate_context():
                    score = judge_calls(clients, plan)
                record_rollout(builder, plan, score)
            rows.append(asyncio.run(builder.flush()))
    return rows
