"""Answers S3 would not give, from servers that claim to be S3: the mount serves the object's bytes or
an error, never other bytes. Real mounts, with tests/faultproxy.py rewriting the server's answers."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .faultproxy import FaultProxy
from .harness import MakeMount, Mount, wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1024 * 1024
KEY = "remote_content/example.org/ab/cd/efgh"
FAST = ["--max-attempts", "2", "--connect-timeout", "2", "--read-timeout", "10"]


def listed_mount(make_mount: MakeMount, proxy: FaultProxy, bucket: str) -> Mount:
    m = make_mount(bucket=bucket, extra_args=["--endpoint-url", proxy.endpoint_url, *FAST])
    assert wait_until(lambda: "INFO s3cachefs.namespace: listed " in m.log_text(), 30), m.log_tail()
    return m


def read_all(path: Path) -> tuple[bytes, OSError | None]:
    """What reads of the file gave, and the error that stopped them (None: read to its end)."""
    got = bytearray()
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(MiB):
                got += chunk
    except OSError as e:
        return bytes(got), e
    return bytes(got), None


def test_a_server_that_ignores_range_gets_no_wrong_byte_served(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client, bucket: str
) -> None:
    # A large cold file is read in ranges; HTTP lets a server answer one with 200 and the whole object.
    data = os.urandom(20 * MiB)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)
    m = listed_mount(make_mount, proxy, bucket)

    def whole_object(req: dict[str, str], head: bytes, body: bytes) -> tuple[bytes, bytes]:
        if not req.get("range", "").startswith("bytes=262144-") or b" 206 " not in head.split(b"\r\n")[0]:
            return head, body
        lines = [
            b"HTTP/1.1 200 OK",
            *(ln for ln in head.split(b"\r\n")[1:] if not ln.lower().startswith(b"content-range")),
        ]
        return b"\r\n".join(lines), data

    with proxy.fault("rewrite", only="GET /" + bucket + "/remote_content/", rewrite=whole_object):
        got, err = read_all(m.path / KEY)
    assert got == data[: len(got)], "wrong bytes served"
    assert err is not None or got == data
    assert (m.path / KEY).read_bytes() == data  # the next read, the server behaving
    assert "asked for bytes 262144-" in m.log_text()


@pytest.mark.parametrize("real,listed", [(3000, 1000), (20 * MiB, 10 * MiB)], ids=["small", "large"])
def test_a_listing_that_understates_a_size_never_gets_a_file_served_cut(
    make_mount: MakeMount, proxy: FaultProxy, s3: S3Client, bucket: str, real: int, listed: int
) -> None:
    data = os.urandom(real)
    s3.put_object(Bucket=bucket, Key=KEY, Body=data)

    def lie(req: dict[str, str], head: bytes, body: bytes) -> tuple[bytes, bytes]:
        return head, re.sub(rb"<Size>\d+</Size>", b"<Size>%d</Size>" % listed, body)

    with proxy.fault("rewrite", only="list-type=2", rewrite=lie):
        m = listed_mount(make_mount, proxy, bucket)
    assert os.stat(m.path / KEY).st_size == listed
    got, err = read_all(m.path / KEY)
    assert err is not None, f"read {len(got)} of {real} bytes without an error"
    assert got == data[: len(got)]
    # The failed GET made the mount look again (a HEAD): the next open reads the whole object.
    assert wait_until(lambda: os.stat(m.path / KEY).st_size == real, 10)
    assert (m.path / KEY).read_bytes() == data
