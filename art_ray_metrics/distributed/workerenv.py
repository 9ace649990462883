"""Worker side of ``AggregatorConfig.worker_env``: the API keys a driver shares, set in memory.

The driver's handle sends the values of the variables named by ``worker_env`` to the aggregator
with its credentials (in memory: never through Ray's runtime env, which Ray writes to its
session logs). The first :func:`~art_ray_metrics.connect` of a worker process asks the
aggregator for them and sets those the process does not have in ``os.environ``, so
``openai.OpenAI()`` and the like find them. Once per process and aggregator; a failed attempt is
retried by a later ``connect`` after a back-off, never more often. The first ``connect`` of a
process blocks for that call (in an async actor too: once per process, bounded by
:data:`FETCH_TIMEOUT_S`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from typing import Any

from art_ray_metrics.core.backoff import WORKER_ENV, WORKER_ENV_FETCH, Backoff
from art_ray_metrics.errors import CredentialsRequiredError

__all__ = ["FETCH_TIMEOUT_S", "load_worker_env"]

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 20.0
"""The longest a ``connect`` waits for the aggregator's answer (once per process). A worker
process that starts while the aggregator restarts waits for it here rather than run its
rollout without the API key: a restart took up to 9 s on the loaded 2-core test machine, the
restarted actor then waits (up to ``credentials.WORKER_ENV_WAIT_S``) for the driver's watcher,
and a call that dies with an instance is made again on the next one within this bound."""

_DONE = math.inf
_next_try: dict[tuple[str, str], float] = {}  # (name, namespace) -> when to try again; inf: done
_backoff: dict[tuple[str, str], Backoff] = {}
_lock = threading.Lock()


def load_worker_env(name: str, namespace: str) -> bool:
    """Set the shared variables this process lacks; True once done (or nothing to fetch).

    Without Ray there is nothing to fetch (and Ray is never started from here): True. A
    missing or unreachable aggregator returns False and is tried again by a later call after
    1 s, 2 s, ... up to 30 s.
    """
    key = (name, namespace)
    due = _next_try.get(key, 0.0)
    if due == _DONE:
        return True
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return True
    if time.monotonic() < due:
        return False
    with _lock:
        if _next_try.get(key, 0.0) == _DONE:
            return True
        try:
            env = _fetch(ray, name, namespace)
        except Exception as exc:
            delay = _backoff.setdefault(key, WORKER_ENV.start()).next_delay()
            _next_try[key] = time.monotonic() + delay
            # no such actor yet: the client's own lookup reports that; anything else is news
            log.log(
                logging.DEBUG if isinstance(exc, ValueError) else logging.WARNING,
                "art_ray_metrics: could not get the workers' environment from aggregator %r "
                "(%s); trying again in %.0f s",
                name,
                type(exc).__name__,
                delay,
            )
            return False
        for var, value in env.items():
            if not os.environ.get(var):
                os.environ[var] = value
        _next_try[key] = _DONE
        return True


def _forget() -> None:
    """Forget what was loaded (tests)."""
    with _lock:
        _next_try.clear()
        _backoff.clear()


def _fetch(ray: Any, name: str, namespace: str) -> dict[str, str]:
    """The aggregator's answer, asking again within :data:`FETCH_TIMEOUT_S` while it restarts.

    ``worker_env`` only reads, so a call that died with the instance (Ray does not retry the
    aggregator's calls) or that a restarted instance answered with
    :class:`~art_ray_metrics.errors.CredentialsRequiredError` is simply made again. A missing
    actor (``ValueError``) and a fetch out of time are raised at once.
    """
    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + FETCH_TIMEOUT_S
    backoff = WORKER_ENV_FETCH.start()
    while True:
        actor = ray.get_actor(name, namespace=namespace)
        left = deadline - time.monotonic()
        try:
            env: dict[str, str] = ray.get(actor.worker_env.remote(), timeout=max(left, 0.01))
            return env
        except GetTimeoutError:
            raise
        except (RayActorError, CredentialsRequiredError):
            pause = backoff.next_delay_within(deadline)
            if pause is None:
                raise
            time.sleep(pause)
