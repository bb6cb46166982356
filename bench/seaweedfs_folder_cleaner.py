"""Show that SeaweedFS's empty-folder cleaner deletes acknowledged objects (no s3cachefs involved).

SeaweedFS keeps S3 "folders" as real directories. When the last object under a folder is deleted,
its S3 gateway queues the folder and removes it later if it is still empty (the delay is
`filer.options.s3.empty_folder_cleanup_delay` in filer.toml, default 2m; the queue is looked at
every 30 s). In SeaweedFS 4.48 the queued entry is removed by name even when the key now holds an
object: put "d/x", delete "d/x" (d is queued), put "d", delete "d", put "d" again (acknowledged
with 200), and at the cleaner's next pass "d" is gone. This is what the model-based test found as
"an object missing from the bucket that the mount still listed", about once per 30,000 operations,
since it reuses a few names as files and directories in turn.

Run: python -m bench.seaweedfs_folder_cleaner [--delay 1s] [--wait 40]
Starts one `weed mini` with the cleaner's delay set to --delay and one with the delay the test
harness uses (never), writes each sequence below with boto3, waits --wait seconds (past one pass of
the cleaner) and reads every key back. Exit code 0 when the harness's server lost nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.harness import NEVER, S3Server

# Each sequence ends with a successful write of key "F" (F is replaced by the sequence's name).
SEQUENCES: dict[str, list[str]] = {
    "put_del_put": ["put F/x", "del F/x", "put F", "del F", "put F"],
    "put_del_copy": ["put F/x", "del F/x", "put F", "del F", "copy F"],
    "rmdir_then_copy": ["put F/x", "del F/x", "del F/", "copy F"],
    "file_and_folder": ["put F/x", "put F", "del F/x", "del F", "put F"],
    "put_onto_empty_folder": ["put F/x", "del F/x", "put F"],
    "never_a_folder": ["put F"],
}


def run(delay: str, wait: float, base: Path) -> dict[str, bool]:
    """Per sequence: is the acknowledged object still there after `wait` seconds?"""
    server = S3Server(base, empty_folder_cleanup_delay=delay).start()
    try:
        s3 = server.client()
        bucket = server.new_bucket()
        s3.put_object(Bucket=bucket, Key="source", Body=b"copy source")
        expected: dict[str, bytes] = {}
        for name, steps in SEQUENCES.items():
            for step in steps:
                op, key = step.split()
                key = key.replace("F", name)
                if op == "put":
                    body = f"{name} written by {step}".encode()
                    s3.put_object(Bucket=bucket, Key=key, Body=body)
                elif op == "copy":
                    body = b"copy source"
                    s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": "source"})
                else:
                    s3.delete_object(Bucket=bucket, Key=key)
                    continue
                if key == name:
                    expected[name] = body

        def intact(name: str) -> bool:
            try:
                return s3.get_object(Bucket=bucket, Key=name)["Body"].read() == expected[name]
            except s3.exceptions.NoSuchKey:
                return False

        before = {name: intact(name) for name in SEQUENCES}
        if not all(before.values()):
            raise RuntimeError(f"objects missing right after their writes: {before}")
        time.sleep(wait)
        return {name: intact(name) for name in SEQUENCES}
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay", default="1s", help="the cleaner's delay for the first server (default 1s)")
    ap.add_argument("--wait", type=float, default=40.0, help="seconds to wait after the writes (default 40)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3cfs-cleaner-") as tmp:
        results = {
            f"cleaner delay {args.delay}": run(args.delay, args.wait, Path(tmp) / "on"),
            "harness (cleaner never runs)": run(NEVER, args.wait, Path(tmp) / "off"),
        }
    width = max(len(n) for n in SEQUENCES)
    print(f"{'sequence':<{width}}  " + "  ".join(f"{label:>28}" for label in results))
    for name, steps in SEQUENCES.items():
        cells = "  ".join(f"{'kept' if r[name] else 'LOST':>28}" for r in results.values())
        print(f"{name:<{width}}  {cells}   ({', '.join(steps)})")
    harness_ok = all(results["harness (cleaner never runs)"].values())
    print(f"harness server lost {'nothing' if harness_ok else 'objects'}")
    return 0 if harness_ok else 1


if __name__ == "__main__":
    sys.exit(main())
