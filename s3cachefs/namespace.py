"""The namespace: names -> index rows, kept in step with the bucket.

Lookups of known names never touch S3. A miss in a directory whose listing is complete is a plain
ENOENT. (Both unless a metadata TTL is set: see below.) A miss elsewhere (a new cache, or a directory not listed yet) costs one HEAD (plus one LIST of
at most one key when there is no such object, to see whether the name is a directory implied by
deeper keys), and an answer of "missing" is remembered for a few seconds.

A full listing runs in the background at every mount, and again every relist_interval: it adds
objects written by others, updates objects replaced behind our back, and drops rows of objects deleted
behind our back.

With a finite metadata_ttl (--metadata-ttl), what the index says about a name is trusted for that long
only, for buckets that others write to while we are mounted (a standby host's mount, `s3cachefs
import`, the provider's upload job). Past it: a miss in a complete directory asks S3 (a HEAD, under the
negative cache), a known file is looked up again (HEAD, at lookup and at open) and its row follows
(states.replaced, or dropped if it is gone), a known directory is looked up again too (a HEAD of its
name's key, and a LIST of at most one key below it if an object is there: Namespace.check_dir) so
that a directory another writer replaced by a file becomes that file, and opendir lists the
directory again. A directory that others merely removed (no object at its name, no key below it)
stays: a directory made by mkdir lives in the index only (README "Index"), and S3 cannot tell the
two apart. The default is no TTL: none of these requests are made, so Synapse's reactor thread never
waits on S3 for them. When each row was last checked is kept in memory only (a bounded cache): a
restart checks everything once.

Errors are raised as OSError with an errno (or S3Error from s3.py); fs.py turns them into FUSEError.
"""

from __future__ import annotations

import enum
import errno
import logging
import sqlite3
import time
from collections.abc import Callable

import cachetools
import trio

from .cache import Cache, Klass
from .index import NAME_MAX, ROOT_INO, Index, Node, State, check_new_name, split_key_path
from .s3 import S3, ObjectInfo, S3Error

log = logging.getLogger(__name__)

NEGATIVE_TTL = 5.0
# The background listing applies this many keys per transaction, and ends by taking the index this
# many inode numbers at a time, with the event loop's other requests in between.
LISTING_BATCH = 50
# Keys per LIST page of the background listing. A page is parsed in a worker thread that competes
# with the event loop for the interpreter lock: ElementTree's parse of one (s3/listparse.py) holds it
# without a break, so pages stay small (about 2 ms for 200 keys; botocore's own parse took 6-7 ms of
# Python here).
LISTING_PAGE = 200
# Inode numbers per step of the end of the listing: at a million objects a slice of 20,000 held the
# event loop 60-75 ms (bench.listing_stall: the only probes over 50 ms of a quiet run).
LISTING_SLICE = 2_500
# Rows and directories whose check against S3 is remembered (metadata_ttl): a row that falls out is
# only checked once more than needed.
VALIDATED_MAX = 100_000


class Freshness(enum.Enum):
    """What a refresh found in S3 for a file's row."""

    SAME = "same"  # S3 holds the version the index knows (or the row is ours to say: being written)
    CHANGED = "changed"  # another version: the row now describes it
    GONE = "gone"  # no object any more: the row was dropped


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{what}: {errno.errorcode.get(code, code)}")


class Namespace:
    def __init__(
        self,
        index: Index,
        s3: S3,
        cache: Cache,
        prefix: str,
        metadata_ttl: float | None = None,
        relist_interval: float | None = None,
    ):
        """metadata_ttl: seconds the index is trusted about a name before S3 is asked again (None:
        for ever, the default). relist_interval: seconds between two full listings after the first
        (None: the listing runs once per mount)."""
        self.index = index
        self.s3 = s3
        self.cache = cache
        self.prefix = prefix
        self.metadata_ttl = metadata_ttl
        self.relist_interval = relist_interval
        # Bounded: a flood of misses cannot grow memory. An absence is not trusted for longer than
        # a presence.
        negative_ttl = NEGATIVE_TTL if metadata_ttl is None else min(NEGATIVE_TTL, metadata_ttl)
        self.negative: cachetools.TTLCache[str, bool] = cachetools.TTLCache(maxsize=10_000, ttl=negative_ttl)
        # Inodes (files, and directories for opendir) checked against S3 within the last
        # metadata_ttl seconds; unused without a TTL.
        self.validated: cachetools.TTLCache[int, bool] = cachetools.TTLCache(
            maxsize=VALIDATED_MAX, ttl=metadata_ttl if metadata_ttl is not None else 0
        )
        # Directories whose name was checked against S3 (is it a file now?) within the last
        # metadata_ttl seconds, at lookup (check_dir); apart from `validated`, which says that
        # opendir listed them.
        self.kind_checked: cachetools.TTLCache[int, bool] = cachetools.TTLCache(
            maxsize=VALIDATED_MAX, ttl=metadata_ttl if metadata_ttl is not None else 0
        )
        # One HEAD per inode at a time, however many lookups and opens ask.
        self._refreshing: dict[int, trio.Event] = {}
        self.listing_active = False
        self.listed_objects = 0  # by the running listing, or the last one (for the metrics)
        self.listed = trio.Event()  # set once a full listing has completed in this process
        self.skipped_keys = 0
        # Set by fs.Operations: tells the kernel to forget a name/inode that changed behind our back.
        self.on_changed: Callable[[int, Node | None], None] = lambda ino, gone: None
        # A GET refused with 412 (If-Match) means the index holds an old version: learn the new one.
        cache.downloads.on_changed = self.refresh

    def relpath_of(self, parent: int, name: bytes) -> str:
        base = self.index.relpath(parent)
        n = name.decode("utf-8", "surrogateescape")
        return f"{base}/{n}" if base else n

    # -- lookups ------------------------------------------------------------------------------------

    def dir_node(self, ino: int) -> Node:
        node = self.index.get(ino)
        if node is None:
            raise _err(errno.ENOENT, f"inode {ino}")
        if not node.is_dir:
            raise _err(errno.ENOTDIR, f"inode {ino}")
        return node

    async def lookup(self, parent: int, name: bytes) -> Node | None:
        node = self.index.lookup(parent, name)
        if node is not None:
            if node.is_dir:
                if node.ino == ROOT_INO or self.metadata_ttl is None or node.ino in self.kind_checked:
                    return node
                try:
                    await self.check_dir(node.ino)
                except S3Error as e:
                    log.debug("lookup of %s: serving the index's answer, S3 did not give one (%s)", name, e)
                return self.index.lookup(parent, name)
            if not self.stale(node.ino):
                return node
            try:
                if await self.refresh(node.ino) == Freshness.GONE:
                    return None
            except S3Error as e:
                # Synapse takes any error of a stat for "missing" (and 404s, or fetches it again):
                # while S3 does not answer, the index's answer is the better one.
                log.debug("lookup of %s: serving the index's answer, S3 did not give one (%s)", name, e)
            return self.index.lookup(parent, name)
        pnode = self.dir_node(parent)
        if len(name) > NAME_MAX or name in (b".", b".."):
            return None
        if pnode.complete and self.metadata_ttl is None:
            return None
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            return None  # no object key can have this name
        rel = self.relpath_of(parent, name)
        if pnode.complete and self.cache.klass(rel).local_only:
            return None  # never in S3, whoever else writes to the bucket
        if rel in self.negative or self.cache.delete_pending(rel) or self.cache.delete_pending(rel + "/"):
            return None  # a name whose DELETE is queued stays deleted, whatever S3 still says
        key = self.prefix + rel
        try:
            info = await self.s3.head(key)
            is_dir = info is None and await self.s3.has_prefix(key + "/")
        except S3Error as e:
            if not pnode.complete:
                raise
            # Asked only because of the metadata TTL: the index's "no such name" stands (see above).
            log.debug("lookup of %s: serving the index's answer, S3 did not give one (%s)", rel, e)
            return None
        # The awaits let other requests run: the name may have been created meanwhile.
        node = self.index.lookup(parent, name)
        if node is not None:
            return node
        if info is not None:
            node = self._add_object(parent, name, rel, info)
            self._checked(node.ino)
            return node
        if is_dir:
            return self.index.add_dir(parent, name, complete=False)
        self.negative[rel] = True
        return None

    def _add_object(self, parent: int, name: bytes, rel: str, info: ObjectInfo) -> Node:
        """A REMOTE row for the object S3 holds at `rel` (found by a HEAD or a LIST)."""
        return self.index.add_file(
            parent,
            name,
            State.REMOTE,
            info.size,
            info.etag,
            info.mtime_ns,
            self.index.listing_gen,
            self.cache.klass(rel).columns,
        )

    async def ensure_listed(self, ino: int) -> None:
        """Make the index authoritative for the children of directory `ino` (one delimited LIST)."""
        node = self.dir_node(ino)
        if node.complete and not self.stale(ino):
            return
        # Past the metadata TTL a complete directory is listed again: names others added since are
        # added (those they removed go at their next lookup, or at the next full listing).
        relisting = node.complete
        rel = self.index.relpath(ino)
        dir_prefix = self.prefix + (rel + "/" if rel else "")
        # When the page being applied was asked for: a name whose queued DELETE was done after
        # that (while the page was on its way) is gone, though the page still names it (found by
        # the model test under CI load: an rmdir'ed directory came back).
        asked = time.monotonic()
        async for objs, prefixes in self.s3.list_pages(dir_prefix, delimiter="/"):
            # Files before directories: a key that is also a prefix ("a" and "a/b") is shown as the
            # file, as the full listing shows it (it sees "a" before "a/b").
            for o in objs:
                name = o.key[len(dir_prefix) :].encode("utf-8", "surrogateescape")
                if split_key_path(o.key[len(dir_prefix) :]) is None or b"/" in name:
                    continue
                rel = o.key[len(self.prefix) :]
                if self.cache.local_only(rel):
                    continue
                gone = self._deleted(rel) or self.cache.deleted_since(rel, asked)
                if self.index.lookup(ino, name) is None and not gone:
                    self._add_object(ino, name, rel, o)
            for p in prefixes:
                name = p[len(dir_prefix) :].rstrip("/").encode("utf-8", "surrogateescape")
                sane = name and name not in (b".", b"..") and len(name) <= NAME_MAX and b"/" not in name
                prel = p[len(self.prefix) :]
                gone = self.cache.delete_pending(prel) or self.cache.deleted_since(prel, asked)
                if not sane or gone or self.index.lookup(ino, name) is not None:
                    continue
                # A directory new to a re-listing: SeaweedFS (and other servers that keep folders)
                # still answer with the prefix of a folder whose objects were all deleted, which would
                # bring back a directory removed here (rmdir and rename then say ENOTEMPTY). Only a
                # prefix with an object below it is a directory (as for a lookup). Not on a first
                # listing: its new prefixes are the whole tree, and a full listing follows anyway.
                if relisting and not await self.s3.has_prefix(p):
                    continue
                if self.index.get(ino) is not None and self.index.lookup(ino, name) is None:
                    self.index.add_dir(ino, name, complete=False)
            asked = time.monotonic()  # the next page is asked for as the loop comes round
        if self.index.get(ino) is not None:
            self.index.set_complete(ino)
            self._checked(ino)

    # -- the metadata TTL ---------------------------------------------------------------------------

    def stale(self, ino: int) -> bool:
        """Past the metadata TTL since S3 was last asked about this inode (never without a TTL)."""
        return self.metadata_ttl is not None and ino not in self.validated

    def _checked(self, ino: int) -> None:
        if self.metadata_ttl is not None:
            self.validated[ino] = True

    def _being_written(self, ino: int) -> bool:
        """A write holds or is making a staging copy of the row's bytes: what S3 holds is not news."""
        return self.cache.writer(ino) is not None or ino in self.cache.store.starting

    async def refresh(self, ino: int) -> Freshness:
        """Ask S3 (HEAD) whether the file's object is still the version the index knows, and make
        the row follow: another version -> states.replaced, no object -> dropped; the kernel is told
        (on_changed). Rows whose content is ours to say (being written, queued for upload,
        local-only) are left alone. Concurrent callers for one inode share one HEAD."""
        while (pending := self._refreshing.get(ino)) is not None:
            await pending.wait()
            if ino in self.validated or self.metadata_ttl is None:
                node = self.index.get(ino)
                return Freshness.GONE if node is None else Freshness.SAME
        done = self._refreshing[ino] = trio.Event()
        try:
            return await self._refresh(ino)
        finally:
            del self._refreshing[ino]
            done.set()

    async def _refresh(self, ino: int) -> Freshness:
        node = self.index.get(ino)
        if node is None:
            return Freshness.GONE
        if node.state not in (State.REMOTE, State.CACHED) or self._being_written(ino):
            return Freshness.SAME
        rel = self.index.relpath(ino)
        # The key is held, as by our own queued PUTs and DELETEs and a rename's copy: what the HEAD
        # says is not one of our own changes half done.
        async with self.cache.keys.hold(rel):
            info = await self.s3.head(self.prefix + rel)
        # The awaits let other requests run: only a row still as it was may follow what S3 said.
        cur = self.index.get(ino)
        if cur is None:
            return Freshness.GONE
        moved = self.index.relpath(ino) != rel
        if moved or (cur.state, cur.etag, cur.size) != (node.state, node.etag, node.size):
            return Freshness.SAME
        if self._being_written(ino):
            return Freshness.SAME
        if info is None:
            if self.cache.delete_pending(rel):
                return Freshness.SAME  # our own DELETE, queued: not yet, still ours to show
            log.info("%s was deleted behind our back", rel)
            self.cache.drop(ino)
            self.on_changed(ino, cur)
            return Freshness.GONE
        self._checked(ino)
        if info.etag == cur.etag and info.size == cur.size:
            return Freshness.SAME
        log.info("%s was replaced behind our back (%d -> %d bytes)", rel, cur.size, info.size)
        self.cache.replaced(ino, info.size, info.etag, info.mtime_ns, self.index.listing_gen)
        self.on_changed(ino, None)
        return Freshness.CHANGED

    async def check_dir(self, ino: int) -> None:
        """Past the metadata TTL, at a lookup of a directory's name: has another writer removed the
        directory and put a file under its name? A HEAD of the name's key; only if an object is
        there, a LIST of at most one key below it. An object and no key below: the name is that
        file now, and the directory's row and everything below it are replaced by the file's row
        (the kernel is told, on_changed), unless a file below it is ours to say or in use (then the
        directory stays, and a warning is logged). No object: the directory stays, whether others
        removed it or it was made here by mkdir (it lives in the index only; S3 cannot tell the
        two apart). Concurrent callers for one directory share one check."""
        while (pending := self._refreshing.get(ino)) is not None:
            await pending.wait()
            if ino in self.kind_checked:
                return
        done = self._refreshing[ino] = trio.Event()
        try:
            await self._check_dir(ino)
        finally:
            del self._refreshing[ino]
            done.set()

    async def _check_dir(self, ino: int) -> None:
        node = self.index.get(ino)
        if node is None or not node.is_dir or ino == ROOT_INO:
            return
        rel = self.index.relpath(ino)
        if self.cache.delete_pending(rel):
            # Our own DELETE of a file of that name is queued (it was unlinked, then mkdir made the
            # directory): the object S3 still holds is on its way out.
            self._kind_checked(ino)
            return
        key = self.prefix + rel
        # The key is held, as in _refresh: no queued PUT or DELETE of it is half done meanwhile.
        async with self.cache.keys.hold(rel):
            info = await self.s3.head(key)
        if info is None or await self.s3.has_prefix(key + "/"):
            self._kind_checked(ino)
            return
        # The awaits let other requests run: only a directory still where it was may be replaced.
        cur = self.index.get(ino)
        if cur is None or not cur.is_dir or self.index.relpath(ino) != rel or self.cache.delete_pending(rel):
            return
        tree = self.cache.tree(ino)
        if tree is None:
            log.warning(
                "%s is a file in S3 now (written by another mount?), but a file below the directory of "
                "that name is in use or not uploaded yet: the directory stays",
                rel,
            )
            self._kind_checked(ino)
            return
        files, dirs = tree
        dir_nodes = [d for d in map(self.index.get, dirs) if d is not None]
        added: list[Node] = []

        def add_file() -> None:
            added[:] = [self._add_object(cur.parent, cur.name, rel, info)]

        log.info(
            "%s: the directory was replaced by a file behind our back (%d files and %d directories below it forgotten)",
            rel,
            len(files),
            len(dirs),
        )
        self.cache.drop_tree(files, [*dirs, ino], also=add_file)
        self.negative.pop(rel, None)
        for gone in (*files, *dir_nodes, cur):
            self.validated.pop(gone.ino, None)
            self.kind_checked.pop(gone.ino, None)
            self.on_changed(gone.ino, gone)
        self._checked(added[0].ino)

    def _kind_checked(self, ino: int) -> None:
        if self.metadata_ttl is not None:
            self.kind_checked[ino] = True

    # -- the background listing ---------------------------------------------------------------------

    async def full_listing(self) -> None:
        """List the whole prefix once, page by page, and reconcile the index with it."""
        gen = int(self.index.get_meta("listed_gen") or 0) + 1
        self.index.listing_gen = gen
        self.listing_active = True
        self.skipped_keys = 0
        self.listed_objects = 0
        dirs: cachetools.LRUCache[str, int] = cachetools.LRUCache(maxsize=4096)
        started = time.monotonic()
        count = 0
        store = self.cache.store
        # A page says what S3 held when it was asked for; a file this mount uploaded (or learned a
        # newer version of) after that must not go back to what the page says (Store.s3_changed).
        changed: set[int] = set()
        store.changed_since_page = changed
        try:
            async for objs, _ in self.s3.list_pages(self.prefix, page_size=LISTING_PAGE):
                # A transaction per batch, and the event loop's other requests between batches: a
                # page of 1000 keys applied in one go held the loop for tens of ms.
                for start in range(0, len(objs), LISTING_BATCH):
                    self.index.begin()
                    try:
                        for o in objs[start : start + LISTING_BATCH]:
                            self._apply_listed(o, gen, dirs, changed)
                    finally:
                        self.index.commit()
                    await trio.lowlevel.checkpoint()
                    dirs.clear()  # a directory it names may have been removed meanwhile
                count += len(objs)
                self.listed_objects = count
                # The next page is asked for when this loop comes round: what changed until then, S3
                # has (its answers follow the writes they acknowledged).
                store.changed_since_page = changed = set()
            # The end of the listing, a slice of inode numbers at a time (at a million objects, one
            # statement over the whole table held the loop for seconds).
            dropped = 0
            top = self.index.max_ino()
            for lo in range(0, top, LISTING_SLICE):
                self.index.begin()
                try:
                    for node in self.index.stale_files(gen, lo, lo + LISTING_SLICE):
                        if self.cache.busy(node.ino) or self.index.get(node.ino) is None:
                            continue
                        self.cache.drop(node.ino, commit=False)
                        self.on_changed(node.ino, node)
                        dropped += 1
                    self.index.mark_dirs_complete(lo, lo + LISTING_SLICE)
                finally:
                    self.index.commit()
                await trio.lowlevel.checkpoint()
            self.index.begin()
            try:
                # Directories made while the slices above were marked were made complete by us.
                self.index.mark_dirs_complete(top)
                self.index.clear_tombstones()
                self.index.set_meta("listed_gen", str(gen))
            finally:
                self.index.commit()
        finally:
            self.listing_active = False
            store.changed_since_page = None
        self.listed.set()
        log.info(
            "listed %d objects in %.1fs (%d keys hidden as unsafe names, %d entries of deleted objects dropped)",
            count,
            time.monotonic() - started,
            self.skipped_keys,
            dropped,
        )

    async def listing_task(self, retry_every: float = 30.0) -> None:
        """Run the full listing, retrying while S3 is unreachable (bounded by the mount's lifetime);
        then again every relist_interval, if set, to find what others added, replaced or deleted."""
        while True:
            await self._list_once(retry_every)
            if self.relist_interval is None:
                return
            await trio.sleep(self.relist_interval)

    async def _list_once(self, retry_every: float) -> None:
        while True:
            try:
                await self.full_listing()
                return
            except S3Error as e:
                log.warning("background listing failed (%s); retrying in %.0fs", e, retry_every)
            except (OSError, sqlite3.Error) as e:  # e.g. a full cache disk: the mount stays up
                log.error("background listing failed (%s); retrying in %.0fs", e, retry_every)
            await trio.sleep(min(retry_every, self.relist_interval or retry_every))

    def _deleted(self, rel: str) -> bool:
        """Deleted through this mount while a listing ran, or its DELETE is still queued."""
        return self.index.is_tombstoned(rel) or self.cache.delete_pending(rel)

    def _apply_listed(
        self, o: ObjectInfo, gen: int, dirs: cachetools.LRUCache[str, int], changed: set[int]
    ) -> None:
        if not o.key.startswith(self.prefix):
            return
        rel = o.key[len(self.prefix) :]
        if self.cache.local_only(rel):
            # A local-only path's files live in the cache alone (as in lookup): an object under it
            # would replace what was written through the mount, and bring back what was unlinked.
            return
        # "a/b/" is a directory marker left by other tools (s3fs, the S3 console): show the directory.
        marker = rel.endswith("/")
        parts = split_key_path(rel[:-1] if marker else rel)
        if parts is None:
            self.skipped_keys += 1
            log.debug("hiding key %r: not a safe path", o.key)
            return
        parent = ROOT_INO
        dir_rel = ""
        for comp in parts if marker else parts[:-1]:
            dir_rel = dir_rel + "/" + comp.decode("utf-8", "surrogateescape")
            cached = dirs.get(dir_rel)
            if cached is not None:
                parent = cached
                continue
            node = self.index.lookup(parent, comp)
            if node is None:
                node = self.index.add_dir(parent, comp, complete=False)
            elif not node.is_dir:
                # A key that is both a file and a prefix ("a" and "a/b"): the file is shown, the keys
                # below it are hidden.
                self.skipped_keys += 1
                return
            parent = dirs[dir_rel] = node.ino
        if marker:
            return
        name = parts[-1]
        node = self.index.lookup(parent, name)
        if node is None:
            if not self._deleted(rel):
                self.index.add_file(
                    parent, name, State.REMOTE, o.size, o.etag, o.mtime_ns, gen, self.cache.klass(rel).columns
                )
            return
        if node.is_dir:
            self.skipped_keys += 1
            return
        if node.state in (State.WRITING, State.QUEUED) or self.cache.busy(node.ino) or node.ino in changed:
            self.index.set_object(node.ino, node.state, node.size, node.etag, node.mtime_ns, gen)
            return
        if node.etag != o.etag or node.size != o.size:
            # Replaced behind our back: forget the old copy, serve the new object from now on.
            self.cache.replaced(node.ino, o.size, o.etag, o.mtime_ns, gen)
            self.on_changed(node.ino, None)
            return
        self.index.set_object(node.ino, node.state, node.size, node.etag, node.mtime_ns, gen)

    # -- changes ------------------------------------------------------------------------------------

    async def mkdir(self, parent: int, name: bytes) -> Node:
        check_new_name(name)
        self.cache.index_writable()
        if await self.lookup(parent, name) is not None:
            raise _err(errno.EEXIST, "mkdir")
        # No marker object: the directory exists in the index until keys below it make it real in S3.
        return self.index.add_dir(parent, name, complete=True)

    def create(self, parent: int, name: bytes) -> Node:
        """The row of a new file, WRITING until its first close. Nothing goes to S3 here (no 0-byte
        placeholder): the object appears at close()."""
        check_new_name(name)
        self.dir_node(parent)
        self.cache.index_writable()
        rel = self.relpath_of(parent, name)
        node = self.index.add_file(
            parent,
            name,
            State.WRITING,
            0,
            None,
            time.time_ns(),
            self.index.listing_gen,
            self.cache.klass(rel).columns,
        )
        self.negative.pop(rel, None)
        return node

    def _gone(self, rel: str) -> None:
        if self.listing_active:
            self.index.tombstone(rel)
        self.negative.pop(rel, None)

    async def unlink(self, parent: int, name: bytes) -> None:
        node = await self.lookup(parent, name)
        if node is None:
            raise _err(errno.ENOENT, "unlink")
        if node.is_dir:
            raise _err(errno.EISDIR, "unlink")
        rel = self.index.relpath(node.ino)
        self.cache.index_writable()
        # The row goes and the DELETE is queued, durably, in one commit; no S3 round trip here
        # (Synapse unlinks on its reactor thread). The queue orders the DELETE after an upload of
        # the file still in flight.
        self.cache.unlink(node.ino)
        self._gone(rel)

    async def rmdir(self, parent: int, name: bytes) -> None:
        node = await self.lookup(parent, name)
        if node is None:
            raise _err(errno.ENOENT, "rmdir")
        if not node.is_dir:
            raise _err(errno.ENOTDIR, "rmdir")
        await self.ensure_listed(node.ino)
        if self.index.has_children(node.ino):
            raise _err(errno.ENOTEMPTY, "rmdir")
        rel = self.relpath_of(parent, name)
        # The directory's marker object, if another tool made one ("a/b/", which we show as a
        # directory), must go, or the directory comes back at the next listing. SeaweedFS also
        # keeps the empty directories of deleted objects and lists them as common prefixes until
        # this same DELETE. Deleting a key that does not exist is not an error in S3. Queued, like
        # a file's DELETE (Cache.remove_dir).
        self.cache.index_writable()
        self.cache.remove_dir(node.ino)
        self._gone(rel)

    async def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, noreplace: bool) -> None:
        src = await self.lookup(p_old, n_old)
        if src is None:
            raise _err(errno.ENOENT, "rename")
        self.dir_node(p_new)
        check_new_name(n_new)
        dst = await self.lookup(p_new, n_new)
        if dst is not None and dst.ino == src.ino:
            return
        if dst is not None and noreplace:
            raise _err(errno.EEXIST, "rename")
        if src.is_dir:
            await self._rename_dir(src, dst, p_new, n_new)
            return
        if dst is not None and dst.is_dir:
            raise _err(errno.EISDIR, "rename")
        if dst is not None and self.cache.writer(dst.ino) is not None:
            raise _err(errno.EBUSY, "rename over a file open for writing")
        if self.cache.writer(src.ino) is not None:
            if await self._rename_written(src, p_new, n_new):
                return
            # Its last handle was released while the rename waited for the keys: a plain rename.
            src = self.index.get(src.ino)
            if src is None:
                raise _err(errno.ENOENT, "rename")
        if src.state == State.WRITING:
            # A write whose writer is gone and whose row is not settled yet (a moment at most).
            raise _err(errno.EBUSY, "rename of a file whose write is being settled")
        if src.state == State.QUEUED:
            # Its bytes are not in S3 yet, and a rename is a copy in S3: send them first (rename is
            # not on Synapse's path; it never renames media).
            await self.cache.send_queued(src.ino)
            src = self.index.get(src.ino)
            if src is None or src.state != State.CACHED:
                raise _err(errno.EIO, "rename of a file whose queued upload could not be sent")
        src_rel = self.index.relpath(src.ino)
        dst_rel = self.relpath_of(p_new, n_new)
        src_k, dst_k = self.cache.klass(src_rel), self.cache.klass(dst_rel)
        if src_k.local_only != dst_k.local_only:
            # Between a local-only path and an uploaded one: that is an upload or a download, which
            # mv(1) and shutil.move do themselves on EXDEV.
            raise _err(errno.EXDEV, "rename between local-only and uploaded paths")
        if src_k.local_only or src.state == State.LOCAL:
            # A local-only file, or an empty one (kept in the cache only): no object to copy. An
            # object under the new name must go, or a wiped cache would bring its bytes back.
            if dst is not None and dst.state != State.LOCAL:
                self.cache.index_writable()
                async with self.cache.changing(dst_rel):
                    await self.s3.delete(self.prefix + dst_rel)
                if self.index.get(src.ino) is None:
                    return
            self._move_file_row(src, src_rel, p_new, n_new, dst_rel, dst_k)
            return
        # S3 has no rename: copy then delete. A crash between the two leaves both names in S3 (never
        # neither), and the next listing shows both. Both keys are held: no queued PUT or DELETE
        # of either runs in between, and DELETEs of the new name queued before the copy are moot.
        self.cache.index_writable()
        async with self.cache.changing(src_rel, dst_rel) as mark:
            info = await self.s3.copy(self.prefix + src_rel, self.prefix + dst_rel, src.size)
            await self.s3.delete(self.prefix + src_rel)
            src = self.index.get(src.ino)
            if src is None:
                return
            md5 = self.index.get_md5(src.ino)
            same = info.size == src.size and (
                info.etag == src.etag or (md5 is not None and self.s3.etag_is_md5_of(info.etag, md5) is True)
            )
            if not same:
                # S3 held another version than the index knew (replaced behind our back): the copy
                # is of that one, so the cached copy of the old one must go, or the new name would
                # serve it under the new ETag (which the listing then finds matching) for good.
                log.info("%s was replaced behind our back; renamed as S3 holds it", src_rel)
                self.cache.replaced(src.ino, info.size, info.etag, info.mtime_ns, self.index.listing_gen)
                self.on_changed(src.ino, None)
                src = self.index.get(src.ino)
                if src is None:
                    return
            self._move_file_row(src, src_rel, p_new, n_new, dst_rel, dst_k, info, mark)

    async def _rename_written(self, src: Node, p_new: int, n_new: bytes) -> bool:
        """Rename of a file open for writing (POSIX allows it: `(echo foo; mv f f.new) > f` leaves foo
        in f.new). Returns False if its writer was released meanwhile (the caller renames it as a
        closed file).

        What S3 holds under the old name (the version the write began from, or that a close()
        committed) is copied to the new name, as a plain rename does, and the old name's DELETE
        queued: a crash before the next close then leaves that version under the new name. The
        bytes written since go up at the next close (or at the last release, if no close follows:
        the file may have been closed already and still be mapped). With no version in S3 (a new
        file, or a queued one), the row moves alone, and both names' DELETEs are queued (a PUT drops
        the DELETEs of its key queued before it).

        A close() uploading the file ends first (it holds the key), and one that waited for the old
        name's key finds the new name and starts again (Writes.upload)."""
        src_rel = self.index.relpath(src.ino)
        dst_rel = self.relpath_of(p_new, n_new)
        src_k, dst_k = self.cache.klass(src_rel), self.cache.klass(dst_rel)
        if src_k.local_only != dst_k.local_only:
            raise _err(errno.EXDEV, "rename between local-only and uploaded paths")
        w = self.cache.writer(src.ino)
        if w is None:
            return False
        self.cache.index_writable()
        async with self.cache.changing(src_rel, dst_rel) as mark:
            cur = self.index.get(src.ino)
            if cur is None or self.index.relpath(src.ino) != src_rel:
                raise _err(errno.ENOENT, "rename")
            if self.cache.writer(src.ino) is not w:
                return False
            if w.prev is not None and not src_k.local_only:
                info = await self.s3.copy(self.prefix + src_rel, self.prefix + dst_rel, w.prev[0])
                cur = self.index.get(src.ino)
                if cur is None:
                    # Unlinked during the copy (its DELETE is of the old name): the copy must go too.
                    self.cache.index_write(
                        lambda: self.index.queue_delete(dst_rel, time.time()), durable=True
                    )
                    return True
                self.cache.renamed_while_written(src.ino, info)
                if self.index.queued_upload(src.ino) is not None:
                    # A version queued since the write began (acknowledged by a close, newer than the
                    # copy; perhaps by an async close during the copy): the row keeps its size and
                    # MD5, and the queue sends it under the new name.
                    self._move_file_row(cur, src_rel, p_new, n_new, dst_rel, dst_k, queue_deletes=(src_rel,))
                    return True
                self._move_file_row(
                    cur, src_rel, p_new, n_new, dst_rel, dst_k, info, mark, queue_deletes=(src_rel,)
                )
                return True
            self.cache.renamed_while_written(src.ino)
            deletes = () if src_k.local_only else (src_rel, dst_rel)
            self._move_file_row(cur, src_rel, p_new, n_new, dst_rel, dst_k, queue_deletes=deletes)
        return True

    def _move_file_row(
        self,
        src: Node,
        src_rel: str,
        p_new: int,
        n_new: bytes,
        dst_rel: str,
        klass: Klass,
        info: ObjectInfo | None = None,
        deletes_upto: int | None = None,
        queue_deletes: tuple[str, ...] = (),
    ) -> None:
        """Point the row at its new name (and at `info`, the object now under that name, if given),
        replacing whatever file had that name. The index changes are one transaction, retried on a
        full disk (Cache.index_write); the replaced file's cached copy goes once they are in.
        `queue_deletes`: keys whose DELETE is queued in the same commit, then made durable (the
        rename returns on it, as an unlink does)."""
        replaced = self.index.lookup(p_new, n_new)
        now = time.time()

        def record() -> None:  # index changes only: it may run twice
            self.index.move(src.ino, p_new, n_new)
            self.index.set_class(src.ino, klass.columns)
            if info is not None:
                self.index.set_object(
                    src.ino, src.state, info.size, info.etag, src.mtime_ns, self.index.listing_gen
                )
            if deletes_upto is not None:
                self.index.drop_deletes(dst_rel, deletes_upto)
            for rel in queue_deletes:
                self.index.queue_delete(rel, now)

        durable = bool(queue_deletes)
        if replaced is not None:  # one transaction: the name changes hands
            self.cache.drop(replaced.ino, also=record, durable=durable)
        else:
            self.cache.index_write(record, durable=durable)
        if info is not None:
            self.cache.store.s3_changed(src.ino)
        self._gone(src_rel)
        self.negative.pop(dst_rel, None)

    async def _rename_dir(self, src: Node, dst: Node | None, p_new: int, n_new: bytes) -> None:
        await self.ensure_listed(src.ino)
        if self.index.has_children(src.ino):
            # Renaming a tree would be a copy of every object under it, not atomic and unbounded in
            # time. EXDEV makes mv(1) and shutil.move fall back to copying, which is what it would be.
            raise _err(errno.EXDEV, "rename of a non-empty directory")
        ancestor = p_new
        while ancestor != ROOT_INO:
            if ancestor == src.ino:
                raise _err(errno.EINVAL, "rename of a directory into itself")
            a = self.index.get(ancestor)
            ancestor = a.parent if a else ROOT_INO
        if dst is not None:
            if not dst.is_dir:
                raise _err(errno.ENOTDIR, "rename")
            await self.ensure_listed(dst.ino)
            if self.index.has_children(dst.ino):
                raise _err(errno.ENOTEMPTY, "rename")
            self.index.remove(dst.ino)
        self.index.move(src.ino, p_new, n_new)
