"""The ``art-ray-metrics`` command line, run in subprocesses as a user runs it.

Each ``demo`` subprocess starts its own local Ray instance (one ``ray.init`` per process), so
there are only two: a 3-step run, then ``--resume --chaos`` for 2 more steps. The operations
commands (``inspect``, ``history``, ``wandb-sync``) read that run's storage without Ray;
``status`` asks an aggregator on the shared test cluster. Refusals that happen before any Ray or
storage work run the CLI's ``main`` in this process (``run_cli``): a subprocess would add only
its start-up (the demo's imports alone take seconds).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import art_ray_metrics as arm
from art_ray_metrics.export.wandb_offline import find_offline_run_files, read_offline_history
from art_ray_metrics.ops.demo.workload import expected_data_totals

pytestmark = pytest.mark.slow

# the classes that read the demo runs run on one pytest-xdist worker, so each demo runs once;
# TestStatus is in the shared cluster's group (tests/conftest.py). The runs are session
# fixtures: a worker runs other modules' tests between this group's, and a module fixture is
# torn down whenever the next test is in another module (CI ran the demo four times, not two)
DEMO_RUNS = pytest.mark.xdist_group("cli-demo")

RUN = "cli-test"


def cli(*args: str, cwd: Path, timeout: float = 240, env: dict[str, str] | None = None) -> Any:
    """Run ``python -m art_ray_metrics.ops.cli ARGS`` and return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "art_ray_metrics.ops.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else os.environ.copy(),
    )


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """``art-ray-metrics ARGS`` run by ``main`` in this process, as a CompletedProcess.

    The demo's Ray start is replaced by a failure: these checks must refuse before it (this
    process may be connected to the shared test cluster).
    """
    from art_ray_metrics.ops import cli as cli_mod
    from art_ray_metrics.ops.demo import run as demo_run

    def started(opts: Any) -> None:
        raise AssertionError("the check let the demo start Ray")

    monkeypatch.setattr(demo_run, "_init_ray", started)

    def run(*args: str, cwd: Path) -> Any:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = cli_mod.main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["art-ray-metrics", *args], code, out, err)

    return run


def assert_one_line_error(proc: Any, command: str, *needles: str) -> None:
    """Exit code 2, one error line on stderr naming the command, no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"art-ray-metrics {command}: error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def history_steps(run_dir: Path) -> list[int]:
    """The steps of the run's history objects."""
    return sorted(int(p.name.split("-")[0]) for p in (run_dir / "history").glob("*.json"))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The current directory of every subprocess (the demo writes ./runs/<run>)."""
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="session")
def first_run(workdir: Path) -> dict[str, Any]:
    """``demo --steps 3``: its process result and summary."""
    proc = cli(
        "demo",
        "--steps", "3", "--rollouts", "3", "--judges", "2", "--run", RUN,
        "--chart", str(workdir / "docs" / "chart.png"),
        "--summary-json", str(workdir / "first.json"),
        cwd=workdir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((workdir / "first.json").read_text())
    return {"proc": proc, "summary": summary, "dir": workdir / "runs" / RUN}


@pytest.fixture(scope="session")
def resumed_run(first_run: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """``demo --resume --chaos --steps 2`` on the same run."""
    proc = cli(
        "demo", "--run", RUN, "--resume", "--chaos", "--steps", "2",
        "--summary-json", str(workdir / "resumed.json"),
        cwd=workdir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((workdir / "resumed.json").read_text())
    return {"proc": proc, "summary": summary, "dir": first_run["dir"]}


@DEMO_RUNS
class TestDemo:
    def test_logs_every_step_and_writes_the_charts(
        self, first_run: dict[str, Any], workdir: Path
    ) -> None:
        """The demo exits 0, logs one row per step, and writes both PNG charts."""
        run_dir: Path = first_run["dir"]
        assert history_steps(run_dir) == [0, 1, 2]
        for chart in (run_dir / "chart.png", workdir / "docs" / "chart.png"):
            assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        summary = first_run["summary"]
        assert summary["rows"] == 3
        assert summary["totals"]["costs/cum/all"] > 0
        assert summary["totals"]["data/cum/num_scenarios"] == 9  # 3 steps x 3 rollouts
        # what the rollouts recorded, exactly as the pure workload says (seed 0, steps 0..2)
        for key, want in expected_data_totals(0, 3, 2).items():
            assert summary["totals"][key] == pytest.approx(want, rel=1e-12), key
        assert summary["counters"]["rejected_batches"] == 0
        assert "costs/cum/all" in first_run["proc"].stdout
        out = " ".join(first_run["proc"].stdout.split())
        assert "starting a local Ray instance" in out
        assert "(a local Ray for this demo; it stops with it)" in out
        assert "new run; no crash restarts this session" in out
        assert summary["startup_seconds"] > 0

    def test_resume_with_chaos_continues_and_keeps_totals(
        self, resumed_run: dict[str, Any]
    ) -> None:
        """--resume continues at the next step; --chaos totals equal the in-process reference."""
        assert history_steps(resumed_run["dir"]) == [0, 1, 2, 3, 4]
        summary = resumed_run["summary"]
        assert (summary["first_step"], summary["last_step"]) == (3, 4)
        assert summary["chaos"]["equal"] is True
        assert summary["chaos"]["keys"] >= 6
        assert "resuming run" in resumed_run["proc"].stdout
        out = " ".join(resumed_run["proc"].stdout.split())
        # the resume is not a crash; the --chaos kill is
        assert "resumed from its checkpoint; 1 crash restart this session" in out
        events = json.loads((resumed_run["dir"] / "demo" / "events.json").read_text())
        assert [(e["step"], e["what"].split(":")[0]) for e in events] == [
            (3, "resumed"),
            (4, "--chaos"),
        ]
        # the demo explains its kill itself (Ray's own report may suggest the OOM killer)
        assert "not a memory problem" in " ".join(resumed_run["proc"].stdout.split())

    def test_rows_split_the_spend_by_outcome(self, resumed_run: dict[str, Any]) -> None:
        """Every row's costs/outcome/* add up to costs/all (the judges' spend is tagged with
        the rollouts' scenario ids, the trainer gives fates); step 4 (seed 0, 3 rollouts)
        has a zero-variance group."""
        rows = {}
        for path in (resumed_run["dir"] / "history").glob("*.json"):
            record = json.loads(path.read_text().splitlines()[0])
            rows[record["step"]] = record
        fates = ("trained", "zero_variance", "stale", "errored", "discarded", "unknown")
        for step, row in rows.items():
            total = sum(row[f"costs/outcome/{f}"] for f in fates)
            assert total == pytest.approx(row["costs/all"], abs=1e-9), step
            assert row["costs/outcome/trained"] > 0
        assert rows[4]["costs/outcome/zero_variance"] > 0
        assert all(rows[s]["costs/outcome/zero_variance"] == 0 for s in (0, 1, 2, 3))

    def test_refuses_to_overwrite_an_existing_run(
        self, first_run: dict[str, Any], workdir: Path, run_cli: Any
    ) -> None:
        """A second demo into the same run without --resume exits 2 before starting Ray."""
        proc = run_cli("demo", "--run", RUN, "--steps", "1", cwd=workdir)
        assert_one_line_error(proc, "demo", "--resume")


@DEMO_RUNS
class TestInspect:
    def test_json_has_steps_totals_and_ids(
        self, resumed_run: dict[str, Any], workdir: Path
    ) -> None:
        """inspect --json reports the last step, the totals and the unique ids of the run."""
        proc = cli("inspect", str(resumed_run["dir"]), "--json", cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        last_row = json.loads(
            (resumed_run["dir"] / "history" / "000000000004-train.json").read_text()
        )
        assert info["last_train_step"] == 4
        assert info["last_closed"] == {"train": 4}
        assert info["totals"]["costs/cum/all"] == last_row["costs/cum/all"]
        assert info["unique_scenarios"] == resumed_run["summary"]["unique_scenarios"]
        assert info["wandb_run_id"] is None
        assert info["checkpoint_format"] == 1
        assert info["history_rows"] == 5

    def test_table_output(self, resumed_run: dict[str, Any], workdir: Path) -> None:
        """inspect without --json prints the checkpoint and the totals tables."""
        proc = cli("inspect", str(resumed_run["dir"]), cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        assert "costs/cum/all" in proc.stdout
        assert "W&B run id" in proc.stdout

    def test_version_mismatch_is_one_line(
        self, resumed_run: dict[str, Any], tmp_path: Path
    ) -> None:
        """A checkpoint of another format version exits 2 with a one-line error."""
        copy = tmp_path / "copy"
        shutil.copytree(resumed_run["dir"], copy)
        for path in [copy / "CHECKPOINT", *(copy / "manifests").glob("*.bin")]:
            data = bytearray(path.read_bytes())
            data[4:6] = struct.pack(">H", 99)  # header: magic(4) then the format version
            path.write_bytes(bytes(data))
        proc = cli("inspect", str(copy), cwd=tmp_path)
        assert_one_line_error(proc, "inspect", "another format version")

    def test_reports_a_recovery_from_a_corrupt_manifest(
        self, first_run: dict[str, Any], tmp_path: Path
    ) -> None:
        """A corrupt newest manifest: inspect loads the previous one and says so without -v."""
        copy = tmp_path / "copy"
        shutil.copytree(first_run["dir"], copy)
        newest = max((copy / "manifests").glob("*.bin"))
        newest.write_bytes(b"garbage" * 8)
        proc = cli("inspect", str(copy), "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["recovered"], proc.stderr
        assert any(newest.name in m for m in info["recovered"])
        assert "recovered: " in proc.stderr
        assert newest.name in proc.stderr
        table = cli("inspect", str(copy), cwd=tmp_path)
        assert "recovered from" in table.stdout
        assert newest.name in table.stdout


@DEMO_RUNS
class TestHistory:
    def test_csv_has_a_header_and_every_row(
        self, resumed_run: dict[str, Any], workdir: Path
    ) -> None:
        """history --format csv prints a header and one line per logged row."""
        proc = cli("history", str(resumed_run["dir"]), "--format", "csv", cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        rows = list(csv.DictReader(io.StringIO(proc.stdout)))
        assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
        assert all(float(r["costs/cum/all"]) > 0 for r in rows)

    def test_jsonl_and_split_filter(self, resumed_run: dict[str, Any], workdir: Path) -> None:
        """history --format jsonl --split filters rows by split."""
        train = cli(
            "history", str(resumed_run["dir"]), "--format", "jsonl", "--split", "train", cwd=workdir
        )
        val = cli(
            "history", str(resumed_run["dir"]), "--format", "jsonl", "--split", "val", cwd=workdir
        )
        assert [json.loads(line)["step"] for line in train.stdout.splitlines()] == [0, 1, 2, 3, 4]
        assert val.returncode == 0
        assert val.stdout == ""

    def test_table(self, resumed_run: dict[str, Any], workdir: Path) -> None:
        """history prints a table with the default columns."""
        proc = cli("history", str(resumed_run["dir"]), cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        assert "reward/mean" in proc.stdout
        assert "5 rows" in proc.stdout

    def test_unknown_column_exits_2(self, first_run: dict[str, Any], workdir: Path) -> None:
        """--columns nosuch names the column and the available ones (was: a column of '-')."""
        proc = cli("history", str(first_run["dir"]), "--columns", "nosuch", cwd=workdir)
        assert_one_line_error(proc, "history", "nosuch", "costs/cum/all")


@DEMO_RUNS
class TestWandbSync:
    def test_rebuilds_an_offline_run_from_the_history(
        self, resumed_run: dict[str, Any], tmp_path: Path
    ) -> None:
        """wandb-sync --new-run relogs every history row into a W&B offline run."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
        copy = tmp_path / "copy"  # --new-run records its run id in the storage: keep ours clean
        shutil.copytree(resumed_run["dir"], copy)
        proc = cli(
            "wandb-sync", str(copy), "--new-run", "--mode", "offline",
            "--dir", str(tmp_path), cwd=tmp_path, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "5 of 5 rows logged" in proc.stdout
        files = find_offline_run_files(tmp_path)
        assert files
        steps = sorted(r["training_step"] for r in read_offline_history(files[-1]))
        assert steps == [0, 1, 2, 3, 4]

    def test_new_run_id_is_kept_and_continued(
        self, first_run: dict[str, Any], tmp_path: Path
    ) -> None:
        """--new-run saves its run id in the storage; the next sync logs to the same run.

        Offline files go to <run dir>/wandb (the demo's place) and the output names the exact
        `wandb sync` command. A corrupt history row is skipped, named, and the rest logged.
        """
        copy = tmp_path / "copy"
        shutil.copytree(first_run["dir"], copy)
        (copy / "history" / "000000000002-train.json").write_bytes(b"{not json")
        good = len(history_steps(copy)) - 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
        first = cli("wandb-sync", str(copy), "--new-run", "--mode", "offline", cwd=tmp_path,
                    env=env)  # fmt: skip
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"{good} of {good} rows logged" in first.stdout
        assert "skipped corrupt row history/000000000002-train.json" in first.stderr
        saved = json.loads((copy / "wandb-sync" / "run.json").read_text())
        assert f"W&B run {saved['run_id']} " in first.stdout
        files = find_offline_run_files(copy / "wandb", saved["run_id"])
        assert files
        assert f"wandb sync {files[-1].parent}" in first.stdout
        second = cli("wandb-sync", str(copy), "--mode", "offline", cwd=tmp_path, env=env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"W&B run {saved['run_id']} " in second.stdout
        assert "last wandb-sync" in second.stdout

    def test_without_a_run_id_asks_for_new_run(
        self, resumed_run: dict[str, Any], workdir: Path
    ) -> None:
        """A run that never had W&B needs --new-run (exit 2, one line)."""
        proc = cli("wandb-sync", str(resumed_run["dir"]), cwd=workdir)
        assert_one_line_error(proc, "wandb-sync", "--new-run")


class TestErrors:
    @pytest.mark.parametrize(
        ("uri", "needle"),
        [
            ("ftp://host/run", "scheme"),
            ("does/not/exist", "no such directory"),
            ("empty", "found none"),
        ],
        ids=["unknown-scheme", "missing-dir", "no-checkpoint"],
    )
    def test_wrong_uri_is_one_line(
        self, uri: str, needle: str, tmp_path: Path, run_cli: Any
    ) -> None:
        """Wrong URIs exit 2 with one error line and no traceback."""
        (tmp_path / "empty").mkdir()
        proc = run_cli("inspect", uri, cwd=tmp_path)
        assert_one_line_error(proc, "inspect", needle)

    def test_status_without_a_cluster(self, tmp_path: Path) -> None:
        """status against an address where nothing listens exits 2 at once."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = cli("status", "--address", f"127.0.0.1:{port}", cwd=tmp_path, timeout=60)
        assert_one_line_error(proc, "status", "Expected a Ray cluster")


@pytest.mark.ray
class TestStatus:
    def test_reports_a_running_aggregator(self, ray_cluster: Any, tmp_path: Path) -> None:
        """status on the shared cluster shows the aggregator's counters; a wrong name exits 2."""
        name = f"agg-{uuid.uuid4().hex[:8]}"
        handle = arm.start_aggregator(
            name=name, namespace="arm-cli", run_name=name, storage_uri=str(tmp_path / "run"),
            wandb_mode="disabled",
        )  # fmt: skip
        try:
            handle.log(0, metrics={"loss": 0.5})
            address = ray_cluster.address
            proc = cli("status", "--address", address, "--name", name, "--namespace", "arm-cli",
                       "--json", cwd=tmp_path, timeout=120)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            stats = json.loads(proc.stdout)
            assert stats["name"] == name
            assert stats["counters"]["rows"] == 1
            table = cli("status", "--address", address, "--name", name, "--namespace",
                        "arm-cli", cwd=tmp_path, timeout=120)  # fmt: skip
            assert table.returncode == 0, table.stderr
            assert "fenced None" not in table.stdout
            assert "active (holds the writer epoch)" in table.stdout
            assert stats["ray_address"] == address  # every command says where it acted
            assert address in table.stdout
            missing = cli("status", "--address", address, "--name", "nope", "--namespace",
                          "arm-cli", cwd=tmp_path, timeout=120)  # fmt: skip
            assert_one_line_error(missing, "status", "'nope'")
        finally:
            handle.shutdown()

    def test_stop_checkpoints_and_frees_the_name(self, ray_cluster: Any, tmp_path: Path) -> None:
        """stop: a kept aggregator's final checkpoint, then it is gone; a second stop exits 2."""
        import ray

        name = f"agg-{uuid.uuid4().hex[:8]}"
        handle = arm.start_aggregator(
            name=name, namespace="arm-cli", run_name=name, storage_uri=str(tmp_path / "run"),
            wandb_mode="disabled",
        )  # fmt: skip
        try:
            handle.log(0, metrics={"loss": 0.5})
            address = ray_cluster.address
            proc = cli("stop", "--address", address, "--name", name, "--namespace", "arm-cli",
                       cwd=tmp_path, timeout=180)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            assert f"stopped aggregator {name!r}" in proc.stdout
            assert f"on the Ray cluster at {address}" in " ".join(proc.stdout.split())
            with pytest.raises(ValueError):
                ray.get_actor(name, namespace="arm-cli")
            info = json.loads(cli("inspect", str(tmp_path / "run"), "--json", cwd=tmp_path).stdout)
            assert info["last_closed"] == {"train": 0}
            again = cli("stop", "--address", address, "--name", name, "--namespace", "arm-cli",
                        cwd=tmp_path, timeout=180)  # fmt: skip
            assert_one_line_error(again, "stop", repr(name))
        finally:
            try:
                ray.kill(handle.actor, no_restart=True)
            except Exception:
                pass
