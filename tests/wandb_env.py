"""W&B keeps process-wide settings: the first ``wandb.setup`` of a process (any ``wandb.init``)
fixes them from the environment of that moment, and later runs that do not name a setting take
it from there, not from the environment they see. Tests that set W&B's environment forget those
settings first, so what an earlier test of the same process did (another module, or another
order under pytest-xdist) cannot reach them."""

from __future__ import annotations


def forget_wandb_settings() -> None:
    """Drop W&B's process-wide settings without waiting for its service (``wandb.teardown()``
    waits for every run of the process, which can hang a long session)."""
    from wandb.sdk import wandb_setup

    with wandb_setup._singleton_lock:
        wandb_setup._singleton = None
