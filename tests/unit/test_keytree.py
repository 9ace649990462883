"""The one leaf/ancestor rule (core/keytree.py): every place that holds leaves agrees with it.

Callers: the pending leaves of the in-process builder and the ART adapter, the worker client's
key registries (reached through ``WorkerBuilder``), and the aggregator's step buffer (strict:
a trainer's own keys; lenient: two producers' keys, resolved into ``unattributed``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from art_ray_metrics import MetricConflictError, MetricsBuilder
from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core import keytree
from art_ray_metrics.core.buffer import UNATTRIBUTED, StepBuffer
from art_ray_metrics.core.tape import KeyRegistries, PendingLeaves
from art_ray_metrics.distributed.client import MetricsClient
from art_ray_metrics.distributed.record import WorkerBuilder
from tests.hypothesis_profiles import examples

_KEYS = st.builds(
    lambda section, rest: "/".join([section, *rest]),
    st.sampled_from(["costs", "reward"]),
    st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4),
)

_STEPS = itertools.count(1)


def _reference(keys: list[str]) -> list[bool]:
    """The rule written naively: a key is refused when it is a proper ancestor below the
    section of an accepted leaf, or has one among its own ancestors."""
    leaves: set[str] = set()
    decisions = []
    for key in keys:
        parts = key.split("/")
        above = {"/".join(parts[:i]) for i in range(2, len(parts))}
        ok = not (above & leaves) and not any(leaf.startswith(key + "/") for leaf in leaves)
        if ok:
            leaves.add(key)
        decisions.append(ok)
    return decisions


def _decisions(record: Callable[[str], object], keys: list[str]) -> list[str | None]:
    """Per key: None (accepted) or the conflict's message."""
    out: list[str | None] = []
    for key in keys:
        try:
            record(key)
        except MetricConflictError as exc:
            out.append(str(exc))
        else:
            out.append(None)
    return out


@pytest.fixture(scope="module")
def client() -> Iterator[MetricsClient]:
    """A client that never ships (no aggregator is needed)."""
    c = MetricsClient(ClientConfig(flush_interval_s=1e6, max_batch_leaves=10**9))
    yield c
    c.stopped.set()


class TestEveryCallerAgrees:
    @settings(max_examples=examples(300), deadline=None)
    @given(st.lists(_KEYS, max_size=30))
    def test_same_accept_and_refuse_on_the_same_keys(
        self, client: MetricsClient, keys: list[str]
    ) -> None:
        pending, buffer, registries = PendingLeaves(), StepBuffer(), KeyRegistries()
        builder = MetricsBuilder("train")
        worker = WorkerBuilder(client, next(_STEPS), "train", "train")
        callers: dict[str, Callable[[str], object]] = {
            "PendingLeaves.record": lambda k: pending.record(k, 1),
            "StepBuffer.add": lambda k: buffer.add(k, Decimal(1)),
            "KeyRegistries.register": lambda k: registries.register((0, "train"), k),
            "MetricsBuilder.add_metric": lambda k: builder.add_metric(k, 1),
            "WorkerBuilder.add_metric": lambda k: worker.add_metric(k, 1),
        }
        results = {name: _decisions(record, keys) for name, record in callers.items()}
        expected = results.pop("PendingLeaves.record")
        for name, got in results.items():
            assert got == expected, name
        assert [d is None for d in expected] == _reference(keys)

    @settings(max_examples=examples(300), deadline=None)
    @given(st.lists(st.tuples(_KEYS, st.integers(1, 9)), max_size=30))
    def test_lenient_step_buffer_keeps_every_value_and_no_clash(
        self, writes: list[tuple[str, int]]
    ) -> None:
        """Two producers' keys clash in the aggregator: nothing is refused or lost, and the
        buffer's leaves obey the rule (a clash moves a value to ``unattributed``)."""
        buffer = StepBuffer()
        for key, value in writes:
            buffer.add(key, Decimal(value), strict=False)
        assert sum(buffer.sums.values(), Decimal(0)) == sum(v for _, v in writes)
        leaves = sorted(buffer.sums)
        assert _reference(leaves) == [True] * len(leaves)
        accepted = _reference([k for k, _ in writes])
        assert bool(buffer.conflicts) == (not all(accepted))
        for above, below in buffer.conflicts:
            assert below.startswith(above + "/")
            assert f"{above}/{UNATTRIBUTED}" in buffer.sums


class TestAdmit:
    def test_a_refused_key_registers_nothing(self) -> None:
        leaves = {"costs/a/b": 1}
        ancestors = {"costs/a": "costs/a/b"}
        assert keytree.admit("costs/a/b/c/d", leaves, ancestors) == ("costs/a/b", "costs/a/b/c/d")
        assert ancestors == {"costs/a": "costs/a/b"}
        assert keytree.admit("costs/a", leaves, ancestors) == ("costs/a", "costs/a/b")

    def test_registers_every_new_ancestor_below_the_section(self) -> None:
        ancestors: dict[str, str] = {}
        assert keytree.admit("costs/a/b/c", {}, ancestors) is None
        assert ancestors == {"costs/a/b": "costs/a/b/c", "costs/a": "costs/a/b/c"}
        assert keytree.admit("costs/x", {}, ancestors) is None  # a section is never a leaf

    def test_errors_name_both_keys(self) -> None:
        below = keytree.conflict_error("costs/a", ("costs/a", "costs/a/b"))
        above = keytree.conflict_error("costs/a/b", ("costs/a", "costs/a/b"))
        assert str(below) == "Cannot log 'costs/a' as a leaf: it is an ancestor of 'costs/a/b'"
        assert str(above) == (
            "Cannot log 'costs/a/b' as a leaf: 'costs/a' is already a leaf ancestor"
        )
