"""A hung S3 costs one caller its deadline and every other caller nothing (s3_deadline and the circuit
breaker in s3.py), on a real SeaweedFS that is paused with SIGSTOP: it keeps its sockets and answers
nothing, as a hung S3 does.

The bounds below are generous on purpose (a loaded 2-core machine): what they tell apart is "failed at
the deadline" from "waited for botocore's four 30 s read timeouts", and "failed at once" from "waited
for a deadline".
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from s3cachefs.cli import config_from_args
from s3cachefs.config import S3Options
from s3cachefs.s3 import HALF_OPEN_AFTER, S3, CircuitOpen, DeadlineMissed, MultipartUpload, Unavailable

from .harness import TEST_REGION, MakeMount, S3Server, wait_until

DEADLINE = 2.0
# Local work, thread start-up and a loaded machine, on top of a deadline.
MARGIN = 10.0
# Well under any deadline here: the call never waited for S3.
AT_ONCE = 1.0
# After S3 is back: the probe's interval, or the half-open wait, plus one answer, with room to spare.
RECOVERY = 30.0


def options(server: S3Server, bucket: str, deadline: float = DEADLINE) -> S3Options:
    # Default timeouts and attempts: without the deadline, a call to the paused server would wait
    # for four 30 s read timeouts.
    return server.options(bucket, deadline=deadline)


def small_file(tmp_path: Path, name: str = "f") -> str:
    path = tmp_path / name
    path.write_bytes(os.urandom(1000))
    return str(path)


async def timed(call: Callable[[], Awaitable[object]]) -> tuple[BaseException | None, float]:
    """The error `call` raised (None if none) and how long it took."""
    t0 = time.monotonic()
    try:
        await call()
    except Exception as e:
        return e, time.monotonic() - t0
    return None, time.monotonic() - t0


# -- configuration ------------------------------------------------------------------------------------


def test_s3_deadline_is_a_duration_from_the_flag_or_the_config_file(tmp_path: Path) -> None:
    assert S3Options("b").deadline == 10.0
    _, cfg = config_from_args(["mount", "media", str(tmp_path), "--s3-deadline", "1m30s"])
    assert cfg.s3.deadline == 90.0
    conf = tmp_path / "c.toml"
    conf.write_text('bucket = "media"\nmountpoint = "/m"\ns3_deadline = "3s"\n')
    _, cfg = config_from_args(["mount", "--config", str(conf)])
    assert cfg.s3.deadline == 3.0


@pytest.mark.parametrize("bad", ["0", "-1s", "soon"])
def test_s3_deadline_must_be_a_positive_duration(tmp_path: Path, bad: str) -> None:
    from s3cachefs.config import ConfigError

    with pytest.raises(ConfigError, match="s3_deadline"):
        config_from_args(["mount", "media", str(tmp_path), f"--s3-deadline={bad}"])


# -- the S3 class on its own ----------------------------------------------------------------------------


def test_a_hung_s3_fails_the_call_at_its_deadline_then_every_call_at_once_without_a_thread(
    own_s3server: S3Server, tmp_path: Path
) -> None:
    bucket = own_s3server.new_bucket()
    path = small_file(tmp_path)

    async def scenario() -> None:
        limiter = trio.CapacityLimiter(4)
        s3 = S3(options(own_s3server, bucket), limiter)
        await s3.put_file("before", path)  # S3 answers: the circuit stays closed
        own_s3server.pause()
        try:
            err, took = await timed(lambda: s3.put_file("during", path))
            assert isinstance(err, DeadlineMissed), err
            assert took < DEADLINE + MARGIN
            assert s3.breaker.is_open
            # The abandoned PUT still holds its worker slot: boto3 is waiting for the paused server.
            held = limiter.borrowed_tokens
            assert held == 1
            for call in (lambda: s3.put_file("next", path), lambda: s3.head("before")):
                err, took = await timed(call)
                assert isinstance(err, CircuitOpen), err
                assert "circuit open" in str(err)
                assert took < AT_ONCE
            # Refused before taking a slot: open-circuit calls cannot pile up behind the hung ones.
            assert limiter.borrowed_tokens == held
        finally:
            own_s3server.resume()

    trio.run(scenario)


def test_the_probe_closes_the_circuit_once_s3_answers_again_without_any_call(
    own_s3server: S3Server, tmp_path: Path
) -> None:
    bucket = own_s3server.new_bucket()
    path = small_file(tmp_path)

    async def scenario() -> None:
        s3 = S3(options(own_s3server, bucket), trio.CapacityLimiter(4))
        async with trio.open_nursery() as nursery:
            await nursery.start(s3.run)
            own_s3server.pause()
            try:
                err, _ = await timed(lambda: s3.head("x"))
                assert isinstance(err, DeadlineMissed), err
                assert s3.breaker.is_open
                # Paused: the probe keeps failing, the circuit stays open, callers fail at once.
                await trio.sleep(2 * DEADLINE)
                assert s3.breaker.is_open
                err, took = await timed(lambda: s3.head("x"))
                assert isinstance(err, CircuitOpen) and took < AT_ONCE, err
            finally:
                own_s3server.resume()
            with trio.fail_after(RECOVERY):
                while s3.breaker.is_open:
                    await trio.sleep(0.1)
            info = await s3.put_file("after", path)
            assert info.size == 1000
            nursery.cancel_scope.cancel()
        assert not s3.breaker.probing

    trio.run(scenario)


def test_without_the_probe_a_half_open_trial_closes_the_circuit_after_s3_is_back(
    own_s3server: S3Server, tmp_path: Path
) -> None:
    bucket = own_s3server.new_bucket()
    path = small_file(tmp_path)

    async def scenario() -> None:
        s3 = S3(options(own_s3server, bucket), trio.CapacityLimiter(4))
        own_s3server.pause()
        try:
            err, _ = await timed(lambda: s3.put_file("during", path))
            assert isinstance(err, DeadlineMissed), err
        finally:
            own_s3server.resume()
        # Right after: still open (no probe, and the half-open wait has not passed).
        err, took = await timed(lambda: s3.put_file("soon", path))
        assert isinstance(err, CircuitOpen) and took < AT_ONCE, err
        with trio.fail_after(HALF_OPEN_AFTER + RECOVERY):
            while True:
                err, _ = await timed(lambda: s3.put_file("after", path))
                if err is None:
                    break
                assert isinstance(err, Unavailable), err
                await trio.sleep(0.2)
        assert not s3.breaker.is_open
        assert await s3.head("after") is not None

    trio.run(scenario)


def test_a_call_that_waited_past_its_deadline_for_a_worker_thread_fails_but_leaves_the_circuit_closed() -> (
    None
):
    """Every worker busy (large transfers, say) is no sign that S3 is down."""
    # Never contacted: the call cannot get a thread.
    opts = S3Options(bucket="media", endpoint_url="http://127.0.0.1:9", region_name=TEST_REGION, deadline=0.5)

    async def scenario() -> None:
        limiter = trio.CapacityLimiter(1)
        s3 = S3(opts, limiter)
        async with limiter:  # the only worker slot is taken
            err, took = await timed(lambda: s3.head("x"))
        assert isinstance(err, DeadlineMissed) and "worker thread" in str(err), err
        assert took < opts.deadline + MARGIN
        assert not s3.breaker.is_open

    trio.run(scenario)


def test_no_part_of_a_multipart_upload_may_outlive_the_upload_deadline(
    own_s3server: S3Server, tmp_path: Path
) -> None:
    """The parts' deadlines are capped by the whole upload's (put_file sets it for the file's size)."""
    bucket = own_s3server.new_bucket()

    async def scenario() -> None:
        s3 = S3(options(own_s3server, bucket), trio.CapacityLimiter(4))
        # An upload whose deadline has just passed: its first call fails without reaching S3.
        mpu = MultipartUpload(s3, "big", until=trio.current_time())
        err, took = await timed(mpu.start)
        assert isinstance(err, DeadlineMissed), err
        assert took < AT_ONCE
        assert s3.calls["CreateMultipartUpload"] == 1

    trio.run(scenario)


def test_a_get_abandoned_at_its_deadline_never_writes_into_the_callers_fd_number_later(
    own_s3server: S3Server, tmp_path: Path
) -> None:
    """The caller closes its fd when get_range returns; the number is then free for another file,
    which the abandoned thread, answered once S3 is back, must not write into."""
    bucket = own_s3server.new_bucket()
    data = os.urandom(300_000)
    own_s3server.client().put_object(Bucket=bucket, Key="obj", Body=data)

    async def scenario() -> None:
        limiter = trio.CapacityLimiter(4)
        s3 = S3(options(own_s3server, bucket), limiter)
        seen: list[int] = []
        fd = os.open(tmp_path / "whole", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            r = await s3.get_range("obj", fd, 0, None, seen.append)
        finally:
            os.close(fd)
        assert (tmp_path / "whole").read_bytes() == data
        assert r.total == len(data) and seen[-1] == len(data)

        fd = os.open(tmp_path / "first", os.O_RDWR | os.O_CREAT, 0o600)
        own_s3server.pause()
        try:
            err, _ = await timed(lambda: s3.get_range("obj", fd, 0, None, seen.append))
            assert isinstance(err, DeadlineMissed), err
            seen.clear()
            os.close(fd)
            other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600)
            assert other == fd, "the test needs the fd number to be reused"
        finally:
            own_s3server.resume()
        try:
            # Once S3 is back, the abandoned thread gets its answer and ends (its slot comes back).
            with trio.fail_after(RECOVERY):
                while limiter.borrowed_tokens:
                    await trio.sleep(0.05)
        finally:
            os.close(other)
        assert (tmp_path / "other").read_bytes() == b""
        assert seen == [], "no progress is reported for an abandoned GET"

    trio.run(scenario)


# -- a real mount -------------------------------------------------------------------------------------


@pytest.mark.mount
def test_with_s3_hung_close_fails_at_the_deadline_then_at_once_and_works_again_once_s3_is_back(
    make_mount: MakeMount, own_s3server: S3Server
) -> None:
    deadline = 3.0
    m = make_mount(server=own_s3server, extra_args=["--s3-deadline", f"{deadline:g}s"])
    cached = os.urandom(50_000)
    (m.path / "cached").write_bytes(cached)  # uploaded by close(), and kept in the cache
    os.listdir(m.path)  # the root is listed: creating a new name needs no HEAD of S3

    def close_new_file(name: str) -> tuple[OSError | None, float]:
        fd = os.open(m.path / name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        os.write(fd, os.urandom(2000))
        t0 = time.monotonic()
        try:
            os.close(fd)  # the upload happens here, synchronously, as Synapse sees it
        except OSError as e:
            return e, time.monotonic() - t0
        return None, time.monotonic() - t0

    own_s3server.pause()
    try:
        err, took = close_new_file("first")
        assert err is not None and err.errno == errno.EIO, err
        assert took < deadline + MARGIN
        err, took = close_new_file("second")
        assert err is not None and err.errno == errno.EIO, err
        assert took < AT_ONCE
        # A cached file needs no S3: it reads while S3 is hung and the circuit is open.
        assert (m.path / "cached").read_bytes() == cached
    finally:
        own_s3server.resume()

    # No remount: a close() succeeds again once S3 answers (half-open trial, or the probe if the
    # mount runs it).
    ok: list[str] = []

    def a_write_works() -> bool:
        name = f"after{len(ok)}"
        ok.append(name)
        return close_new_file(name)[0] is None

    assert wait_until(a_write_works, HALF_OPEN_AFTER + RECOVERY, interval=0.5)
    client = own_s3server.client()
    assert client.head_object(Bucket=m.bucket, Key=ok[-1])["ContentLength"] == 2000
    log = m.log_text()
    assert log.count("circuit open,") == 1, log
    assert log.count("circuit closed") == 1, log


def test_a_cached_file_is_served_while_cold_reads_wait_on_a_hung_s3(
    make_mount: MakeMount, own_s3server: S3Server
) -> None:
    # The first read of a cached file after a mount checks its MD5 in a worker thread. That thread
    # comes from the local disk's own limiter: with 40 cold reads holding every S3 thread on a hung
    # S3 (until their deadline), the cached file is still served at once, not after the deadline.
    client = own_s3server.client()
    bucket = own_s3server.new_bucket()
    cold = {f"remote_content/ex.org/ab/cd/c{i:02d}": os.urandom(20_000) for i in range(40)}
    for key, body in cold.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    m = make_mount(bucket=bucket, server=own_s3server, extra_args=["--s3-deadline", "30s"])
    cached = m.path / "local_content/ab/cd/cached"
    cached.parent.mkdir(parents=True)
    data = os.urandom(3 * 1024 * 1024)
    cached.write_bytes(data)
    m.unmount()
    m.start()  # the cached copy is now unverified: its first read hashes it
    assert wait_until(lambda: "listed " in m.log_text().rsplit("start:", 1)[-1], 30)
    results: dict[str, BaseException | None] = {}

    def read(key: str) -> None:
        try:
            (m.path / key).read_bytes()
            results[key] = None
        except OSError as e:
            results[key] = e

    own_s3server.pause()
    threads = [threading.Thread(target=read, args=(k,)) for k in cold]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)  # let the cold reads take the S3 threads (nothing observable to wait on)
        assert all(t.is_alive() for t in threads), "the cold reads should be waiting on the hung S3"
        t0 = time.monotonic()
        assert cached.read_bytes() == data
        took = time.monotonic() - t0
    finally:
        own_s3server.resume()
        for t in threads:
            t.join(120)
    assert took < 30.0 - MARGIN, f"the cached read waited {took:.1f}s, as if behind the cold reads' deadline"
