"""The process's clients: one :class:`~art_ray_metrics.distributed.client.MetricsClient` per
aggregator and producer id, made on first use.

``connect`` (:mod:`.record`) finds its client here (:func:`get_client`, with the config of
:func:`named_config`); a driver closes them all before ``ray.shutdown()``
(:func:`close_clients`); an aggregator that is not a Ray actor (an
:class:`~art_ray_metrics.testing.InProcessAggregator`) routes them to itself
(:func:`set_route`). The table has a lock of its own, taken before a client's lock (closing a
client under it), never inside one.

What happens to a client in a forked child is the client's own business
(:meth:`MetricsClient._after_fork`, for every client, in the table or not): the table keeps the
same objects, each restarted with a new incarnation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core import validate as V
from art_ray_metrics.distributed.client import MetricsClient
from art_ray_metrics.distributed.transport import Transport

__all__ = [
    "close_clients",
    "get_client",
    "named_config",
    "reset_clients",
    "set_route",
]


_CLIENTS: dict[tuple[str, str, str | None], MetricsClient] = {}
"""Process-wide clients by (actor name, namespace, explicit producer id or None)."""
_CLIENTS_LOCK = threading.Lock()


_ROUTES: dict[tuple[str, str], Callable[[], Transport]] = {}
"""Transports for aggregators that are not Ray actors, by (name, namespace): an
:class:`~art_ray_metrics.testing.InProcessAggregator` installs itself here, so ``connect``
reaches it from unchanged rollout code."""


def get_client(
    config: ClientConfig | None = None, *, producer_id: str | None = None
) -> MetricsClient:
    """The process-wide client for an aggregator (created on first use)."""
    config = config or named_config(None, None)
    if producer_id is not None:
        V.check_text("producer_id", producer_id)
    key = (config.name, config.namespace, producer_id)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None or not client.usable:
            route = _ROUTES.get((config.name, config.namespace))
            transport = route() if route is not None else None
            client = _CLIENTS[key] = MetricsClient(
                config, producer_id=producer_id, transport=transport
            )
        return client


def set_route(name: str, namespace: str, route: Callable[[], Transport] | None) -> None:
    """Route this process's clients of aggregator ``(name, namespace)`` through transports
    made by ``route`` (None: back to Ray). Clients already made for it are stopped (without
    flushing) and forgotten, so the next ``connect`` makes one on the new route."""
    with _CLIENTS_LOCK:
        if route is None:
            _ROUTES.pop((name, namespace), None)
        else:
            _ROUTES[(name, namespace)] = route
        for key in [k for k in _CLIENTS if k[:2] == (name, namespace)]:
            _CLIENTS.pop(key).abandon()


def close_clients(timeout_s: float = 5.0) -> None:
    """Flush and close every client of this process (each within ``timeout_s``).

    A driver that recorded leaves itself calls it before ``ray.shutdown()``; the clients
    would otherwise notice Ray is gone and stop on their own (they never start Ray)."""
    with _CLIENTS_LOCK:
        clients = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client in clients:
        client.close(timeout_s)


def reset_clients(timeout_s: float = 1.0) -> None:
    """Close (each within ``timeout_s``; 0: stop at once, without flushing) and forget every
    client of this process, under the table's lock: a test's teardown, so the next test starts
    with no client."""
    with _CLIENTS_LOCK:
        for client in _CLIENTS.values():
            if timeout_s > 0:
                client.close(timeout_s=timeout_s)
            else:
                client.abandon()
        _CLIENTS.clear()


_NAMED_CONFIGS: dict[tuple[str | None, str | None], ClientConfig] = {}


def named_config(name: str | None, namespace: str | None) -> ClientConfig:
    """The client config of aggregator ``name`` in ``namespace`` (defaults for None), made
    once per pair (a pydantic model costs microseconds: ``connect`` runs per rollout)."""
    config = _NAMED_CONFIGS.get((name, namespace))
    if config is None:
        fields = {k: v for k, v in (("name", name), ("namespace", namespace)) if v is not None}
        config = _NAMED_CONFIGS[(name, namespace)] = ClientConfig(**fields)
    return config
