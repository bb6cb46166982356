"""Soak (issue 6): readers and writers against one s3cachefs mount with a small cache, for a long time.

Not run in CI. Starts its own SeaweedFS on loopback (free ports) and one s3cachefs mount with a cache
cap far below the working set (--cache-size 64M), so that eviction runs all the time, and with
--multipart-threshold 8M --multipart-chunksize 5M, so that large writes go up as pipelined multipart
uploads. The bucket is first filled with boto3: --objects small objects in Synapse's layout
(local_content/AA/BB/REST originals of 20 KiB-1 MiB and local_thumbnails/AA/BB/REST/W-H-image-jpeg-crop
thumbnails of 20-256 KiB) and --large remote_content/SERVER/AA/BB/REST originals of 8-20 MiB, which are
above the daemon's read part size and so come in by parallel ranged GETs whenever they were evicted.

Load, until the deadline:
  - --readers threads: pick a random known file (5 % of picks: one of the large originals), open it,
    read it whole in 16 KiB reads (Synapse's sender) and check the bytes; 10 % of opens are closed
    unread (Synapse's 304 path); 5 % of operations stat a name that does not exist.
  - --writers threads, Synapse-like: new media (makedirs + open 'wb' + 64 KiB writes + close; 20 KiB-
    2 MiB, 6 % of them 12 MiB), read back once through the mount (Synapse re-reads new media for
    thumbnails) and given 1-2 thumbnails; overwrites of an existing thumbnail; deletes of a medium
    (os.remove of the original, shutil.rmtree of its thumbnail directory). The mix is steered so the
    number of media stays near its starting value. A writer claims a medium for the whole operation,
    so no two writers ever change the same path.

Bookkeeping: every change of a path is a span of a global sequence counter, from the moment the writer
starts (its bytes may become visible) to the moment the next change of that path is acknowledged (the
old content may be visible until then). A reader takes the sequence number when it picks the path and
again when it is done; every version (content, or "absent") whose span overlaps that window is
acceptable. A read whose bytes equal none of them is a failure: "torn" if every 16 KiB chunk equals
the same chunk of one of the acceptable versions (a prefix or a mix of the old and new bytes of a file
being overwritten in place, which any POSIX filesystem can show a concurrent reader; --allow-torn
counts these without failing the run), "cut" if it is a prefix of the only content version of a file
deleted while it was open (no POSIX outcome: an open file keeps its bytes), "wrong" otherwise. ENOENT
is a failure ("missing") unless "absent" was acceptable; EIO on a file deleted during the read is the
README's "unlink while open" limitation and only counted (so is ENOENT from read()). Inode numbers seen by
readers and writers are recorded, so a failure report says when the inode had belonged to another path. Content is derived from a seed, so only
seeds, sizes and SHA-256s are kept.

Every --interval seconds (and once before the load starts, t=0): daemon VmRSS and VmHWM, open fds (in
all; sockets; files in the cache's data/ and tmp/), threads, operations so far, errors, failures,
bytes in CACHE/data against the cap, files in CACHE/tmp, size of the index (with its WAL), hit ratio
and evictions from `s3cachefs status --json` (after `kill -USR1`, which saves the counters at once),
the slowest operation of the interval and the 1-minute load average.

At the end the load is stopped and, once quiet, a last sample is taken (no file is open then, so the
daemon should hold no fd on data/ or tmp/). Then every expected file is read through the mount and
fetched from S3 with boto3, and the mount's tree and the bucket's keys are compared with the expected
set. Printed: the table of samples and a verdict computed from it: RSS growth from the 2nd sample to
the last (MiB, %, and the least-squares slope), fd count min/max over the same samples, and "flat" if
RSS grew less than --rss-pct and the fd band (max - min) is at most --fd-band.

Exit status: 0 = every check passed and both figures are flat; 1 = a read returned bytes that no
acceptable version has (torn included, unless --allow-torn), an acknowledged file was missing or wrong
(mount or S3), a deleted file was still there, fds or files left in the cache after the load stopped,
the daemon died, or a worker hung past the bound; 3 = all correct, but RSS or fds not flat.

Readers pause --reader-pause (0.02 s) and writers --writer-pause (0.1 s) between operations, so a run
leaves a shared machine some CPU; SeaweedFS gets about 0.5 GiB a minute of writes (deletes balance the
count, not the disk space, until SeaweedFS vacuums): keep a few tens of GiB free for a 30-minute run.

    sudo python -m bench.soak [--minutes 30] [--readers 16] [--writers 4] [--cache-size 64M] [--interval 60]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from s3cachefs.config import parse_size
from tests.harness import REPO_ROOT, HarnessError, Mount, S3Server, check_fuse_available, tail

KiB = 1024
MiB = 1024 * 1024
READ_CHUNK = 16 * KiB  # Synapse's FileSender reads 16 KiB at a time
WRITE_CHUNK = 64 * KiB
SERVER_NAMES = ("matrix.org", "example.com", "chat.example.net")
THUMB_SIZES = ((32, 32), (96, 96), (320, 240), (640, 480), (800, 600))
T = TypeVar("T")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------
# Content: derived from a seed, so that a version is (seed, size, sha256) and can be rebuilt on demand
# ---------------------------------------------------------------------------------------------------


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass(frozen=True)
class Version:
    seed: int
    size: int
    sha: str

    def content(self) -> bytes:
        return blob(self.seed, self.size)


def make_version(seed: int, size: int) -> tuple[Version, bytes]:
    data = blob(seed, size)
    return Version(seed, size, hashlib.sha256(data).hexdigest()), data


# ---------------------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------------------


class Pool(Generic[T]):
    """A set with O(1) add, remove and uniform random choice (not thread-safe: used under Book.lock)."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._pos: dict[T, int] = {}

    def add(self, item: T) -> None:
        if item not in self._pos:
            self._pos[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: T) -> None:
        i = self._pos.pop(item, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._pos[last] = i

    def choice(self, rng: random.Random) -> T | None:
        return rng.choice(self._items) if self._items else None

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._pos

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items))


@dataclass(eq=False)
class Span:
    """One state of a path (a version, or None for "absent"), visible from `begin` until `end`."""

    version: Version | None
    begin: int
    end: int | None = None  # seq at which the next change was acknowledged, or this one failed
    acked: bool = False


@dataclass(eq=False)
class PathState:
    spans: list[Span] = field(default_factory=list)
    current: Version | None = None  # what the acknowledged changes say the path holds
    doubt: list[Version | None] = field(default_factory=list)  # also possible after a failed change


@dataclass(eq=False)
class Media:
    original: str
    thumb_dir: str
    thumbs: list[str] = field(default_factory=list)
    large: bool = False  # a preloaded large original: read-only, never deleted
    claimed: bool = False


class Book:
    """What each path may hold, as seen by readers whose window is a range of sequence numbers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seq = 0
        self.paths: dict[str, PathState] = {}
        self.live: Pool[str] = Pool()  # acknowledged, existing files: what readers pick from
        self.large: Pool[str] = Pool()
        self.media: Pool[Media] = Pool()
        self.active: dict[int, int] = {}  # reader id -> seq at which its read began
        self.inos: dict[int, list[str]] = {}  # inode number -> the paths (or dirs, "a/b/") seen with it

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _prune(self, st: PathState) -> None:
        oldest = min(self.active.values(), default=self.seq + 1)
        st.spans = [sp for sp in st.spans if sp.end is None or sp.end >= oldest]

    def preloaded(self, path: str, v: Version, large: bool = False) -> None:
        with self.lock:
            self.paths[path] = PathState([Span(v, 0, acked=True)], v)
            self.live.add(path)
            if large:
                self.large.add(path)

    def known(self, path: str) -> bool:
        with self.lock:
            return path in self.paths

    def current(self, path: str) -> Version | None:
        with self.lock:
            st = self.paths.get(path)
            return None if st is None else st.current

    def begin(self, path: str, v: Version | None) -> Span:
        with self.lock:
            sp = Span(v, self._next())
            self.paths.setdefault(path, PathState()).spans.append(sp)
            return sp

    def ack(self, path: str, sp: Span) -> None:
        with self.lock:
            s = self._next()
            st = self.paths[path]
            for o in st.spans:
                if o is not sp and o.end is None:
                    o.end = s
            sp.acked = True
            st.current = sp.version
            st.doubt.clear()
            if sp.version is None:
                self.live.discard(path)
            else:
                self.live.add(path)
            self._prune(st)

    def fail(self, path: str, sp: Span) -> None:
        with self.lock:
            sp.end = self._next()
            st = self.paths[path]
            st.doubt.append(sp.version)
            self._prune(st)

    def start_read(self, rid: int, rng: random.Random, p_large: float) -> tuple[str, int] | None:
        with self.lock:
            path = self.large.choice(rng) if rng.random() < p_large else None
            if path is None or path not in self.live:
                path = self.live.choice(rng)
            if path is None:
                return None
            s = self.active[rid] = self._next()
            return path, s

    def end_read(self, rid: int, path: str, start: int) -> list[Version | None]:
        with self.lock:
            end = self._next()
            self.active.pop(rid, None)
            st = self.paths[path]
            return [sp.version for sp in st.spans if sp.begin <= end and (sp.end is None or sp.end >= start)]

    def saw_ino(self, ino: int, path: str) -> str:
        """Record that `path` has inode number `ino`; if other paths had it before, say which."""
        with self.lock:
            seen = self.inos.setdefault(ino, [])
            others = [p for p in seen if p != path]
            if path not in seen:
                seen.append(path)
                del seen[:-4]
            return f" [ino {ino}, earlier also {', '.join(others[-3:])}]" if others else ""

    def any_live(self, rng: random.Random) -> str | None:
        with self.lock:
            return self.live.choice(rng)

    def claim(self, rng: random.Random, pred: Callable[[Media], bool]) -> Media | None:
        with self.lock:
            for _ in range(50):
                m = self.media.choice(rng)
                if m is None:
                    return None
                if not m.claimed and pred(m):
                    m.claimed = True
                    return m
            return None

    def release(self, m: Media) -> None:
        with self.lock:
            m.claimed = False

    def add_media(self, m: Media) -> None:
        with self.lock:
            self.media.add(m)

    def drop_media(self, m: Media) -> None:
        with self.lock:
            self.media.discard(m)

    def deletable_media(self) -> int:
        with self.lock:
            return sum(1 for m in self.media if not m.large)


# ---------------------------------------------------------------------------------------------------
# Counters shared by the workers
# ---------------------------------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: Counter[str] = Counter()
        self.slowest = 0.0  # seconds, since the last sample
        self.slowest_what = ""
        self.problems: list[str] = []  # failures and errors, the first ones in full
        self.kinds: Counter[str] = Counter()  # error kinds (op + errno), all of them

    def add(self, **kw: int) -> None:
        with self.lock:
            self.c.update(kw)

    def took(self, seconds: float, what: str) -> None:
        with self.lock:
            if seconds > self.slowest:
                self.slowest, self.slowest_what = seconds, what

    def take_slowest(self) -> tuple[float, str]:
        with self.lock:
            s, w = self.slowest, self.slowest_what
            self.slowest, self.slowest_what = 0.0, ""
            return s, w

    def problem(self, kind: str, msg: str) -> None:
        with self.lock:
            self.c[kind] += 1
            self.kinds[f"{kind}: {msg.split(':', 1)[0]}"] += 1
            if len(self.problems) < 400:
                self.problems.append(f"[{time.strftime('%H:%M:%S')}] {kind}: {msg}")

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.c)


FAILURE_KINDS = ("wrong", "cut", "missing", "ghost")  # always failures; "torn" is one unless --allow-torn


# ---------------------------------------------------------------------------------------------------
# Paths in Synapse's layout
# ---------------------------------------------------------------------------------------------------


def new_media(rng: random.Random, remote: bool) -> Media:
    mid = "".join(rng.choices(string.ascii_letters, k=24))
    rel = f"{mid[:2]}/{mid[2:4]}/{mid[4:]}"
    if remote:
        server = rng.choice(SERVER_NAMES)
        return Media(f"remote_content/{server}/{rel}", f"remote_thumbnail/{server}/{rel}")
    return Media(f"local_content/{rel}", f"local_thumbnails/{rel}")


def thumb_name(rng: random.Random, taken: list[str]) -> str | None:
    for w, h in rng.sample(THUMB_SIZES, len(THUMB_SIZES)):
        name = f"{w}-{h}-image-jpeg-crop"
        if not any(t.endswith("/" + name) for t in taken):
            return name
    return None


# ---------------------------------------------------------------------------------------------------
# The load
# ---------------------------------------------------------------------------------------------------


@dataclass
class ReadResult:
    sha: str
    size: int
    chunks: list[tuple[int, int, int]]  # (offset, length, crc32) of every read() that returned data
    ino: int = 0


class ReadError(Exception):
    """read() failed on a file that did open (as opposed to an error from open itself)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def read_whole(path: Path, limit: int) -> ReadResult:
    """open + 16 KiB reads to EOF (at most `limit` bytes, so a runaway file cannot loop forever).

    An error of open() is raised as is, an error of a read() as ReadError.
    """
    h = hashlib.sha256()
    chunks: list[tuple[int, int, int]] = []
    off = 0
    with open(path, "rb", buffering=0) as f:
        ino = os.fstat(f.fileno()).st_ino
        while off <= limit:
            try:
                b = f.read(READ_CHUNK)
            except OSError as e:
                raise ReadError(e) from e
            if not b:
                break
            h.update(b)
            chunks.append((off, len(b), zlib.crc32(b)))
            off += len(b)
    return ReadResult(h.hexdigest(), off, chunks, ino)


def explained_by_chunks(r: ReadResult, versions: list[Version]) -> bool:
    """Every chunk read equals the same range of one of the versions (a torn read, not foreign bytes)."""
    if not versions:
        return False
    contents = [v.content() for v in versions]
    for off, n, crc in r.chunks:
        if not any(off + n <= len(c) and zlib.crc32(c[off : off + n]) == crc for c in contents):
            return False
    return True


def judge(r: ReadResult | None, acceptable: list[Version | None]) -> str:
    """'ok', or the failure kind. r None: the open said ENOENT.

    POSIX allows a reader that races an in-place overwrite to see a prefix or a mix of the old and
    new bytes ("torn"). A reader that races a delete may get ENOENT at open, but once it has the
    file open it must get all of its bytes: a prefix then ("cut") is no POSIX outcome.
    """
    if r is None:
        return "ok" if None in acceptable else "missing"
    versions = list({v.sha: v for v in acceptable if v is not None}.values())
    if any(v.sha == r.sha and v.size == r.size for v in versions):
        return "ok"
    if explained_by_chunks(r, versions):
        if len(versions) >= 2:
            return "torn"
        if None in acceptable:
            return "cut"
    return "wrong"


def describe(r: ReadResult | None, acceptable: list[Version | None]) -> str:
    got = "ENOENT" if r is None else f"{r.size} bytes sha256 {r.sha[:12]}"
    want = ", ".join("absent" if v is None else f"{v.size} bytes sha256 {v.sha[:12]}" for v in acceptable)
    return f"got {got}; acceptable: {want or 'nothing'}"


class Load:
    def __init__(self, mnt: Path, book: Book, tally: Tally, args: argparse.Namespace, seed: int) -> None:
        self.mnt = mnt
        self.book = book
        self.tally = tally
        self.args = args
        self.seed = seed
        self.stop = threading.Event()
        self.deadline = 0.0
        self._seeds = iter(range(seed * 10_000_000 + 1_000_000, seed * 10_000_000 + 9_000_000))
        self._seed_lock = threading.Lock()
        self.target_media = 0

    def next_seed(self) -> int:
        with self._seed_lock:
            return next(self._seeds)

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def _errno(self, e: OSError) -> str:
        return os.strerror(e.errno) if e.errno else type(e).__name__

    # -- readers ------------------------------------------------------------------------------------

    def reader(self, rid: int) -> None:
        rng = random.Random(self.seed * 1000 + rid)
        while self.running():
            op = rng.random()
            t0 = time.monotonic()
            if op < 0.05:
                self._stat_missing(rng)
            else:
                self._read_one(rid, rng, open_only=op < 0.15)
            self.tally.took(time.monotonic() - t0, "read")
            if self.args.reader_pause:
                self.stop.wait(self.args.reader_pause)

    def _stat_missing(self, rng: random.Random) -> None:
        known = self.book.any_live(rng)
        if known is not None and rng.random() < 0.7:
            rel = f"{known.rsplit('/', 1)[0]}/missing-{uuid.uuid4().hex}"  # in a known directory
        else:
            rel = f"local_content/{uuid.uuid4().hex[:2]}/zz/missing-{uuid.uuid4().hex}"
        try:
            os.stat(self.mnt / rel)
        except FileNotFoundError:
            self.tally.add(missing_stats=1)
            return
        except OSError as e:
            self.tally.problem("error", f"stat {rel}: {self._errno(e)}")
            return
        self.tally.problem("ghost", f"stat {rel}: a name never created exists")

    def _read_one(self, rid: int, rng: random.Random, open_only: bool) -> None:
        pick = self.book.start_read(rid, rng, p_large=0.05)
        if pick is None:
            self.stop.wait(0.1)
            return
        rel, start = pick
        r: ReadResult | None = None
        error: OSError | None = None
        in_read = False
        try:
            if open_only:
                with open(self.mnt / rel, "rb", buffering=0) as f:
                    r = ReadResult("", -1, [], os.fstat(f.fileno()).st_ino)
            else:
                r = read_whole(self.mnt / rel, limit=64 * MiB)
        except FileNotFoundError:
            r = None  # at open
        except ReadError as e:
            error, in_read = e.cause, True
        except OSError as e:
            error = e
        acceptable = self.book.end_read(rid, rel, start)
        if error is not None:
            if in_read and error.errno in (errno.EIO, errno.ENOENT) and None in acceptable:
                # README, Limitations: a file that was not cached when it was opened, and is unlinked
                # before its first read, cannot be read through that handle any more.
                self.tally.add(read_err_deleted=1)
            else:
                self.tally.problem("error", f"{'read' if in_read else 'open'} {rel}: {self._errno(error)}")
            return
        if r is not None and r.size < 0:  # opened and closed unread
            if any(v is not None for v in acceptable):
                self.tally.add(opens_unread=1)
            else:
                self.tally.problem("ghost", f"open {rel} succeeded; {describe(None, acceptable)}")
            return
        verdict = judge(r, acceptable)
        reuse = "" if r is None else self.book.saw_ino(r.ino, rel)
        if verdict == "ok":
            if r is None:
                self.tally.add(enoent_ok=1)
            else:
                self.tally.add(reads=1, verified_bytes=r.size)
        else:
            self.tally.problem(verdict, f"read {rel}: {describe(r, acceptable)}{reuse}")

    # -- writers ------------------------------------------------------------------------------------

    def writer(self, wid: int) -> None:
        rng = random.Random(self.seed * 1000 + 500 + wid)
        while self.running():
            n = self.book.deletable_media()
            if n > self.target_media * 1.1:
                p_new, p_over = 0.25, 0.30
            elif n < self.target_media * 0.9:
                p_new, p_over = 0.60, 0.30
            else:
                p_new, p_over = 0.45, 0.30
            op = rng.random()
            t0 = time.monotonic()
            if op < p_new:
                self._new_media(rng)
                what = "new media"
            elif op < p_new + p_over:
                self._overwrite_thumb(rng)
                what = "overwrite"
            else:
                self._delete_media(rng)
                what = "delete"
            self.tally.took(time.monotonic() - t0, what)
            if self.args.writer_pause:
                self.stop.wait(self.args.writer_pause)

    def _put(self, rel: str, size: int) -> Version | None:
        """A Synapse-style write of a new version of `rel`; the version if close() acknowledged it."""
        v, data = make_version(self.next_seed(), size)
        sp = self.book.begin(rel, v)
        path = self.mnt / rel
        t0 = time.monotonic()
        try:
            os.makedirs(path.parent, exist_ok=True)
            with open(path, "wb", buffering=0) as f:
                ino = os.fstat(f.fileno()).st_ino
                view = memoryview(data)
                off = 0
                while off < size:
                    n = f.write(view[off : off + WRITE_CHUNK])
                    if not n:
                        raise OSError(0, "write returned 0")
                    off += n
        except OSError as e:
            self.book.fail(rel, sp)
            self.tally.problem("error", f"write {rel} ({size} bytes): {self._errno(e)}")
            return None
        self.book.ack(rel, sp)
        if self.book.saw_ino(ino, rel):
            self.tally.add(ino_reused=1)
        with contextlib.suppress(OSError):
            self.book.saw_ino(os.stat(path.parent).st_ino, os.path.dirname(rel) + "/")
        self.tally.add(writes=1, written_bytes=size, big_writes=int(size >= 8 * MiB))
        self.tally.took(time.monotonic() - t0, f"write {size // KiB} KiB")
        return v

    def _new_media(self, rng: random.Random) -> None:
        m = new_media(rng, remote=rng.random() < 0.2)
        if self.book.known(m.original):
            return
        m.claimed = True
        self.book.add_media(m)
        try:
            big = rng.random() < 0.06
            size = 12 * MiB if big else rng.randint(20 * KiB, 2 * MiB)
            v = self._put(m.original, size)
            if v is None:
                self.book.drop_media(m)
                return
            # Synapse reads new media back right away (spam checker, thumbnailer); nothing else
            # touches this medium while we hold the claim, so it must be exactly what we wrote.
            try:
                r = read_whole(self.mnt / m.original, limit=64 * MiB)
            except ReadError as rerr:
                self.tally.problem("error", f"read-back {m.original}: {self._errno(rerr.cause)}")
            except OSError as e:
                self.tally.problem("missing" if isinstance(e, FileNotFoundError) else "error",
                                   f"read-back {m.original}: {self._errno(e)}")  # fmt: skip
            else:
                if r.sha == v.sha and r.size == v.size:
                    self.tally.add(reads=1, verified_bytes=r.size, readbacks=1)
                else:
                    reuse = self.book.saw_ino(r.ino, m.original)
                    self.tally.problem("wrong", f"read-back {m.original}: {describe(r, [v])}{reuse}")
            for _ in range(rng.randint(1, 2)):
                name = thumb_name(rng, m.thumbs)
                if name is None:
                    break
                rel = f"{m.thumb_dir}/{name}"
                if self._put(rel, rng.randint(20 * KiB, 256 * KiB)) is not None:
                    m.thumbs.append(rel)
            self.tally.add(new_media=1)
        finally:
            self.book.release(m)

    def _overwrite_thumb(self, rng: random.Random) -> None:
        m = self.book.claim(rng, lambda m: bool(m.thumbs))
        if m is None:
            return
        try:
            if self._put(rng.choice(m.thumbs), rng.randint(20 * KiB, 256 * KiB)) is not None:
                self.tally.add(overwrites=1)
        finally:
            self.book.release(m)

    def _delete_media(self, rng: random.Random) -> None:
        m = self.book.claim(rng, lambda m: not m.large)
        if m is None:
            return
        gone = True
        try:
            sp = self.book.begin(m.original, None)
            try:
                os.remove(self.mnt / m.original)
            except OSError as e:
                self.book.fail(m.original, sp)
                self.tally.problem("error", f"remove {m.original}: {self._errno(e)}")
                gone = False
            else:
                self.book.ack(m.original, sp)
                self.tally.add(files_deleted=1)
            if m.thumbs:
                spans = [(t, self.book.begin(t, None)) for t in m.thumbs]
                try:
                    shutil.rmtree(self.mnt / m.thumb_dir)
                    if os.path.lexists(self.mnt / m.thumb_dir):
                        raise OSError(0, "directory still there after rmtree")
                except OSError as e:
                    for t, tsp in spans:
                        self.book.fail(t, tsp)
                    self.tally.problem("error", f"rmtree {m.thumb_dir}: {self._errno(e)}")
                    gone = False
                else:
                    for t, tsp in spans:
                        self.book.ack(t, tsp)
                    self.tally.add(files_deleted=len(spans))
            if gone:
                self.book.drop_media(m)
                self.tally.add(deletes=1)
        finally:
            self.book.release(m)


# ---------------------------------------------------------------------------------------------------
# Measuring the daemon
# ---------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t_min: float
    rss: float  # MiB
    hwm: float  # MiB
    fds: int
    fd_sock: int
    fd_cache: int  # fds on files in CACHE/data or CACHE/tmp
    threads: int
    ops: Counter[str]
    cache_bytes: int
    cap: int
    tmp_files: int
    index_bytes: int
    hit_ratio: float | None
    evictions: int
    slowest: float
    load1: float
    quiet: bool = False


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(rest.split()[0])
    return out


def fd_breakdown(pid: int, cache_dir: Path) -> tuple[int, int, int, Counter[str]]:
    """(all fds, sockets, fds on files in data/ or tmp/, every target with its count)."""
    total = sock = cache = 0
    targets: Counter[str] = Counter()
    data, tmp = f"{cache_dir}/data/", f"{cache_dir}/tmp/"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        total += 1
        if target.startswith("socket:"):
            sock += 1
            targets["socket"] += 1
        elif target.startswith((data, tmp)):
            cache += 1
            targets[target.replace(str(cache_dir), "CACHE")] += 1
        else:
            targets[target.replace(str(cache_dir), "CACHE")] += 1
    return total, sock, cache, targets


def dir_stats(root: Path) -> tuple[int, int]:
    """(bytes, files) below root."""
    size = files = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            with contextlib.suppress(FileNotFoundError):
                size += os.stat(os.path.join(dirpath, n)).st_size
                files += 1
    return size, files


class Probe:
    def __init__(self, mount: Mount, cap: int, tally: Tally, started: float) -> None:
        self.mount = mount
        self.cap = cap
        self.tally = tally
        self.started = started
        self.status: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.mount.proc is not None
        return self.mount.proc.pid

    def daemon_status(self) -> dict[str, Any]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGUSR1)  # counters saved now rather than within 5 s
        time.sleep(0.5)
        try:
            r = subprocess.run(
                [sys.executable, "-m", "s3cachefs.cli", "status", str(self.mount.path), "--json"],
                cwd=REPO_ROOT, env=self.mount.env(), capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if r.returncode == 0:
                self.status = json.loads(r.stdout)
            else:
                log(f"!! s3cachefs status failed ({r.returncode}): {r.stderr.strip()}")
        except (subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            log(f"!! s3cachefs status: {e}")
        return self.status

    def sample(self, quiet: bool = False) -> Sample:
        st = self.daemon_status()
        ps = proc_status(self.pid)
        total, sock, cache, _ = fd_breakdown(self.pid, self.mount.cache_dir)
        cache_bytes, _ = dir_stats(self.mount.cache_dir / "data")
        _, tmp_files = dir_stats(self.mount.cache_dir / "tmp")
        index_bytes = sum(p.stat().st_size for p in self.mount.cache_dir.glob("index.sqlite*") if p.exists())
        slowest, _ = self.tally.take_slowest()
        return Sample(
            t_min=(time.monotonic() - self.started) / 60,
            rss=ps.get("VmRSS", 0) / 1024,
            hwm=ps.get("VmHWM", 0) / 1024,
            fds=total,
            fd_sock=sock,
            fd_cache=cache,
            threads=ps.get("Threads", 0),
            ops=self.tally.snapshot(),
            cache_bytes=cache_bytes,
            cap=int(st.get("cap_bytes") or self.cap),
            tmp_files=tmp_files,
            index_bytes=index_bytes,
            hit_ratio=st.get("hit_ratio"),
            evictions=int(st.get("evictions") or 0),
            slowest=slowest,
            load1=os.getloadavg()[0],
            quiet=quiet,
        )


HEADER = (
    f"{'min':>6} {'RSS MiB':>8} {'HWM MiB':>8} {'fds':>4} {'sock':>4} {'cfile':>5} {'thr':>4} "
    f"{'reads':>7} {'verif MiB':>9} {'304s':>5} {'writes':>6} {'dels':>5} {'err':>4} {'torn':>4} {'fail':>4} "
    f"{'cache/cap MiB':>13} {'tmp':>3} {'idx MiB':>7} {'hit%':>5} {'evict':>6} {'slow s':>6} {'load1':>5}"
)


def row(s: Sample) -> str:
    o = s.ops
    fails = sum(o[k] for k in FAILURE_KINDS)
    hit = "-" if s.hit_ratio is None else f"{100 * s.hit_ratio:.1f}"
    label = "quiet" if s.quiet else f"{s.t_min:.1f}"
    return (
        f"{label:>6} {s.rss:8.1f} {s.hwm:8.1f} {s.fds:4d} {s.fd_sock:4d} {s.fd_cache:5d} {s.threads:4d} "
        f"{o['reads']:7d} {o['verified_bytes'] / MiB:9.0f} {o['opens_unread']:5d} {o['writes']:6d} "
        f"{o['deletes']:5d} {o['error']:4d} {o['torn']:4d} {fails:4d} "
        f"{s.cache_bytes / MiB:6.1f}/{s.cap / MiB:<6.0f} {s.tmp_files:3d} {s.index_bytes / MiB:7.2f} "
        f"{hit:>5} {s.evictions:6d} {s.slowest:6.1f} {s.load1:5.2f}"
    )


# ---------------------------------------------------------------------------------------------------
# Setup, final verification, verdict
# ---------------------------------------------------------------------------------------------------


def preload(server: S3Server, bucket: str, book: Book, rng: random.Random, n_small: int, n_large: int) -> int:
    """Fill the bucket with boto3 (before the mount exists). Returns the bytes put."""
    jobs: list[tuple[str, Version]] = []
    seed = 1
    n = 0
    while n < n_small:
        m = new_media(rng, remote=False)
        v, _ = make_version(seed, rng.randint(20 * KiB, 1 * MiB))
        seed += 1
        jobs.append((m.original, v))
        n += 1
        for _ in range(min(rng.randint(0, 3), n_small - n)):
            name = thumb_name(rng, m.thumbs)
            assert name is not None
            t = f"{m.thumb_dir}/{name}"
            v, _ = make_version(seed, rng.randint(20 * KiB, 256 * KiB))
            seed += 1
            jobs.append((t, v))
            m.thumbs.append(t)
            n += 1
        book.add_media(m)
    for _ in range(n_large):
        m = new_media(rng, remote=True)
        m.large = True
        v, _ = make_version(seed, rng.randint(8 * MiB, 20 * MiB))
        seed += 1
        jobs.append((m.original, v))
        name = thumb_name(rng, [])
        assert name is not None
        t = f"{m.thumb_dir}/{name}"
        tv, _ = make_version(seed, rng.randint(20 * KiB, 256 * KiB))
        seed += 1
        jobs.append((t, tv))
        m.thumbs.append(t)
        book.add_media(m)

    large = {m.original for m in book.media if m.large}

    def put(job: tuple[str, Version]) -> int:
        key, v = job
        server.client().put_object(Bucket=bucket, Key=key, Body=v.content())
        book.preloaded(key, v, large=key in large)
        return v.size

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        return sum(ex.map(put, jobs, timeout=600))


@dataclass
class Final:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    doubtful: int = 0


def final_check(mount: Mount, server: S3Server, bucket: str, book: Book, via_mount: bool) -> Final:
    """Every expected file through the mount and straight from S3; names in the tree and in the bucket."""
    out = Final()
    expected: dict[str, Version] = {}
    allowed: dict[str, list[Version | None]] = {}
    for path, st in book.paths.items():
        options = [st.current, *st.doubt]
        allowed[path] = options
        if st.doubt:
            out.doubtful += 1
        if st.current is not None and not st.doubt:
            expected[path] = st.current

    def ok(path: str, sha: str | None, size: int) -> bool:
        for v in allowed.get(path, []):
            if (v is None and sha is None) or (v is not None and v.sha == sha and v.size == size):
                return True
        return False

    s3 = server.client()
    deadline = time.monotonic() + 900

    def check_one(path: str) -> list[str]:
        probs: list[str] = []
        if time.monotonic() > deadline:
            return [f"{path}: not checked (final check over its time bound)"]
        if via_mount:
            try:
                r = read_whole(mount.path / path, limit=64 * MiB)
                if not ok(path, r.sha, r.size):
                    probs.append(f"mount {path}: {describe(r, allowed[path])}")
            except (OSError, ReadError) as e:
                probs.append(f"mount {path}: {e}")
        try:
            body = s3.get_object(Bucket=bucket, Key=path)["Body"].read()
            if not ok(path, hashlib.sha256(body).hexdigest(), len(body)):
                probs.append(f"S3 {path}: {len(body)} bytes, not an acceptable version")
        except Exception as e:  # any S3 failure is a finding here
            probs.append(f"S3 {path}: {e}")
        return probs

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        try:
            for probs in ex.map(check_one, sorted(expected), timeout=1200):
                out.checked += 1
                out.problems.extend(probs)
        except concurrent.futures.TimeoutError:
            out.problems.append(f"final check: only {out.checked} of {len(expected)} files checked in 1200 s")

    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(o["Key"] for o in page.get("Contents", []))
    for k in sorted(keys - set(expected)):
        if k not in allowed or not any(v is not None for v in allowed[k]):
            out.problems.append(f"S3 {k}: present, but it was deleted (or never acknowledged)")
    for k in sorted(set(expected) - keys):
        out.problems.append(f"S3 {k}: acknowledged, but not in the bucket")
    if via_mount:
        seen: set[str] = set()
        for dirpath, _dirs, names in os.walk(mount.path):
            base = os.path.relpath(dirpath, mount.path)
            seen.update(n if base == "." else f"{base}/{n}" for n in names)
        for k in sorted(seen - set(expected)):
            if k not in allowed or not any(v is not None for v in allowed[k]):
                out.problems.append(f"mount {k}: listed, but it was deleted (or never acknowledged)")
        for k in sorted(set(expected) - seen):
            out.problems.append(f"mount {k}: acknowledged, but not listed")
    return out


def start_server(work: Path) -> S3Server:
    """A private SeaweedFS; tried again on a fresh directory and ports if a neighbour took a port."""
    for attempt in range(1, 4):
        try:
            return S3Server(work / f"s3-{attempt}").start()
        except HarnessError as e:
            if attempt == 3:
                raise
            log(f"!! SeaweedFS did not start (attempt {attempt}): {str(e).splitlines()[0]}; trying again")
    raise AssertionError("unreachable")


def py_spy_dump(pid: int) -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(exe):
        return "(py-spy not installed)"
    try:
        r = subprocess.run(
            [exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return "(py-spy dump timed out)"
    return r.stdout + r.stderr


@dataclass
class Verdict:
    lines: list[str]
    flat: bool


def verdict(samples: list[Sample], rss_pct: float, fd_band: int) -> Verdict:
    """From the per-interval samples (not t=0, not the quiet one): RSS from the 2nd to the last, fds."""
    lines: list[str] = []
    if len(samples) < 2:
        return Verdict([f"only {len(samples)} interval sample(s): too short to judge"], False)
    ref, last = samples[1], samples[-1]
    growth = last.rss - ref.rss
    pct = 100 * growth / ref.rss if ref.rss else 0.0
    span = samples[1:]
    slope = ""
    if len(span) >= 3:
        fit = statistics.linear_regression([s.t_min for s in span], [s.rss for s in span])
        slope = f"; least-squares slope {fit.slope:+.2f} MiB/min over {len(span)} samples"
    rss_flat = pct < rss_pct
    late = samples[len(samples) // 2 :]
    if len(late) >= 3:
        fit2 = statistics.linear_regression([s.t_min for s in late], [s.rss for s in late])
        slope += (
            f"; second half ({late[0].t_min:.0f}-{late[-1].t_min:.0f} min): slope {fit2.slope:+.2f} MiB/min, "
            f"{late[-1].rss - late[0].rss:+.1f} MiB"
        )
    lines.append(
        f"RSS: {ref.rss:.1f} MiB at {ref.t_min:.1f} min (2nd sample) -> {last.rss:.1f} MiB at {last.t_min:.1f} min: "
        f"{growth:+.1f} MiB ({pct:+.2f} %){slope}; max VmHWM {max(s.hwm for s in samples):.1f} MiB "
        f"-> {'flat' if rss_flat else 'NOT flat'} (threshold < {rss_pct:g} %)"
    )
    fds = [s.fds for s in span]
    socks = [s.fd_sock for s in span]
    cfiles = [s.fd_cache for s in span]
    standing = [s.fds - s.fd_cache for s in span]
    band = max(fds) - min(fds)
    fd_flat = band <= fd_band
    lines.append(
        f"fds: min {min(fds)}, max {max(fds)} (band {band}; over all samples {min(s.fds for s in samples)}-"
        f"{max(s.fds for s in samples)}); sockets {min(socks)}-{max(socks)}, files in data/tmp {min(cfiles)}-"
        f"{max(cfiles)}, all others {min(standing)}-{max(standing)} -> {'flat' if fd_flat else 'NOT flat'} "
        f"(band threshold <= {fd_band})"
    )
    thr = [s.threads for s in span]
    lines.append(f"threads: {min(thr)}-{max(thr)}")
    return Verdict(lines, rss_flat and fd_flat)


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--readers", type=int, default=16)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--cache-size", default="64M")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds between samples (default 60)")
    ap.add_argument("--objects", type=int, default=400, help="small preloaded objects (default 400)")
    ap.add_argument("--large", type=int, default=6, help="preloaded 8-20 MiB remote originals (default 6)")
    ap.add_argument("--reader-pause", type=float, default=0.02, help="seconds between a reader's operations")
    ap.add_argument("--writer-pause", type=float, default=0.1, help="seconds between a writer's operations")
    ap.add_argument(
        "--allow-torn",
        action="store_true",
        help="do not count torn reads (a prefix or mix of the old and new bytes of a file being overwritten "
        "in place, as any POSIX filesystem can show) as failures; they are still counted and shown",
    )
    ap.add_argument("--rss-pct", type=float, default=10.0, help="flat: RSS growth below this (default 10 %%)")
    ap.add_argument("--fd-band", type=int, default=None,
                    help="flat: fd max - min at most this (default: readers + 2 x writers + 8, what the "
                         "in-flight requests can hold open at once)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the run's files go (default: a temp dir)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory (S3 data, cache, logs)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1, 100_000)
    fd_band = args.fd_band if args.fd_band is not None else args.readers + 2 * args.writers + 8
    cap = parse_size(args.cache_size)
    check_fuse_available()
    signal.signal(signal.SIGTERM, _sigterm)

    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="s3cfs-soak-", dir=base))
    log(f"soak: {args.minutes:g} min, {args.readers} readers, {args.writers} writers, cache {args.cache_size}, "
        f"sample every {args.interval:g} s, seed {seed}, work dir {work}")  # fmt: skip
    log(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    book = Book()
    tally = Tally()
    samples: list[Sample] = []
    baseline: Sample | None = None
    quiet: Sample | None = None
    threads: list[threading.Thread] = []
    load: Load | None = None
    mount: Mount | None = None
    server: S3Server | None = None
    failed: list[str] = []
    final: Final | None = None
    stuck: list[str] = []
    log_kinds: Counter[str] = Counter()
    try:
        server = start_server(work)
        bucket = server.new_bucket()
        t0 = time.monotonic()
        put = preload(server, bucket, book, random.Random(seed), args.objects, args.large)
        log(f"preloaded {len(book.paths)} objects, {put / MiB:.0f} MiB ({len(book.media)} media) "
            f"in {time.monotonic() - t0:.0f} s")  # fmt: skip
        mount = Mount(
            server, bucket, work / "mnt", work / "cache", work / "mount.log",
            ["--cache-size", args.cache_size, "--multipart-threshold", "8M", "--multipart-chunksize", "5M"],
        ).start()  # fmt: skip
        deadline = time.monotonic() + 120
        while "listed " not in mount.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        log(f"mounted, daemon pid {mount.proc.pid if mount.proc else '?'}; background listing "
            f"{'done' if 'listed ' in mount.log_text() else 'NOT done after 120 s'}")  # fmt: skip

        load = Load(mount.path, book, tally, args, seed)
        load.target_media = book.deletable_media()
        started = time.monotonic()
        probe = Probe(mount, cap, tally, started)
        baseline = probe.sample()
        log(HEADER)
        log(row(baseline) + "   (t=0, before the load)")
        load.deadline = started + args.minutes * 60
        for i in range(args.readers):
            threads.append(threading.Thread(target=load.reader, args=(i,), name=f"reader-{i}", daemon=True))
        for i in range(args.writers):
            threads.append(threading.Thread(target=load.writer, args=(i,), name=f"writer-{i}", daemon=True))
        for t in threads:
            t.start()

        n = 1
        while True:
            due = started + n * args.interval
            if due > load.deadline + 1:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            if not mount.running:
                failed.append(f"the daemon exited with code {mount.returncode} during the load")
                break
            try:
                s = probe.sample()
            except FileNotFoundError:  # /proc/PID went away
                failed.append(f"the daemon exited with code {mount.returncode} during the load")
                break
            samples.append(s)
            log(row(s))
            n += 1

        # Stop the load; every operation is bounded by the daemon's S3 timeouts, and so is this join.
        load.stop.set()
        join_by = time.monotonic() + 180
        for t in threads:
            t.join(max(0.0, join_by - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            failed.append(f"workers still busy 180 s after the deadline: {', '.join(stuck)}")
            if mount.running:
                log(
                    "--- py-spy dump of the daemon (workers stuck) ---\n"
                    + py_spy_dump(mount.proc.pid if mount.proc else 0)
                )

        if mount.running:
            time.sleep(6)  # housekeeping tick; nothing is open now
            quiet = probe.sample(quiet=True)
            log(row(quiet) + "   (load stopped, nothing open)")
            _, _, _, targets = fd_breakdown(probe.pid, mount.cache_dir)
            log("fds when quiet: " + ", ".join(f"{k} x{v}" for k, v in sorted(targets.items())))
            log("final s3cachefs status: " + json.dumps({k: probe.status.get(k) for k in (
                "cached_files", "cached_bytes", "cap_bytes", "remote_files", "pending_upload_files",
                "hits", "misses", "hit_ratio", "evictions", "evicted_bytes", "uploads", "s3_calls")}))  # fmt: skip
            if quiet.fd_cache:
                failed.append(f"{quiet.fd_cache} fd(s) still open on cache files after the load stopped")
            if quiet.tmp_files:
                failed.append(f"{quiet.tmp_files} file(s) left in CACHE/tmp after the load stopped")

        log(f"final check: {sum(1 for st in book.paths.values() if st.current is not None)} expected files, "
            f"{sum(1 for st in book.paths.values() if st.current is None)} deleted paths ...")  # fmt: skip
        t0 = time.monotonic()
        final = final_check(mount, server, bucket, book, via_mount=mount.running and not stuck)
        log(f"final check: {final.checked} files read through the mount and from S3 in "
            f"{time.monotonic() - t0:.0f} s, {len(final.problems)} problem(s), {final.doubtful} path(s) "
            f"left uncertain by a failed change")  # fmt: skip
    except KeyboardInterrupt:
        failed.append("interrupted")
    except HarnessError as e:
        failed.append(f"harness: {e}")
    finally:
        if load is not None:
            load.stop.set()
            for t in threads:
                t.join(5)
        if mount is not None:
            log_kinds = _log_kinds(mount)
            try:
                code = mount.unmount(check=False) if mount.running else mount.returncode
                if code not in (0, None):
                    failed.append(f"s3cachefs exited with code {code} at unmount")
            except AssertionError as e:
                failed.append(f"unmount: {e}")
            forced = mount.cleanup()
            failed.extend(forced)
            if failed:
                log(f"--- tail of the daemon's log {mount.log_path} ---\n{tail(mount.log_path, 40)}")
        if server is not None:
            server.stop()

    # -- report ---------------------------------------------------------------------------------------
    ops = tally.snapshot()
    log("")
    log(f"=== soak summary: {args.readers} readers, {args.writers} writers, {args.minutes:g} min, "
        f"cache {args.cache_size}, seed {seed} ===")  # fmt: skip
    log(HEADER)
    for s in ([baseline] if baseline else []) + samples + ([quiet] if quiet else []):
        log(row(s))
    log(
        f"operations: {ops['reads']} verified reads ({ops['verified_bytes'] / MiB:.0f} MiB, "
        f"{ops['readbacks']} of them read-backs of new media), {ops['opens_unread']} opens closed unread, "
        f"{ops['missing_stats']} stats of missing names, {ops['enoent_ok']} ENOENT at open and {ops['read_err_deleted']} read errors during a delete; "
        f"{ops['writes']} writes ({ops['written_bytes'] / MiB:.0f} MiB, {ops['big_writes']} of 12 MiB), "
        f"{ops['new_media']} new media, {ops['overwrites']} thumbnail overwrites, {ops['deletes']} media "
        f"deleted ({ops['files_deleted']} files); {ops['ino_reused']} new files got an inode number that an "
        f"earlier (deleted) file or directory had"
    )
    log(
        "failures: "
        + ", ".join(f"{k} {ops[k]}" for k in FAILURE_KINDS)
        + f"; torn {ops['torn']}{' (allowed)' if args.allow_torn else ''}; errors {ops['error']}"
    )
    # Failures first (all kinds, the first 40 in full), then a few torn reads and errors.
    serious = [p for p in tally.problems if not p.split("] ", 1)[-1].startswith(("torn:", "error:"))]
    others = [p for p in tally.problems if p not in serious]
    for p in serious[:40] + others[:10]:
        log(f"  {p}")
    if tally.kinds:
        kinds = sorted(tally.kinds.items(), key=lambda kv: (kv[0].startswith("torn"), -kv[1]))
        log("by kind: " + "; ".join(f"{k} x{v}" for k, v in kinds[:25]))
    if log_kinds:
        log("daemon log warnings/errors: " + "; ".join(f"{k} x{v}" for k, v in log_kinds.most_common(12)))
    if final is not None:
        for p in final.problems[:30]:
            log(f"  final: {p}")
    la = os.getloadavg()
    log(f"load average at the end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} ({os.cpu_count()} CPUs)")

    v = verdict(samples, args.rss_pct, fd_band)
    for line in v.lines:
        log(line)
    bad_reads = sum(ops[k] for k in FAILURE_KINDS)
    if bad_reads:
        failed.append(f"{bad_reads} read(s) returned bytes or an answer no acceptable version explains")
    if ops["torn"] and not args.allow_torn:
        failed.append(
            f"{ops['torn']} torn read(s) during in-place overwrites (neither the old nor the new bytes)"
        )
    if final is not None and final.problems:
        failed.append(f"final check: {len(final.problems)} problem(s)")
    elif final is None:
        failed.append("final check did not run")
    flat = f"RSS and fds {'flat' if v.flat else 'NOT flat'}"
    if failed:
        log(f"VERDICT: FAILED - {'; '.join(failed)}; {flat}")
        code = 1
    else:
        log(f"VERDICT: correct; {flat}")
        code = 0 if v.flat else 3
    if args.keep or code == 1:
        log(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return code


def _log_kinds(mount: Mount) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for line in mount.log_text().splitlines():
        for level in (" WARNING ", " ERROR "):
            if level in line:
                msg = line.split(level, 1)[1]
                kinds[level.strip() + " " + " ".join(msg.split()[:5])[:90]] += 1
    if "Traceback" in mount.log_text():
        kinds["Traceback"] += mount.log_text().count("Traceback")
    return kinds


if __name__ == "__main__":
    sys.exit(main())
