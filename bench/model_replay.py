"""Replay the calls of a model-based test failure on a fresh SeaweedFS and mount, watching one key.

tests/model.py prints, with every mismatch, the calls of the failing example ("--- calls of this
example ---", one per line: `write('a/b', 65 bytes seed=5274) -> None`). Save those lines to a file
and replay them; after every call the watched key is read from S3 directly, and a line is printed
whenever its state changes (or the call names it):

    python -m bench.model_replay CALLS.txt KEY

It reproduces a mismatch that does not depend on timing, and shows which call changed the key. The
outcomes recorded in the file are not checked (the model does that); the mount runs with the
model's options (tests/model.py MOUNT_ARGS and its 1 MiB cache).
"""

from __future__ import annotations

import os
import random
import re
import sys
import tempfile
from pathlib import Path

from tests.harness import Mount, S3Server, wait_until
from tests.model import MOUNT_ARGS, Tuning


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    calls = Path(sys.argv[1]).read_text().splitlines()
    watch = sys.argv[2]
    base = Path(tempfile.mkdtemp(prefix="s3cfs-replay-"))
    server = S3Server(base / "s3")
    server.start()
    bucket = server.new_bucket()
    m = Mount(
        server,
        bucket,
        path=base / "mnt",
        cache_dir=base / "cache",
        log_path=base / "mount.log",
        extra_args=["--cache-size", "1048576", "--read-part-size", Tuning().read_part_size, *MOUNT_ARGS],
    )
    m.start()
    s3 = server.client()

    def real(p: str) -> str:
        return str(m.path / p) if p else str(m.path)

    def write(p: str, data: bytes, mode: str, off: int = 0) -> None:
        with open(real(p), mode, buffering=0) as f:
            if off:
                f.seek(off)
            for i in range(0, len(data), 65536):
                f.write(data[i : i + 65536])

    def state() -> str:
        try:
            return f"{len(s3.get_object(Bucket=bucket, Key=watch)['Body'].read())} B"
        except s3.exceptions.NoSuchKey:
            return "absent"

    previous = state()
    try:
        for n, line in enumerate(calls, 1):
            try:
                if g := re.match(r"(write|append)\('([^']*)', (\d+) bytes seed=(\d+)\)", line):
                    write(g[2], payload(int(g[3]), int(g[4])), "wb" if g[1] == "write" else "ab")
                elif g := re.match(r"overwrite\('([^']*)', at (\d+), (\d+) bytes seed=(\d+)\)", line):
                    write(g[1], payload(int(g[3]), int(g[4])), "r+b", int(g[2]))
                elif g := re.match(r"truncate\('([^']*)', (\d+)\)", line):
                    os.truncate(real(g[1]), int(g[2]))
                elif g := re.match(r"(mkdir|rmdir|unlink|stat|listdir)\('([^']*)'\)", line):
                    getattr(os, g[1])(real(g[2]))
                elif g := re.match(r"rename\('([^']*)', '([^']*)'\)", line):
                    os.rename(real(g[1]), real(g[2]))
                elif g := re.match(r"read\('([^']*)'\)", line):
                    Path(real(g[1])).read_bytes()
                elif g := re.match(r"pread\('([^']*)', (\d+), at (\d+)\)", line):
                    fd = os.open(real(g[1]), os.O_RDONLY)
                    try:
                        os.pread(fd, int(g[2]), int(g[3]))
                    finally:
                        os.close(fd)
                elif line.startswith("remount"):
                    m.unmount()
                    if "wiped" in line:
                        m.wipe_cache()
                    m.start()
                    wait_until(lambda: "listed " in m.log_text().rsplit("start:", 1)[-1], 30)
                else:
                    continue
                outcome = "ok"
            except OSError as e:
                outcome = os.strerror(e.errno or 0)
            now = state()
            if now != previous or watch in line:
                print(f"{n:4d} {line[:100]:100s} -> {outcome}; S3 {watch}: {now}")
            previous = now
    finally:
        m.cleanup()
        server.stop()
    print(f"mount log: {base / 'mount.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
