"""The cache's face to the rest of the mount: one object that fs.py and namespace.py call, built
from the parts of this package (store, policy, space, evict, download, write, states)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from ..index import ROOT_INO, Index, Node, State, count_files, split_key_path
from ..metrics import Gauges, Metrics
from ..s3 import S3, ObjectInfo, md5_file
from . import states
from .download import Downloads
from .evict import Evictor
from .policy import Klass, Policies
from .queue import KeyLocks, Queue
from .space import Space, fs_bytes
from .states import Change
from .store import Download, Limits, Store, Writer, unlink_or_leave
from .write import Writes

log = logging.getLogger(__name__)


class Cache:
    def __init__(
        self,
        root: Path,
        index: Index,
        s3: S3,
        prefix: str,
        limits: Limits,
        disk: trio.CapacityLimiter,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ):
        """`disk`: the worker threads for local disk work (hashes, copies, fsync, unlinks), apart
        from the S3 calls' own, so that a hung S3 never holds up a cached read. `metrics`: where the
        cache's counters also go (store.stats)."""
        self.limits = limits
        self.index = index
        self.s3 = s3
        self.store = Store(root, index, prefix, clock, metrics)
        self.policies = Policies(limits.policies, limits.default_max_age)
        self.space = Space(self.store)
        self.disk = disk
        self.evictor = Evictor(self.store, limits, disk)
        self.downloads = Downloads(self.store, s3, limits, self.evictor, self.space, disk)
        self.keys = KeyLocks()
        self.queue = Queue(
            self.store, s3, self.space, self.keys, limits.upload_queue_max, limits.upload_concurrency, disk
        )
        self.writes = Writes(
            self.store, s3, self.policies, self.space, self.evictor, self.downloads, self.queue, disk
        )
        self._stats_base: Counter[str] = Counter(json.loads(index.get_meta("stats") or "{}"))
        self._saves = int(index.get_meta("saves") or 0)

    # -- life cycle ---------------------------------------------------------------------------------

    def recover(self) -> None:
        """Undo what a crash left: staging and download files, and rows of writes never acknowledged.

        Also re-applies the path policies to every row if they changed since the last mount (a one-off
        pass over the index; otherwise start-up does no work proportional to the number of files).
        Data files of evicted rows that a crash left behind are removed by the reaper (run_reaper).
        """
        for p in self.store.tmp_dir.iterdir():
            unlink_or_leave(str(p))
        fingerprint = self.policies.fingerprint()
        if self.index.get_meta("policy") != fingerprint:
            started = time.monotonic()
            with self.index.transaction():
                n = self.policies.apply(self.index)
                self.index.set_meta("policy", fingerprint)
            log.info(
                "applied cache policies in %.1fs (%d class values changed)", time.monotonic() - started, n
            )
        self.store.pending_bytes = self.index.doomed_bytes()
        self._restore_kept()
        states.orphaned(self.store)

    def _restore_kept(self) -> None:
        """keep/ holds a queued version that a crash caught while a newer one was replacing it in
        data/ (Writes._commit_queued). If the index still names it (by its MD5: the newer one was
        never committed), it goes back to data/, before orphaned() queues it again; otherwise it is
        dropped."""
        for p in self.store.keep_dir.iterdir():
            ino = int(p.name) if p.name.isdigit() else None
            try:
                if (
                    ino is not None
                    and p.is_file()
                    and not p.is_symlink()
                    and self.index.get(ino) is not None
                    and md5_file(str(p)) == self.index.get_md5(ino)
                ):
                    log.info(
                        "restoring the queued version of %s that a crash left in keep/",
                        self.index.relpath(ino),
                    )
                    self.store.restore_kept(ino)
                    continue
            except OSError as e:  # unreadable, or data/XX in the way: not ours to stop on
                log.warning("cannot put %s back into data/ (left there): %s", p, e)
                continue
            unlink_or_leave(str(p))

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The cache's background work, started with nursery.start: the index's checkpoints, the
        reaper, the upload queue, and a nursery for downloads and pipelined uploads, which go on when
        the request that started them is answered. Returns when cancelled (the mount is going down)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.space.run_checkpoints, self.disk)
            await nursery.start(self.evictor.run_reaper)
            await nursery.start(self.queue.run)
            self.store.nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self.store.nursery = None

    def start_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in the background if the cache's nursery is up (else not at all)."""
        if self.store.nursery is not None:
            self.store.nursery.start_soon(fn, *args)

    async def run_reaper(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.evictor.run_reaper(task_status=task_status)

    async def count_files(self) -> tuple[int, int]:
        """(files, bytes) in the index, for statfs: a scan of every row, in a local-disk worker
        thread on a read-only connection of its own, never on the event loop."""
        return await trio.to_thread.run_sync(count_files, self.index.path, limiter=self.disk)

    def housekeeping(self) -> None:
        """Periodic: age limit, free space taken by others, pending access times, counters.
        Raises what the index raises (a full cache disk); the caller logs it and goes on."""
        states.orphaned(self.store)
        self.evictor.evict_aged()
        self.evictor.make_room(0)
        self.store.flush_atimes()
        self.persist_stats()
        self.space.keep_reserve()

    # -- handles ------------------------------------------------------------------------------------

    def opened(self, ino: int) -> None:
        """A handle of the inode was opened: it is not evicted until its last handle is released."""
        self.store.pins[ino] += 1
        self.store.touch(ino)

    def released(self, ino: int) -> None:
        pins = self.store.pins
        pins[ino] -= 1
        if pins[ino] <= 0:
            del pins[ino]
            # It may have been kept over the cap only because it was open.
            self.evictor.make_room(0)

    def writer(self, ino: int) -> Writer | None:
        """The writer of a file being written, if any (all its write handles share it)."""
        return self.store.writers.get(ino)

    def busy(self, ino: int) -> bool:
        return self.store.busy(ino)

    def content_version(self, ino: int) -> int:
        return self.store.content_version(ino)

    def replaced_outside_since(self, ino: int, version: int) -> bool:
        return self.store.replaced_outside_since(ino, version)

    # -- reads --------------------------------------------------------------------------------------

    def open_cached(self, node: Node) -> int | None:
        return self.downloads.open_cached(node)

    async def verify(self, ino: int, fd: int) -> int:
        return await self.downloads.verify(ino, fd)

    async def fetch(self, ino: int) -> int:
        return await self.downloads.fetch(ino)

    def open_download(self, node: Node) -> Download:
        return self.downloads.open(node)

    def close_download(self, d: Download) -> None:
        self.downloads.close(d)

    @staticmethod
    def found_disk_full(d: Download) -> bool:
        return Downloads.found_disk_full(d)

    async def read_direct(self, ino: int, off: int, size: int) -> bytes:
        return await self.downloads.read_direct(ino, off, size)

    # -- writes -------------------------------------------------------------------------------------

    async def start_write(self, node: Node, truncate: bool) -> Writer:
        return await self.writes.start(node, truncate)

    def drop_new_row(self, ino: int) -> None:
        self.writes.drop_new_row(ino)

    def wrote(self, w: Writer, off: int, data: memoryview) -> None:
        self.writes.wrote(w, off, data)

    def write_failed(self, w: Writer, e: OSError) -> None:
        self.writes.write_failed(w, e)

    def truncated(self, w: Writer) -> None:
        self.writes.truncated(w)

    async def upload(self, w: Writer, defer_empty: bool = False) -> None:
        await self.writes.upload(w, defer_empty)

    async def finish_write(self, w: Writer) -> bool:
        return await self.writes.finish(w)

    @staticmethod
    def kernel_copy_current(w: Writer) -> bool:
        return Writes.kernel_copy_current(w)

    # -- the namespace's changes --------------------------------------------------------------------

    def klass(self, relpath: str) -> Klass:
        return self.policies.klass(relpath)

    def local_only(self, relpath: str) -> bool:
        return self.policies.local_only(relpath)

    def index_writable(self) -> None:
        self.space.index_writable()

    def index_write(self, change: Change, durable: bool = False) -> None:
        self.space.index_write(change, durable)

    def renamed_while_written(self, ino: int, moved: ObjectInfo | None = None) -> None:
        """The file is renamed while open for writing (Namespace._rename_written).

        moved: S3's version was copied to the new name; it is still what the writer goes back to.
        Otherwise what S3 holds under the old name no longer backs the file: its writer has no
        earlier version, and its next close uploads the whole file (states.unsent). Either way a
        write not yet committed is settled at the last release if no close follows (the file may
        have been closed already, and still be mapped)."""
        w = self.store.writers.get(ino)
        if w is not None:
            # A pipelined multipart upload runs under the old name: abandon it (the close uploads
            # the whole file under the new one).
            self.writes.drop_pipeline(w)
            if moved is not None:
                w.prev = (moved.size, moved.etag)
                w.settle_at_release = w.settle_at_release or w.dirty
                return
            # A version still queued stays queued (states.unsent): the writer may go back to it.
            w.prev, w.was_cached = None, False
            w.was_queued = w.was_queued and self.index.queued_upload(ino) is not None
            self.writes.mark_dirty(w)
            w.settle_at_release = True
        states.unsent(self.store, ino)
        self.queue.wake()

    def unlink(self, ino: int) -> None:
        """The file leaves the namespace and its DELETE is queued, in one durable commit: no S3 round
        trip here (queue.py orders the DELETE after an upload of the file still in flight)."""
        node = self.index.get(ino)
        if node is None:
            return
        rel = self.index.relpath(ino)
        # Nothing to delete in S3 for a local-only path, or an empty file (kept in the cache only).
        in_s3 = not self.policies.klass(rel).local_only and node.state != State.LOCAL
        now = self.store.clock()
        also = (lambda: self.index.queue_delete(rel, now)) if in_s3 else None
        states.dropped(self.store, self.space.durable_write, ino, also)
        if in_s3:
            self.queue.wake()

    def remove_dir(self, ino: int) -> None:
        """An empty directory leaves the namespace; the DELETE of its marker object (another tool's
        "a/b/", or SeaweedFS's implicit directory) is queued, in one durable commit."""
        rel = self.index.relpath(ino) + "/"
        now = self.store.clock()

        def change() -> None:
            self.index.remove(ino)
            self.index.queue_delete(rel, now)

        self.space.durable_write(change)
        self.queue.wake()

    def delete_pending(self, relpath: str) -> bool:
        """A DELETE of this key is queued: the name is gone, whatever S3 still lists."""
        return self.index.delete_pending(relpath)

    def deleted_since(self, relpath: str, asked: float) -> bool:
        """The queued DELETE of this key was done at or after `asked` (time.monotonic()): a LIST
        page asked for then may be older news and still name the key."""
        done = self.store.deletes_done.get(relpath)
        return done is not None and done >= asked

    @contextlib.asynccontextmanager
    async def changing(self, *relpaths: str) -> AsyncIterator[int]:
        """Hold the keys for S3 changes made outside the cache (a rename's copy and delete), in a
        fixed order (no deadlock between two renames). Yields the last queued DELETE's id: pass it
        to settled() once the copy onto a key succeeded."""
        async with contextlib.AsyncExitStack() as stack:
            for rel in sorted(set(relpaths)):
                await stack.enter_async_context(self.keys.hold(rel))
            yield self.index.last_delete_id()

    async def send_queued(self, ino: int) -> None:
        """A QUEUED file must be in S3 now (a rename copies it there): send it, waiting for S3."""
        await self.queue.send(ino)

    def drop(self, ino: int, also: Change | None = None, commit: bool = True, durable: bool = False) -> None:
        """The file leaves the namespace (states.dropped); `also` commits with it. commit: now,
        retried on a full disk (durable: with synchronous=FULL, see index_write); otherwise inside
        the transaction the caller holds."""
        write = self.space.durable_write if durable else self.space.index_write
        states.dropped(self.store, write if commit else states.direct, ino, also)

    def tree(self, ino: int) -> tuple[list[Node], list[int]] | None:
        """The files and the directories below directory `ino`, or None if one of the files is not
        S3's to say (being written, queued for upload, local-only or empty: LOCAL) or is in use
        (open, being downloaded)."""
        files: list[Node] = []
        dirs: list[int] = []
        stack = [ino]
        while stack:
            for n in self._children(stack.pop()):
                if n.is_dir:
                    dirs.append(n.ino)
                    stack.append(n.ino)
                    continue
                if (
                    n.state not in (State.REMOTE, State.CACHED)
                    or self.store.busy(n.ino)
                    or n.ino in self.store.starting
                ):
                    return None
                files.append(n)
        return files, dirs

    def drop_tree(self, files: list[Node], dirs: list[int], also: Change | None = None) -> None:
        """Files and directories (Cache.tree) leave the namespace in one commit, with `also`
        (states.tree_dropped), retried on a full disk."""
        states.tree_dropped(self.store, self.space.index_write, files, dirs, also)

    def replaced(self, ino: int, size: int, etag: str | None, mtime_ns: int, gen: int) -> None:
        """The object was replaced behind our back (states.replaced)."""
        states.replaced(self.store, ino, size, etag, mtime_ns, gen)

    def drop_copies(self, relpaths: list[str]) -> tuple[int, list[str]]:
        """Remove the cached copies of these files, and of the files directly in these directories
        (a medium's thumbnails): CACHED -> REMOTE (states.demoted), the object in S3 untouched, so the
        next open fetches it again. For media Synapse quarantined (quarantine.py).

        A file open right now is left alone and its path returned, to be tried again later; QUEUED
        and LOCAL rows are left too (their copy is the only one). Returns (copies removed, paths to
        try again)."""
        removed, busy = 0, []
        for rel in relpaths:
            node = self._node_at(rel)
            if node is None:
                continue
            files = self._files_in(node.ino) if node.is_dir else [node]
            for f in files:
                if f.state != State.CACHED:
                    continue
                if self.store.busy(f.ino):
                    busy.append(
                        rel if not node.is_dir else f"{rel}/{f.name.decode(errors='surrogateescape')}"
                    )
                    continue
                # File first, as space.relieve_disk does: a crash in between leaves a CACHED row
                # whose file is missing, which its next open demotes.
                self.store.unlink_data(f.ino)
                self.store.content_replaced(f.ino)
                states.demoted(self.store, f.ino)
                self.store.stats["quarantine_removals"] += 1
                removed += 1
        return removed, busy

    def _node_at(self, relpath: str) -> Node | None:
        parts = split_key_path(relpath)
        if parts is None:
            return None
        node = self.index.get(ROOT_INO)
        for name in parts:
            if node is None or not node.is_dir:
                return None
            node = self.index.lookup(node.ino, name)
        return node

    def _files_in(self, parent: int) -> list[Node]:
        return [n for n in self._children(parent) if not n.is_dir]

    def _children(self, parent: int) -> Iterator[Node]:
        """Every child of directory `parent`, read from the index a page at a time."""
        after = 0
        while batch := self.index.children(parent, after):
            yield from batch
            after = batch[-1].ino

    # -- space --------------------------------------------------------------------------------------

    def make_room(self, incoming: int) -> None:
        self.evictor.make_room(incoming)

    def relieve_disk(self, need: int = 0) -> int:
        return self.space.relieve_disk(need)

    def evict_aged(self) -> int:
        return self.evictor.evict_aged()

    async def wait_reaped(self) -> None:
        await self.evictor.wait_reaped()

    # -- access times and counters ------------------------------------------------------------------

    @property
    def cached_bytes(self) -> int:
        return self.store.cached_bytes

    @property
    def stats(self) -> Counter[str]:
        return self.store.stats

    def data_path(self, ino: int) -> str:
        return self.store.data_path(ino)

    def touch(self, ino: int) -> None:
        self.store.touch(ino)

    def flush_atimes(self) -> None:
        self.store.flush_atimes()

    def status(self) -> dict[str, object]:
        """What `s3cachefs status` shows, from the live process."""
        return {
            "cache_dir": str(self.store.root),
            "identity": self.index.get_meta("identity"),
            "pid": os.getpid(),
            "cap": self.limits.cap,
            "min_free": self.limits.min_free,
            "in_cache_bytes": self.store.cached_bytes,
            "pending_delete_bytes": self.store.pending_bytes,
            **self.index.cache_summary(),
            **self.index.queue_summary(self.store.clock()),
            **{f"stat_{k}": v for k, v in self.counters().items()},
        }

    def gauges(self, listing_running: bool, listed_objects: int) -> Gauges:
        """What the metrics' gauges show now (published by the event loop for scrapes, which must
        not read the index or this object's changing state from their thread)."""
        uploads, oldest_upload, deletes, oldest_delete = self.index.queue_heads()
        free, total = fs_bytes(self.store)
        min_free = self.limits.min_free
        return Gauges(
            cached_bytes=self.store.cached_bytes,
            cached_files=self.store.cached_files,
            cap_bytes=self.limits.cap,
            min_free_bytes=int(min_free * total) if min_free < 1 else int(min_free),
            fs_free_bytes=free,
            queued_uploads=uploads,
            queued_upload_bytes=self.store.queued_bytes,
            oldest_queued_upload_at=oldest_upload,
            queued_deletes=deletes,
            oldest_queued_delete_at=oldest_delete,
            listing_running=listing_running,
            listed_objects=listed_objects,
            circuit_open=self.s3.breaker.is_open,
        )

    def counters(self) -> Counter[str]:
        """Cumulative counters (across restarts), S3 calls per operation included."""
        calls = Counter({f"s3_{op}": n for op, n in self.s3.calls.items()})
        return self._stats_base + self.store.stats + calls

    def persist_stats(self) -> None:
        """Counters survive restarts, for `s3cachefs status`."""
        self._saves += 1
        self.index.set_meta("stats", json.dumps(dict(self.counters())))
        self.index.set_meta("saves", str(self._saves))
        self.index.set_meta("limits", json.dumps({"cap": self.limits.cap, "min_free": self.limits.min_free}))
