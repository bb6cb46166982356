"""Large writes: full parts go up while the file is still being written (pipelined multipart)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from s3cachefs.s3 import S3, IntegrityError, SyncS3

from .harness import MakeMount, Mount, S3Server, wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1024 * 1024
PIPELINE = ["--multipart-threshold", "8M", "--multipart-chunksize", "5M"]


def parts_in_flight(s3: S3Client, bucket: str, key: str) -> int:
    uploads = [u for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) if u["Key"] == key]
    if not uploads:
        return 0
    return len(s3.list_parts(Bucket=bucket, Key=key, UploadId=uploads[0]["UploadId"]).get("Parts", []))


def test_a_large_sequential_write_uploads_its_parts_before_close(make_mount: MakeMount, s3: S3Client) -> None:
    m = make_mount(extra_args=PIPELINE)
    key = "local_content/ab/cd/video"
    data = os.urandom(40 * MiB + 77)
    os.makedirs(m.path / "local_content/ab/cd")
    with open(m.path / key, "wb") as f:
        for off in range(0, 30 * MiB, MiB):
            f.write(data[off : off + MiB])
            f.flush()  # Python's buffer only: each MiB reaches the mount now
        # 30 MiB written, file still open: its first full 5 MiB parts are already in S3.
        assert wait_until(lambda: parts_in_flight(s3, m.bucket, key) >= 4, 30)
        assert s3.list_objects_v2(Bucket=m.bucket).get("KeyCount", 0) == 0, "no object before close()"
        f.write(data[30 * MiB :])
    obj = s3.get_object(Bucket=m.bucket, Key=key)
    assert obj["Body"].read() == data
    assert obj["ETag"].strip('"').endswith("-9")  # 8 full 5 MiB parts and the tail
    assert s3.list_multipart_uploads(Bucket=m.bucket).get("Uploads", []) == []


def test_a_write_that_goes_back_falls_back_to_a_whole_upload(make_mount: MakeMount, s3: S3Client) -> None:
    m = make_mount(extra_args=PIPELINE)
    key = "local_content/ab/cd/patched"
    data = bytearray(os.urandom(24 * MiB))
    os.makedirs(m.path / "local_content/ab/cd")
    with open(m.path / key, "wb") as f:
        f.write(data[: 20 * MiB])
        f.flush()
        f.seek(MiB)  # back into a part that may be in S3 already
        f.write(b"patched!")
        data[MiB : MiB + 8] = b"patched!"
        f.seek(20 * MiB)
        f.write(data[20 * MiB :])
    assert s3.get_object(Bucket=m.bucket, Key=key)["Body"].read() == bytes(data)
    # The abandoned multipart upload is aborted in the background.
    assert wait_until(lambda: s3.list_multipart_uploads(Bucket=m.bucket).get("Uploads", []) == [], 30)


def test_a_flush_in_the_middle_of_a_write_never_leaves_a_truncated_object(
    mounted: Mount, s3: S3Client
) -> None:
    # Another fd of the same open file is closed while the writer goes on (a child process closing
    # an inherited fd, or dup + close): FUSE sends a FLUSH, which uploads what is there so far.
    # The writes that follow must make the real close() upload again, never report a stale success.
    key = "local_content/ab/cd/racy"
    data = os.urandom(12 * MiB)
    os.makedirs(mounted.path / "local_content/ab/cd")
    fd = os.open(mounted.path / key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    closers: list[threading.Thread] = []
    try:
        for off in range(0, len(data), 64 * 1024):
            os.write(fd, data[off : off + 64 * 1024])
            if off in (2 * MiB, 4 * MiB, 6 * MiB):
                # Closed by another thread: its flush uploads while this one keeps writing.
                closers.append(threading.Thread(target=os.close, args=(os.dup(fd),)))
                closers[-1].start()
    finally:
        for t in closers:
            t.join(60)
        os.close(fd)
    assert s3.get_object(Bucket=mounted.bucket, Key=key)["Body"].read() == data
    assert os.path.getsize(mounted.path / key) == len(data)


def test_a_pipelined_upload_records_the_md5_of_the_whole_file(make_mount: MakeMount, s3: S3Client) -> None:
    # The MD5 is taken part by part while the parts go up, and the tail at close(); the first read
    # after a remount checks the cached copy against it, so a wrong one would show as "damaged".
    m = make_mount(extra_args=PIPELINE)
    key = "local_content/ab/cd/clip"
    data = os.urandom(23 * MiB + 5)
    os.makedirs(m.path / "local_content/ab/cd")
    with open(m.path / key, "wb") as f:
        for off in range(0, len(data), MiB):
            f.write(data[off : off + MiB])
            f.flush()
    assert s3.get_object(Bucket=m.bucket, Key=key)["ETag"].strip('"').endswith("-5")
    m.unmount()
    m.start()
    assert (m.path / key).read_bytes() == data
    assert "damaged" not in m.log_text()


def test_files_written_in_sequence_whole_or_in_part_are_recorded_with_the_md5_of_their_bytes(
    make_mount: MakeMount, s3: S3Client
) -> None:
    # A sequential writer's bytes are hashed as they are written, for the PUT's Content-MD5 at
    # close(); the file's other bytes (an in-place rewrite of the start of a file, a write that went
    # back) are hashed at close(). S3 refuses a wrong Content-MD5, and the first read after a
    # remount checks the cached copy against the recorded MD5 (a wrong one shows as "damaged").
    m = make_mount()
    d = m.path / "local_content/ab/cd"
    os.makedirs(d)
    new, rewritten, back = os.urandom(300_000), os.urandom(200_000), os.urandom(150_000)
    with open(d / "new", "wb") as f:
        for off in range(0, len(new), 64 * 1024):
            f.write(new[off : off + 64 * 1024])
    (d / "rewritten").write_bytes(rewritten)
    head = os.urandom(70_000)
    with open(d / "rewritten", "r+b") as f:  # no O_TRUNC: the rest of the file is the old bytes
        f.write(head)
    rewritten = head + rewritten[len(head) :]
    with open(d / "back", "wb") as f:
        f.write(back[:100_000])
        f.seek(10)
        f.write(back[10:20])
        f.seek(100_000)
        f.write(back[100_000:])
    files = {"new": new, "rewritten": rewritten, "back": back}
    for name, data in files.items():
        obj = s3.get_object(Bucket=m.bucket, Key=f"local_content/ab/cd/{name}")
        assert obj["Body"].read() == data
        assert obj["ETag"].strip('"') == hashlib.md5(data).hexdigest()
    m.unmount()
    m.start()
    for name, data in files.items():
        assert (d / name).read_bytes() == data
    assert "damaged" not in m.log_text()
    assert "hashing it whole" not in m.log_text(), "the MD5 taken as the files were written was right"


@pytest.mark.parametrize("size", [100_000, 9 * MiB], ids=["in-memory-body", "file-body"])
def test_a_put_whose_md5_taken_as_written_is_wrong_is_made_again_with_the_whole_file_hashed(
    s3server: S3Server, s3: S3Client, bucket: str, tmp_path: Path, size: int
) -> None:
    """A write out of sequence through another descriptor while a close()'s PUT reads the file can
    make the MD5 of its first bytes, taken as they were written, wrong for the bytes sent: the PUT is
    made again with the whole file hashed, and the object and the recorded MD5 are right."""
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    sync = SyncS3(s3server.options(bucket))
    key = "local_content/ab/cd/f"
    for head in (hashlib.md5(os.urandom(1000)), hashlib.md5(data[:1000])):  # wrong, then right
        info = sync.put_single(key, str(path), (head, 1000))
        assert info.md5 == hashlib.md5(data).hexdigest()
        obj = s3.get_object(Bucket=bucket, Key=key)
        assert obj["Body"].read() == data
        assert obj["ETag"].strip('"') == info.md5
        s3.delete_object(Bucket=bucket, Key=key)


@pytest.mark.parametrize("size", [300_000, 11 * 1024 * 1024], ids=["one_put", "multipart"])
def test_an_upload_told_the_md5_its_file_was_checked_to_have_stores_nothing_else(
    s3server: S3Server, bucket: str, s3: S3Client, tmp_path: Path, size: int
) -> None:
    """A queued upload's cached copy, checked against its MD5, then changed (damage, tampering)
    before the upload reads it: put_file(expect_md5=...) fails, and the bucket gets nothing."""
    path = tmp_path / "f"
    data = os.urandom(size)
    path.write_bytes(data)
    checked = hashlib.md5(data[:-1] + bytes([data[-1] ^ 1])).hexdigest()  # before one byte changed
    part = 5 * 1024 * 1024
    client = S3(
        s3server.options(bucket, multipart_threshold=part, multipart_chunksize=part), trio.CapacityLimiter(4)
    )

    async def refused() -> None:
        with pytest.raises(IntegrityError, match="changed since it was checked"):
            await client.put_file("k", str(path), expect_md5=checked)

    trio.run(refused)
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), "the refused upload was aborted"
    info = trio.run(lambda: client.put_file("k", str(path), expect_md5=hashlib.md5(data).hexdigest()))
    assert info.md5 == hashlib.md5(data).hexdigest()
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == data
