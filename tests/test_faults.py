"""Faults, counted: writes through a real mount while S3, the daemon or the cache disk misbehave.

Every scenario writes Synapse-like files (makedirs, open for writing, 64 KiB writes, close), records
for each write whether close() succeeded or which errno it got and how long close() took, then
restores the world and checks, against the bucket read directly on SeaweedFS (never through the
proxy).

Two kinds of write are mixed: originals (local_content/, remote_content/: "sync", close() returns
once S3 holds the file) and thumbnails (local_thumbnails/, remote_thumbnail/: "async", the default
policies' upload = "async": close() returns once the file is durable on the cache disk and its upload
queued; a background uploader sends it, and the next mount resumes the queue). An async close() that
returned 0 is acknowledged just the same. So after the faults every scenario kills the daemon (kill
-9: a crash leaves the queue to the replay, where a clean stop would send it first), where it can
in the middle of an outage of S3 after writing thumbnails that cannot be sent, restores the world,
mounts again on the same cache directory and gives the queue a bounded time to drain. Then:

  1. every write whose close() succeeded is in S3 with exactly its bytes (the last acknowledged
     version of its path, compared by MD5), sync or async;
  2. every write that failed returned an error to the writer (no write "succeeds" and is lost);
  3. no zero-byte or partial object is ever in the bucket: a watcher thread lists the bucket every
     quarter second *during* the faults and matches every object's size and ETag against the
     versions that were written, and at the end every object's bytes are checked;
  4. a key whose writes all failed is absent. The one exception is a fault that can lose the
     *answer* to a request the server executed (the server killed or stopped, the daemon killed):
     then the bytes the writer meant may be stored although it was told "error". That is inherent
     to any request/response protocol, counted as "stored despite error", and only allowed there;
     a fault the proxy injects never forwards a complete request, so there it is a failure;
  5. no multipart upload is left incomplete unless its abort failed (logged by s3cachefs) or its
     answer was lost in a crash;
  6. no syscall took longer than the bound that the mount's S3 timeouts imply (Timeouts below),
     and the mount still works afterwards, without a remount. An async close() does not wait for
     S3, so the bound holds for it trivially; an async close() during the outage must also be
     shorter than one S3 attempt, which a close() that waited for S3 there cannot be.

The same scenario functions run here with small counts (CI) and from bench/faults.py with at least
1000 writes in all; both print the same table.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import random
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import boto3
import botocore.config
import botocore.exceptions
import pytest

from s3cachefs.config import DEFAULT_POLICIES, policy_for

from .faultproxy import FaultProxy
from .harness import TEST_REGION, MakeMount, Mount, S3Server, queued_entries, queues_empty, wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.mount

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB  # Synapse writes media in 64 KiB pieces

# -- the time bound ---------------------------------------------------------------------------------

# botocore sends S3 PUT and UploadPart bodies with "Expect: 100-continue" and waits this long for the
# 100 before sending the body anyway (botocore/awsrequest.py, AWSConnection._send_output).
EXPECT_CONTINUE_WAIT_S = 1.0
# botocore "standard" retries sleep rand(0, 1) * min(scale * 2**i, 20 s) before retry i (0-based);
# scale is 1 s for throttling answers (503 SlowDown) and 0.05 s otherwise: take the larger.
BACKOFF_SCALE_S = 1.0
MAX_BACKOFF_S = 20.0
# s3.py uploads at most 4 parts of one file at a time.
PARTS_IN_PARALLEL = 4


@dataclass(frozen=True)
class Timeouts:
    """The mount's S3 settings, and the longest any syscall may take with them.

    One attempt of one S3 request can take at most: the TCP connect (connect timeout), botocore's
    wait for "100 Continue", a body send that stalls (urllib3 leaves the connect timeout on the socket
    while the request is sent), and the wait for the answer (read timeout). A request makes
    `max_attempts` attempts with the backoffs between them. close() of a file under the multipart
    threshold is one PUT; a multipart close is CreateMultipartUpload, the parts (4 at a time),
    CompleteMultipartUpload and, after a failure, AbortMultipartUpload, one after the other. Any other
    syscall costs at most a HEAD and a LIST (a lookup miss). `slack_s` covers local work and a loaded
    2-core machine. With the defaults: 16 s for a PUT close, 49 s for a 2-part multipart close.
    """

    max_attempts: int = 2
    connect_s: float = 1.0
    read_s: float = 2.0
    part_size: int = 5 * MiB
    slack_s: float = 5.0

    def mount_args(self) -> list[str]:
        return [
            "--max-attempts", str(self.max_attempts),
            "--connect-timeout", f"{self.connect_s:g}",
            "--read-timeout", f"{self.read_s:g}",
            "--multipart-threshold", str(self.part_size),
            "--multipart-chunksize", str(self.part_size),
        ]  # fmt: skip

    @property
    def attempt_s(self) -> float:
        return self.connect_s + EXPECT_CONTINUE_WAIT_S + self.connect_s + self.read_s

    @property
    def backoff_s(self) -> float:
        return sum(min(BACKOFF_SCALE_S * 2.0**i, MAX_BACKOFF_S) for i in range(self.max_attempts - 1))

    @property
    def request_s(self) -> float:
        return self.max_attempts * self.attempt_s + self.backoff_s

    def parts(self, size: int) -> int:
        return math.ceil(size / self.part_size)

    def close_bound_s(self, size: int) -> float:
        # Create, the parts (4 at a time), complete, abort; or one PUT.
        requests = 1 if size < self.part_size else 2 + math.ceil(self.parts(size) / PARTS_IN_PARALLEL) + 1
        return requests * self.request_s + self.slack_s

    @property
    def syscall_bound_s(self) -> float:
        return 2 * self.request_s + self.slack_s

    @property
    def pause_s(self) -> float:
        """How long a SIGSTOP lasts: long enough for a PUT caught by it to use up all its attempts."""
        return self.request_s + 1.0


# How long the queue may take to drain after the remount (S3 is well again by then); a queued upload
# that failed is retried at once by the new daemon.
QUEUE_DRAIN_S = 60.0
# Thumbnails written during the outage just before the kill -9: acknowledged, and unsendable until
# after the remount.
OUTAGE_ASYNC_WRITES = 2

# -- what was written -------------------------------------------------------------------------------

KINDS_OF_WRITE = ("sync", "async")


def write_kind(rel: str) -> str:
    """The kind of a write to rel: async if the default policies queue its upload at close()."""
    p = policy_for(DEFAULT_POLICIES, rel)
    return "async" if p is not None and p.upload_async else "sync"


def expected_etag(data: bytes, part_size: int) -> str:
    """The ETag S3 gives these bytes as s3cachefs uploads them (plain MD5, or MD5 of part MD5s -N)."""
    if len(data) < part_size:
        return hashlib.md5(data).hexdigest()
    digests = b"".join(hashlib.md5(data[i : i + part_size]).digest() for i in range(0, len(data), part_size))
    return f"{hashlib.md5(digests).hexdigest()}-{math.ceil(len(data) / part_size)}"


@dataclass
class Attempt:
    seq: int
    rel: str
    size: int
    md5: str
    etag: str
    probe: bool = False
    kind: str = "sync"  # sync | async (write_kind)
    outcome: str = "pending"  # ok | error | hung
    failed_at: str = ""  # mkdir | open | write | close
    err: str = ""  # errno name
    close_err: str = ""  # what close() said after a failed write ("" = success)
    close_s: float = 0.0
    other_s: float = 0.0  # the slowest syscall other than close()


class Ledger:
    """Every write attempt, in order, registered before its first syscall (the watcher relies on it)."""

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self._lock = threading.Lock()
        self._attempts: list[Attempt] = []
        self._by_path: dict[str, list[Attempt]] = {}
        self.removed: set[str] = set()  # unlinked through the mount on purpose: must be absent
        self.unlink_failed: set[str] = set()  # unlink returned an error: present or absent, both fine

    def begin(self, rel: str, data: bytes, probe: bool = False) -> Attempt:
        a = Attempt(
            0,
            rel,
            len(data),
            hashlib.md5(data).hexdigest(),
            expected_etag(data, self.part_size),
            probe,
            write_kind(rel),
        )
        with self._lock:
            a.seq = len(self._attempts)
            self._attempts.append(a)
            self._by_path.setdefault(rel, []).append(a)
            self.removed.discard(rel)
        return a

    def attempts(self) -> list[Attempt]:
        with self._lock:
            return list(self._attempts)

    def paths(self) -> list[str]:
        with self._lock:
            return list(self._by_path)

    def history(self, rel: str) -> list[Attempt]:
        with self._lock:
            return list(self._by_path.get(rel, []))

    def versions(self, rel: str) -> set[tuple[int, str]]:
        with self._lock:
            return {(a.size, a.etag) for a in self._by_path.get(rel, [])}

    def forget(self, rel: str) -> None:
        """rel was unlinked: its writes still count, its object must be gone."""
        with self._lock:
            self._by_path.pop(rel, None)
            self.removed.add(rel)

    def acknowledged(self) -> list[str]:
        with self._lock:
            return [rel for rel, h in self._by_path.items() if any(a.outcome == "ok" for a in h)]


def last_ok(history: Sequence[Attempt]) -> Attempt | None:
    oks = [a for a in history if a.outcome == "ok"]
    return oks[-1] if oks else None


# -- the tally --------------------------------------------------------------------------------------


@dataclass
class Counts:
    """The writes of one kind (sync or async)."""

    writes: int = 0
    acked: int = 0
    failed: int = 0
    lost: int = 0  # keys whose last acknowledged version is missing or wrong in S3
    max_close_s: float = 0.0

    def add(self, other: Counts) -> None:
        self.writes += other.writes
        self.acked += other.acked
        self.failed += other.failed
        self.lost += other.lost
        self.max_close_s = max(self.max_close_s, other.max_close_s)


@dataclass
class Tally:
    kind: str
    timeouts: Timeouts
    by_kind: dict[str, Counts] = field(default_factory=lambda: {k: Counts() for k in KINDS_OF_WRITE})
    hung: int = 0
    stored_despite_error: int = 0
    mount_view_wrong: int = 0
    over_bound: int = 0
    orphan_uploads: int = 0
    max_other_s: float = 0.0
    queued_at_kill: int = 0  # queue entries the daemon had just before the last kill -9
    drain_s: float = 0.0  # from the remount until both queues were empty
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)  # "close:EIO" -> count
    events: Counter[str] = field(default_factory=Counter)  # kills, pauses, injected faults, ...
    problems: list[str] = field(default_factory=list)
    # Keys that held a 0-byte object or bytes that are no version written, seen by the watcher
    # during the faults or by the final check (each key counted once).
    bad_keys: set[str] = field(default_factory=set)

    @property
    def zero_or_partial(self) -> int:
        return len(self.bad_keys)

    @property
    def writes(self) -> int:
        return sum(c.writes for c in self.by_kind.values())

    @property
    def acked(self) -> int:
        return sum(c.acked for c in self.by_kind.values())

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.by_kind.values())

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(text)

    def count_writes(self, ledger: Ledger) -> None:
        for a in ledger.attempts():
            if a.probe:
                continue
            c = self.by_kind[a.kind]
            c.writes += 1
            c.max_close_s = max(c.max_close_s, a.close_s)
            self.max_other_s = max(self.max_other_s, a.other_s)
            if a.outcome == "ok":
                c.acked += 1
            elif a.outcome == "error":
                c.failed += 1
                then = f", then close:{a.close_err or 'ok'}" if a.failed_at == "write" else ""
                self.errors[f"{a.failed_at}:{a.err}{then}"] += 1
            else:
                self.hung += 1
                self.problem(f"{a.rel}: a syscall hung past the watchdog ({a.failed_at or 'write'})")
            # The same bound for both kinds: an async close() does not wait for S3, so it holds
            # trivially there; over the queue's limit an async path uploads at close() like the others.
            bound = self.timeouts.close_bound_s(a.size)
            if a.close_s > bound or a.other_s > self.timeouts.syscall_bound_s:
                self.over_bound += 1
                self.problem(
                    f"{a.rel} ({a.size} B): close() took {a.close_s:.1f}s (bound {bound:.0f}s), "
                    f"slowest other syscall {a.other_s:.1f}s (bound {self.timeouts.syscall_bound_s:.0f}s)"
                )


# -- writing through the mount ----------------------------------------------------------------------


def _ename(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


class Progress:
    """Where the writer is, so that a fault can be aimed at a close() in progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = (-1, "idle", 0)
        self._async_acked = -1  # the index of the last async write whose close() returned 0
        self.finished = threading.Event()

    def set(self, index: int, phase: str, size: int) -> None:
        with self._lock:
            self._state = (index, phase, size)

    def get(self) -> tuple[int, str, int]:
        with self._lock:
            return self._state

    def async_acked(self, index: int) -> None:
        with self._lock:
            self._async_acked = index

    def wait_for_async_ack(self, min_index: int, timeout: float) -> bool:
        """Until the close() of an async write >= min_index has returned 0 (its upload just queued)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.finished.is_set():
            with self._lock:
                if self._async_acked >= min_index:
                    return True
            time.sleep(0.002)
        return False

    def wait_for_close(self, min_index: int, min_size: int, timeout: float) -> bool:
        """Until the writer is inside close() of write >= min_index of at least min_size bytes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.finished.is_set():
            index, phase, size = self.get()
            if index >= min_index and phase == "close" and size >= min_size:
                return True
            time.sleep(0.002)
        return False


def _timed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def write_file(
    root_fd: int, rel: str, data: bytes, a: Attempt, progress: Progress | None, index: int
) -> None:
    """makedirs + open(O_WRONLY|O_CREAT|O_TRUNC) + 64 KiB writes + close(), as Synapse stores media.

    Paths are resolved from an fd on the mount root, never from the mount point's path: if the daemon
    is killed, they fail with ENOTCONN instead of landing in the directory under the dead mount.
    """
    slowest = 0.0
    parts = rel.split("/")
    for i in range(1, len(parts)):
        d = "/".join(parts[:i])
        t = time.monotonic()
        try:
            os.mkdir(d, 0o755, dir_fd=root_fd)
        except FileExistsError:
            pass
        except OSError as e:
            a.outcome, a.failed_at, a.err, a.other_s = "error", "mkdir", _ename(e), time.monotonic() - t
            return
        slowest = max(slowest, time.monotonic() - t)
    t = time.monotonic()
    try:
        fd = os.open(rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=root_fd)
    except OSError as e:
        a.outcome, a.failed_at, a.err = "error", "open", _ename(e)
        a.other_s = max(slowest, time.monotonic() - t)
        return
    slowest = max(slowest, time.monotonic() - t)
    if progress is not None:
        progress.set(index, "write", len(data))
    view = memoryview(data)
    off = 0
    try:
        while off < len(data):
            t = time.monotonic()
            n = os.write(fd, view[off : off + CHUNK])
            slowest = max(slowest, time.monotonic() - t)
            if n <= 0:
                raise OSError(errno.EIO, "write returned 0")
            off += n
    except OSError as e:
        slowest = max(slowest, time.monotonic() - t)  # a write() that failed counts too
        a.failed_at, a.err = "write", _ename(e)
    if progress is not None:
        progress.set(index, "close", len(data))
    t = time.monotonic()
    try:
        os.close(fd)
    except OSError as e:
        if not a.failed_at:
            a.failed_at, a.err = "close", _ename(e)
        else:
            a.close_err = _ename(e)
    a.close_s = time.monotonic() - t
    a.other_s = slowest
    a.outcome = "error" if a.failed_at else "ok"
    if progress is not None:
        if a.outcome == "ok" and a.kind == "async":
            progress.async_acked(index)
        progress.set(index, "idle", 0)


class Gate:
    """The mount root fd writers use; closed while the daemon is being killed and remounted."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._all: list[int] = []

    def open(self, mount: Mount) -> int:
        fd = os.open(mount.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with self._cond:
            self._fd = fd
            self._all.append(fd)
            self._cond.notify_all()
        return fd

    def shut(self) -> None:
        with self._cond:
            self._fd = None

    def wait(self, timeout: float = 120.0) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: self._fd is not None, timeout):
                raise TimeoutError("the mount did not come back")
            assert self._fd is not None
            return self._fd

    def close_all(self) -> None:
        """Only once no writer can use them any more (an fd number must not be reused under one)."""
        with self._cond:
            for fd in self._all:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._all.clear()
            self._fd = None


class Jobs:
    """Synapse-like paths and random sizes, reproducible from the seed.

    Originals: most are small (1 B to 128 KiB, like chat images), a quarter up to 2 MiB, and every
    12th is over the 5 MiB multipart threshold (2 or 3 parts). A share `thumbnails` of the other new
    paths are thumbnails (async uploads), 1 B to 256 KiB, in Synapse's layout. Never empty:
    s3cachefs keeps empty files local on purpose. `rewrite` is the chance to write an existing path
    again, which checks that a failed overwrite leaves the previous version in place. Writes listed
    in `aim` (a fault is aimed at their close()) are new originals of 512 KiB to 2 MiB, so that their
    upload lasts long enough; those in `aim_async` are new thumbnails (a fault follows their close()).
    """

    def __init__(
        self,
        rng: random.Random,
        ledger: Ledger,
        rewrite: float,
        medium_max: int = 2 * MiB,
        big_every: int = 12,
        thumbnails: float = 0.25,
    ) -> None:
        self.rng = rng
        self.ledger = ledger
        self.rewrite = rewrite
        self.medium_max = medium_max
        self.big_every = big_every
        self.thumbnails = thumbnails
        self.aim: set[int] = set()
        self.aim_async: set[int] = set()

    def big(self, i: int) -> bool:
        return bool(self.big_every) and i % self.big_every == 2

    def size(self, i: int, kind: str) -> int:
        r = self.rng
        if kind == "async":
            return r.choice((1, r.randint(2, 16 * KiB), r.randint(16 * KiB, 256 * KiB)))
        if self.big(i):
            return r.randint(5 * MiB + 1, 11 * MiB)
        if i in self.aim:
            return r.randint(512 * KiB, 2 * MiB)
        if r.random() < 0.25:
            return r.randint(128 * KiB, self.medium_max)
        return r.choice(
            (1, r.randint(2, 4 * KiB), r.randint(4 * KiB, 128 * KiB), r.randint(4 * KiB, 128 * KiB))
        )

    def next(self, i: int) -> tuple[str, bytes]:
        r = self.rng
        paths = self.ledger.paths()
        if paths and i not in self.aim | self.aim_async and r.random() < self.rewrite:
            rel = r.choice(paths)
        else:
            media_id = "".join(
                r.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(24)
            )
            thumbnail = i in self.aim_async or (
                i not in self.aim and not self.big(i) and r.random() < self.thumbnails
            )
            remote = r.random() < 0.3
            if thumbnail:
                rel = thumbnail_path(r, media_id, remote)
            elif remote:
                rel = f"remote_content/example.org/{media_id[:2]}/{media_id[2:4]}/{media_id[4:]}"
            else:
                rel = f"local_content/{media_id[:2]}/{media_id[2:4]}/{media_id[4:]}"
        return rel, r.randbytes(self.size(i, write_kind(rel)))


def thumbnail_path(r: random.Random, media_id: str, remote: bool) -> str:
    """Where Synapse stores a thumbnail: .../AA/BB/REST/WIDTH-HEIGHT-TYPE-SUBTYPE-METHOD."""
    w, h = r.choice(((32, 32), (96, 96), (320, 240), (640, 480), (800, 600)))
    name = f"{w}-{h}-image-{r.choice(('jpeg', 'png', 'webp'))}-{r.choice(('crop', 'scale'))}"
    tail = f"{media_id[:2]}/{media_id[2:4]}/{media_id[4:]}/{name}"
    return f"remote_thumbnail/example.org/{tail}" if remote else f"local_thumbnails/{tail}"


# -- the world a scenario runs in -------------------------------------------------------------------


class Env(Protocol):
    """What a scenario needs from its runner (pytest fixtures, or bench/faults.py)."""

    timeouts: Timeouts
    tmp: Path

    def shared_server(self) -> S3Server: ...

    def private_server(self) -> S3Server: ...

    def mount(
        self, server: S3Server, bucket: str, extra_args: Sequence[str], cache_dir: Path | None
    ) -> Mount:
        """A mount, not started yet."""
        ...


def direct_client(server: S3Server, fast: bool = False) -> S3Client:
    """boto3 on SeaweedFS itself, never through the proxy."""
    cfg = botocore.config.Config(
        connect_timeout=0.5 if fast else 5,
        read_timeout=2 if fast else 30,
        retries={"mode": "standard", "total_max_attempts": 1 if fast else 4},
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=TEST_REGION,
        config=cfg,
    )


class BucketWatcher:
    """Lists the bucket every `every` seconds while faults run: no 0-byte or partial object, ever.

    Every object seen must have the size and ETag of a version that was written to its path (the
    ledger registers each version before its first syscall). Listings that fail (server down) are
    skipped. Bounded: one listing at a time with 0.5 s/2 s timeouts, until stop().
    """

    def __init__(
        self, server: S3Server, bucket: str, ledger: Ledger, tally: Tally, every: float = 0.25
    ) -> None:
        self.server, self.bucket, self.ledger, self.tally, self.every = server, bucket, ledger, tally, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bucket-watcher", daemon=True)
        self._reported: set[tuple[str, str]] = set()

    def _run(self) -> None:
        client = direct_client(self.server, fast=True)
        while not self._stop.wait(self.every):
            try:
                pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
                objects = [o for page in pages for o in page.get("Contents", [])]
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                continue
            self.tally.events["bucket listings"] += 1
            for o in objects:
                key, size, etag = o["Key"], int(o.get("Size", 0)), o.get("ETag", "").strip('"')
                if (key, etag) in self._reported:
                    continue
                if size == 0:
                    self._reported.add((key, etag))
                    self.tally.bad_keys.add(key)
                    self.tally.problem(f"{key}: a 0-byte object appeared in the bucket")
                elif (size, etag) not in self.ledger.versions(key) and key not in self.ledger.removed:
                    self._reported.add((key, etag))
                    self.tally.bad_keys.add(key)
                    self.tally.problem(
                        f"{key}: an object ({size} B, ETag {etag}) that is no version ever written appeared"
                    )

    def __enter__(self) -> BucketWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


class Rig:
    """One scenario's bucket, mount, ledger and tally."""

    def __init__(
        self,
        env: Env,
        kind: str,
        server: S3Server,
        extra_args: Sequence[str] = (),
        cache_dir: Path | None = None,
    ) -> None:
        self.env = env
        self.timeouts = env.timeouts
        self.server = server
        self.bucket = server.new_bucket()
        self.mount = env.mount(server, self.bucket, [*env.timeouts.mount_args(), *extra_args], cache_dir)
        self.ledger = Ledger(env.timeouts.part_size)
        self.tally = Tally(kind, env.timeouts)
        self.hung = threading.Event()

    def listings_done(self) -> int:
        return len(re.findall(r"\blisted \d+ objects", self.mount.log_text()))

    def start_mount(self) -> None:
        """Start (again) and wait for the background listing, so that lookups need no S3 request."""
        before = self.listings_done()
        self.mount.start()
        if not wait_until(lambda: self.listings_done() > before, 60, 0.1):
            self.tally.problem("the background listing did not finish within 60 s of mounting")

    def write(self, root_fd: int, rel: str, data: bytes, progress: Progress | None = None, index: int = 0,
              probe: bool = False) -> Attempt:  # fmt: skip
        a = self.ledger.begin(rel, data, probe)
        # A watchdog: far past every bound, the daemon is killed, which unblocks the writer (ENOTCONN).
        limit = self.timeouts.syscall_bound_s * rel.count("/") + self.timeouts.close_bound_s(len(data)) + 60
        fired = threading.Event()

        def fire() -> None:
            fired.set()
            self.hung.set()
            self.mount.kill()

        timer = threading.Timer(limit, fire)
        timer.daemon = True
        timer.start()
        try:
            write_file(root_fd, rel, data, a, progress, index)
        finally:
            timer.cancel()
        if fired.is_set():
            a.outcome = "hung"
        return a

    def probe(self, root_fd: int, name: str) -> None:
        """The mount still works: a new file is written, acknowledged and read back."""
        rel = f"local_content/pr/ob/{name}"
        data = os.urandom(100 * KiB)
        a = self.write(root_fd, rel, data, probe=True)
        if a.outcome != "ok":
            self.tally.problem(f"the mount does not work after the faults: {a.failed_at}: {a.err}")
            return
        try:
            with open(self.mount.path / rel, "rb") as f:
                ok = f.read() == data
        except OSError as e:
            ok = False
            self.tally.problem(f"probe {rel}: reading it back failed: {_ename(e)}")
        if not ok:
            self.tally.problem(f"probe {rel}: read back wrong bytes")

    # -- checks --------------------------------------------------------------------------------------

    def verify_bucket(self, stored_despite_error_ok: bool) -> dict[str, bytes]:
        client = direct_client(self.server)
        found: dict[str, bytes] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for o in page.get("Contents", []):
                found[o["Key"]] = client.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
        t = self.tally
        for key, body in found.items():
            history = self.ledger.history(key)
            md5 = hashlib.md5(body).hexdigest()
            ok = last_ok(history)
            after = [a for a in history if a.outcome != "ok" and (ok is None or a.seq > ok.seq)]
            if not body:
                t.bad_keys.add(key)
                t.problem(f"{key}: 0-byte object in the bucket")
            elif key in self.ledger.removed:
                t.problem(f"{key}: unlinked through the mount, still in the bucket")
            elif key in self.ledger.unlink_failed and ok is not None and md5 == ok.md5:
                pass
            elif not history:
                t.bad_keys.add(key)
                t.problem(f"{key}: an object nobody wrote ({len(body)} B)")
            elif ok is not None and md5 == ok.md5:
                pass
            elif any(md5 == a.md5 for a in after):
                t.stored_despite_error += 1
                if not stored_despite_error_ok:
                    a = next(a for a in after if md5 == a.md5)
                    t.problem(f"{key}: stored although its write failed ({a.failed_at}: {a.err})")
            elif ok is not None:
                t.by_kind[ok.kind].lost += 1
                what = (
                    "an older version" if any(md5 == a.md5 for a in history) else f"{len(body)} unknown bytes"
                )
                t.problem(
                    f"{key}: acknowledged ({ok.kind}) {ok.size} B (md5 {ok.md5}) but the bucket holds {what}"
                )
            else:
                t.bad_keys.add(key)
                t.problem(f"{key}: holds {len(body)} B that match no version written (partial?)")
        for rel in self.ledger.acknowledged():
            if rel not in found and rel not in self.ledger.unlink_failed:
                ok = last_ok(self.ledger.history(rel))
                assert ok is not None
                t.by_kind[ok.kind].lost += 1
                t.problem(
                    f"{rel}: close() succeeded ({ok.kind}, {ok.size} B) but the object is not in the bucket"
                )
        return found

    def verify_mount(self, found: dict[str, bytes], lost_answers_possible: bool = False) -> None:
        """Through the mount: an acknowledged file reads back as the bucket holds it; a file whose
        writes all failed is absent. After a lost answer, S3 may hold a write this mount was told
        had failed: the mount then shows it only from its next listing on (at the next mount), so
        absent is right as well."""
        for rel in [*self.ledger.paths(), *self.ledger.removed]:
            path = self.mount.path / rel
            try:
                with open(path, "rb") as f:
                    got: bytes | None = f.read()
            except FileNotFoundError:
                got = None
            except OSError as e:
                self.tally.mount_view_wrong += 1
                self.tally.problem(f"{rel}: reading it through the mount failed: {_ename(e)}")
                continue
            want = found.get(rel)
            unacknowledged = last_ok(self.ledger.history(rel)) is None
            if got is None and want is not None and unacknowledged and lost_answers_possible:
                continue
            if got != want:
                self.tally.mount_view_wrong += 1
                show = "absent" if got is None else f"{len(got)} B"
                self.tally.problem(
                    f"{rel}: the mount shows {show}, the bucket {'nothing' if want is None else f'{len(want)} B'}"
                )

    def uploads_settled(self) -> bool:
        """Every incomplete multipart upload in the bucket has its abort failure logged."""
        uploads = direct_client(self.server).list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        logged = Counter(re.findall(r"could not abort multipart upload of (\S+):", self.mount.log_text()))
        return all(logged[u.get("Key", "")] > 0 for u in uploads)

    def verify_uploads(self, lost_answers_possible: bool) -> None:
        """No multipart upload left behind, except where the abort failed (logged) or a crash or a
        lost answer made it unknowable to s3cachefs."""
        client = direct_client(self.server)
        uploads = client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        self.tally.orphan_uploads = len(uploads)
        logged = Counter(re.findall(r"could not abort multipart upload of (\S+):", self.mount.log_text()))
        for u in uploads:
            key = u.get("Key", "")
            if logged[key] > 0:
                logged[key] -= 1
            elif not lost_answers_possible:
                self.tally.problem(
                    f"{key}: an incomplete multipart upload was left and no abort failure logged"
                )

    def write_during_outage(self, root_fd: int) -> None:
        """Thumbnails written while S3 is out: acknowledged at once, their uploads only queued."""
        for k in range(OUTAGE_ASYNC_WRITES):
            rel = thumbnail_path(random.Random(k), f"ou{k:02d}tage{self.tally.kind}", remote=k % 2 == 1)
            a = self.write(root_fd, rel, os.urandom(24 * KiB * (k + 1) + 1))
            self.tally.events["async writes during the outage"] += 1
            if a.outcome != "ok":
                self.tally.problem(f"{rel}: an async write failed while S3 was out ({a.failed_at}: {a.err})")
            elif a.close_s > self.timeouts.attempt_s:
                self.tally.problem(
                    f"{rel}: an async close() took {a.close_s:.1f}s while S3 was out, longer than one "
                    f"S3 attempt ({self.timeouts.attempt_s:.0f}s): it waited for S3"
                )

    def crash(self) -> None:
        """kill -9 of the daemon, which must have survived the faults; its queue stays in the index."""
        if not self.mount.running:
            self.tally.problem(f"s3cachefs died during the faults (exit code {self.mount.returncode})")
        self.mount.kill()
        # Read after the kill: what the next mount finds (a read-only look beside the dead daemon).
        self.tally.queued_at_kill = queued_entries(self.mount)

    def drain_queue(self, when: str) -> float:
        """Wait until the mount's queues are empty, QUEUE_DRAIN_S at most; returns the seconds it took."""
        t = time.monotonic()
        if not wait_until(lambda: queues_empty(self.mount), QUEUE_DRAIN_S, 0.2):
            self.tally.problem(
                f"the queue did not drain within {QUEUE_DRAIN_S:.0f}s {when} "
                f"({queued_entries(self.mount)} entries left)"
            )
        return time.monotonic() - t

    def finish(
        self,
        root_fd: int | None,
        stored_despite_error_ok: bool,
        lost_answers_possible: bool,
        outage: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
    ) -> None:
        """The probe, then kill -9 (during `outage`, after writing thumbnails, if there is one), the
        world restored, the remount on the same cache directory and the queue drained; then the checks.
        The watcher (the caller's) runs throughout, so it sees every object the uploader puts."""
        if self.hung.is_set():
            # The watchdog killed the daemon: the remaining checks need a live mount.
            self.mount.kill()
        else:
            if root_fd is not None:
                self.probe(root_fd, f"after-{self.tally.kind}")
            # A pipelined upload dropped by a failed write is aborted in the background: let those
            # aborts finish before the kill, which would otherwise leave them half done (the check
            # after the remount is unchanged: such an upload must be gone or its failure logged).
            wait_until(self.uploads_settled, 15)
            with outage() if outage is not None and root_fd is not None else contextlib.nullcontext():
                if outage is not None and root_fd is not None:
                    self.write_during_outage(root_fd)
                self.crash()
            if outage is not None and root_fd is not None and self.tally.queued_at_kill < OUTAGE_ASYNC_WRITES:
                # Their uploads cannot have succeeded: the index lost the entries, or never had them.
                self.tally.problem(
                    f"only {self.tally.queued_at_kill} entries were queued at the kill, after "
                    f"{OUTAGE_ASYNC_WRITES} async writes that S3 could not take"
                )
        self.start_mount()
        self.tally.drain_s = self.drain_queue("of the remount")
        self.tally.count_writes(self.ledger)
        found = self.verify_bucket(stored_despite_error_ok)
        self.verify_mount(found, lost_answers_possible)
        self.verify_uploads(lost_answers_possible)


@contextlib.contextmanager
def root_of(mount: Mount) -> Iterator[int]:
    fd = os.open(mount.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _unmount(rig: Rig) -> None:
    """A clean unmount, which also proves the daemon survived the faults (exit code 0)."""
    if rig.mount.running:
        try:
            code = rig.mount.unmount(check=False)
        except AssertionError as e:
            rig.tally.problem(f"unmount failed: {e}")
            code = 0
        if code != 0:
            rig.tally.problem(f"s3cachefs exited with code {code} at unmount")
    rig.mount.cleanup()


# -- the scenarios ----------------------------------------------------------------------------------


def scenario_proxy(env: Env, mode: str, n: int, seed: int) -> Tally:
    """S3 answering 500 / 503, dropping or resetting connections, or hanging (blackhole), via the proxy.

    The first quarter of the writes meet the fault on every request; the rest on a share of them
    (30% for blackhole, 50% otherwise), so that retries succeed sometimes and multipart uploads fail
    half-way. A tenth of the writes overwrite an existing path.
    """
    started = time.monotonic()
    server = env.shared_server()
    proxy = FaultProxy(server.s3_port, seed=seed).start()
    rig = Rig(env, mode, server, ["--endpoint-url", proxy.endpoint_url])
    rng = random.Random(seed)
    jobs = Jobs(rng, rig.ledger, rewrite=0.1)
    try:
        rig.start_mount()
        with BucketWatcher(server, rig.bucket, rig.ledger, rig.tally), root_of(rig.mount) as fd:
            for i in range(n):
                share = 1.0 if i < max(1, n // 4) else (0.3 if mode == "blackhole" else 0.5)
                proxy.set_mode(mode, share)
                rel, data = jobs.next(i)
                rig.write(fd, rel, data, index=i)
                if rig.hung.is_set():
                    break
            proxy.set_mode("pass")
            rig.finish(
                None if rig.hung.is_set() else fd,
                stored_despite_error_ok=False,
                lost_answers_possible=False,
                outage=lambda: proxy.fault(mode),
            )
        counts = proxy.counts()
        rig.tally.events["requests"] = proxy.requests()
        rig.tally.events["faulted requests"] = proxy.requests() - counts.get("pass", 0)
        if rig.tally.events["faulted requests"] == 0:
            rig.tally.problem("the proxy injected no fault")
    finally:
        proxy.set_mode("pass")
        _unmount(rig)
        proxy.stop()
    rig.tally.seconds = time.monotonic() - started
    return rig.tally


def _run_writer(
    rig: Rig,
    jobs: Jobs,
    n: int,
    gate: Gate,
    progress: Progress,
    rest_after_failure: float,
    errors: list[BaseException],
) -> None:
    try:
        for i in range(n):
            fd = gate.wait()
            rel, data = jobs.next(i)
            a = rig.write(fd, rel, data, progress, i)
            if a.outcome != "ok":
                time.sleep(rest_after_failure)
    except BaseException as e:
        errors.append(e)
    finally:
        progress.finished.set()


def _with_writer(rig: Rig, jobs: Jobs, n: int, gate: Gate, rest_after_failure: float,
                 faults: Callable[[Progress], None]) -> None:  # fmt: skip
    """Writes in a thread while `faults` runs in this one; both bounded."""
    progress = Progress()
    errors: list[BaseException] = []
    t = threading.Thread(target=_run_writer, args=(rig, jobs, n, gate, progress, rest_after_failure, errors))
    t.start()
    try:
        faults(progress)
    finally:
        limit = n * (rig.timeouts.close_bound_s(11 * MiB) + 60)
        t.join(limit)
        if t.is_alive():
            rig.tally.problem("the writer thread did not finish: killing the mount")
            rig.mount.kill()
            t.join(60)
    if errors:
        rig.tally.problem(f"writer thread crashed: {errors[0]!r}")


@contextlib.contextmanager
def server_down(server: S3Server, how: str) -> Iterator[None]:
    """SeaweedFS stopped (SIGSTOP) or killed for the duration of the block."""
    if how == "stop":
        server.pause()
    else:
        server.kill()
    try:
        yield
    finally:
        if how == "stop":
            server.resume()
        else:
            server.start()


def scenario_server(env: Env, how: str, n: int, seed: int) -> Tally:
    """SeaweedFS stopped (SIGSTOP, a hang) or killed (SIGKILL, then started again) during a PUT.

    The mount talks to SeaweedFS directly, so a stopped server still completes TCP handshakes and a
    killed one refuses connections, as in real life. Each fault is aimed at a close() in progress.
    """
    started = time.monotonic()
    server = env.private_server()
    kind = "s3_sigstop" if how == "stop" else "s3_sigkill"
    rig = Rig(env, kind, server)
    rng = random.Random(seed)
    # No overwrites here: a stopped server runs the requests it queued once it continues, including
    # PUTs whose client gave up long ago. Such a late PUT can land after a newer, acknowledged write
    # of the same key and replace it: a property of S3 plus timeouts that no client can prevent
    # without conditional writes, and not what this suite measures. Every key is written once.
    jobs = Jobs(rng, rig.ledger, rewrite=0.0)
    gate = Gate()
    faults = max(1, n // (10 if how == "stop" else 25))
    targets = [(k + 1) * n // (faults + 1) for k in range(faults)]
    jobs.aim.update(targets)

    def inject(progress: Progress) -> None:
        for target in targets:
            if not progress.wait_for_close(target, 256 * KiB, 120) and progress.finished.is_set():
                return
            time.sleep(rng.uniform(0, 0.02))
            if how == "stop":
                server.pause()
                rig.tally.events["SIGSTOPs"] += 1
                time.sleep(rig.timeouts.pause_s)
                server.resume()
            else:
                server.kill()
                rig.tally.events["SIGKILLs"] += 1
                time.sleep(rng.uniform(0.2, 1.0))
                server.start()

    try:
        rig.start_mount()
        gate.open(rig.mount)
        with BucketWatcher(server, rig.bucket, rig.ledger, rig.tally):
            _with_writer(rig, jobs, n, gate, 0.3, inject)
            if rig.tally.events["SIGSTOPs"] + rig.tally.events["SIGKILLs"] < faults:
                rig.tally.problem(f"only {sum(rig.tally.events.values())} of {faults} faults were injected")
            if server.paused:
                server.resume()
            if not server.running:
                server.start()
            fd = None if rig.hung.is_set() else gate.wait()
            # Requests the stopped server queued may still execute after SIGCONT: let them settle.
            time.sleep(1.0)
            rig.finish(
                fd,
                stored_despite_error_ok=True,
                lost_answers_possible=True,
                outage=lambda: server_down(server, how),
            )
    finally:
        if server.paused:
            server.resume()
        gate.close_all()
        _unmount(rig)
        server.kill()  # private and done with: a graceful stop after SIGSTOP takes SeaweedFS ~10 s
    rig.tally.seconds = time.monotonic() - started
    return rig.tally


def scenario_mount_kill(env: Env, n: int, seed: int) -> Tally:
    """kill -9 of s3cachefs in the middle of writes, then remount.

    Half the kills are aimed at the close() in progress of an original: writes whose close() returned
    are in S3; the write the kill interrupted gets an error (ENOTCONN) and its object may or may not
    have made it (whole, never partial). The other half follow at once the close() of a thumbnail,
    whose upload was just queued and is usually not sent yet: the next mount must send it. After the
    remount, every file visible through the mount has exactly the bytes S3 holds, and nothing else.
    """
    started = time.monotonic()
    server = env.shared_server()
    rig = Rig(env, "mount_kill9", server)
    rng = random.Random(seed)
    jobs = Jobs(rng, rig.ledger, rewrite=0.15)
    gate = Gate()
    kills = 2 * max(1, n // 16)
    points = [(k + 1) * n // (kills + 1) for k in range(kills)]
    after_async = set(points[0::2])
    jobs.aim.update(set(points) - after_async)
    jobs.aim_async.update(after_async)

    def inject(progress: Progress) -> None:
        for target in points:
            if target in after_async:
                reached = progress.wait_for_async_ack(target, 120)
            else:
                reached = progress.wait_for_close(target, 256 * KiB, 120)
                time.sleep(rng.uniform(0, 0.02))
            if not reached and progress.finished.is_set():
                return
            gate.shut()
            rig.mount.kill()
            rig.tally.events["kill -9"] += 1
            rig.tally.events["queued at a kill -9 (mid-run)"] += queued_entries(rig.mount)
            rig.start_mount()
            gate.open(rig.mount)

    try:
        rig.start_mount()
        gate.open(rig.mount)
        with BucketWatcher(server, rig.bucket, rig.ledger, rig.tally):
            _with_writer(rig, jobs, n, gate, 0.0, inject)
            if rig.tally.events["kill -9"] < kills:
                rig.tally.problem(f"only {rig.tally.events['kill -9']} of {kills} kills were made")
            rig.finish(None if rig.hung.is_set() else gate.wait(), True, lost_answers_possible=True)
    finally:
        gate.close_all()
        _unmount(rig)
    rig.tally.seconds = time.monotonic() - started
    return rig.tally


def scenario_cache_full(env: Env, n: int, seed: int) -> Tally:
    """The cache directory on an 8 MiB tmpfs, with a 1 GiB cache cap: the disk fills, not the cap.

    Files of up to 1.5 MiB (and every 12th over 5 MiB, which never fits). Whenever a write fails, two
    acknowledged files are unlinked through the mount half of the time (Synapse deleting media),
    so the disk keeps going from full to not quite full. Each close() either succeeds with the object
    in S3, or the writer gets an error; nothing partial may reach the bucket.
    """
    started = time.monotonic()
    server = env.shared_server()
    small = env.tmp / f"tmpfs-{seed}"
    small.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(small)], check=True, timeout=30
    )
    rig: Rig | None = None
    try:
        rig = Rig(env, "cache_full", server, ["--cache-size", "1G"], cache_dir=small / "cache")
        rng = random.Random(seed)
        jobs = Jobs(rng, rig.ledger, rewrite=0.1, medium_max=1536 * KiB)
        rig.start_mount()
        with BucketWatcher(server, rig.bucket, rig.ledger, rig.tally), root_of(rig.mount) as fd:
            for i in range(n):
                rel, data = jobs.next(i)
                a = rig.write(fd, rel, data, index=i)
                if rig.hung.is_set():
                    break
                if a.err == "ENOSPC":
                    rig.tally.events["ENOSPC"] += 1
                if a.outcome != "ok" and rng.random() < 0.5:
                    _unlink_some(rig, rng, 2)
            if not rig.hung.is_set():
                _unlink_some(rig, rng, 6)  # room for the probe
            rig.finish(
                None if rig.hung.is_set() else fd, stored_despite_error_ok=False, lost_answers_possible=False
            )
        if not rig.tally.events["ENOSPC"]:
            rig.tally.problem("the cache filesystem never filled up")
    finally:
        if rig is not None:
            _unmount(rig)
        subprocess.run(["umount", "-l", str(small)], check=False, timeout=30)
    rig.tally.seconds = time.monotonic() - started
    return rig.tally


def _unlink_some(rig: Rig, rng: random.Random, count: int) -> None:
    acked = sorted(set(rig.ledger.acknowledged()) - rig.ledger.unlink_failed)
    for rel in rng.sample(acked, min(count, len(acked))):
        try:
            os.unlink(rig.mount.path / rel)
        except OSError as e:
            # An error is an answer too; the object may or may not be gone now.
            rig.ledger.unlink_failed.add(rel)
            rig.tally.events[f"unlink {_ename(e)}"] += 1
            continue
        rig.ledger.forget(rel)
        rig.tally.events["unlinked"] += 1


def scenario_cache_wiped(env: Env, n: int, seed: int) -> Tally:
    """The cache directory wiped between mounts (after a clean unmount, or after kill -9).

    After each remount on the empty cache, every acknowledged file reads back with its bytes. The
    wipe comes once the queue is empty: until the uploader has sent it, an async write's only copy is
    on the cache disk, and wiping that loses it by design (the trade async uploads make, for files
    Synapse can make again). What is tested here is the loss of a cache that S3 backs.
    """
    started = time.monotonic()
    server = env.shared_server()
    rig = Rig(env, "cache_wiped", server)
    rng = random.Random(seed)
    jobs = Jobs(rng, rig.ledger, rewrite=0.2)
    rounds = max(2, n // 10)
    try:
        rig.start_mount()
        with BucketWatcher(server, rig.bucket, rig.ledger, rig.tally):
            done = 0
            for r in range(rounds):
                with root_of(rig.mount) as fd:
                    for i in range(done, (r + 1) * n // rounds):
                        rel, data = jobs.next(i)
                        rig.write(fd, rel, data, index=i)
                    done = (r + 1) * n // rounds
                rig.drain_queue("before the wipe")
                if r % 2 == 0:
                    rig.mount.unmount()
                else:
                    rig.mount.kill()
                rig.mount.wipe_cache()
                rig.tally.events["wipes"] += 1
                rig.start_mount()
                client = direct_client(server)
                found = {
                    rel: b
                    for rel in rig.ledger.acknowledged()
                    if (b := _expected(rig, client, rel)) is not None
                }
                rig.verify_mount(found)
            with root_of(rig.mount) as fd:
                rig.finish(fd, stored_despite_error_ok=False, lost_answers_possible=False)
    finally:
        _unmount(rig)
    rig.tally.seconds = time.monotonic() - started
    return rig.tally


def _expected(rig: Rig, client: S3Client, rel: str) -> bytes | None:
    """The bytes of the last acknowledged write of rel, fetched from S3 directly (for a mount check)."""
    ok = last_ok(rig.ledger.history(rel))
    if ok is None:
        return None
    try:
        body = client.get_object(Bucket=rig.bucket, Key=rel)["Body"].read()
    except botocore.exceptions.ClientError:
        return b""  # missing: verify_bucket reports it; make the mount check fail too
    return body


KINDS = (
    "http_500",
    "http_503",
    "drop",
    "reset_mid",
    "blackhole",
    "s3_sigstop",
    "s3_sigkill",
    "mount_kill9",
    "cache_full",
    "cache_wiped",
)
# The short version (CI): about 150 writes in all, about two minutes on 2 cores.
CI_COUNTS = {
    "http_500": 16,
    "http_503": 16,
    "drop": 16,
    "reset_mid": 16,
    "blackhole": 10,
    "s3_sigstop": 14,
    "s3_sigkill": 16,
    "mount_kill9": 18,
    "cache_full": 16,
    "cache_wiped": 14,
}
# The full run (bench/faults.py --writes N) splits N in these proportions.
WEIGHTS = {
    "http_500": 12,
    "http_503": 12,
    "drop": 12,
    "reset_mid": 12,
    "blackhole": 8,
    "s3_sigstop": 8,
    "s3_sigkill": 10,
    "mount_kill9": 10,
    "cache_full": 8,
    "cache_wiped": 8,
}
# Faults after which a write may be stored although its writer got an error (a lost answer).
LOST_ANSWERS = {"s3_sigstop", "s3_sigkill", "mount_kill9"}


def run_scenario(kind: str, n: int, env: Env, seed: int) -> Tally:
    if kind in ("http_500", "http_503", "drop", "reset_mid", "blackhole"):
        return scenario_proxy(env, kind, n, seed)
    if kind == "s3_sigstop":
        return scenario_server(env, "stop", n, seed)
    if kind == "s3_sigkill":
        return scenario_server(env, "kill", n, seed)
    if kind == "mount_kill9":
        return scenario_mount_kill(env, n, seed)
    if kind == "cache_full":
        return scenario_cache_full(env, n, seed)
    if kind == "cache_wiped":
        return scenario_cache_wiped(env, n, seed)
    raise ValueError(f"unknown fault kind {kind!r}")


def format_table(tallies: Sequence[Tally]) -> str:
    head = (
        "fault", "writes", "sync ok/err/lost", "async ok/err/lost", "0B/partial", "stored+err",
        "mount wrong", "hung/over", "orphan MPU", "queued@kill", "drain s", "max close s sync/async",
        "bound s PUT/MPU", "s", "result",
    )  # fmt: skip

    def row(t: Tally, bound: str) -> tuple[str, ...]:
        sync, asy = t.by_kind["sync"], t.by_kind["async"]
        return (
            t.kind, str(t.writes), f"{sync.acked}/{sync.failed}/{sync.lost}",
            f"{asy.acked}/{asy.failed}/{asy.lost}", str(t.zero_or_partial), str(t.stored_despite_error),
            str(t.mount_view_wrong), f"{t.hung}/{t.over_bound}", str(t.orphan_uploads),
            str(t.queued_at_kill), f"{t.drain_s:.1f}", f"{sync.max_close_s:.2f}/{asy.max_close_s:.2f}",
            bound, f"{t.seconds:.0f}", "ok" if t.ok else "FAIL",
        )  # fmt: skip

    rows: list[tuple[str, ...]] = [head]
    total = Tally("TOTAL", tallies[0].timeouts if tallies else Timeouts())
    for t in tallies:
        rows.append(row(t, f"{t.timeouts.close_bound_s(1):.0f}/{t.timeouts.close_bound_s(11 * MiB):.0f}"))
        total.bad_keys |= {f"{t.kind}/{k}" for k in t.bad_keys}
        for kind, counts in t.by_kind.items():
            total.by_kind[kind].add(counts)
        for name in ("stored_despite_error", "mount_view_wrong", "hung", "over_bound", "orphan_uploads",
                     "queued_at_kill"):  # fmt: skip
            setattr(total, name, getattr(total, name) + getattr(t, name))
        total.drain_s = max(total.drain_s, t.drain_s)
        total.seconds += t.seconds
        total.problems += t.problems
    rows.append(row(total, ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        " | ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def format_details(tallies: Sequence[Tally]) -> str:
    out = []
    for t in tallies:
        errs = ", ".join(f"{k} x{v}" for k, v in sorted(t.errors.items())) or "none"
        events = ", ".join(f"{k} {v}" for k, v in sorted(t.events.items()))
        out.append(f"{t.kind}: errors {errs}; {events}; slowest other syscall {t.max_other_s:.2f}s")
        out += [f"  PROBLEM {p}" for p in t.problems]
    return "\n".join(out)


# -- pytest -----------------------------------------------------------------------------------------


class _FixtureEnv:
    def __init__(
        self, request: pytest.FixtureRequest, make_mount: MakeMount, s3server: S3Server, tmp: Path
    ) -> None:
        self.timeouts = Timeouts()
        self.tmp = tmp
        self._request = request
        self._make_mount = make_mount
        self._s3server = s3server

    def shared_server(self) -> S3Server:
        return self._s3server

    def private_server(self) -> S3Server:
        server: S3Server = self._request.getfixturevalue("own_s3server")
        return server

    def mount(
        self, server: S3Server, bucket: str, extra_args: Sequence[str], cache_dir: Path | None
    ) -> Mount:
        return self._make_mount(
            bucket=bucket, extra_args=extra_args, cache_dir=cache_dir, server=server, start=False
        )


@pytest.fixture
def fault_env(
    request: pytest.FixtureRequest, make_mount: MakeMount, s3server: S3Server, tmp_path: Path
) -> _FixtureEnv:
    return _FixtureEnv(request, make_mount, s3server, tmp_path)


# Known and open (issue 6 note): on a full cache disk, the row of a write that failed can stay
# visible as a 0-byte file until housekeeping settles it (within a minute), because the index
# refuses the revert at the last close. About half the runs hit it. Acknowledged writes are never
# affected: the other checks of this scenario still pass every time.
@pytest.mark.parametrize("kind", KINDS)
def test_acknowledged_writes_survive_and_failed_writes_report_errors(
    kind: str, fault_env: _FixtureEnv
) -> None:
    tally = run_scenario(kind, CI_COUNTS[kind], fault_env, seed=KINDS.index(kind) + 1)
    print("\n" + format_table([tally]) + "\n" + format_details([tally]))
    assert tally.ok, "\n".join(tally.problems)
    assert tally.writes == CI_COUNTS[kind] + tally.events["async writes during the outage"]
    assert tally.acked > 0, "no write succeeded: the scenario proves nothing about acknowledged writes"
    assert tally.by_kind["async"].acked > 0, "no async write succeeded: the queue was not tested"
    if kind != "cache_wiped":
        assert tally.failed > 0, "no write failed: the fault was never hit"
