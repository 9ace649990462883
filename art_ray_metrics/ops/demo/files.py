"""What the demo keeps in the run's storage beside the aggregator's objects.

``demo/params.json`` (seed and sizes, so ``--resume`` replays the same workload) and
``demo/events.json`` (the resumes and ``--chaos`` steps, marked on the chart); and the clean-up
of a new run that failed before anything was recorded.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from art_ray_metrics.durable.restore import read_run
from art_ray_metrics.durable.storage import open_store
from art_ray_metrics.ops.demo.options import DemoError, DemoOptions

__all__ = ["EVENTS_KEY", "PARAMS_KEY", "STORE_LOCK", "load_params", "record_events", "remove_stub"]

log = logging.getLogger(__name__)

PARAMS_KEY = "demo/params.json"
EVENTS_KEY = "demo/events.json"
"""Where the demo lists the steps at which a session resumed the run or ``--chaos`` killed
things (``[{"step": 4, "what": "resumed"}, ...]``), for the chart."""
STORE_LOCK = ".arm-store.lock"
"""The lock file a local store keeps in its directory (removed with a failed run's stub)."""


def load_params(opts: DemoOptions) -> dict[str, Any]:
    """The workload of this session (``seed``, ``rollouts``), its first step (``start``) and
    the aggregator's starts before it (``starts_before``).

    A new run records its workload in :data:`PARAMS_KEY`; a resumed run replays the recorded
    one (the flags are used if there is none).

    Raises:
        DemoError: ``--resume`` of nothing, or a new run over an existing one.
    """
    store = open_store(opts.storage_uri)
    info = read_run(opts.storage_uri)
    params = {"seed": opts.seed, "rollouts": opts.rollouts}
    if info is None:
        if opts.resume:
            raise DemoError(f"Expected a run to resume at {opts.storage_uri!r} but found none")
        store.put(PARAMS_KEY, json.dumps(params).encode())
        return {**params, "start": 0, "starts_before": 0}
    if not opts.resume:
        raise DemoError(
            f"Expected a new run but {opts.storage_uri!r} already holds run {opts.run!r}; "
            "pass --resume to continue it or --run NAME for a new one"
        )
    try:
        params.update(json.loads(store.get(PARAMS_KEY)))
    except Exception:  # an older or foreign run: keep the flags
        log.warning("no %s in %s; using the command-line workload", PARAMS_KEY, opts.storage_uri)
    last = info.last_train_step
    # starts of the aggregator after the first, before this session (a resume is one more)
    return {**params, "start": 0 if last is None else last + 1, "starts_before": info.restarts}


def record_events(opts: DemoOptions, first: int, chaos_step: int | None) -> list[dict[str, Any]]:
    """Add this session's resume point and ``--chaos`` step to :data:`EVENTS_KEY`; return all.

    Best effort: the chart is drawn without marks if the storage cannot be read or written.
    """
    store = open_store(opts.storage_uri)
    try:
        events = list(json.loads(store.get(EVENTS_KEY)))
    except Exception:
        events = []
    new = [{"step": first, "what": "resumed"}] if opts.resume else []
    if chaos_step is not None:
        new.append({"step": chaos_step, "what": "--chaos: worker and aggregator killed"})
    if new:
        events = [e for e in events if e not in new] + new
        try:
            store.put(EVENTS_KEY, json.dumps(events).encode())
        except Exception as exc:
            log.warning("could not record the demo's events in %s: %s", opts.storage_uri, exc)
    return [e for e in events if isinstance(e, dict) and {"step", "what"} <= e.keys()]


def remove_stub(opts: DemoOptions) -> None:
    """After a new run failed before its first checkpoint: remove what the demo wrote."""
    try:
        if read_run(opts.storage_uri) is not None:
            return  # something was recorded: keep it (``--resume`` continues it)
        open_store(opts.storage_uri).delete(PARAMS_KEY)
    except Exception as exc:  # best effort: never hide the original failure
        log.debug("could not remove the demo's stub in %s: %s", opts.storage_uri, exc)
        return
    for root in {opts.storage_uri, opts.local_dir}:
        if "://" in root or not os.path.isdir(root):
            continue
        for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda w: -len(w[0])):
            try:
                if os.listdir(dirpath) == [STORE_LOCK]:
                    os.remove(os.path.join(dirpath, STORE_LOCK))  # the store's own lock file
                os.rmdir(dirpath)  # only empty directories
            except OSError:
                pass
