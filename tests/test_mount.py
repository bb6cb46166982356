"""Real mounts on a real SeaweedFS, driven with the plain `os` calls Synapse makes.

Each test names the behaviour it proves. "S3 is paused" (SIGSTOP of the server) is how these tests prove
that an operation needs no S3 request: a request would hang until the client timeout and fail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import botocore.utils
import pytest

from s3cachefs.s3.sync import parse_timestamp

from .harness import (
    REPO_ROOT,
    MakeMount,
    Mount,
    S3Server,
    bucket_objects,
    circuit_closed,
    dir_bytes,
    pages_in_page_cache,
    queues_empty,
    wait_until,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.mount

ORIGINAL = "local_content/ab/cd/efghijklmnopqrstuvwx"
THUMB_DIR = "local_thumbnails/ab/cd/efghijklmnopqrstuvwx"
THUMBS = ("32-32-image-jpeg-crop", "96-96-image-jpeg-crop", "320-240-image-jpeg-scale")
# Short S3 timeouts for tests that stop or pause the server, so that a wrong S3 request fails fast.
FAST_FAIL = ["--max-attempts", "2", "--connect-timeout", "2", "--read-timeout", "3"]


def store_like_synapse(path: Path, data: bytes, chunk: int = 64 * 1024) -> None:
    """MediaStorage.store_into_file: makedirs(exist_ok), open 'wb' at the final path, sequential writes."""
    os.makedirs(path.parent, exist_ok=True)
    with open(path, "wb") as f:
        for i in range(0, len(data), chunk):
            f.write(data[i : i + chunk])


def read_like_pillow(path: Path) -> bytes:
    """Header read, a seek to the end and back, then everything: the thumbnailer's access pattern."""
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(-8, os.SEEK_END)
        f.read(8)
        f.seek(0)
        whole = f.read()
    assert whole[:16] == head
    return whole


def keys(s3: S3Client, bucket: str) -> set[str]:
    return set(bucket_objects(s3, bucket))


@contextmanager
def s3_paused(server: S3Server) -> Iterator[None]:
    server.pause()
    try:
        yield
    finally:
        server.resume()


# -- writes -----------------------------------------------------------------------------------------


def test_close_returns_only_once_the_whole_object_is_in_s3(mounted: Mount, s3: S3Client) -> None:
    data = os.urandom(48 * 1024 + 17)
    store_like_synapse(mounted.path / ORIGINAL, data)
    # No wait, no retry: the object must be there the moment close() has returned.
    assert s3.get_object(Bucket=mounted.bucket, Key=ORIGINAL)["Body"].read() == data
    assert os.path.getsize(mounted.path / ORIGINAL) == len(data)


def test_nothing_appears_in_the_bucket_before_close(mounted: Mount, s3: S3Client) -> None:
    path = mounted.path / ORIGINAL
    os.makedirs(path.parent, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * 100_000)
        f.flush()  # Python's buffer only; FUSE sees writes, not a close
        assert keys(s3, mounted.bucket) == set(), "no 0-byte placeholder, no partial object, no dir marker"
    assert keys(s3, mounted.bucket) == {ORIGINAL}


def test_prefix_is_concatenated_to_the_relative_path_without_a_slash(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    for prefix in ("foo", "media/"):
        m = make_mount(bucket=bucket, extra_args=["--prefix", prefix])
        store_like_synapse(m.path / ORIGINAL, b"abc")
        m.unmount()
    assert keys(s3, bucket) == {"foo" + ORIGINAL, "media/" + ORIGINAL}


def test_large_file_goes_up_as_multipart_and_arrives_whole(mounted: Mount, s3: S3Client) -> None:
    data = os.urandom(20 * 1024 * 1024 + 5)  # over the default 16M threshold: 8M parts
    store_like_synapse(mounted.path / ORIGINAL, data, chunk=1024 * 1024)
    obj = s3.get_object(Bucket=mounted.bucket, Key=ORIGINAL)
    assert obj["ETag"].strip('"').endswith("-3"), obj["ETag"]
    assert obj["Body"].read() == data


def test_overwriting_a_thumbnail_replaces_the_object(mounted: Mount, s3: S3Client) -> None:
    path = mounted.path / THUMB_DIR / THUMBS[0]
    store_like_synapse(path, b"first version, longer than the second")
    store_like_synapse(path, b"second")
    assert path.read_bytes() == b"second"
    # Thumbnails are uploaded from the queue (upload = "async"): the second version must be what
    # S3 ends with, whichever order the queue met them in.
    assert wait_until(lambda: queues_empty(mounted), 30)
    assert s3.get_object(Bucket=mounted.bucket, Key=f"{THUMB_DIR}/{THUMBS[0]}")["Body"].read() == b"second"


def test_append_and_truncate_rewrite_the_whole_object(mounted: Mount, s3: S3Client) -> None:
    path = mounted.path / ORIGINAL
    store_like_synapse(path, b"0123456789")
    with open(path, "ab") as f:
        f.write(b"abc")
    assert s3.get_object(Bucket=mounted.bucket, Key=ORIGINAL)["Body"].read() == b"0123456789abc"
    os.truncate(path, 4)
    assert s3.get_object(Bucket=mounted.bucket, Key=ORIGINAL)["Body"].read() == b"0123"
    assert path.read_bytes() == b"0123"


def test_fsync_makes_the_data_durable_before_close(mounted: Mount, s3: S3Client) -> None:
    path = mounted.path / ORIGINAL
    os.makedirs(path.parent, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"synced part")
        f.flush()
        os.fsync(f.fileno())
        assert s3.get_object(Bucket=mounted.bucket, Key=ORIGINAL)["Body"].read() == b"synced part"
        f.write(b" and the rest")
    assert s3.get_object(Bucket=mounted.bucket, Key=ORIGINAL)["Body"].read() == b"synced part and the rest"


def test_failed_upload_fails_close_and_leaves_nothing_in_the_bucket(
    make_mount: MakeMount, own_s3server: S3Server
) -> None:
    m = make_mount(server=own_s3server, extra_args=FAST_FAIL)
    s3 = own_s3server.client()
    store_like_synapse(m.path / "local_content/aa/aa/before", b"ok")

    own_s3server.kill()
    small, large = m.path / ORIGINAL, m.path / "local_content/ab/cd/large"
    for path, size in ((small, 100_000), (large, 20 * 1024 * 1024)):
        with pytest.raises(OSError) as exc:
            store_like_synapse(path, os.urandom(size), chunk=1024 * 1024)
        assert exc.value.errno == errno.EIO
        # The write never reached S3, so the mount does not pretend it did.
        assert not path.exists()

    own_s3server.start()
    # The outage opened the circuit breaker; its probe closes it within a second or two.
    assert wait_until(lambda: circuit_closed(m), 30)
    assert keys(s3, m.bucket) == {"local_content/aa/aa/before"}
    uploads = s3.list_multipart_uploads(Bucket=m.bucket).get("Uploads", [])
    assert uploads == [], "the failed multipart upload was aborted"
    # The mount stayed up and works again without a remount.
    store_like_synapse(small, b"after the outage")
    assert s3.get_object(Bucket=m.bucket, Key=ORIGINAL)["Body"].read() == b"after the outage"


@pytest.mark.parametrize("new_size", ["same", "other"])
def test_failed_overwrite_keeps_serving_the_version_in_s3(
    make_mount: MakeMount, own_s3server: S3Server, new_size: str
) -> None:
    """Same size: only the mount's own invalidation keeps the kernel from serving the pages of the
    write that failed (a size change makes the kernel drop them by itself)."""
    m = make_mount(server=own_s3server, extra_args=FAST_FAIL)
    path = m.path / ORIGINAL
    old = os.urandom(200_000)
    store_like_synapse(path, old)
    assert path.read_bytes() == old
    own_s3server.kill()
    with pytest.raises(OSError):
        store_like_synapse(path, os.urandom(len(old) if new_size == "same" else 300_000))
    own_s3server.start()
    assert path.read_bytes() == old
    assert own_s3server.client().get_object(Bucket=m.bucket, Key=ORIGINAL)["Body"].read() == old


def test_a_reader_opened_after_fsync_never_reads_a_later_write_that_failed(
    make_mount: MakeMount, own_s3server: S3Server
) -> None:
    """fsync() puts the file in S3 and in the cache; a reader that opens then holds the cached copy,
    which the writer goes on changing. When the final upload fails, S3 still holds the fsync()ed
    version, and so must the reader see, including in the page the failed write touched in part."""
    m = make_mount(server=own_s3server, extra_args=FAST_FAIL)
    path = m.path / ORIGINAL
    os.makedirs(path.parent)
    synced = os.urandom(100_000)
    f = open(path, "wb", buffering=0)  # noqa: SIM115 (its close() must be seen failing)
    try:
        f.write(synced)
        os.fsync(f.fileno())
        with open(path, "rb", buffering=0) as reader:
            f.seek(10)
            f.write(b"N" * 100)
            own_s3server.kill()
            with pytest.raises(OSError):
                f.close()
            own_s3server.start()
            assert wait_until(lambda: circuit_closed(m), 30)  # the breaker's probe sees S3 back
            assert reader.read(4096) == synced[:4096]
    finally:
        if not f.closed:
            with contextlib.suppress(OSError):
                f.close()
    assert path.read_bytes() == synced
    assert own_s3server.client().get_object(Bucket=m.bucket, Key=ORIGINAL)["Body"].read() == synced


# -- reads ------------------------------------------------------------------------------------------


def test_rereads_right_after_close_are_served_from_local_disk(mounted: Mount, s3server: S3Server) -> None:
    data = os.urandom(300 * 1024)
    store_like_synapse(mounted.path / ORIGINAL, data)
    with s3_paused(s3server):
        assert os.path.getsize(mounted.path / ORIGINAL) == len(data)
        assert read_like_pillow(mounted.path / ORIGINAL) == data


def test_a_file_read_back_after_its_write_comes_from_the_kernels_page_cache(mounted: Mount) -> None:
    """Synapse reads what it wrote at once (thumbnailing): the pages written stay in the kernel's page
    cache across close(), so that read needs no FUSE request. That holds only while the mtime the
    mount reports does not move at close: the kernel drops an inode's pages when it does."""
    path = mounted.path / ORIGINAL
    data = os.urandom(2 * 1024 * 1024)
    os.makedirs(path.parent)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        mtime_while_written = os.fstat(f.fileno()).st_mtime_ns
    assert os.stat(path).st_mtime_ns == mtime_while_written
    resident, total = pages_in_page_cache(path)
    assert (resident, total) == (512, 512)
    assert path.read_bytes() == data
    # A remount (a new kernel inode, filled from the index) shows the same mtime.
    mounted.unmount()
    mounted.start()
    assert os.stat(path).st_mtime_ns == mtime_while_written
    assert pages_in_page_cache(path) == (0, 512)
    assert path.read_bytes() == data


def test_read_after_the_cache_is_wiped_fetches_from_s3(make_mount: MakeMount) -> None:
    m = make_mount()
    data = os.urandom(200 * 1024)
    store_like_synapse(m.path / ORIGINAL, data)
    # Wiped under a running mount: the data files vanish, the index still says CACHED.
    shutil.rmtree(m.cache_dir / "data")
    assert read_like_pillow(m.path / ORIGINAL) == data
    # Wiped entirely between mounts: a cold start from S3 alone.
    m.unmount()
    m.wipe_cache()
    m.start()
    assert read_like_pillow(m.path / ORIGINAL) == data


@pytest.mark.parametrize("prefix", ["", "foo", "media/"])
def test_objects_already_in_the_bucket_are_listed_and_served(
    make_mount: MakeMount, s3: S3Client, bucket: str, prefix: str
) -> None:
    # Laid out the way synapse-s3-storage-provider writes them: plain objects, no metadata, no
    # markers, key = prefix + path concatenated as is ("foo" gives "foolocal_content/...").
    objects = {ORIGINAL: os.urandom(5000)} | {f"{THUMB_DIR}/{t}": os.urandom(700) for t in THUMBS}
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=prefix + key, Body=body)
    s3.put_object(Bucket=bucket, Key="other/not-under-the-prefix", Body=b"x")
    m = make_mount(bucket=bucket, extra_args=["--prefix", prefix] if prefix else [])
    assert sorted(os.listdir(m.path / THUMB_DIR)) == sorted(THUMBS)
    for key, body in objects.items():
        assert os.path.isfile(m.path / key)
        assert (m.path / key).read_bytes() == body
    with os.scandir(m.path / "local_thumbnails/ab") as it:
        assert [(e.name, e.is_dir()) for e in it] == [("cd", True)]
    # Keys outside the prefix are not part of the mount.
    assert ("other" in os.listdir(m.path)) == (prefix == "")


def test_listed_objects_get_their_last_modified_time_as_mtime(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    # The listing's timestamps are parsed by s3/sync.py parse_timestamp (not dateutil: see there).
    s3.put_object(Bucket=bucket, Key=ORIGINAL, Body=b"x")
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"][0]["LastModified"]
    m = make_mount(bucket=bucket)
    os.listdir(m.path / "local_content")  # the listing, not a HEAD, gave the row
    assert os.stat(m.path / ORIGINAL).st_mtime == listed.timestamp()


@pytest.mark.parametrize(
    "value",
    [
        "2026-12-02T14:25:03.000Z",
        "2026-12-02T14:25:03.5+01:00",
        "Wed, 02 Dec 2026 14:25:03 GMT",
        "1764685503",
    ],
)
def test_timestamps_of_s3_answers_parse_as_botocore_parses_them(value: str) -> None:
    assert parse_timestamp(value) == botocore.utils.parse_timestamp(value)


def test_a_torn_cache_file_is_never_served(make_mount: MakeMount) -> None:
    m = make_mount()
    data = os.urandom(100 * 1024)
    store_like_synapse(m.path / ORIGINAL, data)
    m.unmount()
    # Damage the cached copy behind the index's back (a crash, a disk error, a curious admin).
    (cached,) = [p for p in (m.cache_dir / "data").rglob("*") if p.is_file()]
    with open(cached, "r+b") as f:
        f.truncate(1000)
    m.start()
    assert (m.path / ORIGINAL).read_bytes() == data


# -- metadata ---------------------------------------------------------------------------------------


def test_stat_and_listing_of_known_files_make_no_s3_request(
    make_mount: MakeMount, s3server: S3Server
) -> None:
    m = make_mount(extra_args=FAST_FAIL)
    sizes = {f"{THUMB_DIR}/{t}": 100 * (i + 1) for i, t in enumerate(THUMBS)}
    for rel, size in sizes.items():
        store_like_synapse(m.path / rel, os.urandom(size))
    # After a restart too: the index on disk answers, nothing is re-listed before it can.
    m.unmount()
    m.start()
    assert wait_until(lambda: "listed" in m.log_text().split("start:")[-1], 10), "background listing done"
    with s3_paused(s3server):
        for rel, size in sizes.items():
            assert os.path.isfile(m.path / rel)
            assert os.stat(m.path / rel).st_size == size
        assert sorted(os.listdir(m.path / THUMB_DIR)) == sorted(THUMBS)
        # A miss in a listed directory is authoritative: ENOENT without asking S3.
        assert not os.path.exists(m.path / THUMB_DIR / "800-600-image-jpeg-scale")


def test_makedirs_works_and_mkdir_of_an_existing_directory_gives_eexist(mounted: Mount, s3: S3Client) -> None:
    d = mounted.path / "local_content/ab/cd"
    os.makedirs(d, exist_ok=True)
    os.makedirs(d, exist_ok=True)
    with pytest.raises(FileExistsError):
        os.mkdir(d)
    with pytest.raises(FileExistsError):
        os.makedirs(d)
    assert d.is_dir()
    assert keys(s3, mounted.bucket) == set(), "directories leave no marker objects"


def test_unlink_removes_the_object_and_the_cached_copy(mounted: Mount, s3: S3Client) -> None:
    path = mounted.path / ORIGINAL
    store_like_synapse(path, os.urandom(10_000))
    assert dir_bytes(mounted.cache_dir / "data") == 10_000
    os.remove(path)
    assert not path.exists()
    assert keys(s3, mounted.bucket) == set()
    assert dir_bytes(mounted.cache_dir / "data") == 0
    with pytest.raises(FileNotFoundError):
        os.remove(path)


def test_rmtree_of_a_thumbnail_directory_and_rmdir_of_its_parents(mounted: Mount, s3: S3Client) -> None:
    store_like_synapse(mounted.path / ORIGINAL, b"original")
    for t in THUMBS:
        store_like_synapse(mounted.path / THUMB_DIR / t, b"thumb " + t.encode())
    # What Synapse's delete paths do: remove the original, rmtree the thumbnails, prune parents.
    os.remove(mounted.path / ORIGINAL)
    shutil.rmtree(mounted.path / THUMB_DIR)
    assert keys(s3, mounted.bucket) == set()
    with pytest.raises(OSError) as exc:
        os.rmdir(mounted.path / "local_thumbnails")
    assert exc.value.errno == errno.ENOTEMPTY
    os.rmdir(mounted.path / "local_thumbnails/ab/cd")
    os.rmdir(mounted.path / "local_thumbnails/ab")
    with pytest.raises(FileNotFoundError):
        os.rmdir(mounted.path / "local_thumbnails/ab")
    with pytest.raises(NotADirectoryError):
        store_like_synapse(mounted.path / "local_content/ab/cd/x", b"x")
        os.rmdir(mounted.path / "local_content/ab/cd/x")


def test_inode_numbers_are_stable_between_lstat_fstat_and_remounts(make_mount: MakeMount) -> None:
    m = make_mount()
    store_like_synapse(m.path / ORIGINAL, b"x")
    d = m.path / THUMB_DIR
    d.mkdir(parents=True)
    fd = os.open(d, os.O_RDONLY)
    try:
        assert os.path.samestat(os.lstat(d), os.fstat(fd))
    finally:
        os.close(fd)
    before = os.stat(m.path / ORIGINAL).st_ino
    m.unmount()
    m.start()
    assert os.stat(m.path / ORIGINAL).st_ino == before


def test_rename_of_a_file_moves_the_object(mounted: Mount, s3: S3Client) -> None:
    store_like_synapse(mounted.path / ORIGINAL, b"payload")
    dst = mounted.path / "remote_content/example.org/ab/cd/moved"
    dst.parent.mkdir(parents=True)
    os.rename(mounted.path / ORIGINAL, dst)
    assert keys(s3, mounted.bucket) == {"remote_content/example.org/ab/cd/moved"}
    assert dst.read_bytes() == b"payload"
    assert not (mounted.path / ORIGINAL).exists()


def test_rename_of_a_non_empty_directory_gives_exdev_and_of_an_empty_one_works(mounted: Mount) -> None:
    store_like_synapse(mounted.path / ORIGINAL, b"payload")
    with pytest.raises(OSError) as exc:
        os.rename(mounted.path / "local_content", mounted.path / "elsewhere")
    assert exc.value.errno == errno.EXDEV
    (mounted.path / "empty").mkdir()
    os.rename(mounted.path / "empty", mounted.path / "renamed")
    assert (mounted.path / "renamed").is_dir() and not (mounted.path / "empty").exists()


def test_files_show_the_configured_owner_and_sane_modes(make_mount: MakeMount) -> None:
    m = make_mount(extra_args=["--uid", "1234", "--gid", "4321"])
    store_like_synapse(m.path / ORIGINAL, b"x")
    f, d = os.stat(m.path / ORIGINAL), os.stat(m.path / "local_content")
    assert (f.st_uid, f.st_gid, d.st_uid, d.st_gid) == (1234, 4321, 1234, 4321)
    assert stat.S_IMODE(f.st_mode) == 0o644 and stat.S_ISREG(f.st_mode)
    assert stat.S_IMODE(d.st_mode) == 0o755 and stat.S_ISDIR(d.st_mode)
    st = os.statvfs(m.path)
    assert st.f_bavail > 0 and st.f_namemax == 255


def test_statfs_counts_the_files_in_the_background(mounted: Mount) -> None:
    # df's figures come from a count of the index made in a worker thread (a scan of every row
    # would stall the event loop at a million objects): they arrive shortly after the first statfs.
    for i in range(3):
        store_like_synapse(mounted.path / f"local_content/ab/cd/f{i}", b"x" * 100_000)

    def counted() -> bool:
        st = os.statvfs(mounted.path)
        return st.f_files - st.f_ffree == 3 and (st.f_blocks - st.f_bfree) * st.f_frsize >= 300_000

    assert wait_until(counted, 10)


def _as_user(uid: int, action: Callable[[], object]) -> int:
    """Run `action` in a forked child as `uid`: 0 if it worked, EACCES/EPERM if refused, 1 otherwise."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            action()
            code = 0
        except PermissionError as e:
            code = e.errno or errno.EACCES
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_allow_other_lets_the_owner_in_and_default_permissions_keeps_others_out(
    make_mount: MakeMount, tmp_path: Path
) -> None:
    owner, other = 4242, 4343
    # The mount point's parents must be searchable by the unprivileged users (pytest's are 0700).
    opened = [p for p in (tmp_path, *tmp_path.parents) if p != Path("/")]
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in opened}
    for p in opened:
        p.chmod(modes[p] | 0o011)
    try:
        m = make_mount(extra_args=["--allow-other", "--uid", str(owner), "--gid", str(owner)])
        with open("/proc/mounts") as f:
            opts = next(line.split()[3] for line in f if line.split()[1] == str(m.path))
        assert "allow_other" in opts.split(",") and "default_permissions" in opts.split(",")
        target = m.path / "local_content/new"

        def owner_writes() -> None:
            os.makedirs(target.parent)
            target.write_bytes(b"hi")

        def other_reads() -> None:
            if target.read_bytes() != b"hi":
                raise RuntimeError("wrong bytes")

        assert _as_user(owner, owner_writes) == 0
        assert _as_user(other, lambda: (target.parent / "intruder").write_bytes(b"x")) == errno.EACCES
        assert _as_user(other, other_reads) == 0
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


# -- process life -----------------------------------------------------------------------------------


def _run_cli(*args: str, server: S3Server, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = server.env() | {"PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "s3cachefs.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("case", "code"),
    [("missing bucket", 2), ("refused credentials", 2), ("unreachable endpoint", 1)],
)
def test_mount_fails_fast_and_clearly_before_the_mount_appears(
    s3server: S3Server, tmp_path: Path, case: str, code: int
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    bucket = s3server.new_bucket()
    args = [
        "mount",
        bucket,
        str(mnt),
        "-f",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--region",
        "us-east-1",
        "--endpoint-url",
        s3server.endpoint_url,
        "--max-attempts",
        "1",
    ]
    server = s3server
    if case == "missing bucket":
        args[1] = "no-such-bucket-here"
    elif case == "refused credentials":
        server = S3Server.__new__(S3Server)  # same endpoint, wrong secret
        server.__dict__.update(s3server.__dict__, secret_key="wrong-secret")
    else:
        args[args.index("--endpoint-url") + 1] = "http://127.0.0.1:9"  # discard port: nothing listens
    r = _run_cli(*args, server=server)
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s3cachefs: error:") and "Traceback" not in r.stderr
    assert not os.path.ismount(mnt)


def test_a_second_instance_on_the_same_cache_dir_is_refused(
    make_mount: MakeMount, s3server: S3Server, tmp_path: Path
) -> None:
    m = make_mount()
    other = tmp_path / "other-mnt"
    other.mkdir()
    r = _run_cli(
        "mount",
        m.bucket,
        str(other),
        "-f",
        "--cache-dir",
        str(m.cache_dir),
        "--region",
        "us-east-1",
        "--endpoint-url",
        s3server.endpoint_url,
        server=s3server,
    )
    assert r.returncode == 2 and "in use by another s3cachefs" in r.stderr, r.stderr
    assert not os.path.ismount(other)


def test_sigterm_unmounts_cleanly_and_exits_zero(make_mount: MakeMount) -> None:
    m = make_mount()
    store_like_synapse(m.path / ORIGINAL, b"x")
    assert m.proc is not None
    m.proc.send_signal(signal.SIGTERM)
    assert m.wait() == 0
    assert wait_until(lambda: not os.path.ismount(m.path), 10)


def test_without_foreground_it_returns_once_mounted_and_serves_in_the_background(
    s3server: S3Server, tmp_path: Path
) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    bucket = s3server.new_bucket()
    r = _run_cli(
        "mount",
        bucket,
        str(mnt),
        "--cache-dir",
        str(cache),
        "--region",
        "us-east-1",
        "--endpoint-url",
        s3server.endpoint_url,
        server=s3server,
    )
    try:
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)
        store_like_synapse(mnt / ORIGINAL, b"from the daemon")
        assert s3server.client().get_object(Bucket=bucket, Key=ORIGINAL)["Body"].read() == b"from the daemon"
        pid = int((cache / "lock").read_text())
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 30), "daemon exits after unmount"


def test_mount_warns_when_the_server_is_seaweedfs(mounted: Mount) -> None:
    """SeaweedFS's empty-folder cleaner can delete acknowledged objects (bench/seaweedfs_folder_cleaner.py);
    the admin is told at mount, with the server's own version string."""
    log = mounted.log_text()
    assert re.search(
        r"WARNING s3cachefs\.mount: the S3 server is SeaweedFS \S+ [\d.]+: unless its empty-folder", log
    ), log
