"""Room on the cache disk: the index's reserve, and what is done when the disk is full.

The index lives on the cache filesystem. When that disk is full, the index must still be able to
record what S3 already holds (an index that disagrees with S3 fails a write S3 in fact holds, or
shows a file that never was). So RESERVE bytes are held in the file `reserve`, given up when a full
disk refuses an index update; and before S3 is changed, the index is probed (index_writable), so a
full disk fails the write with nothing done.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3

import trio

from ..index import IN_CACHE, State, checkpoint
from . import states
from .states import Change
from .store import Store

log = logging.getLogger(__name__)

# Bytes of the cache disk kept free for the index (the file `reserve`): when the disk is full, the
# index can still record what S3 already holds.
RESERVE = 1024 * 1024

# How often the index's WAL is checkpointed (copied into the database file) while the mount runs, if
# anything was committed since the last time (run_checkpoints).
CHECKPOINT_PERIOD = 1.0


def fs_bytes(store: Store) -> tuple[int, int]:
    """(free, total) bytes of the filesystem holding the cache."""
    st = os.statvfs(store.root)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


class Space:
    def __init__(self, store: Store):
        self.store = store
        self.index = store.index
        self.reserve_path = store.root / "reserve"
        self.reserve_short = False  # the disk had no room to make the reserve again
        self.keep_reserve()

    def index_write(self, change: Change, durable: bool = False) -> None:
        """Make an index change that must not be lost, in one transaction. The index is probed before
        S3 is changed, but a full cache disk can still refuse the few pages a change needs: then
        cached copies are evicted, or the reserve is given up, and it is tried again, since an index
        that disagrees with S3 fails a write S3 in fact holds, or shows a file that never was."""
        while True:
            try:
                with self.index.transaction(atomic=True, durable=durable):
                    change()
                return
            except sqlite3.OperationalError:
                if not self._make_index_room():
                    raise

    async def run_checkpoints(
        self, disk: trio.CapacityLimiter, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Background task: the index's checkpoints, in a local-disk worker thread.

        SQLite's automatic checkpoint runs inside whichever commit makes the WAL pass 1,000 pages:
        on the event loop, copying up to 4 MB into the database file and fsyncing it, tens of
        milliseconds in which no FUSE request is answered (the background listing of a large bucket
        reaches that size every few hundred batches; an eviction pass of 30k rows, ~0.2 s). So
        commits skip it while this runs, and a PASSIVE checkpoint on a connection of its own (it
        waits for no lock; the daemon reads and writes on meanwhile) runs every CHECKPOINT_PERIOD
        if anything was committed. On return, commits checkpoint as before."""
        index = self.index
        index.suspend_checkpoints()
        seen = index.changes()
        try:
            task_status.started()
            while True:
                await trio.sleep(CHECKPOINT_PERIOD)
                now = index.changes()
                if now == seen:
                    continue
                seen = now
                try:
                    await trio.to_thread.run_sync(checkpoint, index.path, limiter=disk)
                except sqlite3.Error as e:
                    log.warning("checkpoint of the index failed (tried again in a second): %s", e)
        finally:
            with contextlib.suppress(sqlite3.Error):
                index.resume_checkpoints()

    def durable_write(self, change: Change) -> None:
        """index_write, committed durably (what an acknowledged close or unlink rests on)."""
        self.index_write(change, durable=True)

    def index_writable(self) -> None:
        """Make sure the index can take a write before S3 is changed (see write.Writes.upload); a
        full disk is relieved once by eviction before the error stands."""
        try:
            self.index.probe_writable()
        except sqlite3.OperationalError:
            if not self.relieve_disk():
                raise
            self.index.probe_writable()
        # The reserve is for recording what was already done, not for starting more.
        if not self.reserve_path.exists():
            self.keep_reserve()
            if self.reserve_short and self.relieve_disk():
                # The disk filled up after the reserve was given up: cached copies make room for
                # it, or every later change (unlink included) would fail until housekeeping.
                self.keep_reserve()
            if self.reserve_short:
                raise sqlite3.OperationalError("database or disk is full (no room for the index's reserve)")

    def keep_reserve(self) -> None:
        """Hold RESERVE bytes of the cache disk for the index alone (see _make_index_room); made
        again by housekeeping once there is room."""
        if os.path.lexists(self.reserve_path):
            return
        try:
            # O_NOFOLLOW: a symlink planted here must not turn our writes onto another file.
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            self._reserve_failed(e)
            return
        try:
            os.posix_fallocate(fd, 0, RESERVE)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.reserve_path)
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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.reserve_path)
            return True
        return False

    def relieve_disk(self, need: int = 0) -> int:
        """The cache filesystem is full (ENOSPC from a write, or the index cannot grow): evict
        S3-backed copies, whatever the cap says, until `need` bytes plus 5% of the filesystem (at
        least 1 MiB) are free again. Returns the bytes freed. Data files go before their rows, so
        the space is there even if the index cannot record it yet (such a row is demoted on its
        next open). Synchronous: the space is needed now, and this is rare. Files that the reaper
        has yet to unlink go first."""
        store = self.store
        freed = self._reap_all_now()
        free, total = fs_bytes(store)
        want = max(1024 * 1024, total // 20) + need
        victims: list[tuple[int, int]] = []
        short = want - free
        with contextlib.closing(self.index.eviction_candidates()) as candidates:
            for ino, size, state in candidates:
                if short <= 0:
                    break
                if store.busy(ino) or state == State.LOCAL:
                    continue
                victims.append((ino, size))
                short -= size
        for ino, size in victims:
            store.unlink_data(ino)
            freed += size
            # On failure it stays listed as cached: its next open finds the file gone and demotes
            # it (and only then is it uncounted, once).
            with contextlib.suppress(sqlite3.Error):
                states.demoted(store, ino)
            store.stats["evictions"] += 1
        if freed:
            log.warning("cache filesystem full: evicted %d bytes of cached copies to make room", freed)
        return freed

    def _reap_all_now(self) -> int:
        """Unlink, here and now, every file the reaper has yet to: those in trash/, and those of
        `doomed` rows. Returns their bytes (as the index counts them)."""
        store = self.store
        freed = 0
        with contextlib.suppress(OSError):
            for name in os.listdir(store.trash_dir):
                path = f"{store.trash_dir}/{name}"
                with contextlib.suppress(OSError):
                    freed += os.stat(path).st_size
                    os.unlink(path)
        with contextlib.suppress(sqlite3.Error):
            # Files first: on a full disk the index may not be able to record it (then the entries
            # stay, and the reaper finds their files already gone).
            doomed = [(ino, size) for ino, size in self.index.doomed(-1) if not store.busy(ino)]
            found = self.index.states([ino for ino, _ in doomed])
            for ino, size in doomed:
                if found.get(ino) not in (*IN_CACHE, State.WRITING):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(store.data_path(ino))
                        freed += size
            store.pending_bytes = 0
            self.index.undoom([ino for ino, _ in doomed])
        return freed
