"""Cold reads stream, large objects come in parallel ranged GETs, readers share downloads, and known
files cost no S3 request. S3 calls are counted by the daemon (per operation, saved on SIGUSR1)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .faultproxy import FaultProxy
from .harness import (
    MakeMount,
    Mount,
    S3Server,
    TcpForwarder,
    files_under,
    mount_status,
    wait_until,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1024 * 1024


def s3_calls(m: Mount) -> dict[str, int]:
    """The daemon's S3 call counters, saved on demand (SIGUSR1) and read with `s3cachefs status`."""

    def status() -> dict[str, object]:
        return mount_status(m)

    before = int(str(status()["saves"]))
    assert m.proc is not None
    m.proc.send_signal(signal.SIGUSR1)
    assert wait_until(lambda: int(str(status()["saves"])) > before, 10), "the daemon saved its counters"
    calls = status()["s3_calls"]
    assert isinstance(calls, dict)
    return {str(k): int(v) for k, v in calls.items()}


def listed(m: Mount) -> bool:
    return "listed " in m.log_text().rsplit("start:", 1)[-1]


def test_known_files_cost_no_request_and_a_cold_small_file_exactly_one_get(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    objects = {
        f"local_thumbnails/ab/cd/media{i}/32-32-image-jpeg-crop": os.urandom(3000 + i) for i in range(20)
    }
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    m = make_mount(bucket=bucket)
    assert wait_until(lambda: listed(m), 15)
    start = s3_calls(m)
    for key, body in objects.items():
        path = m.path / key
        assert os.path.isfile(path) and os.stat(path).st_size == len(body)
        with open(path, "rb"):
            pass  # opened and closed unread, as Synapse does before answering 304
    assert len(os.listdir(m.path / "local_thumbnails/ab/cd")) == 20
    assert not os.path.exists(m.path / "local_thumbnails/ab/cd/media0/800-600-image-jpeg-scale")
    assert s3_calls(m) == start, "lookup, getattr, open and readdir of indexed files make no S3 request"

    key, body = next(iter(objects.items()))
    assert (m.path / key).read_bytes() == body
    after = s3_calls(m)
    assert after == start | {"GET": start.get("GET", 0) + 1}, "a cold small read is exactly one GET"
    assert (m.path / key).read_bytes() == body
    assert s3_calls(m) == after, "and then it is cached"


def test_a_large_cold_file_comes_in_parallel_ranged_gets_shared_by_all_readers(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    data = os.urandom(20 * MiB + 123)
    s3.put_object(Bucket=bucket, Key="remote_content/ex.org/ab/cd/video", Body=data)
    m = make_mount(bucket=bucket, extra_args=["--read-part-size", "5M", "--read-concurrency", "4"])
    assert wait_until(lambda: listed(m), 15)
    start = s3_calls(m).get("GET", 0)
    digests: list[str] = []

    def reader() -> None:
        with open(m.path / "remote_content/ex.org/ab/cd/video", "rb") as f:
            h = hashlib.sha256()
            while chunk := f.read(16 * 1024):  # Synapse's sender reads 16 KiB at a time
                h.update(chunk)
            digests.append(h.hexdigest())

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert digests == [hashlib.sha256(data).hexdigest()] * 8
    # 20 MiB + 123 bytes in 5 MiB parts: 5 ranged GETs, once, for eight readers.
    assert s3_calls(m)["GET"] - start == 5


def test_the_first_bytes_of_a_cold_file_are_served_before_the_download_ends(
    make_mount: MakeMount, s3server: S3Server, s3: S3Client, bucket: str
) -> None:
    data = os.urandom(12 * MiB)
    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/big", Body=data)
    # S3 at 4 MiB/s through a loopback forwarder: the whole object takes about 3 s to arrive.
    with TcpForwarder(s3server.s3_port, bytes_per_second=4 * MiB) as slow:
        m = make_mount(bucket=bucket, extra_args=["--endpoint-url", f"http://127.0.0.1:{slow.port}"])
        with open(m.path / "local_content/ab/cd/big", "rb") as f:
            assert f.read(64 * 1024) == data[: 64 * 1024]
            downloads = [p for p in files_under(m.cache_dir / "tmp") if p.name.startswith("get-")]
            assert downloads and os.path.getsize(downloads[0]) < len(data), "served mid-download"
            assert f.read() == data[64 * 1024 :]
        m.unmount()


def test_readers_are_served_only_bytes_that_are_contiguous_from_the_start(tmp_path: Path) -> None:
    from s3cachefs.cache import Download

    fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT)
    d = Download(ino=1, tmp=str(tmp_path / "x"), fd=fd, size=10, part_size=4)
    d.plan(10, first=2)  # a short first range, then parts of 4: [0,2) [2,6) [6,10)
    assert d.ends == [2, 6, 10]
    d.progress(0, 1)
    assert d.available == 1
    d.progress(0, 2)
    d.progress(2, 4)  # a later part arrived first: a reader of bytes 2-9 must still wait
    assert d.available == 2
    d.progress(1, 3)
    assert d.available == 5
    d.progress(1, 4)
    assert d.available == 10
    os.close(fd)


def test_a_large_cold_file_starts_with_a_short_range_and_arrives_whole(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    """The first GET of a large cold object asks for FIRST_RANGE bytes only (its first bytes come
    back sooner); the parts after it still add up to the whole object, byte for byte."""
    from s3cachefs.cache import FIRST_RANGE

    data = os.urandom(3 * 1024 * 1024 + 12345)
    key = "remote_content/ex.org/ab/cd/large"
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    m = make_mount(bucket=bucket, extra_args=["--read-part-size", "1M", "--log-level", "debug"])
    with open(m.path / key, "rb") as f:
        assert f.read(4096) == data[:4096]
        assert f.read() == data[4096:]
    ranges = re.findall(r"GET \S*large bytes=(\d+)-(\d+)", m.log_text())
    assert ranges[0] == ("0", str(FIRST_RANGE - 1)), ranges


def test_the_parts_of_a_large_cold_file_are_asked_for_in_order(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    """A sequential reader needs the parts front to back: each download's GETs start in that order
    (trio starts new tasks in reverse order half of the time, which once made the first part come
    in last). Four files, so that a random order would pass with a chance of 1 in 16 at most."""
    objects = {f"remote_content/ex.org/ab/cd/large{i}": os.urandom(6 * MiB + 999) for i in range(4)}
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    m = make_mount(
        bucket=bucket,
        extra_args=["--read-part-size", "1M", "--read-concurrency", "2", "--log-level", "debug"],
    )
    for key, body in objects.items():
        with open(m.path / key, "rb") as f:
            assert f.read() == body
    log = m.log_text()
    for key in objects:
        starts = [int(a) for a in re.findall(rf"GET {re.escape(key)} bytes=(\d+)-", log)]
        assert len(starts) == 7, starts  # the short first range, then six parts
        assert starts == sorted(starts), f"{key}: parts asked for in the order {starts}"


def test_a_missing_name_can_be_created_at_once_despite_the_negative_cache(mounted: Mount) -> None:
    path = mounted.path / "local_thumbnails/ab/cd/x/32-32-image-jpeg-crop"
    path.parent.mkdir(parents=True)
    for _ in range(3):
        assert not path.exists()  # cached as missing by the kernel for a second
    path.write_bytes(b"thumbnail")
    assert path.exists() and path.read_bytes() == b"thumbnail"
    path.unlink()
    assert not path.exists()


def test_an_object_replaced_in_the_bucket_is_served_new_after_a_remount(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    key = "remote_content/ex.org/ab/cd/x"
    s3.put_object(Bucket=bucket, Key=key, Body=b"old version")
    m = make_mount(bucket=bucket)
    assert (m.path / key).read_bytes() == b"old version"  # now cached
    m.unmount()
    s3.put_object(Bucket=bucket, Key=key, Body=b"the new, longer version")  # by another tool
    m.start()
    assert wait_until(lambda: listed(m), 15)
    assert (m.path / key).read_bytes() == b"the new, longer version"


def test_a_file_deleted_while_open_and_unread_fails_its_read_rather_than_reading_empty(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    """Unlinked while open for reading, before any byte came in: its object is gone too, so the read
    must fail; the size fstat() reports stays the file's (a size of 0 made the kernel answer b'')."""
    s3.put_object(Bucket=bucket, Key="remote_content/srv/abc", Body=b"x" * 5000)
    mounted = make_mount(bucket=bucket)
    path = mounted.path / "remote_content/srv/abc"
    with open(path, "rb", buffering=0) as f:
        os.unlink(path)
        assert os.fstat(f.fileno()).st_size == 5000
        try:
            got = f.read()
        except OSError as e:
            assert e.errno == errno.EIO
        else:
            assert got == b"x" * 5000, f"read {len(got)} bytes of a 5000-byte file"


def test_a_new_file_never_gets_the_inode_number_of_a_file_just_deleted(mounted: Mount) -> None:
    """The kernel keys what it caches (attributes, pages) by inode number: a number handed out again
    in the same mount could show the deleted file's bytes or size for the new one."""
    d = mounted.path / "local_content/ab/cd"
    os.makedirs(d)
    seen: set[int] = set()
    for i in range(5):
        p = d / "newest"
        p.write_bytes(bytes([i]) * (100 + i))
        ino = os.stat(p).st_ino
        assert ino not in seen
        seen.add(ino)
        assert p.read_bytes() == bytes([i]) * (100 + i)
        os.unlink(p)


def test_a_large_object_deleted_behind_the_mount_mid_download_fails_the_read_without_a_traceback(
    make_mount: MakeMount, s3: S3Client, s3server: S3Server, bucket: str
) -> None:
    """The parts still to come fail (404) together: one EIO for the reader, one warning line in the
    log, and no traceback (an exception group used to be logged as an unexpected error)."""
    key = "remote_content/srv/big"
    data = os.urandom(8 * MiB)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    with TcpForwarder(s3server.s3_port, bytes_per_second=2 * MiB) as slow:
        m = make_mount(
            bucket=bucket,
            extra_args=[
                "--endpoint-url", f"http://127.0.0.1:{slow.port}",
                "--read-part-size", "1M", "--read-concurrency", "2",
            ],
        )  # fmt: skip
        assert wait_until(lambda: listed(m), 30)
        with open(m.path / key, "rb") as f:
            assert f.read(64 * 1024) == data[: 64 * 1024]
            s3.delete_object(Bucket=bucket, Key=key)
            try:
                rest = f.read()
            except OSError as e:
                assert e.errno == errno.EIO, e
            else:
                # Parts already requested may still come in whole; then the bytes must be right.
                assert rest == data[64 * 1024 :]
        m.unmount()
    log = m.log_text()
    assert "Traceback" not in log, log


def _listed_mount_through(proxy: FaultProxy, make_mount: MakeMount, bucket: str, max_attempts: int) -> Mount:
    """A mount of `bucket` whose S3 traffic goes through `proxy`, its first listing done."""
    m = make_mount(
        bucket=bucket,
        extra_args=["--endpoint-url", proxy.endpoint_url, "--max-attempts", str(max_attempts)],
    )
    assert wait_until(lambda: listed(m), 15)
    return m


def test_a_cold_read_retries_server_errors_and_answers_eio_only_once_they_run_out(
    make_mount: MakeMount, s3server: S3Server, s3: S3Client, bucket: str
) -> None:
    data = os.urandom(300_000)
    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/x", Body=data)
    with FaultProxy(s3server.s3_port, seed=1) as proxy:
        m = _listed_mount_through(proxy, make_mount, bucket, max_attempts=3)
        path = m.path / "local_content/ab/cd/x"
        with proxy.fault("http_503"):
            with pytest.raises(OSError) as failed:
                path.read_bytes()
            assert failed.value.errno == errno.EIO
            assert proxy.counts().get("http_503:GET") == 3, "one GET, retried up to --max-attempts"
        with proxy.fault("http_500", probability=0.5):
            # Seeded (seed 1): the first GET meets a 500, its retry passes.
            assert path.read_bytes() == data
        assert proxy.counts().get("http_500:GET") == 1
        assert (m.path / "local_content/ab/cd/x").read_bytes() == data
        m.unmount()


def test_a_cold_read_whose_bytes_do_not_match_the_etag_never_reaches_the_end_of_the_file(
    make_mount: MakeMount, s3server: S3Server, s3: S3Client, bucket: str
) -> None:
    """A cold file's first bytes go to its readers as they arrive, before the whole object can be
    checked; the end of the file waits for the MD5 check, so a reader of a damaged object gets EIO
    before it has all of it (Synapse then cuts its answer rather than serve a whole wrong file), and
    nothing damaged is cached."""
    data = os.urandom(300_000)
    s3.put_object(Bucket=bucket, Key="local_content/ab/cd/x", Body=data)
    with FaultProxy(s3server.s3_port, seed=1) as proxy:
        m = _listed_mount_through(proxy, make_mount, bucket, max_attempts=2)
        path = m.path / "local_content/ab/cd/x"
        got = bytearray()
        with proxy.fault("garble", only="GET "), open(path, "rb", buffering=0) as f:
            with pytest.raises(OSError) as failed:
                while chunk := f.read(16384):
                    got += chunk
            assert failed.value.errno == errno.EIO
        assert proxy.counts().get("garble:GET", 0) >= 1
        assert len(got) < len(data), "the reader got to the end of a damaged file"
        assert bytes(got) == data[: len(got)], "the bytes before the damage are the object's"
        assert "does not match ETag" in m.log_text()
        # S3 answers right again: the file reads whole, from a fresh download.
        assert path.read_bytes() == data
        m.unmount()


def test_a_reader_open_across_an_overwrite_leaves_no_old_bytes_for_later_readers(mounted: Mount) -> None:
    """Found by the soak: a reader that opened the old version and read on after an overwrite put
    the old bytes into the kernel's page cache, which every later open of the inode shares (keep_cache):
    new readers got the new size with old bytes. As on a local filesystem, an open reader now sees
    the overwrite."""
    d = mounted.path / "local_thumbnails/ab/cd/media"
    os.makedirs(d)
    p = d / "96-96-image-jpeg-crop"
    old, new = os.urandom(300_000), os.urandom(250_000)
    p.write_bytes(old)
    with open(p, "rb", buffering=0) as reader:
        assert reader.read(65536) == old[:65536]
        p.write_bytes(new)  # open('wb'), write, close: durable in S3 when this returns
        rest = reader.read()
    assert p.read_bytes() == new
    with open(p, "rb") as again:
        assert again.read() == new
    assert rest == new[65536:]


def test_a_reader_that_opens_while_a_write_starts_reads_what_the_write_left(mounted: Mount) -> None:
    """A read-only open that lands while a writer's staging copy of a cached file is being made (an
    open without O_TRUNC copies the whole file first) took the old cached copy's fd; after the write's
    upload it went on serving the old bytes for the pages the kernel did not hold (here the page the
    writer changed only in part)."""
    d = mounted.path / "local_content/ab/cd"
    os.makedirs(d)
    p = d / "big"
    old = os.urandom(256 * MiB)
    p.write_bytes(old)
    opened = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with open(p, "r+b", buffering=0) as f:  # copies 256 MiB before open() returns
                opened.set()
                f.seek(10)
                f.write(b"N" * 100)
        except BaseException as e:
            errors.append(e)
            opened.set()

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.03)
    assert not opened.is_set(), "the writer's open returned before the reader could open"
    with open(p, "rb", buffering=0) as reader:
        t.join(60)
        assert not errors, errors
        head = reader.read(4096)
    assert head == old[:10] + b"N" * 100 + old[110:4096]
    with open(p, "rb") as again:
        assert again.read(4096) == head
