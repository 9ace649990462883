"""Exact distinct counting of scenario ids (and paid response ids) in 16 bytes per id.

OpenPipe ART keeps every scenario id as a Python ``str`` in a ``set`` (about 128 bytes per id).
We keep a **128-bit BLAKE2b digest** of ``str(id)``, in sorted NumPy runs of two ``uint64``
columns (the digest's big-endian halves: searches compare machine words, not byte strings):

- **Exact for every practical run.** Two different ids count as one only if their 128-bit
  digests collide. By the birthday bound the chance of any collision among ``n`` ids is at most
  ``n² / 2¹²⁹``: 1.5e-21 at 1e9 ids and 1.5e-15 at 4e13 ids. The same id always has the same
  digest, so it never counts twice, whichever worker, step, retry or restart sends it.
- **16 bytes per id** resident and serialised (raw digests, no framing).
- **Cheap to grow at any size.** Digests live in disjoint sorted *runs*. A barrier's new
  digests become a new run; runs of similar size are merged, but never into a run of more than
  ``max(RUN_CAP, len / RUN_SHARE)`` digests. So each digest is copied
  O(log) times, a barrier never copies the whole history, a merge needs at most 32 MiB or
  1/8 of the ledger's bytes of scratch, and a lookup searches a few dozen runs at any size.
- **Incremental.** Digests added since the last checkpoint are kept in a journal; a checkpoint
  writes only those (:meth:`DigestLedger.journal_bytes`) and acknowledges them by position
  (:meth:`DigestLedger.drop_journal`), so a failed checkpoint loses nothing. A ledger that is
  never checkpointed incrementally (the in-process builder's) is made with ``journal=False``
  and keeps no second copy.

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

from art_ray_metrics.errors import WireFormatError

__all__ = ["DIGEST_SIZE", "DigestLedger", "digest", "split_digests"]

DIGEST_SIZE = 16
_BE = np.dtype(">u8")
_U64 = npt.NDArray[np.uint64]
RUN_CAP = 1 << 20
"""A merged run holds at most ``max(RUN_CAP, len(ledger) // RUN_SHARE)`` digests."""
RUN_SHARE = 16
"""Past ``RUN_SHARE × RUN_CAP`` digests, runs may hold this share of the ledger (see above)."""


def digest(value: object) -> bytes:
    """Return the 16-byte BLAKE2b digest of ``str(value)`` (ids compare as strings, as in ART).

    >>> digest(7) == digest("7"), len(digest("scenario-1"))
    (True, 16)
    """
    return hashlib.blake2b(str(value).encode("utf-8"), digest_size=DIGEST_SIZE).digest()


def _check_length(data: bytes) -> None:
    if len(data) % DIGEST_SIZE:
        raise WireFormatError(
            f"Expected a multiple of {DIGEST_SIZE} bytes of digests but got {len(data)} bytes"
        )


def split_digests(data: bytes) -> list[bytes]:
    """Split concatenated digests; raise :class:`WireFormatError` on a ragged length."""
    _check_length(data)
    return [data[i : i + DIGEST_SIZE] for i in range(0, len(data), DIGEST_SIZE)]


class _Run:
    """Digests sorted and unique, as two native ``uint64`` columns: the big-endian high and low
    halves, so numeric ``(hi, lo)`` order is the digests' byte order and searches compare
    machine words."""

    __slots__ = ("hi", "lo")

    def __init__(self, hi: _U64, lo: _U64) -> None:
        self.hi = hi
        self.lo = lo

    @property
    def size(self) -> int:
        return int(self.hi.size)

    @property
    def nbytes(self) -> int:
        return int(self.hi.nbytes + self.lo.nbytes)

    @classmethod
    def unsorted(cls, data: bytes) -> _Run:
        """Concatenated digests as columns, in their order (a probe for :meth:`locate`)."""
        pairs = np.frombuffer(data, dtype=_BE).reshape(-1, 2)
        return cls(pairs[:, 0].astype(np.uint64), pairs[:, 1].astype(np.uint64))

    @classmethod
    def from_bytes(cls, data: bytes) -> _Run:
        """Sorted unique run of concatenated digests (any order, repeats allowed)."""
        probe = cls.unsorted(data)
        hi, lo = probe.hi, probe.lo
        order = np.lexsort((lo, hi))
        hi, lo = hi[order], lo[order]
        if hi.size > 1:
            keep = np.empty(hi.size, dtype=bool)
            keep[0] = True
            np.not_equal(hi[1:], hi[:-1], out=keep[1:])
            keep[1:] |= lo[1:] != lo[:-1]
            hi, lo = hi[keep], lo[keep]
        return cls(hi, lo)

    def to_bytes(self) -> bytes:
        pairs = np.empty((self.size, 2), dtype=_BE)
        pairs[:, 0] = self.hi
        pairs[:, 1] = self.lo
        return pairs.tobytes()

    def select(self, mask: npt.NDArray[np.bool_]) -> _Run:
        return _Run(self.hi[mask], self.lo[mask])

    def locate(self, other: _Run) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """For each digest of ``other`` (in any order): its insertion index here, and whether
        it is here."""
        hi, lo = self.hi, self.lo
        if hi.size == 0:
            return np.zeros(other.size, dtype=np.intp), np.zeros(other.size, dtype=bool)
        pos = np.searchsorted(hi, other.hi)
        inside = pos < hi.size
        same_hi = np.zeros(other.size, dtype=bool)
        same_hi[inside] = hi[pos[inside]] == other.hi[inside]
        found = same_hi.copy()
        found[same_hi] = lo[pos[same_hi]] == other.lo[same_hi]
        # equal high halves and a smaller low half: walk the (vanishingly rare) equal-hi block
        for k in np.flatnonzero(same_hi & ~found & (lo[np.minimum(pos, hi.size - 1)] < other.lo)):
            h, low, i = other.hi[k], other.lo[k], int(pos[k])
            while i < hi.size and hi[i] == h and lo[i] < low:
                i += 1
            pos[k] = i
            found[k] = i < hi.size and hi[i] == h and lo[i] == low
        return pos, found


def _merged(a: _Run, b: _Run) -> _Run:
    """One run of two disjoint runs (the larger is copied once)."""
    if a.size < b.size:
        a, b = b, a
    pos, _ = a.locate(b)
    return _Run(np.insert(a.hi, pos, b.hi), np.insert(a.lo, pos, b.lo))


class DigestLedger:
    """A run-wide exact set of 16-byte digests with an incremental journal.

    ``run_cap`` replaces :data:`RUN_CAP` as the floor of the merge cap (tests use small values).
    With ``journal=False`` nothing is journaled (:meth:`journal_bytes` stays empty): 16 bytes per
    digest instead of 32 until a checkpoint drops the journal.
    """

    __slots__ = ("_journal", "_journaling", "_run_cap", "_runs", "_size")

    def __init__(self, run_cap: int = RUN_CAP, *, journal: bool = True) -> None:
        self._runs: list[_Run] = []  # disjoint
        self._size = 0
        self._run_cap = run_cap
        self._journal: list[bytes] = []
        self._journaling = journal

    def __len__(self) -> int:
        return self._size

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, bytes) or len(item) != DIGEST_SIZE:
            return False
        hi, lo = int.from_bytes(item[:8], "big"), int.from_bytes(item[8:], "big")
        key = np.uint64(hi)
        for run in self._runs:  # scalar searches: cheaper than array set-up for one digest
            i = int(np.searchsorted(run.hi, key))
            while i < run.size and int(run.hi[i]) == hi:
                if int(run.lo[i]) == lo:
                    return True
                i += 1
        return False

    def contains_many(self, digests: list[bytes]) -> list[bool]:
        """Membership of each 16-byte digest, in order (one vectorised search per run)."""
        if not digests or not self._runs:
            return [False] * len(digests)
        data = b"".join(digests)
        if len(data) != DIGEST_SIZE * len(digests):
            raise WireFormatError(f"Expected {DIGEST_SIZE}-byte digests")
        probe = _Run.unsorted(data)
        found = np.zeros(len(digests), dtype=bool)
        for run in self._runs:
            found |= run.locate(probe)[1]
        return [bool(f) for f in found]

    @property
    def nbytes(self) -> int:
        """Resident bytes: the runs plus the journal of digests not yet checkpointed."""
        return sum(run.nbytes for run in self._runs) + sum(len(j) for j in self._journal)

    @property
    def runs(self) -> int:
        """How many sorted runs hold the digests."""
        return len(self._runs)

    def add_many(self, digests: Iterable[bytes]) -> int:
        """Add digests; return how many were new."""
        return self.add_bytes(b"".join(digests))

    def add_bytes(self, data: bytes) -> int:
        """Add concatenated digests (the serialised form); return how many were new."""
        _check_length(data)
        return self._merge(_Run.from_bytes(data)) if data else 0

    def _merge(self, new: _Run) -> int:
        for run in self._runs:
            if new.size == 0:
                return 0
            _, found = run.locate(new)
            if found.any():
                new = new.select(~found)
        if new.size == 0:
            return 0
        if self._journaling:
            self._journal.append(new.to_bytes())
        self._size += new.size
        self._runs.append(new)
        self._compact()
        return new.size

    def _compact(self) -> None:
        """Merge two runs of the same size class (sizes within 2×) while the result fits the
        cap. The cap grows with the ledger, so runs that filled an earlier cap merge again
        later: the number of runs stays bounded (about ``2 × RUN_SHARE`` full runs plus one
        per size class below), and each merge moves its digests up at least one size class, so a
        digest is copied at most log2(len) times."""
        runs = self._runs
        cap = max(self._run_cap, self._size // RUN_SHARE)
        while True:
            smallest: dict[int, int] = {}  # size class -> index of its smallest run
            pair = None
            for i in sorted(range(len(runs)), key=lambda k: runs[k].size):
                size_class = runs[i].size.bit_length()
                j = smallest.get(size_class)
                if j is None:
                    smallest[size_class] = i
                elif runs[i].size + runs[j].size <= cap:
                    pair = (j, i)
                    break
            if pair is None:
                return
            j, i = pair
            merged = _merged(runs[j], runs[i])
            self._runs = runs = [r for k, r in enumerate(runs) if k not in pair] + [merged]

    def to_bytes(self) -> bytes:
        """Serialise every digest (sorted, 16 bytes each: equal sets give equal bytes)."""
        if not self._runs:
            return b""
        if len(self._runs) == 1:
            return self._runs[0].to_bytes()
        hi = np.concatenate([r.hi for r in self._runs])
        lo = np.concatenate([r.lo for r in self._runs])
        order = np.lexsort((lo, hi))
        return _Run(hi[order], lo[order]).to_bytes()

    @classmethod
    def from_bytes(
        cls, data: bytes, run_cap: int = RUN_CAP, *, journal: bool = True
    ) -> DigestLedger:
        """Rebuild from serialised digests (any order, repeats allowed); the journal starts empty.

        The digests form one run, however large; it merges again only once the ledger has grown
        far past it (the merge cap is a share of the ledger).
        """
        ledger = cls(run_cap, journal=journal)
        ledger.add_bytes(data)
        ledger._journal.clear()
        return ledger

    def without(self, removed: bytes) -> DigestLedger:
        """A new ledger of these digests minus ``removed`` (concatenated).

        The journal is kept as it is: digests added since the last checkpoint must still be
        written, because the caller writes the removal as a tombstone (an add and its tombstone
        cancel out; a tombstone without its add would cancel a later re-add).

        Raises:
            WireFormatError: ``removed`` is not a multiple of 16 bytes.
        """
        _check_length(removed)
        ledger = DigestLedger(self._run_cap, journal=self._journaling)
        gone = _Run.from_bytes(removed)
        runs = self._runs
        if gone.size:
            runs = [run.select(~gone.locate(run)[1]) for run in runs]
        ledger._runs = [run for run in runs if run.size]
        ledger._size = sum(run.size for run in ledger._runs)
        ledger._journal = list(self._journal)
        return ledger

    def journal_position(self) -> int:
        """How many journal entries exist now (pass it to :meth:`drop_journal` after a commit)."""
        return len(self._journal)

    def journal_bytes(self, upto: int | None = None) -> bytes:
        """The digests added since the last :meth:`drop_journal`, as serialised bytes."""
        return b"".join(self._journal if upto is None else self._journal[:upto])

    def drop_journal(self, upto: int) -> None:
        """Forget journal entries ``[:upto]`` once a checkpoint holding them is committed."""
        del self._journal[:upto]
