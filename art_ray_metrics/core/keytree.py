"""The one leaf/ancestor rule of a step's keys, shared by every place that holds leaves.

Within one ``(step, scope)`` a key is either a *leaf* (it holds a value) or an *ancestor* (a
proper prefix, below the section, of some leaf), never both: ``costs/train`` and
``costs/train/judge`` cannot both be leaves of a step, since the row's rollup of
``costs/train`` would count the judge twice. A section alone (``costs``) is never a leaf, so
``costs/train`` and ``costs/eval`` never clash.

Layout, the same for every caller: a mapping of the leaves (to whatever the caller keeps per
leaf: a raw value, an exact sum, ``True``) and a dict ``ancestors`` of each proper ancestor to
one leaf below it (named in the error). Invariant, kept by :func:`admit`: every ancestor's own
ancestors are registered with it, and no key is both a leaf and an ancestor. So a new key
whose parent is already known costs a few probes, whatever the number of keys.

Callers: :class:`~art_ray_metrics.core.tape.PendingLeaves` (the in-process builder, the ART
adapter and the worker client's key registries) and
:class:`~art_ray_metrics.core.buffer.StepBuffer` (the aggregator, which resolves a clash
between producers instead of raising).
"""

from __future__ import annotations

from collections.abc import Container

from art_ray_metrics.errors import MetricConflictError

__all__ = ["Clash", "admit", "conflict_error"]

Clash = tuple[str, str]
"""``(ancestor, leaf)``: a new leaf that is the first, or lies under it, would break the rule."""


def admit(key: str, leaves: Container[str], ancestors: dict[str, str]) -> Clash | None:
    """Make ``key`` (not a leaf yet) admissible as a new leaf: register its proper ancestors
    in ``ancestors`` and return None; or return the clash and change nothing.

    The caller then stores the leaf itself in ``leaves``. Returns ``(key, leaf)`` when ``key``
    is an ancestor of a leaf, ``(parent, key)`` when one of its ancestors is a leaf.
    """
    below = ancestors.get(key)
    if below is not None:
        return key, below
    section_end = key.find("/")
    cut = key.rfind("/")
    if cut == section_end:  # directly under the section: no ancestor to check
        return None
    new = []
    while cut != section_end:
        parent = key[:cut]
        if parent in leaves:
            return parent, key
        if parent in ancestors:  # its own ancestors are known, and none is a leaf
            break
        new.append(parent)
        cut = key.rfind("/", 0, cut)
    for parent in new:
        ancestors[parent] = key
    return None


def conflict_error(key: str, clash: Clash) -> MetricConflictError:
    """The error a caller that refuses ``key`` raises, naming both keys of the clash."""
    above, below = clash
    if above == key:
        return MetricConflictError(f"Cannot log {key!r} as a leaf: it is an ancestor of {below!r}")
    return MetricConflictError(
        f"Cannot log {key!r} as a leaf: {above!r} is already a leaf ancestor"
    )
