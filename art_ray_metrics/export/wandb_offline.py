"""Read back the ``run-<id>.wandb`` files of W&B runs (W&B 0.31 ships no reader).

Used by the W&B sink (to find an offline run's directory and wait for its exit record) and by
tests (to compare what an offline run recorded with the JSONL history).

File format (checked against files written by wandb 0.31.0 in offline mode)
--------------------------------------------------------------------------
The file is a LevelDB-style log of 32 KiB blocks:

* a 7-byte file header at offset 0: ident ``b":W&B"``, magic ``0xBEE1`` (uint16 little-endian,
  bytes ``e1 be``) and a version byte (``0``);
* then records, each a 7-byte header followed by ``length`` payload bytes::

      crc32 (uint32 LE) | length (uint16 LE) | type (uint8) | payload

  ``crc32`` is the IEEE CRC-32 (``zlib.crc32``, not CRC-32C as in LevelDB) of the type byte
  followed by the payload, unmasked. Types: ``1`` FULL, ``2`` FIRST, ``3`` MIDDLE, ``4`` LAST;
  a logical record larger than what is left of a block is split FIRST, MIDDLE..., LAST;
* a record header never straddles a block: if fewer than 7 bytes remain in a block they are
  zero padding and the next record starts at the next block (the header counts toward block 0).

Each logical record is a serialised ``wandb.proto.wandb_internal_pb2.Record``. History records
hold ``item``\\ s with either ``key`` or ``nested_key`` (path components, joined with ``.`` like
W&B flattens nested dicts; our "/" keys arrive as one component) and ``value_json``.

``Run.finish()`` can return before wandb-core has flushed the file (seen with 0.31.0 offline:
right after ``finish`` the file held only its header about once in 30 runs); a complete run
ends with an ``exit`` record, which :func:`wait_for_exit_record` polls for.

Run directories are named ``[offline-]run-<YYYYmmdd_HHMMSS>-<id>`` under ``<dir>/wandb/``; a
second directory started in the same second gets a ``-<n>`` suffix. A resumed offline run
therefore has one directory (and one ``.wandb`` file) per attach.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from art_ray_metrics.errors import WireFormatError

__all__ = [
    "BLOCK_SIZE",
    "FILE_HEADER",
    "find_offline_run_files",
    "iter_records",
    "offline_run_dir",
    "offline_sync_command",
    "read_offline_history",
    "read_offline_metric_definitions",
    "read_offline_run",
    "read_offline_summary",
    "wait_for_exit_record",
]

log = logging.getLogger(__name__)

BLOCK_SIZE = 32 * 1024
FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_RECORD_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_DIR_RE = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-(.+)")


def _iter_payloads(data: bytes, name: str) -> Iterator[bytes]:
    """Yield the logical record payloads of one log file's bytes."""
    if data[: len(FILE_HEADER)] != FILE_HEADER:
        raise WireFormatError(
            f"Expected the W&B header {FILE_HEADER!r} in {name} but got {data[:7]!r}"
        )
    pos = len(FILE_HEADER)
    pieces: list[bytes] | None = None
    size = len(data)
    while pos < size:
        left = BLOCK_SIZE - pos % BLOCK_SIZE
        if left < _RECORD_HEADER.size:
            pos += left  # trailer padding
            continue
        if pos + _RECORD_HEADER.size > size:
            log.warning("%s: truncated record header at offset %d", name, pos)
            return
        crc, length, rtype = _RECORD_HEADER.unpack_from(data, pos)
        if rtype == 0 and length == 0:  # zero-filled rest of block
            pos += left
            continue
        start = pos + _RECORD_HEADER.size
        end = start + length
        if end > size:
            log.warning("%s: truncated record at offset %d (a run still writing?)", name, pos)
            return
        payload = data[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes([rtype]))) != crc:
            raise WireFormatError(
                f"Expected CRC {crc:#010x} for the record at offset {pos} of {name} "
                f"but got {zlib.crc32(bytes([rtype]) + payload):#010x}"
            )
        pos = end
        if rtype == _FULL:
            if pieces is not None:
                raise WireFormatError(f"Expected LAST before FULL at offset {start} of {name}")
            yield payload
        elif rtype == _FIRST:
            if pieces is not None:
                raise WireFormatError(f"Expected LAST before FIRST at offset {start} of {name}")
            pieces = [payload]
        elif rtype in (_MIDDLE, _LAST):
            if pieces is None:
                raise WireFormatError(
                    f"Expected FIRST before record type {rtype} at offset {start} of {name}"
                )
            pieces.append(payload)
            if rtype == _LAST:
                yield b"".join(pieces)
                pieces = None
        else:
            raise WireFormatError(
                f"Expected record type 1..4 at offset {pos - length - 7} of {name} "
                f"but got {rtype!r}"
            )
    if pieces is not None:
        log.warning("%s: file ends inside a fragmented record", name)


def _resolve_files(run_dir_or_file: str | Path) -> list[Path]:
    path = Path(run_dir_or_file)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if files:
            return files
    raise FileNotFoundError(f"Expected a run-<id>.wandb file or a run directory but got {path!r}")


def iter_records(run_dir_or_file: str | Path) -> Iterator[Any]:
    """Yield every ``wandb_internal_pb2.Record`` of a run file (or run directory) in order.

    Raises:
        FileNotFoundError: No ``.wandb`` file there.
        WireFormatError: Bad header, CRC mismatch or malformed fragments.
    """
    # the generated module picks a protobuf-version variant at import; mypy cannot see it
    pb: Any = importlib.import_module("wandb.proto.wandb_internal_pb2")
    for file in _resolve_files(run_dir_or_file):
        for payload in _iter_payloads(file.read_bytes(), str(file)):
            record = pb.Record()
            try:
                record.ParseFromString(payload)
            except Exception as exc:  # protobuf's DecodeError
                raise WireFormatError(
                    f"Expected a wandb Record in {file} but got {payload[:40]!r}"
                ) from exc
            yield record


def _item_key(item: Any) -> str:
    return str(item.key) if item.key else ".".join(item.nested_key)


def read_offline_history(run_dir_or_file: str | Path) -> list[dict[str, Any]]:
    """Return the history rows of a run file, one dict per ``run.log`` call, in file order.

    Values are decoded from ``value_json``; W&B's own keys (``_step``, ``_runtime``,
    ``_timestamp``) are kept.
    """
    rows: list[dict[str, Any]] = []
    for record in iter_records(run_dir_or_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
    return rows


def read_offline_summary(run_dir_or_file: str | Path) -> dict[str, Any]:
    """Return the run summary after applying every summary record's updates and removes."""
    summary: dict[str, Any] = {}
    for record in iter_records(run_dir_or_file):
        if record.WhichOneof("record_type") != "summary":
            continue
        for item in record.summary.update:
            summary[_item_key(item)] = json.loads(item.value_json)
        for item in record.summary.remove:
            summary.pop(_item_key(item), None)
    return summary


def read_offline_metric_definitions(run_dir_or_file: str | Path) -> list[dict[str, Any]]:
    """Return the ``define_metric`` records, in order, as plain dicts.

    Each dict has ``name`` or ``glob_name``, ``step_metric`` (``""`` if none) and ``summary``
    (the sorted names of the enabled summary operations).
    """
    out: list[dict[str, Any]] = []
    for record in iter_records(run_dir_or_file):
        if record.WhichOneof("record_type") != "metric":
            continue
        metric = record.metric
        summary = sorted(
            op
            for op in ("min", "max", "mean", "last", "best", "copy", "none", "first")
            if getattr(metric.summary, op, False)
        )
        entry: dict[str, Any] = {"step_metric": metric.step_metric, "summary": summary}
        if metric.glob_name:
            entry["glob_name"] = metric.glob_name
        else:
            entry["name"] = metric.name
        out.append(entry)
    return out


def read_offline_run(run_dir_or_file: str | Path) -> dict[str, Any]:
    """Return the run's identity and config: ``run_id``, ``project``, ``entity``,
    ``display_name`` (from the ``run`` record) and ``config`` (the run record's config with
    every later ``config`` record's updates and removes applied; W&B's own ``_wandb`` key
    left out)."""
    out: dict[str, Any] = {"config": {}}
    config: dict[str, Any] = out["config"]
    for record in iter_records(run_dir_or_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(
                run_id=run.run_id,
                project=run.project,
                entity=run.entity,
                display_name=run.display_name,
            )
            updates, removes = run.config.update, run.config.remove
        elif kind == "config":
            updates, removes = record.config.update, record.config.remove
        else:
            continue
        for item in updates:
            config[_item_key(item)] = json.loads(item.value_json)
        for item in removes:
            config.pop(_item_key(item), None)
    config.pop("_wandb", None)
    return out


def _sort_key(path: Path) -> tuple[str, int, str]:
    run_dir = path.parent.name
    run_id = path.name[len("run-") : -len(".wandb")]
    match = _DIR_RE.fullmatch(run_dir)
    if match is None:
        return ("", 0, run_dir)
    stamp, rest = match.groups()
    suffix = rest[len(run_id) :] if rest.startswith(run_id) else ""
    counter = int(suffix[1:]) if suffix[:1] == "-" and suffix[1:].isdigit() else 0
    return (stamp, counter, run_dir)


def find_offline_run_files(wandb_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Return the ``run-<id>.wandb`` files under ``wandb_dir``, oldest first.

    Args:
        wandb_dir: The ``dir=`` given to ``wandb.init`` or its ``wandb/`` subdirectory.
        run_id: Only files of this run (a resumed offline run has one file per attach).
    """
    root = Path(wandb_dir)
    roots = [root, root / "wandb"] if (root / "wandb").is_dir() else [root]
    pattern = f"run-{run_id}.wandb" if run_id is not None else "run-*.wandb"
    found: list[Path] = []
    for base in roots:
        for run_dir in base.iterdir():
            if run_dir.is_symlink() or not run_dir.is_dir():  # skip latest-run
                continue
            if _DIR_RE.fullmatch(run_dir.name) is None:
                continue
            found.extend(p for p in run_dir.glob(pattern) if p.is_file())
    return sorted(found, key=_sort_key)


def offline_run_dir(run: Any) -> Path | None:
    """The directory of an offline run's ``.wandb`` file, or None (online, or unknown).

    ``run`` is a ``wandb`` run object; its ``dir`` is the ``files/`` directory inside the run
    directory.
    """
    try:
        if getattr(run, "offline", False):
            return Path(run.dir).parent
    except Exception:  # a run object without these attributes: nothing to wait for
        return None
    return None


def wait_for_exit_record(
    run_dir_or_file: str | Path, timeout_s: float = 10.0, poll_s: float = 0.02
) -> bool:
    """Poll until the run file holds its ``exit`` record (the run was finished and flushed).

    Returns:
        Whether the record appeared within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in iter_records(run_dir_or_file)):
                return True
        except (FileNotFoundError, WireFormatError):  # not created or header not flushed yet
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def offline_sync_command(wandb_dir: str | Path, run_id: str | None = None) -> str:
    """The ``wandb sync`` command that uploads the offline run written under ``wandb_dir``.

    >>> offline_sync_command("/nonexistent/run")
    'wandb sync /nonexistent/run/wandb/offline-run-*'
    """
    root = Path(wandb_dir)
    files = find_offline_run_files(root, run_id) if root.is_dir() else []
    target = files[-1].parent if files else root / "wandb" / "offline-run-*"
    return f"wandb sync {target}"
