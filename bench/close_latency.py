"""close() latency of a Synapse-sized write through s3cachefs, against a direct boto3 PUT.

Starts its own SeaweedFS on loopback (free ports) and an s3cachefs mount, then, for N files of SIZE bytes:
  - mount:  makedirs + open("wb") + 64 KiB writes + close() at local_content/AA/BB/REST (durable at close)
  - boto3:  put_object of the same bytes with Content-MD5 (the S3 floor for one durable object)
and prints medians, p90 and the ratio. Timings are noisy on a shared 2-core machine: compare the
ratio, not the absolute figures.

    python -m bench.close_latency [--count 200] [--size 48K]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from s3cachefs.config import parse_size
from tests.harness import Mount, S3Server


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", default="48K")
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="s3cfs-bench-") as tmp:
        server = S3Server(Path(tmp) / "s3").start()
        try:
            bucket = server.new_bucket()
            s3 = server.client()
            m = Mount(server, bucket, Path(tmp) / "mnt", Path(tmp) / "cache", Path(tmp) / "mount.log")
            m.start()
            try:
                mount_ms, put_ms = [], []
                for i in range(args.count):
                    data = os.urandom(size)
                    rel = f"local_content/{i % 52:02d}/{i // 52:02d}/bench{i:06d}abcdefghijklmn"
                    path = m.path / rel
                    t0 = time.perf_counter()
                    os.makedirs(path.parent, exist_ok=True)
                    with open(path, "wb") as f:
                        for off in range(0, size, 64 * 1024):
                            f.write(data[off : off + 64 * 1024])
                    mount_ms.append((time.perf_counter() - t0) * 1000)

                    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
                    t0 = time.perf_counter()
                    s3.put_object(Bucket=bucket, Key="direct/" + rel, Body=data, ContentMD5=md5)
                    put_ms.append((time.perf_counter() - t0) * 1000)
                # Every mount write must be in S3 with the right length, or the figure means nothing.
                for i in range(0, args.count, max(1, args.count // 10)):
                    rel = f"local_content/{i % 52:02d}/{i // 52:02d}/bench{i:06d}abcdefghijklmn"
                    assert s3.head_object(Bucket=bucket, Key=rel)["ContentLength"] == size
            finally:
                m.unmount()
        finally:
            server.stop()
    med_m, med_p = statistics.median(mount_ms), statistics.median(put_ms)
    print(f"{args.count} writes of {size} bytes, {os.cpu_count()} CPUs, SeaweedFS on loopback")
    print(f"  s3cachefs open+write+close: median {med_m:.2f} ms, p90 {_pct(mount_ms, 0.9):.2f} ms")
    print(f"  boto3 put_object:           median {med_p:.2f} ms, p90 {_pct(put_ms, 0.9):.2f} ms")
    print(f"  ratio (direct PUT / mount, higher is better, 1.0 = no overhead): {med_p / med_m:.2f}")


if __name__ == "__main__":
    main()
