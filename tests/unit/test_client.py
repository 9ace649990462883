"""The worker-side builder and client buffering, without Ray (nothing is shipped)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from art_ray_metrics import InvalidMetricError, MetricConflictError
from art_ray_metrics.config import ClientConfig
from art_ray_metrics.core.dedupe import digest
from art_ray_metrics.core.tape import MAX_REGISTRIES
from art_ray_metrics.core.wire import decode_batch, encode_batch
from art_ray_metrics.distributed.client import MetricsClient
from art_ray_metrics.distributed.record import WorkerBuilder


@pytest.fixture
def client() -> Iterator[MetricsClient]:
    """A client whose background thread never ships (no actor is needed)."""
    c = MetricsClient(ClientConfig(flush_interval_s=1e6, max_batch_leaves=10**9))
    yield c
    c.stopped.set()


class TestWorkerBuilder:
    def test_records_every_kind_of_leaf_into_its_step(self, client: MetricsClient) -> None:
        """Costs, metrics, data, timings, keyed costs and scenarios land in (step, scope)."""
        b = WorkerBuilder(client, 3, "train", "train")
        b.add_cost("train/judge", 0.1)
        b.add_cost("train/judge", 0.2)
        b.add_metric("reward/score", 1)
        b.add_data(step_num_scenarios=2, step_actor_tokens=10, scenario_ids=["a", "b", "a"])
        b.add_user_timing(step_actor_s=1.5)
        b.add_idle_times(step_actor_idle_s=0.5)
        b.register_model_pricing("m", prompt_per_million=1, completion_per_million=2)
        usage = {"id": "r-1", "usage": {"prompt_tokens": 100, "completion_tokens": 50}}
        assert b.add_response_cost("judge", usage, provider="openai", model_name="m") == 0.0002
        b.for_cost_context("eval", buffer_scope="eval").add_cost("eval/judge", 0.5)
        slot = client._pending_now()[(3, "train")]
        assert slot.sums()["costs/train/judge"] == Decimal("0.3")
        assert slot.sums()["data/step_actor_tokens"] == Decimal(10)
        assert [(k.key, k.value, k.response_id) for k in slot.keyed] == [
            ("costs/train/judge", Decimal("0.0002"), "openai:r-1")
        ]
        assert slot.scenarios == {digest("a"), digest("b")}
        assert client._pending_now()[(3, "eval")].sums() == {"costs/eval/judge": Decimal("0.5")}

    def test_batch_round_trips_through_the_wire(self, client: MetricsClient) -> None:
        """What ship() would send decodes to the same exact sums."""
        b = WorkerBuilder(client, 0, "train", "train")
        for _ in range(3):
            b.add_cost("train/x", 0.1)
        b.add_data(scenario_ids=["s"])
        slot = client._pending_now()[(0, "train")]
        from art_ray_metrics.core.records import LeafBatch, StepGroup

        group = StepGroup(0, "train", slot.sums(), tuple(slot.keyed), digest("s"))
        batch = decode_batch(encode_batch(LeafBatch(client.producer_id, 1, (group,))))
        assert batch.groups[0].sums == {"costs/train/x": Decimal("0.3")}

    @pytest.mark.parametrize(
        ("call", "match"),
        [
            (lambda b: b.add_cost("train/x", -1.0), "non-negative"),
            (lambda b: b.add_cost("train/x", float("nan")), "finite"),
            (lambda b: b.add_metric("reward/x", True), "finite"),
            (lambda b: b.add_metric("nosection", 1.0), "section prefix"),
            (lambda b: b.add_cost("", 1.0), "non-empty cost path"),
        ],
        ids=["negative", "nan", "bool", "no-section", "empty-path"],
    )
    def test_bad_input_raises_before_anything_is_buffered(
        self, client: MetricsClient, call: object, match: str
    ) -> None:
        """Invalid leaves raise in the worker and nothing is recorded."""
        b = WorkerBuilder(client, 0, "train", "train")
        with pytest.raises(InvalidMetricError, match=match):
            call(b)  # type: ignore[operator]
        assert client._pending_now()[(0, "train")].sums() == {}

    @pytest.mark.parametrize(
        ("call", "match"),
        [
            (lambda b: b.add_cost("train/hot", -0.5), "non-negative"),
            (lambda b: b.add_cost("train/hot", -1), "non-negative"),
            (lambda b: b.add_cost("train/hot", float("inf")), "finite"),
            (lambda b: b.add_cost("train/hot", "0.1"), "'0.1'"),
            (lambda b: b.add_metric("costs/train/hot", -0.5), "non-negative"),
            (lambda b: b.add_metric("costs/train/hot", Decimal("-1")), "non-negative"),
            (lambda b: b.add_metric("reward/hot", float("-inf")), "finite"),
            (lambda b: b.add_metric("reward/hot", False), "finite"),
            (lambda b: b.add_metric("reward/hot", None), "None"),
        ],
        ids=[
            "neg-float",
            "neg-int",
            "inf",
            "str",
            "neg-metric",
            "neg-decimal",
            "-inf",
            "bool",
            "none",
        ],
    )
    def test_hot_path_still_validates(
        self, client: MetricsClient, call: object, match: str
    ) -> None:
        """Once a key is known (its validation cached), bad values still raise; nothing lands."""
        b = WorkerBuilder(client, 0, "train", "train")
        b.add_cost("train/hot", 0.25)
        b.add_metric("reward/hot", -2.0)  # negative is fine outside costs/
        with pytest.raises(InvalidMetricError, match=match):
            call(b)  # type: ignore[operator]
        assert client._pending_now()[(0, "train")].sums() == {
            "costs/train/hot": Decimal("0.25"),
            "reward/hot": Decimal("-2"),
        }

    def test_conflict_within_one_producer_raises(self, client: MetricsClient) -> None:
        """A producer's own leaf/ancestor clash raises, as in ART."""
        b = WorkerBuilder(client, 0, "train", "train")
        b.add_cost("train/x", 1.0)
        with pytest.raises(MetricConflictError, match="costs/train/x"):
            b.add_cost("train", 1.0)


class TestFastPathsAgreeWithTheGeneralOnes:
    """The worker's one-lock paths for ``add_data``, ``add_user_timing`` and ``add_idle_times``
    record what ART's general methods record, and refuse the same values."""

    @staticmethod
    def _record(b: WorkerBuilder) -> None:
        b.add_data(step_num_scenarios=2, step_actor_tokens=812, scenario_ids=["a", "b", "a"])
        b.add_data(step_actor_tokens=1.5)
        b.add_data(scenario_ids=[7, "\N{SNOWMAN}"])
        b.add_user_timing(step_wall_s=3, step_actor_s=0.25, step_eval_s=-0.0)
        b.add_idle_times(step_trainer_idle_s=0.5, step_actor_idle_s=-1e280)

    def test_same_sums_and_scenarios(self, client: MetricsClient) -> None:
        from art_ray_metrics.builder import LeafRecorder

        fast = WorkerBuilder(client, 0, "train", "train")
        self._record(fast)

        class General(WorkerBuilder):  # ART's methods over the same client, step 1
            add_data = LeafRecorder.add_data
            add_user_timing = LeafRecorder.add_user_timing
            add_idle_times = LeafRecorder.add_idle_times

        self._record(General(client, 1, "train", "train"))
        a, b = client._pending_now()[(0, "train")], client._pending_now()[(1, "train")]
        assert a.sums() == b.sums()
        assert a.sums()["data/step_actor_tokens"] == Decimal("813.5")
        assert a.scenarios == b.scenarios == {digest(s) for s in ("a", "b", "7", "\N{SNOWMAN}")}
        assert client._pending_leaves == 2 * (5 + 1 + 2 + 3 + 2)  # leaves and digests given

    @pytest.mark.parametrize(
        ("call", "match"),
        [
            (lambda b: b.add_data(step_num_scenarios=float("nan")), "data/step_num_scenarios"),
            (lambda b: b.add_data(step_actor_tokens=True), "data/step_actor_tokens"),
            (lambda b: b.add_data(step_actor_tokens=10**400), "data/step_actor_tokens"),
            (lambda b: b.add_data(1, 2, scenario_ids="abc"), "single string"),
            (lambda b: b.add_data(1, 2, scenario_ids=["ok", "bad\udce9"]), "UTF-8"),
            (lambda b: b.add_user_timing(step_actor_s=float("inf")), "time/step_actor_s"),
            (lambda b: b.add_user_timing(step_actor_s="2"), "time/step_actor_s"),
            (lambda b: b.add_idle_times(step_actor_idle_s=-1e301), "throughput/step_actor_idle"),
        ],
        ids=["nan", "bool", "huge-int", "str-ids", "surrogate-id", "inf", "str", "beyond-bound"],
    )
    def test_bad_values_refused_naming_the_key(
        self, client: MetricsClient, call: object, match: str
    ) -> None:
        """A value the fast path cannot take goes through the general checks, which raise
        before anything of that call is recorded."""
        b = WorkerBuilder(client, 0, "train", "train")
        b.add_data(step_num_scenarios=1)
        with pytest.raises(InvalidMetricError, match=match):
            call(b)  # type: ignore[operator]
        slot = client._pending_now()[(0, "train")]
        assert slot.sums() == {"data/step_num_scenarios": Decimal(1)}
        assert slot.scenarios == set()


class TestConnectCache:
    @pytest.fixture(autouse=True)
    def _no_worker_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The cache, not worker_env: a process where Ray runs (the rest of the suite) and no
        aggregator of these names exists would otherwise keep connect from caching."""
        from art_ray_metrics.distributed import record

        monkeypatch.setattr(record, "load_worker_env", lambda name, namespace: True)

    def test_cached_arguments_still_check_the_step(self) -> None:
        """The second connect with the same arguments skips their checks, not the step's."""
        from art_ray_metrics.distributed.record import _CONNECTED, connect

        name = "cache-test"
        first = connect(1, " train ", name=name, namespace="ns")
        try:
            assert (first.cost_context, first.scope) == ("train", "train")
            again = connect(2, " train ", name=name, namespace="ns")
            assert (again.client, again.step, again.cost_context) == (first.client, 2, "train")
            assert again._rollout is not first._rollout  # each rollout flushes its own batches
            for bad in (-1, True, 1.0, 2**64):
                with pytest.raises(InvalidMetricError, match="step"):
                    connect(bad, " train ", name=name, namespace="ns")  # type: ignore[arg-type]
            with pytest.raises(InvalidMetricError, match="cost_context"):
                connect(1, ["train"], name=name, namespace="ns")  # type: ignore[arg-type]
        finally:
            first.client.stopped.set()
        # a closed client is not handed out again: connect goes through get_client
        fresh = connect(3, " train ", name=name, namespace="ns")
        try:
            assert fresh.client is not first.client
            assert _CONNECTED[(" train ", None, name, "ns", None)][0] is fresh.client
        finally:
            fresh.client.stopped.set()


class TestTape:
    """The lock-free hot path: builders extend the client's tape, ships drain it."""

    @staticmethod
    def _shipping_client(max_batch_leaves: int) -> MetricsClient:
        c = MetricsClient(ClientConfig(flush_interval_s=1e6, max_batch_leaves=max_batch_leaves))
        c._send = lambda seq, data, durable: None  # type: ignore[assignment,method-assign]
        return c

    def test_concurrent_rollouts_lose_nothing_and_know_their_batches(self) -> None:
        """8 threads record rollouts through the fast paths while a ninth ships at random
        moments, with the interpreter switching threads every microsecond: every cent and
        every scenario id arrives exactly once, and each rollout's range holds its batch."""
        import random
        import sys
        import threading

        client = self._shipping_client(max_batch_leaves=300)
        threads, rollouts = 8, 400
        contexts: dict[bytes, Any] = {}
        stop = threading.Event()

        def producer(t: int) -> None:
            rng = random.Random(t)
            for i in range(rollouts):
                b = WorkerBuilder(client, 1, "train", "train")
                b.add_cost("train/judge", 0.01 * rng.randint(0, 9))
                b.add_cost(f"train/thread_{t}", 0.1)
                b.add_metric("reward/score", 1.0)
                b.add_data(step_num_scenarios=1, scenario_ids=[f"s-{t}-{i}"])
                b.add_user_timing(step_actor_s=0.25)
                contexts[digest(f"s-{t}-{i}")] = b._ctx

        def shipper() -> None:
            rng = random.Random(99)
            while not stop.is_set():
                client.ship()
                stop.wait(rng.random() / 1000)

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            ship_thread = threading.Thread(target=shipper)
            ship_thread.start()
            workers = [threading.Thread(target=producer, args=(t,)) for t in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            stop.set()
            ship_thread.join()
        finally:
            sys.setswitchinterval(old)
        client.ship()
        try:
            sums: dict[str, Decimal] = {}
            seen: dict[bytes, int] = {}
            for seq, data in client._retained.items():
                for group in decode_batch(data).groups:
                    for key, value in group.sums.items():
                        sums[key] = sums.get(key, Decimal(0)) + value
                    raw = group.scenario_digests
                    for j in range(0, len(raw), 16):
                        assert raw[j : j + 16] not in seen
                        seen[raw[j : j + 16]] = seq
            expected_judge = Decimal(0)
            for t in range(threads):  # replay each thread's draws
                rng = random.Random(t)
                for _ in range(rollouts):
                    expected_judge += Decimal(repr(0.01 * rng.randint(0, 9)))
            total = threads * rollouts
            assert sums["costs/train/judge"] == expected_judge
            for t in range(threads):
                assert sums[f"costs/train/thread_{t}"] == Decimal("0.1") * rollouts
            assert sums["reward/score"] == total
            assert sums["data/step_num_scenarios"] == total
            assert sums["time/step_actor_s"] == Decimal("0.25") * total
            assert len(seen) == total
            for d, seq in seen.items():
                lo, hi = client.rollout_range(contexts[d])
                assert lo <= seq <= hi, (lo, seq, hi)
            assert len(client._retained) > 10, client.counters  # shipped from both kinds of thread
        finally:
            client.stopped.set()

    def test_recording_leaves_nothing_for_the_cyclic_gc(self, client: MetricsClient) -> None:
        """A tuple per leaf on the tape made the GC collect every ~60 rollouts."""
        import gc

        b = WorkerBuilder(client, 0, "train", "train")
        b.add_cost("train/judge", 0.001)
        b.add_metric("reward/r", 1.0)
        gc.collect()
        gc.disable()
        try:
            before = len(gc.get_objects())
            for _ in range(5_000):
                b.add_cost("train/judge", 0.001)
                b.add_metric("reward/r", 1.0)
                b.add_user_timing(step_actor_s=0.5)
            grown = len(gc.get_objects()) - before
        finally:
            gc.enable()
        assert grown < 50, grown
        assert client._pending_now()[(0, "train")].sums()["costs/train/judge"] == Decimal("5.001")

    def test_a_conflict_with_a_shipped_leaf_still_raises(self) -> None:
        """Keys stay registered for the step after a ship: one producer cannot send both a
        leaf and its ancestor, whatever the batches."""
        client = self._shipping_client(max_batch_leaves=10**9)
        try:
            b = WorkerBuilder(client, 0, "train", "train")
            b.add_cost("train/judge", 0.5)
            client.ship()
            with pytest.raises(MetricConflictError, match="train/judge"):
                WorkerBuilder(client, 0, "train", "train").add_cost("train/judge/x", 0.1)
            with pytest.raises(MetricConflictError, match="train/judge"):
                b.add_cost("train", 0.1)
            b.add_cost("train/judge", 0.25)  # the leaf itself is still fine
            client.ship()
            sums = [g.sums for d in client._retained.values() for g in decode_batch(d).groups]
            assert sums == [
                {"costs/train/judge": Decimal("0.5")},
                {"costs/train/judge": Decimal("0.25")},
            ]
        finally:
            client.stopped.set()

    def test_registries_and_rollouts_stay_bounded(self) -> None:
        """A long run: key registries are kept for the latest steps only, and rollouts whose
        batches are all durable are forgotten (their flush has nothing to wait for)."""
        from art_ray_metrics.distributed import client as C

        client = self._shipping_client(max_batch_leaves=10**9)
        try:
            first = WorkerBuilder(client, 0, "train", "train")
            first.add_cost("train/judge", 0.5)
            for step in range(1, 3 * MAX_REGISTRIES):
                for _ in range(40):
                    WorkerBuilder(client, step, "train", "train").add_cost("train/judge", 0.5)
                seq = client.ship()
                assert seq is not None
                client._acked(seq, {"durable": True, "durable_upto": seq})
            assert len(client._keys.entries) <= MAX_REGISTRIES
            assert len(client._his) <= 2 * C._PRUNE_HIS_AT
            assert first._rollout[0] not in client._his  # forgotten: all durable
            lo, hi = client.rollout_range(first._ctx)
            assert (lo, hi) == (1, client._seq)  # so its flush covers every batch since
            assert client.flush_range(lo, hi, timeout_s=1).ok  # all durable: returns at once
            first.add_cost("train/judge", 0.25)  # an old step's builder still records
            lo, hi = client.rollout_range(first._ctx)
            assert lo <= hi == client._seq + 1
            assert client._pending_now()[(0, "train")].sums() == {
                "costs/train/judge": Decimal("0.25")
            }
        finally:
            client.stopped.set()

    def test_rollout_table_is_capped_while_nothing_becomes_durable(self) -> None:
        """An unreachable actor: nothing is acknowledged, rollouts keep coming. The table stays
        bounded; a forgotten rollout's flush covers every batch since it began."""
        from art_ray_metrics.distributed import client as C

        client = self._shipping_client(max_batch_leaves=10**9)
        try:
            first = WorkerBuilder(client, 0, "train", "train")
            first.add_cost("train/judge", 0.5)
            for _ in range(3):
                for _ in range(C._MAX_HIS // 2):
                    WorkerBuilder(client, 0, "train", "train").add_cost("train/judge", 0.5)
                client.ship()
            assert len(client._his) <= C._MAX_HIS
            assert first._rollout[0] not in client._his
            last = WorkerBuilder(client, 0, "train", "train")
            last.add_cost("train/judge", 0.5)
            assert client.rollout_range(first._ctx) == (1, client._seq + 1)
            assert client.rollout_range(last._ctx) == (client._seq + 1, client._seq + 1)
        finally:
            client.stopped.set()

    def test_ids_from_an_iterator_survive_the_general_path(self, client: MetricsClient) -> None:
        """A count that needs the general checks (a Decimal) with ids from a generator: the
        ids are read once and all recorded."""
        b = WorkerBuilder(client, 0, "train", "train")
        b.add_data(step_num_scenarios=Decimal(2), scenario_ids=(f"s-{i}" for i in range(2)))
        slot = client._pending_now()[(0, "train")]
        assert slot.scenarios == {digest("s-0"), digest("s-1")}
        assert slot.sums()["data/step_num_scenarios"] == 2
        with pytest.raises(InvalidMetricError, match="step_num_scenarios"):
            b.add_data(step_num_scenarios=Decimal("NaN"), scenario_ids=iter(["s-2"]))
        assert digest("s-2") not in client._pending_now()[(0, "train")].scenarios
