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
import shlex
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
from art_ray_metrics.ops.cli import cluster, common, launch, storage

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
    @pytest.mark.slow  # the entry point in a fresh interpreter, as a user runs it
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

        The machine's real cluster file and processes are replaced (other Rays may run here):
        a cluster file naming a dead address, and no Ray process running.
        """
        from ray._private import services

        dead = f"127.0.0.1:{free_port()}"
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setattr(services, "find_bootstrap_address", lambda *_: dead)
        monkeypatch.setattr(services, "find_gcs_addresses", frozenset)
        assert cli_mod.main(["status", "--address", "auto"]) == 2
        err = capsys.readouterr().err
        proc = subprocess.CompletedProcess([], 2, "", err)
        assert_one_line_error(proc, "status", "stale cluster file", dead)


class TestAutoAddress:
    """``--address auto`` takes a cluster only when it is unambiguous (issue 21, item 5)."""

    def test_ray_address_wins(self) -> None:
        assert cluster.resolve_auto("10.0.0.9:6379", "10.0.0.5:6379", ["10.0.0.7:6379"]) == (
            "10.0.0.9:6379",
            "RAY_ADDRESS",
        )

    @pytest.mark.parametrize("running", [[], ["10.0.0.5:6379"]], ids=["stale?", "running"])
    def test_the_cluster_file_when_no_other_cluster_runs(self, running: list[str]) -> None:
        address, source = cluster.resolve_auto(None, "10.0.0.5:6379", running)
        assert address == "10.0.0.5:6379"
        assert "cluster file" in source

    @pytest.mark.parametrize(
        ("cluster_file", "running", "needles"),
        [
            (None, ["127.0.0.1:7001"], ["found 1", "running: 127.0.0.1:7001", "another user's"]),
            (
                "127.0.0.1:7001",
                ["127.0.0.1:7001", "127.0.0.1:7002"],
                ["found 2", "cluster file: 127.0.0.1:7001", "running: 127.0.0.1:7002"],
            ),
            (None, [], ["found none", "ray start --head"]),
        ],
        ids=["only-a-process", "file-and-another", "nothing"],
    )
    def test_anything_else_lists_what_it_found_and_asks_for_address(
        self, cluster_file: str | None, running: list[str], needles: list[str]
    ) -> None:
        with pytest.raises(cli_mod.CliError) as info:
            cluster.resolve_auto(None, cluster_file, running)
        message = str(info.value)
        assert "--address" in message
        for needle in needles:
            assert needle in message, message

    @pytest.mark.parametrize("command", ["status", "stop"])
    def test_status_and_stop_never_take_a_cluster_they_cannot_tell_apart(
        self,
        command: str,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Was: with no cluster file, Ray's "auto" took any running GCS process (someone
        else's on a shared machine), and ``stop`` killed the aggregator it found there.

        Here a real listener stands in for that other cluster: the command must refuse
        without ever connecting to it.
        """
        from ray._private import services

        other = socket.socket()
        other.bind(("127.0.0.1", 0))
        other.listen(4)
        other.settimeout(0.2)
        address = f"127.0.0.1:{other.getsockname()[1]}"
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setattr(services, "find_bootstrap_address", lambda *_: None)
        monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset({address}))
        try:
            assert cli_mod.main([command]) == 2
            with pytest.raises(TimeoutError):
                other.accept()[0].close()  # nobody knocked
        finally:
            other.close()
        err = capsys.readouterr().err
        proc = subprocess.CompletedProcess([], 2, "", err)
        assert_one_line_error(proc, command, f"running: {address}", "pass --address")

    @pytest.mark.slow
    def test_a_port_that_is_not_ray_does_not_hang(
        self, tmp_path: Path, run_cli: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Something listens but never answers as Ray does: the join gives up, exit 2.

        The listener accepts and stays silent, as a firewall or another service might. In this
        process, with the handshake's bound cut from 10 s to 1 s: the test waits the bound out
        (the subprocess entry point's errors are checked by the tests above).
        """
        monkeypatch.setattr(cluster, "RAY_HANDSHAKE_TIMEOUT_S", 1.0)
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # "token" skips the handshake
        monkeypatch.delenv("RAY_USE_TLS", raising=False)
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
            proc = run_cli("status", "--address", f"127.0.0.1:{port}", cwd=tmp_path)
        finally:
            stop.set()
            thread.join(5)
            for conn in held:
                conn.close()
            server.close()
        line = assert_one_line_error(proc, "status", f"127.0.0.1:{port}", "within 1s")
        assert "another service listens there" in line
        assert proc.seconds < 8.0  # type: ignore[attr-defined]


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

    @pytest.mark.slow  # argparse's exit in a fresh interpreter
    def test_usage_error_is_one_line(self, tmp_path: Path) -> None:
        """A wrong flag value is one line (argparse would print the usage too)."""
        proc = cli("demo", "--steps", "x", cwd=tmp_path)
        assert_one_line_error(proc, "demo", "--steps", "invalid int value")

    @pytest.mark.slow  # argparse's exit in a fresh interpreter
    def test_unknown_flag_names_the_command_and_its_help(self, tmp_path: Path) -> None:
        """Was: "art-ray-metrics: error: unrecognized arguments: --bogus (see art-ray-metrics
        --help)", naming neither the command nor its help."""
        proc = cli("demo", "--bogus", cwd=tmp_path)
        assert_one_line_error(proc, "demo", "--bogus", "(see art-ray-metrics demo --help)")
        assert not (tmp_path / "runs").exists()

    @pytest.mark.parametrize(
        "argv",
        [["-v", "inspect", "x"], ["inspect", "x", "-v"], ["inspect", "-v", "x"], ["stop", "-v"]],
    )
    def test_verbose_before_or_after_the_command(self, argv: list[str]) -> None:
        """Was: -v after the command name refused as an unrecognized argument."""
        args, unknown = cli_mod.build_parser().parse_known_args(argv)
        assert unknown == []
        assert args.verbose is True
        assert cli_mod.build_parser().parse_args(["inspect", "x"]).verbose is False

    def test_resuming_a_run_that_never_existed_creates_nothing(
        self, run_cli: Any, tmp_path: Path
    ) -> None:
        """Was: exit 2, but an empty runs/never-existed/ left behind."""
        (tmp_path / "runs").mkdir()
        proc = run_cli("demo", "--run", "never-existed", "--resume", cwd=tmp_path)
        assert_one_line_error(proc, "demo", "never-existed", "no such directory")
        assert list((tmp_path / "runs").iterdir()) == []

    def test_missing_credentials_do_not_show_the_metadata_service_url(
        self, run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Was: "... Error performing PUT http://169.254.169.254/latest/api/token ...", the
        object store's fallback to the instance metadata service, in the one line."""
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(key)
        env = dict(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{free_port()}", AWS_REGION="us-east-1")
        proc = run_cli("inspect", "s3://my-bucket/runs/x", cwd=tmp_path, env=env)
        line = assert_one_line_error(proc, "inspect", "s3://my-bucket/runs/x")
        assert "169.254" not in line
        assert "credentials" in line

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

    def test_default_columns_include_arts_names(self, run_cli: Any, tmp_path: Path) -> None:
        """Rows closed through ``attach`` keep ART's train/reward and train/loss: shown."""
        run = tmp_path / "run"
        write_rows(run, {0: {"train/reward": 0.5, "train/loss": 1.25, "costs/all": 0.1}})
        proc = run_cli("history", str(run), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        for column in ("train/reward", "train/loss", "costs/all"):
            assert column in proc.stdout, proc.stdout
        assert f"history of {run} (1 row)\n" in proc.stdout  # was: wrapped to the table's width

    def test_a_split_the_run_does_not_have_is_one_line(self, run_cli: Any, tmp_path: Path) -> None:
        """Was: an empty table under a wrapped title. Now: exit 2 naming the splits it has."""
        run = tmp_path / "run"
        write_rows(run, {0: {"costs/all": 0.1}})
        proc = run_cli("history", str(run), "--split", "val", cwd=tmp_path)
        assert_one_line_error(proc, "history", "'val'", "rows of: train")

    def test_unknown_column_lists_every_available_one(self, run_cli: Any, tmp_path: Path) -> None:
        """Was: the list of valid columns cut at 500 characters."""
        run = tmp_path / "run"
        keys = {f"reward/a_fairly_long_metric_name_{i:03d}": 0.5 for i in range(40)}
        write_rows(run, {0: keys})
        proc = run_cli("history", str(run), "--columns", "nope", cwd=tmp_path)
        line = assert_one_line_error(proc, "history", "nope")
        assert all(key in line for key in keys), line[-200:]

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
        assert launch.demo_limits(2) == (16, 4)
        assert launch.demo_limits(0.5) == (8, 2)

    def test_local_run_dir(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Offline W&B goes under the storage when local, else under ./runs/<name>."""
        monkeypatch.chdir(tmp_path)
        assert common.local_run_dir(str(tmp_path / "r")) == str(tmp_path / "r")
        assert common.local_run_dir("s3://b/p/run-1") == str(tmp_path / "runs" / "run-1")


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
        from art_ray_metrics.ops.demo import run as demo_run

        def interrupted(opts: Any) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(demo_run, "_init_ray", interrupted)
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
        from art_ray_metrics.ops.demo import run as demo_run

        def broken(opts: Any) -> None:
            raise RuntimeError("raylet failed to start\nand many more lines")

        monkeypatch.setattr(demo_run, "_init_ray", broken)
        code = cli_mod.main(["demo", "--run", "r2", "--steps", "1"])
        err = capsys.readouterr().err
        assert code == 1
        assert [line for line in err.splitlines() if line.strip()] == [
            "art-ray-metrics demo: error: RuntimeError: raylet failed to start and many more "
            "lines (-v shows the traceback)"
        ]
        assert not (in_tmp / "runs" / "r2").exists()

    def test_resume_and_keep_hints_name_the_cluster_and_the_aggregator(self) -> None:
        """Was: the kept aggregator's "continue it" hint omitted --address and --name."""
        from art_ray_metrics.ops.demo import default_options

        opts = default_options(
            run="r", address="10.0.0.5:6379", name="agg-2", namespace="team", keep=True
        )
        assert opts.resume_command() == (
            "art-ray-metrics demo --run r --resume --address 10.0.0.5:6379 --name agg-2 "
            "--namespace team"
        )
        parsed = cli_mod.build_parser().parse_args(opts.resume_command().split()[1:])
        assert (parsed.address, parsed.name, parsed.namespace) == ("10.0.0.5:6379", "agg-2", "team")

    def test_says_it_starts_ray_before_the_wait(
        self, in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Was: nothing printed for the 12+ s a local Ray takes to start."""
        from art_ray_metrics.ops.demo import run as demo_run

        def interrupted(opts: Any) -> None:
            assert "starting a local Ray" in capsys.readouterr().out  # said before, not after
            raise KeyboardInterrupt

        import ray

        monkeypatch.setattr(demo_run, "_init_ray", interrupted)
        monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
        monkeypatch.setattr(ray, "shutdown", lambda: None)  # never this suite's Ray
        assert cli_mod.main(["demo", "--run", "r3", "--steps", "1"]) == 130

    def test_the_summary_does_not_call_a_clean_resume_a_restart(self) -> None:
        """Was: "aggregator restarts 1" after a clean --resume, which reads like a crash."""
        from art_ray_metrics.ops.demo import aggregator_starts

        def gauges(n: int) -> dict[str, Any]:
            return {"gauges": {"telemetry/restarts": float(n)}}

        assert "no crash restarts" in aggregator_starts(gauges(1), True, 0)
        assert "no crash restarts" in aggregator_starts(gauges(3), True, 2)
        assert "1 crash restart " in aggregator_starts(gauges(2), True, 0)  # --resume --chaos
        assert "1 crash restart " in aggregator_starts(gauges(1), False, 0)  # --chaos

    def test_the_chart_marks_the_resume_point_and_the_chaos_step(self) -> None:
        """Was: a resumed or --chaos run's chart looked like any other."""
        import matplotlib.pyplot as plt

        from art_ray_metrics.ops.demo import chart_figure

        rows = [{"training_step": s, "costs/all": 0.1, "costs/cum/all": 0.1 * (s + 1),
                 "reward/mean": 0.5} for s in range(6)]  # fmt: skip
        events = [{"step": 3, "what": "resumed"}, {"step": 4, "what": "--chaos: killed"}]
        fig = chart_figure(rows, "t", events)
        try:
            ax = fig.axes[0]
            vertical = sorted(
                line.get_xdata()[0]
                for line in ax.get_lines()
                if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2
            )
            assert vertical == [2.5, 4.0]
            assert {"resumed", "--chaos: killed"} <= {text.get_text() for text in ax.texts}
        finally:
            plt.close(fig)

    def test_the_chart_stacks_each_steps_spend_by_outcome(self) -> None:
        """Rows with outcomes: one bar segment per fate that held spend; rows before the
        outcomes were on: a costs/all bar."""
        import matplotlib.pyplot as plt

        from art_ray_metrics.ops.demo import chart_figure

        rows: list[dict[str, Any]] = [
            {"training_step": 0, "costs/all": 0.3, "costs/cum/all": 0.3},
            {"training_step": 1, "costs/all": 0.4, "costs/cum/all": 0.7,
             "costs/outcome/trained": 0.3, "costs/outcome/zero_variance": 0.1,
             "costs/outcome/unknown": 0.0, "costs/outcome/stale": 0.0},
        ]  # fmt: skip
        fig = chart_figure(rows, "t")
        try:
            labels = {c.get_label(): c for c in fig.axes[0].containers}
            assert set(labels) == {
                "costs/all (per step)",
                "costs/outcome/trained",
                "costs/outcome/zero_variance",
            }
            heights = [p.get_height() for p in labels["costs/outcome/zero_variance"].patches]
            assert heights == [0.0, 0.1]
            bottoms = [p.get_y() for p in labels["costs/outcome/zero_variance"].patches]
            assert bottoms == [0.0, 0.3]
        finally:
            plt.close(fig)

    def test_chart_events_are_kept_across_sessions(self, tmp_path: Path) -> None:
        """The resume of each session and the --chaos step stay marked in later charts."""
        from art_ray_metrics.ops.demo import default_options, record_events

        opts = default_options(run="r", storage_uri=str(tmp_path / "r"), resume=True)
        assert record_events(default_options(run="r", storage_uri=opts.storage_uri), 0, 2) == [
            {"step": 2, "what": "--chaos: worker and aggregator killed"}
        ]
        events = record_events(opts, 4, None)
        assert [e["step"] for e in events] == [2, 4]
        assert record_events(opts, 4, None) == events  # the same session again: once

    def test_inspect_prints_counts_whole_and_money_to_the_micro_dollar(self) -> None:
        """Was: every total with six decimals (120,512.000000 tokens)."""
        assert storage.format_total("data/cum/actor_tokens", 120512.0) == "120,512"
        assert storage.format_total("data/cum/num_unique_scenarios", 12.0) == "12"
        assert storage.format_total("costs/cum/all", 1.5) == "$1.500000"
        assert storage.format_total("time/cum/wall_s", 0.125) == "0.125"

    def test_resume_hint_repeats_the_storage(self) -> None:
        """Was: the S3 demo's "continue it" hint omitted --storage."""
        from art_ray_metrics.ops.demo import default_options

        s3 = default_options(run="r", storage_uri="s3://b/p/r", storage_flag=True)
        assert s3.resume_command() == "art-ray-metrics demo --run r --resume --storage s3://b/p/r"
        assert default_options(run="r").resume_command() == "art-ray-metrics demo --run r --resume"

    def test_offline_wandb_summary_names_the_files(self, tmp_path: Path) -> None:
        """The summary says where offline W&B wrote and how to upload it."""
        from art_ray_metrics.export.wandb_offline import offline_sync_command
        from art_ray_metrics.ops.demo import default_options
        from art_ray_metrics.ops.demo.ui import wandb_summary

        opts = default_options(run="r", wandb_mode="offline", wandb_dir=str(tmp_path))
        assert wandb_summary(opts, "abc123") == f"offline run abc123, files in {tmp_path}/wandb"
        assert offline_sync_command(tmp_path, "abc123") == (
            f"wandb sync {tmp_path}/wandb/offline-run-*"
        )


class TestFakeLLM:
    """``art-ray-metrics fake-llm``: the demo's fake API for the quickstarts, from one command."""

    @pytest.mark.slow  # three interpreters (the server, bash, the SDK clients): ~10 s
    def test_prints_exports_that_real_sdks_use_then_stops_on_ctrl_c(self, tmp_path: Path) -> None:
        """Its two export lines, run in a shell with no keys, point the real OpenAI and
        Anthropic clients at it; Ctrl-C stops it with exit 0 and the request count."""
        import signal

        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        server = subprocess.Popen(
            [sys.executable, "-m", "art_ray_metrics", "fake-llm"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            exports = [server.stdout.readline().rstrip("\n") for _ in range(2)]
            assert [line.split("=")[0] for line in exports] == [
                "export OPENAI_BASE_URL",
                "export ANTHROPIC_BASE_URL",
            ]
            client_code = (
                "import anthropic, openai\n"
                "c = openai.OpenAI().chat.completions.create(model='gpt-4.1',"
                " messages=[{'role': 'user', 'content': 'hi'}])\n"
                "m = anthropic.Anthropic().messages.create(model='claude-sonnet-4-6',"
                " max_tokens=8, messages=[{'role': 'user', 'content': 'hi'}])\n"
                "print(c.usage.prompt_tokens > 0, m.usage.input_tokens > 0)\n"
            )
            script = tmp_path / "client.py"
            script.write_text(client_code)
            shell = "\n".join([*exports, f"{shlex.quote(sys.executable)} {script}"])
            used = subprocess.run(
                ["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=60
            )
            assert used.returncode == 0, used.stderr[-2000:]
            assert used.stdout.split() == ["True", "True"]
        finally:
            server.send_signal(signal.SIGINT)
            out, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
        assert out == ""  # only the export lines go to stdout
        assert "stopped after 2 requests" in err

    def test_a_taken_port_is_one_line(self, run_cli: Any, tmp_path: Path) -> None:
        """A port something else holds: exit 2, one line naming it."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            proc = run_cli("fake-llm", "--port", str(port), cwd=tmp_path)
        assert_one_line_error(proc, "fake-llm", f"127.0.0.1:{port}", "--port")
