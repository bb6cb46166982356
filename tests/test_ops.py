"""Operations: exit codes, signals, systemd notification and watchdog, mount(8) and fstab.

The daemon tests run real mounts on the session's SeaweedFS; nothing is mocked.
"""

from __future__ import annotations

import subprocess
import sys

from .harness import REPO_ROOT


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
