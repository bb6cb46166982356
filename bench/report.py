"""What the benchmarks that append a markdown report share: the progress log, the report's header
(the commit measured, the machine and its load average), Ctrl-C and SIGTERM as KeyboardInterrupt so
that every finally block runs, and the append to the results file."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType

from tests.harness import REPO_ROOT


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git_commit() -> str:
    try:
        r = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        subject = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%s"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    title = subject.stdout.strip()
    if len(title) > 100:
        title = title[:97] + "..."
    return f"{r.stdout.strip() or '?'} ({title})"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt (SIGINT also when started in the background by a
    shell without job control, which ignores it)."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def header(title: str, machine_note: str) -> list[str]:
    """The report's first lines: `## title (date time)`, then the commit, Python, CPUs and load."""
    load = os.getloadavg()
    return [
        f"## {title} ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Commit measured: {git_commit()}. Python {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}. {machine_note}",
    ]


def append_report(output: str, text: str) -> None:
    """Append `text` to the markdown file `output` after a blank line ('' : no file)."""
    if not output:
        return
    out = Path(output)
    previous = out.read_text() if out.exists() else ""
    out.write_text((previous.rstrip() + "\n\n" if previous.strip() else "") + text)
    log(f"appended to {out}")


_TICK = os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """Seconds of steal time since boot, summed over the CPUs (/proc/stat, `cpu` line, 8th value): the
    time the hypervisor ran something else while this VM's virtual CPUs wanted to run. A stretch of
    steal pauses whatever was running here, the daemon's event loop included; no process can see it
    in its own clock but as slowness."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / _TICK
