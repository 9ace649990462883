"""Run every benchmark script and write their output to an untracked report.

Each script runs in its own subprocess (``bench_ingest.py`` starts its own local Ray instance,
never one a previous ``ray start`` left behind: ``RAY_ADDRESS`` is removed from the scripts'
environment), one after the other, so they never compete for the CPUs. Scripts that accept
``--quick`` get it when this runner is given ``--quick``. Markdown output is copied as is;
plain-text output is fenced. A failing or timed-out script is reported in the file (with the
tail of its stderr) and makes this runner exit non-zero, after the others have run.

The report goes to ``bench/results/local/benchmarks.md`` (gitignored). The tracked tables
(``docs/benchmarks.md``, ``bench/results/checkpoint.md``) change only with ``--update-docs``,
and only when every script of a full (not ``--quick``, not ``--only``) run succeeded.

Run: ``python bench/run_all.py [--quick] [--out PATH] [--only bench_core ...] [--update-docs]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SCRIPTS = (
    "bench_core.py",
    "bench_ingest.py",
    "bench_flush.py",
    "bench_decorator.py",
    "bench_checkpoint.py",
    "bench_budget.py",
)
LOCAL = BENCH / "results" / "local"
DOCS_REPORT = ROOT / "docs" / "benchmarks.md"
TRACKED_CHECKPOINT = BENCH / "results" / "checkpoint.md"
SCRIPT_TIMEOUT_S = 1800


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def _git() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"{rev}{' (with uncommitted changes)' if dirty else ''}" if rev else "unknown"
    except OSError:
        return "unknown"


def machine_info() -> list[str]:
    """Markdown bullet lines describing the machine and software."""
    return [
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPUs (nproc): {os.cpu_count()} × {_cpu_model()}; memory {_memory_gb()}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}; ray {_version('ray')}; numpy {_version('numpy')}; "
        f"msgpack {_version('msgpack')}; art-ray-metrics {_version('art-ray-metrics')} "
        f"(git {_git()})",
    ]


def _render(text: str) -> str:
    """Markdown output as is (headings nested under the script's section, plain-text lines
    before the first Markdown line fenced); plain-text output fenced."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith(("|", "#"))), None)
    if first is None:
        return f"```text\n{text}\n```"
    parts = []
    preface = "\n".join(lines[:first]).strip()
    if preface:
        parts.append(f"```text\n{preface}\n```\n")
    for line in lines[first:]:
        heading = re.match(r"^(#{1,2}) ", line)
        parts.append("###" + line[len(heading.group(1)) :] if heading else line)
    return "\n".join(parts)


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def script_env() -> dict[str, str]:
    """The scripts' environment: a fresh local Ray each time, never a stale cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_script(name: str, quick: bool, results: Path) -> tuple[str, bool]:
    """Run one script; return its Markdown section and whether it succeeded."""
    path = BENCH / name
    cmd = [sys.executable, str(path.relative_to(ROOT))]
    source = path.read_text()
    if quick and '"--quick"' in source:
        cmd.append("--quick")
    shown = "python " + " ".join(cmd[1:])
    if '"--results"' in source:
        cmd += ["--results", str(results / f"{path.stem.removeprefix('bench_')}.md")]
    print(f"[run_all] {shown}", file=sys.stderr, flush=True)
    load = _loadavg()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=script_env(),
            timeout=SCRIPT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:

        def _text(data: bytes | str | None) -> str:
            return data.decode(errors="replace") if isinstance(data, bytes) else data or ""

        proc = subprocess.CompletedProcess(
            cmd, -1, _text(exc.stdout), _text(exc.stderr) + f"\ntimed out after {exc.timeout} s"
        )
    elapsed = time.perf_counter() - t0
    load = f"{load} before, {_loadavg()} after"
    # Ray's log monitor prints raylet warnings on the driver's stdout: keep them out of tables
    noise = [line for line in proc.stdout.splitlines() if "(raylet)" in line]
    out = "\n".join(line for line in proc.stdout.splitlines() if "(raylet)" not in line).strip()
    body = _render(out)
    section = [f"## {name}", "", f"`{shown}` ({elapsed:.0f} s; 1-min load average {load})"]
    section += ["", body]
    if noise:
        section += ["", "<details><summary>Ray warnings printed during the run</summary>", ""]
        section += ["```text", *(_strip_ansi(line) for line in noise), "```", "</details>"]
    ok = proc.returncode == 0
    if not ok:
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        section += ["", f"**Failed with exit code {proc.returncode}.** Last lines of stderr:", ""]
        section += ["```text", tail, "```"]
    print(f"[run_all] {name}: {'ok' if ok else 'FAILED'} in {elapsed:.0f} s", file=sys.stderr)
    return "\n".join(section), ok


def main() -> None:
    """Run the scripts and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument(
        "--out",
        default=str(LOCAL / "benchmarks.md"),
        help="the report (default bench/results/local/benchmarks.md, untracked)",
    )
    parser.add_argument("--only", nargs="*", help="script names (with or without .py)")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="after a complete full run, also write docs/benchmarks.md and "
        "bench/results/checkpoint.md (the tracked tables)",
    )
    args = parser.parse_args()
    if args.update_docs and (args.quick or args.only):
        parser.error("--update-docs needs a full run: drop --quick and --only")
    out = Path(args.out)
    wanted = {n if n.endswith(".py") else f"{n}.py" for n in args.only or ()}
    scripts = [s for s in SCRIPTS if (BENCH / s).exists() and (not wanted or s in wanted)]
    command = "python bench/run_all.py" + (" --quick" if args.quick else "")
    if args.only:
        command += " --only " + " ".join(args.only)
    machine = machine_info()  # before the scripts write their tracked result files
    t0 = time.perf_counter()
    sections, failed = [], []
    for name in scripts:
        text, ok = run_script(name, args.quick, out.parent)
        sections.append(text)
        if not ok:
            failed.append(name)
    total = time.perf_counter() - t0
    header = [
        "# Benchmarks",
        "",
        "Generated by `bench/run_all.py`; every figure below was measured in the run described "
        "here. Benchmarks are scripts, not tests: nothing asserts a time. Each script documents "
        "its method in its module docstring.",
        "",
        f"Command: `{command}` (from the repository root; total {total:.0f} s)",
        "",
        *machine,
    ]
    if failed:
        header += ["", f"**Failed scripts: {', '.join(failed)}.**"]
    text = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[run_all] wrote {out} in {total:.0f} s", file=sys.stderr)
    if args.update_docs:
        if failed:
            print(
                f"[run_all] --update-docs: not updating the tracked tables ({', '.join(failed)} "
                "failed)",
                file=sys.stderr,
            )
        else:
            DOCS_REPORT.write_text(text)
            local_ckpt = out.parent / "checkpoint.md"
            if local_ckpt.exists():
                shutil.copyfile(local_ckpt, TRACKED_CHECKPOINT)
            print(f"[run_all] updated {DOCS_REPORT} and {TRACKED_CHECKPOINT}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
