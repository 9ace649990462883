"""Exact distinct counting of scenario ids (and paid response ids) in 16 bytes per id.

OpenPipe ART keeps every scenario id as a Python ``str`` in a ``set`` (about 128 bytes per id).
We keep a **128-bit BLAKE2b digest** of ``str(id)`` in one sorted NumPy array of ``S16``:

- **Exact for every practical run.** Two different ids count as one only if their 128-bit
  digests collide. By the birthday bound the chance of any collision among ``n`` ids is at most
  ``n² / 2¹²⁹``: 1.5e-21 at 1e9 ids and 1.5e-15 at 4e13 ids. The same id always has the same
  digest, so it never counts twice, whichever worker, step, retry or restart sends it.
- **16 bytes per id** resident (the array) and serialised (raw digests, no framing).
- **Incremental.** Digests added since the last checkpoint are kept in a journal; a checkpoint
  writes only those (:meth:`DigestLedger.journal_bytes`) and acknowledges them by position
  (:meth:`DigestLedger.drop_journal`), so a failed checkpoint loses nothing.

Serialised form: the concatenation of 16-byte digests in any order, possibly with repeats. The
concatenation of two serialised ledgers is a valid serialised ledger of their union, which is
what lets checkpoint shards be written once and merged by plain concatenation.

>>> ledger = DigestLedger()
>>> ledger.add_many([digest("a"), digest("b")])
2
>>> ledger.add_many([digest("b"), digest("c")])
1
>>> len(ledger), digest("c") in ledger, digest("z") in ledger
(3, True, False)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from .errors import WireFormatError

__all__ = ["DIGEST_SIZE", "DigestLedger", "digest", "split_digests"]

DIGEST_SIZE = 16
_DTYPE = np.dtype(f"S{DIGEST_SIZE}")
_Array = npt.NDArray[np.bytes_]


def digest(value: object) -> bytes:
    """Return the 16-byte BLAKE2b digest of ``str(value)`` (ids compare as strings, as in ART).

    >>> digest(7) == digest("7"), len(digest("scenario-1"))
    (True, 16)
    """
    return hashlib.blake2b(str(value).encode("utf-8"), digest_size=DIGEST_SIZE).digest()


def split_digests(data: bytes) -> list[bytes]:
    """Split concatenated digests; raise :class:`WireFormatError` on a ragged length."""
    if len(data) % DIGEST_SIZE:
        raise WireFormatError(
            f"Expected a multiple of {DIGEST_SIZE} bytes of digests but got {len(data)} bytes"
        )
    return [data[i : i + DIGEST_SIZE] for i in range(0, len(data), DIGEST_SIZE)]


def _sorted_unique(arr: _Array) -> _Array:
    if arr.size == 0:
        return arr
    arr = np.sort(arr)
    keep = np.empty(arr.size, dtype=bool)
    keep[0] = True
    np.not_equal(arr[1:], arr[:-1], out=keep[1:])
    return arr[keep]


class DigestLedger:
    """A run-wide exact set of 16-byte digests with an incremental journal."""

    __slots__ = ("_journal", "_sorted")

    def __init__(self) -> None:
        self._sorted: _Array = np.empty(0, dtype=_DTYPE)
        self._journal: list[_Array] = []

    def __len__(self) -> int:
        return int(self._sorted.size)

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, bytes) or len(item) != DIGEST_SIZE or self._sorted.size == 0:
            return False
        i = int(np.searchsorted(self._sorted, np.array(item, dtype=_DTYPE)))
        return i < self._sorted.size and bytes(self._sorted[i]).ljust(DIGEST_SIZE, b"\0") == item

    @property
    def nbytes(self) -> int:
        """Resident bytes of the digest array (the journal holds slices of new digests)."""
        return int(self._sorted.nbytes) + sum(int(a.nbytes) for a in self._journal)

    def add_many(self, digests: Iterable[bytes]) -> int:
        """Add digests; return how many were new."""
        items = list(digests)
        if not items:
            return 0
        return self._merge(np.array(items, dtype=_DTYPE))

    def add_bytes(self, data: bytes) -> int:
        """Add concatenated digests (the serialised form); return how many were new."""
        if len(data) % DIGEST_SIZE:
            raise WireFormatError(
                f"Expected a multiple of {DIGEST_SIZE} bytes of digests but got {len(data)} bytes"
            )
        if not data:
            return 0
        return self._merge(np.frombuffer(data, dtype=_DTYPE).copy())

    def _merge(self, arr: _Array) -> int:
        new = _sorted_unique(arr)
        base = self._sorted
        if base.size:
            idx = np.searchsorted(base, new)
            found = np.zeros(new.size, dtype=bool)
            inside = idx < base.size
            found[inside] = base[idx[inside]] == new[inside]
            new, idx = new[~found], idx[~found]
            if new.size == 0:
                return 0
            self._sorted = np.insert(base, idx, new)
        else:
            self._sorted = new
        self._journal.append(new)
        return int(new.size)

    def to_bytes(self) -> bytes:
        """Serialise every digest (sorted, 16 bytes each)."""
        return self._sorted.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> DigestLedger:
        """Rebuild from serialised digests (any order, repeats allowed); the journal starts empty."""
        ledger = cls()
        ledger.add_bytes(data)
        ledger._journal.clear()
        return ledger

    def without(self, removed: bytes) -> DigestLedger:
        """A new ledger of these digests minus ``removed`` (concatenated); its journal is empty.

        Raises:
            WireFormatError: ``removed`` is not a multiple of 16 bytes.
        """
        if len(removed) % DIGEST_SIZE:
            raise WireFormatError(
                f"Expected a multiple of {DIGEST_SIZE} bytes of digests but got "
                f"{len(removed)} bytes"
            )
        ledger = DigestLedger()
        gone = np.frombuffer(removed, dtype=_DTYPE)
        ledger._sorted = self._sorted[~np.isin(self._sorted, gone)] if gone.size else self._sorted
        return ledger

    def journal_position(self) -> int:
        """How many journal entries exist now (pass it to :meth:`drop_journal` after a commit)."""
        return len(self._journal)

    def journal_bytes(self, upto: int | None = None) -> bytes:
        """The digests added since the last :meth:`drop_journal`, as serialised bytes."""
        parts = self._journal if upto is None else self._journal[:upto]
        return b"".join(a.tobytes() for a in parts)

    def drop_journal(self, upto: int) -> None:
        """Forget journal entries ``[:upto]`` once a checkpoint holding them is committed."""
        del self._journal[:upto]
