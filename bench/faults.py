"""Faults, counted: the scenarios of tests/test_faults.py with at least 1000 writes in all.

Starts its own SeaweedFS servers on loopback (free ports), a fault proxy and s3cachefs mounts, and
runs every fault kind with its share of --writes (proportions in tests/test_faults.py WEIGHTS):
proxy http_500 / http_503 / drop / reset_mid / blackhole, SeaweedFS SIGSTOP and SIGKILL during PUTs,
kill -9 of s3cachefs then remount, the cache filesystem full (8 MiB tmpfs), the cache directory
wiped between mounts. Originals (sync uploads) are mixed with thumbnails (async uploads, queued at
close()); every scenario ends with a kill -9 and a remount whose queue must drain. Prints one table
row per fault kind, sync and async writes apart, and exits 1 if any pass criterion was violated
(acknowledged write missing or wrong, 0-byte or partial object, unexpected object, wrong view through
the mount, hang past the bound, unexplained leftover multipart upload, queue not drained).

    sudo python -m bench.faults [--writes 1000] [--seed 1] [--only KIND ...] [--keep]

Needs root (FUSE and the tmpfs mount), like the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.harness import HarnessError, Mount, S3Server, check_fuse_available
from tests.test_faults import (
    KINDS,
    WEIGHTS,
    Tally,
    Timeouts,
    format_details,
    format_table,
    run_scenario,
)


class BenchEnv:
    """The Env of tests/test_faults.py without pytest: servers and mounts under one work directory."""

    def __init__(self, tmp: Path, timeouts: Timeouts) -> None:
        self.tmp = tmp
        self.timeouts = timeouts
        self._shared: S3Server | None = None
        self._private: list[S3Server] = []
        self._mounts: list[Mount] = []
        self._n = 0

    def shared_server(self) -> S3Server:
        if self._shared is None:
            self._shared = S3Server(self.tmp / "s3").start()
        return self._shared

    def private_server(self) -> S3Server:
        self._n += 1
        server = S3Server(self.tmp / f"s3-private{self._n}").start()
        self._private.append(server)
        return server

    def mount(
        self, server: S3Server, bucket: str, extra_args: Sequence[str], cache_dir: Path | None
    ) -> Mount:
        self._n += 1
        m = Mount(
            server,
            bucket,
            path=self.tmp / f"mnt{self._n}",
            cache_dir=cache_dir if cache_dir is not None else self.tmp / f"cache{self._n}",
            log_path=self.tmp / f"mount{self._n}.log",
            extra_args=extra_args,
        )
        self._mounts.append(m)
        return m

    def end_scenario(self) -> None:
        for m in self._mounts:
            with contextlib.suppress(Exception):
                m.cleanup()
        self._mounts.clear()
        for s in self._private:
            with contextlib.suppress(Exception):
                s.kill()
        self._private.clear()

    def close(self) -> None:
        self.end_scenario()
        if self._shared is not None:
            self._shared.stop()


def split(total: int, kinds: Sequence[str]) -> dict[str, int]:
    """total writes over kinds in proportion to WEIGHTS (largest remainder), at least 4 each."""
    weight = sum(WEIGHTS[k] for k in kinds)
    exact = {k: total * WEIGHTS[k] / weight for k in kinds}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(kinds, key=lambda k: counts[k] - exact[k])[: total - sum(counts.values())]:
        counts[k] += 1
    return {k: max(4, n) for k, n in counts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=1000, help="writes in all, split over the fault kinds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", nargs="+", choices=KINDS, help="run only these fault kinds")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = ap.parse_args()
    try:
        check_fuse_available()
    except HarnessError as e:
        print(e, file=sys.stderr)
        return 2
    kinds = list(args.only or KINDS)
    counts = split(args.writes, kinds)
    timeouts = Timeouts()
    print(
        f"s3cachefs fault run: {sum(counts.values())} writes, seed {args.seed}; mount options "
        f"{' '.join(timeouts.mount_args())}; bound per close(): {timeouts.close_bound_s(1):.0f}s for a PUT, "
        f"{timeouts.close_bound_s(11 * 1024 * 1024):.0f}s for a multipart upload of up to 11 MiB; "
        f"other syscalls {timeouts.syscall_bound_s:.0f}s",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="s3cfs-faults-"))
    env = BenchEnv(work, timeouts)
    tallies: list[Tally] = []
    started = time.monotonic()
    try:
        for i, kind in enumerate(kinds):
            t0 = time.monotonic()
            try:
                tally = run_scenario(kind, counts[kind], env, seed=args.seed * 100 + i)
            except Exception as e:  # a scenario that cannot even finish is a failed criterion, not a crash
                tally = Tally(kind, timeouts)
                tally.problem(f"the scenario itself failed: {e!r}")
                tally.seconds = time.monotonic() - t0
            finally:
                env.end_scenario()
            tallies.append(tally)
            sync, asy = tally.by_kind["sync"], tally.by_kind["async"]
            print(
                f"  {kind}: {tally.writes} writes; sync {sync.acked} acknowledged, {sync.failed} failed; "
                f"async {asy.acked} acknowledged, {asy.failed} failed; "
                f"{'ok' if tally.ok else 'FAIL'} ({tally.seconds:.0f}s)",
                flush=True,
            )
    finally:
        env.close()
        if args.keep:
            print(f"work directory (logs): {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_table(tallies))
    print()
    print(format_details(tallies))
    print(f"\nwall time {time.monotonic() - started:.0f}s")
    return 0 if all(t.ok for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
