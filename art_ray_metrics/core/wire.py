"""The msgpack wire format of batches and state snapshots, with strict decoding.

Batch, format version 3 (a msgpack array)::

    ["arm-batch", 3, producer_id: str, seq: int >= 1, [group, ...],
     incarnation: str, acked_upto: int >= 0, dropped: int >= 0,
     lost: [[seq, step, scope, leaves], ...]]
    group = [step: int >= 0, scope: str, sums: {key: decimal-str}, keyed: [[key, decimal-str, response_id], ...],
             scenario_digests: bin (16-byte BLAKE2b digests, concatenated),
             samples: {key: [count, sum, sum_sq, min, max]}  (optional; sent only when non-empty)]

``lost`` names, per group, the batches the producer gave up on at its retained-batch cap (until a
batch declaring them is acknowledged); from version 3 on ``acked_upto`` also advances the
producer's window past them. Version 2 had the first eight fields, version 1 the first five (its
batches read with incarnation ``""``), so write-ahead logs of older builds replay as they did.
Values travel as decimal strings (``"0.0012"``) so exact sums stay exact across processes.

Snapshot, format version 2 (version 1 is still read): ``["arm-state", 2, state]`` where ``state`` is
:meth:`AggregatorState.to_wire() <art_ray_metrics.core.state.AggregatorState.to_wire>`.

Every msgpack object this package stores or sends is read through :func:`decode_envelope` (or
:func:`unpack` for a bare payload): one place that unpacks, maps msgpack's many exception types
to one typed error, and checks the magic and the format version. Two envelope shapes exist: an
array ``[magic, version, ...]`` (batches, snapshots) and a map ``{"format": version, ...}``
(rewind records, the checkpoint pointer and manifests).

Decoding never trusts its input: every field's type is checked, every key goes through
:func:`~art_ray_metrics.core.validate.validate_key` and every value through
:func:`~art_ray_metrics.core.validate.check_value`; anything else raises :class:`WireFormatError` naming
what was wrong, before any state is touched. Schema evolution: new fields are appended with
defaults; fields are never reordered or retyped; an unknown version is refused.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from typing import Any

import msgpack

from art_ray_metrics.core import keys as K
from art_ray_metrics.core import validate as V
from art_ray_metrics.core.dedupe import DIGEST_SIZE
from art_ray_metrics.core.outcome import GroupSpend
from art_ray_metrics.core.records import KeyedCost, LeafBatch, StepGroup
from art_ray_metrics.core.samples import SampleStats, check_sample_key
from art_ray_metrics.errors import InvalidMetricError, MetricsError, WireFormatError

__all__ = [
    "BATCH_MAGIC",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "STATE_MAGIC",
    "batch_identity",
    "decode_batch",
    "decode_envelope",
    "decode_state",
    "encode_batch",
    "encode_state",
    "unpack",
]

FORMAT_VERSION = 3
SPEND_VERSION = 4
"""A format-3 batch plus a tenth field, the spend it carries for the run budget and the
outcomes: ``[admitted, [[group index, [[group digest, dollars], ...]], ...]]``; a group entry
may carry a third item, ``[[keyed cost index, group digest], ...]``, the groups of its keyed
costs (a reader takes entries of two or three items). Written only by a batch that carries any
(so runs without budgets or group ids write format 3)."""
READABLE_VERSIONS = (1, 2, 3, 4)
BATCH_MAGIC = "arm-batch"
STATE_MAGIC = "arm-state"


def encode_batch(batch: LeafBatch) -> bytes:
    """Serialise a batch (format version 3)."""
    groups = []
    for g in batch.groups:
        group = [
            g.step,
            g.scope,
            {k: str(v) for k, v in g.sums.items()},
            [[c.key, str(c.value), c.response_id] for c in g.keyed_costs],
            g.scenario_digests,
        ]
        if g.samples:
            group.append({k: s.to_wire() for k, s in g.samples.items()})
        groups.append(group)
    out: bytes = msgpack.packb(
        [
            BATCH_MAGIC,
            SPEND_VERSION if _spend_field(batch) else FORMAT_VERSION,
            batch.producer_id,
            batch.seq,
            groups,
            batch.incarnation,
            batch.acked_upto,
            batch.dropped,
            [list(entry) for entry in batch.lost],
            *_spend_field(batch),
        ],
        use_bin_type=True,
    )
    return out


def _spend_field(batch: LeafBatch) -> list[Any]:
    """The format-4 tenth field, or nothing (see :data:`SPEND_VERSION`)."""
    spend: list[Any] = []
    for i, g in enumerate(batch.groups):
        if g.group_spend or g.keyed_groups:
            entry: list[Any] = [i, [[d, str(v)] for d, v in sorted(g.group_spend.items())]]
            if g.keyed_groups:
                entry.append([[k, d] for k, d in sorted(g.keyed_groups.items())])
            spend.append(entry)
    if not spend and not batch.admitted:
        return []
    return [[str(batch.admitted), spend]]


def _decode_spend(raw: object, groups: list[StepGroup]) -> Decimal:
    """Apply a format-4 spend field to ``groups``; returns the admitted dollars."""
    if not isinstance(raw, list) or len(raw) != 2 or not isinstance(raw[1], list):
        raise WireFormatError(f"Expected [admitted, group spend] but got {raw!r}")
    admitted = _decimal(raw[0], "admitted")
    for entry in raw[1]:
        if not isinstance(entry, list) or len(entry) not in (2, 3):
            raise WireFormatError(f"Expected [group index, spend] but got {entry!r}")
        index = _int(entry[0], "group index", 0)
        if index >= len(groups):
            raise WireFormatError(f"Group spend for group {index} of {len(groups)}")
        spend = GroupSpend.from_wire(entry[1]).sums
        keyed: dict[int, bytes] = {}
        if len(entry) == 3:
            count = len(groups[index].keyed_costs)
            if not isinstance(entry[2], list):
                raise WireFormatError(f"Expected the groups of keyed costs, got {entry[2]!r}")
            for item in entry[2]:
                if not isinstance(item, list) or len(item) != 2:
                    raise WireFormatError(f"Expected [keyed cost index, group] but got {item!r}")
                at = _int(item[0], "keyed cost index", 0)
                group = item[1]
                if at >= count or not isinstance(group, bytes) or len(group) != DIGEST_SIZE:
                    raise WireFormatError(f"Bad group of keyed cost {at} of {count}: {group!r}")
                keyed[at] = group
        groups[index] = replace(groups[index], group_spend=spend, keyed_groups=keyed)
    return admitted


def unpack(data: object, *, what: str, error: type[MetricsError] = WireFormatError) -> Any:
    """Unpack one msgpack object, mapping every failure to ``error``.

    Args:
        data: The bytes.
        what: Names the object in the error ("a rewind record", "the manifest at key 'k'").
        error: The typed error to raise.

    Raises:
        MetricsError: ``error``: not bytes, malformed or truncated.

    >>> unpack(b"\\x93\\x01\\x02\\x03", what="a list")
    [1, 2, 3]
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise error(f"Expected {what} as bytes but got {type(data).__name__}")
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise error(f"Malformed or truncated msgpack in {what} ({len(data)} bytes): {exc}") from exc


def decode_envelope(
    data: object,
    *,
    what: str,
    versions: Collection[int],
    magic: str | None = None,
    error: type[MetricsError] = WireFormatError,
) -> Any:
    """The one envelope decoder: unpack, map errors to ``error``, check magic and version.

    Args:
        data: The bytes.
        what: Names the object in errors.
        versions: The format versions this build reads.
        magic: For an array envelope ``[magic, version, ...]``; None for a map envelope
            ``{"format": version, ...}``.
        error: The typed error to raise.

    Returns:
        The array (a list) or the map (a dict), fields not checked beyond magic and version.

    Raises:
        MetricsError: ``error``: malformed, of another shape or magic, or an unknown version.

    >>> decode_envelope(msgpack.packb({"format": 1, "a": 2}), what="a map", versions=(1,))
    {'format': 1, 'a': 2}
    """
    obj = unpack(data, what=what, error=error)
    if magic is None:
        if not isinstance(obj, dict):
            raise error(f"Expected {what} as a msgpack map but got {type(obj).__name__}")
        if obj.get("format") not in versions:
            readable = " or ".join(str(v) for v in versions)
            raise error(f"Expected {what} in format {readable} but got {obj.get('format')!r}")
        return obj
    if not isinstance(obj, list) or len(obj) < 2 or obj[0] != magic:
        raise error(f"Expected a {magic!r} message but got {str(obj)[:80]!r}")
    if obj[1] not in versions:
        raise error(
            f"Unknown {magic} format version {obj[1]!r}; this build reads versions "
            f"{tuple(versions)}"
        )
    return obj


def _unpack(data: object, magic: str) -> list[Any]:
    obj: list[Any] = decode_envelope(data, what=magic, versions=READABLE_VERSIONS, magic=magic)
    return obj


def _int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise WireFormatError(f"Expected {what} as an int >= {minimum} but got {value!r}")
    return value


def _decimal(value: object, what: str) -> Decimal:
    """A finite non-negative decimal string."""
    try:
        amount = Decimal(value) if isinstance(value, str) else None
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite() or amount < 0:
        raise WireFormatError(f"Expected {what} as a non-negative decimal string, got {value!r}")
    return amount


def _str(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise WireFormatError(f"Expected {what} as a non-empty str but got {value!r}")
    return value


def _leaf(key: object, value: object) -> tuple[str, Decimal]:
    try:
        k = V.validate_key(key)
        if not isinstance(value, str):
            raise InvalidMetricError(f"Expected a decimal string for {k=!r} but got {value!r}")
        try:
            number = Decimal(value)
        except InvalidOperation:
            raise InvalidMetricError(
                f"Expected a decimal string for {k=!r} but got {value!r}"
            ) from None
        V.check_value(k, number)
    except InvalidMetricError as exc:
        raise WireFormatError(f"Invalid leaf in batch: {exc}") from exc
    return k, number


def _samples(raw: object) -> dict[str, SampleStats]:
    if not isinstance(raw, dict):
        raise WireFormatError(f"Expected group samples as a map but got {str(raw)[:80]!r}")
    out = {}
    try:
        for key, stats in raw.items():
            k = check_sample_key(V.validate_key(key))
            out[k] = SampleStats.from_wire(k, stats)
    except InvalidMetricError as exc:
        raise WireFormatError(f"Invalid sample summary in batch: {exc}") from exc
    return out


def _lost(raw: object, acked_upto: int) -> list[tuple[int, int, str, int]]:
    """The batches a producer declares given up: ``[[seq, step, scope, leaves], ...]``."""
    if not isinstance(raw, list):
        raise WireFormatError(f"Expected the lost batches as a list but got {raw!r}")
    lost = []
    for entry in raw:
        if not isinstance(entry, list) or len(entry) != 4:
            raise WireFormatError(f"Expected [seq, step, scope, leaves] but got {entry!r}")
        lost_seq = _int(entry[0], "a lost batch's seq", 1)
        if lost_seq > acked_upto:
            raise WireFormatError(
                f"Expected lost batch {lost_seq} to be at most acked_upto={acked_upto}"
            )
        scope = _str(entry[2], "a lost batch's scope")
        try:
            V.check_split(scope)
        except InvalidMetricError as exc:
            raise WireFormatError(f"Invalid scope of a lost batch: {exc}") from exc
        step = _int(entry[1], "a lost batch's step", 0)
        lost.append((lost_seq, step, scope, _int(entry[3], "a lost batch's leaves", 0)))
    return lost


def _group(raw: object) -> StepGroup:
    """One ``[step, scope, sums, keyed, digests(, samples)]`` group, checked."""
    if not isinstance(raw, list) or len(raw) not in (5, 6):
        raise WireFormatError(f"Expected a 5- or 6-field group but got {str(raw)[:80]!r}")
    step = _int(raw[0], "step", 0)
    scope = _str(raw[1], "scope")
    try:
        V.check_split(scope)  # a scope the trainer could never close would stay pending
    except InvalidMetricError as exc:
        raise WireFormatError(f"Invalid scope in batch: {exc}") from exc
    # "val"/"test" from an older client: the scope the val and test barriers close
    scope = K.scope_for_cost_context(scope)
    if not isinstance(raw[2], dict) or not isinstance(raw[3], list):
        raise WireFormatError("Expected group sums as a map and keyed costs as a list")
    sums = dict(_leaf(k, v) for k, v in raw[2].items())
    keyed = []
    for item in raw[3]:
        if not isinstance(item, list) or len(item) != 3:
            raise WireFormatError(f"Expected [key, value, response_id] but got {item!r}")
        key, value = _leaf(item[0], item[1])
        if not key.startswith("costs/"):
            raise WireFormatError(f"Expected a costs/ key for a keyed cost but got {key!r}")
        keyed.append(KeyedCost(key, value, _str(item[2], "response_id")))
    digests = raw[4]
    if not isinstance(digests, bytes) or len(digests) % DIGEST_SIZE:
        raise WireFormatError(
            f"Expected scenario digests as bytes in multiples of {DIGEST_SIZE} "
            f"but got {type(digests).__name__} of length {len(digests)}"
        )
    samples = _samples(raw[5]) if len(raw) == 6 else {}
    return StepGroup(step, scope, sums, tuple(keyed), digests, samples)


def decode_batch(data: bytes) -> LeafBatch:
    """Parse and validate a batch; raise :class:`WireFormatError` on anything unexpected."""
    obj = _unpack(data, BATCH_MAGIC)
    version = obj[1]
    want = {1: 5, 2: 8, 3: 9}.get(version, 10)
    if len(obj) != want:
        raise WireFormatError(f"Expected {want} batch fields but got {len(obj)}")
    producer_id = _str(obj[2], "producer_id")
    seq = _int(obj[3], "seq", 1)
    incarnation, acked_upto, dropped = "", 0, 0
    lost: list[tuple[int, int, str, int]] = []
    if want >= 8:
        if not isinstance(obj[5], str):
            raise WireFormatError(f"Expected the incarnation as a str but got {obj[5]!r}")
        incarnation = obj[5]
        acked_upto = _int(obj[6], "acked_upto", 0)
        dropped = _int(obj[7], "dropped", 0)
    if want >= 9:
        lost = _lost(obj[8], acked_upto)
    raw_groups = obj[4]
    if not isinstance(raw_groups, list):
        raise WireFormatError(f"Expected a list of groups but got {raw_groups!r}")
    groups = [_group(raw) for raw in raw_groups]
    admitted = _decode_spend(obj[9], groups) if want == 10 else Decimal(0)
    return LeafBatch(
        producer_id,
        seq,
        tuple(groups),
        incarnation,
        acked_upto,
        dropped,
        tuple(lost),
        version,
        admitted,
    )


def batch_identity(data: object) -> tuple[str, str, int, int] | None:
    """``(producer_id, incarnation, seq, acked_upto)`` of a batch whose body may be invalid, or
    None when even that header is unreadable (lets the aggregator move a producer past a
    refused batch)."""
    try:
        obj = _unpack(data, BATCH_MAGIC)
        producer_id = _str(obj[2], "producer_id")
        seq = _int(obj[3], "seq", 1)
        v2 = obj[1] != 1 and len(obj) > 6
        incarnation = obj[5] if v2 else ""
        acked_upto = _int(obj[6], "acked_upto", 0) if v2 else 0
    except (WireFormatError, IndexError):
        return None
    if not isinstance(incarnation, str) or acked_upto >= seq:
        return None
    return producer_id, incarnation, seq, acked_upto


def encode_state(state: Mapping[str, Any]) -> bytes:
    """Serialise a state mapping (from ``AggregatorState.to_wire``)."""
    out: bytes = msgpack.packb([STATE_MAGIC, FORMAT_VERSION, dict(state)], use_bin_type=True)
    return out


def decode_state(data: bytes) -> dict[str, Any]:
    """Parse a snapshot envelope; the fields are checked by ``AggregatorState.from_wire``."""
    obj = _unpack(data, STATE_MAGIC)
    if len(obj) != 3 or not isinstance(obj[2], dict):
        raise WireFormatError("Expected a state snapshot ['arm-state', version, {...}]")
    return obj[2]
