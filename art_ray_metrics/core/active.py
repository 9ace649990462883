"""The active metrics builder of the current context.

One :class:`contextvars.ContextVar` holds the builder that ``track_api_cost`` records into.
``MetricsBuilder.activate()`` / ``activate_context()`` / ``get_active()`` are built on these
three functions; :func:`bind_context` carries the caller's context into a thread.

Invariants:
    * The value is per context: asyncio tasks inherit a copy of the context that created them,
      so a builder activated before ``asyncio.create_task``/``gather`` is active in the task.
    * Threads do not inherit it: a plain ``threading.Thread`` or ``ThreadPoolExecutor.submit``
      starts in an empty context. Run the callable in a copy of the caller's context
      (``contextvars.copy_context().run``, or :func:`bind_context`).
      ``asyncio.to_thread`` copies the context itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar, Token, copy_context
from typing import Any, ParamSpec, TypeVar

__all__ = ["bind_context", "get_active_builder", "reset_active_builder", "set_active_builder"]

P = ParamSpec("P")
R = TypeVar("R")

_ACTIVE_BUILDER: ContextVar[Any] = ContextVar("art_ray_metrics_active_builder", default=None)


def get_active_builder() -> Any | None:
    """Return the builder active in the current context, or ``None`` if there is none.

    >>> get_active_builder() is None
    True
    """
    return _ACTIVE_BUILDER.get()


def set_active_builder(builder: Any) -> Token[Any]:
    """Make ``builder`` the active builder of the current context.

    Args:
        builder: The builder to activate (``None`` deactivates).

    Returns:
        A token for :func:`reset_active_builder`, which restores the previous builder.
    """
    return _ACTIVE_BUILDER.set(builder)


def reset_active_builder(token: Token[Any]) -> None:
    """Restore the builder that was active before the matching :func:`set_active_builder`.

    Args:
        token: The token returned by :func:`set_active_builder` in this context.
    """
    _ACTIVE_BUILDER.reset(token)


def bind_context(func: Callable[P, R]) -> Callable[P, R]:
    """Return ``func`` bound to a copy of the caller's context (active builder included).

    Threads start with an empty context, so a builder activated in the submitting thread is not
    active in a worker thread. Wrap the callable when submitting it::

        with builder.activate_context():
            executor.submit(bind_context(judge), item)

    Each call runs in a fresh copy of the captured context, so the result can be called from
    several threads at once.

    >>> from art_ray_metrics.core.active import set_active_builder, reset_active_builder
    >>> import threading
    >>> token = set_active_builder("b")
    >>> seen = []
    >>> t = threading.Thread(target=bind_context(lambda: seen.append(get_active_builder())))
    >>> t.start(); t.join(); reset_active_builder(token); seen
    ['b']
    """
    context = copy_context()

    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return context.copy().run(func, *args, **kwargs)

    return run
