"""DigestLedger: an exact set of 16-byte digests kept in bounded sorted runs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from art_ray_metrics.core.dedupe import DIGEST_SIZE, RUN_SHARE, DigestLedger, digest
from art_ray_metrics.errors import WireFormatError
from tests.hypothesis_profiles import examples

_IDS = st.lists(st.lists(st.integers(0, 300), max_size=40), max_size=30)


def _bytes_of(ids: set[int]) -> bytes:
    return b"".join(sorted(digest(i) for i in ids))


class TestLedgerIsASet:
    @settings(max_examples=examples(200), deadline=None)
    @given(batches=_IDS, run_cap=st.sampled_from([1, 2, 5, 16, 1 << 20]))
    def test_matches_a_python_set(self, batches: list[list[int]], run_cap: int) -> None:
        """Any sequence of batches gives a set's counts, membership and canonical bytes."""
        ledger, seen = DigestLedger(run_cap), set()
        for batch in batches:
            new = set(batch) - seen
            assert ledger.add_many(digest(i) for i in batch) == len(new)
            seen |= new
            assert len(ledger) == len(seen)
        assert ledger.to_bytes() == _bytes_of(seen)
        for i in range(0, 301, 7):
            assert (digest(i) in ledger) is (i in seen)
        probe = [3, 250, 3, 0, 299, 17]
        assert ledger.contains_many([digest(i) for i in probe]) == [i in seen for i in probe]
        assert ledger.nbytes >= len(seen) * DIGEST_SIZE

    @settings(max_examples=examples(100), deadline=None)
    @given(batches=_IDS, cut=st.integers(0, 30))
    def test_journal_holds_exactly_what_is_new_since_the_commit(
        self, batches: list[list[int]], cut: int
    ) -> None:
        """Journal bytes before a commit plus after it are every digest, each once."""
        ledger = DigestLedger(run_cap=4)
        for batch in batches[:cut]:
            ledger.add_many(digest(i) for i in batch)
        first = ledger.journal_bytes()
        ledger.drop_journal(ledger.journal_position())
        for batch in batches[cut:]:
            ledger.add_many(digest(i) for i in batch)
        second = ledger.journal_bytes()
        assert len(first) + len(second) == len(ledger) * DIGEST_SIZE
        assert DigestLedger.from_bytes(first + second).to_bytes() == ledger.to_bytes()

    @settings(max_examples=examples(100), deadline=None)
    @given(batches=_IDS, removed=st.sets(st.integers(0, 300), max_size=50))
    def test_without_removes_exactly_those(
        self, batches: list[list[int]], removed: set[int]
    ) -> None:
        ledger = DigestLedger(run_cap=3)
        seen: set[int] = set()
        for batch in batches:
            ledger.add_many(digest(i) for i in batch)
            seen |= set(batch)
        rest = ledger.without(b"".join(digest(i) for i in removed))
        assert rest.to_bytes() == _bytes_of(seen - removed)
        assert len(rest) == len(seen - removed)
        assert rest.add_many(digest(i) for i in removed) == len(removed)  # all absent again


def _crafted(hi: int, lo: int) -> bytes:
    """A digest with chosen halves: many share the high half (the rare path of a search)."""
    return hi.to_bytes(8, "big") + lo.to_bytes(8, "big")


_HALVES = st.tuples(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 5))


class TestEqualHighHalves:
    @settings(max_examples=examples(300), deadline=None)
    @given(
        batches=st.lists(st.lists(_HALVES, max_size=12), max_size=12),
        removed=st.sets(_HALVES, max_size=6),
        run_cap=st.sampled_from([1, 3, 1 << 20]),
    )
    def test_digests_sharing_a_high_half_are_still_a_set(
        self, batches: list[list[tuple[int, int]]], removed: set[tuple[int, int]], run_cap: int
    ) -> None:
        """Runs compare high halves first; equal ones fall back to the low half, in order."""
        ledger, seen = DigestLedger(run_cap), set()
        for batch in batches:
            new = set(batch) - seen
            assert ledger.add_many(_crafted(*d) for d in batch) == len(new)
            seen |= new
        assert ledger.to_bytes() == b"".join(_crafted(*d) for d in sorted(seen))
        probes = [(hi, lo) for hi in (0, 1, 2**63, 2**64 - 1) for lo in range(7)]
        for d in probes:
            assert (_crafted(*d) in ledger) is (d in seen)
        assert ledger.contains_many([_crafted(*d) for d in reversed(probes)]) == [
            d in seen for d in reversed(probes)
        ]
        rest = ledger.without(b"".join(_crafted(*d) for d in removed))
        assert rest.to_bytes() == b"".join(_crafted(*d) for d in sorted(seen - removed))


class TestRuns:
    def test_runs_stay_logarithmic_and_capped(self) -> None:
        """Many small barriers: few runs, none merged beyond the cap, nothing lost."""
        ledger = DigestLedger(run_cap=1_000)
        rng = np.random.default_rng(7)
        for _ in range(300):
            ledger.add_bytes(rng.bytes(DIGEST_SIZE * 37))
        assert len(ledger) == 300 * 37
        sizes = [r.size for r in ledger._runs]
        assert max(sizes) <= 1_000
        # full runs (> cap / 2) plus a short tail of geometrically shrinking ones
        assert ledger.runs <= len(ledger) // 500 + 12
        every = ledger.to_bytes()
        assert len({every[i : i + 16] for i in range(0, len(every), 16)}) == len(ledger)

    def test_the_cap_grows_with_the_ledger_so_run_count_stays_bounded(self) -> None:
        """Past RUN_SHARE × run_cap ids, runs may hold 1/RUN_SHARE of the ledger: the number of
        runs (binary searches per barrier) stops growing with the ledger."""
        ledger = DigestLedger(run_cap=16)
        rng = np.random.default_rng(8)
        for _ in range(400):
            ledger.add_bytes(rng.bytes(DIGEST_SIZE * 25))
        assert len(ledger) == 400 * 25
        assert max(r.size for r in ledger._runs) <= len(ledger) // RUN_SHARE
        assert ledger.runs <= 2 * RUN_SHARE + 12  # with the fixed cap of 16 it would be ~600
        every = ledger.to_bytes()
        assert len({every[i : i + 16] for i in range(0, len(every), 16)}) == len(ledger)

    def test_a_restored_ledger_is_one_run_that_new_runs_never_merge_into(self) -> None:
        big = DigestLedger.from_bytes(b"".join(digest(i) for i in range(50)), run_cap=8)
        assert big.runs == 1
        assert big.journal_bytes() == b""
        for i in range(50, 80):
            assert big.add_many([digest(i), digest(i - 50)]) == 1
        assert big._runs[0].size == 50
        assert len(big) == 80

    def test_ragged_bytes_raise_and_change_nothing(self) -> None:
        ledger = DigestLedger()
        ledger.add_many([digest("a")])
        with pytest.raises(WireFormatError, match="multiple of 16 bytes"):
            ledger.add_bytes(b"x" * 17)
        with pytest.raises(WireFormatError, match="multiple of 16 bytes"):
            ledger.without(b"x" * 3)
        assert len(ledger) == 1
        assert ledger.to_bytes() == digest("a")

    def test_only_digest_sized_bytes_can_be_members(self) -> None:
        ledger = DigestLedger()
        ledger.add_many([digest("a")])
        assert digest("a")[:8] not in ledger
        assert "a" not in ledger
        assert DigestLedger().to_bytes() == b""


class TestJournal:
    @settings(max_examples=examples(50), deadline=None)
    @given(batches=_IDS)
    def test_no_journal_same_set_half_the_bytes(self, batches: list[list[int]]) -> None:
        """journal=False: the same set and bytes as a journaling ledger, 16 bytes per digest."""
        plain, journaled = DigestLedger(2, journal=False), DigestLedger(2)
        for batch in batches:
            assert plain.add_many(digest(i) for i in batch) == journaled.add_many(
                digest(i) for i in batch
            )
        assert plain.to_bytes() == journaled.to_bytes()
        assert plain.journal_bytes() == b""
        assert plain.nbytes == DIGEST_SIZE * len(plain)
        assert journaled.nbytes == 2 * DIGEST_SIZE * len(journaled)
        assert plain.without(_bytes_of({1})).journal_bytes() == b""

    def test_in_process_builder_keeps_16_bytes_per_id(self) -> None:
        """MetricsBuilder never checkpoints incrementally: its ledger holds no journal copy."""
        import asyncio

        from art_ray_metrics import MetricsBuilder

        builder = MetricsBuilder("train")
        for step in range(5):
            builder.add_data(scenario_ids=[f"s-{step}-{i}" for i in range(1000)])
            asyncio.run(builder.flush())
        ledger = builder._shared.cum.scenarios
        assert len(ledger) == 5000
        assert ledger.nbytes == DIGEST_SIZE * 5000
        restored = MetricsBuilder("train")
        restored.load_state_dict(builder.state_dict())
        restored.add_data(scenario_ids=["new"])
        row = asyncio.run(restored.flush())
        assert row["data/cum/num_unique_scenarios"] == 5001
        assert restored._shared.cum.scenarios.nbytes == DIGEST_SIZE * 5001
