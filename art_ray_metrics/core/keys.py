"""The metric taxonomy: sections, splits, routing, cumulative twins and key validation.

Keys are lowercase ``/``-separated paths whose first segment is a *section* (``reward``,
``loss``, ``offpolicy``, ``pipeline``, ``throughput``, ``costs``, ``time``, ``data``,
``discarded``) or a *split* (``train``, ``val``, ``test``). Values are per step. Run totals exist only as
*cumulative twins* whose second segment is the reserved ``cum``::

    costs/train/llm_judge   -> costs/cum/train/llm_judge
    time/step_wall_s        -> time/cum/wall_s
    data/step_num_scenarios -> data/cum/num_scenarios

Builder-managed keys (``costs/``, ``time/step_``, ``data/step_``, ``throughput/step_``) are
summed within a step and get cumulative twins; every other key passes through to the row.
Keys in sections ``costs``, ``time`` and ``data`` get twins (as in OpenPipe ART).

Everything here is pure and cheap: routing runs on every leaf. Checking keys and values is
:mod:`art_ray_metrics.core.validate`.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BACKEND_KEY_MAP",
    "COMPUTED_CUMULATIVE_SECTIONS",
    "CUMULATIVE_SECTIONS",
    "DERIVED_COST_NAMES",
    "IDLE_CUMULATIVE_KEYS",
    "SECTIONS",
    "SPLITS",
    "TELEMETRY_PREFIX",
    "canonical_backend_key",
    "is_builder_managed",
    "is_cumulative",
    "route_key",
    "scope_for_cost_context",
    "scope_for_split",
    "to_cumulative",
]

SECTIONS: Final = frozenset(
    {"reward", "loss", "offpolicy", "pipeline", "throughput", "costs", "time", "data", "discarded"}
)
SPLITS: Final = frozenset({"train", "val", "test"})
CUMULATIVE_SECTIONS: Final = frozenset({"costs", "time", "data"})
COMPUTED_CUMULATIVE_SECTIONS: Final = CUMULATIVE_SECTIONS | {"throughput"}
"""Sections whose ``<section>/cum/...`` keys the aggregator computes: a trainer may not pass
them (``throughput/cum/*_idle_s`` are the idle cumulatives). A trainer's ``cum`` key in another
section (ART's pipeline trainer logs ``discarded/cum/stale_groups``) passes through unchanged."""
DERIVED_COST_NAMES: Final = frozenset(
    {
        "outcome",
        "per_trainable_group",
        "per_new_unique_scenario",
        "budget_remaining",
        "projected_total",
        "unreconciled",
    }
)
"""Second segments of ``costs/`` keys the aggregator computes (as ``cum`` is: the outcomes and
the run budget's keys): nobody records under them, so a derived key never adds to
``costs/all``."""
TELEMETRY_PREFIX: Final = "telemetry/"
"""Aggregator health counters are added to every row under this prefix (documented in README)."""

IDLE_CUMULATIVE_KEYS: Final = {
    "throughput/step_trainer_idle_s": "throughput/cum/trainer_idle_s",
    "throughput/step_actor_idle_s": "throughput/cum/actor_idle_s",
}

BACKEND_KEY_MAP: Final = {
    "loss": "loss/train",
    "policy_loss": "loss/train",
    "entropy": "loss/entropy",
    "kl_div": "loss/kl_div",
    "grad_norm": "loss/grad_norm",
    "learning_rate": "loss/learning_rate",
    "num_groups_submitted": "data/step_num_groups_submitted",
    "num_groups_trainable": "data/step_num_groups_trainable",
    "num_trajectories": "data/step_num_trajectories",
    "num_trainable_tokens": "data/step_trainer_tokens",
    "train_tokens": "data/step_trainer_tokens",
}
"""Names emitted by training backends, mapped into the taxonomy (``loss`` -> ``loss/train``)."""

_MANAGED_PREFIXES: Final = ("costs/", "time/step_", "data/step_", "throughput/step_")


def scope_for_split(split: str) -> str:
    """Return the pending-buffer scope of a split: ``val`` and ``test`` share ``eval``.

    >>> [scope_for_split(s) for s in ("train", "val", "test", "rollout")]
    ['train', 'eval', 'eval', 'rollout']
    """
    if split in ("val", "test"):
        return "eval"
    return split


def scope_for_cost_context(context: str) -> str:
    """Return the scope of the leaves a worker records under a cost context (or an explicit
    buffer scope): the scope of the split of that name, so some barrier always closes it.
    ``val`` and ``test`` are never scopes themselves: their leaves wait in ``eval``, which the
    ``val`` and ``test`` barriers close. Any other name is closed by the split of that name.

    >>> [scope_for_cost_context(c) for c in ("train", "val", "test", "eval", "judge")]
    ['train', 'eval', 'eval', 'eval', 'judge']
    """
    return scope_for_split(context)


def canonical_backend_key(key: str) -> str:
    """Map a backend metric name into the taxonomy; other keys are returned unchanged.

    >>> canonical_backend_key("policy_loss"), canonical_backend_key("reward/mean")
    ('loss/train', 'reward/mean')
    """
    if "/" in key:
        return key
    return BACKEND_KEY_MAP.get(key, key)


def route_key(key: str, split: str) -> str:
    """Prefix a key logged for ``split`` as ART does.

    For the splits train/val/test a key keeps its name when it has a ``/`` and its first
    segment is a section or a split; otherwise it becomes ``{split}/{key}``. For any other split
    name every key is prefixed.

    >>> route_key("reward/mean", "val"), route_key("custom", "train"), route_key("rewardish/x", "train")
    ('reward/mean', 'train/custom', 'train/rewardish/x')
    >>> route_key("reward/mean", "rollout")
    'rollout/reward/mean'
    """
    if split in SPLITS:
        head, sep, _ = key.partition("/")
        if sep and (head in SECTIONS or head in SPLITS):
            return key
    return f"{split}/{key}"


def is_builder_managed(key: str) -> bool:
    """True for keys the builder sums within a step and gives cumulative twins.

    >>> is_builder_managed("costs/gpu"), is_builder_managed("time/step_wall_s"), is_builder_managed("reward/x")
    (True, True, False)
    """
    return key.startswith(_MANAGED_PREFIXES)


def is_cumulative(key: str) -> bool:
    """True if the key's second segment is the reserved ``cum``.

    >>> is_cumulative("costs/cum/all"), is_cumulative("costs/cumulative")
    (True, False)
    """
    parts = key.split("/", 2)
    return len(parts) >= 2 and parts[1] == "cum"


def to_cumulative(key: str) -> str:
    """Name the cumulative twin of a per-step key (a leading ``step_`` is dropped).

    >>> to_cumulative("costs/all"), to_cumulative("time/step_wall_s")
    ('costs/cum/all', 'time/cum/wall_s')
    """
    section, _, rest = key.partition("/")
    if rest.startswith("step_"):
        rest = rest[5:]
    return f"{section}/cum/{rest}"
