"""Operations: exit codes, signals, systemd notification and watchdog, mount(8) and fstab.

The daemon tests run real mounts on the session's SeaweedFS; nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .harness import REPO_ROOT, MakeMount, wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def test_mount_module_imports_without_the_command_line_module() -> None:
    # mount.py takes its exit codes and error types from errors.py; before, it imported cli.py,
    # which imports mount.py: a circle that only worked because cli imported mount late.
    r = subprocess.run(
        [sys.executable, "-c", "import sys, s3cachefs.mount; print('s3cachefs.cli' in sys.modules)"],
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert r.stdout.strip() == "False"


# -- SIGHUP ------------------------------------------------------------------------------------------


def test_sighup_reopens_the_log_file_after_rotation_and_the_mount_keeps_serving(
    make_mount: MakeMount, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    body = os.urandom(256 * 1024)
    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/cold", Body=body)
    log_file = tmp_path / "s3cachefs.log"
    m = make_mount(extra_args=["--log-file", str(log_file), "--log-level", "DEBUG"])
    # The listing task starts after the signal receiver, so once it has logged, SIGHUP is handled
    # (before the event loop runs it is ignored).
    assert wait_until(lambda: "listed 1 objects" in _text(log_file), 30), _text(log_file)

    rotated = tmp_path / "s3cachefs.log.1"
    log_file.rename(rotated)  # what logrotate does before it signals the daemon
    assert m.proc is not None
    os.kill(m.proc.pid, signal.SIGHUP)
    assert wait_until(lambda: "reopened the log file" in _text(log_file), 30), _text(rotated)

    # A cold read logs its GET (DEBUG): the line lands in the new file, not in the rotated one.
    assert (m.path / "local_content/ab/cd/cold").read_bytes() == body
    assert wait_until(lambda: "GET local_content/ab/cd/cold" in _text(log_file), 30), _text(log_file)
    assert "GET local_content/ab/cd/cold" not in _text(rotated)
    assert m.running and m.is_mounted()
    (m.path / "local_content/ab/cd/new").write_bytes(b"after the reload")
    assert s3.get_object(Bucket=bucket, Key="local_content/ab/cd/new")["Body"].read() == b"after the reload"
    m.unmount()
    assert "unmounted" in _text(log_file)


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
