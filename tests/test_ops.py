"""Operations: exit codes, signals, systemd notification and watchdog, mount(8) and fstab.

The daemon tests run real mounts on the session's SeaweedFS; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .harness import (
    REPO_ROOT,
    HarnessError,
    MakeMount,
    Mount,
    S3Server,
    check_fuse_available,
    fusermount_unmount,
    is_mounted,
    wait_until,
)

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


# -- mount(8) and fstab -------------------------------------------------------------------------------

# mount(8) runs its helper (/sbin/mount.fuse3) without PATH in the environment, and mount.fuse3 runs
# `s3cachefs SOURCE MOUNTPOINT -o OPTIONS` through /bin/sh, which then searches its built-in default
# path /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin (measured with strace: a PATH
# given to mount(8) never reaches the helper). So the test's wrapper must live in one of those
# directories for the duration of the test: /usr/local/sbin, searched first, so that it wins over an
# s3cachefs that scripts/install.sh may have linked into /usr/local/bin. An existing
# /usr/local/sbin/s3cachefs is never replaced, and a lock file keeps two test runs from sharing it.
HELPER_DIR = Path("/usr/local/sbin")
HELPER_LOCK = Path("/tmp/s3cachefs-test-mount-helper.lock")
HELPER_MARK = "Written by s3cachefs's tests/test_ops.py"


@contextlib.contextmanager
def s3cachefs_on_mount_helper_path() -> Iterator[Path]:
    """An `s3cachefs` in /usr/local/sbin that runs this checkout with the test interpreter."""
    target = HELPER_DIR / "s3cachefs"
    with open(HELPER_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Under the lock, a wrapper of ours is the leftover of a run that was killed: replaced.
        ours = (
            not target.is_symlink() and target.is_file() and HELPER_MARK in target.read_text(errors="replace")
        )
        if (target.exists() or target.is_symlink()) and not ours:
            pytest.fail(f"{target} exists; this test does not replace it (remove it to run the test)")
        tmp = HELPER_DIR / f".s3cachefs-test-{os.getpid()}"
        tmp.write_text(
            "#!/bin/sh\n"
            f"# {HELPER_MARK} for one test; removed when it ends.\n"
            f"PYTHONPATH={shlex.quote(str(REPO_ROOT))}; export PYTHONPATH\n"
            f'exec {shlex.quote(sys.executable)} -m s3cachefs.cli "$@"\n'
        )
        tmp.chmod(0o755)
        tmp.rename(target)
        try:
            yield target
        finally:
            target.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        return _process_state(pid) != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["mount -t", "fstab"])
def test_mount8_and_fstab_mount_through_mount_fuse3_and_umount_ends_the_daemon(
    s3server: S3Server, bucket: str, s3: S3Client, tmp_path: Path, how: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mount(8) of an fstab entry without `user` needs root")
    try:
        check_fuse_available()
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    mnt, cache_dir, log_file = tmp_path / "mnt", tmp_path / "cache", tmp_path / "s3cachefs.log"
    mnt.mkdir()
    conf = tmp_path / "s3cachefs.toml"
    # Credentials in the file, as an fstab mount needs them: systemd's mount units carry no AWS_*
    # environment. The environment below has none, so only the file can supply them.
    conf.write_text(
        f'endpoint_url = "{s3server.endpoint_url}"\n'
        'region_name = "us-east-1"\n'
        f'access_key_id = "{s3server.access_key}"\n'
        f'secret_access_key = "{s3server.secret_key}"\n'
        f'cache_dir = "{cache_dir}"\n'
        f'log_file = "{log_file}"\n'
    )
    conf.chmod(0o600)
    env = s3server.env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        del env[name]
    if how == "fstab":
        fstab = tmp_path / "fstab"
        fstab.write_text(f"{bucket} {mnt} fuse.s3cachefs config={conf},_netdev,nofail 0 0\n")
        command = ["mount", "--fstab", str(fstab), str(mnt)]
    else:
        command = ["mount", "-t", "fuse.s3cachefs", "-o", f"config={conf},_netdev,nofail", bucket, str(mnt)]

    pid = None
    with s3cachefs_on_mount_helper_path():
        try:
            # mount(8) returns once the helper exits: the daemon must be in the background by then,
            # with the mount up.
            r = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
            assert r.returncode == 0, (r.stdout, r.stderr, _text(log_file))
            assert os.path.ismount(mnt), _text(log_file)
            pid = int((cache_dir / "lock").read_text())  # the daemon notes its pid there
            assert _alive(pid)

            (mnt / "local_content/ab/cd").mkdir(parents=True)
            (mnt / "local_content/ab/cd/via-mount8").write_bytes(b"mounted by mount(8)")
            got = s3.get_object(Bucket=bucket, Key="local_content/ab/cd/via-mount8")["Body"].read()
            assert got == b"mounted by mount(8)"

            u = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60, check=False)
            assert u.returncode == 0, u.stderr
            assert wait_until(lambda: not _alive(pid), 30), _text(log_file)
            assert not os.path.ismount(mnt)
            assert "unmounted" in _text(log_file)  # the clean exit path, not a crash
        finally:
            if os.path.ismount(mnt) or is_mounted(mnt):
                fusermount_unmount(mnt, lazy=True)
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- SIGUSR1 -----------------------------------------------------------------------------------------


def test_sigusr1_with_the_index_locked_by_another_process_logs_an_error_and_the_mount_stays_up(
    make_mount: MakeMount, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    log_file = tmp_path / "s3cachefs.log"
    m = make_mount(extra_args=["--log-file", str(log_file)])
    assert wait_until(lambda: "listed 0 objects" in _text(log_file), 30), _text(log_file)  # signals handled
    assert m.proc is not None
    # Another writer (a stuck `sqlite3` shell, a backup tool) holds the index's write lock: saving the
    # counters waits sqlite's busy timeout and fails with "database is locked".
    other = sqlite3.connect(m.cache_dir / "index.sqlite", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        os.kill(m.proc.pid, signal.SIGUSR1)
        assert wait_until(lambda: "could not save the counters" in _text(log_file), 30), _text(log_file)
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert m.running and m.is_mounted()
    (m.path / "after-sigusr1").write_bytes(b"still serving")
    assert s3.get_object(Bucket=bucket, Key="after-sigusr1")["Body"].read() == b"still serving"
    m.unmount()


def test_the_slow_steps_aid_logs_a_task_that_held_the_event_loop_and_where(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import trio

    from s3cachefs import slowsteps

    monkeypatch.setenv(slowsteps.ENV, "20")
    instruments = slowsteps.from_env()

    async def blocks_the_loop() -> None:
        time.sleep(0.05)  # no await: every other task waits
        await trio.sleep(0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocks_the_loop, name="blocker")
            nursery.start_soon(trio.sleep, 0.001, name="quick")

    with caplog.at_level("WARNING", logger="s3cachefs.slowsteps"):
        trio.run(main, instruments=instruments)
    slow = [r.getMessage() for r in caplog.records if "slow step" in r.getMessage()]
    assert len(slow) == 1, slow
    assert "task blocker held the event loop" in slow[0] and "(blocks_the_loop)" in slow[0], slow[0]
    monkeypatch.setenv(slowsteps.ENV, "")
    assert slowsteps.from_env() == []


def test_the_slow_steps_aid_logs_garbage_collections_in_worker_threads_too(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A collection holds the GIL wherever it runs: one in a worker thread stalls the loop between
    its steps, where no step shows it, so the aid times collections in every thread."""
    import gc

    import trio

    from s3cachefs import slowsteps

    monkeypatch.setenv(slowsteps.ENV, "0")  # every collection, however short
    instruments = slowsteps.from_env()
    callbacks = len(gc.callbacks)

    async def main() -> None:
        await trio.to_thread.run_sync(gc.collect)

    with caplog.at_level("WARNING", logger="s3cachefs.slowsteps"):
        trio.run(main, instruments=instruments)
    collections = [r.getMessage() for r in caplog.records if "slow garbage collection" in r.getMessage()]
    assert any("generation 2" in c and "MainThread" not in c for c in collections), collections
    assert len(gc.callbacks) == callbacks  # taken out when the loop ends
