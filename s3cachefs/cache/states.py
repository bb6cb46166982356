"""The cache state of a file row, and the only functions that change it.

Each function below is one edge of the diagram. It changes the row and, in the same step, what
depends on it: `cached_bytes` and `cached_files` (the sum of the sizes, and the number, of CACHED,
LOCAL and QUEUED rows), the data file, the `doomed` table (eviction), the verified set and the
content version (which makes open read handles drop bytes of another version). Callers choose how the row change is committed, through `write`:
`space.index_write` when S3 was already changed and the index must follow whatever it takes (a full
disk is relieved and it is tried again), `transaction` for one commit of several statements, and
`direct` inside a transaction the caller holds. The accounting is applied only once the change is
committed, so a retried commit never counts twice.

               download: GET -> tmp/get-* -> verify -> rename to data/ -> cached()
      REMOTE ──────────────────────────────────────────────────────────────────────────▶ CACHED
      ▲ ▲ ▲ ◀──── evicted(): LRU over the cap, max age, disk full (never open or written) ── │
      │ │ │  ◀──── demoted(): the cached copy is missing, of the wrong length or damaged ── │
      │ │ │          (also: its medium was quarantined by Synapse, Cache.drop_copies)        │
      │ │ └───── replaced(): the listing, a HEAD past the metadata TTL or a GET's 412 (If-Match)
      │ │          shows another ETag (object replaced behind our back)
      │ │                                                                                  │
      │ │  writing(): open for write, or written again after an upload   ◀────────────────┘
      │ └──────────────────────────────────────────▶ WRITING ◀───── (new row) create()
      │                                                │  │  │
      └── reverted(): last release after a failed ────┘  │  └── cached(): flush/fsync, PUT ok ──▶ CACHED
          upload (an older S3 version exists;             │
          CACHED again if its copy was never touched)     └── local(): close of a local-only path,
                                                              or of an empty file ─────────────▶ LOCAL
      WRITING ── queued(): close of an upload = "async" path: fsync, durable commit ──▶ QUEUED
      QUEUED ── sent(): the background uploader's PUT is done ──▶ CACHED
      QUEUED ── demoted(): its bytes were lost before the upload ──▶ REMOTE (older version) or (removed)
      QUEUED is never evicted; a write-open, rename or unlink of it is handled by queue.py first
      LOCAL ── writing() ──▶ WRITING;  LOCAL ── evicted() (age limit or disk full only) ──▶ (removed)
      any file ── dropped() ──▶ (removed): unlink, rename over it, the listing no longer sees it
                                (or a HEAD past the metadata TTL finds no object), a first write
                                that failed with no older version (reverted()); tree_dropped(): the
                                files below a directory whose name a HEAD found to be a file
      WRITING ── orphaned() ──▶ REMOTE or (removed): at mount, a write whose close never succeeded
      any file with a writer ── unsent() ──▶ WRITING with no S3 version: renamed while open for writing

A queued DELETE is no row state: the row is removed (dropped()) and its key entered in the index's
delete_queue in the same durable commit (queue.py).

What survives a crash (kill -9, power loss):
- CACHED is written to the index only after the data file was verified and renamed into place,
  with the MD5 of its bytes. A CACHED row whose file is missing or has the wrong length is demoted
  on open, and the first read of every cached file after a mount checks its MD5 (in a worker
  thread) before serving it. So a torn, emptied or damaged cache file is never served; it is fetched
  again. That check is why downloads need no fsync before the rename.
- WRITING rows found at mount belong to writes whose close() never returned success: orphaned()
  reverts them to the S3 version they had (REMOTE) or removes them if there was none. The staging
  files in tmp/ are deleted. Nothing was ever PUT for them, so S3 holds no partial object.
- queued() of a file whose earlier version is still queued: that version's data file is kept in
  keep/ (a hard link) until the commit (Writes._commit_queued); at mount, Cache.recover moves it
  back to data/ if the row still has its MD5, before orphaned() requeues it.
- evicted() commits the rows (REMOTE, or removed if local-only) together with their entries in the
  index's `doomed` table, and only then are the data files removed. A file left in data/ by a crash
  in between belongs to a REMOTE row, which is never read from data/ (a later download renames its
  file over it); the reaper removes it at the next mount. trash/ holds only files no row refers to,
  and is emptied at mount.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..index import IN_CACHE, Node, State
from .store import Store

log = logging.getLogger(__name__)

Change = Callable[[], None]
Write = Callable[[Change], None]


def direct(change: Change) -> None:
    """Inside a transaction the caller holds (or one statement, which commits by itself)."""
    change()


def transaction(store: Store) -> Write:
    def write(change: Change) -> None:
        with store.index.transaction():
            change()

    return write


def _uncount(store: Store, node: Node | None) -> None:
    """The row's bytes leave the accounting (it is about to hold another version, or none)."""
    if node is not None and node.state in IN_CACHE:
        store.cached_bytes -= node.size
        store.cached_files -= 1
    if node is not None and node.state == State.QUEUED:
        store.queued_bytes -= node.size


def cached(
    store: Store,
    write: Write,
    ino: int,
    size: int,
    etag: str | None,
    mtime_ns: int,
    md5: str | None,
    deletes_upto: int | None = None,
) -> None:
    """REMOTE -> CACHED (a download is in data/) or WRITING -> CACHED (its upload is in S3 and its
    staging file in data/): data/<ino> holds exactly the object `etag`, whose MD5 is `md5`. After a
    PUT (deletes_upto given): a queued upload of an older version, and the DELETEs of this key queued
    before the PUT began, have nothing left to do."""
    before = store.index.get(ino)
    rel = store.index.relpath(ino) if deletes_upto is not None else ""

    def change() -> None:
        store.index.set_object(ino, State.CACHED, size, etag, mtime_ns, store.index.listing_gen)
        store.index.set_md5(ino, md5)
        if deletes_upto is not None:
            store.index.unqueue_upload(ino)
            store.index.drop_deletes(rel, deletes_upto)

    write(change)
    _uncount(store, before)
    store.verified[ino] = True
    store.cached_bytes += size
    store.cached_files += 1
    if deletes_upto is not None:
        store.s3_changed(ino)


def local(store: Store, write: Write, ino: int, size: int, mtime_ns: int, md5: str) -> None:
    """WRITING -> LOCAL: a local-only file (or an empty one) is complete in data/, never uploaded."""
    before = store.index.get(ino)

    def change() -> None:
        store.index.set_object(ino, State.LOCAL, size, None, mtime_ns, store.index.listing_gen)
        store.index.set_md5(ino, md5)
        store.index.unqueue_upload(ino)

    write(change)
    _uncount(store, before)
    store.verified[ino] = True
    store.cached_bytes += size
    store.cached_files += 1


def queued(store: Store, write: Write, ino: int, size: int, mtime_ns: int, md5: str) -> None:
    """WRITING -> QUEUED: a file whose policy is upload = "async" was closed; its bytes are fsynced
    in data/ and its upload is queued, in one commit (write must be durable). The queue entry keeps
    the version S3 holds until the upload is done: that of an earlier entry, or the row's."""
    before = store.index.get(ino)
    entry = store.index.queued_upload(ino)
    if entry is not None:
        prev = entry[1]
    elif before is not None and before.etag is not None and before.state != State.QUEUED:
        prev = (before.size, before.etag)  # REMOTE, CACHED, or WRITING over a file S3 holds
    else:
        prev = None

    def change() -> None:
        store.index.set_object(ino, State.QUEUED, size, None, mtime_ns, store.index.listing_gen)
        store.index.set_md5(ino, md5)
        store.index.queue_upload(ino, prev, store.clock())

    write(change)
    _uncount(store, before)
    store.verified[ino] = True
    store.cached_bytes += size
    store.cached_files += 1
    store.queued_bytes += size


def sent(store: Store, write: Write, ino: int, etag: str, deletes_upto: int) -> None:
    """QUEUED -> CACHED: the background uploader put it; S3 holds exactly data/<ino>. DELETEs of the
    same key queued before the PUT began are done by it."""
    node = store.index.get(ino)
    if node is None or node.state != State.QUEUED:
        return
    rel = store.index.relpath(ino)

    def change() -> None:
        store.index.set_object(ino, State.CACHED, node.size, etag, node.mtime_ns, store.index.listing_gen)
        store.index.unqueue_upload(ino)
        store.index.drop_deletes(rel, deletes_upto)

    write(change)
    store.queued_bytes -= node.size
    store.s3_changed(ino)


def writing(store: Store, ino: int) -> None:
    """REMOTE, CACHED, LOCAL or QUEUED -> WRITING: a write began (or the file was written again after
    a commit). Its bytes no longer count as cached: the copy in data/ is not what the file will hold.
    A QUEUED row keeps its queue entry (the uploader skips it while it is WRITING): a write that
    fails goes back to it (requeued)."""
    node = store.index.get(ino)
    if node is None or node.state == State.WRITING:
        return
    store.index.set_state(ino, State.WRITING)
    _uncount(store, node)


def unsent(store: Store, ino: int) -> None:
    """WRITING (or a row with a writer) -> WRITING with no S3 version: renamed while open for
    writing; the object under the old name is being deleted, so nothing in S3 backs the row until
    its next close uploads it under the new name. A queued version (a close acknowledged it) stays
    queued, to be sent under the new name (after a crash, orphaned() requeues it), with no older S3
    version to go back to."""
    writing(store, ino)
    node = store.index.get(ino)
    if node is not None:
        store.index.set_object(ino, State.WRITING, node.size, None, node.mtime_ns, store.index.listing_gen)
    entry = store.index.queued_upload(ino)
    if entry is not None:
        store.index.queue_upload(ino, None, entry[0])


def requeued(store: Store, write: Write, ino: int, size: int) -> None:
    """WRITING -> QUEUED again: a write of a queued file failed; data/<ino> still holds the queued
    version, which close() acknowledged, and its queue entry is still there."""
    store.content_replaced(ino)
    write(lambda: store.index.set_state(ino, State.QUEUED))
    store.cached_bytes += size
    store.cached_files += 1
    store.queued_bytes += size


def reverted(store: Store, write: Write, ino: int, prev: tuple[int, str] | None, copy_intact: bool) -> bool:
    """WRITING -> back to what S3 holds after a write that did not make it (its close() failed, or
    nothing was written): REMOTE at the previous version, CACHED if the copy the write started from
    is untouched (copy_intact), or removed if there was no previous version. Read handles opened
    after an fsync() hold an fd on bytes S3 does not have: the content version changes. Returns True
    if the row was removed."""
    store.content_replaced(ino)
    if prev is None:
        write(lambda: store.index.remove(ino))
        return True
    size, etag = prev
    node = store.index.get(ino)
    mtime = node.mtime_ns if node else time.time_ns()
    state = State.CACHED if copy_intact else State.REMOTE
    write(lambda: store.index.set_object(ino, state, size, etag, mtime, store.index.listing_gen))
    if state == State.CACHED:
        store.cached_bytes += size
        store.cached_files += 1
    return False


def demoted(store: Store, ino: int) -> None:
    """CACHED -> REMOTE: the cached copy is gone or not to be trusted (missing, wrong length, damaged,
    or unlinked to make room on a full disk). A LOCAL file has no other copy: it is gone too."""
    node = store.index.get(ino)
    if node is None or node.state not in IN_CACHE:
        return
    if node.state == State.LOCAL:
        # Its only copy is gone (the cache directory was wiped): the file is gone too.
        log.warning("local-only file %s lost its cached copy; removing it", store.index.relpath(ino))
        store.index.remove(ino)
    elif node.state == State.QUEUED:
        # Lost before its upload: S3 still holds the version before it, or nothing. (Async uploads
        # are for files that can be made again, such as thumbnails; the README says what it trades.)
        entry = store.index.queued_upload(ino)
        prev = entry[1] if entry else None
        log.warning("%s lost its cached copy before its queued upload", store.index.relpath(ino))
        with store.index.transaction(atomic=True):
            store.index.unqueue_upload(ino)
            if prev is None:
                store.index.remove(ino)
            else:
                store.index.set_object(
                    ino, State.REMOTE, prev[0], prev[1], node.mtime_ns, store.index.listing_gen
                )
        store.queued_bytes -= node.size
    else:
        store.index.set_state(ino, State.REMOTE)
    store.cached_bytes -= node.size
    store.cached_files -= 1


def replaced(store: Store, ino: int, size: int, etag: str | None, mtime_ns: int, gen: int) -> None:
    """CACHED or REMOTE -> REMOTE at another version: the listing, a HEAD past the metadata TTL or a
    GET refused with 412 showed the object replaced behind our back. The old copy goes, and open
    handles drop it (content version)."""
    node = store.index.get(ino)
    if node is not None and node.state in IN_CACHE:
        store.cached_bytes -= node.size
        store.cached_files -= 1
    store.unlink_data(ino)
    store.content_replaced(ino, outside=True)
    store.index.set_object(ino, State.REMOTE, size, etag, mtime_ns, gen)
    store.s3_changed(ino)


def dropped(store: Store, write: Write, ino: int, also: Change | None = None) -> None:
    """Any file -> removed from the namespace (unlink, a rename over it, the listing no longer sees
    it). Its cached copy goes; open fds keep working; a writer learns it must not commit. `also`:
    index changes committed with the removal (a rename puts its file in the name's place)."""
    node = store.index.get(ino)

    def change() -> None:
        store.index.remove(ino)
        store.index.unqueue_upload(ino)
        if also is not None:
            also()

    write(change)
    _forgotten(store, ino, node)


def _forgotten(store: Store, ino: int, node: Node | None) -> None:
    """After the commit that removed the row `node` (as it was before): its counts, its cached copy,
    and its writer, which must not commit."""
    if node is not None and node.state in IN_CACHE:
        store.cached_bytes -= node.size
        store.cached_files -= 1
    if node is not None and node.state == State.QUEUED:
        store.queued_bytes -= node.size
    store.unlink_data(ino)
    w = store.writers.get(ino)
    if w is not None:
        w.unlinked = True


def tree_dropped(
    store: Store, write: Write, files: list[Node], dirs: list[int], also: Change | None = None
) -> None:
    """dropped() for every file of a directory's subtree at once, with the directories (`dirs`), in
    one commit: a HEAD past the metadata TTL found the directory's name to be a file in S3 (another
    mount removed the directory and wrote the file). The caller made sure that none of `files` is
    open, written or ours to say (Cache.tree). `also`: the file's row, committed with them."""

    def change() -> None:
        for f in files:
            store.index.remove(f.ino)
            store.index.unqueue_upload(f.ino)
        for d in dirs:
            store.index.remove(d)
        if also is not None:
            also()

    write(change)
    for f in files:
        _forgotten(store, f.ino, f)


def evicted(store: Store, victims: list[tuple[int, int, State]]) -> None:
    """CACHED -> REMOTE, LOCAL -> removed, for a batch of (ino, size, state): the rows and their
    entries in `doomed` in one transaction; the data files go after (evict.py)."""
    with store.index.transaction():
        store.index.evict(victims)
    freed = sum(size for _, size, _ in victims)
    store.cached_bytes -= freed
    store.cached_files -= len(victims)
    store.stats["evictions"] += len(victims)
    store.stats["evicted_bytes"] += freed


def orphaned(store: Store) -> None:
    """WRITING rows with no writer (a crash, or an index update that failed on a full disk) go back
    to what S3 holds: nothing was ever uploaded for them."""
    for node in store.index.writing():
        if node.ino in store.writers or node.ino in store.starting:
            continue
        if store.index.queued_upload(node.ino) is not None:
            # A write of a QUEUED file: data/<ino> still holds the queued version.
            requeued(store, direct, node.ino, node.size)
            continue
        if node.etag is None:
            log.info("dropping %s: its write never completed", store.index.relpath(node.ino))
            store.index.remove(node.ino)
        else:
            store.index.set_state(node.ino, State.REMOTE)
        store.unlink_data(node.ino)
