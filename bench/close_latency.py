"""close() latency of a Synapse-sized write through s3cachefs, against a direct boto3 PUT of the same bytes.

Synapse writes an upload in a thread and calls close() on its reactor thread; for an original
(a synchronous path) close() returns once S3 holds the file, so that close() is what the homeserver
waits for. This measures it, and the floor a synchronous close cannot go under: one PUT of the
same bytes, made directly with boto3 to the same S3 at the same distance.

Starts its own SeaweedFS on loopback (free ports), optionally behind bench.reactor's LatencyProxy
(--rtt: one round trip per request/response exchange, a streamed body not slowed), and an s3cachefs
mount through the same endpoint, then for N files of SIZE bytes:
  - mount:  makedirs + open("wb") + 64 KiB writes + flush, then close() timed on its own, at
            local_content/AA/BB/REST (durable at close);
  - boto3:  put_object of the same bytes with Content-MD5 (the S3 floor for one durable object),
            once as botocore sends it (with `Expect: 100-continue`, a second round trip) and once
            without it, as the mount sends its PUTs: the floor a synchronous close() compares with.
Prints medians, p90 and max of each and the ratio of the medians. Timings are noisy on a shared
2-core machine: compare the ratio, not the absolute figures. --mount-args passes extra options to
the mount (e.g. "--multipart-threshold 5M --multipart-chunksize 5M"), one run per --mount-args.

    python -m bench.close_latency [--count 200] [--size 48K] [--rtt 30] [--mount-args "..."]...
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import botocore.config
import botocore.handlers

from bench.reactor import LatencyProxy, ProxiedMount
from s3cachefs.config import parse_size
from tests.harness import TEST_REGION, S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def _row(name: str, ms: list[float]) -> str:
    return (
        f"  {name:<40} median {statistics.median(ms):8.2f} ms, p90 {_pct(ms, 0.9):8.2f} ms, "
        f"max {max(ms):8.2f} ms"
    )


def _key(i: int) -> str:
    return f"local_content/{i % 52:02d}/{i // 52:02d}/bench{i:06d}abcdefghijklmn"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", default="48K")
    ap.add_argument("--rtt", type=float, default=0.0, help="round trip to S3 in ms, injected by a proxy")
    ap.add_argument("--pause", type=float, default=0.05, help="seconds between files (default 0.05)")
    ap.add_argument(
        "--mount-args", action="append", default=None, help="extra mount options; repeat for more runs"
    )
    args = ap.parse_args()
    size = parse_size(args.size)
    if not 1 <= args.count <= 100_000 or not 0 <= args.rtt <= 1000 or not 0 <= args.pause <= 10:
        ap.error("--count 1..100000, --rtt 0..1000 ms, --pause 0..10 s")
    variants = [shlex.split(a) for a in (args.mount_args or [""])]
    print(
        f"{args.count} writes of {size} bytes, {os.cpu_count()} CPUs, SeaweedFS on loopback, "
        f"RTT {args.rtt:g} ms; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="s3cfs-bench-") as tmp, contextlib.ExitStack() as stack:
        server = S3Server(Path(tmp) / "s3")
        stack.callback(server.stop)
        server.start()
        proxy = stack.enter_context(LatencyProxy(server.s3_port, args.rtt / 1000))

        def client() -> S3Client:
            return boto3.client(
                "s3",
                endpoint_url=proxy.endpoint_url,
                aws_access_key_id=server.access_key,
                aws_secret_access_key=server.secret_key,
                region_name=TEST_REGION,
                config=botocore.config.Config(s3={"addressing_style": "path"}),
            )

        direct = client()
        # The same without `Expect: 100-continue`, as the mount sends its PUTs (botocore waits a
        # round trip for the server's interim answer before the body; s3/sync.py make_client).
        bare = client()
        bare.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
        s3 = server.client()  # checks, not through the proxy
        floor: list[float] = []
        bare_floor: list[float] = []
        for n, extra in enumerate(variants):
            bucket = server.new_bucket()
            m = ProxiedMount(server, bucket, Path(tmp) / f"m{n}", proxy.endpoint_url)
            m.extra_args = extra
            m.start()
            closes, totals = [], []
            try:
                for i in range(args.count):
                    data = os.urandom(size)
                    path = m.path / _key(i)
                    t0 = time.perf_counter()
                    os.makedirs(path.parent, exist_ok=True)
                    f = open(path, "wb")  # noqa: SIM115 - close() is timed on its own
                    try:
                        for off in range(0, size, 64 * 1024):
                            f.write(data[off : off + 64 * 1024])
                        f.flush()
                    finally:
                        t1 = time.perf_counter()
                        f.close()
                    t2 = time.perf_counter()
                    closes.append((t2 - t1) * 1000)
                    totals.append((t2 - t0) * 1000)

                    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
                    t0 = time.perf_counter()
                    direct.put_object(Bucket=bucket, Key="direct/" + _key(i), Body=data, ContentMD5=md5)
                    floor.append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    bare.put_object(Bucket=bucket, Key="bare/" + _key(i), Body=data, ContentMD5=md5)
                    bare_floor.append((time.perf_counter() - t0) * 1000)
                    time.sleep(args.pause)
                # Every mount write must be in S3 with the right length, or the figure means nothing.
                for i in range(0, args.count, max(1, args.count // 10)):
                    assert s3.head_object(Bucket=bucket, Key=_key(i))["ContentLength"] == size
            finally:
                m.unmount()
            print(f"mount options: {shlex.join(extra) or '(defaults)'}")
            print(_row("s3cachefs close()", closes))
            print(_row("s3cachefs open+write+close", totals))
            print(_row("boto3 put_object (same run, interleaved)", floor[-args.count :]))
            print(_row("boto3 put_object, no Expect: 100-continue", bare_floor[-args.count :]))
            ratio = statistics.median(closes) / statistics.median(floor[-args.count :])
            bare_ratio = statistics.median(closes) / statistics.median(bare_floor[-args.count :])
            print(
                f"  close() / direct PUT (medians): {ratio:.2f}; without Expect: {bare_ratio:.2f}", flush=True
            )


if __name__ == "__main__":
    main()
