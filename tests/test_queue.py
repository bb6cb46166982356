"""The upload and DELETE queues: thumbnails (upload = "async" paths) are acknowledged at close() once
durable on the cache disk and sent in the background; unlink returns once its DELETE is queued. On a
real mount, with S3 behind a fault proxy that fails only the requests a test names."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .faultproxy import FaultProxy
from .harness import MakeMount, Mount, bucket_objects, mount_status, wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

THUMB = "local_thumbnails/ab/cd/efgh/32-32-image-png-crop"
ORIGINAL = "local_content/ab/cd/efgh"
# A failed PUT or DELETE fails fast (botocore retries a 503 a few times), so the uploader backs off.
FAST = ["--max-attempts", "2", "--connect-timeout", "2", "--read-timeout", "3"]


def through(make_mount: MakeMount, proxy: FaultProxy, *args: str) -> Mount:
    return make_mount(extra_args=["--endpoint-url", proxy.endpoint_url, *FAST, *args])


def write(m: Mount, rel: str, data: bytes) -> None:
    path = m.path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def queue_empty(m: Mount) -> bool:
    s = mount_status(m)
    return s["queued_uploads"] == 0 and s["queued_deletes"] == 0


def test_a_thumbnail_close_returns_before_s3_has_it_and_the_uploader_sends_it(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client
) -> None:
    m = through(make_mount, proxy)
    data = os.urandom(50_000)
    with proxy.fault("http_503", only="PUT /" + m.bucket + "/local_thumbnails/"):
        write(m, THUMB, data)  # returns: the PUT fails, but the close does not wait for it
        assert (m.path / THUMB).read_bytes() == data
        assert THUMB not in bucket_objects(s3, m.bucket)
        s = mount_status(m)
        assert s["queued_uploads"] == 1 and s["queued_upload_bytes"] == len(data)
        assert proxy.counts().get("http_503:PUT", 0) >= 1, "the uploader tried, and S3 refused"
    assert wait_until(lambda: bucket_objects(s3, m.bucket).get(THUMB) == data, 60)
    assert wait_until(lambda: queue_empty(m), 10)


def test_queued_uploads_survive_kill_9_and_are_sent_at_the_next_mount(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client
) -> None:
    m = through(make_mount, proxy)
    thumbs = {
        f"local_thumbnails/ab/cd/efgh/{i}-{i}-image-png-scale": os.urandom(20_000 + i) for i in range(5)
    }
    with proxy.fault("http_503", only="PUT /" + m.bucket + "/local_thumbnails/"):
        for rel, data in thumbs.items():
            write(m, rel, data)
        m.kill()  # acknowledged, queued, not in S3: a crash now must not lose them
    assert not any(rel in bucket_objects(s3, m.bucket) for rel in thumbs)
    m.start()
    assert wait_until(lambda: all(bucket_objects(s3, m.bucket).get(r) == d for r, d in thumbs.items()), 60)
    for rel, data in thumbs.items():
        assert (m.path / rel).read_bytes() == data


def test_an_unlinked_or_rewritten_queued_file_leaves_the_bucket_with_the_namespace(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client
) -> None:
    m = through(make_mount, proxy)
    gone, rewritten = THUMB, THUMB.replace("32-32", "64-64")
    new = os.urandom(30_000)
    with proxy.fault("http_503", only="PUT /" + m.bucket + "/local_thumbnails/"):
        write(m, gone, os.urandom(10_000))
        os.unlink(m.path / gone)
        write(m, rewritten, os.urandom(10_000))
        write(m, rewritten, new)  # a second version queued over the first
    assert wait_until(lambda: queue_empty(m), 60)
    assert bucket_objects(s3, m.bucket) == {rewritten: new}
    m.unmount()
    m.start()
    assert not (m.path / gone).exists() and (m.path / rewritten).read_bytes() == new


def test_a_thumbnail_unlinked_while_its_close_copies_it_leaves_nothing_in_the_cache_or_the_bucket(
    make_mount: MakeMount, s3: S3Client
) -> None:
    # An async close() copies the file, fsyncs it and renames it into data/ in one worker thread; an
    # unlink() served meanwhile removes the row and what data/ held. A copy renamed into data/ after
    # that must not stay there (a file no row accounts for), be queued or reach the bucket.
    m = make_mount()
    path = m.path / THUMB
    path.parent.mkdir(parents=True)
    tmp = m.cache_dir / "tmp"
    data = bytes(range(256)) * (96 * 4096)  # 96 MiB: its copy and fsync take long enough to unlink during
    f = open(path, "wb")  # noqa: SIM115 - closed in another thread, timed against the unlink
    f.write(data)
    f.flush()
    closed: list[BaseException | None] = []

    def close() -> None:
        try:
            f.close()
            closed.append(None)
        except OSError as e:
            closed.append(e)

    closer = threading.Thread(target=close)
    closer.start()
    try:
        assert wait_until(lambda: any(n.startswith("queue-") for n in os.listdir(tmp)), 30, 0.001)
        os.unlink(path)
        assert closer.is_alive(), "the close() had finished before the unlink: the race was not made"
    finally:
        closer.join(60)
    assert closed == [None], closed
    assert not path.exists()
    assert wait_until(lambda: queue_empty(m), 30)
    leftovers = [
        p for p in (m.cache_dir / "data").rglob("*") if p.is_file() and p.stat().st_size == len(data)
    ] + [n for n in os.listdir(tmp) if n.startswith("queue-")]
    assert leftovers == []
    assert THUMB not in bucket_objects(s3, m.bucket)
    assert mount_status(m)["queued_uploads"] == 0


def test_a_queued_file_open_for_writing_again_does_not_stall_the_mount(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client
) -> None:
    # The uploader once took the entry of a file being written again, skipped it without awaiting
    # and took it again at once: the mount's event loop spun for ever and no request was answered
    # (found by the fault suite: a thumbnail rewritten before its upload went out).
    m = through(make_mount, proxy)
    new = os.urandom(20_000)
    with proxy.fault("http_503", only="PUT /" + m.bucket + "/local_thumbnails/"):
        write(m, THUMB, os.urandom(10_000))  # queued; its PUT fails, so the entry stays
        fd = os.open(m.path / THUMB, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            time.sleep(3.0)  # the uploader is woken every second; its first retry is due after 1 s
            # In a thread (a stuck FUSE request cannot be timed out otherwise), and no child process
            # (it would inherit fd, and its exec would close it: a FLUSH that hangs as well).
            looked = threading.Thread(target=os.stat, args=(m.path / THUMB,), daemon=True)
            looked.start()
            looked.join(10)
            alive = not looked.is_alive()
            if alive:
                os.write(fd, new)
            else:
                m.kill()  # answers the stuck requests (ENOTCONN), so that nothing here stays blocked
                looked.join(10)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    assert alive, "the mount stopped answering while a queued file was open for writing again"
    assert wait_until(lambda: queue_empty(m), 60)
    assert bucket_objects(s3, m.bucket) == {THUMB: new}


def test_unlink_returns_before_the_delete_and_no_listing_brings_the_name_back(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client
) -> None:
    m = through(make_mount, proxy)
    write(m, ORIGINAL, b"original")  # a synchronous path: in S3 at close
    assert bucket_objects(s3, m.bucket) == {ORIGINAL: b"original"}
    with proxy.fault("http_503", only="DELETE "):
        os.unlink(m.path / ORIGINAL)  # returns: the DELETE is queued, and fails for now
        assert not (m.path / ORIGINAL).exists()
        assert ORIGINAL in bucket_objects(s3, m.bucket)
        m.kill()
        m.start()  # the mount-time listing sees the object; its DELETE is still queued
        assert wait_until(lambda: "listed " in m.log_text().rsplit("start:", 1)[-1], 30)
        assert not (m.path / ORIGINAL).exists(), "a listing brought back a name whose DELETE is queued"
        assert "efgh" not in os.listdir(m.path / "local_content/ab/cd")
    assert wait_until(lambda: bucket_objects(s3, m.bucket) == {}, 60)
    assert wait_until(lambda: queue_empty(m), 10)


def test_an_older_queued_delete_never_removes_a_newer_file_at_the_same_name(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client
) -> None:
    m = through(make_mount, proxy)
    write(m, ORIGINAL, b"first")
    with proxy.fault("http_503", only="DELETE "):
        os.unlink(m.path / ORIGINAL)
        write(m, ORIGINAL, b"second")  # a synchronous PUT, after the DELETE was queued
    assert wait_until(lambda: queue_empty(m), 60)
    assert bucket_objects(s3, m.bucket) == {ORIGINAL: b"second"}
    assert (m.path / ORIGINAL).read_bytes() == b"second"


def test_past_the_queue_bound_thumbnails_upload_at_close(make_mount: MakeMount, s3: S3Client) -> None:
    m = make_mount(extra_args=["--upload-queue-max", "0"])
    write(m, THUMB, b"thumb")
    assert bucket_objects(s3, m.bucket) == {THUMB: b"thumb"}, "in S3 the moment close() returned"


def test_a_clean_stop_sends_what_is_queued(make_mount: MakeMount, proxy: FaultProxy, s3: S3Client) -> None:
    m = through(make_mount, proxy)
    proxy.set_mode("http_503", only="PUT /" + m.bucket + "/local_thumbnails/")
    write(m, THUMB, b"thumb")
    proxy.set_mode("pass")
    m.unmount()  # the stop drains the queue before the daemon exits
    assert bucket_objects(s3, m.bucket) == {THUMB: b"thumb"}


def test_an_async_close_syncs_the_data_file_its_directory_and_the_queue_commit(
    make_mount: MakeMount, tmp_path: Path
) -> None:
    # The queued version is all there is until the upload: close() may return only once the bytes,
    # their name in data/ and the index row that queues them would survive a power loss. Traced with
    # strace on the running daemon: fsync of the copy, of its data/XX directory, and of the index's
    # WAL (synchronous=FULL for this commit; the default NORMAL does not sync the WAL at commit).
    m = make_mount(extra_args=["--upload-queue-max", "1G"])
    (m.path / THUMB).parent.mkdir(parents=True)
    assert m.proc is not None
    trace = tmp_path / "strace.out"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace), "-p", str(m.proc.pid)],
        stderr=subprocess.PIPE,
    )
    try:
        # strace writes nothing until a traced call: wait until it has attached to the threads.
        assert wait_until(lambda: _attached(m.proc.pid if m.proc else 0), 10)
        write(m, THUMB, os.urandom(4096))
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    calls = trace.read_text()
    cache = re.escape(str(m.cache_dir))
    assert re.search(rf"fsync\(\d+<{cache}/(tmp/queue-|data/)[^>]*>\)", calls), calls
    assert re.search(rf"fsync\(\d+<{cache}/data/[0-9a-f]{{2}}>\)", calls), calls
    assert re.search(rf"f(data)?sync\(\d+<{cache}/index\.sqlite-wal>\)", calls), calls


def _attached(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1]) != 0
    except OSError:
        pass
    return False


def cached_copy(m: Mount, rel: str) -> Path:
    ino = os.stat(m.path / rel).st_ino
    return m.cache_dir / "data" / f"{ino % 256:02x}" / str(ino)


def test_a_queued_copy_changed_after_its_check_is_never_stored_in_the_bucket(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client
) -> None:
    """The uploader checks a queued file's MD5, then reads it again to send it. A copy damaged in
    between (here: while S3 holds back the answer to CreateMultipartUpload) must not reach S3."""
    MiB = 1024 * 1024
    m = through(make_mount, proxy, "--multipart-threshold", "5M", "--multipart-chunksize", "5M")
    data = os.urandom(11 * MiB)
    with proxy.fault("late", only="POST /" + m.bucket + "/local_thumbnails/", delay=2.0):  # < FAST timeout
        write(m, THUMB, data)  # acknowledged: durable and queued
        assert wait_until(lambda: proxy.counts().get("late:POST", 0) >= 1, 30), proxy.counts()
        with open(cached_copy(m, THUMB), "r+b") as f:
            f.seek(6 * MiB + 5)
            byte = f.read(1)
            f.seek(6 * MiB + 5)
            f.write(bytes([byte[0] ^ 0xFF]))
        assert wait_until(lambda: "changed since it was checked" in m.log_text(), 30), m.log_tail(20)
    # Tried again: the copy no longer has its MD5, so the row gives it up as damaged.
    assert wait_until(lambda: "damaged; not sending it" in m.log_text(), 30), m.log_tail(20)
    assert THUMB not in bucket_objects(s3, m.bucket)
    assert not s3.list_multipart_uploads(Bucket=m.bucket).get("Uploads"), "the upload was aborted"


def test_kill_9_while_a_queued_thumbnail_is_closed_again_keeps_an_acknowledged_version(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client
) -> None:
    """v1 is acknowledged (queued; S3 refuses its PUT for now). v2 of the same path is being closed
    when the daemon is killed, as soon as v2's copy has replaced v1's in data/ (before the index
    records v2). After the remount the bucket must end with v1 or v2, never neither."""
    MiB = 1024 * 1024
    m = through(make_mount, proxy)
    outcomes: list[str] = []
    for attempt in range(4):
        rel = f"local_thumbnails/ab/cd/efgh/{attempt}-{attempt}-image-png-crop"
        v1, v2 = os.urandom(3 * MiB), os.urandom(3 * MiB)
        with proxy.fault("http_503", only="PUT /" + m.bucket + "/local_thumbnails/"):
            write(m, rel, v1)
            copy = cached_copy(m, rel)
            first = copy.stat().st_ino
            killed = threading.Event()

            def watch(copy: Path = copy, first: int = first, killed: threading.Event = killed) -> None:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(copy).st_ino != first:  # v2's copy was renamed into data/
                            m.kill()
                            killed.set()
                            return

            t = threading.Thread(target=watch)
            t.start()
            with contextlib.suppress(OSError):  # the daemon dies under the writer
                write(m, rel, v2)
            t.join(30)
            if not killed.is_set():
                m.kill()
        m.start()
        assert wait_until(lambda: queue_empty(m), 60), mount_status(m)
        got = bucket_objects(s3, m.bucket).get(rel)
        outcomes.append("v1" if got == v1 else "v2" if got == v2 else "none" if got is None else "other")
    assert all(o in ("v1", "v2") for o in outcomes), f"{outcomes}\n{m.log_tail(30)}"
    assert "v1" in outcomes, f"no kill landed before v2 was recorded: {outcomes}"


RENAMED = "local_thumbnails/ab/cd/efgh/64-64-image-png-crop"


def rename_and_kill(m: Mount, held: int) -> None:
    """Rename THUMB to RENAMED while `held` (a descriptor open for writing) is open, then kill -9."""
    os.rename(m.path / THUMB, m.path / RENAMED)
    m.kill()
    with contextlib.suppress(OSError):
        os.close(held)


def test_a_queued_new_thumbnail_renamed_while_open_then_kill_9_is_in_s3_under_the_new_name(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client
) -> None:
    """Closed once through one descriptor (acknowledged: queued; S3 refuses its PUT for now), still
    open through another, renamed, then the daemon is killed."""
    m = through(make_mount, proxy)
    data = os.urandom(40_000)
    (m.path / THUMB).parent.mkdir(parents=True)
    with proxy.fault("http_503", only="PUT /" + m.bucket + "/local_thumbnails/"):
        fd1 = os.open(m.path / THUMB, os.O_WRONLY | os.O_CREAT, 0o644)
        fd2 = os.open(m.path / THUMB, os.O_WRONLY)
        os.write(fd1, data)
        os.close(fd1)
        rename_and_kill(m, fd2)
    m.start()
    assert wait_until(lambda: queue_empty(m), 60), mount_status(m)
    assert bucket_objects(s3, m.bucket) == {RENAMED: data}, m.log_tail(20)
    assert (m.path / RENAMED).read_bytes() == data


def test_a_thumbnail_queued_again_then_renamed_while_open_then_kill_9_keeps_the_queued_version(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client
) -> None:
    """v1 in S3; v2 (another size) written and closed through one of two descriptors (queued; S3
    refuses it), the other writes, the file is renamed, the daemon killed: v2 under the new name."""
    m = through(make_mount, proxy)
    v1, v2 = os.urandom(30_000), os.urandom(50_000)
    write(m, THUMB, v1)
    assert wait_until(lambda: bucket_objects(s3, m.bucket).get(THUMB) == v1 and queue_empty(m), 30)
    # Only the old name's PUTs are refused: the rename copies v1 to the new name.
    with proxy.fault("http_503", only=f"PUT /{m.bucket}/{THUMB}"):
        fd1 = os.open(m.path / THUMB, os.O_WRONLY)
        fd2 = os.open(m.path / THUMB, os.O_WRONLY)
        os.write(fd1, v2)
        os.close(fd1)
        os.pwrite(fd2, v2[:10], 0)  # the same bytes: still v2, but written again
        rename_and_kill(m, fd2)
    m.start()
    assert wait_until(lambda: queue_empty(m), 60), mount_status(m)
    assert bucket_objects(s3, m.bucket) == {RENAMED: v2}, m.log_tail(20)
    assert (m.path / RENAMED).read_bytes() == v2
