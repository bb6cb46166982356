"""pyfuse3 Operations: thin handlers over Namespace and Cache. The only module that raises FUSEError.

Every handler goes through `_boundary`, the one table that turns our errors into errnos:
  OSError(errno)          -> that errno (ENOENT, ENOTEMPTY, EEXIST, ... from namespace.py/cache.py)
  s3.NotFound             -> ENOENT
  s3.AccessDenied         -> EACCES
  s3.Unavailable, s3.IntegrityError, other s3.S3Error -> EIO
An unexpected exception is logged with its traceback and answered with EIO rather than allowed to end
pyfuse3's main loop: a production homeserver keeps its media store over one bad request.

Synapse calls lookup/getattr/open/close/unlink/rmdir on its single reactor thread, so those handlers
avoid S3 round trips whenever the index can answer (see namespace.py).
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import cachetools
import pyfuse3
import trio

from .cache import Cache, Download, Writer
from .index import Index, Node, State
from .metrics import Metrics
from .namespace import Freshness, Namespace
from .s3 import AccessDenied, CircuitOpen, NotFound, S3Error

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Media files are written once and changed only through this mount, which the kernel sees; long
# kernel caching of names and attributes is therefore safe and saves a FUSE round trip per stat.
# The rare change behind our back (found by the background listing) invalidates the kernel's copy.
# With a metadata TTL (--metadata-ttl) the kernel keeps them no longer than the TTL: a name it
# trusts is one it never asks us about, so we could not check it against S3.
ENTRY_TIMEOUT = 300.0
ATTR_TIMEOUT = 300.0
# Misses are cached briefly: Synapse asks for legacy thumbnail names and missing files repeatedly,
# and a name created through this mount replaces the negative entry at once.
NEGATIVE_TIMEOUT = 1.0
# statfs counts the index's files and bytes again, in a worker thread, at most this often (s).
TOTALS_EVERY = 30.0


def errno_for(e: BaseException) -> int:
    if isinstance(e, OSError) and e.errno:
        return e.errno
    if isinstance(e, sqlite3.Error):
        # The index lives on the cache filesystem: a full disk is ENOSPC to the caller too.
        return errno.ENOSPC if "full" in str(e) else errno.EIO
    if isinstance(e, NotFound):
        return errno.ENOENT
    if isinstance(e, AccessDenied):
        return errno.EACCES
    return errno.EIO


Handler = Callable[Concatenate["Operations", P], Coroutine[Any, Any, R]]


def _boundary(fn: Handler[P, R]) -> Handler[P, R]:
    """Errors -> errno (see the module's docstring); and every request's time and errno counted in
    the metrics, here where Synapse's waits begin and end."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(ops: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        code: int | None = None
        try:
            return await fn(ops, *args, **kwargs)
        except pyfuse3.FUSEError as e:
            code = e.errno
            raise
        except (OSError, S3Error, sqlite3.Error) as e:
            code = errno_for(e)
            # An open circuit fails every call at once while S3 is unreachable: the breaker logs
            # when it opens and closes, not each refused call.
            quiet = code in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY) or isinstance(e, CircuitOpen)
            level = logging.DEBUG if quiet else logging.WARNING
            log.log(level, "%s: %s", op, e)
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            code = errno.EIO
            log.exception("unexpected error in %s", op)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            ops.metrics.fuse_request(op, time.perf_counter() - started, code)

    return wrapper


@dataclass(eq=False)
class _Handle:
    ino: int
    fd: int | None = None  # read fd on a complete local copy, opened lazily at the first read
    checked: bool = False  # the copy behind fd was verified (Cache.verify) by this handle or earlier
    download: Download | None = None  # a cold file being streamed in (Cache.open_download)
    writer: Writer | None = None
    size: int = 0  # the file's size when opened: fstat() of it once unlinked with no local copy
    direct: bool = False  # the cache disk had no room for it: every read is a ranged GET
    version: int = 0  # Cache.content_version when fd or download was taken


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        index: Index,
        ns: Namespace,
        cache: Cache,
        uid: int,
        gid: int,
        limiter: trio.CapacityLimiter,
        metrics: Metrics | None = None,
    ):
        super().__init__()
        self.metrics = metrics if metrics is not None else Metrics()
        self.index = index
        self.ns = ns
        self.cache = cache
        self.uid = uid
        self.gid = gid
        self.limiter = limiter
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        # (files, bytes) for statfs, counted in the background (_refresh_totals).
        self._totals: tuple[int, int] = (0, 0)
        self._totals_at = -math.inf
        self._totals_refreshing = False
        ns.on_changed = self._invalidate_soon
        ttl = ns.metadata_ttl
        self.entry_timeout = ENTRY_TIMEOUT if ttl is None else min(ENTRY_TIMEOUT, ttl)
        self.attr_timeout = ATTR_TIMEOUT if ttl is None else min(ATTR_TIMEOUT, ttl)
        self.negative_timeout = NEGATIVE_TIMEOUT if ttl is None else min(NEGATIVE_TIMEOUT, ttl)
        # The content version (Cache.content_version) of each inode's last read-only open: the
        # kernel's pages are of that version, and an open at another drops them (keep_cache off).
        # Bounded; an inode that falls out keeps its pages at its next open, as before this existed.
        self._kernel_version: cachetools.LRUCache[int, int] = cachetools.LRUCache(maxsize=100_000)

    def _invalidate_soon(self, ino: int, gone: Node | None) -> None:
        """An object changed or vanished behind our back: drop the kernel's cached name/attrs/pages."""
        self.cache.start_soon(
            functools.partial(trio.to_thread.run_sync, _invalidate, ino, gone, limiter=self.limiter)
        )

    # -- attributes ---------------------------------------------------------------------------------

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = self.attr_timeout
        mtime = node.mtime_ns
        if node.is_dir:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        else:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            w = self.cache.writer(node.ino)
            a.st_size = os.fstat(w.fd).st_size if w is not None else node.size
            if w is not None and w.dirty:  # an open for writing that writes nothing changes nothing
                mtime = w.mtime_ns
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_blksize = 128 * 1024
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        return a

    def _node(self, ino: int) -> Node:
        node = self.index.get(ino)
        if node is None:
            raise OSError(errno.ENOENT, f"inode {ino}")
        return node

    def _orphan_attr(self, ino: int) -> pyfuse3.EntryAttributes | None:
        """fstat() of a file that was unlinked while still open answers from its open handle."""
        for h in self._handles.values():
            if h.ino == ino:
                fd = h.writer.fd if h.writer else h.fd
                size = os.fstat(fd).st_size if fd is not None else h.size
                return self._attr(Node(ino, 0, b"", State.CACHED, size, None, time.time_ns(), 0, False))
        return None

    @_boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = await self.ns.lookup(parent_inode, name)
        if node is None:
            # Inode 0: a negative entry the kernel may keep for entry_timeout (libfuse's convention).
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.negative_timeout
            return negative
        return self._attr(node)

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.index.get(inode)
        if node is None:
            orphan = self._orphan_attr(inode)
            if orphan is not None:
                return orphan
            raise OSError(errno.ENOENT, f"inode {inode}")
        return self._attr(node)

    @_boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size:
            if node.is_dir:
                raise OSError(errno.EISDIR, "truncate")
            w = self.cache.writer(inode)
            if w is not None:
                try:
                    os.ftruncate(w.fd, attr.st_size)
                except OSError as e:
                    self.cache.write_failed(w, e)
                    raise
                self.cache.truncated(w)
                if fh is None:
                    w.settle_at_release = True
            else:
                # truncate(path) with no open file: that is a complete write of its own, so it is
                # uploaded before we answer, like a close().
                w = await self.cache.start_write(node, truncate=attr.st_size == 0)
                w.handles += 1
                try:
                    os.ftruncate(w.fd, attr.st_size)
                    self.cache.truncated(w)
                    await self.cache.upload(w, defer_empty=True)
                finally:
                    w.handles -= 1
                    if w.handles == 0:
                        await self._end_write(w, node)
        if fields.update_mtime:
            self.index.set_mtime(inode, attr.st_mtime_ns)
            w = self.cache.writer(inode)
            if w is not None:  # or the upload would record the time its write began
                w.mtime_ns = attr.st_mtime_ns
        # Mode and owner are mount-wide (--uid/--gid); chmod/chown succeed without being stored, as
        # on other S3 mounts, so that cp -p and rsync -a do not fail on them.
        return self._attr(self._node(inode))

    def _refresh_totals(self) -> None:
        """Count the files and bytes for statfs in a worker thread, at most every TOTALS_EVERY s: a
        scan of the whole index (hundreds of ms at a million objects) must not stall the loop."""
        now = time.monotonic()
        if self._totals_refreshing or now - self._totals_at < TOTALS_EVERY:
            return
        self._totals_refreshing = True

        async def refresh() -> None:
            try:
                self._totals = await self.cache.count_files()
                self._totals_at = time.monotonic()
            except sqlite3.Error as e:
                log.debug("statfs: counting the index failed: %s", e)
            finally:
                self._totals_refreshing = False

        self.cache.start_soon(refresh)

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # Figures as of the last count (nominal anyway: S3 has no capacity); never a scan here.
        self._refresh_totals()
        count, used = self._totals
        bsize = 4096
        # S3 has no capacity limit; report a large size so that df and free-space checks stay calm.
        total = max(2**50, 2 * used)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = bsize
        s.f_blocks = total // bsize
        s.f_bfree = s.f_bavail = (total - used) // bsize
        s.f_files = max(2**32, 2 * count)
        s.f_ffree = s.f_favail = s.f_files - count
        s.f_namemax = 255
        return s

    # -- directories --------------------------------------------------------------------------------

    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.ns.dir_node(inode)
        await self.ns.ensure_listed(inode)
        return inode

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Entries come in inode order and start_id is the last inode returned, so a directory that
        # changes between calls neither repeats nor skips the entries that stay.
        after = start_id
        while True:
            batch = self.index.children(fh, after_ino=after, limit=256)
            if not batch:
                return
            for node in batch:
                if not pyfuse3.readdir_reply(token, node.name, self._attr(node), node.ino):
                    return
                after = node.ino

    @_boundary
    async def releasedir(self, fh: int) -> None:
        return None

    @_boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attr(await self.ns.mkdir(parent_inode, name))

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.ns.rmdir(parent_inode, name)

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.ns.unlink(parent_inode, name)

    @_boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        await self.ns.rename(
            parent_inode_old,
            name_old,
            parent_inode_new,
            name_new,
            noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
        )

    # -- files --------------------------------------------------------------------------------------

    def _new_handle(self, h: _Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = h
        self.cache.opened(h.ino)
        return fh

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, f"file handle {fh}")
        return h

    @_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise OSError(errno.EISDIR, "open")
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if not writing and self.ns.stale(inode):
            node = await self._revalidate(node)
        h = _Handle(inode, size=node.size, version=self.cache.content_version(inode))
        if writing:
            h.writer = await self.cache.start_write(node, truncate=bool(flags & os.O_TRUNC))
            h.writer.handles += 1
        else:
            # No download here: Synapse opens remote media and closes it unread when a client's
            # cached copy is still valid (HTTP 304); the first read() fetches.
            h.fd = self.cache.open_cached(node)
            w = self.cache.writer(inode)
            if w is not None:
                w.shared = True
        fh = self._new_handle(h)
        # Keep the kernel's page cache across read-only opens: every change to a file goes through
        # this mount (and so through the kernel), and a write-open below drops it. An object
        # replaced behind our back since the last open (Namespace.refresh, the listing) is the
        # exception: its old pages would be served, even at the same size and mtime.
        # (A write-open drops them too, and its writes then fill the page cache with its version.)
        version = self.cache.content_version(inode)
        keep = not writing and self._kernel_version.get(inode, version) == version
        if not writing and not keep:
            # The kernel may still hold the size of the old version (the invalidation that
            # on_changed started runs in the background): it must forget it before this open is
            # answered, or it reads the new object at the old size (as in _revalidate).
            await trio.to_thread.run_sync(_invalidate, inode, None, limiter=self.limiter)
        self._kernel_version[inode] = version
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    async def _revalidate(self, node: Node) -> Node:
        """Open past the metadata TTL: is the object still the version the index (and the kernel)
        knows? A replaced one is opened at its new version, a deleted one is ENOENT."""
        try:
            fresh = await self.ns.refresh(node.ino)
        except S3Error as e:
            # As in lookup: a cached copy is still worth serving while S3 does not answer.
            log.debug("open of inode %d: not revalidated (%s)", node.ino, e)
            return node
        if fresh == Freshness.GONE:
            raise OSError(errno.ENOENT, f"inode {node.ino} was deleted behind our back")
        if fresh == Freshness.CHANGED:
            # The kernel still holds the old size, and would cut reads of the new version to it:
            # it must forget it before this open is answered, not in the background. (Waited for
            # in a thread: the kernel may need an answer from this loop to get there.)
            await trio.to_thread.run_sync(_invalidate, node.ino, None, limiter=self.limiter)
        return self._node(node.ino)

    @_boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = await self.ns.lookup(parent_inode, name)
        if node is not None:
            if flags & os.O_EXCL:
                raise OSError(errno.EEXIST, "create")
            if node.is_dir:
                raise OSError(errno.EISDIR, "create")
            writer = await self.cache.start_write(node, truncate=True)
        else:
            node = self.ns.create(parent_inode, name)
            try:
                writer = await self.cache.start_write(node, truncate=True)
            except BaseException:
                # No staging file (e.g. a full cache disk): the new name must not stay behind.
                self.cache.drop_new_row(node.ino)
                raise
        h = _Handle(node.ino)
        h.writer = writer
        h.writer.handles += 1
        fh = self._new_handle(h)
        self._kernel_version[node.ino] = self.cache.content_version(node.ino)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self._attr(node)

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        w = self.cache.writer(h.ino)
        if w is not None:
            return os.pread(w.fd, size, off)
        version = self.cache.content_version(h.ino)
        if h.version != version and h.writer is None:
            node = self.index.get(h.ino)
            if (
                node is not None
                and node.size != h.size
                and self.cache.replaced_outside_since(h.ino, h.version)
            ):
                # Replaced behind our back by an object of another size since this handle was opened
                # (a GET's 412 showed it, or the listing): the kernel reads it at the size it was
                # told then, and padded a shorter object with zeros, or would cut a longer one. This
                # handle fails; an open from now on reads the new object at its size. (An overwrite
                # through the mount went through the kernel, which knows its size.)
                raise OSError(errno.EIO, f"inode {h.ino} was replaced by an object of another size")
            # Replaced since this handle took its copy: from now on it reads the current bytes.
            self._drop_copy(h)
            h.version = version
        if h.direct:
            return await self.cache.read_direct(h.ino, off, size)
        if h.download is not None:
            return await self._read_download(h, off, size)
        if h.fd is None:
            node = self.index.get(h.ino)
            if node is None:
                # Unlinked while open, before any of its bytes came in: they are gone from S3 too.
                raise OSError(errno.EIO, f"inode {h.ino} was deleted before its data was read")
            fd = self.cache.open_cached(node)
            if fd is None:
                # Cold: stream it. This read returns as soon as its own bytes have arrived.
                h.download = self.cache.open_download(node)
                return await self._read_download(h, off, size)
            h.fd = fd
        if not h.checked:
            fd, h.fd = h.fd, None  # verify() owns it now, and may swap it for a fresh download
            h.fd = await self.cache.verify(h.ino, fd)
            h.checked = True
        # Local disk (usually the page cache): cheaper inline than a thread hop per 128 KiB read.
        return os.pread(h.fd, size, off)

    def _drop_copy(self, h: _Handle) -> None:
        if h.fd is not None:
            os.close(h.fd)
            h.fd, h.checked = None, False
        if h.download is not None:
            self.cache.close_download(h.download)
            h.download = None

    async def _read_download(self, h: _Handle, off: int, size: int) -> bytes:
        d = h.download
        assert d is not None
        try:
            return await d.read(off, size)
        except OSError:
            if not self.cache.found_disk_full(d):
                raise
        # No room on the cache disk for this file, even after eviction: read it from S3 instead.
        # (The kernel sends reads of one handle in parallel: the first to get here switches.)
        if h.download is d:
            self.cache.close_download(d)
            h.download, h.direct = None, True
        return await self.cache.read_direct(h.ino, off, size)

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        if h.writer is None:
            raise OSError(errno.EBADF, "file not open for writing")
        try:
            n = os.pwrite(h.writer.fd, buf, off)
        except OSError as e:
            if e.errno != errno.ENOSPC or not self.cache.relieve_disk():
                # This file can no longer be what the writer wrote: its close() must fail rather
                # than upload what did fit.
                self.cache.write_failed(h.writer, e)
                raise
            try:  # the cache made room on a full disk: once more
                n = os.pwrite(h.writer.fd, buf, off)
            except OSError as e2:
                self.cache.write_failed(h.writer, e2)
                raise
        self.cache.wrote(h.writer, off, memoryview(buf)[:n])
        return n

    @_boundary
    async def flush(self, fh: int) -> None:
        # close(): the only place the writer can still be told that its data did not make it.
        h = self._handle(fh)
        if h.writer is not None:
            await self.cache.upload(h.writer, defer_empty=True)

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        if h.writer is not None:
            await self.cache.upload(h.writer)

    @_boundary
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        self.cache.released(h.ino)
        self._drop_copy(h)
        if h.writer is not None:
            h.writer.handles -= 1
            if h.writer.handles == 0:
                await self._end_write(h.writer, self.index.get(h.ino))

    async def _end_write(self, w: Writer, node: Node | None) -> None:
        removed = keep = False
        try:
            removed = await self.cache.finish_write(w)
            # The usual case (Synapse writes a new file, then reads it back): the kernel's pages are
            # the bytes S3 now holds, so the read-back comes from the page cache.
            keep = not removed and self.cache.kernel_copy_current(w)
        finally:
            if not keep:
                # The kernel may hold pages of another version (read through handles open during the
                # write) or, after a failed upload, the bytes and size of a write S3 does not have;
                # also when settling the write failed half way.
                await trio.to_thread.run_sync(
                    _invalidate, w.ino, node if removed else None, limiter=self.limiter
                )

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inode numbers are row ids in the persistent index and stay valid; nothing to free.
        return None


def _invalidate(ino: int, removed: Node | None) -> None:
    try:
        if removed is not None and removed.parent:
            pyfuse3.invalidate_entry(removed.parent, removed.name)
        pyfuse3.invalidate_inode(ino)
    except OSError as e:
        # ENOENT: the kernel had already forgotten it, which is all we wanted.
        if e.errno != errno.ENOENT:
            log.debug("invalidating inode %d: %s", ino, e)
