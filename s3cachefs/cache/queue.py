"""The upload and DELETE queues, and the background uploader that empties them.

Why: Synapse closes and unlinks media files on its single reactor thread, so every S3 round trip
there stalls the whole homeserver. A file whose policy says upload = "async" (thumbnails, by
default: Synapse makes them again from their original when missing) is committed at close() once
its bytes are durable on the cache disk (states.queued), and sent from here. Every unlink and rmdir
queues its DELETE the same way (Namespace.unlink): the name is gone from the index at once, durably,
and stays gone (a listing or lookup never brings back a key with a queued DELETE) until it is done.

Order: every S3 change of one key (a PUT at close, a queued PUT, a DELETE, a copy onto it) runs
under that key's lock (KeyLocks), one at a time, in the order they asked for it. A PUT that succeeds
removes the DELETEs of its key queued before it began (states.cached/sent): a DELETE queued before
a newer file's upload never runs after it; one queued during the upload (an unlink of the new file)
stays, and runs after it. The bucket so ends with what the namespace says.

Both queues live in the index (upload_queue, delete_queue) and are resumed at every mount. A queued
upload is retried with backoff until it is sent, or until its file is unlinked or rewritten; a
queued DELETE until it is done. Bounded: past Limits.upload_queue_max queued bytes, async paths
upload at close() like the others (Writes.upload).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

import cachetools
import trio

from ..index import State
from ..s3 import S3, CircuitOpen, S3Error, md5_fd
from . import states
from .download import open_data_file
from .space import Space
from .store import Store

log = logging.getLogger(__name__)

# How many queue entries one look at the index takes; retries back off from RETRY_FIRST to RETRY_MAX.
PICK = 64
RETRY_FIRST = 1.0
RETRY_MAX = 300.0

Item = tuple[str, int]  # ("upload", ino) or ("delete", delete id)


class KeyLocks:
    """One FIFO lock per key in use, made on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, relpath: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(relpath, (trio.Lock(), 0))
        self._locks[relpath] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[relpath]
            if users == 1:
                del self._locks[relpath]
            else:
                self._locks[relpath] = (lock, users - 1)


class Queue:
    def __init__(
        self,
        store: Store,
        s3: S3,
        space: Space,
        keys: KeyLocks,
        limit: int,
        concurrency: int,
        disk: trio.CapacityLimiter,
    ):
        self.store = store
        self.index = store.index
        self.s3 = s3
        self.space = space
        self.keys = keys
        self.limit = limit
        self.concurrency = max(1, concurrency)
        self.disk = disk
        self._wanted = trio.Event()
        self._claimed: set[Item] = set()
        # (attempts, monotonic time of the next try) of items that failed; bounded: an item that
        # falls out is simply tried again sooner.
        self._retry: cachetools.LRUCache[Item, tuple[int, float]] = cachetools.LRUCache(maxsize=100_000)
        self.running = False

    def admits(self, size: int) -> bool:
        """Whether an async file of `size` bytes may be queued now (else it uploads at close())."""
        return self.running and self.store.queued_bytes + size <= self.limit

    def wake(self) -> None:
        self._wanted.set()

    # -- the background uploader --------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background task (started with nursery.start): concurrency workers that send queued
        uploads and DELETEs, oldest first; returns when cancelled."""
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.concurrency):
                    nursery.start_soon(self._worker)
                nursery.start_soon(self._ticker)
                task_status.started()
        finally:
            self.running = False

    async def _ticker(self) -> None:
        # Items that wait for their retry time are looked at again once a second.
        while True:
            await trio.sleep(1.0)
            self.wake()

    async def _worker(self) -> None:
        while True:
            item = self._next()
            if item is None:
                wanted = self._wanted
                await wanted.wait()
                if self._wanted is wanted:
                    self._wanted = trio.Event()
                continue
            self._claimed.add(item)
            try:
                if item[0] == "upload":
                    await self.send(item[1])
                else:
                    await self._delete(item[1])
                self._retry.pop(item, None)
            except (S3Error, OSError) as e:
                attempts = self._retry.get(item, (0, 0.0))[0] + 1
                delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (attempts - 1))
                self._retry[item] = (attempts, trio.current_time() + delay)
                # While the circuit is open every attempt fails at once: the breaker logs that.
                level = logging.DEBUG if isinstance(e, CircuitOpen) else logging.WARNING
                log.log(
                    level, "queued %s %d failed (attempt %d, next in %.0fs): %s", *item, attempts, delay, e
                )
            finally:
                self._claimed.discard(item)

    def _next(self) -> Item | None:
        now = trio.current_time()
        deletes = self.index.delete_queue(PICK)
        candidates: list[Item] = [("delete", d) for d, _ in deletes]
        candidates += [("upload", ino) for ino in self.index.upload_queue(PICK)]
        earlier: list[str] = []  # relpaths of the DELETEs before this one
        for item in candidates:
            rel = deletes[len(earlier)][1] if item[0] == "delete" else ""
            if item[0] == "delete":
                # A directory's marker goes after the keys below it: an empty directory that
                # SeaweedFS keeps is removed by its marker's DELETE only once it is empty.
                blocked = rel.endswith("/") and any(p.startswith(rel) for p in earlier)
                earlier.append(rel)
                if blocked:
                    continue
            if item in self._claimed:
                continue
            if item[0] == "upload":
                node = self.index.get(item[1])
                if node is not None and node.state != State.QUEUED:
                    # Being written again: send() would skip it without awaiting, and a worker that
                    # took it again at once would spin and starve the event loop (every request of
                    # the mount). Its close queues it again or puts it back (states.requeued).
                    continue
            retry = self._retry.get(item)
            if retry is not None and retry[1] > now:
                continue
            return item
        return None

    async def drain(self) -> int:
        """Retry everything now and return once both queues are empty (the caller bounds the time).
        Returns how many entries were left when it began."""
        self._retry.clear()
        q = self.index.queue_summary(self.store.clock())
        left = int(q["queued_uploads"] + q["queued_deletes"])
        while self.index.upload_queue(1) or self.index.delete_queue(1):
            self.wake()
            await trio.sleep(0.1)
        return left

    # -- one entry ----------------------------------------------------------------------------------

    async def send(self, ino: int) -> None:
        """Upload the queued version of `ino` (data/<ino>) to its key, now."""
        node = self.index.get(ino)
        if node is None:
            self.space.index_write(lambda: self.index.unqueue_upload(ino))  # unlinked: nothing to send
            return
        if node.state != State.QUEUED:
            return  # being written: the write's own close decides (states.writing, requeued)
        rel = self.index.relpath(ino)
        async with self.keys.hold(rel):
            node = self.index.get(ino)  # the wait let other requests run
            if node is None or node.state != State.QUEUED or self.index.relpath(ino) != rel:
                return
            expected = self.index.get_md5(ino)
            try:
                # The queued version is this inode of data/<ino>: a later version of the file is a
                # new file renamed over the name, so reading through the fd sends exactly one version.
                fd, _ = open_data_file(self.store.data_path(ino))
            except OSError as e:
                # Lost before it was sent (a wiped cache directory), or replaced by something else.
                if not isinstance(e, FileNotFoundError):
                    log.warning("queued upload of %s: its cached copy cannot be read (%s)", rel, e)
                states.demoted(self.store, ino)
                return
            try:
                actual = await trio.to_thread.run_sync(md5_fd, fd, limiter=self.disk)
                if actual != expected or os.fstat(fd).st_size != node.size:
                    if self._current(ino, expected):
                        log.warning("queued upload of %s: its cached copy is damaged; not sending it", rel)
                        states.demoted(self.store, ino)
                    return
                mark = self.index.last_delete_id()
                # Sent only as checked: a copy changed since (damage, tampering) is refused.
                info = await self.s3.put_file(
                    self.store.prefix + rel, f"/proc/self/fd/{fd}", expect_md5=expected
                )
            finally:
                os.close(fd)
            if info.md5 is not None and info.md5 != expected:
                raise OSError(f"queued upload of {rel}: sent MD5 {info.md5}, expected {expected}")
            if self._current(ino, expected):
                states.sent(self.store, self.space.index_write, ino, info.etag, mark)
            # else: a newer version was queued meanwhile; its own entry sends it after this one.
            self.store.stats["queued_uploads_sent"] += 1
            self.store.stats["uploaded_bytes"] += info.size

    def _current(self, ino: int, md5: str | None) -> bool:
        """The row is still QUEUED at the version whose MD5 is `md5`."""
        node = self.index.get(ino)
        return node is not None and node.state == State.QUEUED and self.index.get_md5(ino) == md5

    async def _delete(self, delete_id: int) -> None:
        entry = self.index.delete_relpath(delete_id)
        if entry is None:
            return
        async with self.keys.hold(entry):
            if not self.index.has_delete(delete_id):
                return  # a PUT of the key since then made it moot
            await self.s3.delete(self.store.prefix + entry)
            self.space.index_write(lambda: self.index.delete_done(delete_id))
            self.store.deletes_done[entry] = time.monotonic()
            self.store.stats["queued_deletes_done"] += 1
