"""Eviction passes (the cap, the free-space floor, the age limit) and the reaper that removes the
data files of evicted rows.

Order of a pass: lowest eviction rank first (remote media before local media, local-only files
last), then least recently used. Open files, files being written and downloads are skipped
(Store.busy). Local-only files have no other copy: only the age limit or a full disk take them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time

import trio

from ..index import IN_CACHE, State
from . import states
from .space import fs_bytes
from .store import Limits, Store, unlink_or_leave

log = logging.getLogger(__name__)

# When the cap is hit, evict down to this fraction of it, so eviction runs in batches rather than on
# every single fill.
LOW_WATERMARK = 0.9
# An eviction pass unlinks this many data files itself (a few ms even where each unlink waits for a
# discard); the files of a larger pass are left to the reaper (Evictor.run_reaper).
INLINE_UNLINKS = 32
# Files the reaper takes per step, and how long it waits after a step failed (a full cache disk).
REAP_CHUNK = 256
REAP_RETRY = 10.0


class Evictor:
    def __init__(self, store: Store, limits: Limits, disk: trio.CapacityLimiter):
        self.store = store
        self.index = store.index
        self.limits = limits
        self.disk = disk  # worker threads for local disk work
        # Evicted data files: without a reaper (in-process use) a pass unlinks them all itself.
        self.reaper_running = False
        self._reap_wanted = trio.Event()
        self._reaped = trio.Event()
        self._trash_tag = os.urandom(4).hex()  # trash/ names of this run never meet a crash's leftovers
        self._trashed = 0
        self._last_warning = 0.0

    # -- passes -------------------------------------------------------------------------------------

    def make_room(self, incoming: int) -> None:
        """Enforce the cap and the free-space floor as data enters the cache, in one batch."""
        need, floor_short = self._bytes_to_free(incoming)
        if need <= 0:
            return
        self.store.flush_atimes()
        self._evict_batch(need, floor_short)

    def evict_aged(self) -> int:
        """Drop cached copies not used within their max age. Returns how many went."""
        self.store.flush_atimes()
        now = int(self.store.clock())
        with contextlib.closing(self.index.expired(now)) as expired:
            victims = [e for e in expired if e[1] > 0 and not self.store.busy(e[0])]
        self._evict(victims)
        return len(victims)

    def _bytes_to_free(self, incoming: int) -> tuple[int, bool]:
        """(bytes to evict, whether the free-space floor is what is short)."""
        cached = self.store.cached_bytes
        over_cap = cached + incoming - self.limits.cap
        short = 0
        min_free = self.limits.min_free
        if min_free:
            free, total = fs_bytes(self.store)
            want = int(min_free * total) if min_free < 1 else int(min_free)
            # Only bytes not yet on the cache filesystem count as incoming (downloads and staging
            # files are already there); be generous rather than run again on the next fill. Files
            # the reaper is about to unlink count as free: they were evicted already.
            short = want - free - self.store.pending_bytes
            if short > 0:
                short += int(want * (1 - LOW_WATERMARK))
        if over_cap <= 0 and short <= 0:
            return 0, False
        # Evict down to the low watermark, so that eviction runs in batches, not on every fill.
        return max(cached + incoming - int(self.limits.cap * LOW_WATERMARK), short), short > 0

    def _evict_batch(self, need: int, floor_short: bool) -> None:
        victims: list[tuple[int, int, State]] = []
        freed = 0
        # One cursor down the eviction order; the rows change only once it is closed.
        with contextlib.closing(self.index.eviction_candidates()) as candidates:
            for ino, size, state in candidates:
                # Local-only files have no other copy: only the age limit or a full disk (the
                # free-space floor) may take them, never the cap alone. Empty files free nothing.
                spare = state == State.LOCAL and (not floor_short or size == 0)
                if spare or self.store.busy(ino):
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
                    self.store.cached_bytes,
                    self.limits.cap,
                )

    def _evict(self, victims: list[tuple[int, int, State]]) -> None:
        """Take these (ino, size, state) rows out of the cache: the rows first, the data files after.

        states.evicted turns the rows REMOTE (local-only rows, which have no other copy, are removed)
        and enters them in the index's `doomed` table, in one transaction; the bytes leave the
        accounting at once. Then the data files go: the first INLINE_UNLINKS here and now, the rest
        by the reaper (run_reaper), so a large pass does not hold up every other request while the
        filesystem frees the blocks. A crash in between leaves data files whose rows say REMOTE:
        garbage, never served (only CACHED or LOCAL rows are read from data/), replaced by the next
        download of the file, and removed at the next mount, since their `doomed` entries were
        committed with the rows.
        """
        if not victims:
            return
        states.evicted(self.store, victims)
        inline = victims if not self.reaper_running else victims[:INLINE_UNLINKS]
        self._reap([ino for ino, _, _ in inline], to_trash=False)  # a failure to record it is harmless
        if len(inline) < len(victims):
            self.store.pending_bytes += sum(size for _, size, _ in victims[len(inline) :])
            self._wake_reaper()

    # -- the reaper ---------------------------------------------------------------------------------

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
        store = self.store
        found = self.index.states(inos)
        moved: list[str] = []
        done: list[int] = []
        for ino in inos:
            if ino in store.writers or ino in store.starting or ino in store.downloads:
                continue
            done.append(ino)
            if found.get(ino) in (*IN_CACHE, State.WRITING):
                continue
            if not to_trash:
                store.unlink_data(ino)
                continue
            self._trashed += 1
            dst = f"{store.trash_dir}/{self._trash_tag}-{self._trashed}"
            try:
                os.rename(store.data_path(ino), dst)
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
        """Background task (started with nursery.start): removes the data files of evicted rows that
        an eviction pass left to it, and at start what a crash left in trash/ and `doomed`.

        Per step: up to REAP_CHUNK files are moved to trash/ on the event loop (a rename frees no
        blocks, so it is cheap even where an unlink waits for a discard), then unlinked in a worker
        thread. Until then their bytes count as free for the free-space floor (pending_bytes).
        """
        store = self.store
        self.reaper_running = True
        self._reap_wanted.set()  # `doomed` entries from before this mount
        task_status.started()
        try:
            leftovers = await trio.to_thread.run_sync(_list_dir, str(store.trash_dir), limiter=self.disk)
            if leftovers:
                log.info("removing %d cache files left in trash/ by the previous run", len(leftovers))
                await trio.to_thread.run_sync(_unlink_all, leftovers, limiter=self.disk)
            while True:
                await self._reap_wanted.wait()
                self._reap_wanted = trio.Event()
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
                        await trio.to_thread.run_sync(_unlink_all, paths, limiter=self.disk)
                    if not recorded:
                        # A full cache disk (the index cannot record the step): again later.
                        await trio.sleep(REAP_RETRY)
                        continue
                    await trio.lowlevel.checkpoint()
                    store.pending_bytes = max(0, store.pending_bytes - sum(size for _, size in chunk))
                store.pending_bytes = 0
                self._reaped.set()
        finally:
            self.reaper_running = False

    async def wait_reaped(self) -> None:
        """Return once the data files of every row evicted so far are gone (needs the reaper)."""
        while not self._reaped.is_set() or self._reap_wanted.is_set():
            await self._reaped.wait()
            await trio.lowlevel.checkpoint()


def _list_dir(path: str) -> list[str]:
    return [f"{path}/{name}" for name in os.listdir(path)]


def _unlink_all(paths: list[str]) -> None:
    """Worker thread: unlink files nobody else refers to (in trash/).

    What cannot be unlinked (a directory someone put in the cache directory, where a data file was or
    in trash/) is left there with a warning: the reaper's failure must not end the mount."""
    for path in paths:
        unlink_or_leave(path)
