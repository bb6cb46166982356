"""Reads: the cached copy (checked once per mount), or a cold file streamed in from S3.

A cold file is downloaded once, into tmp/, whoever reads it: concurrent readers share one Download,
and each is served as soon as its own bytes are on disk. A small object is one GET; a large one a
short first range (its bytes come back sooner, and it tells the size and ETag) and then parallel
ranged GETs, in order. Every GET carries If-Match with the ETag the index holds: the kernel was told
that version's size, so the bytes of another version would be served cut to it, or mixed with the
old version's pages. A 412 (s3.Changed) fails the download (its readers get EIO) once `on_changed`
(Namespace.refresh) has taught the index the new version and had the kernel drop the old one; a 404
(s3.NotFound: deleted behind our back) likewise, and the name goes. The
whole object's MD5 is checked against its ETag where the ETag is an MD5, then the file is renamed into
data/ and the row becomes CACHED (states.cached).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import sqlite3
import stat
from collections.abc import Awaitable, Callable

import trio

from ..index import IN_CACHE, Node, State
from ..s3 import (
    S3,
    Changed,
    IntegrityError,
    LocalWriteError,
    NotFound,
    RangeResult,
    S3Error,
    first_error,
    md5_fd,
)
from . import states
from .evict import Evictor
from .space import Space
from .store import Download, Limits, Store, unlink_quiet

log = logging.getLogger(__name__)

# A large download is hashed in steps of this size as its bytes become contiguous.
HASH_STEP = 1024 * 1024
# The first range of a large cold object (see Downloads._transfer).
FIRST_RANGE = 256 * 1024
# A download that finds the cache disk full makes room and starts over, this many times at most.
DISK_FULL_ATTEMPTS = 6


class Downloads:
    def __init__(
        self,
        store: Store,
        s3: S3,
        limits: Limits,
        evictor: Evictor,
        space: Space,
        disk: trio.CapacityLimiter,
    ):
        self.store = store
        self.index = store.index
        self.s3 = s3
        self.limits = limits
        self.evictor = evictor
        self.space = space
        self.disk = disk  # worker threads for local disk work (hashing)
        # Called with the inode when S3 answered 412 to an If-Match GET: the object is no longer the
        # version the index holds. Set by Namespace (its refresh: HEAD, states.replaced or dropped,
        # and the kernel told); a no-op for in-process use without a namespace.
        self.on_changed: Callable[[int], Awaitable[object]] = _nothing

    def open_cached(self, node: Node) -> int | None:
        """An fd on the complete cached copy, or None if there is none (then the row becomes REMOTE)."""
        if node.state not in IN_CACHE:
            return None
        try:
            fd, size = open_data_file(self.store.data_path(node.ino))
        except FileNotFoundError:
            states.demoted(self.store, node.ino)
            return None
        except OSError as e:  # a FIFO, directory or symlink put there: not our file
            why = f"cannot be used ({e})"
        else:
            if size == node.size:
                self.store.stats["hits"] += 1
                return fd
            os.close(fd)
            why = "has the wrong length"
        log.warning("cached copy of %s %s; fetching it again", self.index.relpath(node.ino), why)
        states.demoted(self.store, node.ino)
        self.store.clear_data(node.ino)
        return None

    async def verify(self, ino: int, fd: int) -> int:
        """The first read of a cached file after a mount checks its bytes against the MD5 recorded
        when they entered the cache. A damaged file is dropped and fetched again; the fd returned
        is the one to read from."""
        if ino in self.store.verified:
            return fd
        expected = self.index.get_md5(ino)
        try:
            actual = await trio.to_thread.run_sync(md5_fd, fd, limiter=self.disk) if expected else None
        except BaseException:
            os.close(fd)  # the caller handed the fd over
            raise
        node = self.index.get(ino)
        if expected is None or actual == expected or node is None or node.state not in IN_CACHE:
            self.store.verified[ino] = True
            return fd
        log.warning(
            "cached copy of %s is damaged (MD5 %s, expected %s); fetching it again",
            self.index.relpath(ino),
            actual,
            expected,
        )
        self.store.stats["damaged"] += 1
        os.close(fd)
        states.demoted(self.store, ino)
        self.store.unlink_data(ino)
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
            d = self.open(node)
            try:
                if d.inline is not None:
                    inline, d.inline = d.inline, None
                    await self._download(d, inline)
                await d.wait_until(None)
                return os.dup(d.fd)
            finally:
                self.close(d)

    def open(self, node: Node) -> Download:
        """Join the download of a cold file, or start it. The caller must close() it.

        Concurrent readers share one download, and each is served as soon as its bytes have
        arrived, not when the whole object is in.
        """
        d = self.store.downloads.get(node.ino)
        if d is None:
            tmp = self.store.tmp("get", node.ino)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            d = Download(node.ino, tmp, fd, node.size, self.limits.read_part_size)
            self.store.downloads[node.ino] = d
            d.users += 1  # the download task's own reference
            self.store.stats["misses"] += 1
            if self.store.nursery is not None:
                self.store.nursery.start_soon(self._download, d, node)
            else:
                d.inline = node  # no nursery (in-process use): the first waiter runs it
        d.users += 1
        return d

    def close(self, d: Download) -> None:
        d.users -= 1
        if d.users == 0:
            os.close(d.fd)

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
        self.store.stats["direct_reads"] += 1
        try:
            return await self.s3.get_bytes(self.store.key(ino), off, size, node.etag)
        except (Changed, NotFound):
            await self.on_changed(ino)
            raise

    async def _transfer(self, d: Download, node: Node, key: str) -> tuple[RangeResult, str | None]:
        """Bring the object's bytes into d.fd: one GET, or parallel ranged GETs for a large one."""
        part = self.limits.read_part_size
        # The version the kernel was told the size of (see the module's docstring).
        expected = node.etag or None
        if node.size <= part:
            # Small (most media): exactly one GET, no Range header, hashed as it streams.
            r = await self.s3.get_range(
                key,
                d.fd,
                0,
                None,
                lambda n: d.progress(0, n),
                if_match=expected,
                size=node.size if expected is not None else None,
            )
            d.plan(r.total, None)
            md5 = r.md5
        else:
            # A short first range: its bytes come back sooner than a whole part's (SeaweedFS: 10.3 ms
            # for 128 KiB, 14.0 ms for 8 MiB). When the index knows the object's size and ETag (it
            # does for every object a listing or a HEAD found), the other parts need not wait for the
            # first range's answer: they are asked for at once, all with If-Match, which saves a
            # round trip before the read-ahead starts (30 ms on a same-region cloud S3). Otherwise
            # the first range tells the size and ETag the other parts need.
            first = min(FIRST_RANGE, part)
            firsts: list[RangeResult] = []
            if expected is not None:
                d.plan(node.size, first)
                etag = expected
                parts_left = iter(range(d.nparts))  # part 0 is the first range
            else:
                firsts.append(
                    await self.s3.get_range(
                        key, d.fd, 0, first - 1, lambda n: d.progress(0, n), if_match=None
                    )
                )
                d.plan(firsts[0].total, first)
                etag = firsts[0].etag
                parts_left = iter(range(1, d.nparts))
            total = d.size
            # The rest in parallel ranged GETs, asked for in order, so that a sequential reader
            # finds the next part already on its way: that is the read-ahead. Each of
            # read_concurrency fetchers takes the next part from one shared iterator when it is
            # free. (One task per part, started in order, is not enough: trio runs a batch of new
            # tasks in reverse order half of the time, and then the first part came in last.)
            hasher = hashlib.md5()

            async def hash_along() -> None:
                # MD5 of the whole object, in order, as its bytes become contiguous from the start:
                # while the later parts still arrive, so that little is left to hash at the end.
                off = 0
                while off < total:
                    while d.available - off < min(HASH_STEP, total - off):
                        await d.changed.wait()
                    end = d.available
                    await trio.to_thread.run_sync(md5_update, hasher, d.fd, off, end, limiter=self.disk)
                    off = end

            async def fetch_parts() -> None:
                for i in parts_left:
                    got = await self.s3.get_range(
                        key,
                        d.fd,
                        d.ends[i - 1] if i else 0,
                        d.ends[i] - 1,
                        functools.partial(d.progress, i),
                        if_match=etag,
                        # Every answer says the object's size: one that is not the size planned
                        # for fails the download before its bytes reach a reader.
                        size=total,
                    )
                    if i == 0:
                        firsts.append(got)

            with first_error():
                async with trio.open_nursery() as parts:
                    parts.start_soon(hash_along)
                    for _ in range(max(1, min(self.limits.read_concurrency, d.nparts - len(firsts)))):
                        parts.start_soon(fetch_parts)
            r = firsts[0]
            md5 = hasher.hexdigest()
        return r, md5

    async def _download(self, d: Download, node: Node) -> None:
        store = self.store
        key = store.key(d.ino)
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
                    d.restart()
                    if not self.space.relieve_disk(need=d.size):
                        if len(store.downloads) <= 1 and not store.writers:
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
            # answer the kernel before the rename and the index commit below (0.7 ms per cold file
            # here). Twice: the readers woken by the last progress report (in this task's step) are
            # in the batch of runnable tasks that the first checkpoint puts this task in, and trio
            # runs a batch in either order (trio/_core/_run.py reverses it half of the time); the
            # second puts this task in the batch after theirs.
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            # No fsync: a copy that a crash leaves torn or empty is caught by its length or, on its
            # first read after the next mount, by the MD5 recorded below (Downloads.verify).
            # The awaits above let other requests run: re-read the row before trusting it.
            # The row must still name the version that came in: a refresh (Namespace.refresh) may
            # have moved it to a newer one meanwhile.
            cur = self.index.get(d.ino)
            same = cur is not None and cur.etag == node.etag
            if cur is not None and same and cur.state == State.REMOTE and d.ino not in store.writers:
                self.evictor.make_room(r.total)
                store.place(d.tmp, d.ino)
                committed = True
                states.cached(store, states.transaction(store), d.ino, r.total, r.etag, cur.mtime_ns, md5)
            # else: unlinked or rewritten meanwhile: its readers get these bytes, the cache nothing.
            d.finish(None)
        except trio.Cancelled as e:  # the mount is going down
            d.finish(e)
            raise
        except (Changed, NotFound) as e:
            # Replaced (or deleted) behind our back since the index learnt its ETag. The index and
            # the kernel learn the new version (or that there is none) before the readers get EIO,
            # so that a retry reads it whole (or finds no such file), without waiting for a listing.
            log.warning("download of %s failed: %s", key, e)
            try:
                await self.on_changed(d.ino)
            except (S3Error, OSError, sqlite3.Error) as err:
                # Then the listing or the next lookup past the TTL learns it.
                log.warning("could not look up the new version of %s: %s", key, err)
            finally:
                d.finish(e)
        except Exception as e:
            # Its readers get EIO; the mount stays up (this runs in the cache's nursery).
            d.finish(e)
            if isinstance(e, S3Error | OSError):
                log.warning("download of %s failed: %s", key, e)
            else:
                log.exception("download of %s failed", key)
        finally:
            del store.downloads[d.ino]
            if not committed:
                unlink_quiet(d.tmp)
            self.close(d)


def open_data_file(path: str) -> tuple[int, int]:
    """(fd, size) of a data file opened for reading, without ever blocking the event loop or
    following a link: a FIFO someone put in the cache directory would block a plain open until a
    writer came (O_NONBLOCK), and a symlink would lead out of it (O_NOFOLLOW: ELOOP). Anything but a
    regular file is an OSError, as a missing one is."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    return fd, st.st_size


async def _nothing(ino: int) -> None:
    return None


def md5_update(md5: hashlib._Hash, fd: int, start: int, end: int) -> None:
    while start < end:
        chunk = os.pread(fd, min(HASH_STEP, end - start), start)
        if not chunk:
            raise OSError(errno.EIO, f"file ends at {start}, expected {end} bytes")
        md5.update(chunk)
        start += len(chunk)
