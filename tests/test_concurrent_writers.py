"""Several descriptors, from several processes, writing one file at once: every acknowledged write
survives, in S3, in the mount and after a remount (as on a local disk)."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .harness import MakeMount, Mount, S3Server, bucket_objects, libc_mapping, queues_empty, wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1024 * 1024
KiB = 1024


@pytest.mark.parametrize("cached", [False, True], ids=["cold", "cached"])
def test_concurrent_writers_without_truncate_all_keep_their_bytes(
    make_mount: MakeMount, s3: S3Client, cached: bool
) -> None:
    # Ten `dd conv=notrunc` processes open one existing 25 MiB file at the same moment, each zeroing
    # its own 16 KiB. Every open has to copy the file into a staging file first (a download when
    # cold, a local copy when cached); all ten must end up sharing it, so that every range they
    # wrote and were told was written is in the final object.
    m = make_mount()
    key = "local_content/ab/cd/shared"
    size = 25 * MiB
    data = bytearray(random.Random(1).randbytes(size))
    os.makedirs(m.path / "local_content/ab/cd")
    (m.path / key).write_bytes(data)
    if not cached:
        m.unmount()
        m.wipe_cache()
        m.start()
    else:
        assert (m.path / key).read_bytes() == data  # in the cache, checked once

    rng = random.Random(2)
    blocks = rng.sample(range(size // (16 * KiB)), 10)  # ten distinct, non-overlapping 16 KiB blocks
    dd = ["dd", "if=/dev/zero", f"of={m.path / key}", "count=16", "bs=1024", "conv=notrunc", "status=none"]
    procs = [subprocess.Popen([*dd, f"seek={b * 16}"], stderr=subprocess.PIPE) for b in blocks]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else b"") for p in procs]
    assert all(code == 0 for code, _ in results), results
    for b in blocks:
        data[b * 16 * KiB : (b + 1) * 16 * KiB] = bytes(16 * KiB)

    assert s3.get_object(Bucket=m.bucket, Key=key)["Body"].read() == data, "S3 lost a write"
    assert (m.path / key).read_bytes() == data, "the mount lost a write"
    m.unmount()
    m.start()
    assert (m.path / key).read_bytes() == data, "a write was lost after the remount"
    assert "unexpected error" not in m.log_text()


def test_unlink_during_the_first_upload_leaves_no_object_and_no_file(
    make_mount: MakeMount, own_s3server: S3Server
) -> None:
    # A new 12 MiB file is closed while S3 hangs; `rm` of it returns at once (its DELETE is queued,
    # ordered after the upload, which completes once S3 is back). The DELETE must then remove that
    # first version: the bucket and the mount end without the file, also after a remount.
    m = make_mount(server=own_s3server)
    path = m.path / "local_content/ab/cd/new"
    path.parent.mkdir(parents=True)
    f = open(path, "wb")  # noqa: SIM115 (closed by another thread)
    f.write(os.urandom(12 * MiB))
    f.flush()
    own_s3server.pause()
    results: dict[str, BaseException | None] = {}

    def run(name: str, fn: Callable[[], object]) -> threading.Thread:
        def target() -> None:
            try:
                fn()
                results[name] = None
            except BaseException as e:
                results[name] = e

        t = threading.Thread(target=target)
        t.start()
        return t

    try:
        closer = run("close", f.close)
        assert not wait_until(lambda: not closer.is_alive(), 1.0), "close() must wait for the hung S3"
        remover = run("rm", lambda: os.unlink(path))
        remover.join(30)
        assert not remover.is_alive(), "rm waited for S3 (Synapse's reactor would have too)"
        assert not path.exists()
    finally:
        own_s3server.resume()
    closer.join(120)
    assert results == {"close": None, "rm": None}, results
    client = own_s3server.client()
    assert wait_until(lambda: bucket_objects(client, m.bucket) == {}, 30), (
        "the first upload's object was left"
    )
    assert not path.exists()
    m.unmount()
    m.start()
    assert not path.exists(), "the file came back after a remount"


def test_a_file_renamed_while_open_for_writing_keeps_its_bytes_under_the_new_name(
    mounted: Mount, s3: S3Client
) -> None:
    # POSIX allows it, and shells do it: `(echo foo; mv f f.new) > f` leaves foo in f.new.
    d = mounted.path / "local_content/ab/cd"
    d.mkdir(parents=True)
    subprocess.run(["bash", "-c", "(echo foo; mv f f.new) > f"], cwd=d, check=True, timeout=60)
    assert sorted(os.listdir(d)) == ["f.new"]
    assert (d / "f.new").read_bytes() == b"foo\n"
    # A file S3 already holds, appended to and renamed before its close: the whole file goes up under
    # the new name, and the old name's object goes.
    (d / "old").write_bytes(b"0123456789")
    with open(d / "old", "ab") as f:
        f.write(b"abc")
        f.flush()
        os.rename(d / "old", d / "renamed")
        f.write(b"def")
    assert (d / "renamed").read_bytes() == b"0123456789abcdef"
    assert wait_until(lambda: queues_empty(mounted), 30)
    assert bucket_objects(s3, mounted.bucket) == {
        "local_content/ab/cd/f.new": b"foo\n",
        "local_content/ab/cd/renamed": b"0123456789abcdef",
    }
    mounted.unmount()
    mounted.wipe_cache()
    mounted.start()
    assert sorted(os.listdir(d)) == ["f.new", "renamed"]
    assert (d / "renamed").read_bytes() == b"0123456789abcdef"


def run_in_thread(
    results: dict[str, BaseException | None], name: str, fn: Callable[[], object]
) -> threading.Thread:
    def target() -> None:
        try:
            fn()
            results[name] = None
        except BaseException as e:
            results[name] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def close_while_s3_hangs_and(
    make_mount: MakeMount, server: S3Server, name: str, other: Callable[[Path], object]
) -> tuple[Mount, Path, bytes]:
    """On a new mount, write 3 MiB to local_content/ab/cd/<name> and close it while S3 hangs (the
    close's PUT waits), and meanwhile run `other(that directory)` in another thread (it may wait for
    the file's key); both succeed once S3 is back. Returns the mount, the directory and the bytes."""
    m = make_mount(server=server)
    d = m.path / "local_content/ab/cd"
    d.mkdir(parents=True)
    data = os.urandom(3 * MiB)
    f = open(d / name, "wb")  # noqa: SIM115 (closed by another thread)
    f.write(data)
    f.flush()
    results: dict[str, BaseException | None] = {}
    server.pause()
    try:
        closer = run_in_thread(results, "close", f.close)
        assert not wait_until(lambda: not closer.is_alive(), 1.0), "close() must wait for the hung S3"
        other_thread = run_in_thread(results, "other", lambda: other(d))
        time.sleep(1.0)
    finally:
        server.resume()
    closer.join(120)
    other_thread.join(120)
    assert results == {"close": None, "other": None}, results
    return m, d, data


def test_rename_during_the_close_of_a_written_file_keeps_it_under_the_new_name(
    make_mount: MakeMount, own_s3server: S3Server
) -> None:
    # Whatever the order of the close's PUT and the rename (which waits for the key), the file must
    # end under the new name with its bytes (as on a local disk): in the mount, in S3, after a
    # remount.
    m, d, data = close_while_s3_hangs_and(
        make_mount, own_s3server, "old", lambda d: os.rename(d / "old", d / "new")
    )
    client = own_s3server.client()
    # Bounded: the last release (after close() returned) may still be settling the file.
    assert wait_until(lambda: bucket_objects(client, m.bucket) == {"local_content/ab/cd/new": data}, 30), (
        sorted(bucket_objects(client, m.bucket))
    )
    assert wait_until(lambda: queues_empty(m), 30)
    assert sorted(os.listdir(d)) == ["new"]
    m.unmount()
    m.start()
    assert sorted(os.listdir(d)) == ["new"]
    assert (d / "new").read_bytes() == data
    assert bucket_objects(client, m.bucket) == {"local_content/ab/cd/new": data}


def test_truncate_path_during_the_close_of_a_written_file_is_kept(
    make_mount: MakeMount, own_s3server: S3Server
) -> None:
    # As above, with truncate(path, 1000): it returned success after the close began, so the file
    # must end as its first 1000 bytes (mount, S3, remount), not be put back to the whole.
    m, d, data = close_while_s3_hangs_and(make_mount, own_s3server, "f", lambda d: os.truncate(d / "f", 1000))
    client = own_s3server.client()
    assert wait_until(
        lambda: bucket_objects(client, m.bucket).get("local_content/ab/cd/f") == data[:1000], 30
    ), f"S3 holds {len(bucket_objects(client, m.bucket).get('local_content/ab/cd/f', b''))} bytes"
    assert (d / "f").read_bytes() == data[:1000]
    m.unmount()
    m.start()
    assert (d / "f").read_bytes() == data[:1000]


def test_rename_of_a_closed_but_still_mapped_thumbnail_keeps_it(mounted: Mount, s3: S3Client) -> None:
    # A thumbnail (upload = "async") is written and closed (acknowledged: durable and queued), while
    # a read-only mapping keeps the file's last reference. Renamed in between, it must end under the
    # new name, in the mount, in S3 and after a remount.
    d = mounted.path / "local_thumbnails/ab/cd/efgh"
    d.mkdir(parents=True)
    data = os.urandom(100_000)
    fd = os.open(d / "32-32-image-png-crop", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    with libc_mapping(fd, len(data)):
        os.close(fd)  # FLUSH: committed (queued)
        os.rename(d / "32-32-image-png-crop", d / "64-64-image-png-crop")
    # munmap: RELEASE
    new = "local_thumbnails/ab/cd/efgh/64-64-image-png-crop"
    assert wait_until(lambda: bucket_objects(s3, mounted.bucket) == {new: data}, 30), sorted(
        bucket_objects(s3, mounted.bucket)
    )
    assert wait_until(lambda: queues_empty(mounted), 30)
    assert sorted(os.listdir(d)) == ["64-64-image-png-crop"]
    mounted.unmount()
    mounted.start()
    assert sorted(os.listdir(d)) == ["64-64-image-png-crop"]
    assert (d / "64-64-image-png-crop").read_bytes() == data


def test_rename_that_waits_for_the_key_while_the_writer_closes_keeps_the_file(
    make_mount: MakeMount, own_s3server: S3Server
) -> None:
    # The file "old" is open for writing, its bytes already in S3 (fsync). A rename old -> new
    # starts while the key "new" is held by a queued DELETE that S3 is slow to answer (an earlier
    # file "new" was unlinked). Meanwhile the writer closes (nothing left to upload: close returns at
    # once, and its last release settles the file). Once S3 answers, the rename goes on. The file
    # must end under "new" with its bytes, in the mount, in S3, and after a remount.
    m = make_mount(server=own_s3server)
    d = m.path / "local_content/ab/cd"
    d.mkdir(parents=True)
    (d / "new").write_bytes(b"an earlier file")
    data = os.urandom(1 * MiB)
    f = open(d / "old", "wb")  # noqa: SIM115
    f.write(data)
    f.flush()
    os.fsync(f.fileno())  # in S3 now
    results: dict[str, BaseException | None] = {}
    own_s3server.pause()
    try:
        os.unlink(d / "new")  # returns at once; its DELETE hangs, holding the key "new"
        time.sleep(1.0)
        renamer = run_in_thread(results, "rename", lambda: os.rename(d / "old", d / "new"))
        assert not wait_until(lambda: not renamer.is_alive(), 1.0), "rename must wait for the key"
        f.close()  # nothing to upload: returns, and the last release follows
        time.sleep(1.0)
    finally:
        own_s3server.resume()
    renamer.join(120)
    assert results == {"rename": None}, results
    client = own_s3server.client()
    assert wait_until(lambda: queues_empty(m), 30)
    wait_until(lambda: sorted(bucket_objects(client, m.bucket)) == ["local_content/ab/cd/new"], 20)
    listing = sorted(os.listdir(d))
    objects = bucket_objects(client, m.bucket)
    m.unmount()
    m.start()
    after = sorted(os.listdir(d))
    assert (listing, sorted(objects), after) == (["new"], ["local_content/ab/cd/new"], ["new"]), (
        f"namespace {listing}, bucket {sorted(objects)}, namespace after remount {after}"
    )
    assert objects["local_content/ab/cd/new"] == data
    assert (d / "new").read_bytes() == data


def test_a_file_uploaded_then_renamed_while_still_open_takes_the_copys_etag(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    # Over 8 MiB, boto3's managed copy is a multipart copy: the new name's ETag is not the PUT's.
    # The row must take it, or every cold read's If-Match fails (412) until a refresh.
    m = make_mount(bucket=bucket)
    old, new = m.path / "local_content/ab/cd/old", m.path / "local_content/ab/cd/new"
    old.parent.mkdir(parents=True)
    data = os.urandom(10 * MiB + 5)
    fd1 = os.open(old, os.O_WRONLY | os.O_CREAT, 0o644)
    fd2 = os.open(old, os.O_WRONLY)
    os.write(fd1, data)
    os.close(fd1)  # uploaded
    os.rename(old, new)
    os.close(fd2)
    m.unmount()
    for p in (m.cache_dir / "data").rglob("*"):
        if p.is_file():
            p.unlink()  # cold: the next read is a GET with the row's ETag
    m.start()
    assert new.read_bytes() == data
    assert "download of" not in m.log_text() and "replaced behind our back" not in m.log_text(), m.log_tail(
        10
    )
    assert bucket_objects(s3, bucket) == {"local_content/ab/cd/new": data}
