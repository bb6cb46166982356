"""The persistent namespace and cache index (SQLite, in the cache directory).

One row per file or directory. The inode number is the row id, so inode numbers are stable for the
life of the entry and across restarts (shutil.rmtree compares lstat and fstat inode numbers).

All calls are synchronous on purpose (as in s3ql): code between two `await`s is atomic under trio, so
the index needs no lock. Whoever adds an `await` between reading a row and writing it back must
re-check that the row is still what it read.

Directories carry a `complete` flag: once a directory's children were listed from S3 (or it was made
by us), the index is authoritative for it, and a lookup miss there is a plain ENOENT with no S3
request. Files carry the cache state (see cache.py for the state machine) and `seen`, the number of
the last full listing that saw the object (used to drop entries for objects deleted behind our back).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sqlite3
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

log = logging.getLogger(__name__)

ROOT_INO = 1
NAME_MAX = 255


class State(IntEnum):
    """Cache state of a file row (directories are always DIR)."""

    DIR = 0
    REMOTE = 1  # in S3; no trusted local copy
    CACHED = 2  # in S3, and data/<ino> is a complete, verified copy of exactly that object
    WRITING = 3  # being written; size/etag describe the S3 version (if any) until the upload commits
    LOCAL = 4  # complete in data/<ino>, never uploaded (a local-only path such as url_cache/)
    # complete and durable in data/<ino>, its upload queued (a path whose policy is upload = "async");
    # never evicted; S3 may still hold an older version (upload_queue.prev_*)
    QUEUED = 5


# States whose bytes are in data/<ino> and count against the cache cap.
IN_CACHE = (State.CACHED, State.LOCAL, State.QUEUED)


@dataclass(frozen=True)
class Node:
    ino: int
    parent: int
    name: bytes
    state: State
    size: int
    etag: str | None
    mtime_ns: int
    atime: int
    complete: bool

    @property
    def is_dir(self) -> bool:
        return self.state == State.DIR


_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes(
    ino INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    state INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    etag TEXT,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    atime INTEGER NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 0,
    seen INTEGER NOT NULL DEFAULT 0,
    rank INTEGER NOT NULL DEFAULT 1,
    max_age INTEGER,
    md5 TEXT,
    UNIQUE(parent, name)
);
CREATE INDEX IF NOT EXISTS nodes_state ON nodes(state);
-- Partial indexes over cached files only: eviction order, and expiry time for the age limit.
-- Both are walked from their start, so an eviction pass never scans the whole table.
CREATE INDEX IF NOT EXISTS nodes_evict ON nodes(rank, atime) WHERE state IN (2, 4);
CREATE INDEX IF NOT EXISTS nodes_expiry ON nodes(atime + max_age) WHERE state IN (2, 4) AND max_age IS NOT NULL;
-- Rows that left the cache (evicted) whose data file may still be in data/: written in the same
-- transaction as the row change, deleted once the file is out of data/ (Cache.run_reaper). What a crash
-- leaves here is finished at the next mount.
CREATE TABLE IF NOT EXISTS doomed(ino INTEGER PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tombstones(relpath BLOB PRIMARY KEY);
-- The uploads of QUEUED rows, oldest first, and the S3 version each row had before (to go back to if
-- its bytes are lost before they are sent). Committed durably with the row (cache/queue.py).
CREATE TABLE IF NOT EXISTS upload_queue(
    ino INTEGER PRIMARY KEY, queued_at REAL NOT NULL, prev_size INTEGER, prev_etag TEXT
);
-- S3 DELETEs of unlinked files and removed directories' markers (relpath + "/"), not yet done: the
-- name stays deleted (a listing or a lookup never brings it back) until the DELETE is done. A PUT of
-- the same key that succeeds removes the entries queued before it (cache/queue.py).
CREATE TABLE IF NOT EXISTS delete_queue(
    id INTEGER PRIMARY KEY AUTOINCREMENT, relpath BLOB NOT NULL, queued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS delete_queue_relpath ON delete_queue(relpath);
"""

_COLS = "ino, parent, name, state, size, etag, mtime_ns, atime, complete"
_ADDED_COLUMNS = (("rank", "INTEGER NOT NULL DEFAULT 1"), ("max_age", "INTEGER"), ("md5", "TEXT"))


def _node(row: tuple[int, int, bytes, int, int, str | None, int, int, int]) -> Node:
    return Node(row[0], row[1], bytes(row[2]), State(row[3]), row[4], row[5], row[6], row[7], bool(row[8]))


def _chunks(values: list[int], n: int = 500) -> Iterator[list[int]]:
    """Slices short enough for one `IN (?, ...)` each."""
    for i in range(0, len(values), n):
        yield values[i : i + n]


def check_new_name(name: bytes) -> None:
    """A name the mount may create: it becomes part of an object key, which S3 requires to be UTF-8."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name longer than 255 bytes")
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        raise OSError(errno.EILSEQ, "S3 keys must be UTF-8; this name is not") from None


def split_key_path(relpath: str) -> list[bytes] | None:
    """Components of a relative path taken from an object key, or None if it cannot be shown safely.

    Keys that would need '.'/'..', empty components (from '//' or a leading '/'), names longer than
    NAME_MAX bytes or NUL bytes are hidden rather than mangled: mangling could make two keys collide or
    let a path escape the mount.
    """
    if not relpath or relpath.endswith("/"):
        return None
    parts = [p.encode("utf-8", "surrogateescape") for p in relpath.split("/")]
    for p in parts:
        if p in (b"", b".", b"..") or len(p) > NAME_MAX or b"\0" in p:
            return None
    return parts


class Index:
    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        # The number of the full listing in progress (or of the last one): rows committed now count
        # as seen by it (column `seen`), so that it does not drop them as deleted behind our back.
        self.listing_gen = 0
        if readonly:
            # For `s3cachefs status`: reads beside a running daemon (WAL allows that), changes nothing.
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            return
        # isolation_level=None: we manage transactions ourselves (BEGIN for the batched listing).
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power loss may forget the last transactions but never corrupts the file.
        # Nothing we lose that way can cause wrong bytes: CACHED is only ever set after the data file
        # was verified and renamed (not fsynced: its length and MD5 are checked at its first read
        # after a mount), and a forgotten row is found again by the next listing. What an
        # acknowledged close() or unlink() rests on without S3 (a queued upload or DELETE) is
        # committed with synchronous=FULL (transaction(durable=True)).
        self.db.execute("PRAGMA synchronous=NORMAL")
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(nodes)")}
        if cols:  # an index made by an earlier version: add the columns it lacks
            self.db.execute("DROP INDEX IF EXISTS nodes_lru")
            for col, ddl in _ADDED_COLUMNS:
                if col not in cols:
                    self.db.execute(f"ALTER TABLE nodes ADD COLUMN {col} {ddl}")
        self.db.executescript(_SCHEMA)
        now = int(time.time())
        self.db.execute(
            "INSERT OR IGNORE INTO nodes(ino, parent, name, state, mtime_ns, complete) VALUES (?, 0, x'', ?, ?, 0)",
            (ROOT_INO, int(State.DIR), now * 10**9),
        )
        # New rows take numbers above every number this process has handed out, never SQLite's
        # default (max + 1), which gives a deleted newest file's number to the next file: the
        # kernel, still holding the old inode (generation 0), would serve its cached attributes and
        # pages for the new file. Across mounts reuse is harmless: the kernel starts afresh.
        self._last_ino = self.max_ino()
        self.listing_gen = int(self.get_meta("listed_gen") or 0)

    def close(self) -> None:
        self.db.close()

    # -- meta -----------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def probe_writable(self) -> None:
        """Raise sqlite3.OperationalError ("database or disk is full") now if the index cannot take a
        write, before the caller changes S3 in a way the index must then record."""
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('probe', ?)", (str(time.time_ns()),))

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- lookups --------------------------------------------------------------------------------------

    def get(self, ino: int) -> Node | None:
        row = self.db.execute(f"SELECT {_COLS} FROM nodes WHERE ino=?", (ino,)).fetchone()
        return None if row is None else _node(row)

    def lookup(self, parent: int, name: bytes) -> Node | None:
        row = self.db.execute(
            f"SELECT {_COLS} FROM nodes WHERE parent=? AND name=?", (parent, name)
        ).fetchone()
        return None if row is None else _node(row)

    def children(self, parent: int, after_ino: int = 0, limit: int = 1000) -> list[Node]:
        rows = self.db.execute(
            f"SELECT {_COLS} FROM nodes WHERE parent=? AND ino>? ORDER BY ino LIMIT ?",
            (parent, after_ino, limit),
        ).fetchall()
        return [_node(r) for r in rows]

    def has_children(self, parent: int) -> bool:
        return self.db.execute("SELECT 1 FROM nodes WHERE parent=? LIMIT 1", (parent,)).fetchone() is not None

    def relpath(self, ino: int) -> str:
        """Path relative to the mount root, as used in object keys ('' for the root)."""
        parts: list[bytes] = []
        while ino != ROOT_INO:
            row = self.db.execute("SELECT parent, name FROM nodes WHERE ino=?", (ino,)).fetchone()
            if row is None:
                raise KeyError(ino)
            parts.append(bytes(row[1]))
            ino = row[0]
        return b"/".join(reversed(parts)).decode("utf-8", "surrogateescape")

    # -- changes --------------------------------------------------------------------------------------

    def _new_ino(self) -> int:
        self._last_ino += 1
        return self._last_ino

    def add_dir(self, parent: int, name: bytes, complete: bool) -> Node:
        now = time.time_ns()
        ino = self._new_ino()
        self.db.execute(
            "INSERT INTO nodes(ino, parent, name, state, mtime_ns, complete) VALUES (?, ?, ?, ?, ?, ?)",
            (ino, parent, name, int(State.DIR), now, int(complete)),
        )
        return Node(ino, parent, name, State.DIR, 0, None, now, 0, complete)

    def add_file(
        self,
        parent: int,
        name: bytes,
        state: State,
        size: int,
        etag: str | None,
        mtime_ns: int,
        seen: int,
        klass: tuple[int, int | None] = (1, None),
        atime: int | None = None,
    ) -> Node:
        """klass: (eviction rank, max age in seconds or None) from the path's cache policy."""
        ino = self._new_ino()
        self.db.execute(
            "INSERT INTO nodes(ino, parent, name, state, size, etag, mtime_ns, atime, seen, rank, max_age)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ino,
                parent,
                name,
                int(state),
                size,
                etag,
                mtime_ns,
                int(time.time()) if atime is None else atime,
                seen,
                klass[0],
                klass[1],
            ),
        )
        return self.get(ino)  # type: ignore[return-value]

    def set_state(self, ino: int, state: State) -> None:
        self.db.execute("UPDATE nodes SET state=? WHERE ino=?", (int(state), ino))

    def set_object(
        self, ino: int, state: State, size: int, etag: str | None, mtime_ns: int, seen: int
    ) -> None:
        self.db.execute(
            "UPDATE nodes SET state=?, size=?, etag=?, mtime_ns=?, seen=? WHERE ino=?",
            (int(state), size, etag, mtime_ns, seen, ino),
        )

    def set_mtime(self, ino: int, mtime_ns: int) -> None:
        self.db.execute("UPDATE nodes SET mtime_ns=? WHERE ino=?", (mtime_ns, ino))

    def set_complete(self, ino: int) -> None:
        self.db.execute("UPDATE nodes SET complete=1 WHERE ino=?", (ino,))

    def touch(self, ino: int, now: int) -> None:
        self.db.execute("UPDATE nodes SET atime=? WHERE ino=?", (now, ino))

    def move(self, ino: int, parent: int, name: bytes) -> None:
        self.db.execute("UPDATE nodes SET parent=?, name=? WHERE ino=?", (parent, name, ino))

    def set_md5(self, ino: int, md5: str | None) -> None:
        """MD5 of the bytes in data/<ino>, checked the first time they are read after a mount."""
        self.db.execute("UPDATE nodes SET md5=? WHERE ino=?", (md5, ino))

    def get_md5(self, ino: int) -> str | None:
        row = self.db.execute("SELECT md5 FROM nodes WHERE ino=?", (ino,)).fetchone()
        return None if row is None else row[0]

    def set_class(self, ino: int, klass: tuple[int, int | None]) -> None:
        self.db.execute("UPDATE nodes SET rank=?, max_age=? WHERE ino=?", (klass[0], klass[1], ino))

    def entries(self, parent: int) -> list[tuple[int, bytes, State, int, int | None]]:
        """(ino, name, state, rank, max_age) of the entries of one directory."""
        q = "SELECT ino, name, state, rank, max_age FROM nodes WHERE parent=?"
        return [(r[0], bytes(r[1]), State(r[2]), r[3], r[4]) for r in self.db.execute(q, (parent,))]

    def max_ino(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(ino), 0) FROM nodes").fetchone()[0])

    def dir_parents(self) -> Iterator[tuple[int, int]]:
        """(ino, parent) of every directory."""
        q = "SELECT ino, parent FROM nodes WHERE state=?"
        yield from self.db.execute(q, (int(State.DIR),))

    def set_class_by_parent(self, klass_of: Callable[[int], tuple[int, int | None] | None]) -> int:
        """Set (rank, max_age) of every file to klass_of(its parent directory), in two statements (a
        scan of the table each); files for which it gives None are left alone, and only values that
        change are written. Returns how many values changed (a row can count twice).

        Two statements rather than one: SQLite rewrites the index entries of every column a row's
        UPDATE sets, changed or not, so a new age limit alone would move every cached row in the
        eviction index too (3.4 s instead of 5.6 s for 1M rows)."""

        def rank_of(parent: int, rank: int) -> int:
            k = klass_of(parent)
            return rank if k is None else k[0]

        def max_age_of(parent: int, max_age: int | None) -> int | None:
            k = klass_of(parent)
            return max_age if k is None else k[1]

        self.db.create_function("s3c_rank", 2, rank_of, deterministic=True)
        self.db.create_function("s3c_max_age", 2, max_age_of, deterministic=True)
        before = self.db.total_changes
        try:
            for col in ("rank", "max_age"):
                self.db.execute(
                    f"UPDATE nodes SET {col} = s3c_{col}(parent, {col})"
                    f" WHERE state != 0 AND {col} IS NOT s3c_{col}(parent, {col})"
                )
        finally:
            self.db.create_function("s3c_rank", 2, None)
            self.db.create_function("s3c_max_age", 2, None)
        return self.db.total_changes - before

    def touch_many(self, atimes: dict[int, int]) -> None:
        self.db.executemany("UPDATE nodes SET atime=? WHERE ino=?", [(t, i) for i, t in atimes.items()])

    def walk_files(self) -> Iterator[tuple[int, str]]:
        """(ino, relpath) of every file, depth first, without holding the whole tree in memory."""
        stack: list[tuple[int, str]] = [(ROOT_INO, "")]
        while stack:
            parent, base = stack.pop()
            for ino, name, state in self.db.execute(
                "SELECT ino, name, state FROM nodes WHERE parent=?", (parent,)
            ).fetchall():
                rel = base + bytes(name).decode("utf-8", "surrogateescape")
                if state == State.DIR:
                    stack.append((ino, rel + "/"))
                else:
                    yield ino, rel

    def remove(self, ino: int) -> None:
        self.db.execute("DELETE FROM nodes WHERE ino=?", (ino,))

    # -- cache accounting -----------------------------------------------------------------------------

    def cached_bytes(self) -> int:
        row = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM nodes WHERE state IN (2, 4, 5)").fetchone()
        return int(row[0])

    def cached_files(self) -> int:
        row = self.db.execute("SELECT COUNT(*) FROM nodes WHERE state IN (2, 4, 5)").fetchone()
        return int(row[0])

    def queued_bytes(self) -> int:
        row = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM nodes WHERE state=5").fetchone()
        return int(row[0])

    def cache_summary(self) -> dict[str, int]:
        """Counts for `s3cachefs status`: files and bytes per state."""
        out: dict[str, int] = {}
        for state, n, size in self.db.execute(
            "SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM nodes WHERE state != 0 GROUP BY state"
        ):
            name = State(state).name.lower()
            out[f"{name}_files"] = n
            out[f"{name}_bytes"] = size
        return out

    def eviction_candidates(self) -> Generator[tuple[int, int, State], None, None]:
        """(ino, size, state) of files in the cache, lowest rank first, then least recently used: one
        cursor, read as far as the caller goes. Close the iterator (or read it to the end) before
        changing the index."""
        q = "SELECT ino, size, state FROM nodes INDEXED BY nodes_evict WHERE state IN (2, 4) ORDER BY rank, atime"
        yield from self._rows(q, ())

    def expired(self, now: int) -> Generator[tuple[int, int, State], None, None]:
        """(ino, size, state) of files in the cache not used within their max age, soonest due first."""
        q = (
            "SELECT ino, size, state FROM nodes INDEXED BY nodes_expiry WHERE state IN (2, 4) AND max_age IS NOT NULL"
            " AND atime + max_age < ? ORDER BY atime + max_age"
        )
        yield from self._rows(q, (now,))

    def _rows(self, q: str, args: tuple[object, ...]) -> Generator[tuple[int, int, State], None, None]:
        cur = self.db.execute(q, args)
        try:
            while rows := cur.fetchmany(1024):
                for r in rows:
                    yield r[0], r[1], State(r[2])
        finally:
            cur.close()

    def evict(self, victims: list[tuple[int, int, State]]) -> None:
        """Eviction of many rows at once: CACHED ones become REMOTE, LOCAL ones (no other copy) are
        removed, and all are entered in `doomed`, whose data files Cache removes afterwards. The caller
        holds a transaction, so the rows and their `doomed` entries change together.

        One prepared statement per kind of change, stepped over the rows in inode order: the rows
        are then visited in table order, so consecutive ones share pages. (Measured on 30k rows of a
        1M-row index: 0.31 s, against 0.39-0.46 s for UPDATE ... WHERE ino IN (500 values) or
        json_each(), and 0.9 s for the same UPDATEs in eviction order.)"""
        ordered = sorted(victims)
        self.db.executemany(
            f"UPDATE nodes SET state={int(State.REMOTE)} WHERE ino=?",
            [(ino,) for ino, _, state in ordered if state != State.LOCAL],
        )
        self.db.executemany(
            "DELETE FROM nodes WHERE ino=?", [(ino,) for ino, _, state in ordered if state == State.LOCAL]
        )
        self.db.executemany(
            "INSERT OR REPLACE INTO doomed(ino, size) VALUES (?, ?)",
            [(ino, size) for ino, size, _ in ordered],
        )

    def doomed(self, limit: int, after: int = 0) -> list[tuple[int, int]]:
        """(ino, size) of evicted rows whose data file may still be in data/, by inode number."""
        q = "SELECT ino, size FROM doomed WHERE ino > ? ORDER BY ino LIMIT ?"
        return [(r[0], r[1]) for r in self.db.execute(q, (after, limit))]

    def doomed_bytes(self) -> int:
        return int(self.db.execute("SELECT COALESCE(SUM(size), 0) FROM doomed").fetchone()[0])

    def undoom(self, inos: list[int]) -> None:
        for chunk in _chunks(inos):
            self.db.execute(f"DELETE FROM doomed WHERE ino IN ({','.join('?' * len(chunk))})", chunk)

    def states(self, inos: list[int]) -> dict[int, State]:
        """State of each of these rows that exists."""
        out: dict[int, State] = {}
        for chunk in _chunks(inos):
            q = f"SELECT ino, state FROM nodes WHERE ino IN ({','.join('?' * len(chunk))})"
            out.update((r[0], State(r[1])) for r in self.db.execute(q, chunk))
        return out

    def writing(self) -> list[Node]:
        rows = self.db.execute(f"SELECT {_COLS} FROM nodes WHERE state=?", (int(State.WRITING),)).fetchall()
        return [_node(r) for r in rows]

    # -- reconciling with a listing ---------------------------------------------------------------

    def tombstone(self, relpath: str) -> None:
        """Remember a delete made while a listing runs, so a page fetched before it cannot revive it."""
        self.db.execute(
            "INSERT OR IGNORE INTO tombstones(relpath) VALUES (?)",
            (relpath.encode("utf-8", "surrogateescape"),),
        )

    def is_tombstoned(self, relpath: str) -> bool:
        q = "SELECT 1 FROM tombstones WHERE relpath=?"
        return self.db.execute(q, (relpath.encode("utf-8", "surrogateescape"),)).fetchone() is not None

    def clear_tombstones(self) -> None:
        self.db.execute("DELETE FROM tombstones")

    # -- the queues (cache/queue.py) ------------------------------------------------------------------

    def queue_upload(self, ino: int, prev: tuple[int, str] | None, now: float) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO upload_queue(ino, queued_at, prev_size, prev_etag) VALUES (?, ?, ?, ?)",
            (ino, now, *(prev if prev else (None, None))),
        )

    def unqueue_upload(self, ino: int) -> None:
        self.db.execute("DELETE FROM upload_queue WHERE ino=?", (ino,))

    def queued_upload(self, ino: int) -> tuple[float, tuple[int, str] | None] | None:
        """(queued at, the S3 version before) of a queued upload, or None."""
        r = self.db.execute(
            "SELECT queued_at, prev_size, prev_etag FROM upload_queue WHERE ino=?", (ino,)
        ).fetchone()
        if r is None:
            return None
        return r[0], ((r[1], r[2]) if r[2] is not None else None)

    def upload_queue(self, limit: int) -> list[int]:
        """Inodes of queued uploads, oldest first."""
        q = "SELECT ino FROM upload_queue ORDER BY queued_at LIMIT ?"
        return [r[0] for r in self.db.execute(q, (limit,))]

    def queue_delete(self, relpath: str, now: float) -> None:
        self.db.execute(
            "INSERT INTO delete_queue(relpath, queued_at) VALUES (?, ?)",
            (relpath.encode("utf-8", "surrogateescape"), now),
        )

    def delete_queue(self, limit: int) -> list[tuple[int, str]]:
        """(id, relpath) of queued DELETEs, oldest first."""
        q = "SELECT id, relpath FROM delete_queue ORDER BY id LIMIT ?"
        return [(r[0], bytes(r[1]).decode("utf-8", "surrogateescape")) for r in self.db.execute(q, (limit,))]

    def last_delete_id(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM delete_queue").fetchone()[0])

    def delete_relpath(self, delete_id: int) -> str | None:
        r = self.db.execute("SELECT relpath FROM delete_queue WHERE id=?", (delete_id,)).fetchone()
        return None if r is None else bytes(r[0]).decode("utf-8", "surrogateescape")

    def has_delete(self, delete_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM delete_queue WHERE id=?", (delete_id,)).fetchone() is not None

    def drop_deletes(self, relpath: str, upto: int) -> None:
        """A PUT of relpath succeeded: the DELETEs queued before it began have nothing left to do."""
        q = "DELETE FROM delete_queue WHERE relpath=? AND id<=?"
        self.db.execute(q, (relpath.encode("utf-8", "surrogateescape"), upto))

    def delete_done(self, delete_id: int) -> None:
        self.db.execute("DELETE FROM delete_queue WHERE id=?", (delete_id,))

    def delete_pending(self, relpath: str) -> bool:
        q = "SELECT 1 FROM delete_queue WHERE relpath=? LIMIT 1"
        return self.db.execute(q, (relpath.encode("utf-8", "surrogateescape"),)).fetchone() is not None

    def queue_summary(self, now: float) -> dict[str, float]:
        """For `s3cachefs status`: queued uploads (files, bytes, age of the oldest) and DELETEs."""
        up = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(n.size), 0), MIN(q.queued_at) FROM upload_queue q JOIN nodes n USING (ino)"
        ).fetchone()
        de = self.db.execute("SELECT COUNT(*), MIN(queued_at) FROM delete_queue").fetchone()
        return {
            "queued_uploads": up[0],
            "queued_upload_bytes": up[1],
            "oldest_queued_upload_age": round(now - up[2], 1) if up[2] is not None else 0.0,
            "queued_deletes": de[0],
            "oldest_queued_delete_age": round(now - de[1], 1) if de[1] is not None else 0.0,
        }

    def queue_heads(self) -> tuple[int, float | None, int, float | None]:
        """For the metrics, once a second: (queued uploads, queued_at of the oldest, queued DELETEs,
        queued_at of the oldest). Cheap while the queues are short, as they are but for a burst."""
        up = self.db.execute("SELECT COUNT(*), MIN(queued_at) FROM upload_queue").fetchone()
        # Ids grow with time: the first row is the oldest (no scan for the MIN).
        n = self.db.execute("SELECT COUNT(*) FROM delete_queue").fetchone()[0]
        first = self.db.execute("SELECT queued_at FROM delete_queue ORDER BY id LIMIT 1").fetchone()
        return int(up[0]), up[1], int(n), first[0] if first else None

    def stale_files(self, gen: int, lo: int = 0, hi: int | None = None) -> list[Node]:
        """Files in S3 (REMOTE, CACHED) the listing `gen` did not see, with lo < ino <= hi (a range
        of the primary key, so that a caller can take a large table a slice at a time)."""
        q = f"SELECT {_COLS} FROM nodes WHERE ino>? AND ino<=? AND state IN (?, ?) AND seen<?"
        top = self._last_ino if hi is None else hi
        return [_node(r) for r in self.db.execute(q, (lo, top, int(State.REMOTE), int(State.CACHED), gen))]

    def mark_dirs_complete(self, lo: int = 0, hi: int | None = None) -> None:
        """Directories with lo < ino <= hi are complete: the listing saw every key below them."""
        top = self._last_ino if hi is None else hi
        self.db.execute(
            "UPDATE nodes SET complete=1 WHERE ino>? AND ino<=? AND state=? AND complete=0",
            (lo, top, int(State.DIR)),
        )

    def suspend_checkpoints(self) -> None:
        """No automatic checkpoint at commit until resume_checkpoints(): checkpoint(path) runs in a
        worker thread instead (cache/space.py run_checkpoints says why)."""
        self.db.execute("PRAGMA wal_autocheckpoint=0")

    def resume_checkpoints(self) -> None:
        self.db.execute("PRAGMA wal_autocheckpoint=1000")  # SQLite's default

    def changes(self) -> int:
        """Rows changed through this connection since it opened (whether a checkpoint is due)."""
        return self.db.total_changes

    @contextlib.contextmanager
    def transaction(self, atomic: bool = False, durable: bool = False) -> Iterator[None]:
        """One transaction for many small writes (an eviction pass: one commit, not one per file).
        Joins a transaction that is already open. atomic: all or nothing, rolled back if anything
        fails (e.g. the disk is full); otherwise what was done before the failure is committed.
        durable: the commit is on disk when this returns (synchronous=FULL syncs the WAL at commit;
        NORMAL, the default, may lose the last commits on power loss): for what an acknowledged
        close() or unlink() rests on, such as a queued upload or a queued DELETE."""
        if self.db.in_transaction:
            assert not durable, "a durable commit cannot join a transaction that is already open"
            yield
            return
        if durable:
            self.db.execute("PRAGMA synchronous=FULL")
        try:
            self.db.execute("BEGIN")
            try:
                yield
            except BaseException:
                if atomic and self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            finally:
                if self.db.in_transaction:
                    self.db.execute("COMMIT")
        finally:
            if durable:
                self.db.execute("PRAGMA synchronous=NORMAL")

    def begin(self) -> None:
        self.db.execute("BEGIN")

    def commit(self) -> None:
        self.db.execute("COMMIT")


def count_files(path: Path) -> tuple[int, int]:
    """Worker thread: (files, bytes) of the whole table, on a read-only connection of its own (WAL
    lets it read beside the daemon's writes): a scan of every row, kept off the event loop."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        row = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM nodes WHERE state!=?", (int(State.DIR),)
        ).fetchone()
        return int(row[0]), int(row[1])
    finally:
        db.close()


def checkpoint(path: Path) -> None:
    """Worker thread: copy the WAL's pages into the database file, on a connection of its own.
    PASSIVE: it waits for no lock, so the daemon's connection reads and writes on meanwhile."""
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        db.close()
