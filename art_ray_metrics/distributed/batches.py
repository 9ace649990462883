"""The transport stage's plain values and pure decisions, worker side: what a flush answers
(:class:`FlushResult`), a producer's identity, the groups a batch carries, and what an
acknowledgement settles.

:class:`~art_ray_metrics.distributed.client.MetricsClient` keeps the state, the lock and the
I/O. It calls these under its lock with plain values and applies what they return; nothing
here holds state, takes a lock or calls out, so each is tested alone
(``tests/unit/test_batches.py``).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from art_ray_metrics.core.records import StepGroup
from art_ray_metrics.core.replies import RefusedKey
from art_ray_metrics.core.rollup import exact_sum
from art_ray_metrics.core.tape import PendingLeaves, Refused, Slot
from art_ray_metrics.core.wire import decode_batch
from art_ray_metrics.errors import WireFormatError

__all__ = [
    "FlushResult",
    "default_producer_id",
    "flush_result",
    "lost_declarations",
    "new_incarnation",
    "range_durable",
    "refused_keys",
    "settled_seqs",
    "shipped_big",
    "step_groups",
]


@dataclass(frozen=True)
class FlushResult:
    """What an explicit flush achieved."""

    ok: bool
    """Every batch holding the flushed leaves is acknowledged as durable, and none of those
    leaves was lost (refused by the aggregator, given up at the retained-batch cap, not
    encodable): a builder's flush answers for its own leaves only, for as long as it asks;
    the process-wide ``MetricsClient.flush()`` reports every loss since its previous call."""
    batches: int
    """Batches shipped by this process so far."""
    retained: int
    """Batches still waiting for a durable acknowledgement."""
    error: str | None = None


def default_producer_id() -> str:
    """``host-pid-random``: a client's producer id when none is given."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def new_incarnation() -> str:
    """A fresh incarnation: a client's, each time it starts (first, and in a forked child)."""
    return uuid.uuid4().hex[:16]


# -- building a batch ------------------------------------------------------------------------


def step_groups(pending: Mapping[Slot, PendingLeaves]) -> tuple[StepGroup, ...]:
    """What a batch carries of the pending leaves: one group per slot, in slot order, with one
    exact sum per key."""
    return tuple(
        StepGroup(
            step,
            scope,
            p.sums(),
            tuple(p.keyed),
            b"".join(sorted(p.scenarios)),
            p.sample_stats(),
            p.group_sums(),
            dict(p.keyed_groups),
        )
        for (step, scope), p in sorted(pending.items())
    )


def shipped_big(
    big: Mapping[tuple[int, str, str], Decimal], groups: Iterable[StepGroup]
) -> dict[tuple[int, str, str], Decimal]:
    """The new shipped totals of the keys with huge values (``(step, scope, key)`` to the sum
    shipped so far) that ``groups`` carry; keys they do not carry are left out."""
    sums = {(g.step, g.scope): g.sums for g in groups}
    totals = {}
    for big_key, total in big.items():
        add = sums.get(big_key[:2], {}).get(big_key[2])
        if add is not None:
            totals[big_key] = exact_sum([total, add])
    return totals


def lost_declarations(seq: int, data: bytes) -> list[tuple[int, int, str, int]]:
    """How a later batch's header declares batch ``seq`` (its bytes ``data``), given up
    unacknowledged: ``(seq, step, scope, leaves)`` per group."""
    try:
        groups: tuple[StepGroup, ...] = decode_batch(data).groups
    except WireFormatError:  # our own bytes: cannot happen; the batch still counts
        groups = ()
    return [(seq, g.step, g.scope, g.leaf_count) for g in groups]


# -- acknowledgements ------------------------------------------------------------------------


def refused_keys(refused: Iterable[RefusedKey] | None) -> Refused:
    """The ``(step, scope, key)`` of the keys an acknowledgement refuses (key None: the whole
    group), as the ledger charges them."""
    return {(int(r[0]), str(r[1]), None if r[2] is None else str(r[2])) for r in refused or ()}


def settled_seqs(retained: Collection[int], seq: int, durable: bool, upto: int) -> list[int]:
    """The retained batches an acknowledgement of batch ``seq`` settles, in order: ``seq``
    itself if it is ``durable``, then every other one up to ``upto`` (the aggregator's durable
    mark; 0: none), in ``retained``'s order."""
    settled = [seq] if durable and seq in retained else []
    if upto:
        settled += [s for s in retained if s <= upto and s not in settled]
    return settled


# -- flushes ---------------------------------------------------------------------------------


def range_durable(built: int, retained: Iterable[int], lo: int, hi: int) -> bool:
    """Every batch of ``[lo, hi]`` is durable: built (batches up to ``built`` are) and no
    longer retained."""
    return built >= hi and not any(lo <= s <= hi for s in retained)


def flush_result(
    done: bool, batches: int, retained: int, losses: list[str], last_error: str | None
) -> FlushResult:
    """A flush's answer: not ok with the ``losses`` (the ledger's reasons) if there are any;
    else ``done``, with the last error while not."""
    if losses:
        return FlushResult(False, batches, retained, "; ".join(losses)[:4000])
    return FlushResult(done, batches, retained, None if done else last_error)
