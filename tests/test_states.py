"""Every edge of the cache state machine (s3cachefs/cache/states.py), in process on a real index and a
real cache directory: each transition keeps the row, the cached-bytes count, the data file, the
`doomed` table and the content version in step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from s3cachefs.cache import states
from s3cachefs.cache.store import Store, Writer
from s3cachefs.index import ROOT_INO, Index, Node, State

MD5 = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    index = Index(tmp_path / "index.sqlite")
    return Store(tmp_path, index, "")


def new_file(store: Store, name: str, state: State, size: int, etag: str | None = "e1") -> Node:
    node = store.index.add_file(ROOT_INO, name.encode(), state, size, etag, 1, 0)
    if state in (State.CACHED, State.LOCAL):
        with open(store.data_path(node.ino), "wb") as f:
            f.write(b"x" * size)
        store.cached_bytes += size  # as the Store found it at start-up (index.cached_bytes())
    return node


def row(store: Store, ino: int) -> Node:
    node = store.index.get(ino)
    assert node is not None
    return node


def consistent(store: Store) -> None:
    """The count is the index's own sum of CACHED and LOCAL rows."""
    assert store.cached_bytes == store.index.cached_bytes()


def test_a_download_makes_a_remote_file_cached_and_counts_its_bytes(store: Store) -> None:
    node = new_file(store, "a", State.REMOTE, 10)
    states.cached(store, states.transaction(store), node.ino, 10, "e1", 5, MD5)
    assert row(store, node.ino).state == State.CACHED
    assert store.index.get_md5(node.ino) == MD5
    assert node.ino in store.verified
    assert store.cached_bytes == 10
    consistent(store)


def test_a_write_uncounts_a_cached_file_and_changes_nothing_for_a_remote_one(store: Store) -> None:
    cached = new_file(store, "c", State.CACHED, 7)
    remote = new_file(store, "r", State.REMOTE, 9)
    states.writing(store, cached.ino)
    states.writing(store, remote.ino)
    states.writing(store, cached.ino)  # already WRITING: counted once
    assert row(store, cached.ino).state == State.WRITING
    assert row(store, remote.ino).state == State.WRITING
    assert store.cached_bytes == 0
    consistent(store)


def test_an_upload_makes_a_written_file_cached_and_a_local_only_close_makes_it_local(store: Store) -> None:
    a = new_file(store, "a", State.WRITING, 0, etag=None)
    b = new_file(store, "b", State.WRITING, 0, etag=None)
    states.cached(store, states.direct, a.ino, 4, "e2", 5, MD5)
    states.local(store, states.direct, b.ino, 6, 5, MD5)
    assert (row(store, a.ino).state, row(store, a.ino).etag) == (State.CACHED, "e2")
    assert (row(store, b.ino).state, row(store, b.ino).etag) == (State.LOCAL, None)
    assert store.cached_bytes == 10
    consistent(store)


@pytest.mark.parametrize("intact", [False, True])
def test_a_failed_write_goes_back_to_the_version_s3_holds(store: Store, intact: bool) -> None:
    node = new_file(store, "a", State.WRITING, 3)
    before = store.content_version(node.ino)
    removed = states.reverted(store, states.direct, node.ino, (3, "e1"), copy_intact=intact)
    assert not removed
    assert row(store, node.ino).state == (State.CACHED if intact else State.REMOTE)
    assert store.cached_bytes == (3 if intact else 0)
    assert store.content_version(node.ino) != before, "read handles opened after an fsync must drop it"
    consistent(store)


def test_a_failed_first_write_removes_the_row(store: Store) -> None:
    node = new_file(store, "a", State.WRITING, 0, etag=None)
    assert states.reverted(store, states.direct, node.ino, None, copy_intact=False)
    assert store.index.get(node.ino) is None
    consistent(store)


def test_a_lost_copy_demotes_a_cached_file_and_removes_a_local_one(store: Store) -> None:
    cached = new_file(store, "c", State.CACHED, 5)
    local = new_file(store, "l", State.LOCAL, 8)
    states.demoted(store, cached.ino)
    states.demoted(store, local.ino)
    states.demoted(store, cached.ino)  # REMOTE already: nothing more to uncount
    assert row(store, cached.ino).state == State.REMOTE
    assert store.index.get(local.ino) is None
    assert store.cached_bytes == 0
    consistent(store)


def test_an_object_replaced_behind_our_back_drops_the_copy_and_changes_the_version(store: Store) -> None:
    node = new_file(store, "a", State.CACHED, 5)
    before = store.content_version(node.ino)
    states.replaced(store, node.ino, 12, "e9", 77, 3)
    now = row(store, node.ino)
    assert (now.state, now.size, now.etag, now.mtime_ns) == (State.REMOTE, 12, "e9", 77)
    assert not os.path.exists(store.data_path(node.ino))
    assert store.content_version(node.ino) != before
    consistent(store)


def test_a_dropped_file_leaves_index_count_and_disk_and_its_writer_knows(store: Store) -> None:
    node = new_file(store, "a", State.CACHED, 5)
    other = new_file(store, "b", State.REMOTE, 1)
    w = store.writers[node.ino] = Writer(node.ino, "/nonexistent", -1, None)
    states.dropped(store, states.direct, node.ino, also=lambda: store.index.move(other.ino, ROOT_INO, b"a"))
    assert store.index.get(node.ino) is None
    assert store.index.lookup(ROOT_INO, b"a") == row(store, other.ino), "the rename committed with it"
    assert not os.path.exists(store.data_path(node.ino))
    assert w.unlinked
    consistent(store)


def test_eviction_makes_cached_rows_remote_removes_local_ones_and_dooms_their_files(store: Store) -> None:
    cached = new_file(store, "c", State.CACHED, 5)
    local = new_file(store, "l", State.LOCAL, 8)
    states.evicted(store, [(cached.ino, 5, State.CACHED), (local.ino, 8, State.LOCAL)])
    assert row(store, cached.ino).state == State.REMOTE
    assert store.index.get(local.ino) is None
    assert sorted(ino for ino, _ in store.index.doomed(-1)) == sorted([cached.ino, local.ino])
    assert store.stats["evictions"] == 2
    assert store.cached_bytes == 0
    consistent(store)


def test_at_mount_an_unfinished_write_goes_back_to_s3_or_away(store: Store) -> None:
    old = new_file(store, "old", State.WRITING, 4, etag="e1")
    new = new_file(store, "new", State.WRITING, 0, etag=None)
    busy = new_file(store, "busy", State.WRITING, 0, etag=None)
    store.starting[busy.ino] = trio.Event()  # a write beginning in this process is not an orphan
    states.orphaned(store)
    assert row(store, old.ino).state == State.REMOTE
    assert store.index.get(new.ino) is None
    assert row(store, busy.ino).state == State.WRITING
    consistent(store)


def test_an_async_close_queues_the_upload_and_its_sending_makes_the_file_cached(store: Store) -> None:
    node = new_file(store, "a", State.REMOTE, 4, etag="old")
    states.writing(store, node.ino)
    states.queued(store, states.direct, node.ino, 9, 5, MD5)
    assert row(store, node.ino).state == State.QUEUED
    entry = store.index.queued_upload(node.ino)
    assert entry is not None and entry[1] == (4, "old"), "the queue entry keeps the version S3 still holds"
    assert (store.cached_bytes, store.queued_bytes) == (9, 9)
    store.index.queue_delete("a", 1.0)  # an older DELETE of the same key
    states.sent(store, states.direct, node.ino, "new", store.index.last_delete_id())
    now = row(store, node.ino)
    assert (now.state, now.etag) == (State.CACHED, "new")
    assert store.index.queued_upload(node.ino) is None
    assert not store.index.delete_pending("a"), "the PUT made the older DELETE moot"
    assert (store.cached_bytes, store.queued_bytes) == (9, 0)
    consistent(store)


def test_a_failed_write_of_a_queued_file_goes_back_to_the_queued_version(store: Store) -> None:
    node = new_file(store, "a", State.WRITING, 0, etag=None)
    states.queued(store, states.direct, node.ino, 7, 5, MD5)
    states.writing(store, node.ino)  # written again
    assert (store.cached_bytes, store.queued_bytes) == (0, 0)
    assert store.index.queued_upload(node.ino) is not None, "the entry stays while it is written"
    states.requeued(store, states.direct, node.ino, 7)
    assert row(store, node.ino).state == State.QUEUED
    assert (store.cached_bytes, store.queued_bytes) == (7, 7)
    consistent(store)


def test_a_queued_file_whose_bytes_are_lost_goes_back_to_what_s3_holds(store: Store) -> None:
    kept = new_file(store, "kept", State.REMOTE, 4, etag="old")
    states.writing(store, kept.ino)
    states.queued(store, states.direct, kept.ino, 9, 5, MD5)
    fresh = new_file(store, "fresh", State.WRITING, 0, etag=None)
    states.queued(store, states.direct, fresh.ino, 3, 5, MD5)
    states.demoted(store, kept.ino)
    states.demoted(store, fresh.ino)
    now = row(store, kept.ino)
    assert (now.state, now.size, now.etag) == (State.REMOTE, 4, "old")
    assert store.index.get(fresh.ino) is None, "nothing in S3 to go back to"
    assert (store.cached_bytes, store.queued_bytes) == (0, 0)
    consistent(store)


def test_a_file_renamed_while_written_has_no_s3_version_until_its_next_close(store: Store) -> None:
    node = new_file(store, "a", State.CACHED, 6, etag="e1")
    states.unsent(store, node.ino)
    now = row(store, node.ino)
    assert (now.state, now.etag) == (State.WRITING, None)
    consistent(store)
