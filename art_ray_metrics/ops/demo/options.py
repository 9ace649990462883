"""The demo's settings, its result, and the two errors it raises to the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from art_ray_metrics.config import DEFAULT_NAME, DEFAULT_NAMESPACE

__all__ = ["DemoError", "DemoInterrupted", "DemoOptions", "DemoResult", "default_options"]


@dataclass(frozen=True)
class DemoOptions:
    """The demo's settings (the CLI flags)."""

    run: str
    storage_uri: str
    local_dir: str
    steps: int = 8
    rollouts: int = 4
    judges: int = 2
    seed: int = 0
    resume: bool = False
    chaos: bool = False
    keep: bool = False
    address: str | None = None
    num_cpus: int = 2
    expect_nodes: int | None = None
    name: str = DEFAULT_NAME
    namespace: str = DEFAULT_NAMESPACE
    wandb_mode: Literal["online", "offline", "disabled"] = "disabled"
    wandb_dir: str | None = None
    charts: tuple[str, ...] = ()
    summary_json: str | None = None
    storage_flag: bool = False
    """Whether ``--storage`` was given (the "continue it" hint repeats it)."""
    ray_label: str | None = None
    """The joined cluster's address as printed (for ``auto``: with where it was found)."""

    def resume_command(self) -> str:
        """The command that continues this run: on the same cluster, storage and aggregator."""
        extra = f" --storage {self.storage_uri}" if self.storage_flag else ""
        if self.address:
            extra += f" --address {self.address}"
        if self.name != DEFAULT_NAME:
            extra += f" --name {self.name}"
        if self.namespace != DEFAULT_NAMESPACE:
            extra += f" --namespace {self.namespace}"
        return f"art-ray-metrics demo --run {self.run} --resume{extra}"


@dataclass
class DemoResult:
    """What the demo did (also written as JSON with ``--summary-json``)."""

    run: str
    storage_uri: str
    first_step: int
    last_step: int
    rows: int
    totals: dict[str, float]
    unique_scenarios: int
    nodes_used: int
    wandb_run_id: str | None
    counters: dict[str, int]
    charts: list[str]
    chaos: dict[str, Any] | None = None
    seconds: float = 0.0
    startup_seconds: float = 0.0
    """Of ``seconds``: starting Ray (when local), the aggregator, judges and worker processes."""
    params: dict[str, Any] = field(default_factory=dict)


class DemoError(Exception):
    """A problem the user can fix (printed as one line by the CLI)."""


class DemoInterrupted(Exception):
    """Ctrl-C during the demo; the message says what was saved and how to continue."""


def default_options(**fields: Any) -> DemoOptions:
    """Options with the CLI's defaults (used by tests)."""
    run = fields.pop("run", "demo")
    local = fields.pop("local_dir", os.path.abspath(os.path.join("runs", run)))
    storage = fields.pop("storage_uri", local)
    return DemoOptions(run=run, storage_uri=storage, local_dir=local, **fields)
