"""Hostile bucket contents, secrets, permissions, TLS, and an S3 outage: on real mounts."""

from __future__ import annotations

import contextlib
import errno
import os
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import botocore.exceptions
import cachetools
import pytest
import trio

from s3cachefs.cache import Cache, Limits
from s3cachefs.config import S3Options
from s3cachefs.index import ROOT_INO, Index
from s3cachefs.namespace import Namespace
from s3cachefs.s3 import S3, ObjectInfo

from .harness import (
    HarnessError,
    MakeMount,
    Mount,
    S3Server,
    TcpForwarder,
    bucket_objects,
    files_under,
    mount_status,
)
from .test_mount import FAST_FAIL, s3_paused, store_like_synapse

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

HOSTILE_KEYS = {
    "../escape": b"dot-dot",
    "a/../../b": b"dot-dot inside",
    "./x": b"dot",
    "x/./y": b"dot inside",
    "a//b": b"empty component",
    "/leading": b"leading slash",
    "n" * 300: b"component over 255 bytes",
    "both": b"a file that is also a prefix",
    "both/child": b"below a file",
    "ctrl\x01char/\ttab": b"control characters",
    "ok/file": b"a sane neighbour",
    "unicode/\u00e9t\u00e9-\U0001f600": b"utf-8 name",
    "marker/": b"",  # a directory marker from another tool
}


def shown_as(key: str, all_keys: set[str]) -> str | None:
    """The documented rule (README, Limitations): the path a key is shown at, or None if hidden."""
    if key.endswith("/"):
        return None  # a directory marker: shown as a directory, not a file
    parts = key.split("/")
    if any(p in ("", ".", "..") or len(p.encode()) > 255 for p in parts):
        return None
    if any("/".join(parts[:i]) in all_keys for i in range(1, len(parts))):
        return None  # below a key that is itself a file
    return key


@pytest.mark.parametrize(
    "listing",
    [
        pytest.param([], id="background-listing"),
        # Only the per-directory LISTs of readdir: they must show the same thing. (They once made
        # "both" a directory, when a readdir of the root came before the background listing.)
        pytest.param(["--no-listing"], id="readdir-listings-only"),
    ],
)
def test_hostile_keys_never_crash_the_mount_or_escape_the_cache(
    make_mount: MakeMount, s3: S3Client, bucket: str, tmp_path: Path, listing: list[str]
) -> None:
    for key, body in HOSTILE_KEYS.items():
        with contextlib.suppress(botocore.exceptions.ClientError):
            s3.put_object(Bucket=bucket, Key=key, Body=body)  # SeaweedFS refuses '.', '..', long names
    stored = bucket_objects(s3, bucket)
    assert "both/child" in stored and "ctrl\x01char/\ttab" in stored and "marker/" in stored
    before = set(tmp_path.rglob("*"))
    m = make_mount(bucket=bucket, extra_args=listing)
    seen: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(m.path):
        for name in names:
            p = Path(dirpath) / name
            seen[str(p.relative_to(m.path))] = p.read_bytes()
    expected = {shown: body for key, body in stored.items() if (shown := shown_as(key, set(stored)))}
    assert seen == expected
    assert "both" in seen and "ok/file" in seen
    assert (m.path / "marker").is_dir()
    created = set(tmp_path.rglob("*")) - before
    inside = (m.cache_dir, m.path)
    outside = [
        p for p in created if not any(p == d or p.is_relative_to(d) for d in inside) and p != m.log_path
    ]
    assert outside == [], "nothing is written outside the cache directory"
    assert m.running


def test_keys_other_servers_allow_are_hidden_by_the_listing(tmp_path: Path) -> None:
    # AWS S3 stores keys SeaweedFS refuses ('..', '.', '//', over-long names); feed them to the
    # listing reconciler as a LIST page would, with the real index.
    index = Index(tmp_path / "index.sqlite")
    cache = Cache(
        tmp_path,
        index,
        S3(S3Options(bucket="unused"), trio.CapacityLimiter(1)),
        "",
        Limits(cap=2**30),
        trio.CapacityLimiter(1),
    )
    ns = Namespace(index, cache.s3, cache, "")
    dirs: cachetools.LRUCache[str, int] = cachetools.LRUCache(maxsize=100)
    for key in HOSTILE_KEYS:
        ns._apply_listed(ObjectInfo(key, 1, '"e"', 0), 1, dirs, set())
    shown = {rel for _ino, rel in index.walk_files()}
    assert shown == {k for k in HOSTILE_KEYS if shown_as(k, set(HOSTILE_KEYS))}
    assert ns.skipped_keys == sum(
        1 for k in HOSTILE_KEYS if not shown_as(k, set(HOSTILE_KEYS)) and k != "marker/"
    )
    assert index.lookup(ROOT_INO, b"marker") is not None
    index.close()


def test_names_that_cannot_be_keys_are_refused_with_a_clear_errno(mounted: Mount) -> None:
    d = os.fsencode(mounted.path)
    with pytest.raises(OSError) as exc:
        os.open(d + b"/bad-\xff-name", os.O_WRONLY | os.O_CREAT, 0o644)
    assert exc.value.errno == errno.EILSEQ
    with pytest.raises(OSError) as exc:
        os.mkdir(d + b"/\xfe")
    assert exc.value.errno == errno.EILSEQ
    with pytest.raises(OSError) as exc:
        os.mkdir(mounted.path / ("x" * 256))
    assert exc.value.errno == errno.ENAMETOOLONG
    assert mounted.running


class _NoCredentialsInEnv(S3Server):
    """The same server, but mounts started on it get no AWS_* variables: only the config file."""

    def env(self) -> dict[str, str]:
        return {k: v for k, v in super().env().items() if not k.startswith("AWS_")}


def test_secrets_stay_out_of_logs_argv_and_readable_files(
    s3server: S3Server, make_mount: MakeMount, tmp_path: Path
) -> None:
    conf = tmp_path / "s3cachefs.toml"
    conf.write_text(
        f'access_key_id = "{s3server.access_key}"\nsecret_access_key = "{s3server.secret_key}"\n'
        'sse_customer_key = ""\n'
    )
    conf.chmod(0o644)  # readable by others: the daemon must say so
    # The server's credentials come from the file only: a refused secret would fail the mount.
    server_without_env = _NoCredentialsInEnv.__new__(_NoCredentialsInEnv)
    server_without_env.__dict__.update(s3server.__dict__)
    m = make_mount(
        server=server_without_env,
        bucket=s3server.new_bucket(),
        extra_args=["--config", str(conf), "--log-level", "DEBUG"],
    )
    store_like_synapse(m.path / "local_content/ab/cd/x", b"secret-free bytes")
    (m.path / "local_content/ab/cd/x").read_bytes()
    with pytest.raises(FileNotFoundError):
        (m.path / "local_content/zz/zz/missing").read_bytes()
    assert m.proc is not None
    cmdline = Path(f"/proc/{m.proc.pid}/cmdline").read_bytes()
    m.unmount()
    log = m.log_text()
    assert "DEBUG" in log, "debug logging was on"
    assert "readable by others" in log
    assert s3server.secret_key not in log
    assert s3server.secret_key.encode() not in cmdline
    # The cache directory is the daemon's alone.
    assert stat.S_IMODE(m.cache_dir.stat().st_mode) == 0o700
    for p in m.cache_dir.rglob("*"):
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_an_s3_outage_keeps_cached_files_and_known_names_working(
    make_mount: MakeMount, s3server: S3Server, s3: S3Client, bucket: str
) -> None:
    s3.put_object(Bucket=bucket, Key="remote_content/ex.org/ab/cd/cold", Body=b"never read before the outage")
    m = make_mount(bucket=bucket, extra_args=FAST_FAIL)
    store_like_synapse(m.path / "local_content/ab/cd/hot", b"cached")
    assert (m.path / "remote_content/ex.org/ab/cd").is_dir()  # known from the listing
    # FAST_FAIL: 2 attempts of (connect 2 s + read 3 s), plus botocore's backoff (under 1 s here).
    bound = 2 * (2 + 3) + 1 + 3  # and 3 s of slack for a loaded CI machine
    with s3_paused(s3server):  # SIGSTOP: connections hang, the worst kind of outage
        assert (m.path / "local_content/ab/cd/hot").read_bytes() == b"cached"
        assert os.stat(m.path / "remote_content/ex.org/ab/cd/cold").st_size == 28
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            (m.path / "remote_content/ex.org/ab/cd/cold").read_bytes()
        assert exc.value.errno == errno.EIO and time.monotonic() - t0 < bound
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            store_like_synapse(m.path / "local_content/ab/cd/new", b"written during the outage")
        assert exc.value.errno == errno.EIO and time.monotonic() - t0 < bound
    # S3 is back: everything works again, no remount.
    assert (m.path / "remote_content/ex.org/ab/cd/cold").read_bytes() == b"never read before the outage"
    store_like_synapse(m.path / "local_content/ab/cd/new", b"written after")
    assert bucket_objects(s3, bucket)["local_content/ab/cd/new"] == b"written after"


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture
def tls_endpoint(s3server: S3Server, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS front for the S3 server on loopback, with a certificate from a private CA."""
    cert, key = tmp_path / "ca.pem", tmp_path / "ca.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    with TcpForwarder(s3server.s3_port, tls=ctx) as fwd:
        yield f"https://127.0.0.1:{fwd.port}", cert


def test_tls_is_verified_and_a_private_ca_is_accepted_with_ca_bundle(
    make_mount: MakeMount, s3server: S3Server, tmp_path: Path, tls_endpoint: tuple[str, Path]
) -> None:
    url, ca = tls_endpoint
    bucket = s3server.new_bucket()
    mnt = tmp_path / "mnt-tls"
    mnt.mkdir()
    from .test_mount import _run_cli

    refused = _run_cli(
        "mount",
        bucket,
        str(mnt),
        "-f",
        "--endpoint-url",
        url,
        "--region",
        "us-east-1",
        "--cache-dir",
        str(tmp_path / "c-tls"),
        "--max-attempts",
        "1",
        server=s3server,
    )
    assert refused.returncode != 0 and "certificate" in refused.stderr.lower(), refused.stderr
    assert not os.path.ismount(mnt)
    m = make_mount(bucket=bucket, extra_args=["--endpoint-url", url, "--ca-bundle", str(ca)])
    store_like_synapse(m.path / "local_content/ab/cd/x", b"over TLS")
    assert (
        s3server.client().get_object(Bucket=bucket, Key="local_content/ab/cd/x")["Body"].read() == b"over TLS"
    )


def test_files_left_in_the_cache_are_only_ours(mounted: Mount) -> None:
    store_like_synapse(mounted.path / "local_content/ab/cd/x", b"x")
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files_under(mounted.cache_dir))


def test_status_of_a_mount_point_reads_the_mounts_own_cache_not_an_index_file_from_the_bucket(
    make_mount: MakeMount, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    # Anyone who can write to the bucket can put an `index.sqlite` at its top; `status MOUNTPOINT`
    # must still read the index of the cache behind the mount (from /proc/mounts), not that file.
    fake = tmp_path / "fake-index.sqlite"
    Index(fake).close()
    s3.put_object(Bucket=bucket, Key="index.sqlite", Body=fake.read_bytes())
    m = make_mount(bucket=bucket)
    assert (m.path / "index.sqlite").is_file(), "the bucket's file is visible in the mount"
    assert mount_status(m)["cache_dir"] == str(m.cache_dir)


# -- the cache directory ------------------------------------------------------------------------------
# The daemon runs as root and writes into its cache directory by fixed names; whoever can prepare that
# directory must not be able to point those writes elsewhere (issue "consistency", finding 5).


def _refused_at_start(m: Mount) -> str:
    """Start m, which must exit 2 before mounting; returns its one error line."""
    with pytest.raises(HarnessError):
        m.start()
    assert m.returncode == 2, m.log_text()
    assert not m.is_mounted()
    errors = [line for line in m.log_text().splitlines() if line.startswith("s3cachefs: error:")]
    assert len(errors) == 1 and "Traceback" not in m.log_text(), m.log_text()
    return errors[0]


def test_a_lock_symlink_in_the_cache_dir_is_refused_and_its_target_left_alone(
    make_mount: MakeMount, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_bytes(b"not the daemon's to truncate\n")
    (cache / "lock").symlink_to(target)
    line = _refused_at_start(make_mount(cache_dir=cache, start=False))
    assert f"cache dir {cache}: lock is a symbolic link" in line
    assert target.read_bytes() == b"not the daemon's to truncate\n"


def test_a_cache_dir_that_is_a_symlink_is_refused(make_mount: MakeMount, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    link = tmp_path / "cache"
    link.symlink_to(real)
    m = make_mount(start=False)
    m.cache_dir = link  # Mount resolves the path it is given; the daemon must get the link itself
    assert f"cache dir {link}: is a symbolic link" in _refused_at_start(m)
    assert list(real.iterdir()) == [], "nothing was made behind the link"


@pytest.mark.parametrize("mode", [0o770, 0o707], ids=["group-writable", "world-writable"])
def test_a_cache_dir_others_can_write_to_is_refused_and_not_chmodded(
    make_mount: MakeMount, tmp_path: Path, mode: int
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    line = _refused_at_start(make_mount(cache_dir=cache, start=False))
    assert f"cache dir {cache}: is writable by group or others (mode {mode:o})" in line
    assert stat.S_IMODE(cache.stat().st_mode) == mode
    assert list(cache.iterdir()) == []


def test_a_cache_dir_owned_by_another_user_is_refused(make_mount: MakeMount, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, 65534, 65534)
    line = _refused_at_start(make_mount(cache_dir=cache, start=False))
    assert f"cache dir {cache}: is owned by uid 65534, not by uid {os.geteuid()}" in line
    assert list(cache.iterdir()) == []
    assert (cache.stat().st_uid, stat.S_IMODE(cache.stat().st_mode)) == (65534, 0o700)


def test_a_cache_subdirectory_that_is_a_symlink_is_refused(make_mount: MakeMount, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache / "data").symlink_to(elsewhere)
    assert f"cache dir {cache}: data/ is a symbolic link" in _refused_at_start(
        make_mount(cache_dir=cache, start=False)
    )
    assert list(elsewhere.iterdir()) == [], "no data/XX directories were made behind the link"


def test_a_cache_dir_made_by_the_daemon_is_private_and_a_checked_one_is_reused(
    make_mount: MakeMount, tmp_path: Path
) -> None:
    cache = tmp_path / "new" / "cache"  # neither exists yet
    m = make_mount(cache_dir=cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    m.unmount()
    m.start()  # the directory, its lock and its subdirectories made by the first run pass the checks
    assert m.is_mounted()


def test_a_lock_hard_linked_to_another_file_is_refused_and_that_file_left_alone(
    make_mount: MakeMount, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_bytes(b"not the daemon's to truncate\n")
    os.link(target, cache / "lock")  # O_NOFOLLOW does not see a hard link; the link count does
    line = _refused_at_start(make_mount(cache_dir=cache, start=False))
    assert f"cache dir {cache}: lock is not a regular file of ours with one link" in line
    assert target.read_bytes() == b"not the daemon's to truncate\n"


def test_a_cache_dir_below_a_directory_others_can_write_to_is_refused_unless_it_is_sticky(
    make_mount: MakeMount, tmp_path: Path
) -> None:
    # Whoever can write to a directory above the cache can swap the cache directory for one of
    # their own between the daemon's checks and its opens; a root-owned sticky one (like /tmp)
    # lets nobody rename what is not theirs.
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    line = _refused_at_start(make_mount(cache_dir=shared / "cache", start=False))
    assert f"{shared} above it is writable by others and not sticky" in line
    os.chmod(shared, 0o1777)
    m = make_mount(cache_dir=shared / "cache2")
    assert m.is_mounted()
