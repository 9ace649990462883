"""The active metrics builder of the current context.

One :class:`contextvars.ContextVar` holds the builder that ``track_api_cost`` records into.
``MetricsBuilder.activate()`` / ``activate_context()`` / ``get_active()`` are built on these
three functions.

Invariants:
    * The value is per context: asyncio tasks inherit a copy of the context that created them,
      so a builder activated before ``asyncio.create_task``/``gather`` is active in the task.
    * Threads do not inherit it: a plain ``threading.Thread`` or ``ThreadPoolExecutor.submit``
      starts in an empty context. Run the callable in a copy of the caller's context
      (``contextvars.copy_context().run``, or :func:`art_ray_metrics.spend.track.bind_context`).
      ``asyncio.to_thread`` copies the context itself.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import Any

__all__ = ["get_active_builder", "reset_active_builder", "set_active_builder"]

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
