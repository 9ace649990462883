"""The fate of each of ART's trajectory groups (``trained``, ``zero_variance``, ``errored``),
which the ART adapter passes to the aggregator so a row's spend is split by outcome."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["group_fates", "scenario_id"]


def group_fates(groups: Iterable[Any]) -> dict[str, str]:
    """The fate of each of ART's trajectory groups, by group id, as ``attach`` passes them.

    A group's id is its scenario id as ART reads it (the group's metadata, else its
    trajectories': ``scenario_id``), the id a worker's cost leaves carry by default
    (``add_data(scenario_ids=[id])``, or ``worker_context(step, group=id)``). A group with
    exceptions is ``errored``; else one whose rewards do not vary (as ART decides trainability:
    fewer than two trajectories, or all rewards equal) is ``zero_variance``; else ``trained``.
    Groups without an id are left out (their spend stays ``unknown``); of several groups with
    one id, the first in ``trained``, ``zero_variance``, ``errored`` order wins.
    """
    rank = {"trained": 0, "zero_variance": 1, "errored": 2}
    out: dict[str, str] = {}
    for group in groups:
        group_id = scenario_id(group)
        if group_id is None:
            continue
        rewards = {trajectory.reward for trajectory in group.trajectories}
        if group.exceptions:
            fate = "errored"
        elif len(group.trajectories) > 1 and len(rewards) > 1:
            fate = "trained"
        else:
            fate = "zero_variance"
        held = out.get(str(group_id))
        if held is None or rank[fate] < rank[held]:
            out[str(group_id)] = fate
    return out


def scenario_id(group: Any) -> str | None:
    """A trajectory group's scenario id as ART 0.5.18 reads it (``metrics_taxonomy``)."""
    for metadata in (group.metadata, *(t.metadata for t in group.trajectories)):
        scenario_id = (metadata or {}).get("scenario_id")
        if scenario_id is not None:
            return str(scenario_id)
    return None
