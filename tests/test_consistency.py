"""Changes made outside the mount: by a second mount of the same bucket (a standby host), or by
boto3 (`s3cachefs import`, the provider's upload job). With --metadata-ttl they are seen once the TTL
has passed; without it, at the next background relisting (--relist-interval). A replaced object is
never read as a mix of two versions, nor cut to the old version's size: every GET carries If-Match.

Waits for "the mount has noticed" are bounded polls; nothing asserts how long they took."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from s3cachefs.namespace import LISTING_PAGE

from .faultproxy import FaultProxy
from .harness import MakeMount, Mount, S3Server, bucket_objects, queues_empty, wait_until
from .test_reads import s3_calls

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1024 * 1024
TTL = ["--metadata-ttl", "1s"]
# Far longer than the TTL: a bound on the wait, not a measure.
NOTICE = 30.0


def listed(m: Mount) -> bool:
    return "listed " in m.log_text().rsplit("start:", 1)[-1]


def read_or_errno(path: Path) -> bytes | int:
    """The file's bytes through the mount (open, read to EOF), or the errno that stopped it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        assert e.errno is not None
        return e.errno


def reads_until(path: Path, want: bytes) -> list[bytes | int]:
    """Read the file again and again until it reads `want` (bounded); every result, in order."""
    seen: list[bytes | int] = []

    def current() -> bool:
        seen.append(read_or_errno(path))
        return seen[-1] == want

    assert wait_until(current, NOTICE), f"never read {want!r:.40}; last reads: {seen[-3:]!r:.200}"
    return seen


def two_mounts(make_mount: MakeMount, bucket: str, s3: S3Client) -> tuple[Mount, Mount]:
    """A mount with the defaults and one with a 1 s metadata TTL, on one bucket, each with its own
    cache, both listed; local_content/ab/cd exists (and so is complete in both indexes)."""
    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/seed", Body=b"seed")
    a = make_mount(bucket=bucket)
    b = make_mount(bucket=bucket, extra_args=TTL)
    assert wait_until(lambda: listed(a) and listed(b), NOTICE)
    return a, b


def test_a_file_and_a_directory_created_by_another_mount_appear_on_the_ttl_mount(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    a, b = two_mounts(make_mount, bucket, s3)
    new_file = "local_content/ab/cd/newfile"
    new_dir_file = "local_content/ef/gh/other"
    # Missed once before it exists: the miss must not be final in a directory the index holds whole.
    assert not os.path.exists(b.path / new_file)
    assert not os.path.exists(b.path / "local_content/ef")

    (a.path / new_file).write_bytes(b"written by the other host")
    os.makedirs(a.path / "local_content/ef/gh")
    (a.path / new_dir_file).write_bytes(b"in a new directory")

    assert wait_until(lambda: os.path.exists(b.path / new_file), NOTICE)
    assert (b.path / new_file).read_bytes() == b"written by the other host"
    assert wait_until(lambda: os.path.isdir(b.path / "local_content/ef/gh"), NOTICE)
    assert (b.path / new_dir_file).read_bytes() == b"in a new directory"
    assert "newfile" in os.listdir(b.path / "local_content/ab/cd")


def _replaced_outside_is_read_whole(
    make_mount: MakeMount, s3: S3Client, bucket: str, old: bytes, new: bytes
) -> None:
    key = "local_content/ab/cd/replaced"
    s3.put_object(Bucket=bucket, Key=key, Body=old)
    m = make_mount(bucket=bucket, extra_args=TTL)
    assert wait_until(lambda: listed(m), NOTICE)
    path = m.path / key
    assert path.read_bytes() == old  # now cached, and in the kernel's page cache
    s3.put_object(Bucket=bucket, Key=key, Body=new)

    seen = reads_until(path, new)
    # Until then, the old version whole or an error; never the new bytes cut to the old size.
    assert all(r in (old, new) or r == errno.EIO for r in seen), set(map(repr, seen))
    assert os.stat(path).st_size == len(new)
    assert path.read_bytes() == new


def test_an_object_grown_outside_is_read_whole_through_the_ttl_mount(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    _replaced_outside_is_read_whole(make_mount, s3, bucket, b"1", b"4444")


def test_an_object_replaced_outside_by_one_of_the_same_size_is_read_anew(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    # Same size, and the same LastModified second as likely as not: only the ETag tells them apart,
    # and the kernel's cached pages must go all the same.
    _replaced_outside_is_read_whole(make_mount, s3, bucket, b"abcd", b"wxyz")


def test_an_object_deleted_outside_becomes_enoent_on_the_ttl_mount(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    a, b = two_mounts(make_mount, bucket, s3)
    key = "local_content/ab/cd/doomed"
    (a.path / key).write_bytes(b"soon gone")
    assert wait_until(lambda: os.path.exists(b.path / key), NOTICE)
    assert (b.path / key).read_bytes() == b"soon gone"  # cached on the TTL mount
    s3.delete_object(Bucket=bucket, Key=key)

    assert wait_until(lambda: not os.path.exists(b.path / key), NOTICE)
    assert read_or_errno(b.path / key) == errno.ENOENT
    assert "doomed" not in os.listdir(b.path / "local_content/ab/cd")


def test_without_a_ttl_a_relisting_finds_objects_added_and_deleted_outside(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/seed", Body=b"seed")
    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/old", Body=b"old")
    m = make_mount(bucket=bucket, extra_args=["--relist-interval", "2s"])
    assert wait_until(lambda: listed(m), NOTICE)
    assert not os.path.exists(m.path / "local_content/ab/cd/added")
    assert (m.path / "local_content/ab/cd/old").read_bytes() == b"old"

    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/added", Body=b"put with boto3")
    s3.delete_object(Bucket=bucket, Key="local_content/ab/cd/old")

    assert wait_until(lambda: os.path.exists(m.path / "local_content/ab/cd/added"), NOTICE)
    assert (m.path / "local_content/ab/cd/added").read_bytes() == b"put with boto3"
    assert wait_until(lambda: not os.path.exists(m.path / "local_content/ab/cd/old"), NOTICE)


def test_a_large_cold_file_replaced_between_stat_and_read_is_never_read_mixed(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    key = "remote_content/ex.org/ab/cd/video"
    old = os.urandom(3 * MiB + 17)
    new = os.urandom(4 * MiB + 5)
    s3.put_object(Bucket=bucket, Key=key, Body=old)
    # No TTL: the index's ETag is trusted, and If-Match is what keeps the parts to one version.
    m = make_mount(bucket=bucket, extra_args=["--read-part-size", "1M"])
    assert wait_until(lambda: listed(m), NOTICE)
    path = m.path / key
    assert os.stat(path).st_size == len(old)  # the kernel now holds the old size
    s3.put_object(Bucket=bucket, Key=key, Body=new)

    got = read_or_errno(path)
    assert got in (errno.EIO, new), f"read {got!r:.60} ({len(got) if isinstance(got, bytes) else ''} bytes)"
    # The 412 taught the mount the new version: it is read whole from now on.
    assert all(r in (errno.EIO, new) for r in reads_until(path, new))
    assert os.stat(path).st_size == len(new)


def test_a_small_cold_file_replaced_between_stat_and_read_is_never_read_cut(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    key = "local_content/ab/cd/small"
    s3.put_object(Bucket=bucket, Key=key, Body=b"1")
    m = make_mount(bucket=bucket)
    assert wait_until(lambda: listed(m), NOTICE)
    path = m.path / key
    assert os.stat(path).st_size == 1
    s3.put_object(Bucket=bucket, Key=key, Body=b"4444")

    seen = reads_until(path, b"4444")
    assert all(r in (errno.EIO, b"4444") for r in seen), seen


def test_a_cold_file_replaced_by_a_shorter_one_between_stat_and_read_is_never_read_padded(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    """The kernel holds the old, longer size: a read answered with the new object's fewer bytes
    came back to the reader padded with zeros to a page (4096 bytes for a 1-byte object)."""
    key = "local_thumbnails/ab/cd/efgh/800-600-image-jpeg-crop"
    s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(42484))
    m = make_mount(bucket=bucket)
    assert wait_until(lambda: listed(m), NOTICE)
    path = m.path / key
    assert os.stat(path).st_size == 42484  # the kernel now holds the old size
    s3.put_object(Bucket=bucket, Key=key, Body=b"1")

    seen = reads_until(path, b"1")
    assert all(r in (errno.EIO, b"1") for r in seen), [r if isinstance(r, int) else r[:8] for r in seen]
    assert os.stat(path).st_size == 1


def test_past_the_ttl_an_unreachable_s3_leaves_the_index_answering(
    make_mount: MakeMount, own_s3server: S3Server
) -> None:
    # Synapse takes a failed stat for "missing": a TTL must not turn an S3 outage into 404s.
    m = make_mount(server=own_s3server, extra_args=[*TTL, "--max-attempts", "1", "--s3-deadline", "3s"])
    key = "local_content/ab/cd/kept"
    os.makedirs(m.path / "local_content/ab/cd")
    (m.path / key).write_bytes(b"cached here")
    heads = s3_calls(m).get("HEAD", 0)
    own_s3server.kill()

    def asked_s3() -> bool:
        assert os.path.isfile(m.path / key)  # at every try, before and after the TTL
        return s3_calls(m).get("HEAD", 0) > heads

    assert wait_until(asked_s3, NOTICE)
    assert (m.path / key).read_bytes() == b"cached here"
    assert read_or_errno(m.path / "local_content/ab/cd/never") == errno.ENOENT


def test_files_written_through_the_ttl_mount_are_not_fetched_again_after_the_ttl(
    make_mount: MakeMount,
) -> None:
    # The ETag our PUT (or multipart upload) returned must be the one a HEAD returns, or every
    # file we wrote would look replaced once the TTL passes, and be downloaded again.
    m = make_mount(extra_args=TTL)
    os.makedirs(m.path / "local_content/ab/cd")
    files = {"local_content/ab/cd/small": os.urandom(1000), "local_content/ab/cd/large": os.urandom(20 * MiB)}
    for rel, data in files.items():
        (m.path / rel).write_bytes(data)
    before = s3_calls(m)

    def revalidated() -> bool:
        for rel, data in files.items():
            assert (m.path / rel).read_bytes() == data
        return s3_calls(m).get("HEAD", 0) >= before.get("HEAD", 0) + len(files)

    assert wait_until(revalidated, NOTICE)
    assert s3_calls(m).get("GET", 0) == before.get("GET", 0), "no file was downloaded again"


def test_a_directory_replaced_by_a_file_through_another_mount_is_read_as_the_file(
    make_mount: MakeMount, bucket: str
) -> None:
    """Found by the two-mount model (tests/model.py KNOWN_BUGS stale-directory-elsewhere): with
    --metadata-ttl 0 on both mounts, a directory the second mount has seen, removed through the
    first and replaced by a file of the same name, stayed a directory on the second (Namespace.lookup
    never asked S3 about a directory): the file was hidden behind it (EISDIR). Now a lookup of a
    directory past the TTL asks S3 (Namespace.check_dir)."""
    a = make_mount(bucket=bucket, extra_args=["--metadata-ttl", "0"])
    b = make_mount(bucket=bucket, extra_args=["--metadata-ttl", "0"])
    assert wait_until(lambda: listed(a) and listed(b), NOTICE)
    os.makedirs(a.path / "t/d")
    (a.path / "t/d/f").write_bytes(b"x")
    assert os.path.isdir(b.path / "t/d")
    os.unlink(a.path / "t/d/f")
    os.rmdir(a.path / "t/d")
    (a.path / "t/d").write_bytes(b"now a file")
    assert wait_until(lambda: queues_empty(a), NOTICE)  # t/d/f's DELETE is done: no key below t/d
    assert read_or_errno(b.path / "t/d") == b"now a file"


def test_a_folder_the_server_keeps_after_its_objects_were_deleted_does_not_come_back_on_a_relisting(
    make_mount: MakeMount, bucket: str, s3: S3Client
) -> None:
    # SeaweedFS keeps the folder of deleted objects and still answers a delimited LIST with its
    # prefix. Past the TTL a directory is listed again; that prefix must not bring back the
    # directory removed here (found by the two-mount model: rename over the parent, ENOTEMPTY).
    m = make_mount(bucket=bucket, extra_args=["--metadata-ttl", "0"])
    (m.path / "t/a").mkdir(parents=True)
    (m.path / "t/a/f").write_bytes(b"x")
    (m.path / "t/a/f").unlink()
    (m.path / "u").mkdir()
    (m.path / "t/a").rename(m.path / "u")  # an empty directory over an empty one
    assert wait_until(lambda: queues_empty(m), NOTICE)
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="t/", Delimiter="/")
    prefixes = [p["Prefix"] for p in listing.get("CommonPrefixes") or []]
    assert prefixes == ["t/a/"], "SeaweedFS keeps the folder: the case this test is about"
    assert os.listdir(m.path / "t") == []
    (m.path / "t").rmdir()
    assert not (m.path / "t").exists()


def _dir_seen_by_both(make_mount: MakeMount, bucket: str) -> tuple[Mount, Mount]:
    """Two mounts with --metadata-ttl 0; t/d/f written through the first, t/d known to the second."""
    a = make_mount(bucket=bucket, extra_args=["--metadata-ttl", "0"])
    b = make_mount(bucket=bucket, extra_args=["--metadata-ttl", "0"])
    assert wait_until(lambda: listed(a) and listed(b), NOTICE)
    os.makedirs(a.path / "t/d")
    (a.path / "t/d/f").write_bytes(b"x")
    assert (b.path / "t/d/f").read_bytes() == b"x"
    return a, b


def test_a_directory_removed_through_another_mount_stays_on_the_ttl_mount(
    make_mount: MakeMount, bucket: str
) -> None:
    """namespace.py's docstring and README "Other writers": a directory others merely removed (no
    object at its name, no key below it) stays, as a directory made here by mkdir would (it lives
    in the index only); the file they removed from it goes."""
    a, b = _dir_seen_by_both(make_mount, bucket)
    os.unlink(a.path / "t/d/f")
    os.rmdir(a.path / "t/d")
    assert wait_until(lambda: queues_empty(a), NOTICE)
    assert read_or_errno(b.path / "t/d/f") == errno.ENOENT
    assert os.path.isdir(b.path / "t/d")
    assert os.listdir(b.path / "t/d") == []


def test_a_directory_replaced_by_a_file_elsewhere_stays_while_a_file_below_it_is_open(
    make_mount: MakeMount, bucket: str
) -> None:
    """A file below the directory is open on the TTL mount: its row is not dropped under it, so
    the directory stays (and a warning is logged) until it is closed; then the name is the file."""
    a, b = _dir_seen_by_both(make_mount, bucket)
    with open(b.path / "t/d/f", "rb") as held:
        os.unlink(a.path / "t/d/f")
        os.rmdir(a.path / "t/d")
        (a.path / "t/d").write_bytes(b"now a file")
        assert wait_until(lambda: queues_empty(a), NOTICE)
        assert read_or_errno(b.path / "t/d") == errno.EISDIR
        assert "is a file in S3 now" in b.log_text()
        assert held.read() == b"x"
    assert read_or_errno(b.path / "t/d") == b"now a file"


def test_without_a_ttl_lookups_of_known_directories_ask_s3_nothing(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    """Synapse's hot paths stay S3-free with the default options: the kernel looks each directory
    up again after a remount, and the daemon answers from its index."""
    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/seed", Body=b"seed")
    m = make_mount(bucket=bucket)
    assert wait_until(lambda: listed(m), NOTICE)
    m.unmount()
    m.start()
    assert wait_until(lambda: listed(m), NOTICE)
    before = s3_calls(m)
    for d in ("local_content", "local_content/ab", "local_content/ab/cd"):
        assert os.path.isdir(m.path / d)
    after = s3_calls(m)
    assert (after.get("HEAD", 0), after.get("LIST", 0)) == (before.get("HEAD", 0), before.get("LIST", 0))


@pytest.mark.parametrize(
    "rel",
    [
        "local_content/ab/cd/efghijklmnopqrstuvwx",
        "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/32-32-image-png-crop",
    ],
)
def test_a_listing_page_asked_for_before_this_mounts_upload_does_not_bring_back_the_older_version(
    make_mount: MakeMount, s3server: S3Server, s3: S3Client, bucket: str, rel: str
) -> None:
    """The full listing's page is what S3 held when it was asked for. A file uploaded through the
    mount while that page was on its way (at a mount, the queue resumed after a crash sends its
    thumbnails while the listing runs) must keep its new version: not the page's older size and
    ETag, which made its next read fail (a GET with If-Match of the old ETag). The proxy holds every
    answer to the full listing's LIST for HOLD seconds; the original's close() uploads it, the
    thumbnail's upload is sent by the background uploader."""
    hold = 5.0
    old, new = os.urandom(100_000), os.urandom(60_000)
    s3.put_object(Bucket=bucket, Key=rel, Body=old)
    with FaultProxy(s3server.s3_port, seed=1) as proxy:
        proxy.set_mode("late", only=f"max-keys={LISTING_PAGE}", delay=hold)
        m = make_mount(bucket=bucket, extra_args=["--endpoint-url", proxy.endpoint_url])
        path = m.path / rel
        path.write_bytes(new)
        assert wait_until(lambda: bucket_objects(s3, bucket).get(rel) == new, NOTICE)
        assert proxy.counts().get("late", 0) >= 1 and not listed(m), (
            f"the upload took longer than the listing's page was held ({hold}s): nothing was tested"
        )
        assert wait_until(lambda: listed(m), NOTICE)
        assert path.stat().st_size == len(new)
        assert read_or_errno(path) == new
        assert "replaced behind our back" not in m.log_text(), m.log_tail()
        m.unmount()


def listings(m: Mount) -> int:
    return m.log_text().count("INFO s3cachefs.namespace: listed ")


def test_a_cached_file_replaced_outside_then_renamed_serves_the_object_under_the_new_name(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    # Same size: the cached copy's length cannot tell. The rename copies what S3 holds now.
    old, new = b"A" * 5000, b"B" * 5000
    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/src", Body=old)
    m = make_mount(bucket=bucket, extra_args=["--relist-interval", "2"])
    assert wait_until(lambda: listings(m) >= 1, 30)
    assert (m.path / "local_content/ab/cd/src").read_bytes() == old  # cached
    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/src", Body=new)
    os.rename(m.path / "local_content/ab/cd/src", m.path / "local_content/ab/cd/dst")
    assert bucket_objects(s3, bucket) == {"local_content/ab/cd/dst": new}
    assert (m.path / "local_content/ab/cd/dst").read_bytes() == new
    n = listings(m)
    assert wait_until(lambda: listings(m) >= n + 2, 30)  # relistings find nothing to correct
    m.unmount()
    m.start()
    assert (m.path / "local_content/ab/cd/dst").read_bytes() == new


def test_objects_under_a_local_only_path_never_replace_or_bring_back_the_mounts_files(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    # url_cache/ is local-only (never uploaded): keys there, from another tool, are not the mount's.
    s3.put_object(Bucket=bucket, Key="url_cache/ab/f", Body=b"s3 version")
    s3.put_object(Bucket=bucket, Key="url_cache/ab/g", Body=b"s3 only")
    m = make_mount(bucket=bucket, extra_args=["--relist-interval", "2"])
    assert wait_until(lambda: listings(m) >= 1, 30)
    os.makedirs(m.path / "url_cache/ab", exist_ok=True)
    (m.path / "url_cache/ab/f").write_bytes(b"written through the mount")
    (m.path / "url_cache/ab/h").write_bytes(b"also")
    os.unlink(m.path / "url_cache/ab/h")
    n = listings(m)
    assert wait_until(lambda: listings(m) >= n + 2, 30)
    assert (m.path / "url_cache/ab/f").read_bytes() == b"written through the mount"
    assert sorted(os.listdir(m.path / "url_cache/ab")) == ["f"]
    assert bucket_objects(s3, bucket)["url_cache/ab/f"] == b"s3 version", "local-only: never uploaded"


def test_a_cold_file_deleted_outside_fails_its_read_once_then_is_gone_without_a_listing(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    # No TTL, and the default relisting (hours away): the GET's 404 is what tells the mount.
    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/doomed", Body=b"soon gone")
    m = make_mount(bucket=bucket)
    assert wait_until(lambda: listings(m) >= 1, 30)
    path = m.path / "local_content/ab/cd/doomed"
    assert path.stat().st_size == len(b"soon gone")  # listed, not cached
    s3.delete_object(Bucket=bucket, Key="local_content/ab/cd/doomed")
    assert read_or_errno(path) == errno.EIO
    assert wait_until(lambda: read_or_errno(path) == errno.ENOENT, 10)
    assert "doomed" not in os.listdir(m.path / "local_content/ab/cd")
    assert listings(m) == 1
