"""Fixtures on real parts: a SeaweedFS server per session (or per test), real FUSE mounts, no mocks.

- s3server      one `weed mini` for the whole session
- own_s3server  a private server for a test that kills, pauses or restarts it
- bucket        a fresh bucket on the session server
- s3            a boto3 client for the session server
- proxy         a FaultProxy (tests/faultproxy.py) in front of the session server, passing everything
                until the test says otherwise
- make_mount    factory: make_mount(bucket=..., extra_args=..., cache_dir=..., server=...) -> started Mount
- mounted       make_mount() with the defaults, on `bucket`

When a test fails, the tail of each of its mount logs (and of its private server's log) is attached to
the report. Teardown always unmounts and ends every process the test started, then checks that no
FUSE mount of the test is left in /proc/mounts.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .faultproxy import FaultProxy
from .harness import HarnessError, MakeMount, Mount, S3Server, check_fuse_available, fuse_mounts, tail

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_MOUNTS = pytest.StashKey[list[Mount]]()
_SERVERS = pytest.StashKey[list[S3Server]]()
_BUCKETS_BEFORE = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _SESSION_SERVER:
        item.stash[_BUCKETS_BEFORE] = len(_SESSION_SERVER[0].buckets)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for m in item.stash.get(_MOUNTS, []):
            report.sections.append((f"mount log {m.path} ({m.log_path})", m.log_tail(150)))
        for s in item.stash.get(_SERVERS, []):
            report.sections.append((f"weed log ({s.log_path})", tail(s.log_path, 60)))
    return report


_SESSION_SERVER: list[S3Server] = []


@pytest.fixture(scope="session")
def s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3server"))
    server.start()
    _SESSION_SERVER.append(server)
    try:
        yield server
    finally:
        _SESSION_SERVER.remove(server)
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """Once the test's fixtures are torn down (its mounts unmounted), drop the buckets it made on the
    session server, so that the server's volume slots last the whole session (S3Server.drop_buckets)."""
    server = _SESSION_SERVER[0] if _SESSION_SERVER else None
    # Where this test's buckets start (noted at setup; a test that started the session server
    # keeps its own buckets).
    keep = item.stash.get(_BUCKETS_BEFORE, len(server.buckets) if server is not None else 0)
    try:
        return (yield)
    finally:
        if server is not None and server.running and not server.paused:
            server.drop_buckets(keep)


@pytest.fixture
def own_s3server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[S3Server]:
    """A private server: kill it, pause it, restart it; nobody else notices."""
    server = S3Server(tmp_path / "own-s3")
    request.node.stash.setdefault(_SERVERS, []).append(server)
    server.start()
    try:
        yield server
    finally:
        # Mounts on this server go first, whatever order the fixtures were requested in: a daemon
        # unmounting with its server gone would only slow the teardown down.
        for m in request.node.stash.get(_MOUNTS, []):
            if m.server is server:
                m.cleanup()
        server.stop()


@pytest.fixture
def s3(s3server: S3Server) -> S3Client:
    return s3server.client()


@pytest.fixture
def bucket(s3server: S3Server) -> str:
    return s3server.new_bucket()


@pytest.fixture
def proxy(s3server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3server.s3_port, seed=1) as p:
        yield p


@pytest.fixture
def make_mount(request: pytest.FixtureRequest, tmp_path: Path, s3server: S3Server) -> Iterator[MakeMount]:
    """Factory for started mounts; all of them are unmounted (or killed) at teardown.

    bucket defaults to the test's `bucket` fixture when the server is the session one, otherwise to a
    new bucket on the given server. cache_dir defaults to a fresh directory per mount; pass the
    cache_dir of an earlier mount to remount on the same cache.
    """
    try:
        check_fuse_available()
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    mounts = request.node.stash.setdefault(_MOUNTS, [])
    counter = iter(range(1, 1000))

    def make(
        bucket: str | None = None,
        extra_args: Sequence[str] = (),
        cache_dir: Path | None = None,
        server: S3Server | None = None,
        start: bool = True,
    ) -> Mount:
        srv = server or s3server
        if bucket is None:
            bucket = request.getfixturevalue("bucket") if srv is s3server else srv.new_bucket()
        n = next(counter)
        m = Mount(
            srv,
            bucket,
            path=tmp_path / f"mnt{n}",
            cache_dir=cache_dir if cache_dir is not None else tmp_path / f"cache{n}",
            log_path=tmp_path / f"mount{n}.log",
            extra_args=extra_args,
        )
        mounts.append(m)
        if start:
            m.start()
        return m

    yield make

    if s3server.paused:  # a test paused the shared server and then failed before resuming it
        s3server.resume()
    forced: list[str] = []
    for m in reversed(mounts):
        forced += m.cleanup()
    leftovers = [p for p in fuse_mounts() if Path(p).is_relative_to(tmp_path)]
    if leftovers:
        pytest.fail(f"FUSE mounts left behind after teardown: {leftovers}", pytrace=False)
    if forced:
        # Not an error of the test (it may have crashed the daemon on purpose), but worth seeing.
        print("make_mount teardown had to force:\n  " + "\n  ".join(forced))


@pytest.fixture
def mounted(make_mount: MakeMount) -> Mount:
    return make_mount()
