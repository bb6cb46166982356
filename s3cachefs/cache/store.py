"""The cache directory's layout and the registry of what is in use.

Layout of the cache directory:
    index.sqlite        the index (index.py)
    data/XX/<ino>       complete copies of objects (XX = ino % 256, to keep directories small)
    tmp/                downloads and write staging files in progress; emptied at every mount
    trash/              data files of evicted rows on their way out (evict.Evictor.run_reaper)
    reserve             1 MiB held for the index (space.py)
    lock                flock()ed by the running instance

The registry says which inodes are in use in this process: open handles (pins), the writer of a
file being written (one per inode, shared by all its write handles), its start in progress, and the
download of a cold file (one per inode, shared by all its readers). An inode in use is never evicted
and its data file is never removed by the reaper.

The accounting lives here too, but only states.py (and eviction, through states.py) changes
`cached_bytes` and `cached_files`: the sum of the sizes, and the number, of the CACHED, LOCAL and
QUEUED rows.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cachetools
import trio

from ..config import PathPolicy
from ..index import Index, Node
from ..metrics import Metrics
from ..s3 import MultipartUpload

log = logging.getLogger(__name__)

# Flush access times to the index when this many are pending (and at every eviction pass and every
# housekeeping tick): one transaction for many reads instead of one disk write per open.
ATIME_BATCH = 10_000


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
    # Bytes of async uploads that may wait in the queue; past it, those files upload at close().
    upload_queue_max: int = 1024**3
    upload_concurrency: int = 4


@dataclass(eq=False)
class Download:
    """One cold file coming in from S3, shared by all its readers (see download.Downloads.open).

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

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        self.received = [0] * len(self.received)
        self.available = 0

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
            raise AssertionError("in-process downloads without a nursery are run by Downloads.fetch")
        while not self.done and (end is None or self.available < min(end, self.size)):
            await self.changed.wait()
        if self.error is not None:
            raise OSError(errno.EIO, f"download failed: {self.error}")

    async def read(self, off: int, size: int) -> bytes:
        await self.wait_until(off + size)
        return os.pread(self.fd, size, off)


@dataclass(eq=False)
class Pipeline:
    """A sequential writer's multipart upload, its full parts sent while the file is written."""

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
    # Changed with no handle's close to follow (a rename, a truncate(path)): the last release
    # uploads it if no close did.
    settle_at_release: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    # Pipelined upload: while every write so far continued where the last one ended, full parts go
    # up as they are written (see write.Writes.wrote); any other write or a truncate turns this off.
    seq_end: int = 0
    pipeline: Pipeline | None = None
    pipeline_off: bool = False
    # MD5 of bytes [0, seq_end), taken from a sequential writer's buffers as they are written, for
    # the Content-MD5 of the PUT at close() (write.Writes.wrote): close() then hashes nothing it has
    # not seen written. None until the first write, and for good once a write is out of sequence,
    # the file is truncated or a write failed, or for files whose uploads do not need it (local-only
    # and async paths hash as they copy). A pipelined upload takes it over at its start.
    md5: hashlib._Hash | None = None
    hashing: bool = True
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
    # The row was QUEUED when the write began, or a close of this write queued its upload: data/<ino>
    # holds that version (of queued_size bytes), which is durable and acknowledged; a write that
    # fails after it goes back to it. An async commit copies the staging file into data/ rather
    # than moving it, so that later writes cannot change the queued bytes.
    was_queued: bool = False
    queued_size: int = 0
    staging_is_data: bool = False  # a sync or local commit moved the staging file into data/


class Store:
    """Paths and placing files; the registry of pins, writers and downloads; the accounting."""

    def __init__(
        self,
        root: Path,
        index: Index,
        prefix: str,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ):
        self.root = root
        self.data_dir = root / "data"
        self.tmp_dir = root / "tmp"
        self.trash_dir = root / "trash"
        # A queued version about to be replaced in data/ by a newer one, until the index records
        # that (Writes._commit_queued, Cache.recover).
        self.keep_dir = root / "keep"
        self.index = index
        self.prefix = prefix
        self.clock = clock
        # -- the registry
        self.pins: Counter[int] = Counter()  # open handles per inode: never evicted while > 0
        self.writers: dict[int, Writer] = {}
        # Inodes whose first write-open is making its staging copy; later opens wait, then join.
        self.starting: dict[int, trio.Event] = {}
        self.downloads: dict[int, Download] = {}
        # Inodes whose cached bytes were hashed (or written) by this process; bounded, so a file that
        # falls out is simply hashed again on its next first read.
        self.verified: cachetools.LRUCache[int, bool] = cachetools.LRUCache(maxsize=100_000)
        # Content versions (see content_version): a stamp from one counter that only grows, per
        # inode whose content was replaced in this process; bounded, and a stamp that falls out
        # reads as 0, which only makes an old handle reopen once more than it had to.
        self._versions: cachetools.LRUCache[int, int] = cachetools.LRUCache(maxsize=100_000)
        self._version_counter = 0
        # The content version of each inode's last replacement behind our back (same bound).
        self._outside: cachetools.LRUCache[int, int] = cachetools.LRUCache(maxsize=100_000)
        self._atimes: dict[int, int] = {}
        # Files whose row took a newer S3 version from this mount (our PUT, a queued upload sent, a
        # rename's copy, a refresh) since the full listing asked for the page it is applying: that
        # page is older news for them. None while no full listing runs; emptied before each page is
        # asked for, so it holds one page's round trip of changes (Namespace.full_listing).
        self.changed_since_page: set[int] | None = None
        # Keys whose queued DELETE was done, and when (time.monotonic()): a LIST page asked for
        # before that time may still name them (Cache.deleted_since). A minute is far longer than
        # any one page's round trip; bounded, and a key that falls out early can only come back
        # as an empty directory or a file whose GET says it is gone.
        self.deletes_done: cachetools.TTLCache[str, float] = cachetools.TTLCache(maxsize=10_000, ttl=60)
        # Background tasks of the cache (downloads, pipelined uploads) run here, so they go on when
        # the request that started them is answered; set while Cache.run runs. Without it
        # (in-process use) a download is run by its first waiter.
        self.nursery: trio.Nursery | None = None
        # -- the accounting (changed through states.py)
        self.cached_bytes = index.cached_bytes()
        self.cached_files = index.cached_files()  # the rows that cached_bytes sums (for the metrics)
        self.pending_bytes = 0  # bytes of evicted files the reaper has yet to unlink
        self.queued_bytes = index.queued_bytes()  # bytes of QUEUED rows (the queue's bound)
        # Also counted by the metrics (metrics.Stats).
        self.stats: Counter[str] = (metrics if metrics is not None else Metrics()).stats()
        for d in (self.data_dir, self.tmp_dir, self.trash_dir, self.keep_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if d.is_symlink():  # mkdir(exist_ok) accepts a symlink to a directory: never follow one
                raise OSError(errno.ELOOP, f"{d} is a symbolic link; refusing to follow it")
        # All 256 data/XX directories up front: otherwise the first file placed in each costs a
        # failed rename, a makedirs and a second rename (see place) on the way to its first byte.
        for i in range(256):
            with contextlib.suppress(FileExistsError):
                os.mkdir(f"{self.data_dir}/{i:02x}", 0o700)

    # -- paths --------------------------------------------------------------------------------------

    def data_path(self, ino: int) -> str:
        return f"{self.data_dir}/{ino % 256:02x}/{ino}"

    def key(self, ino: int) -> str:
        return self.prefix + self.index.relpath(ino)

    def unlink_data(self, ino: int) -> None:
        unlink_quiet(self.data_path(ino))

    def clear_data(self, ino: int) -> None:
        """Make room for a new data/<ino>, whatever is there: a directory someone put there cannot
        be unlinked, nor renamed over, so it is moved to trash/ (where the reaper leaves what it
        cannot remove, with a warning)."""
        path = self.data_path(ino)
        try:
            unlink_quiet(path)
        except IsADirectoryError:
            os.rename(path, f"{self.trash_dir}/foreign-{ino}-{secrets.token_hex(4)}")

    def keep_path(self, ino: int) -> str:
        return f"{self.keep_dir}/{ino}"

    def restore_kept(self, ino: int) -> None:
        """Put the version kept in keep/ back in data/ (durably): the newer one never got committed."""
        try:
            path = self.place(self.keep_path(ino), ino)
        except FileNotFoundError:
            return  # nothing was kept (no older version was in data/)
        fsync_dir(os.path.dirname(path))

    def tmp(self, kind: str, ino: int) -> str:
        return f"{self.tmp_dir}/{kind}-{ino}-{secrets.token_hex(4)}"

    def place(self, src: str, ino: int) -> str:
        dst = self.data_path(ino)
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            # data/XX was removed (someone wiped the cache directory under us): make it again.
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            os.rename(src, dst)
        return dst

    # -- the registry -------------------------------------------------------------------------------

    def busy(self, ino: int) -> bool:
        return self.pins[ino] > 0 or ino in self.writers or ino in self.downloads

    def content_version(self, ino: int) -> int:
        """Changes whenever the file's bytes are replaced (a write begins, or the object was replaced
        behind our back). A read handle opened at another version must not serve the bytes it
        opened: the kernel would keep them in its page cache, shared by every later open of the
        inode (keep_cache), long after the new version is in place; and a local filesystem shows
        an overwrite in place to its open readers too."""
        return self._versions.get(ino, 0)

    def content_replaced(self, ino: int, outside: bool = False) -> None:
        """outside: by another writer of the bucket (the kernel was not told: it holds the old size)."""
        self._version_counter += 1
        self._versions[ino] = self._version_counter
        if outside:
            self._outside[ino] = self._version_counter

    def replaced_outside_since(self, ino: int, version: int) -> bool:
        """Was the file replaced behind our back after content version `version`?"""
        return self._outside.get(ino, 0) > version

    def s3_changed(self, ino: int) -> None:
        """The row of `ino` now holds a version S3 got (or showed) after a listing page was asked for."""
        if self.changed_since_page is not None:
            self.changed_since_page.add(ino)

    # -- access times -------------------------------------------------------------------------------

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


def unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def unlink_or_leave(path: str) -> None:
    """unlink_quiet for files only we put in the cache directory: what cannot be unlinked (a
    directory someone made there) is left, with a warning; not ours to remove, nor to stop on."""
    try:
        unlink_quiet(path)
    except OSError as e:
        log.warning("cannot remove %s from the cache directory (left there): %s", path, e)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
