"""The CLI's checks before work, its one-line errors, and storage reads that tolerate damage.

None of these starts Ray: the checks refuse before that. Most run the CLI's ``main`` in this
process (the ``run_cli`` fixture), where a subprocess would add only its start-up; one check per
kind of failure still runs ``python -m art_ray_metrics`` in a subprocess as a user runs it (the
entry point, a whole process's stderr, argparse's exit). Runs against a real Ray cluster are in
``tests/integration/test_cli.py``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from art_ray_metrics.durable.history import HistoryStore
from art_ray_metrics.durable.storage import open_store
from art_ray_metrics.ops import cli as cli_mod

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path, timeout: float = 90, env: dict[str, str] | None = None) -> Any:
    """Run ``python -m art_ray_metrics ARGS``; return the CompletedProcess and its seconds."""
    base = env if env is not None else os.environ.copy()
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH")) if p)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "art_ray_metrics", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=base,
    )
    proc.seconds = time.monotonic() - t0  # type: ignore[attr-defined]
    return proc


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """``art-ray-metrics ARGS`` run by ``main`` in this process, as a CompletedProcess.

    ``env`` entries are set for the call; the current directory is ``cwd``. ``ray.init`` fails
    the call if reached (the checks refuse before that; in a full session this process may be
    connected to the shared test cluster, so whether Ray is initialised says nothing).
    """
    import ray

    def no_ray(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the check started Ray")

    monkeypatch.setattr(ray, "init", no_ray)

    def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
        monkeypatch.chdir(cwd)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        t0 = time.monotonic()
        code = cli_mod.main(list(args))
        out, err = capsys.readouterr()
        proc = subprocess.CompletedProcess(["art-ray-metrics", *args], code, out, err)
        proc.seconds = time.monotonic() - t0  # type: ignore[attr-defined]
        return proc

    return run


def assert_one_line_error(proc: Any, command: str, *needles: str) -> str:
    """Exit code 2, exactly one stderr line naming the command, no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"art-ray-metrics {command}: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestAddressChecks:
    def test_demo_with_nothing_at_the_address_fails_at_once(self, tmp_path: Path) -> None:
        """demo --address host:port where nothing listens: exit 2 in seconds, nothing written."""
        proc = cli("demo", "--address", f"127.0.0.1:{free_port()}", cwd=tmp_path)
        assert_one_line_error(proc, "demo", "Expected a Ray cluster at 127.0.0.1:")
        assert not (tmp_path / "runs").exists()

    @pytest.mark.parametrize("address", ["bogus", "host:notaport", "127.0.0.1:0", ":6379"])
    def test_demo_with_a_malformed_address(
        self, address: str, run_cli: Any, tmp_path: Path
    ) -> None:
        """A malformed address is one line naming it, not a ValueError traceback."""
        proc = run_cli("demo", "--address", address, cwd=tmp_path)
        assert_one_line_error(proc, "demo", repr(address))

    @pytest.mark.parametrize("command", ["status", "stop"])
    def test_status_and_stop_check_the_address(
        self, command: str, run_cli: Any, tmp_path: Path
    ) -> None:
        """status and stop refuse an address where nothing listens, in one line."""
        proc = run_cli(command, "--address", f"127.0.0.1:{free_port()}", cwd=tmp_path)
        assert_one_line_error(proc, command, "nothing accepted a connection")

    def test_auto_with_a_stale_cluster_file(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--address auto resolving to a dead head (a stale cluster file) fails at once, saying so.

        Ray resolves ``auto`` from running GCS processes before the cluster file, so with any
        other Ray alive on this machine (the test session's own cluster) a real stale file
        cannot be set up: Ray's resolver is replaced by one that returns a dead address.
        """
        from ray._private import services

        dead = f"127.0.0.1:{free_port()}"
        monkeypatch.setattr(services, "get_ray_address_from_environment", lambda *_: dead)
        assert cli_mod.main(["status", "--address", "auto"]) == 2
        err = capsys.readouterr().err
        proc = subprocess.CompletedProcess([], 2, "", err)
        assert_one_line_error(proc, "status", "stale cluster file", dead)

    @pytest.mark.slow
    def test_a_port_that_is_not_ray_does_not_hang(self, tmp_path: Path) -> None:
        """Something listens but never answers as Ray does: the join gives up, exit 2.

        The listener accepts and stays silent, as a firewall or another service might.
        """
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        held: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            server.settimeout(0.5)
            while not stop.is_set():
                try:
                    held.append(server.accept()[0])
                except OSError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            proc = cli("status", "--address", f"127.0.0.1:{port}", cwd=tmp_path, timeout=150)
        finally:
            stop.set()
            thread.join(5)
            for conn in held:
                conn.close()
            server.close()
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert "127.0.0.1" in proc.stderr.strip().splitlines()[-1]


class TestInputLimits:
    @pytest.mark.parametrize(
        ("args", "needle"),
        [
            (["--num-cpus", "0"], "--num-cpus"),
            (["--num-cpus", "-3"], "--num-cpus"),
            (["--rollouts", "10000"], "--rollouts <= 16"),
            (["--judges", "500"], "--judges <= 4"),
            (["--steps", "0"], "--steps"),
            (["--keep"], "--keep"),
        ],
        ids=["cpus-0", "cpus-negative", "rollouts", "judges", "steps", "keep-local"],
    )
    def test_sizes_this_machine_cannot_run(
        self, args: list[str], needle: str, run_cli: Any, tmp_path: Path
    ) -> None:
        """Sizes beyond the CPUs exit 2 with one line before Ray starts."""
        proc = run_cli("demo", "--num-cpus", "2", *args, cwd=tmp_path)
        assert_one_line_error(proc, "demo", needle)
        assert not (tmp_path / "runs").exists()

    def test_usage_error_is_one_line(self, tmp_path: Path) -> None:
        """A wrong flag value is one line (argparse would print the usage too)."""
        proc = cli("demo", "--steps", "x", cwd=tmp_path)
        assert_one_line_error(proc, "demo", "--steps", "invalid int value")

    def test_unreachable_bucket_fails_fast(self, run_cli: Any, tmp_path: Path) -> None:
        """A bucket that cannot be read is one line before Ray starts (was: a 22 s actor death)."""
        env = dict(
            AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{free_port()}",
            AWS_ACCESS_KEY_ID="x",
            AWS_SECRET_ACCESS_KEY="x",
            AWS_REGION="us-east-1",
        )
        proc = run_cli("demo", "--storage", "s3://my-bucket/runs/x", cwd=tmp_path, env=env)
        assert_one_line_error(proc, "demo", "s3://my-bucket/runs/x")
        assert proc.seconds < 60  # type: ignore[attr-defined]
        assert not (tmp_path / "runs").exists()


def write_rows(run: Path, rows: dict[int, dict[str, float]]) -> HistoryStore:
    history = HistoryStore(open_store(str(run)))
    for step, row in rows.items():
        history.write(step, "train", row)
    return history


class TestHistoryDamage:
    def test_a_corrupt_row_is_skipped_and_named(self, run_cli: Any, tmp_path: Path) -> None:
        """history prints the readable rows and names the corrupt one with its reason."""
        run = tmp_path / "run"
        write_rows(run, {s: {"costs/all": 0.1 * (s + 1)} for s in range(3)})
        bad = run / "history" / "000000000001-train.json"
        bad.write_bytes(b'{"step": 1, "spl')
        proc = run_cli("history", str(run), "--format", "jsonl", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert [json.loads(line)["step"] for line in proc.stdout.splitlines()] == [0, 2]
        assert "skipped corrupt row history/000000000001-train.json" in proc.stderr
        assert "Traceback" not in proc.stderr

    def test_a_non_numeric_value_is_skipped(self, run_cli: Any, tmp_path: Path) -> None:
        """A record whose metric is not a number is skipped with the key named."""
        run = tmp_path / "run"
        write_rows(run, {0: {"costs/all": 0.5}, 1: {"costs/all": 0.25}})
        bad = run / "history" / "000000000000-train.json"
        record = json.loads(bad.read_text())
        record["costs/all"] = "lots"
        bad.write_text(json.dumps(record))
        proc = run_cli("history", str(run), "--format", "csv", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert [r["step"] for r in csv.DictReader(io.StringIO(proc.stdout))] == ["1"]
        assert "'costs/all'" in proc.stderr

    def test_csv_has_no_float_noise(self, run_cli: Any, tmp_path: Path) -> None:
        """0.45799999999999996 prints as 0.458; values survive a float() round trip."""
        run = tmp_path / "run"
        write_rows(run, {0: {"reward/mean": 0.45799999999999996, "costs/all": 1e-9}})
        proc = run_cli("history", str(run), "--format", "csv", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        row = next(csv.DictReader(io.StringIO(proc.stdout)))
        assert row["reward/mean"] == "0.458"
        assert float(row["costs/all"]) == 1e-9

    def test_unknown_column_names_it_and_the_available_ones(
        self, run_cli: Any, tmp_path: Path
    ) -> None:
        """--columns nosuch exits 2 naming the column and listing what exists."""
        run = tmp_path / "run"
        write_rows(run, {0: {"reward/mean": 0.5, "costs/all": 0.1}})
        proc = run_cli("history", str(run), "--columns", "reward/mean,nosuch", cwd=tmp_path)
        line = assert_one_line_error(proc, "history", "nosuch", "costs/all", "reward/mean")
        assert "reward/mean," not in line.split("available")[0]


class TestRunAllBenchmarks:
    def load(self) -> Any:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "bench/run_all.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def test_update_docs_needs_a_full_run(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--update-docs with --quick is refused before anything runs."""
        run_all = self.load()
        ran: list[str] = []
        monkeypatch.setattr(run_all, "run_script", lambda name, *_: ran.append(name))
        monkeypatch.setattr(sys, "argv", ["run_all.py", "--quick", "--update-docs"])
        with pytest.raises(SystemExit) as exit_info:
            run_all.main()
        assert exit_info.value.code == 2
        assert "--update-docs needs a full run" in capsys.readouterr().err
        assert ran == []

    @pytest.mark.parametrize("ok", [True, False], ids=["complete", "failed"])
    def test_tracked_tables_change_only_after_a_complete_run(
        self, ok: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """By default the report goes to the untracked folder; --update-docs needs success."""
        run_all = self.load()
        assert run_all.LOCAL == ROOT / "bench" / "results" / "local"
        docs, tracked = tmp_path / "benchmarks.md", tmp_path / "checkpoint.md"
        monkeypatch.setattr(run_all, "DOCS_REPORT", docs)
        monkeypatch.setattr(run_all, "TRACKED_CHECKPOINT", tracked)
        monkeypatch.setattr(run_all, "run_script", lambda name, quick, results: (name, ok))
        out = tmp_path / "local" / "report.md"
        monkeypatch.setattr(sys, "argv", ["run_all.py", "--out", str(out)])
        with pytest.raises(SystemExit):
            run_all.main()
        assert out.exists()
        assert not docs.exists()
        monkeypatch.setattr(sys, "argv", ["run_all.py", "--out", str(out), "--update-docs"])
        with pytest.raises(SystemExit) as exit_info:
            run_all.main()
        assert exit_info.value.code == (0 if ok else 1)
        assert docs.exists() is ok

    def test_scripts_never_inherit_a_cluster_address(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """RAY_ADDRESS (e.g. from a `ray start` shell) is removed from the scripts' env."""
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
        assert "RAY_ADDRESS" not in self.load().script_env()


class TestHelpers:
    def test_demo_limits_scale_with_cpus(self) -> None:
        """8 rollouts and 2 judges per CPU, at least one CPU's worth."""
        assert cli_mod.demo_limits(2) == (16, 4)
        assert cli_mod.demo_limits(0.5) == (8, 2)

    def test_local_run_dir(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Offline W&B goes under the storage when local, else under ./runs/<name>."""
        monkeypatch.chdir(tmp_path)
        assert cli_mod.local_run_dir(str(tmp_path / "r")) == str(tmp_path / "r")
        assert cli_mod.local_run_dir("s3://b/p/run-1") == str(tmp_path / "runs" / "run-1")


class TestDemoMessages:
    """In process, with Ray's start replaced: what the demo says and leaves behind."""

    @pytest.fixture
    def in_tmp(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        monkeypatch.chdir(tmp_path)
        for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE"):
            monkeypatch.setenv(key, os.environ.get(key, "0" if "WINDOWS" in key else "disabled"))
        return tmp_path

    def test_ctrl_c_before_ray_started_says_nothing_was_recorded(
        self, in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Was: "the aggregator checkpointed run ..." though none had started."""
        from art_ray_metrics.ops import demo

        def interrupted(opts: Any) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(demo, "_init_ray", interrupted)
        code = cli_mod.main(["demo", "--run", "r1", "--steps", "1"])
        err = capsys.readouterr().err
        assert code == 130
        assert "nothing was recorded" in err
        assert "checkpointed" not in err
        assert not (in_tmp / "runs" / "r1").exists()

    def test_a_failed_new_run_leaves_no_stub(
        self, in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A new run that fails before its first checkpoint removes its directory."""
        from art_ray_metrics.ops import demo

        def broken(opts: Any) -> None:
            raise RuntimeError("raylet failed to start\nand many more lines")

        monkeypatch.setattr(demo, "_init_ray", broken)
        code = cli_mod.main(["demo", "--run", "r2", "--steps", "1"])
        err = capsys.readouterr().err
        assert code == 1
        assert [line for line in err.splitlines() if line.strip()] == [
            "art-ray-metrics demo: error: RuntimeError: raylet failed to start and many more "
            "lines (-v shows the traceback)"
        ]
        assert not (in_tmp / "runs" / "r2").exists()

    def test_resume_hint_repeats_the_storage(self) -> None:
        """Was: the S3 demo's "continue it" hint omitted --storage."""
        from art_ray_metrics.ops.demo import default_options

        s3 = default_options(run="r", storage_uri="s3://b/p/r", storage_flag=True)
        assert s3.resume_command() == "art-ray-metrics demo --run r --resume --storage s3://b/p/r"
        assert default_options(run="r").resume_command() == "art-ray-metrics demo --run r --resume"

    def test_offline_wandb_summary_names_the_files(self, tmp_path: Path) -> None:
        """The summary says where offline W&B wrote and how to upload it."""
        from art_ray_metrics.export.wandb_offline import offline_sync_command
        from art_ray_metrics.ops.demo import _wandb_summary, default_options

        opts = default_options(run="r", wandb_mode="offline", wandb_dir=str(tmp_path))
        assert _wandb_summary(opts, "abc123") == f"offline run abc123, files in {tmp_path}/wandb"
        assert offline_sync_command(tmp_path, "abc123") == (
            f"wandb sync {tmp_path}/wandb/offline-run-*"
        )
