"""Operations: exit codes, signals, systemd notification and watchdog, mount(8) and fstab.

The daemon tests run real mounts on the session's SeaweedFS; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .harness import REPO_ROOT, MakeMount, Mount, S3Server, wait_until

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


# -- systemd notification and watchdog ----------------------------------------------------------------


class NotifiedMount(Mount):
    """A Mount whose daemon believes it runs under systemd: NOTIFY_SOCKET and WATCHDOG_USEC set."""

    def __init__(self, *args: Any, notify_socket: Path, watchdog_usec: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notify_socket = notify_socket
        self.watchdog_usec = watchdog_usec

    def env(self) -> dict[str, str]:
        env = super().env()
        env["NOTIFY_SOCKET"] = str(self.notify_socket)
        env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        env.pop("WATCHDOG_PID", None)
        return env


class NotifyListener:
    """The systemd end of sd_notify: a unix datagram socket that collects what the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        """Everything already sent, without waiting."""
        got = []
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(self.sock.recv(4096).decode())
        self.messages += got
        return got

    def wait_for(self, message: str, count: int, timeout: float) -> int:
        """Wait until `message` has arrived `count` times (or `timeout` passed); returns how many did."""
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < count and (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(got)
            seen += got == message
        return seen

    def close(self) -> None:
        self.sock.close()


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]  # after "(comm)": R, S, T (stopped), ...


def test_daemon_notifies_ready_and_pings_the_watchdog_from_its_event_loop_until_it_stops_running(
    s3server: S3Server, bucket: str, tmp_path: Path
) -> None:
    # sun_path holds 108 bytes, more than pytest's tmp_path may leave: the socket lives in /tmp.
    sock_dir = Path(tempfile.mkdtemp(prefix="s3cfs-notify-"))
    listener = NotifyListener(sock_dir / "notify")
    # 0.4 s: a ping every 0.2 s, so a few seconds hold many of them.
    m = NotifiedMount(
        s3server,
        bucket,
        path=tmp_path / "mnt",
        cache_dir=tmp_path / "cache",
        log_path=tmp_path / "mount.log",
        notify_socket=sock_dir / "notify",
        watchdog_usec=400_000,
    )
    try:
        m.start()
        assert m.proc is not None
        pid = m.proc.pid
        assert listener.wait_for("READY=1", 1, 30) == 1, (listener.messages, m.log_tail())
        assert listener.wait_for("WATCHDOG=1", 5, 30) == 5, listener.messages

        # A stopped daemon runs no event loop, as a wedged one would not: the pings must stop.
        os.kill(pid, signal.SIGSTOP)
        try:
            assert wait_until(lambda: _process_state(pid) == "T", 10)
            listener.drain()  # sent before it stopped
            assert listener.wait_for("WATCHDOG=1", 1, 3) == 0, "pings from a stopped process"
        finally:
            os.kill(pid, signal.SIGCONT)
        assert listener.wait_for("WATCHDOG=1", 3, 30) == 3, listener.messages
        assert (m.path / "probe").write_bytes(b"still serving") == len(b"still serving")

        m.unmount()
        listener.drain()
        assert "STOPPING=1" in listener.messages
    finally:
        m.cleanup()
        listener.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_no_watchdog_pings_when_watchdog_pid_names_another_process(
    s3server: S3Server, bucket: str, tmp_path: Path
) -> None:
    # systemd sets WATCHDOG_PID to the main process; a child that inherits the environment (a
    # daemon started from a watched script) must not ping on the main process's behalf.
    sock_dir = Path(tempfile.mkdtemp(prefix="s3cfs-notify-"))
    listener = NotifyListener(sock_dir / "notify")

    class OtherPid(NotifiedMount):
        def env(self) -> dict[str, str]:
            return super().env() | {"WATCHDOG_PID": "1"}

    m = OtherPid(
        s3server,
        bucket,
        path=tmp_path / "mnt",
        cache_dir=tmp_path / "cache",
        log_path=tmp_path / "mount.log",
        notify_socket=sock_dir / "notify",
        watchdog_usec=400_000,
    )
    try:
        m.start()
        assert listener.wait_for("READY=1", 1, 30) == 1, (listener.messages, m.log_tail())
        # Ten intervals' worth of silence.
        assert listener.wait_for("WATCHDOG=1", 1, 2) == 0, listener.messages
        m.unmount()
    finally:
        m.cleanup()
        listener.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
