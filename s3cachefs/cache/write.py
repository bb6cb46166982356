"""Writes: one staging file per inode, shared by all its write handles, uploaded at flush and fsync.

A write begins at the first open for writing (start): the file is copied into tmp/put-* unless the
open truncates, and the row becomes WRITING (states.writing). Every flush or fsync with new data
makes S3 hold exactly the staging file's bytes (upload): one PUT, or, for a sequential writer of a
large file, the multipart upload whose full parts went up while it was written (the pipeline). Once
S3 holds it, the staging file is renamed into data/ and the row becomes CACHED (states.cached). The
last release settles the write (finish): a write that did not reach S3 goes back to the version S3
holds (states.reverted).

Concurrent opens join one writer: the first open registers its start in Store.starting before its
first await, and later opens wait for it and then join the writer it registered.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable

import trio

from .. import holders
from ..index import IN_CACHE, Node, State
from ..s3 import MAX_PARTS, S3, MultipartUpload, ObjectInfo, S3Error, first_error, md5_fd
from . import states
from .download import Downloads, md5_update
from .evict import Evictor
from .policy import Policies
from .queue import Queue
from .space import Space
from .store import Pipeline, Store, Writer, fsync_dir, unlink_quiet

log = logging.getLogger(__name__)


class Writes:
    def __init__(
        self,
        store: Store,
        s3: S3,
        policies: Policies,
        space: Space,
        evictor: Evictor,
        downloads: Downloads,
        queue: Queue,
        disk: trio.CapacityLimiter,
    ):
        self.store = store
        self.index = store.index
        self.s3 = s3
        self.policies = policies
        self.space = space
        self.evictor = evictor
        self.downloads = downloads
        self.queue = queue
        self.disk = disk  # worker threads for local disk work (copies, hashes, fsync)

    # -- beginning a write --------------------------------------------------------------------------

    async def start(self, node: Node, truncate: bool) -> Writer:
        """Open (or join) the staging file of `node`. Without truncate it starts as a copy of the file."""
        store = self.store
        while True:
            # Another open of this inode is making its staging copy (the awaits below): wait for it
            # and join its writer, so that every descriptor shares one staging file. Two writers
            # of one inode would each upload their own copy, and the last close would win.
            starting = store.starting.get(node.ino)
            w = store.writers.get(node.ino)
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
        starting = store.starting[node.ino] = trio.Event()
        try:
            return await self._start_writer(node, truncate)
        finally:
            del store.starting[node.ino]
            starting.set()

    async def _start_writer(self, node: Node, truncate: bool) -> Writer:
        store = self.store
        path = store.tmp("put", node.ino)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if not truncate and node.state in (State.REMOTE, *IN_CACHE) and node.size > 0:
                src = await self.downloads.fetch(node.ino)
                # Checked against its MD5 as a read's first look is: the next close() would upload
                # a damaged copy built on here.
                src = await self.downloads.verify(node.ino, src)
                try:
                    await trio.to_thread.run_sync(_copy_fd, src, fd, limiter=self.disk)
                finally:
                    os.close(src)
                node = self.index.get(node.ino) or node
            prev = (
                (node.size, node.etag) if node.state in (State.REMOTE, State.CACHED) and node.etag else None
            )
            was_cached = node.state == State.CACHED
            was_queued = node.state == State.QUEUED
            # A row made by create() a moment ago carries the create time the kernel already holds.
            mtime_ns = node.mtime_ns if node.state == State.WRITING else time.time_ns()
            states.writing(store, node.ino)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        # A local-only file has no other copy to go back to: its close always commits it again.
        dirty = truncate or prev is None
        # The new version begins here, once the writer is registered: from now on reads go to the
        # staging file, and every handle that took the old version's fd (also one opened during the
        # copy above) drops it at its next read.
        store.content_replaced(node.ino)
        w = store.writers[node.ino] = Writer(
            node.ino,
            path,
            fd,
            prev,
            dirty=dirty,
            seq_end=os.fstat(fd).st_size,
            was_cached=was_cached,
            mtime_ns=mtime_ns,
            shared=store.pins[node.ino] > 0,
            was_queued=was_queued,
            queued_size=node.size if was_queued else 0,
        )
        return w

    def drop_new_row(self, ino: int) -> None:
        """Remove the row of a file created a moment ago whose write could not even begin."""
        if ino not in self.store.writers:
            self.space.index_write(lambda: self.index.remove(ino))

    # -- writing ------------------------------------------------------------------------------------

    def mark_dirty(self, w: Writer) -> None:
        w.generation += 1
        if not w.dirty:
            w.dirty = True
            if w.committed:
                # Written again after an upload: the cached copy no longer matches S3.
                states.writing(self.store, w.ino)

    def wrote(self, w: Writer, off: int, data: memoryview) -> None:
        """After every write() of `data` at `off`: hash a sequential writer's bytes as they come
        (an 8 MiB original's close() spent 20 ms hashing the file for its Content-MD5 while Synapse's
        reactor waited; spread over its writes it costs a fraction of a millisecond each), and keep
        its full parts flowing to S3 as they are written, so that close() of a large file waits only
        for its tail."""
        self.mark_dirty(w)
        if w.pipeline_off:
            return
        if off != w.seq_end:
            self.drop_pipeline(w)
            return
        if w.hashing:
            if w.md5 is None:
                klass = self.policies.klass(self.index.relpath(w.ino))
                w.hashing = not (klass.local_only or klass.async_upload)
                w.md5 = hashlib.md5() if w.hashing else None
            if w.md5 is not None:
                w.md5.update(data)
        w.seq_end += len(data)
        pl = w.pipeline
        opts = self.s3.opts
        nursery = self.store.nursery
        if pl is None:
            if nursery is None or w.seq_end < opts.multipart_threshold:
                return
            klass = self.policies.klass(self.index.relpath(w.ino))
            if klass.local_only or klass.async_upload:
                w.pipeline_off = True
                return
            pl = w.pipeline = Pipeline(
                MultipartUpload(self.s3, self.store.key(w.ino)), opts.multipart_chunksize
            )
            if w.md5 is not None:
                # The pipeline hashes on from here, in worker threads (_hash_along).
                pl.md5, pl.hashed = w.md5, w.seq_end
            w.md5, w.hashing = None, False
            nursery.start_soon(self._pump, w, pl)
        elif w.seq_end > pl.part_size * MAX_PARTS:  # S3's part limit: let close() choose bigger parts
            self.drop_pipeline(w)
            return
        pl.more.set()

    def write_failed(self, w: Writer, e: OSError) -> None:
        w.failed = e.errno or errno.EIO
        self.mark_dirty(w)
        self.drop_pipeline(w)

    def truncated(self, w: Writer) -> None:
        self.mark_dirty(w)
        self.drop_pipeline(w)

    # -- uploading ----------------------------------------------------------------------------------

    async def upload(self, w: Writer, defer_empty: bool = False) -> None:
        """Make S3 hold exactly the staging file's bytes; on return the write is durable.

        defer_empty: a close() (FLUSH) or a truncate(path) may leave an empty file to a later close
        of another descriptor; an fsync() always settles the file."""
        async with w.lock:
            while not await self._upload(w, defer_empty):
                pass  # renamed while it waited for the old name's key: again, under the new name

    async def _upload(self, w: Writer, defer_empty: bool) -> bool:
        """upload() with the writer's lock held. False: the file was renamed while this waited for
        its key, nothing was done."""
        store = self.store
        if w.failed is not None:
            raise OSError(w.failed, "an earlier write to this file failed; nothing was uploaded")
        if not w.dirty or w.unlinked:
            return True
        generation = w.generation
        # The index must be able to record the result before S3 is changed (a full cache disk
        # fails here, with nothing done), so that S3 and the index cannot disagree.
        self.space.index_writable()
        rel = self.index.relpath(w.ino)
        klass = self.policies.klass(rel)
        if klass.local_only:
            await self._commit_local(w, generation)
            return True
        size = os.fstat(w.fd).st_size
        if size == 0 and defer_empty and (w.handles > 1 or await self._held_elsewhere(w, rel)):
            # Empty, and another descriptor is open for writing: its close settles the file (with
            # its data, or as an empty object). A file still empty at its last close is a real
            # 0-byte object, put below like any other, so that an error reaches that close().
            # Another descriptor is either another open (another handle) or a dup()ed or
            # inherited copy of this one, which FUSE cannot see (holders.py): a shell's
            # `cmd > file` closes its first descriptor before the data comes.
            return True
        if klass.async_upload and self.queue.admits(size):
            await self._commit_queued(w, generation)
            return True
        # One S3 change of this key at a time (queue.KeyLocks): a queued DELETE of an older file
        # at this name runs before this PUT or not at all.
        async with self.queue.keys.hold(rel):
            if self.index.get(w.ino) is not None and self.index.relpath(w.ino) != rel:
                return False  # renamed while this waited (Namespace._rename_written)
            mark = self.index.last_delete_id()
            # Uploads read the file in worker threads; the size at this moment is what gets committed.
            info = await self._finish_pipeline(w)
            if info is None:
                # A copy: writes through another descriptor may go on while the PUT runs.
                head = (w.md5.copy(), w.seq_end) if w.md5 is not None else None
                info = await self.s3.put_file(store.prefix + rel, w.path, head)
            if w.unlinked:
                # Unlinked while the upload ran: its row is gone, and the DELETE the unlink
                # queued runs after this PUT (the key's lock), so nothing is left in S3.
                return True
            assert self.index.get(w.ino) is not None, "a written file's row is only removed by unlink"
            self.evictor.make_room(info.size)
            w.path = store.place(w.path, w.ino)
            w.staging_is_data, w.was_queued = True, False
            states.cached(
                store, self.space.index_write, w.ino, info.size, info.etag, w.mtime_ns, info.md5, mark
            )
        w.prev = (info.size, info.etag)
        self._committed(w, generation)
        store.stats["uploads"] += 1
        store.stats["uploaded_bytes"] += info.size
        return True

    async def _held_elsewhere(self, w: Writer, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return await trio.to_thread.run_sync(
            holders.open_for_writing_elsewhere, name, w.ino, limiter=self.disk
        )

    async def _commit_queued(self, w: Writer, generation: int) -> None:
        """close() of an upload = "async" file: durable on the cache disk, its upload queued.

        A copy, fsynced, renamed into data/, and its directory fsynced, all in one worker thread (a
        thread hop costs 0.3-3 ms on a 2-vCPU VM, and Synapse's reactor waits for this close); then
        the row and the queue entry in one durable commit (synchronous=FULL). A copy rather than the
        staging file itself, so that writes after this close (through other handles) cannot change
        the queued bytes."""
        store = self.store
        place = functools.partial(store.place, ino=w.ino)
        # data/<ino> may hold a version an earlier close() acknowledged, its upload still queued:
        # the row names that version (its MD5) until the commit below. It is kept (a hard link in
        # keep/) until then, so that a crash or a failed commit in between goes back to it rather
        # than to this copy under the older version's MD5, which the uploader would refuse as
        # damaged, losing both (Cache.recover puts a kept version back after a crash).
        keep = store.keep_path(w.ino) if self.index.queued_upload(w.ino) is not None else None
        md5, size, path = await trio.to_thread.run_sync(
            _copy_place_durably,
            w.fd,
            store.tmp("queue", w.ino),
            place,
            store.data_path(w.ino),
            keep,
            limiter=self.disk,
        )
        if w.unlinked:
            # Unlinked (or dropped) while the copy ran: its row is gone and whatever it had in data/
            # was removed before the rename put this copy there. Inode numbers are not reused within
            # a mount, so the path is still this copy's.
            unlink_quiet(path)
            if keep is not None:
                unlink_quiet(keep)
            return
        self.evictor.make_room(size)
        try:
            states.queued(store, self.space.durable_write, w.ino, size, w.mtime_ns, md5)
        except BaseException:
            if keep is not None:
                store.restore_kept(w.ino)
            raise
        if keep is not None:
            unlink_quiet(keep)
        w.was_queued, w.queued_size, w.staging_is_data = True, size, False
        self._committed(w, generation)
        store.stats["queued_uploads"] += 1
        self.queue.wake()

    def _committed(self, w: Writer, generation: int) -> None:
        """The bytes of `generation` are committed. If the file was written meanwhile, what was
        committed is an older state: it stays dirty (and WRITING), so the next close() uploads."""
        w.committed = True
        if w.generation == generation:
            w.dirty = False
            return
        w.dirty = True
        states.writing(self.store, w.ino)

    async def _commit_local(self, w: Writer, generation: int) -> None:
        """close() of a local-only file: durable on the cache disk (fsync), never sent to S3."""
        md5 = await trio.to_thread.run_sync(_fsync_and_hash, w.fd, limiter=self.disk)
        if w.unlinked:
            return
        size = os.fstat(w.fd).st_size
        self.evictor.make_room(size)
        w.path = self.store.place(w.path, w.ino)
        w.staging_is_data, w.was_queued = True, False
        states.local(self.store, self.space.index_write, w.ino, size, w.mtime_ns, md5)
        self._committed(w, generation)

    # -- pipelined multipart uploads ------------------------------------------------------------------

    def drop_pipeline(self, w: Writer) -> None:
        w.pipeline_off = True
        w.md5, w.hashing = None, False
        pl, w.pipeline = w.pipeline, None
        if pl is not None:
            pl.stop = True
            pl.more.set()
            if self.store.nursery is not None:
                self.store.nursery.start_soon(self._discard, pl)

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
                    _md5_update_path, pl.md5, w.path, pl.hashed, end, limiter=self.disk
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
        # The tail and the completion of a pipelined close() share one deadline, for the whole file.
        pl.mpu.until = self.s3.deadline(size).at
        if pl.error is not None or size < pl.scheduled_end or size < self.s3.opts.multipart_threshold:
            await pl.mpu.abort()
            return None

        async def hash_tail() -> None:
            await trio.to_thread.run_sync(
                _md5_update_path, pl.md5, w.path, pl.hashed, size, limiter=self.disk
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
        self.store.stats["pipelined_uploads"] += 1
        return ObjectInfo(pl.mpu.key, size, etag, 0, pl.md5.hexdigest())

    # -- the last release ---------------------------------------------------------------------------

    async def finish(self, w: Writer) -> bool:
        """Last write handle closed. Returns True if the row was removed (the write never reached S3).

        An open for writing that arrives while this awaits waits for it (start), then starts a
        writer of its own on what the index says by then."""
        w.closing = trio.Event()
        try:
            self.drop_pipeline(w)
            if (
                w.failed is None
                and w.dirty
                and not w.unlinked
                and (w.settle_at_release or os.fstat(w.fd).st_size == 0)
            ):
                # Changed, and no close() settled it: emptied (the last close's flush saw another
                # write handle, released since), or renamed or truncated by path after the last
                # close began (settle_at_release). The last release does it, with errors only
                # logged: nobody is left to tell.
                try:
                    await self.upload(w)
                except (S3Error, OSError, sqlite3.Error) as e:
                    log.warning("could not store %s at its last release: %s", self.store.key(w.ino), e)
        finally:
            try:
                removed = self._retire(w)
            finally:
                w.closing.set()
        return removed

    @staticmethod
    def kernel_copy_current(w: Writer) -> bool:
        """After finish: whether every page of the file the kernel may hold is the committed
        version. Writes pass through the kernel's page cache (and a write-open drops what it held
        before), so that holds unless the upload failed or other handles could read meanwhile."""
        return w.committed and not w.dirty and not w.unlinked and not w.shared and w.failed is None

    def _retire(self, w: Writer) -> bool:
        # Files before the index: removing the staging file frees the space that the index update
        # below needs when the cache disk is full. If that update fails anyway, the row stays
        # WRITING and states.orphaned() puts it right later.
        store = self.store
        reverting = not w.unlinked and (w.dirty or not w.committed)
        del store.writers[w.ino]
        os.close(w.fd)
        if not w.staging_is_data:
            unlink_quiet(w.path)  # never moved into data/ (not committed, or copied by an async commit)
        elif reverting:
            store.unlink_data(w.ino)  # committed once, then changed: not what S3 holds
        if not reverting:
            return False
        if w.was_queued and _has_size(store.data_path(w.ino), w.queued_size):
            # The queued version is still in data/, acknowledged by a close: back to it.
            states.requeued(store, self.space.index_write, w.ino, w.queued_size)
            return False
        # The upload failed (close() returned an error), or nothing was written: S3 still holds the
        # previous version (or nothing), so the index goes back to saying exactly that. Never
        # uploaded: the cached copy the write started from is still the object in S3.
        intact = (
            w.prev is not None
            and w.was_cached
            and not w.committed
            and _has_size(store.data_path(w.ino), w.prev[0])
        )
        return states.reverted(store, self.space.index_write, w.ino, w.prev, intact)


def _md5_update_path(md5: hashlib._Hash, path: str, start: int, end: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        md5_update(md5, fd, start, end)
    finally:
        os.close(fd)


def _copy_durably(src: int, dst: str) -> str:
    """Copy the file behind fd `src` to a new file `dst`, fsync it, and return the copy's MD5."""
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _copy_fd(src, fd)
        return _fsync_and_hash(fd)
    finally:
        os.close(fd)


def _copy_place_durably(
    src: int, tmp: str, place: Callable[[str], str], data: str, keep: str | None
) -> tuple[str, int, str]:
    """Worker thread: copy the file behind fd `src` to `tmp` and fsync it, move it into data/ with
    `place` (a rename: it touches no shared state), and fsync that directory. Returns (MD5, size,
    path in data/).

    keep: where to hard-link `data`, the file `place` is about to replace, durably, before it does
    (its directory fsynced: the link must outlive the rename after a crash)."""
    try:
        md5 = _copy_durably(src, tmp)
        size = os.stat(tmp).st_size
        if keep is not None:
            unlink_quiet(keep)  # left by a failed attempt
            # No older version in data/ (lost, or wiped): nothing to keep.
            with contextlib.suppress(FileNotFoundError):
                os.link(data, keep)
            fsync_dir(os.path.dirname(keep))
        path = place(tmp)
    finally:
        unlink_quiet(tmp)  # gone already once placed
    fsync_dir(os.path.dirname(path))
    return md5, size, path


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
