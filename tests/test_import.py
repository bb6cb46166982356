"""`s3cachefs import`: an existing media_store into the bucket, run as the CLI on the SeaweedFS fixture.

Every run is the real command in a subprocess (so exit codes, signals and output are what a user gets);
the bucket is checked with a separate boto3 client.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from s3cachefs.s3 import MAX_PARTS, parts_of

from .harness import REPO_ROOT, TEST_REGION, MakeMount, S3Server, bucket_objects, wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

MiB = 1024 * 1024
PREFIX = "media/"
# Small parts keep the multipart file small: 11 MiB + 7 is three 5 MiB parts.
SMALL_PARTS = ["--multipart-threshold", "5M", "--multipart-chunksize", "5M"]
BIG = "local_content/Zz/Zz/bigvideoabcdefghijkl"


def media_store(root: Path) -> dict[str, bytes]:
    """Synapse's layout (synapse/media/filepath.py), sizes mixed, one file above the multipart threshold."""
    files = {
        "local_content/ab/cd/efghijklmnopqrstuvwx": os.urandom(48 * 1024 + 17),
        "local_content/ab/ce/fghijklmnopqrstuvwxy": os.urandom(700),
        BIG: os.urandom(11 * MiB + 7),
        "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/32-32-image-jpeg-crop": os.urandom(1500),
        "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/320-240-image-jpeg-scale": os.urandom(30_000),
        "remote_content/matrix.org/Qx/Yz/AbCdEfGhIjKlMnOpQrSt": os.urandom(200_000),
        "remote_thumbnail/matrix.org/Qx/Yz/AbCdEfGhIjKlMnOpQrSt/96-96-image-png-crop": os.urandom(3000),
        "remote_content/example.com/aa/bb/empty": b"",
        "url_cache/2024-01-01/abcdefghij": os.urandom(4000),
        "url_cache_thumbnails/ab/cd/efghij/32-32-image-png-crop": os.urandom(500),
    }
    for rel, data in files.items():
        write(root / rel, data)
    return files


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def not_url_cache(files: dict[str, bytes]) -> dict[str, bytes]:
    """What an import puts in the bucket: everything but url_cache (an empty file as a 0-byte object,
    as the mount stores a file empty at its last close)."""
    return {rel: data for rel, data in files.items() if not rel.startswith("url_cache")}


def import_cmd(server: S3Server, src: Path, bucket: str, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "s3cachefs.cli", "import", str(src), bucket,
        "--endpoint-url", server.endpoint_url,
        "--region", TEST_REGION,
        *args,
    ]  # fmt: skip


def env_for(server: S3Server) -> dict[str, str]:
    return server.env() | {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}


def run_import(
    server: S3Server, src: Path, bucket: str, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        import_cmd(server, src, bucket, *args),
        env=env_for(server),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def summary(stdout: str) -> dict[str, int]:
    """The counts of the summary: {'uploaded': 3, 'already in S3': 1, 'failed': 0, ...}."""
    counts = {}
    for label, n in re.findall(r"^  ([a-zA-Z0-9_* ]+):\s+(\d+)\b", stdout, re.M):
        counts[label.strip()] = int(n)
    return counts


def keys_in(s3: S3Client, bucket: str) -> set[str]:
    out: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update(o["Key"] for o in page.get("Contents", []))
    return out


def many_small_files(root: Path, n: int) -> dict[str, bytes]:
    files = {f"local_content/{i % 16:02x}/{i:04x}/media{i:05d}": os.urandom(2000 + i) for i in range(n)}
    for rel, data in files.items():
        write(root / rel, data)
    return files


def start_import(server: S3Server, src: Path, bucket: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        import_cmd(server, src, bucket, *args),
        env=env_for(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_group(proc: subprocess.Popen[str], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


# -- importing --------------------------------------------------------------------------------------


def test_a_synapse_media_store_lands_under_the_prefix_and_url_cache_stays_behind(
    s3server: S3Server, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "media_store"
    files = media_store(src)
    wanted = not_url_cache(files)

    r = run_import(s3server, src, bucket, "--prefix", PREFIX, *SMALL_PARTS)

    assert r.returncode == 0, r.stdout + r.stderr
    assert bucket_objects(s3, bucket) == {PREFIX + rel: data for rel, data in wanted.items()}
    assert s3.head_object(Bucket=bucket, Key=PREFIX + BIG)["ETag"].strip('"').endswith("-3")
    counts = summary(r.stdout)
    assert counts["uploaded"] == len(wanted)
    assert counts["already in S3"] == 0
    assert counts["skipped url_cache*"] == 2
    assert counts["failed"] == 0
    assert "OK: every file is in S3 and verified" in r.stdout
    # The source is left alone without --delete-source.
    assert all((src / rel).read_bytes() == data for rel, data in files.items())

    # A second run finds everything in place, the multipart object too (its part size comes from S3).
    again = run_import(s3server, src, bucket, "--prefix", PREFIX, *SMALL_PARTS)
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary(again.stdout)["uploaded"] == 0
    assert summary(again.stdout)["already in S3"] == len(wanted)


def test_include_url_cache_imports_url_previews_too(
    s3server: S3Server, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    files = media_store(tmp_path / "src")
    r = run_import(s3server, tmp_path / "src", bucket, "--include-url-cache", *SMALL_PARTS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert keys_in(s3, bucket) == set(files)  # the empty file too, as a 0-byte object


def test_dry_run_lists_what_it_would_upload_and_uploads_nothing(
    s3server: S3Server, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    files = not_url_cache(media_store(tmp_path / "src"))
    r = run_import(s3server, tmp_path / "src", bucket, "--dry-run", "--delete-source", *SMALL_PARTS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert keys_in(s3, bucket) == set()
    listed = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("upload ")}
    assert listed == set(files)
    assert summary(r.stdout)["would upload"] == len(files)
    assert all((tmp_path / "src" / rel).exists() for rel in files), "--dry-run deletes nothing"


def test_an_interrupted_run_resumes_and_uploads_only_what_is_missing(
    s3server: S3Server, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = many_small_files(src, 400)
    files[BIG] = os.urandom(11 * MiB + 7)  # walked last ("Zz" sorts after the hex names)
    write(src / BIG, files[BIG])

    proc = start_import(s3server, src, bucket, "--jobs", "1", *SMALL_PARTS)
    try:
        assert wait_until(lambda: len(keys_in(s3, bucket)) >= 20, 60, interval=0.02), "no progress"
    finally:
        stop_group(proc, signal.SIGKILL)
        proc.communicate(timeout=30)
    present = keys_in(s3, bucket)
    assert 20 <= len(present) < len(files), "the first run must be cut off half-way"

    r = run_import(s3server, src, bucket, *SMALL_PARTS)

    assert r.returncode == 0, r.stdout + r.stderr
    counts = summary(r.stdout)
    assert counts["already in S3"] == len(present) > 0  # each complete object, verified by checksum
    assert counts["uploaded"] == len(files) - len(present)
    assert counts["uploaded"] + counts["already in S3"] == len(files)
    assert bucket_objects(s3, bucket) == files


def test_an_object_of_the_same_size_but_other_bytes_is_replaced(
    s3server: S3Server, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    same, other = "local_content/ab/cd/same", "local_content/ab/cd/other"
    write(src / same, b"A" * 5000)
    write(src / other, b"B" * 5000)
    s3.put_object(Bucket=bucket, Key=same, Body=b"A" * 5000)
    s3.put_object(Bucket=bucket, Key=other, Body=b"C" * 5000)  # same size, different bytes

    r = run_import(s3server, src, bucket)

    assert r.returncode == 0, r.stdout + r.stderr
    assert bucket_objects(s3, bucket) == {same: b"A" * 5000, other: b"B" * 5000}
    counts = summary(r.stdout)
    assert (counts["uploaded"], counts["already in S3"]) == (1, 1)
    assert "1 file replaced: the object in S3 differed" in r.stdout


def test_an_identical_multipart_object_with_other_part_sizes_is_recognised(
    s3server: S3Server, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(13 * MiB + 5)
    write(tmp_path / "src" / BIG, data)
    # Uploaded by another tool with 6 MiB parts; import would use 5 MiB parts.
    up = s3.create_multipart_upload(Bucket=bucket, Key=BIG)
    parts: list[CompletedPartTypeDef] = []
    for n, off in enumerate(range(0, len(data), 6 * MiB), start=1):
        p = s3.upload_part(
            Bucket=bucket, Key=BIG, UploadId=up["UploadId"], PartNumber=n, Body=data[off : off + 6 * MiB]
        )
        parts.append({"ETag": p["ETag"], "PartNumber": n})
    s3.complete_multipart_upload(
        Bucket=bucket, Key=BIG, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    before = s3.head_object(Bucket=bucket, Key=BIG)["LastModified"]

    r = run_import(s3server, tmp_path / "src", bucket, *SMALL_PARTS)

    assert r.returncode == 0, r.stdout + r.stderr
    assert summary(r.stdout)["already in S3"] == 1
    assert s3.head_object(Bucket=bucket, Key=BIG)["LastModified"] == before, "not uploaded again"


def test_one_config_file_serves_mount_and_import(
    s3server: S3Server, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    write(tmp_path / "src/local_content/ab/cd/efgh", b"hello")
    conf = tmp_path / "s3cachefs.toml"
    conf.write_text(
        f'bucket = "{bucket}"\nprefix = "{PREFIX}"\nendpoint_url = "{s3server.endpoint_url}"\n'
        f'region_name = "{TEST_REGION}"\nmountpoint = "/nonexistent/mnt"\ncache_size = "1G"\n'
        'listing = false\n\n[[cache_policy]]\nprefix = "url_cache/"\nlocal_only = true\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "s3cachefs.cli", "import", str(tmp_path / "src"), "--config", str(conf)],
        env=env_for(s3server),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert bucket_objects(s3, bucket) == {PREFIX + "local_content/ab/cd/efgh": b"hello"}


def test_a_mount_of_the_imported_bucket_serves_the_old_media_store(
    s3server: S3Server, bucket: str, tmp_path: Path, make_mount: MakeMount
) -> None:
    files = not_url_cache(media_store(tmp_path / "src"))
    r = run_import(s3server, tmp_path / "src", bucket, "--prefix", PREFIX, *SMALL_PARTS)
    assert r.returncode == 0, r.stdout + r.stderr

    m = make_mount(bucket=bucket, extra_args=["--prefix", PREFIX])
    for rel, data in files.items():
        assert (m.path / rel).read_bytes() == data, rel


# -- deleting the source ----------------------------------------------------------------------------


def test_delete_source_removes_only_verified_files_and_the_directories_they_leave_empty(
    s3server: S3Server, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    good = {
        "local_content/ab/cd/efghij": os.urandom(3000),
        "local_thumbnails/ab/cd/efghij/32-32-image-jpeg-crop": os.urandom(300),
        "remote_content/matrix.org/ab/cd/already": os.urandom(900),
    }
    for rel, data in good.items():
        write(src / rel, data)
    s3.put_object(Bucket=bucket, Key="remote_content/matrix.org/ab/cd/already", Body=good[
        "remote_content/matrix.org/ab/cd/already"
    ])  # fmt: skip
    bad_dir = src / "local_content/zz/yy"
    bad_dir.mkdir(parents=True)
    bad_name = os.fsencode(bad_dir) + b"/not-utf8-\xff\xfe"
    with open(bad_name, "wb") as f:  # S3 keys must be UTF-8: this one fails
        f.write(b"bad")
    os.mkfifo(src / "local_content/zz/fifo")
    (src / "local_content/zz/link").symlink_to("yy")
    write(src / "url_cache/ab/cd/preview", b"preview")

    r = run_import(s3server, src, bucket, "--delete-source")

    assert r.returncode == 1, r.stdout + r.stderr
    assert bucket_objects(s3, bucket) == good
    counts = summary(r.stdout)
    assert (counts["uploaded"], counts["already in S3"], counts["failed"]) == (2, 1, 1)
    assert counts["skipped unsupported"] == 2
    assert counts["deleted from source"] == 3
    assert "not valid UTF-8" in r.stdout and "not valid UTF-8" in r.stderr
    # Verified files are gone (the one already in S3 too), with the directories they emptied...
    for rel in good:
        assert not (src / rel).exists(), rel
    assert not (src / "local_content/ab").exists()
    assert not (src / "local_thumbnails").exists()
    assert not (src / "remote_content").exists()
    # ...and everything that was not verified in S3 is still there, SRC_DIR too.
    assert os.path.exists(bad_name)
    assert (src / "local_content/zz/fifo").exists()
    assert (src / "local_content/zz/link").is_symlink()
    assert (src / "url_cache/ab/cd/preview").read_bytes() == b"preview"
    assert src.is_dir()


def test_sigterm_finishes_the_uploads_in_progress_and_deletes_only_verified_files(
    s3server: S3Server, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = many_small_files(src, 400)
    proc = start_import(s3server, src, bucket, "--jobs", "2", "--delete-source")
    try:
        assert wait_until(lambda: len(keys_in(s3, bucket)) >= 20, 60, interval=0.02), "no progress"
        stop_group(proc, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        stop_group(proc, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "INTERRUPTED by SIGTERM" in out
    in_s3 = bucket_objects(s3, bucket)
    deleted = {rel for rel in files if not (src / rel).exists()}
    assert 0 < len(deleted) < len(files), "stopped half-way"
    assert all(in_s3.get(rel) == files[rel] for rel in deleted), "deleted without a verified copy"
    assert summary(out)["deleted from source"] == len(deleted) == summary(out)["uploaded"]

    r = run_import(s3server, src, bucket, "--delete-source")  # the rest, and the stray ones in S3
    assert r.returncode == 0, r.stdout + r.stderr
    assert bucket_objects(s3, bucket) == files
    assert list(src.iterdir()) == []


# -- usage and access errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jobs", "0"], "--jobs"),
        (["--multipart-chunksize", "1M"], "multipart_chunksize"),
        (["--storage-class", "GLACIERX"], "storage_class"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    s3server: S3Server, bucket: str, tmp_path: Path, args: Sequence[str], message: str
) -> None:
    write(tmp_path / "src/local_content/ab/cd/x", b"x")
    r = run_import(s3server, tmp_path / "src", bucket, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s3cachefs") and message in lines[0], r.stderr
    assert r.stdout == ""


def test_importing_from_an_s3cachefs_mount_is_refused(
    s3server: S3Server, make_mount: MakeMount, bucket: str
) -> None:
    m = make_mount(bucket=bucket)
    write(m.path / "local_content/ab/cd/efgh", b"in the bucket already")
    # With --delete-source this would delete the objects themselves, through the mount.
    r = run_import(s3server, m.path / "local_content", bucket, "--delete-source")
    assert r.returncode == 2 and "is on an s3cachefs mount" in r.stderr, r.stderr
    assert (m.path / "local_content/ab/cd/efgh").read_bytes() == b"in the bucket already"


def test_a_missing_source_directory_exits_2(s3server: S3Server, bucket: str, tmp_path: Path) -> None:
    r = run_import(s3server, tmp_path / "nowhere", bucket)
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"s3cachefs: error: SRC_DIR {tmp_path / 'nowhere'}: not a directory"
    )


@pytest.mark.parametrize(
    ("case", "code"),
    [("missing bucket", 2), ("refused credentials", 2), ("unreachable endpoint", 1)],
)
def test_access_problems_stop_the_run_before_anything_happens(
    s3server: S3Server, s3: S3Client, tmp_path: Path, case: str, code: int
) -> None:
    write(tmp_path / "src/local_content/ab/cd/x", b"x")
    bucket = s3server.new_bucket()
    server, args = s3server, ["--max-attempts", "1", "--delete-source"]
    if case == "missing bucket":
        bucket = "no-such-bucket-here"
    elif case == "refused credentials":
        server = S3Server.__new__(S3Server)  # same endpoint, wrong secret
        server.__dict__.update(s3server.__dict__, secret_key="wrong-secret")
    cmd = import_cmd(server, tmp_path / "src", bucket, *args)
    if case == "unreachable endpoint":
        cmd[cmd.index("--endpoint-url") + 1] = "http://127.0.0.1:9"  # discard port: nothing listens
    r = subprocess.run(cmd, env=env_for(server), capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s3cachefs: error:") and "Traceback" not in r.stderr
    assert (tmp_path / "src/local_content/ab/cd/x").read_bytes() == b"x"
    if case != "missing bucket":
        assert keys_in(s3, bucket) == set()


def test_a_file_too_large_for_10000_parts_is_cut_into_doubled_parts_that_cover_it_exactly() -> None:
    # Import and the mount share this rule (s3.parts_of); a real upload of 50 GB is out of reach here.
    size = MAX_PARTS * 5 * MiB + 1
    parts = list(parts_of(size, 5 * MiB))
    assert len(parts) <= MAX_PARTS
    assert {length for _, _, length in parts[:-1]} == {10 * MiB}
    assert [number for number, _, _ in parts] == list(range(1, len(parts) + 1))
    ends = [offset + length for _, offset, length in parts]
    assert [offset for _, offset, _ in parts] == [0, *ends[:-1]] and ends[-1] == size
