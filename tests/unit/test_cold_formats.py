"""Golden bytes of the cold formats: what today's code wrote decodes the same and re-encodes
to the same bytes (pointer, manifest, blob header, rewind record, metadata map, state envelope,
batch, write-ahead-log record).

The hex below was written by the code of main at 0a4f551, before the formats were declared in
one place; a change that alters one byte of them breaks every stored run, so these must never be
regenerated, only extended with new versions.
"""

from __future__ import annotations

from decimal import Decimal

import msgpack
import pytest

from art_ray_metrics.core import rewind as R
from art_ray_metrics.core import wire as W
from art_ray_metrics.core.meta import (
    AggregatorMeta,
    LastRow,
    OutboxEntry,
    RewindEntry,
    RewoundTotals,
)
from art_ray_metrics.durable import checkpoint as C
from art_ray_metrics.durable import layout
from art_ray_metrics.durable.restore import encode_wal_record
from art_ray_metrics.errors import CheckpointCorruptError, WireFormatError
from art_ray_metrics.testing import make_batch

# fmt: off
POINTER = bytes.fromhex(
    "41524d43000101000000000000000045be3e945984a6666f726d617401a565706f636803a373657111a86d616e6966657374d9256d616e6966657374732f303030303030303030332d3030303030303030303031372e62696e"
)
POINTER_EMPTY = bytes.fromhex(
    "41524d4300010100000000000000001ffe9413b684a6666f726d617401a565706f636801a373657100a86d616e6966657374c0"
)
MANIFEST = bytes.fromhex(
    "41524d430001020000000000000000c34efd043f87a6666f726d617401a565706f636803a373657111a57374617465d92173746174652f303030303030303030332d3030303030303030303031372e62696ea673686172647382a97363656e6172696f7391d9307368617264732f7363656e6172696f732f303030303030303030332d3030303030303030303031372d4c30302e62696ea8636f73745f69647390a877616c5f6e65787405a470726576d9256d616e6966657374732f303030303030303030332d3030303030303030303031362e62696e"
)
REWIND = bytes.fromhex(
    "87a6666f726d617401a4737465700ca573706c6974a376616ca363756d82ad636f7374732f63756d2f616c6ca4312e3235b5646174612f63756d2f6163746f725f746f6b656e73a3383132ab6c6173745f636c6f73656482a5747261696e0ca46576616c0ba97363656e6172696f73c410000102030405060708090a0b0c0d0e0fa8636f73745f696473c400"
)
META = bytes.fromhex(
    "8fa666757475726501a66f7574626f78919404a5747261696e81a9636f7374732f616c6ccb3fe0000000000000b9323032362d30312d30325430333a30343a30352b30303a3030a96c6173745f726f777381a5747261696e920481a9636f7374732f616c6ccb3fe0000000000000a8726573746172747302a6726577696e64919304a5747261696ed92a726577696e642f3030303030303030303030342d747261696e2d3030303030303030303030392e62696eab726577696e645f64726f7091ac726577696e642f782e62696eac726577696e645f666c6f6f7201ac686973746f72795f64726f70919202a376616ca9636c6f73655f73657109a77265776f756e6483a7726577696e647301a5737465707302a9636f7374735f757364a4302e3735ac77616e64625f72756e5f6964a3616263b377616e64625f66696e69736865645f7570746f03a96770755f73696e6365cb3ff8000000000000ac626173656c696e655f63756d81ad636f7374732f63756d2f616c6ca3332e35a977616e64625f72756e81a26964a3616263"
)
STATE = bytes.fromhex(
    "93a961726d2d73746174650382a16101a16292c4020001a178"
)
BATCH = bytes.fromhex(
    "99a961726d2d626174636803a17001919502a5747261696e81ad636f7374732f747261696e2f78a4302e323590c400a0000090"
)
WAL_BLOB = bytes.fromhex(
    "41524d430001050000000000000000dc5e26741193c43399a961726d2d626174636803a17001919502a5747261696e81ad636f7374732f747261696e2f78a4302e323590c400a000009092c43399a961726d2d626174636803a17001919502a5747261696e81ad636f7374732f747261696e2f78a4302e323590c400a0000090a7696e76616c696494c43399a961726d2d626174636803a17001919502a5747261696e81ad636f7374732f747261696e2f78a4302e323590c400a0000090a77061727469616cc3919401a5747261696ead636f7374732f747261696e2f79b16d61785f6b6579735f7065725f73746570"
)
# fmt: on

POINTER_OBJ = layout.Pointer(epoch=3, seq=17, manifest="manifests/0000000003-000000000017.bin")
POINTER_EMPTY_OBJ = layout.Pointer(epoch=1, seq=0, manifest=None)
MANIFEST_OBJ = layout.Manifest(
    key="manifests/0000000003-000000000017.bin",
    epoch=3,
    seq=17,
    state="state/0000000003-000000000017.bin",
    shards={
        "scenarios": ["shards/scenarios/0000000003-000000000017-L00.bin"],
        "cost_ids": [],
    },
    wal_next=5,
    prev="manifests/0000000003-000000000016.bin",
)
REWIND_OBJ = R.RewindRecord(
    step=12,
    split="val",
    cum={"costs/cum/all": Decimal("1.25"), "data/cum/actor_tokens": Decimal("812")},
    last_closed={"train": 12, "eval": 11},
    scenarios=bytes(range(16)),
    cost_ids=b"",
)
META_OBJ = AggregatorMeta(
    outbox=[OutboxEntry(4, "train", {"costs/all": 0.5}, "2026-01-02T03:04:05+00:00")],
    last_rows={"train": LastRow(4, {"costs/all": 0.5})},
    restarts=2,
    wandb_run_id="abc",
    wandb_finished_upto=3,
    rewind=[RewindEntry(4, "train", "rewind/000000000004-train-000000000009.bin")],
    rewind_drop=["rewind/x.bin"],
    rewind_floor=1,
    history_drop=[(2, "val")],
    close_seq=9,
    rewound=RewoundTotals(1, 2, Decimal("0.75")),
    gpu_since=1.5,
    baseline_cum={"costs/cum/all": Decimal("3.5")},
    wandb_run={"id": "abc"},
    extra={"future": 1},
)
BATCH_OBJ = make_batch("p", 1, 2, "train", {"costs/train/x": 0.25})
WAL_ENTRIES = [
    (BATCH, None),
    (BATCH, "invalid"),
    (BATCH, (True, ((1, "train", "costs/train/y", "max_keys_per_step"),))),
]


class TestGoldenBytes:
    def test_pointer(self) -> None:
        for golden, obj in ((POINTER, POINTER_OBJ), (POINTER_EMPTY, POINTER_EMPTY_OBJ)):
            assert layout.decode_pointer(golden) == obj
            assert layout.encode_pointer(obj) == golden

    def test_manifest(self) -> None:
        assert layout.decode_manifest(MANIFEST_OBJ.key, MANIFEST) == MANIFEST_OBJ
        assert layout.encode_manifest(MANIFEST_OBJ) == MANIFEST

    def test_rewind_record(self) -> None:
        assert R.decode_record(REWIND) == REWIND_OBJ
        assert R.encode_record(REWIND_OBJ) == REWIND

    def test_meta(self) -> None:
        decoded = AggregatorMeta.from_dict(msgpack.unpackb(META, raw=False))
        assert decoded == META_OBJ
        assert msgpack.packb(decoded.to_dict(), use_bin_type=True) == META

    def test_state_envelope(self) -> None:
        assert W.decode_state(STATE) == {"a": 1, "b": [b"\x00\x01", "x"]}
        assert W.encode_state({"a": 1, "b": [b"\x00\x01", "x"]}) == STATE

    def test_batch(self) -> None:
        assert W.decode_batch(BATCH) == BATCH_OBJ
        assert W.encode_batch(W.decode_batch(BATCH)) == BATCH

    def test_wal_record_in_its_blob(self) -> None:
        payload = C.decode_blob("wal/0000000001-000000000000.bin", C.KIND_WAL, WAL_BLOB)
        assert payload == encode_wal_record(WAL_ENTRIES)
        assert C.encode_blob(C.KIND_WAL, payload) == WAL_BLOB


class TestEnvelopeErrors:
    """Every decoder names what was wrong with the same typed error it raised before."""

    @pytest.mark.parametrize(
        "data",
        [b"", b"\xc1", REWIND[:-3], msgpack.packb(["arm-state", 3, {}]), POINTER],
    )
    def test_rewind_record(self, data: bytes) -> None:
        with pytest.raises(WireFormatError):
            R.decode_record(data)

    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"\xc1",
            msgpack.packb(["arm-batch", 99, "p", 1, []]),
            msgpack.packb(["arm-state", 3, {}]),
            msgpack.packb({"format": 1}),
        ],
    )
    def test_batch(self, data: bytes) -> None:
        with pytest.raises(WireFormatError):
            W.decode_batch(data)

    def test_state_version(self) -> None:
        with pytest.raises(WireFormatError, match="Unknown arm-state format version 9"):
            W.decode_state(msgpack.packb(["arm-state", 9, {}]))

    @pytest.mark.parametrize(
        "payload",
        [
            b"\xc1",
            msgpack.packb([1, 2]),
            msgpack.packb({"format": 2, "epoch": 1, "seq": 1, "manifest": None}),
            msgpack.packb({"format": 1, "epoch": True, "seq": 1, "manifest": None}),
            msgpack.packb({"format": 1, "epoch": 1, "seq": 1, "manifest": 3}),
        ],
    )
    def test_pointer(self, payload: bytes) -> None:
        with pytest.raises(CheckpointCorruptError, match="CHECKPOINT"):
            layout.decode_pointer(C.encode_blob(C.KIND_POINTER, payload))

    def test_blob_header(self) -> None:
        with pytest.raises(CheckpointCorruptError, match="kind"):
            C.decode_blob("k", C.KIND_MANIFEST, POINTER)
        with pytest.raises(CheckpointCorruptError, match="CRC"):
            C.decode_blob("k", C.KIND_POINTER, POINTER[:-1] + b"x")


class TestEnvelopeDecoder:
    """core/wire.decode_envelope: the one place msgpack objects are unpacked and checked."""

    def test_map_envelope(self) -> None:
        data = msgpack.packb({"format": 2, "x": 1})
        assert W.decode_envelope(data, what="a thing", versions=(1, 2)) == {"format": 2, "x": 1}
        with pytest.raises(WireFormatError, match="Expected a thing in format 1 but got 2"):
            W.decode_envelope(data, what="a thing", versions=(1,))
        with pytest.raises(WireFormatError, match="a thing as a msgpack map"):
            W.decode_envelope(msgpack.packb([1]), what="a thing", versions=(1,))

    def test_array_envelope(self) -> None:
        data = msgpack.packb(["m", 1, "body"])
        assert W.decode_envelope(data, what="m", versions=(1,), magic="m") == ["m", 1, "body"]
        with pytest.raises(WireFormatError, match="Expected a 'n' message"):
            W.decode_envelope(data, what="n", versions=(1,), magic="n")

    @pytest.mark.parametrize("data", ["text", None, b"\x92\x01", b"\xc1"])
    def test_undecodable_is_the_typed_error_asked_for(self, data: object) -> None:
        with pytest.raises(CheckpointCorruptError, match="a thing"):
            W.decode_envelope(data, what="a thing", versions=(1,), error=CheckpointCorruptError)

    def test_a_corrupt_wal_record_is_named(self) -> None:
        from art_ray_metrics.durable.checkpoint import LoadedCheckpoint
        from art_ray_metrics.durable.restore import rebuild_state

        loaded = LoadedCheckpoint(state=b"", shards={}, epoch=0, seq=0, wal=[b"\xc1"])
        with pytest.raises(CheckpointCorruptError, match="write-ahead-log record"):
            rebuild_state(loaded)
