"""Cache files on disk: fetch, write staging, upload-and-commit, eviction.

Layout of the cache directory:
    index.sqlite        the index (index.py)
    data/XX/<ino>       complete copies of objects (XX = ino % 256, to keep directories small)
    tmp/                downloads and write staging files in progress; emptied at every mount
    trash/              data files of evicted rows on their way out (Cache.run_reaper); emptied at mount
    reserve             1 MiB held for the index, given up when a full disk refuses an index update
    lock                flock()ed by the running instance

Cache state machine of a file row (index.State), and who moves it:

            fetch: GET -> tmp/get-* -> verify -> rename to data/ -> commit row (+ MD5)
    REMOTE ─────────────────────────────────────────────────────────────────────────▶ CACHED
      ▲ ▲  ◀──────────── evict (LRU over cap, or max-age; never if open or written) ──── │
      │ │                                                                               │ open for write
      │ └── last release after a failed upload (an older S3 version exists) ─┐            ▼
      │                                                                     WRITING ◀───┘
      └─────── listing sees a different ETag (object replaced behind our back)  │  ▲ create
                                                                             │  │
      CACHED ◀──── flush/fsync: PUT (Content-MD5) ok -> rename staging to data/ ┘  │
      (row removed) ◀── last release after a failed upload, no older S3 version ───┘

What survives a crash (kill -9, power loss):
- CACHED is written to the index only after the data file was verified and renamed into place,
  with the MD5 of its bytes. A CACHED row whose file is missing or has the wrong length is demoted
  to REMOTE on open, and the first read of every cached file after a mount checks its MD5 (in a
  worker thread) before serving it. So a torn, emptied or damaged cache file is never served; it
  is fetched again. (That check is why downloads need no fsync before the rename.)
- WRITING rows found at mount belong to writes whose close() never returned success: the row reverts
  to the S3 version it had (REMOTE) or is removed if there was none. The staging files in tmp/ are
  deleted. Nothing was ever PUT for them, so S3 holds no partial object.
- Eviction commits the rows (REMOTE, or removed if local-only) together with their entries in the
  index's `doomed` table, and only then removes the data files (Cache._evict). A file left in data/
  by a crash in between belongs to a REMOTE row, which is never read from data/ (a later download
  renames its file over it); the reaper removes it at the next mount. trash/ holds only files no
  row refers to, and is emptied at mount. Until the reaper has unlinked them, evicted bytes are
  still on the disk (pending_bytes) though no longer counted as cached.

Invariants the tests check: an acknowledged write is in S3 before close() returns; cached bytes equal
the S3 object; cached bytes stay under the cap except for files that are open; eviction never touches an
open or written file.
"""

from __future__ import annotations

import array
import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cachetools
import trio

from .config import DEFAULT_RANK, PathPolicy, policy_for
from .index import IN_CACHE, ROOT_INO, Index, Node, State, checkpoint
from .s3 import (
    S3,
    IntegrityError,
    LocalWriteError,
    MultipartUpload,
    ObjectInfo,
    RangeResult,
    S3Error,
    first_error,
    md5_fd,
)

log = logging.getLogger(__name__)

# When the cap is hit, evict down to this fraction of it, so eviction runs in batches rather than on
# every single fill.
LOW_WATERMARK = 0.9

# A large download is hashed in steps of this size as its bytes become contiguous.
HASH_STEP = 1024 * 1024
# The first range of a large cold object (see Cache._transfer).
FIRST_RANGE = 256 * 1024


@dataclass(eq=False)
class Download:
    """One cold file coming in from S3, shared by all its readers (see Cache.open_download).

    A small object is one GET. A large one is a short first range, then parts of part_size, in
    parallel: part i covers [ends[i-1], ends[i]) (part 0 starts at 0). The layout is known once the
    first response gives the object's size (plan)."""

    ino: int
    tmp: str
    fd: int
    size: int  # the index's idea of the size, until the first response tells
    part_size: int
    received: list[int] = field(default_factory=lambda: [0])  # bytes in, per part
    ends: list[int] = field(default_factory=list)
    users: int = 0
    available: int = 0  # bytes from offset 0 that are all on disk
    done: bool = False
    error: BaseException | None = None
    inline: Node | None = None
    changed: trio.Event = field(default_factory=trio.Event)

    def plan(self, total: int, first: int | None) -> None:
        """The part layout for an object of `total` bytes: one part (first None), or a first range
        of `first` bytes and then parts of part_size."""
        self.size = total
        ends = [total if first is None else min(first, total)]
        while ends[-1] < total:
            ends.append(min(ends[-1] + self.part_size, total))
        self.ends = ends
        self.received += [0] * (len(ends) - len(self.received))
        self._recount()

    @property
    def nparts(self) -> int:
        return max(1, len(self.ends))

    def progress(self, part: int, n: int) -> None:
        self.received[part] = n
        self._recount()

    def _recount(self) -> None:
        avail = 0
        start = 0
        for i, n in enumerate(self.received):
            avail += n
            if i >= len(self.ends) or n < self.ends[i] - start:
                break
            start = self.ends[i]
        if avail != self.available:
            self.available = avail
            self._wake()

    def _wake(self) -> None:
        ev, self.changed = self.changed, trio.Event()
        ev.set()

    def finish(self, error: BaseException | None) -> None:
        self.done, self.error = True, error
        self._wake()

    async def wait_until(self, end: int | None) -> None:
        """Return once bytes [0, end) are on disk (end None: the whole object, verified)."""
        if self.inline is not None:
            raise AssertionError("in-process downloads without a nursery are run by Cache.fetch")
        while not self.done and (end is None or self.available < min(end, self.size)):
            await self.changed.wait()
        if self.error is not None:
            raise OSError(errno.EIO, f"download failed: {self.error}")

    async def read(self, off: int, size: int) -> bytes:
        await self.wait_until(off + size)
        return os.pread(self.fd, size, off)


@dataclass(eq=False)
class Writer:
    """The one local staging file of a file being written, shared by all its write handles."""

    ino: int
    path: str
    fd: int
    # The S3 version before this write began, to go back to if the upload fails (None: none existed).
    prev: tuple[int, str] | None
    handles: int = 0
    dirty: bool = True
    committed: bool = False
    unlinked: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    # Pipelined upload: while every write so far continued where the last one ended, full parts go
    # up as they are written (see Cache.wrote); any other write or a truncate turns this off.
    seq_end: int = 0
    pipeline: Pipeline | None = None
    pipeline_off: bool = False
    # errno of a write() or truncate that failed (e.g. ENOSPC): the staging file is not what the
    # writer wrote, so it must never be uploaded; every later close() fails with this errno.
    failed: int | None = None
    # Bumped by every write and truncate. An upload remembers it: a write that lands while the
    # upload runs (a FLUSH from another fd mid-write) leaves the file dirty for the real close().
    generation: int = 0
    # The row was CACHED when the write began: its data/ file is the S3 version in `prev`.
    was_cached: bool = False
    # Set while the last release settles the file (finish_write); new opens wait for it.
    closing: trio.Event | None = None
    # The file's mtime from the moment the write began (a new file: its create() time) through the
    # upload. It does not move at close(): the kernel compares every mtime we report with the one it
    # holds and drops the inode's page cache when they differ (libfuse's auto_inval_data, which
    # pyfuse3 leaves on), so a close-time mtime would throw away the pages just written.
    mtime_ns: int = 0
    # Another handle of the inode was open at some point during the write: its reads may have put
    # bytes of another version into the kernel's page cache, so the last release drops it.
    shared: bool = False


@dataclass(eq=False)
class Pipeline:
    mpu: MultipartUpload
    part_size: int
    scheduled_end: int = 0  # bytes [0, scheduled_end) are handed to part uploads
    stop: bool = False
    error: BaseException | None = None
    more: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    # The whole file's MD5 (the cache records it), taken in order as parts are handed out, so that
    # close() hashes only the tail: bytes [0, hashed) are in md5.
    md5: hashlib._Hash = field(default_factory=hashlib.md5)
    hashed: int = 0
    scheduled: trio.Event = field(default_factory=trio.Event)  # scheduled_end moved, or stop


@dataclass(frozen=True)
class Limits:
    cap: int
    # Free space to keep on the cache filesystem: bytes, or a fraction of its size when below 1.
    min_free: float = 0.0
    default_max_age: float | None = None
    policies: tuple[PathPolicy, ...] = ()
    # Cold reads: objects above one part are fetched as parallel ranged GETs of this size.
    read_part_size: int = 8 * 1024 * 1024
    read_concurrency: int = 8


@dataclass(frozen=True)
class Klass:
    """What a path's policy means for its row: eviction rank, age limit, and whether it is uploaded."""

    rank: int
    max_age: int | None
    local_only: bool

    @property
    def columns(self) -> tuple[int, int | None]:
        return self.rank, self.max_age


EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"

# Bytes of the cache disk kept free for the index (the file `reserve`): when the disk is full, the
# index can still record what S3 already holds.
RESERVE = 1024 * 1024
# A download that finds the cache disk full makes room and starts over, this many times at most.
DISK_FULL_ATTEMPTS = 6
# An eviction pass unlinks this many data files itself (a few ms even where each unlink waits for a
# discard); the files of a larger pass are left to the reaper (Cache.run_reaper).
INLINE_UNLINKS = 32
# Files the reaper takes per step, and how long it waits after a step failed (a full cache disk).
REAP_CHUNK = 256
REAP_RETRY = 10.0

# Flush access times to the index when this many are pending (and at every eviction pass and every
# housekeeping tick): one transaction for many reads instead of one disk write per open.
ATIME_BATCH = 10_000


class Cache:
    def __init__(
        self,
        root: Path,
        index: Index,
        s3: S3,
        prefix: str,
        limits: Limits,
        limiter: trio.CapacityLimiter,
        clock: Callable[[], float] = time.time,
    ):
        self.root = root
        self.data_dir = root / "data"
        self.tmp_dir = root / "tmp"
        self.trash_dir = root / "trash"
        self.index = index
        self.s3 = s3
        self.prefix = prefix
        self.limits = limits
        self.limiter = limiter
        self.clock = clock
        self.pins: Counter[int] = Counter()  # open handles per inode: never evicted while > 0
        self.writers: dict[int, Writer] = {}
        # Inodes whose first write-open is making its staging copy; later opens wait, then join.
        self._starting: dict[int, trio.Event] = {}
        self._downloads: dict[int, Download] = {}
        # Set by the composition root: downloads run as tasks of the mount's nursery, so they go on
        # when the request that started them is answered.
        self.nursery: trio.Nursery | None = None
        self._atimes: dict[int, int] = {}
        # Inodes whose cached bytes were hashed (or written) by this process; bounded, so a file that
        # falls out is simply hashed again on its next first read.
        self._verified: cachetools.LRUCache[int, bool] = cachetools.LRUCache(maxsize=100_000)
        # Content versions (see content_version): a stamp from one counter that only grows, per
        # inode whose content was replaced in this process; bounded, and a stamp that falls out
        # reads as 0, which only makes an old handle reopen once more than it had to.
        self._versions: cachetools.LRUCache[int, int] = cachetools.LRUCache(maxsize=100_000)
        self._version_counter = 0
        self._last_warning = 0.0
        self.listing_gen = 0  # set by Namespace: rows we commit count as seen by the current listing
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.reserve_path = root / "reserve"
        self.reserve_short = False  # the disk had no room to make the reserve again
        self.keep_reserve()
        self.trash_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Evicted data files: without a reaper (in-process use) a pass unlinks them all itself.
        self.reaper_running = False
        self.pending_bytes = 0  # bytes of evicted files the reaper has yet to unlink
        self._reap_wanted = trio.Event()
        self._reaped = trio.Event()
        self._trash_tag = secrets.token_hex(4)  # trash/ names of this run never meet a crash's leftovers
        self._trashed = 0
        self._checkpoint_wanted = False  # the index commits without checkpoints until the reaper ran one
        # All 256 data/XX directories up front: otherwise the first file placed in each costs a
        # failed rename, a makedirs and a second rename (see _place) on the way to its first byte.
        for i in range(256):
            with contextlib.suppress(FileExistsError):
                os.mkdir(f"{self.data_dir}/{i:02x}", 0o700)
        self.cached_bytes = index.cached_bytes()
        self.stats: Counter[str] = Counter()
        self._stats_base: Counter[str] = Counter(json.loads(index.get_meta("stats") or "{}"))
        self._saves = int(index.get_meta("saves") or 0)

    # -- policy -------------------------------------------------------------------------------------

    def klass(self, relpath: str) -> Klass:
        p = policy_for(self.limits.policies, relpath)
        if p is None:
            age = self.limits.default_max_age
            return Klass(DEFAULT_RANK, None if age is None else int(age), False)
        age = p.max_age if p.max_age is not None else self.limits.default_max_age
        return Klass(p.evict_rank, None if age is None else int(age), p.local_only)

    def _policy_fingerprint(self) -> str:
        return repr((self.limits.policies, self.limits.default_max_age))

    # -- start-up -----------------------------------------------------------------------------------

    def recover(self) -> None:
        """Undo what a crash left: staging and download files, and rows of writes never acknowledged.

        Also re-applies the path policies to every row if they changed since the last mount (a one-off
        pass over the index; otherwise start-up does no work proportional to the number of files).
        Data files of evicted rows that a crash left behind are removed by the reaper (run_reaper).
        """
        for p in self.tmp_dir.iterdir():
            p.unlink(missing_ok=True)
        fingerprint = self._policy_fingerprint()
        if self.index.get_meta("policy") != fingerprint:
            started = time.monotonic()
            with self.index.transaction():
                n = self._apply_policies()
                self.index.set_meta("policy", fingerprint)
            log.info(
                "applied cache policies in %.1fs (%d class values changed)", time.monotonic() - started, n
            )
        self.pending_bytes = self.index.doomed_bytes()
        self.settle_orphans()

    def _apply_policies(self) -> int:
        """Give every file the class its path's policy says. Returns how many values changed.

        Set-based: a policy applies to whole subtrees, so the paths of only a few directories are
        needed. A directory is "uniform" when no policy prefix reaches below it (every file under it
        then has the directory's own class); the walk from the root stops at each uniform directory.
        The directories below those inherit their class through their parent links (loaded in one
        query), and one UPDATE over the table gives every file the class of its parent directory.
        Files in the few directories that are not uniform are classed one by one from their paths.
        """
        prefixes = [p.prefix for p in self.limits.policies]

        def uniform(base: str) -> bool:
            return not any(len(p) > len(base) and p.startswith(base) for p in prefixes)

        classes: list[tuple[int, int | None]] = []
        numbers: dict[tuple[int, int | None], int] = {}

        def number(k: tuple[int, int | None]) -> int:
            if k not in numbers:
                numbers[k] = len(classes)
                classes.append(k)
            return numbers[k]

        # Per directory inode: the number of its class if uniform, else one of these.
        unknown, by_path = -1, -2
        top = self.index.max_ino()
        code = array.array("i", [unknown]) * (top + 1)
        code[0] = by_path  # the root's parent, and that of any orphan: never inherited from
        changed = 0
        if uniform(""):
            code[ROOT_INO] = number(self.klass("").columns)
        else:
            code[ROOT_INO] = by_path
            todo = [(ROOT_INO, "")]
            while todo:
                parent, base = todo.pop()
                for ino, name, state, rank, max_age in self.index.entries(parent):
                    rel = base + name.decode("utf-8", "surrogateescape")
                    if state != State.DIR:
                        k = self.klass(rel).columns
                        if k != (rank, max_age):
                            self.index.set_class(ino, k)
                            changed += 1
                    elif uniform(rel + "/"):
                        code[ino] = number(self.klass(rel + "/").columns)
                    else:
                        code[ino] = by_path
                        todo.append((ino, rel + "/"))
        parents = array.array("q", bytes(8 * (top + 1)))
        for ino, par in self.index.dir_parents():
            parents[ino] = par
        for ino, par in self.index.dir_parents():
            if code[ino] != unknown:
                continue
            chain = [ino]
            while code[par] == unknown:
                chain.append(par)
                par = parents[par]
            c = code[par]
            for d in chain:
                code[d] = c
        del parents

        def klass_of(dir_ino: int) -> tuple[int, int | None] | None:
            c = code[dir_ino] if 0 <= dir_ino <= top else by_path
            return classes[c] if c >= 0 else None

        return changed + self.index.set_class_by_parent(klass_of)

    # -- paths --------------------------------------------------------------------------------------

    def data_path(self, ino: int) -> str:
        return f"{self.data_dir}/{ino % 256:02x}/{ino}"

    def key(self, ino: int) -> str:
        return self.prefix + self.index.relpath(ino)

    def _unlink_data(self, ino: int) -> None:
        _unlink_quiet(self.data_path(ino))

    def _tmp(self, kind: str, ino: int) -> str:
        return f"{self.tmp_dir}/{kind}-{ino}-{secrets.token_hex(4)}"

    def _place(self, src: str, ino: int) -> str:
        dst = self.data_path(ino)
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            # data/XX was removed (someone wiped the cache directory under us): make it again.
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            os.rename(src, dst)
        return dst

    # -- reads --------------------------------------------------------------------------------------

    def open_cached(self, node: Node) -> int | None:
        """An fd on the complete cached copy, or None if there is none (then the row becomes REMOTE)."""
        if node.state not in IN_CACHE:
            return None
        try:
            fd = os.open(self.data_path(node.ino), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._demote(node)
            return None
        if os.fstat(fd).st_size != node.size:
            os.close(fd)
            log.warning(
                "cached copy of %s has the wrong length; fetching it again", self.index.relpath(node.ino)
            )
            self._demote(node)
            self._unlink_data(node.ino)
            return None
        self.stats["hits"] += 1
        return fd

    def _demote(self, node: Node) -> None:
        self.cached_bytes -= node.size
        if node.state == State.LOCAL:
            # Its only copy is gone (the cache directory was wiped): the file is gone too.
            log.warning("local-only file %s lost its cached copy; removing it", self.index.relpath(node.ino))
            self.index.remove(node.ino)
        else:
            self.index.set_state(node.ino, State.REMOTE)

    async def verify(self, ino: int, fd: int) -> int:
        """The first read of a cached file after a mount checks its bytes against the MD5 recorded
        when they entered the cache. A damaged file is dropped and fetched again; the fd returned
        is the one to read from."""
        if ino in self._verified:
            return fd
        expected = self.index.get_md5(ino)
        try:
            actual = await trio.to_thread.run_sync(md5_fd, fd, limiter=self.limiter) if expected else None
        except BaseException:
            os.close(fd)  # the caller handed the fd over
            raise
        node = self.index.get(ino)
        if expected is None or actual == expected or node is None or node.state not in IN_CACHE:
            self._verified[ino] = True
            return fd
        log.warning(
            "cached copy of %s is damaged (MD5 %s, expected %s); fetching it again",
            self.index.relpath(ino),
            actual,
            expected,
        )
        self.stats["damaged"] += 1
        os.close(fd)
        self._demote(node)
        self._unlink_data(ino)
        return await self.fetch(ino)

    async def fetch(self, ino: int) -> int:
        """An fd on a complete local copy of the file's object, downloading it if needed."""
        while True:
            node = self.index.get(ino)
            if node is None:
                raise FileNotFoundError(errno.ENOENT, "file was removed")
            fd = self.open_cached(node)
            if fd is not None:
                return fd
            d = self.open_download(node)
            try:
                if d.inline is not None:
                    inline, d.inline = d.inline, None
                    await self._download(d, inline)
                await d.wait_until(None)
                return os.dup(d.fd)
            finally:
                self.close_download(d)

    def open_download(self, node: Node) -> Download:
        """Join the download of a cold file, or start it. The caller must close_download() it.

        Concurrent readers share one download, and each is served as soon as its bytes have
        arrived, not when the whole object is in.
        """
        d = self._downloads.get(node.ino)
        if d is None:
            tmp = self._tmp("get", node.ino)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            d = self._downloads[node.ino] = Download(node.ino, tmp, fd, node.size, self.limits.read_part_size)
            d.users += 1  # the download task's own reference
            self.stats["misses"] += 1
            if self.nursery is not None:
                self.nursery.start_soon(self._download, d, node)
            else:
                d.inline = node  # no nursery (in-process use): the first waiter runs it
        d.users += 1
        return d

    @staticmethod
    def found_disk_full(d: Download) -> bool:
        """The download failed because the cache disk had no room, even after eviction."""
        return isinstance(d.error, LocalWriteError) and d.error.errno == errno.ENOSPC

    async def read_direct(self, ino: int, off: int, size: int) -> bytes:
        """Serve one read straight from S3, for a file the full cache disk has no room for: slower
        (a ranged GET per read), but the reader gets its bytes rather than EIO. If-Match keeps
        every range to the version the index knows."""
        node = self.index.get(ino)
        if node is None or node.etag is None:
            raise OSError(errno.EIO, f"inode {ino}: no S3 object to read from")
        size = min(size, node.size - off)
        if size <= 0:
            return b""
        self.stats["direct_reads"] += 1
        return await self.s3.get_bytes(self.key(ino), off, size, node.etag)

    def close_download(self, d: Download) -> None:
        d.users -= 1
        if d.users == 0:
            os.close(d.fd)

    async def _transfer(self, d: Download, node: Node, key: str) -> tuple[RangeResult, str | None]:
        """Bring the object's bytes into d.fd: one GET, or parallel ranged GETs for a large one."""
        part = self.limits.read_part_size
        if node.size <= part:
            # Small (most media): exactly one GET, no Range header, hashed as it streams.
            r = await self.s3.get_range(key, d.fd, 0, None, lambda n: d.progress(0, n))
            d.plan(r.total, None)
            md5 = r.md5
        else:
            # A short first range: its bytes come back sooner than a whole part's (SeaweedFS: 10.3 ms
            # for 128 KiB, 14.0 ms for 8 MiB), and it tells the size and ETag the other parts need.
            first = min(FIRST_RANGE, part)
            r = await self.s3.get_range(key, d.fd, 0, first - 1, lambda n: d.progress(0, n))
            d.plan(r.total, first)
            # The rest in parallel ranged GETs, asked for in order, so that a sequential reader
            # finds the next part already on its way: that is the read-ahead. Each of
            # read_concurrency fetchers takes the next part from one shared iterator when it is
            # free. (One task per part, started in order, is not enough: trio runs a batch of new
            # tasks in reverse order half of the time, and then the first part came in last.)
            parts_left = iter(range(1, d.nparts))
            hasher = hashlib.md5()

            async def hash_along() -> None:
                # MD5 of the whole object, in order, as its bytes become contiguous from the start:
                # while the later parts still arrive, so that little is left to hash at the end.
                off = 0
                while off < r.total:
                    while d.available - off < min(HASH_STEP, r.total - off):
                        await d.changed.wait()
                    end = d.available
                    await trio.to_thread.run_sync(_md5_update, hasher, d.fd, off, end, limiter=self.limiter)
                    off = end

            async def fetch_parts() -> None:
                for i in parts_left:
                    await self.s3.get_range(
                        key,
                        d.fd,
                        d.ends[i - 1],
                        d.ends[i] - 1,
                        functools.partial(d.progress, i),
                        if_match=r.etag,
                    )

            with first_error():
                async with trio.open_nursery() as parts:
                    parts.start_soon(hash_along)
                    for _ in range(max(1, min(self.limits.read_concurrency, d.nparts - 1))):
                        parts.start_soon(fetch_parts)
            md5 = hasher.hexdigest()
        return r, md5

    async def _transfer_restart(self, d: Download) -> None:
        os.ftruncate(d.fd, 0)
        d.received = [0] * len(d.received)
        d.available = 0

    async def _download(self, d: Download, node: Node) -> None:
        key = self.key(d.ino)
        committed = False
        try:
            for attempt in range(1, DISK_FULL_ATTEMPTS + 1):
                try:
                    r, md5 = await self._transfer(d, node, key)
                    break
                except LocalWriteError as e:
                    if e.errno != errno.ENOSPC or attempt == DISK_FULL_ATTEMPTS:
                        raise
                    # The cache disk is full: drop what came in, make room for the whole object
                    # (from copies that S3 also holds), then once more from the start. Space held
                    # by other downloads and writes in progress comes back when they end.
                    await self._transfer_restart(d)
                    if not self.relieve_disk(need=d.size):
                        if len(self._downloads) <= 1 and not self.writers:
                            raise
                        await trio.sleep(0.1 * attempt)
            assert md5 is not None
            if os.fstat(d.fd).st_size != r.total:
                raise IntegrityError(
                    f"GET {key}: {os.fstat(d.fd).st_size} bytes on disk, object has {r.total}"
                )
            if self.s3.etag_is_md5_of(r.etag, md5) is False:
                raise IntegrityError(f"GET {key}: MD5 {md5} does not match ETag {r.etag}")
            # The bytes are in and checked, and the readers waiting for them are runnable: let them
            # answer the kernel before the rename and the index commit below (0.15 ms per cold file).
            await trio.lowlevel.checkpoint()
            # No fsync: a copy that a crash leaves torn or empty is caught by its length or, on its
            # first read after the next mount, by the MD5 recorded below (Cache.verify).
            # The awaits above let other requests run: re-read the row before trusting it.
            cur = self.index.get(d.ino)
            if cur is not None and cur.state == State.REMOTE and d.ino not in self.writers:
                self.make_room(r.total)
                self._place(d.tmp, d.ino)
                committed = True
                with self.index.transaction():  # one commit for both
                    self.index.set_object(
                        d.ino, State.CACHED, r.total, r.etag, cur.mtime_ns, self.listing_gen
                    )
                    self.index.set_md5(d.ino, md5)
                self._verified[d.ino] = True
                self.cached_bytes += r.total
            # else: unlinked or rewritten meanwhile: its readers get these bytes, the cache nothing.
            d.finish(None)
        except trio.Cancelled as e:  # the mount is going down
            d.finish(e)
            raise
        except Exception as e:
            # Its readers get EIO; the mount stays up (this runs in the mount's nursery).
            d.finish(e)
            if isinstance(e, S3Error | OSError):
                log.warning("download of %s failed: %s", key, e)
            else:
                log.exception("download of %s failed", key)
        finally:
            del self._downloads[d.ino]
            if not committed:
                _unlink_quiet(d.tmp)
            self.close_download(d)

    # -- writes -------------------------------------------------------------------------------------

    async def start_write(self, node: Node, truncate: bool) -> Writer:
        """Open (or join) the staging file of `node`. Without truncate it starts as a copy of the file."""
        while True:
            # Another open of this inode is making its staging copy (the awaits below): wait for it
            # and join its writer, so that every descriptor shares one staging file. Two writers
            # of one inode would each upload their own copy, and the last close would win.
            starting = self._starting.get(node.ino)
            w = self.writers.get(node.ino)
            if starting is not None:
                await starting.wait()
            elif w is not None and w.closing is not None:
                await w.closing.wait()
            else:
                break
            fresh = self.index.get(node.ino)
            if fresh is None:
                raise FileNotFoundError(errno.ENOENT, "file was removed")
            node = fresh
        if w is not None:
            if truncate:
                os.ftruncate(w.fd, 0)
                self.truncated(w)
            return w
        # From here to the registration of the writer, this open owns the inode's start: set before
        # the first await, cleared (and its waiters woken) however the start ends.
        starting = self._starting[node.ino] = trio.Event()
        try:
            return await self._start_writer(node, truncate)
        finally:
            del self._starting[node.ino]
            starting.set()

    async def _start_writer(self, node: Node, truncate: bool) -> Writer:
        path = self._tmp("put", node.ino)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if not truncate and node.state in (State.REMOTE, *IN_CACHE) and node.size > 0:
                src = await self.fetch(node.ino)
                try:
                    await trio.to_thread.run_sync(_copy_fd, src, fd, limiter=self.limiter)
                finally:
                    os.close(src)
                node = self.index.get(node.ino) or node
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        prev = (node.size, node.etag) if node.state in (State.REMOTE, State.CACHED) and node.etag else None
        was_cached = node.state == State.CACHED
        # A row made by create() a moment ago carries the create time the kernel already holds.
        mtime_ns = node.mtime_ns if node.state == State.WRITING else time.time_ns()
        try:
            if node.state != State.WRITING:  # a row made by create() is WRITING already: no commit
                self.index.set_state(node.ino, State.WRITING)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        if node.state in IN_CACHE:
            self.cached_bytes -= node.size
        # A local-only file has no other copy to go back to: its close always commits it again.
        dirty = truncate or prev is None
        # The new version begins here, once the writer is registered: from now on reads go to the
        # staging file, and every handle that took the old version's fd (also one opened during the
        # copy above) drops it at its next read.
        self.content_replaced(node.ino)
        shared = self.pins[node.ino] > 0
        w = self.writers[node.ino] = Writer(
            node.ino,
            path,
            fd,
            prev,
            dirty=dirty,
            seq_end=os.fstat(fd).st_size,
            was_cached=was_cached,
            mtime_ns=mtime_ns,
            shared=shared,
        )
        return w

    def content_version(self, ino: int) -> int:
        """Changes whenever the file's bytes are replaced (a write begins, or the object was replaced
        behind our back). A read handle opened at another version must not serve the bytes it
        opened: the kernel would keep them in its page cache, shared by every later open of the
        inode (keep_cache), long after the new version is in place; and a local filesystem shows
        an overwrite in place to its open readers too."""
        return self._versions.get(ino, 0)

    def content_replaced(self, ino: int) -> None:
        self._version_counter += 1
        self._versions[ino] = self._version_counter

    def drop_new_row(self, ino: int) -> None:
        """Remove the row of a file created a moment ago whose write could not even begin."""
        if ino not in self.writers:
            self.index_write(lambda: self.index.remove(ino))

    def mark_dirty(self, w: Writer) -> None:
        w.generation += 1
        if not w.dirty:
            w.dirty = True
            if w.committed:
                # Written again after an upload: the cached copy no longer matches S3.
                node = self.index.get(w.ino)
                if node is not None and node.state in IN_CACHE:
                    self.cached_bytes -= node.size
                    self.index.set_state(w.ino, State.WRITING)

    async def upload(self, w: Writer) -> None:
        """Make S3 hold exactly the staging file's bytes; on return the write is durable."""
        async with w.lock:
            if w.failed is not None:
                raise OSError(w.failed, "an earlier write to this file failed; nothing was uploaded")
            if not w.dirty or w.unlinked:
                return
            generation = w.generation
            # The index must be able to record the result before S3 is changed (a full cache disk
            # fails here, with nothing done), so that S3 and the index cannot disagree.
            self.index_writable()
            rel = self.index.relpath(w.ino)
            if self.klass(rel).local_only:
                await self._commit_local(w, generation)
                return
            if os.fstat(w.fd).st_size == 0:
                # Never a 0-byte object in the bucket: an empty file lives in the cache only. If it
                # replaced an object, that object is deleted now, before close() returns, so that a
                # crash cannot bring the old bytes back. (Shells open, dup2 and close a file before
                # the data arrives, `cmd > file`; the object is then written at the last close.)
                await self._settle_empty(w, generation)
                return
            # Uploads read the file in worker threads; the size at this moment is what gets committed.
            info = await self._finish_pipeline(w)
            if info is None:
                info = await self.s3.put_file(self.prefix + rel, w.path)
            if w.unlinked:
                # Unlinked while the upload ran; unlink waits for this lock, then deletes the object.
                return
            node = self.index.get(w.ino)
            assert node is not None, "a written file's row is only removed by unlink, which sets w.unlinked"
            self.make_room(info.size)
            w.path = self._place(w.path, w.ino)
            self._record(w.ino, State.CACHED, info.size, info.etag, w.mtime_ns, info.md5)
            self._verified[w.ino] = True
            self.cached_bytes += info.size
            w.prev = (info.size, info.etag)
            self._committed(w, generation, info.size)
            self.stats["uploads"] += 1
            self.stats["uploaded_bytes"] += info.size

    # -- pipelined multipart uploads ------------------------------------------------------------------

    def wrote(self, w: Writer, off: int, n: int) -> None:
        """After every write(): keep a sequential writer's full parts flowing to S3 as they are
        written, so that close() of a large file waits only for its tail."""
        self.mark_dirty(w)
        if w.pipeline_off:
            return
        if off != w.seq_end:
            self._drop_pipeline(w)
            return
        w.seq_end += n
        pl = w.pipeline
        opts = self.s3.opts
        if pl is None:
            if self.nursery is None or w.seq_end < opts.multipart_threshold:
                return
            if self.klass(self.index.relpath(w.ino)).local_only:
                w.pipeline_off = True
                return
            pl = w.pipeline = Pipeline(MultipartUpload(self.s3, self.key(w.ino)), opts.multipart_chunksize)
            self.nursery.start_soon(self._pump, w, pl)
        elif w.seq_end > pl.part_size * 10_000:  # S3's part limit: let close() choose bigger parts
            self._drop_pipeline(w)
            return
        pl.more.set()

    def write_failed(self, w: Writer, e: OSError) -> None:
        w.failed = e.errno or errno.EIO
        self.mark_dirty(w)
        self._drop_pipeline(w)

    def truncated(self, w: Writer) -> None:
        self.mark_dirty(w)
        self._drop_pipeline(w)

    def _drop_pipeline(self, w: Writer) -> None:
        w.pipeline_off = True
        pl, w.pipeline = w.pipeline, None
        if pl is not None:
            pl.stop = True
            pl.more.set()
            if self.nursery is not None:
                self.nursery.start_soon(self._discard, pl)

    async def _discard(self, pl: Pipeline) -> None:
        await pl.done.wait()
        await pl.mpu.abort()

    async def _pump(self, w: Writer, pl: Pipeline) -> None:
        try:
            await pl.mpu.start()
            async with trio.open_nursery() as parts:
                parts.start_soon(self._hash_along, w, pl)
                while not pl.stop:
                    while pl.scheduled_end + pl.part_size <= w.seq_end and not pl.stop:
                        number = pl.scheduled_end // pl.part_size + 1
                        parts.start_soon(pl.mpu.upload_part, number, w.path, pl.scheduled_end, pl.part_size)
                        pl.scheduled_end += pl.part_size
                        pl.scheduled.set()
                    await pl.more.wait()
                    pl.more = trio.Event()
                pl.scheduled.set()
        except Exception as e:
            pl.error = e
            log.info("pipelined upload of %s failed (%s); close() uploads the whole file", pl.mpu.key, e)
        finally:
            pl.done.set()

    async def _hash_along(self, w: Writer, pl: Pipeline) -> None:
        """Hash the parts in order as they are handed out (their bytes no longer change: any write
        that does not append ends the pipeline)."""
        while True:
            if pl.hashed < pl.scheduled_end:
                end = pl.scheduled_end
                await trio.to_thread.run_sync(
                    _md5_update_path, pl.md5, w.path, pl.hashed, end, limiter=self.limiter
                )
                pl.hashed = end
            elif pl.stop:
                return
            else:
                await pl.scheduled.wait()
                pl.scheduled = trio.Event()

    async def _finish_pipeline(self, w: Writer) -> ObjectInfo | None:
        """At close(): upload the tail and complete, or None if the whole file must be uploaded."""
        pl, w.pipeline = w.pipeline, None
        w.pipeline_off = True  # one pipeline per write: later writes are uploaded whole
        if pl is None:
            return None
        pl.stop = True
        pl.more.set()
        await pl.done.wait()
        size = os.fstat(w.fd).st_size
        if pl.error is not None or size < pl.scheduled_end or size < self.s3.opts.multipart_threshold:
            await pl.mpu.abort()
            return None

        async def hash_tail() -> None:
            await trio.to_thread.run_sync(
                _md5_update_path, pl.md5, w.path, pl.hashed, size, limiter=self.limiter
            )

        try:
            with first_error():
                async with trio.open_nursery() as tail:
                    tail.start_soon(hash_tail)
                    off = pl.scheduled_end
                    while off < size:
                        length = min(pl.part_size, size - off)
                        tail.start_soon(pl.mpu.upload_part, off // pl.part_size + 1, w.path, off, length)
                        off += length
            etag = await pl.mpu.complete()
        except BaseException:
            await pl.mpu.abort()
            raise
        self.stats["pipelined_uploads"] += 1
        return ObjectInfo(pl.mpu.key, size, etag, 0, pl.md5.hexdigest())

    def _record(
        self, ino: int, state: State, size: int, etag: str | None, mtime_ns: int, md5: str | None
    ) -> None:
        """Record what S3 now holds, after a PUT or DELETE (see index_write)."""

        def record() -> None:
            self.index.set_object(ino, state, size, etag, mtime_ns, self.listing_gen)
            self.index.set_md5(ino, md5)

        self.index_write(record)

    def index_write(self, change: Callable[[], None]) -> None:
        """Make an index change that must not be lost, in one transaction. The index is probed before
        S3 is changed, but a full cache disk can still refuse the few pages a change needs: then
        cached copies are evicted, or the reserve is given up, and it is tried again, since an index
        that disagrees with S3 fails a write S3 in fact holds, or shows a file that never was."""
        while True:
            try:
                with self.index.transaction(atomic=True):
                    change()
                return
            except sqlite3.OperationalError:
                if not self._make_index_room():
                    raise

    def keep_reserve(self) -> None:
        """Hold RESERVE bytes of the cache disk for the index alone (see _make_index_room); made
        again by housekeeping once there is room."""
        if self.reserve_path.exists():
            return
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self._reserve_failed(e)
            return
        try:
            os.posix_fallocate(fd, 0, RESERVE)
        except OSError as e:
            os.close(fd)
            _unlink_quiet(str(self.reserve_path))
            self._reserve_failed(e)
            return
        os.close(fd)
        self.reserve_short = False

    def _reserve_failed(self, e: OSError) -> None:
        # Only a full disk stops new writes (index_writable); any other failure goes without one.
        self.reserve_short = e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not self.reserve_short:
            log.warning("cannot keep the index's reserve %s: %s", self.reserve_path, e)

    def _make_index_room(self) -> bool:
        """The index could not grow (a full cache disk): free space for it. False if nothing is left."""
        if self.relieve_disk():
            return True
        if self.reserve_path.exists():
            log.warning("cache filesystem full: giving the index its reserved %d bytes", RESERVE)
            _unlink_quiet(str(self.reserve_path))
            return True
        return False

    def _committed(self, w: Writer, generation: int, size: int) -> None:
        """The bytes of `generation` are committed. If the file was written meanwhile, what was
        committed is an older state: it stays dirty (and WRITING), so the next close() uploads."""
        w.committed = True
        if w.generation == generation:
            w.dirty = False
            return
        w.dirty = True
        self.cached_bytes -= size
        self.index.set_state(w.ino, State.WRITING)

    async def _commit_local(self, w: Writer, generation: int) -> None:
        """close() of a local-only file: durable on the cache disk (fsync), never sent to S3."""
        md5 = await trio.to_thread.run_sync(_fsync_and_hash, w.fd, limiter=self.limiter)
        if w.unlinked:
            return
        size = os.fstat(w.fd).st_size
        self.make_room(size)
        w.path = self._place(w.path, w.ino)
        self.index.set_object(w.ino, State.LOCAL, size, None, w.mtime_ns, self.listing_gen)
        self.index.set_md5(w.ino, md5)
        self._verified[w.ino] = True
        self.cached_bytes += size
        self._committed(w, generation, size)

    async def finish_write(self, w: Writer) -> bool:
        """Last write handle closed. Returns True if the row was removed (the write never reached S3).

        An open for writing that arrives while this awaits waits for it (start_write), then starts
        a writer of its own on what the index says by then."""
        w.closing = trio.Event()
        try:
            self._drop_pipeline(w)
            if w.failed is None and w.dirty and not w.unlinked and os.fstat(w.fd).st_size == 0:
                # Emptied, and no close() settled it (a truncate through an fd that was never
                # flushed, say): the last release does it, with errors only logged.
                try:
                    async with w.lock:
                        await self._settle_empty(w, w.generation)
                except (S3Error, OSError) as e:
                    log.warning("could not delete %s after it was emptied: %s", self.key(w.ino), e)
        finally:
            try:
                removed = self._retire(w)
            finally:
                w.closing.set()
        return removed

    @staticmethod
    def kernel_copy_current(w: Writer) -> bool:
        """After finish_write: whether every page of the file the kernel may hold is the committed
        version. Writes pass through the kernel's page cache (and a write-open drops what it held
        before), so that holds unless the upload failed or other handles could read meanwhile."""
        return w.committed and not w.dirty and not w.unlinked and not w.shared and w.failed is None

    def _retire(self, w: Writer) -> bool:
        # Files before the index: removing the staging file frees the space that the index update
        # below needs when the cache disk is full. If that update fails anyway, the row stays
        # WRITING and settle_orphans() puts it right later.
        reverting = not w.unlinked and (w.dirty or not w.committed)
        del self.writers[w.ino]
        os.close(w.fd)
        if not w.committed:
            _unlink_quiet(w.path)
        elif reverting:
            self._unlink_data(w.ino)  # committed once, then changed: not what S3 holds
        if not reverting:
            return False
        # Read handles opened after an fsync() hold an fd on those bytes, which S3 does not have.
        self.content_replaced(w.ino)
        # The upload failed (close() returned an error), or nothing was written: S3 still holds the
        # previous version (or nothing), so the index goes back to saying exactly that.
        if w.prev is None:
            self.index_write(lambda: self.index.remove(w.ino))
            return True
        size, etag = w.prev
        node = self.index.get(w.ino)
        mtime = node.mtime_ns if node else time.time_ns()
        state = State.REMOTE
        if w.was_cached and not w.committed and _has_size(self.data_path(w.ino), size):
            # Never uploaded: the cached copy the write started from is still the object in S3.
            state = State.CACHED
        self.index_write(lambda: self.index.set_object(w.ino, state, size, etag, mtime, self.listing_gen))
        if state == State.CACHED:
            self.cached_bytes += size
        return False

    async def _settle_empty(self, w: Writer, generation: int) -> None:
        """Commit an empty file (with w.lock held): kept in the cache only, as LOCAL, since S3 never
        gets a 0-byte object. If it replaced an object, that object is deleted first; if the delete
        fails, so does the close(), and the last release goes back to the version S3 still holds."""
        if w.prev is not None:
            await self.s3.delete(self.key(w.ino))
            w.prev = None
        if w.unlinked:
            return
        w.path = self._place(w.path, w.ino)
        self._record(w.ino, State.LOCAL, 0, None, w.mtime_ns, EMPTY_MD5)
        self._verified[w.ino] = True
        self._committed(w, generation, 0)

    # -- removal and eviction -----------------------------------------------------------------------

    def forget(self, node: Node) -> None:
        """The file is gone from the namespace: drop its cached copy (open fds keep working)."""
        if node.state in IN_CACHE:
            self.cached_bytes -= node.size
        self._unlink_data(node.ino)
        w = self.writers.get(node.ino)
        if w is not None:
            w.unlinked = True

    def busy(self, ino: int) -> bool:
        return self.pins[ino] > 0 or ino in self.writers or ino in self._downloads

    def _evict(self, victims: list[tuple[int, int, State]]) -> None:
        """Take these (ino, size, state) rows out of the cache: the rows first, the data files after.

        One transaction turns the rows REMOTE (local-only rows, which have no other copy, are removed)
        and enters them in the index's `doomed` table; the bytes leave the accounting at once. Then
        the data files go: the first INLINE_UNLINKS here and now, the rest by the reaper (run_reaper),
        so a large pass does not hold up every other request while the filesystem frees the blocks.
        A crash in between leaves data files whose rows say REMOTE: garbage, never served (only
        CACHED or LOCAL rows are read from data/), replaced by the next download of the file, and
        removed at the next mount, since their `doomed` entries were committed with the rows.
        """
        if not victims:
            return
        if self.reaper_running and not self._checkpoint_wanted:
            # The reaper checkpoints the index in a worker thread; until then commits skip it.
            self.index.suspend_checkpoints()
            self._checkpoint_wanted = True
            self._wake_reaper()
        with self.index.transaction():
            self.index.evict(victims)
        freed = sum(size for _, size, _ in victims)
        self.cached_bytes -= freed
        self.stats["evictions"] += len(victims)
        self.stats["evicted_bytes"] += freed
        inline = victims if not self.reaper_running else victims[:INLINE_UNLINKS]
        self._reap([ino for ino, _, _ in inline], to_trash=False)  # a failure to record it is harmless
        if len(inline) < len(victims):
            self.pending_bytes += sum(size for _, size, _ in victims[len(inline) :])
            self._wake_reaper()

    def _wake_reaper(self) -> None:
        if self._reaped.is_set():
            self._reaped = trio.Event()
        self._reap_wanted.set()

    def _reap(self, inos: list[int], to_trash: bool) -> tuple[list[str], bool]:
        """Remove the data files of these `doomed` rows from data/: unlink them, or (to_trash) move
        them to trash/ and return their new paths, for a worker thread to unlink. The flag says
        whether their `doomed` entries could be deleted (not on a full disk; then they are looked at
        again later, and find their files gone).

        Runs on the event loop, between two awaits, so that nothing can put a new copy in place
        meanwhile: a file goes only if its row is still REMOTE (or gone) and no download or write
        of it runs. A row in the cache again has a new copy in data/, which stays. A download or
        write in progress may or may not put one there: its entry stays for a later look.
        """
        states = self.index.states(inos)
        moved: list[str] = []
        done: list[int] = []
        for ino in inos:
            if ino in self.writers or ino in self._downloads:
                continue
            done.append(ino)
            if states.get(ino) in (*IN_CACHE, State.WRITING):
                continue
            if not to_trash:
                self._unlink_data(ino)
                continue
            self._trashed += 1
            dst = f"{self.trash_dir}/{self._trash_tag}-{self._trashed}"
            try:
                os.rename(self.data_path(ino), dst)
            except FileNotFoundError:
                continue
            moved.append(dst)
        try:
            self.index.undoom(done)
        except sqlite3.Error as e:
            log.warning("could not record the removal of %d evicted cache files: %s", len(done), e)
            return moved, False
        return moved, True

    async def run_reaper(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background task (started by the composition root): removes the data files of evicted rows
        that an eviction pass left to it, and at start what a crash left in trash/ and `doomed`.

        Per step: up to REAP_CHUNK files are moved to trash/ on the event loop (a rename frees no
        blocks, so it is cheap even where an unlink waits for a discard), then unlinked in a worker
        thread. Until then their bytes count as free for the free-space floor (pending_bytes).
        Before that, the checkpoint of the index that the pass's commit skipped, in a worker thread.
        """
        self.reaper_running = True
        self._reap_wanted.set()  # `doomed` entries from before this mount
        task_status.started()
        try:
            leftovers = await trio.to_thread.run_sync(_list_dir, str(self.trash_dir), limiter=self.limiter)
            if leftovers:
                log.info("removing %d cache files left in trash/ by the previous run", len(leftovers))
                await trio.to_thread.run_sync(_unlink_all, leftovers, limiter=self.limiter)
            while True:
                await self._reap_wanted.wait()
                self._reap_wanted = trio.Event()
                if self._checkpoint_wanted:
                    try:
                        await trio.to_thread.run_sync(checkpoint, self.index.path, limiter=self.limiter)
                    except sqlite3.Error as e:
                        log.warning("checkpoint of the index failed (the next commit does it): %s", e)
                    self._checkpoint_wanted = False
                    self.index.resume_checkpoints()
                after = 0  # one sweep up the inode numbers: an entry left for later is not retried at once
                while True:
                    try:
                        chunk = self.index.doomed(REAP_CHUNK, after)
                        if not chunk:
                            break
                        after = chunk[-1][0]
                        paths, recorded = self._reap([ino for ino, _ in chunk], to_trash=True)
                    except (OSError, sqlite3.Error) as e:
                        log.error("could not remove evicted cache files: %s", e)
                        paths, recorded = [], False
                    if paths:
                        await trio.to_thread.run_sync(_unlink_all, paths, limiter=self.limiter)
                    if not recorded:
                        # A full cache disk (the index cannot record the step): again later.
                        await trio.sleep(REAP_RETRY)
                        continue
                    await trio.lowlevel.checkpoint()
                    self.pending_bytes = max(0, self.pending_bytes - sum(size for _, size in chunk))
                self.pending_bytes = 0
                self._reaped.set()
        finally:
            self.reaper_running = False
            if self._checkpoint_wanted:
                self._checkpoint_wanted = False
                with contextlib.suppress(sqlite3.Error):
                    self.index.resume_checkpoints()

    async def wait_reaped(self) -> None:
        """Return once the data files of every row evicted so far are gone (needs the reaper)."""
        while not self._reaped.is_set() or self._reap_wanted.is_set():
            await self._reaped.wait()
            await trio.lowlevel.checkpoint()

    def _fs_bytes(self) -> tuple[int, int]:
        """(free, total) bytes of the filesystem holding the cache."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def _bytes_to_free(self, incoming: int) -> tuple[int, bool]:
        """(bytes to evict, whether the free-space floor is what is short)."""
        over_cap = self.cached_bytes + incoming - self.limits.cap
        short = 0
        min_free = self.limits.min_free
        if min_free:
            free, total = self._fs_bytes()
            want = int(min_free * total) if min_free < 1 else int(min_free)
            # Only bytes not yet on the cache filesystem count as incoming (downloads and staging
            # files are already there); be generous rather than run again on the next fill. Files
            # the reaper is about to unlink count as free: they were evicted already.
            short = want - free - self.pending_bytes
            if short > 0:
                short += int(want * (1 - LOW_WATERMARK))
        if over_cap <= 0 and short <= 0:
            return 0, False
        # Evict down to the low watermark, so that eviction runs in batches, not on every fill.
        return max(self.cached_bytes + incoming - int(self.limits.cap * LOW_WATERMARK), short), short > 0

    def make_room(self, incoming: int) -> None:
        """Enforce the cap and the free-space floor as data enters the cache, in one batch.

        Order: lowest eviction rank first (remote media before local media, local-only files last),
        then least recently used. Open files, files being written and downloads are skipped.
        """
        need, floor_short = self._bytes_to_free(incoming)
        if need <= 0:
            return
        self.flush_atimes()
        self._evict_batch(need, floor_short)

    def _evict_batch(self, need: int, floor_short: bool) -> None:
        victims: list[tuple[int, int, State]] = []
        freed = 0
        # One cursor down the eviction order; the rows change only once it is closed.
        with contextlib.closing(self.index.eviction_candidates()) as candidates:
            for ino, size, state in candidates:
                # Local-only files have no other copy: only the age limit or a full disk (the
                # free-space floor) may take them, never the cap alone. Empty files free nothing.
                spare = state == State.LOCAL and (not floor_short or size == 0)
                if spare or self.busy(ino):
                    continue
                victims.append((ino, size, state))
                freed += size
                if freed >= need:
                    break
        self._evict(victims)
        if freed < need:
            now = time.monotonic()
            if now - self._last_warning > 60:
                self._last_warning = now
                log.warning(
                    "cache cannot free %d more bytes: only open or written files are left "
                    "(%d bytes cached, cap %d)",
                    need - freed,
                    self.cached_bytes,
                    self.limits.cap,
                )

    def evict_aged(self) -> int:
        """Drop cached copies not used within their max age. Returns how many went."""
        self.flush_atimes()
        return self._evict_expired()

    def _evict_expired(self) -> int:
        now = int(self.clock())
        with contextlib.closing(self.index.expired(now)) as expired:
            victims = [e for e in expired if e[1] > 0 and not self.busy(e[0])]
        self._evict(victims)
        return len(victims)

    def relieve_disk(self, need: int = 0) -> int:
        """The cache filesystem is full (ENOSPC from a write, or the index cannot grow): evict
        S3-backed copies, whatever the cap says, until `need` bytes plus 5% of the filesystem (at
        least 1 MiB) are free again. Returns the bytes freed. Data files go before their rows, so
        the space is there even if the index cannot record it yet (such a row is demoted on its
        next open). Synchronous: the space is needed now, and this is rare. Files that the reaper
        has yet to unlink go first."""
        freed = self._reap_all_now()
        free, total = self._fs_bytes()
        want = max(1024 * 1024, total // 20) + need
        victims: list[tuple[int, int]] = []
        short = want - free
        with contextlib.closing(self.index.eviction_candidates()) as candidates:
            for ino, size, state in candidates:
                if short <= 0:
                    break
                if self.busy(ino) or state == State.LOCAL:
                    continue
                victims.append((ino, size))
                short -= size
        for ino, size in victims:
            self._unlink_data(ino)
            freed += size
            try:
                self.index.set_state(ino, State.REMOTE)
                self.cached_bytes -= size
            except sqlite3.Error:
                # Still listed as cached: its next open finds the file gone and demotes it (and
                # only then is it uncounted, once).
                pass
            self.stats["evictions"] += 1
        if freed:
            log.warning("cache filesystem full: evicted %d bytes of cached copies to make room", freed)
        return freed

    def _reap_all_now(self) -> int:
        """Unlink, here and now, every file the reaper has yet to: those in trash/, and those of
        `doomed` rows. Returns their bytes (as the index counts them)."""
        freed = 0
        with contextlib.suppress(OSError):
            for name in os.listdir(self.trash_dir):
                path = f"{self.trash_dir}/{name}"
                with contextlib.suppress(OSError):
                    freed += os.stat(path).st_size
                    os.unlink(path)
        with contextlib.suppress(sqlite3.Error):
            # Files first: on a full disk the index may not be able to record it (then the entries
            # stay, and the reaper finds their files already gone).
            doomed = [(ino, size) for ino, size in self.index.doomed(-1) if not self.busy(ino)]
            states = self.index.states([ino for ino, _ in doomed])
            for ino, size in doomed:
                if states.get(ino) not in (*IN_CACHE, State.WRITING):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.data_path(ino))
                        freed += size
            self.pending_bytes = 0
            self.index.undoom([ino for ino, _ in doomed])
        return freed

    def index_writable(self) -> None:
        """Make sure the index can take a write before S3 is changed (see upload); a full disk is
        relieved once by eviction before the error stands."""
        try:
            self.index.probe_writable()
        except sqlite3.OperationalError:
            if not self.relieve_disk():
                raise
            self.index.probe_writable()
        # The reserve is for recording what was already done, not for starting more.
        if not self.reserve_path.exists():
            self.keep_reserve()
            if self.reserve_short:
                raise sqlite3.OperationalError("database or disk is full (no room for the index's reserve)")

    def settle_orphans(self) -> None:
        """WRITING rows with no writer (a crash, or an index update that failed on a full disk) go
        back to what S3 holds: nothing was ever uploaded for them."""
        for node in self.index.writing():
            if node.ino in self.writers:
                continue
            if node.etag is None:
                log.info("dropping %s: its write never completed", self.index.relpath(node.ino))
                self.index.remove(node.ino)
            else:
                self.index.set_state(node.ino, State.REMOTE)
            self._unlink_data(node.ino)

    def housekeeping(self) -> None:
        """Periodic: age limit, free space taken by others, pending access times, counters.
        Raises what the index raises (a full cache disk); the caller logs it and goes on."""
        self.settle_orphans()
        self.evict_aged()
        self.make_room(0)
        self.flush_atimes()
        self.persist_stats()
        self.keep_reserve()

    # -- access times and counters ------------------------------------------------------------------

    def touch(self, ino: int) -> None:
        self._atimes[ino] = int(self.clock())
        if len(self._atimes) >= ATIME_BATCH:
            self.flush_atimes()

    def flush_atimes(self) -> None:
        if not self._atimes:
            return
        self.index.begin()
        try:
            self.index.touch_many(self._atimes)
        finally:
            self.index.commit()
        self._atimes.clear()

    def status(self) -> dict[str, object]:
        """What `s3cachefs status` shows, from the live process."""
        return {
            "cache_dir": str(self.root),
            "identity": self.index.get_meta("identity"),
            "pid": os.getpid(),
            "cap": self.limits.cap,
            "min_free": self.limits.min_free,
            "in_cache_bytes": self.cached_bytes,
            "pending_delete_bytes": self.pending_bytes,
            **self.index.cache_summary(),
            **{f"stat_{k}": v for k, v in self.counters().items()},
        }

    def counters(self) -> Counter[str]:
        """Cumulative counters (across restarts), S3 calls per operation included."""
        calls = Counter({f"s3_{op}": n for op, n in self.s3.calls.items()})
        return self._stats_base + self.stats + calls

    def persist_stats(self) -> None:
        """Counters survive restarts, for `s3cachefs status`."""
        self._saves += 1
        self.index.set_meta("stats", json.dumps(dict(self.counters())))
        self.index.set_meta("saves", str(self._saves))
        self.index.set_meta("limits", json.dumps({"cap": self.limits.cap, "min_free": self.limits.min_free}))


def _md5_update(md5: hashlib._Hash, fd: int, start: int, end: int) -> None:
    while start < end:
        chunk = os.pread(fd, min(HASH_STEP, end - start), start)
        if not chunk:
            raise OSError(errno.EIO, f"file ends at {start}, expected {end} bytes")
        md5.update(chunk)
        start += len(chunk)


def _md5_update_path(md5: hashlib._Hash, path: str, start: int, end: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _md5_update(md5, fd, start, end)
    finally:
        os.close(fd)


def _fsync_and_hash(fd: int) -> str:
    os.fsync(fd)
    return md5_fd(fd)


def _copy_fd(src: int, dst: int) -> None:
    with os.fdopen(os.dup(src), "rb") as fin, os.fdopen(os.dup(dst), "wb") as fout:
        fin.seek(0)
        shutil.copyfileobj(fin, fout, 1024 * 1024)


def _has_size(path: str, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except FileNotFoundError:
        return False


def _list_dir(path: str) -> list[str]:
    return [f"{path}/{name}" for name in os.listdir(path)]


def _unlink_all(paths: list[str]) -> None:
    """Worker thread: unlink files nobody else refers to (in trash/)."""
    for path in paths:
        _unlink_quiet(path)


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
