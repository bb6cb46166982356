"""The cache's life: bounded by cap, age and free space, ordered by media class, safe across kill -9.

Real mounts on the SeaweedFS fixture, except the age test, which builds the Cache in-process on a real
S3 server with an injected clock instead of sleeping for days.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from s3cachefs.cache import INLINE_UNLINKS, Cache, Limits
from s3cachefs.cache.space import Space
from s3cachefs.cache.store import Store
from s3cachefs.config import DEFAULT_POLICIES, PathPolicy, S3Options
from s3cachefs.index import ROOT_INO, Index, State, checkpoint
from s3cachefs.s3 import S3

from .harness import (
    HarnessError,
    MakeMount,
    Mount,
    S3Server,
    bucket_objects,
    dir_bytes,
    files_under,
    mount_status,
    wait_until,
)
from .test_mount import store_like_synapse

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1024 * 1024


def cached_copy(m: Mount, rel: str) -> Path:
    """Where the cached bytes of `rel` live (data/XX/<ino>), whether or not they are there now."""
    ino = os.stat(m.path / rel).st_ino
    return m.cache_dir / "data" / f"{ino % 256:02x}" / str(ino)


def data_path(cache_dir: Path, ino: int) -> str:
    return f"{cache_dir}/data/{ino % 256:02x}/{ino}"


def downloads_in_flight(m: Mount) -> bool:
    return any(p.name.startswith("get-") for p in files_under(m.cache_dir / "tmp"))


def test_cache_stays_under_its_cap_while_five_times_the_cap_is_written_and_read(
    make_mount: MakeMount,
) -> None:
    cap = 4 * MiB
    m = make_mount(extra_args=["--cache-size", str(cap)])
    files = {f"local_content/ab/c{i:02d}/file{i:02d}": os.urandom(MiB // 2 + i) for i in range(40)}
    for rel, data in files.items():  # 40 x 0.5 MiB = 5 x the cap
        store_like_synapse(m.path / rel, data)
        assert dir_bytes(m.cache_dir / "data") <= cap
    for rel, data in files.items():  # most of them are cold again by now
        assert (m.path / rel).read_bytes() == data
        # Reads are served while the download streams in; the download then evicts and commits.
        # Measure once it has (its tmp/get-* file is gone), not in the middle of that.
        assert wait_until(lambda: not downloads_in_flight(m), 10)
        assert dir_bytes(m.cache_dir / "data") <= cap
    # Counters reach the index every few seconds. Every file admitted beyond the 8 that fit under
    # the cap (uploads, then downloads of the evicted ones) must have been evicted again.
    assert wait_until(lambda: mount_status(m)["uploads"] == len(files), 15), mount_status(m)
    s = {k: int(str(v)) for k, v in mount_status(m).items() if k in ("uploads", "misses", "evictions")}
    assert s["misses"] >= len(files) - 8, s
    assert s["evictions"] >= s["uploads"] + s["misses"] - 8, s


def test_remote_media_is_evicted_before_local_media(make_mount: MakeMount) -> None:
    m = make_mount(extra_args=["--cache-size", str(4 * MiB)])
    local = [f"local_content/ab/cd/l{i}" for i in range(2)]
    remote = [f"remote_content/example.org/ab/cd/r{i}" for i in range(2)]
    for rel in local + remote:  # exactly the cap; the remote files are the most recently used
        store_like_synapse(m.path / rel, os.urandom(MiB))
    assert all(cached_copy(m, rel).exists() for rel in local + remote)
    store_like_synapse(m.path / "local_content/ab/cd/l2", os.urandom(MiB))
    # One more MiB, and 1.4 MiB to free (down to 90% of the cap): both remote files go, though
    # the local ones are older.
    assert all(cached_copy(m, rel).exists() for rel in [*local, "local_content/ab/cd/l2"])
    assert not any(cached_copy(m, rel).exists() for rel in remote)
    # Still readable: evicted means "fetch again", never "lost".
    assert all(len((m.path / rel).read_bytes()) == MiB for rel in remote)


def test_an_open_file_being_read_slowly_is_never_evicted(make_mount: MakeMount) -> None:
    m = make_mount(extra_args=["--cache-size", str(3 * MiB)])
    data = os.urandom(MiB)
    store_like_synapse(m.path / "local_content/aa/aa/slow", data)
    with open(m.path / "local_content/aa/aa/slow", "rb") as f:
        got = f.read(16 * 1024)
        for i in range(12):  # 12 MiB of new media while the reader dawdles
            store_like_synapse(m.path / f"local_content/bb/bb/other{i}", os.urandom(MiB))
            assert cached_copy(m, "local_content/aa/aa/slow").exists()
            got += f.read(64 * 1024)
        got += f.read()
    assert got == data
    # Released: now it may go like any other file.
    store_like_synapse(m.path / "local_content/bb/bb/last", os.urandom(MiB))
    assert dir_bytes(m.cache_dir / "data") <= 3 * MiB


def test_url_cache_files_never_reach_the_bucket_and_survive_a_remount(
    make_mount: MakeMount, s3: S3Client
) -> None:
    m = make_mount(extra_args=["--cache-size", str(2 * MiB)])
    preview = "url_cache/2026-11-21/abcdefghijklmnop"
    thumb = "url_cache_thumbnails/2026-11-21/abcdefghijklmnop/32-32-image-png-crop"
    store_like_synapse(m.path / preview, b"<html>preview</html>")
    store_like_synapse(m.path / thumb, b"thumbnail")
    store_like_synapse(m.path / "local_content/ab/cd/x", os.urandom(MiB))
    # Over the cap: S3-backed files go, local-only files are not the cap's to take.
    for i in range(3):
        store_like_synapse(m.path / f"local_content/ab/cd/y{i}", os.urandom(MiB))
    assert set(bucket_objects(s3, m.bucket)) == {"local_content/ab/cd/x"} | {
        f"local_content/ab/cd/y{i}" for i in range(3)
    }
    m.unmount()
    m.start()
    assert (m.path / preview).read_bytes() == b"<html>preview</html>"
    assert (m.path / thumb).read_bytes() == b"thumbnail"
    assert mount_status(m)["local_only_files"] == 2
    os.remove(m.path / preview)  # Synapse's URL-cache expiry
    assert not (m.path / preview).exists()


def test_cache_keeps_the_free_space_floor(make_mount: MakeMount, tmp_path: Path) -> None:
    small = tmp_path / "small-fs"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(small)], check=True)
    try:
        m = make_mount(
            cache_dir=small / "cache", extra_args=["--cache-size", "1G", "--cache-min-free", "12M"]
        )
        for i in range(20):  # 20 MiB through a 24 MiB filesystem that must keep 12 MiB free
            store_like_synapse(m.path / f"local_content/ab/cd/f{i}", os.urandom(MiB))
            st = os.statvfs(small)
            assert st.f_bavail * st.f_frsize >= 10 * MiB  # the floor, less one file in flight
        m.unmount()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def in_process_cache(s3server: S3Server, bucket: str, root: Path, clock: Callable[[], float]) -> Cache:
    """The Cache as mount.py builds it, without the mount: 10 MiB cap, 30-day age limit."""
    limiter = trio.CapacityLimiter(4)
    s3 = S3(
        s3server.options(bucket),
        limiter,
    )
    index = Index(root / "index.sqlite")
    limits = Limits(cap=10 * MiB, default_max_age=30 * 86400, policies=DEFAULT_POLICIES)
    cache = Cache(root, index, s3, "", limits, limiter, clock=clock)
    cache.recover()
    return cache


def test_age_eviction_follows_the_clock_not_the_calendar(s3server: S3Server, tmp_path: Path) -> None:
    bucket = s3server.new_bucket()
    client = s3server.client()
    for name in ("old", "recent"):
        client.put_object(Bucket=bucket, Key=f"local_content/ab/cd/{name}", Body=name.encode() * 1000)
    now = [1_000_000.0]

    async def scenario() -> None:
        cache = in_process_cache(s3server, bucket, tmp_path, lambda: now[0])
        index = cache.index
        parent = ROOT_INO
        for comp in (b"local_content", b"ab", b"cd"):
            parent = index.add_dir(parent, comp, complete=True).ino
        inos = {}
        for name in ("old", "recent"):
            rel = f"local_content/ab/cd/{name}"
            node = index.add_file(
                parent,
                name.encode(),
                State.REMOTE,
                3000 if name == "old" else 6000,
                None,
                0,
                0,
                cache.klass(rel).columns,
                atime=int(now[0]),
            )
            os.close(await cache.fetch(node.ino))
            inos[name] = node.ino
        now[0] += 20 * 86400
        cache.touch(inos["recent"])  # read 20 days later
        now[0] += 15 * 86400  # "old" is now 35 days unused, "recent" 15
        assert cache.evict_aged() == 1
        old, recent = index.get(inos["old"]), index.get(inos["recent"])
        assert (
            old is not None and old.state == State.REMOTE and not os.path.exists(cache.data_path(inos["old"]))
        )
        assert (
            recent is not None
            and recent.state == State.CACHED
            and os.path.exists(cache.data_path(inos["recent"]))
        )
        index.close()

    trio.run(scenario)


def test_a_crash_between_evicting_rows_and_removing_their_files_serves_no_stale_bytes_and_leaves_no_garbage(
    s3server: S3Server, tmp_path: Path
) -> None:
    bucket = s3server.new_bucket()
    client = s3server.client()
    n = INLINE_UNLINKS + 8  # more than a pass removes itself: the rest is the reaper's
    objects = {f"local_content/ab/cd/f{i:02d}": os.urandom(1000 + i) for i in range(n)}
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    now = [1_000_000.0]
    inos: dict[str, int] = {}

    async def first_run() -> None:
        cache = in_process_cache(s3server, bucket, tmp_path, lambda: now[0])
        index = cache.index
        parent = ROOT_INO
        for comp in (b"local_content", b"ab", b"cd"):
            parent = index.add_dir(parent, comp, complete=True).ino
        for key, body in objects.items():
            klass = cache.klass(key).columns
            name = key.rsplit("/", 1)[1].encode()
            node = index.add_file(parent, name, State.REMOTE, len(body), None, 0, 0, klass, int(now[0]))
            os.close(await cache.fetch(node.ino))
            inos[key] = node.ino
        # A mount's reaper would remove the rest of the files; this process dies before it gets to.
        cache.evictor.reaper_running = True
        now[0] += 40 * 86400
        assert cache.evict_aged() == n
        index.close()  # kill -9 here: rows committed REMOTE, some data files still in data/

    trio.run(first_run)
    left = {key: p for key, ino in inos.items() if os.path.exists(p := data_path(tmp_path, ino))}
    assert len(left) == n - INLINE_UNLINKS, "the scenario needs files that outlived their rows"
    for p in left.values():  # same length, other bytes: serving one would be caught below
        Path(p).write_bytes(os.urandom(os.path.getsize(p)))
    (tmp_path / "trash" / "0badf00d-1").write_bytes(b"moved to trash/ by the dead process, never unlinked")
    reread = next(iter(left))

    async def second_run() -> None:
        cache = in_process_cache(s3server, bucket, tmp_path, lambda: now[0])
        index = cache.index
        assert {getattr(index.get(ino), "state", None) for ino in inos.values()} == {State.REMOTE}
        # Read before the reaper ran: fetched from S3 again, and the download replaced the leftover.
        fd = await cache.fetch(inos[reread])
        try:
            assert os.pread(fd, 10_000, 0) == objects[reread]
        finally:
            os.close(fd)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run_reaper)
            with trio.fail_after(30):
                await cache.wait_reaped()
            nursery.cancel_scope.cancel()
        assert os.listdir(tmp_path / "trash") == []
        assert index.doomed(100) == []
        kept = {key for key, ino in inos.items() if os.path.exists(data_path(tmp_path, ino))}
        assert kept == {reread}, "the re-fetched copy stays, every leftover of an evicted row went"
        node = index.get(inos[reread])
        assert node is not None and node.state == State.CACHED
        assert Path(data_path(tmp_path, inos[reread])).read_bytes() == objects[reread]
        index.close()

    trio.run(second_run)


def test_commits_leave_the_index_checkpoint_to_a_worker_thread_while_the_cache_runs(tmp_path: Path) -> None:
    # SQLite's automatic checkpoint copies the WAL into the database file inside a commit, i.e. on
    # the event loop: tens of milliseconds without an answer to any FUSE request. While the cache
    # runs, commits skip it and a worker thread does it (Space.run_checkpoints).
    index = Index(tmp_path / "index.sqlite")
    space = Space(Store(tmp_path, index, ""))
    checkpoint(index.path)  # the schema into the database file

    def rows_in_the_database_file() -> int:
        """Rows a checkpoint has copied: the database file alone, without its WAL."""
        copy = tmp_path / "copy.sqlite"
        shutil.copyfile(index.path, copy)
        db = sqlite3.connect(copy)
        try:
            return int(db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]) - 1  # the root's row
        finally:
            db.close()
            for p in tmp_path.glob("copy.sqlite*"):
                p.unlink()

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(space.run_checkpoints, trio.CapacityLimiter(1))
            # No await from here to the assert: the checkpoint task cannot run in between.
            for i in range(3000):
                with index.transaction():
                    index.add_file(ROOT_INO, f"f{i}".encode(), State.REMOTE, 1, "e", 1, 0)
            wal = os.stat(f"{index.path}-wal").st_size
            assert wal > 1000 * 4096, "past the size at which a commit would checkpoint"
            assert rows_in_the_database_file() == 0, "a commit checkpointed on the event loop"
            with trio.move_on_after(20):
                while rows_in_the_database_file() < 3000:
                    await trio.sleep(0.1)
            assert rows_in_the_database_file() == 3000, "the worker thread checkpointed everything"
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    # Stopped: commits checkpoint on their own again (SQLite's default of 1,000 pages).
    assert index.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    index.close()


def test_a_policy_change_gives_every_file_the_class_of_its_path(tmp_path: Path) -> None:
    paths = [
        "top-level-file",
        "url_cache/2026-11-21/a",
        "url_cache_thumbnails/2026-11-21/a/32-32-image-png-crop",
        "local_content/ab/cd/x",
        "local_content/abc/d/y",
        "local_content/zz/q",
        "remote_content/example.org/ab/cd/r",
        "scratch/deep/er/still/s",
        "scratchpad/t",
        "other/u",
    ]
    limiter = trio.CapacityLimiter(1)
    s3 = S3(S3Options(bucket="unused", region_name="us-east-1"), limiter)  # no request is made
    index = Index(tmp_path / "index.sqlite")
    dirs: dict[str, int] = {"": ROOT_INO}
    for rel in paths:
        *comps, name = rel.split("/")
        for i in range(len(comps)):
            d = "/".join(comps[: i + 1])
            if d not in dirs:
                dirs[d] = index.add_dir(dirs["/".join(comps[:i])], comps[i].encode(), complete=True).ino
        index.add_file(dirs["/".join(comps)], name.encode(), State.REMOTE, 1, "e", 0, 0)
    changed = (
        # Prefixes that reach into a directory ("local_content/ab" matches ab/ but also abc/), or
        # end inside a name ("scratch" matches scratch/ and scratchpad/), or match one file.
        PathPolicy("local_content/ab", evict_rank=5, max_age=60.0),
        PathPolicy("scratch", local_only=True, evict_rank=3),
        PathPolicy("scratch/deep/", evict_rank=4, max_age=1.0),
        PathPolicy("top-level-file", evict_rank=6),
    )
    for policies, age in ((DEFAULT_POLICIES, 30 * 86400.0), (changed, None), (DEFAULT_POLICIES, None)):
        cache = Cache(
            tmp_path, index, s3, "", Limits(cap=MiB, default_max_age=age, policies=policies), limiter
        )
        cache.recover()
        got = {}
        for ino, rel in index.walk_files():
            node = index.db.execute("SELECT rank, max_age FROM nodes WHERE ino=?", (ino,)).fetchone()
            got[rel] = tuple(node)
        assert got == {rel: cache.klass(rel).columns for rel in paths}, policies
    index.close()


def test_a_damaged_cached_copy_is_dropped_and_fetched_again(make_mount: MakeMount) -> None:
    m = make_mount()
    data = os.urandom(256 * 1024)
    store_like_synapse(m.path / "local_content/ab/cd/x", data)
    copy = cached_copy(m, "local_content/ab/cd/x")
    m.unmount()
    with open(copy, "r+b") as f:  # same length, one byte different: a size check cannot see it
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    m.start()
    assert (m.path / "local_content/ab/cd/x").read_bytes() == data
    assert wait_until(lambda: mount_status(m)["damaged_refetched"] == 1, 15), mount_status(m)


def test_kill_9_during_an_upload_leaves_the_object_whole_or_absent(
    make_mount: MakeMount, s3: S3Client
) -> None:
    m = make_mount()
    rel = "local_content/ab/cd/big"
    data = os.urandom(48 * MiB)
    outcome: list[BaseException | None] = []

    def writer() -> None:
        try:
            store_like_synapse(m.path / rel, data, chunk=4 * MiB)
            outcome.append(None)
        except BaseException as e:  # the daemon dies under us: ENOTCONN or similar
            outcome.append(e)

    t = threading.Thread(target=writer)
    t.start()
    staging = m.cache_dir / "tmp"
    # Kill once every byte is written, i.e. while close() is uploading.
    assert wait_until(lambda: any(p.stat().st_size == len(data) for p in files_under(staging)), 60)
    m.kill()
    t.join(60)
    in_bucket = bucket_objects(s3, m.bucket)
    assert in_bucket.get(rel, data) == data, "never a partial object"
    assert s3.list_objects_v2(Bucket=m.bucket)["KeyCount"] <= 1
    if outcome and outcome[0] is None:
        assert rel in in_bucket, "close() returned success, so the object must be there"
    m.start()
    assert not list(files_under(staging)), "staging files from the crash are gone"
    path = m.path / rel
    if rel in in_bucket:
        assert path.read_bytes() == data
    else:
        assert not path.exists()


def test_kill_9_during_a_download_then_remount_serves_whole_bytes(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    rel = "remote_content/example.org/ab/cd/big"
    data = os.urandom(48 * MiB)
    s3.put_object(Bucket=bucket, Key=rel, Body=data)
    m = make_mount(bucket=bucket)

    def reader() -> None:
        with contextlib.suppress(OSError):  # the daemon is killed under it
            (m.path / rel).read_bytes()

    t = threading.Thread(target=reader)
    t.start()
    assert wait_until(lambda: any(p.stat().st_size > 0 for p in files_under(m.cache_dir / "tmp")), 60)
    m.kill()
    t.join(60)
    m.start()
    assert (m.path / rel).read_bytes() == data
    # Readers are served as bytes arrive; the verified copy is committed to the cache just after.
    copy = cached_copy(m, rel)
    assert wait_until(copy.exists, 30) and copy.stat().st_size == len(data)


def test_status_shows_a_running_mount_and_its_cache(make_mount: MakeMount) -> None:
    m = make_mount(extra_args=["--cache-size", "64M"])
    store_like_synapse(m.path / "local_content/ab/cd/x", os.urandom(100_000))
    (m.path / "local_content/ab/cd/x").read_bytes()
    assert wait_until(lambda: mount_status(m)["uploads"] == 1, 15), "counters are saved every few seconds"
    s = mount_status(m)
    assert s["pid"] == (m.proc.pid if m.proc else None)
    assert (s["cap_bytes"], s["cached_files"], s["cached_bytes"]) == (64 * MiB, 1, 100_000)
    assert s["pending_upload_files"] == 0
    m.unmount()
    s = mount_status(
        Mount(m.server, m.bucket, m.cache_dir, m.cache_dir, m.log_path)
    )  # by cache dir, no daemon
    assert s["pid"] is None and s["cached_files"] == 1


def test_an_empty_file_never_has_a_placeholder_and_the_last_close_puts_the_data(
    mounted: Mount, s3: S3Client
) -> None:
    path = mounted.path / "local_content/ab/cd/x"
    path.parent.mkdir(parents=True)
    # Nothing at create() (no placeholder), nothing while two descriptors of the file are open for
    # writing, and what the last close() sees is what S3 ends with.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    assert bucket_objects(s3, mounted.bucket) == {}
    other = os.open(path, os.O_WRONLY)
    os.close(fd)  # another descriptor is still open for writing: it settles the file
    assert bucket_objects(s3, mounted.bucket) == {}
    os.write(other, b"content")
    os.close(other)
    assert bucket_objects(s3, mounted.bucket) == {"local_content/ab/cd/x": b"content"}


def test_a_dup_or_inherited_descriptor_still_open_keeps_an_empty_file_from_being_put(
    mounted: Mount, s3: S3Client
) -> None:
    # FUSE sends FLUSH at every close() with the one handle all dup()s and fork()ed copies share;
    # `cmd > file` closes the shell's first descriptor before cmd writes. Nothing is put until the
    # data is there (no empty object in between), and the last close of an empty file still puts one.
    path = mounted.path / "local_content/ab/cd/dup"
    path.parent.mkdir(parents=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    copy = os.dup(fd)
    try:
        os.close(fd)
        assert bucket_objects(s3, mounted.bucket) == {}
        os.write(copy, b"data")
    finally:
        os.close(copy)
    assert bucket_objects(s3, mounted.bucket) == {"local_content/ab/cd/dup": b"data"}

    # Held by a child process (inherited): the parent's close leaves it to the child's exit.
    inherited = mounted.path / "local_content/ab/cd/inherited"
    fd = os.open(inherited, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    child = subprocess.Popen(["sleep", "30"], pass_fds=[fd])
    try:
        os.close(fd)
        assert "local_content/ab/cd/inherited" not in bucket_objects(s3, mounted.bucket)
    finally:
        child.kill()
        child.wait(10)
    assert wait_until(
        lambda: bucket_objects(s3, mounted.bucket).get("local_content/ab/cd/inherited") == b"", 10
    ), "the child's exit was the last close of an empty file: a 0-byte object"


def test_a_shell_redirect_puts_the_commands_output_and_never_an_empty_object(
    mounted: Mount, s3: S3Client
) -> None:
    path = mounted.path / "local_content/ab/cd/redirect"
    path.parent.mkdir(parents=True)
    key = "local_content/ab/cd/redirect"
    # As a shell runs `cmd > file`: the file opened, handed to the command as its stdout, and the
    # first descriptor closed (FLUSH with the file empty) before the command has written anything.
    with open(path, "wb") as out:
        shell = subprocess.Popen(["sh", "-c", 'read line; echo "$line"', "sh"], stdin=subprocess.PIPE,
                                 stdout=out)  # fmt: skip
    assert shell.stdin is not None
    try:
        assert key not in bucket_objects(s3, mounted.bucket)
        shell.stdin.write(b"from the shell\n")
        shell.stdin.close()
        assert shell.wait(30) == 0
    finally:
        shell.kill()
    assert bucket_objects(s3, mounted.bucket)[key] == b"from the shell\n"


def test_a_file_empty_at_its_last_close_is_a_real_0_byte_object(mounted: Mount, s3: S3Client) -> None:
    # Synapse accepts and serves a 0-byte upload; once the cache is lost, only S3 can serve it.
    empty = mounted.path / "local_content/ab/cd/empty"
    store_like_synapse(empty, b"")
    assert empty.exists() and empty.stat().st_size == 0
    full = mounted.path / "local_content/ab/cd/full"
    store_like_synapse(full, b"bytes")
    with open(full, "wb"):
        pass  # emptied: the close puts the 0-byte version over the old one, before it returns
    assert bucket_objects(s3, mounted.bucket) == {
        "local_content/ab/cd/empty": b"",
        "local_content/ab/cd/full": b"",
    }
    mounted.unmount()
    mounted.wipe_cache()
    mounted.start()
    assert empty.read_bytes() == b"" and full.read_bytes() == b""


def test_a_policy_from_the_config_file_replaces_the_defaults(
    make_mount: MakeMount, s3: S3Client, tmp_path: Path
) -> None:
    conf = tmp_path / "s3cachefs.toml"
    conf.write_text('[[cache_policy]]\nprefix = "scratch/"\nlocal_only = true\n')
    m = make_mount(extra_args=["--config", str(conf)])
    store_like_synapse(m.path / "scratch/a", b"local")
    store_like_synapse(m.path / "url_cache/2026-11-21/x", b"uploaded now: the defaults were replaced")
    assert set(bucket_objects(s3, m.bucket)) == {"url_cache/2026-11-21/x"}


def flip_byte(path: Path, off: int) -> None:
    """Same length, one byte different: a size check cannot see it."""
    with open(path, "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_write_open_of_a_damaged_cached_copy_uploads_the_objects_bytes_not_the_damage(
    make_mount: MakeMount, s3: S3Client
) -> None:
    m = make_mount()
    rel = "local_content/ab/cd/orig"
    data = os.urandom(256 * 1024)
    store_like_synapse(m.path / rel, data)
    copy = cached_copy(m, rel)
    m.unmount()
    flip_byte(copy, 1000)
    m.start()
    # An update in place (no O_TRUNC) builds on the cached copy: the rest must be the object's bytes.
    with open(m.path / rel, "r+b") as f:
        f.write(b"HEAD")
    expected = b"HEAD" + data[4:]
    assert bucket_objects(s3, m.bucket)[rel] == expected
    assert (m.path / rel).read_bytes() == expected
    assert mount_status(m)["damaged_refetched"] == 1


def test_directories_left_in_the_cache_directorys_tmp_and_trash_do_not_stop_the_mount(
    make_mount: MakeMount,
) -> None:
    m = make_mount()
    rel = "local_content/ab/cd/orig"
    data = os.urandom(4096)
    store_like_synapse(m.path / rel, data)
    m.unmount()
    for d in ("tmp", "trash", "keep"):
        (m.cache_dir / d / "junk").mkdir()
    m.start()
    # The reaper empties trash/ right after the mount: a crash there came within a moment.
    assert wait_until(lambda: "cannot remove" in m.log_text() and "trash/junk" in m.log_text(), 10)
    assert m.running, m.log_tail(30)
    assert (m.path / rel).read_bytes() == data
    store_like_synapse(m.path / "local_content/ab/cd/new", b"n" * 100)
    assert m.running and "Traceback" not in m.log_text(), m.log_tail(30)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_index_is_refused_at_mount_with_a_message_and_exit_code_2(
    make_mount: MakeMount, damage: str
) -> None:
    m = make_mount()
    store_like_synapse(m.path / "local_content/ab/cd/orig", os.urandom(4096))
    m.unmount()
    idx = m.cache_dir / "index.sqlite"
    if damage == "garbage":
        idx.write_bytes(os.urandom(idx.stat().st_size))
    else:
        with open(idx, "r+b") as f:
            f.truncate(idx.stat().st_size // 2)
    with pytest.raises(HarnessError, match="exited with code 2"):
        m.start()
    log = m.log_text()
    assert "index (index.sqlite) cannot be used" in log and "move the cache directory aside" in log, log
    assert "Traceback" not in log, log


def test_kill_9_after_renaming_a_file_open_for_writing_keeps_its_acknowledged_bytes(
    make_mount: MakeMount, s3: S3Client
) -> None:
    """An original in S3 (its close returned) is opened again, appended to and renamed, and the
    daemon is killed before the close: the version S3 had moved with the name, as a rename of a
    closed file does; the append was never acknowledged."""
    m = make_mount()
    old, new = "local_content/ab/cd/before", "local_content/ab/cd/after"
    data = os.urandom(100_000)
    store_like_synapse(m.path / old, data)
    f = open(m.path / old, "r+b")  # noqa: SIM115 - left open across the crash
    try:
        f.seek(0, os.SEEK_END)
        f.write(b"more")
        f.flush()
        os.rename(m.path / old, m.path / new)
        m.kill()
    finally:
        with contextlib.suppress(OSError):
            f.close()
    m.start()
    assert wait_until(lambda: mount_status(m)["queued_deletes"] == 0, 30), mount_status(m)
    assert bucket_objects(s3, m.bucket) == {new: data}
    assert (m.path / new).read_bytes() == data
    assert not (m.path / old).exists()


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_a_data_file_replaced_by_a_fifo_directory_or_symlink_is_fetched_again_without_blocking_the_mount(
    make_mount: MakeMount, tmp_path: Path, kind: str
) -> None:
    m = make_mount()
    victim, other = m.path / "local_content/ab/cd/victim", m.path / "local_content/ab/cd/other"
    store_like_synapse(victim, b"victim bytes")
    store_like_synapse(other, b"other bytes")
    copy = cached_copy(m, "local_content/ab/cd/victim")
    m.unmount()
    copy.unlink()
    if kind == "fifo":
        os.mkfifo(copy, 0o600)  # a plain open() of it would wait for a writer, for ever
    elif kind == "directory":
        copy.mkdir(0o700)
    else:
        (tmp_path / "elsewhere").write_bytes(b"XXXXXX bytes")  # same length
        copy.symlink_to(tmp_path / "elsewhere")
    m.start()
    reader = subprocess.Popen(["cat", str(victim)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        out, _ = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
            if kind == "fifo":  # let a stuck daemon go on, so that the test's teardown can unmount
                fd = os.open(copy, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
    assert out == b"victim bytes"
    assert other.read_bytes() == b"other bytes"
    assert "cached copy of local_content/ab/cd/victim" in m.log_text()
    assert m.running
