"""s3cachefs against its peers and the limits, with Synapse-shaped workloads, in one run.

All systems talk to one private SeaweedFS on loopback (tests/harness.py S3Server), each to its own
bucket (the stat tree is one shared bucket that every system only reads):

  s3cachefs  this checkout, --cache-size 20G                          durable at close()
  rclone     rclone mount --vfs-cache-mode full (defaults otherwise)  durable 5 s after close (write-back)
  s3fs       s3fs-fuse -o use_cache=DIR                               durable at close()
  boto3      put_object / get_object / download_file: the S3 limit
  local      a directory on the same disk (writes fsynced): the disk limit

and, whenever s3cachefs runs, two floors that are not contenders: bench/pyfuse3_floor.py (a pyfuse3
filesystem that answers from memory; hot reads and stat) and bench/pyfuse3_s3_floor.py (the thinnest
write-through S3 layer in pyfuse3 + trio + boto3; small writes and cold small reads).

Workloads (each system, --runs times, medians reported; latencies as p50/p90 over all runs):
  small       N Synapse media files (an original of ~200 KiB and 5 thumbnails of 5-100 KiB per item,
              fixed seed) written at local_content/AA/BB/REST and local_thumbnails/... with makedirs +
              open("wb") + 64 KiB writes + close(); files/s until the last one is durable in S3 (rclone:
              S3 is polled; s3cachefs and s3fs: checked once after the batch, and a missing object is a
              failure). Then hot reads of the same files, whole-file 16 KiB reads, 3 passes.
  cold_small  N files put into S3 with boto3, read through a fresh mount (cache directory wiped,
              metadata warmed by one untimed stat of every file, page cache dropped); boto3's figure is
              get_object of the same objects after the same page-cache drop.
  large       one large file (256 MiB) written with 1 MiB writes (MB/s until durable), read hot 3 times
              (first re-read and repeat reads reported apart), then read cold through a fresh mount with
              the time to first byte (open() until the first 64 KiB read returns). boto3: upload_fileobj;
              download_file with the default TransferConfig (the target's reference) and one get_object
              stream (reported too).
  concurrent  8 threads read one cold large file (put with boto3) at once; aggregate MB/s.
  stat        os.stat of M known files (10,000; objects put with boto3) in a fresh mount: a first pass
              (the mount learns the names; s3cachefs's background listing is waited for), then the
              measured second pass, then a third after dropping the kernel's dentries (echo 2 >
              drop_caches) so that every lookup reaches the daemon. boto3: head_object.

Every byte read is compared with what was written; a system that returns wrong bytes (or loses a write)
is FAILED for that workload, never fast. Cold phases drop the kernel's page cache (sync; echo 3 >
/proc/sys/vm/drop_caches): this needs root and affects everything else on the machine.

    python -m bench.compare [--runs 3] [--quick] [--only s3cachefs,rclone] [--workloads small,large]

Writes BENCHMARKS.md (full runs; --output to choose, --output '' for none) and a JSON of every sample.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import boto3.s3.transfer
    import botocore
except ImportError as e:  # the project's virtualenv has them (scripts/install.sh)
    sys.exit(f"bench/compare.py: {e}; run it with the project's virtualenv python (e.g. .venv/bin/python)")
from bench.compare_systems import (
    ALL_SYSTEMS,
    FloorSystem,
    MountSystem,
    S3cachefsSystem,
    S3FloorSystem,
    System,
    SystemError_,
    _fs_type,
    _run_version,
    bench_client,
    find_binary,
)
from tests.harness import REPO_ROOT, S3Server, weed_binary

KiB, MiB = 1024, 1024 * 1024
WRITE_CHUNK = 64 * KiB  # Synapse's store_into_file copies in chunks of this order
READ_CHUNK = 16 * KiB  # synapse-s3-storage-provider / Synapse's sender read size
LARGE_CHUNK = 1 * MiB
TTFB_CHUNK = 64 * KiB
READERS = 8
HOT_PASSES = 3
SYSTEM_ORDER = ["s3cachefs", "rclone", "s3fs", "boto3", "local"]
WORKLOADS = ["small", "cold_small", "large", "concurrent", "stat"]
THUMBS = [  # Synapse's default thumbnail_sizes, with a plausible JPEG size range for each
    ("32-32-image-jpeg-crop", 5, 8),
    ("96-96-image-jpeg-crop", 8, 20),
    ("320-240-image-jpeg-scale", 20, 45),
    ("640-480-image-jpeg-scale", 40, 80),
    ("800-600-image-jpeg-scale", 60, 100),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


perf = time.perf_counter


# ---------------------------------------------------------------------------------------------------
# Metrics and results
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    workload: str
    label: str
    unit: str
    higher_better: bool
    samples: bool = False  # True: per-operation latencies, summarised as p50/p90 over all runs
    breakdown: bool = False  # a step of an operation: shown in the "where the time goes" table


METRICS = [
    Metric("sw_fps", "small", "small writes until durable", "files/s", True),
    Metric("sw_file_ms", "small", "small write: makedirs+open+write+close", "ms", False, samples=True),
    Metric("sw_close_ms", "small", "small write: close() alone", "ms", False, samples=True),
    Metric(
        "sw_mkdir_ms", "small", "small write: makedirs() alone", "ms", False, samples=True, breakdown=True
    ),
    Metric("sw_open_ms", "small", "small write: open('wb') alone", "ms", False, samples=True, breakdown=True),
    Metric(
        "sw_write_ms",
        "small",
        "small write: the 64 KiB writes (local: and fsync)",
        "ms",
        False,
        samples=True,
        breakdown=True,
    ),
    Metric("sw_lag_s", "small", "small writes: last close -> all durable", "s", False),
    Metric("sh_fps", "small", "hot small reads", "files/s", True),
    Metric("sh_ms", "small", "hot small read: open+read+close", "ms", False, samples=True),
    Metric("sh_open_ms", "small", "hot small read: open() alone", "ms", False, samples=True, breakdown=True),
    Metric("sh_first_ms", "small", "hot small read: first read()", "ms", False, samples=True, breakdown=True),
    Metric(
        "sh_close_ms", "small", "hot small read: close() alone", "ms", False, samples=True, breakdown=True
    ),
    Metric("sc_fps", "cold_small", "cold small reads", "files/s", True),
    Metric("sc_ms", "cold_small", "cold small read: open+read+close", "ms", False, samples=True),
    Metric(
        "sc_open_ms", "cold_small", "cold small read: open() alone", "ms", False, samples=True, breakdown=True
    ),
    Metric(
        "sc_first_ms",
        "cold_small",
        "cold small read: first read()",
        "ms",
        False,
        samples=True,
        breakdown=True,
    ),
    Metric("lw_MBps", "large", "large write until durable", "MB/s", True),
    Metric("lw_close_s", "large", "large write: close() alone", "s", False),
    Metric("lh1_MBps", "large", "large hot read, first re-read", "MB/s", True),
    Metric("lhr_MBps", "large", "large hot read, repeat reads", "MB/s", True),
    Metric("lc_MBps", "large", "large cold read (boto3: download_file)", "MB/s", True),
    Metric("lcs_MBps", "large", "large cold read, one get_object stream", "MB/s", True),
    Metric("lc_ttfb_ms", "large", "large cold read: time to first byte", "ms", False),
    Metric("cc_MBps", "concurrent", f"{READERS} readers of one cold large file", "MB/s", True),
    Metric("st1_ps", "stat", "stat, first pass (fresh mount)", "stats/s", True),
    Metric("st2_ps", "stat", "stat, second pass", "stats/s", True),
    Metric("st3_ps", "stat", "stat, after dropping dentries", "stats/s", True),
]
METRIC = {m.key: m for m in METRICS}
PHASES = ["small_write", "small_hot", "cold_small", "large_write", "large_hot", "large_cold", "concurrent",
          "stat_pass2"]  # fmt: skip


@dataclass
class Results:
    # values[metric][system] = one value per run (rates) or one list of samples per run (latencies)
    values: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)  # (workload, system) -> reason
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # phase -> system -> daemon CPU s
    # phase -> FUSE requests the S3 floor served per file, by operation, one dict per run
    requests: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, system: str, value: Any) -> None:
        assert metric in METRIC, metric
        self.values.setdefault(metric, {}).setdefault(system, []).append(value)

    def fail(self, workload: str, system: str, reason: str) -> None:
        first_line = reason.strip().splitlines()[0] if reason.strip() else "failed"
        self.failed.setdefault((workload, system), first_line[:200])
        log(f"!! {system} FAILED {workload}: {reason.strip()[:2000]}")

    def is_failed(self, metric: str, system: str) -> bool:
        return (METRIC[metric].workload, system) in self.failed

    def summary(self, metric: str, system: str) -> float | None:
        """Median over runs (rates) or p50 over all samples (latencies); None if absent or failed."""
        if self.is_failed(metric, system):
            return None
        vals = self.values.get(metric, {}).get(system)
        if not vals:
            return None
        if METRIC[metric].samples:
            flat = [x for run in vals for x in run]
            return pct(flat, 0.5) if flat else None
        return float(statistics.median(vals))

    def p90(self, metric: str, system: str) -> float | None:
        if self.is_failed(metric, system):
            return None
        vals = self.values.get(metric, {}).get(system)
        if not vals:
            return None
        flat = [x for run in vals for x in run]
        return pct(flat, 0.9) if flat else None


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------------
# Failures, watchdog, page cache, CPU accounting, profiling
# ---------------------------------------------------------------------------------------------------


class BenchFailure(Exception):
    """The system did something wrong (wrong bytes, a lost write, a missing file)."""


class PhaseTimeout(BenchFailure):
    pass


@contextlib.contextmanager
def watchdog(system: System, seconds: float, what: str) -> Iterator[None]:
    """Kill the system if the phase runs past `seconds`: calls blocked on its mount then return with
    an error (ENOTCONN), the phase fails as TIMEOUT, and the run goes on."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        log(f"!! {system.name}: {what} still running after {seconds:.0f}s; killing it")
        system.kill()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except BaseException as e:
        if fired.is_set():
            raise PhaseTimeout(f"TIMEOUT: {what} exceeded {seconds:.0f}s") from e
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise PhaseTimeout(f"TIMEOUT: {what} exceeded {seconds:.0f}s")


class PageCache:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.works: bool | None = None

    def drop(self, level: int = 3) -> None:
        """sync, then drop the page cache (3) or only dentries and inodes (2)."""
        if not self.enabled:
            return
        try:
            subprocess.run(["sync"], timeout=300, check=False)
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write(f"{level}\n")
            self.works = True
        except (OSError, subprocess.TimeoutExpired) as e:
            if self.works is None:
                log(
                    f"!! cannot drop the page cache ({e}); cold phases are only cold for the systems' own caches"
                )
            self.works = False


def _self_cpu() -> float:
    """CPU seconds of this process (all its threads) so far."""
    t = os.times()
    return t.user + t.system


def proc_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process and its reaped children, in seconds."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = sum(int(x) for x in fields[11:15])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Profiler:
    """py-spy record of the s3cachefs daemon during each timed phase (perturbs the figures)."""

    def __init__(self, outdir: Path | None) -> None:
        self.outdir = outdir
        self.exe = find_binary("py-spy") if outdir else None
        if outdir and not self.exe:
            log("!! --py-spy given but py-spy is not installed (pip install py-spy); not profiling")
        if outdir:
            outdir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def record(self, system: System, label: str) -> Iterator[None]:
        pid = system.pid()
        if not self.exe or not isinstance(system, S3cachefsSystem) or pid is None:
            yield
            return
        assert self.outdir is not None
        out = self.outdir / f"{label}.txt"
        p = subprocess.Popen(
            [self.exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--threads",
             "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # let it attach
        try:
            yield
        finally:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


# ---------------------------------------------------------------------------------------------------
# Data sets (fixed seeds; Synapse's layout)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    rel: str
    data: bytes


def _media_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters) for _ in range(24))


def synapse_files(seed: int, count: int, remote: bool) -> list[FileSpec]:
    """count files, 1 original (~200 KiB) then 5 thumbnails (5-100 KiB) per media item."""
    rng = random.Random(seed)
    out: list[FileSpec] = []
    while len(out) < count:
        mid = _media_id(rng)
        sub = f"{mid[0:2]}/{mid[2:4]}/{mid[4:]}"
        if remote:
            content, thumbs = f"remote_content/example.org/{sub}", f"remote_thumbnail/example.org/{sub}"
        else:
            content, thumbs = f"local_content/{sub}", f"local_thumbnails/{sub}"
        out.append(FileSpec(content, rng.randbytes(rng.randint(150 * KiB, 250 * KiB))))
        for name, lo, hi in THUMBS:
            if len(out) < count:
                out.append(FileSpec(f"{thumbs}/{name}", rng.randbytes(rng.randint(lo * KiB, hi * KiB))))
    return out


def stat_tree(seed: int, count: int) -> list[tuple[str, int]]:
    """count (path, size) pairs of tiny files, one media item per AA/BB directory as in Synapse."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        mid = _media_id(rng)
        out.append((f"local_content/{mid[0:2]}/{mid[2:4]}/{mid[4:]}", rng.randint(100, 2000)))
    return out


def random_bytes(seed: int, n: int) -> bytes:
    """n reproducible random bytes (randbytes takes at most 2**31 - 1 bits per call)."""
    rng = random.Random(seed)
    return b"".join(rng.randbytes(min(16 * MiB, n - off)) for off in range(0, n, 16 * MiB))


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------------------------------------------
# S3 helpers (untimed bookkeeping and the durability poll)
# ---------------------------------------------------------------------------------------------------


def s3_state(client: Any, bucket: str, prefixes: set[str]) -> dict[str, tuple[int, str]]:
    """key -> (size, etag) of every object under the given prefixes."""
    out: dict[str, tuple[int, str]] = {}
    for prefix in sorted(prefixes):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = (int(o["Size"]), o.get("ETag", "").strip('"'))
    return out


def not_durable(client: Any, bucket: str, expect: dict[str, tuple[int, str]]) -> dict[str, str]:
    """The expected objects S3 does not hold yet (or holds with the wrong size or MD5), with why."""
    prefixes = {"/".join(k.split("/")[:2]) for k in expect}
    have = s3_state(client, bucket, prefixes)
    bad = {}
    for key, (size, md5) in expect.items():
        got = have.get(key)
        if got is None:
            bad[key] = "missing"
        elif got[0] != size:
            bad[key] = f"size {got[0]} != {size}"
        elif "-" not in got[1] and got[1] and got[1] != md5:
            bad[key] = f"ETag {got[1]} != MD5 {md5}"
    return bad


def wait_durable(system: System, client: Any, expect: dict[str, tuple[int, str]], timeout: float) -> float:
    """perf_counter() time at which every expected object was seen in S3.

    Durable-at-close systems must already be done: they are checked once, and any object missing
    then is a failure (their close() said it was stored). Write-back systems (rclone) are polled.
    """
    bucket = system.current_bucket or system.bucket
    if system.durable_at_close:
        bad = not_durable(client, bucket, expect)
        if bad:
            k, why = next(iter(bad.items()))
            raise BenchFailure(f"{len(bad)} of {len(expect)} objects not in S3 after close(): {k}: {why}")
        return -1.0
    deadline = perf() + timeout
    while True:
        t = perf()
        bad = not_durable(client, bucket, expect)
        if not bad:
            return t
        if perf() > deadline:
            k, why = next(iter(bad.items()))
            raise BenchFailure(
                f"{len(bad)} of {len(expect)} objects not in S3 after {timeout:.0f}s: {k}: {why}"
            )
        time.sleep(0.05)


def put_many(client: Any, bucket: str, items: list[tuple[str, bytes]], threads: int = 16) -> None:
    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=bucket, Key=item[0], Body=item[1])

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(put, items))


# ---------------------------------------------------------------------------------------------------
# Workload primitives
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteTimes:
    """Seconds spent in each step of one file write."""

    total: float
    makedirs: float
    open: float
    write: float  # the writes (and the fsync, where there is one)
    close: float


def write_file(path: Path, data: bytes, chunk: int, fsync: bool) -> WriteTimes:
    """makedirs + open("wb") + chunked writes + close(), each step timed."""
    mv = memoryview(data)
    t0 = perf()
    os.makedirs(path.parent, exist_ok=True)
    tm = perf()
    f = open(path, "wb", buffering=0)  # noqa: SIM115 - close() is timed on its own
    to = perf()
    try:
        for off in range(0, len(data), chunk):
            part = mv[off : off + chunk]
            while part:
                n = f.write(part)
                part = part[n:]
        if fsync:
            os.fsync(f.fileno())
    except BaseException:
        f.close()
        raise
    tc = perf()
    f.close()
    t1 = perf()
    return WriteTimes(t1 - t0, tm - t0, to - tm, tc - to, t1 - tc)


@dataclass(frozen=True)
class ReadTimes:
    total: float
    open: float
    first: float  # the first read() (for a cold file: the fetch, or its first bytes)
    close: float


def read_small(path: Path) -> tuple[ReadTimes, bytes]:
    """open + whole-file 16 KiB reads + close, timed step by step; returns (times, bytes)."""
    chunks = []
    t0 = perf()
    f = open(path, "rb", buffering=0)  # noqa: SIM115 - close() is timed on its own
    try:
        to = perf()
        b = f.read(READ_CHUNK)
        tf = perf()
        while b:
            chunks.append(b)
            b = f.read(READ_CHUNK)
    except BaseException:
        f.close()
        raise
    tc = perf()
    f.close()
    t1 = perf()
    return ReadTimes(t1 - t0, to - t0, tf - to, t1 - tc), b"".join(chunks)


def read_large(path: Path, size: int) -> tuple[float, float, bytearray]:
    """open + a 64 KiB first read + 1 MiB reads into one buffer; returns (total s, TTFB s, buffer).

    Reads go into a preallocated buffer so that checking the bytes costs nothing inside the timing.
    """
    buf = bytearray(size + LARGE_CHUNK)
    mv = memoryview(buf)
    t0 = perf()
    with open(path, "rb", buffering=0) as f:
        got = f.readinto(mv[0:TTFB_CHUNK]) or 0
        ttfb = perf() - t0
        while True:
            n = f.readinto(mv[got : got + LARGE_CHUNK])
            if not n:
                break
            got += n
            if got > size:
                break
    total = perf() - t0
    del mv
    del buf[got:]
    return total, ttfb, buf


def read_large_s3(client: Any, bucket: str, key: str, size: int) -> tuple[float, float, bytearray]:
    buf = bytearray()
    t0 = perf()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    first = body.read(TTFB_CHUNK)
    ttfb = perf() - t0
    buf += first
    while chunk := body.read(LARGE_CHUNK):
        buf += chunk
    return perf() - t0, ttfb, buf


def check_bytes(what: str, got: bytes | bytearray, expected: bytes) -> None:
    if got != expected:
        raise BenchFailure(
            f"WRONG BYTES: {what}: {len(got)} bytes, MD5 {md5_hex(bytes(got))}; "
            f"expected {len(expected)} bytes, MD5 {md5_hex(expected)}"
        )


# ---------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------


@dataclass
class Sizes:
    small_files: int
    cold_files: int
    large: int
    stat_files: int


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes, workdir: Path) -> None:
        self.args = args
        self.sizes = sizes
        self.workdir = workdir
        self.res = Results()
        self.page_cache = PageCache(not args.no_drop_caches)
        self.profiler = Profiler(Path(args.py_spy).resolve() if args.py_spy else None)
        self.server = S3Server(workdir / "s3")
        self.client: Any = None
        self.systems: list[System] = []
        self.stat_bucket = ""
        self.stat_items: list[tuple[str, int]] = []
        self.weed_pid: int | None = None
        self.floor = FloorSystem(self.server, workdir)
        self.s3floor: S3FloorSystem | None = None  # measured with the systems on small_write, cold_small

    # -- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        log(f"starting SeaweedFS in {self.workdir / 's3'}")
        self.server.start()
        self.weed_pid = self.server.proc.pid if self.server.proc else None
        self.client = bench_client(self.server)
        for name in SYSTEM_ORDER:
            if name not in self.args.only:
                continue
            system = ALL_SYSTEMS[name](self.server, self.workdir)
            why = system.available()
            if why:
                self.res.notes.append(f"{name} skipped: {why}")
                log(f"!! {name} skipped: {why}")
                continue
            system.prepare()
            self.systems.append(system)
        if "s3cachefs" in self.args.only and {"small", "cold_small"} & set(self.args.workloads):
            self.s3floor = S3FloorSystem(self.server, self.workdir)
            self.s3floor.prepare()
        if "stat" in self.args.workloads:
            self.stat_items = stat_tree(self.args.seed + 7, self.sizes.stat_files)
            if any(s.s3_backed for s in self.systems):
                self.stat_bucket = self.server.new_bucket()
                log(f"putting {len(self.stat_items)} tiny objects for the stat workload")
                put_many(self.client, self.stat_bucket, [(k, b"s" * n) for k, n in self.stat_items])
            for s in self.systems:
                if not s.s3_backed:
                    for rel, n in self.stat_items:
                        p = s.root / "stat" / rel
                        p.parent.mkdir(parents=True, exist_ok=True)
                        p.write_bytes(b"s" * n)

    def teardown(self) -> None:
        for s in self.systems:
            try:
                s.stop()
            except Exception as e:
                log(f"!! {s.name}: clean stop failed ({e}); killing it")
            with contextlib.suppress(Exception):
                s.kill()
        for floor in (self.floor, self.s3floor):
            with contextlib.suppress(Exception):
                if floor is not None:
                    floor.kill()
        with contextlib.suppress(Exception):
            self.server.stop()

    # -- phases ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, system: System, phase: str, run: int) -> Iterator[None]:
        """CPU accounting of the system's daemon (and of SeaweedFS) plus an optional profile."""
        pid = system.pid()
        c0, w0, b0 = proc_cpu_seconds(pid), proc_cpu_seconds(self.weed_pid), _self_cpu()
        with self.profiler.record(system, f"{system.name}-{phase}-run{run}"):
            yield
        c1, w1, b1 = proc_cpu_seconds(pid), proc_cpu_seconds(self.weed_pid), _self_cpu()
        per = self.res.cpu.setdefault(phase, {})
        if c0 is not None and c1 is not None:
            per.setdefault(system.name, []).append(c1 - c0)
        if w0 is not None and w1 is not None:
            per.setdefault(f"{system.name}:weed", []).append(w1 - w0)
        per.setdefault(f"{system.name}:client", []).append(b1 - b0)

    def guarded(self, workload: str, system: System, fn: Callable[[], None]) -> bool:
        if (workload, system.name) in self.res.failed:
            return False
        try:
            fn()
            return True
        except (BenchFailure, SystemError_, OSError, botocore.exceptions.BotoCoreError,
                botocore.exceptions.ClientError) as e:  # fmt: skip
            tail = system.log_tail() if isinstance(e, OSError) else ""
            self.res.fail(workload, system.name, f"{e}" + (f"\n{tail}" if tail else ""))
            if isinstance(system, MountSystem):
                with contextlib.suppress(Exception):
                    system.kill()
            return False

    def restart(self, system: System, bucket: str) -> None:
        """A fresh start: cache directory wiped, background work finished."""
        if isinstance(system, MountSystem):
            system.stop()
            system.start(bucket, fresh=True)
            system.wait_ready()
        else:
            system.start(bucket, fresh=True)

    def ensure_running(self, system: System) -> None:
        if isinstance(system, MountSystem) and system.pid() is None:
            self.restart(system, system.bucket)

    def run_round(self, run: int, order: list[System]) -> None:
        """One run: each phase for every system back to back (phase-major), so that the figures a
        ratio compares are taken minutes apart at most, not a whole run apart, on a busy machine."""
        wl = self.args.workloads
        seed = self.args.seed * 1000 + run
        small = synapse_files(seed, self.sizes.small_files, remote=False) if "small" in wl else []
        cold = synapse_files(seed + 2, self.sizes.cold_files, remote=True) if "cold_small" in wl else []
        large_a = random_bytes(seed + 1, self.sizes.large) if "large" in wl else b""
        large_b = random_bytes(seed + 3, self.sizes.large) if "concurrent" in wl else b""
        key_a = f"local_content/LA/RG/large{run:02d}{'x' * 16}"
        key_b = f"remote_content/example.org/LA/RG/large{run:02d}{'y' * 16}"

        # The S3 floor takes its turn right after s3cachefs, in the two phases it is measured on.
        at = next((i + 1 for i, s in enumerate(order) if s.name == "s3cachefs"), len(order))
        with_floor = order[:at] + ([self.s3floor] if self.s3floor is not None else []) + order[at:]

        def each(
            workload: str, fn: Callable[[System], None], drop: bool = False, systems: list[System] = order
        ) -> None:
            for system in systems:
                if (workload, system.name) in self.res.failed:
                    continue
                if drop:
                    self.page_cache.drop()
                if self.guarded(workload, system, functools.partial(self.ensure_running, system)):
                    self.guarded(workload, system, functools.partial(fn, system))

        # Every system starts from an empty cache; idle mounts stay up while the others are measured.
        live = [w for w in wl if w != "stat"]
        if live:
            for system in with_floor:
                if not system.s3_backed:
                    continue
                try:
                    self.restart(system, system.bucket)
                except SystemError_ as e:
                    for w in live:
                        self.res.fail(w, system.name, f"could not start: {e}")
        if small:
            log(f"--- run {run}: small writes, then hot small reads")
            write = self.counting("small_write", len(small), lambda s: self.small_write(s, small, run))
            each("small", write, systems=with_floor)
            each("small", lambda s: self.small_hot(s, small, run))
            self.floor_phase("hot small reads", lambda: self.floor_hot(len(small)))
        if large_a:
            log(f"--- run {run}: large write, then hot large reads")
            each("large", lambda s: self.large_write(s, key_a, large_a, run))
            each("large", lambda s: self.large_hot(s, key_a, large_a, run))
        if cold or large_a or large_b:
            log(f"--- run {run}: cold reads (objects put, caches emptied)")
            for system in with_floor:
                big = system is not self.s3floor  # the floor is for small files only
                self.prepare_cold(
                    system, cold, key_a, large_a if big else b"", key_b, large_b if big else b""
                )
            if cold:
                read = self.counting("cold_small", len(cold), lambda s: self.cold_small(s, cold, run))
                each("cold_small", read, drop=True, systems=with_floor)
            if large_a:
                each("large", lambda s: self.large_cold(s, key_a, large_a, run), drop=True)
            if large_b:
                each("concurrent", lambda s: self.concurrent(s, key_b, large_b, run), drop=True)
        for system in with_floor:
            if isinstance(system, MountSystem):
                try:
                    system.stop()
                except SystemError_ as e:
                    log(f"!! {system.name}: {e}")
        if "stat" in wl:
            log(f"--- run {run}: stat")
            self.floor_phase("stat", self.floor_stat)
            for system in order:
                self.guarded("stat", system, functools.partial(self.stat, system, run))
                if isinstance(system, MountSystem):
                    with contextlib.suppress(Exception):
                        system.stop()
        if not self.args.keep:
            for system in order:
                if isinstance(system, MountSystem):
                    for child in system.workdir.glob("cache-*"):
                        shutil.rmtree(child, ignore_errors=True)

    # the pyfuse3 floors ---------------------------------------------------------------------------

    def counting(self, phase: str, files: int, fn: Callable[[System], None]) -> Callable[[System], None]:
        """fn; around it, for the S3 floor, the FUSE requests it served during fn (per file)."""

        def run(system: System) -> None:
            floor = self.s3floor
            if floor is None or system is not floor:
                return fn(system)
            floor.requests()  # what came before (the untimed warm-up) is not counted
            fn(system)
            counts = floor.requests()
            self.res.requests.setdefault(phase, []).append({k: n / files for k, n in sorted(counts.items())})

        return run

    def floor_phase(self, what: str, fn: Callable[[], None]) -> None:
        """Measure bench/pyfuse3_floor.py (a no-op pyfuse3 filesystem) the way the systems are measured."""
        if "s3cachefs" not in self.args.only:
            return
        try:
            self.floor.start("floor", fresh=True)
            with watchdog(self.floor, 600, f"pyfuse3 floor: {what}"):
                fn()
        except (BenchFailure, SystemError_, OSError, ImportError) as e:
            note = f"pyfuse3 floor ({what}) not measured: {e}"
            if note not in self.res.notes:
                self.res.notes.append(note)
            log(f"!! {note}")
        finally:
            try:
                self.floor.stop()
            except SystemError_:
                self.floor.kill()

    def floor_hot(self, count: int) -> None:
        from bench.pyfuse3_floor import DATA

        paths = [self.floor.root / f"dm{i % 50:02d}/dx/f{i:06d}" for i in range(count)]
        for p in paths:
            os.stat(p)  # the names are known, as they are for the systems after writing them
        lat: list[float] = []
        for _ in range(HOT_PASSES):
            for p in paths:
                rt, got = read_small(p)
                check_bytes(str(p), got, DATA)
                lat.append(rt.total * 1000)
        self.res.add("sh_fps", self.floor.name, len(lat) / (sum(lat) / 1000))
        self.res.add("sh_ms", self.floor.name, lat)
        log(f"pyfuse3 floor: hot small reads {len(lat) / (sum(lat) / 1000):.0f} files/s")

    def floor_stat(self) -> None:
        from bench.pyfuse3_floor import FILE_SIZE

        # The stat tree's shape (4 levels, one file per leaf directory); directories start with "d".
        paths = [
            str(
                self.floor.root
                / "/".join([*("d" + c for c in rel.split("/")[:-1]), "f" + rel.split("/")[-1]])
            )
            for rel, _ in self.stat_items
        ]
        for p in paths:
            os.stat(p)
        self.page_cache.drop(2)
        t0 = perf()
        sizes = [os.stat(p).st_size for p in paths]
        rate = len(paths) / (perf() - t0)
        if any(n != FILE_SIZE for n in sizes):
            raise BenchFailure("pyfuse3 floor: wrong st_size")
        self.res.add("st3_ps", self.floor.name, rate)
        log(f"pyfuse3 floor: stat after dropping dentries {rate:.0f}/s")

    # small writes and hot reads ---------------------------------------------------------------------

    def small_write(self, system: System, files: list[FileSpec], run: int) -> None:
        lat: list[float] = []
        steps: list[WriteTimes] = []
        expect = {f.rel: (len(f.data), md5_hex(f.data)) for f in files}
        with self.phase(system, "small_write", run), watchdog(system, 900, "small writes"):
            t_start = perf()
            if system.is_fs:
                for f in files:
                    w = write_file(system.root / f.rel, f.data, WRITE_CHUNK, fsync=not system.s3_backed)
                    steps.append(w)
                    lat.append(w.total * 1000)
            else:
                for f in files:
                    t0 = perf()
                    self.client.put_object(Bucket=system.bucket, Key=f.rel, Body=f.data)
                    lat.append((perf() - t0) * 1000)
            t_closed = perf()
            t_durable = wait_durable(system, self.client, expect, timeout=300) if system.s3_backed else -1.0
        if t_durable < 0:
            t_durable = t_closed
        self.res.add("sw_fps", system.name, len(files) / (t_durable - t_start))
        self.res.add("sw_file_ms", system.name, lat)
        close = [w.close * 1000 for w in steps]
        if steps:
            self.res.add("sw_close_ms", system.name, close)
            self.res.add("sw_mkdir_ms", system.name, [w.makedirs * 1000 for w in steps])
            self.res.add("sw_open_ms", system.name, [w.open * 1000 for w in steps])
            self.res.add("sw_write_ms", system.name, [w.write * 1000 for w in steps])
        self.res.add("sw_lag_s", system.name, t_durable - t_closed)
        log(
            f"{system.name}: {len(files)} small writes: {len(files) / (t_durable - t_start):.1f} files/s "
            f"until durable (close p50 {pct(close or lat, 0.5):.2f} ms, lag {t_durable - t_closed:.2f}s)"
        )

    def read_small_files(
        self, system: System, files: list[FileSpec], passes: int = 1
    ) -> tuple[list[float], list[ReadTimes]]:
        """Read each file whole `passes` times, one after the other, checking its bytes. Returns the ms
        of every read, and (through a filesystem) the steps of each."""
        lat: list[float] = []
        steps: list[ReadTimes] = []
        for _ in range(passes):
            for f in files:
                if system.is_fs:
                    rt, got = read_small(system.root / f.rel)
                    steps.append(rt)
                    dt = rt.total
                else:
                    t0 = perf()
                    got = self.client.get_object(Bucket=system.bucket, Key=f.rel)["Body"].read()
                    dt = perf() - t0
                check_bytes(f.rel, got, f.data)
                lat.append(dt * 1000)
        return lat, steps

    def small_hot(self, system: System, files: list[FileSpec], run: int) -> None:
        with self.phase(system, "small_hot", run), watchdog(system, 900, "hot small reads"):
            lat, steps = self.read_small_files(system, files, HOT_PASSES)
        self.res.add("sh_fps", system.name, len(lat) / (sum(lat) / 1000))
        self.res.add("sh_ms", system.name, lat)
        if steps:
            self.res.add("sh_open_ms", system.name, [r.open * 1000 for r in steps])
            self.res.add("sh_first_ms", system.name, [r.first * 1000 for r in steps])
            self.res.add("sh_close_ms", system.name, [r.close * 1000 for r in steps])
        log(f"{system.name}: hot small reads: {len(lat) / (sum(lat) / 1000):.0f} files/s")

    # large file ---------------------------------------------------------------------------------------

    def large_write(self, system: System, key: str, data: bytes, run: int) -> None:
        size = len(data)
        with self.phase(system, "large_write", run), watchdog(system, 900, "large write"):
            t0 = perf()
            close_s = 0.0
            if system.is_fs:
                close_s = write_file(system.root / key, data, LARGE_CHUNK, fsync=not system.s3_backed).close
            else:
                self.client.upload_fileobj(io.BytesIO(data), system.bucket, key)
            t_closed = perf()
            t_durable = t_closed
            if system.s3_backed:
                t = wait_durable(system, self.client, {key: (size, md5_hex(data))}, timeout=600)
                if t > 0:
                    t_durable = t
        self.res.add("lw_MBps", system.name, size / 1e6 / (t_durable - t0))
        if system.is_fs:
            self.res.add("lw_close_s", system.name, close_s)
        log(
            f"{system.name}: large write {size / 1e6 / (t_durable - t0):.0f} MB/s until durable "
            f"(close {close_s:.2f}s, lag {t_durable - t_closed:.2f}s)"
        )

    def large_hot(self, system: System, key: str, data: bytes, run: int) -> None:
        rates = []
        with self.phase(system, "large_hot", run), watchdog(system, 900, "hot large reads"):
            for _ in range(HOT_PASSES):
                if system.is_fs:
                    dt, _, got = read_large(system.root / key, len(data))
                else:
                    dt, _, got = read_large_s3(self.client, system.bucket, key, len(data))
                check_bytes(key, got, data)
                del got
                rates.append(len(data) / 1e6 / dt)
        self.res.add("lh1_MBps", system.name, rates[0])
        self.res.add("lhr_MBps", system.name, statistics.median(rates[1:]))
        log(f"{system.name}: large hot reads (MB/s): " + ", ".join(f"{r:.0f}" for r in rates))

    # cold phases ------------------------------------------------------------------------------------

    def prepare_cold(
        self, system: System, cold: list[FileSpec], key_a: str, large_a: bytes, key_b: str, large_b: bytes
    ) -> None:
        """Untimed: put the objects the cold phases read (file A was written in the large phase),
        restart the system with an empty cache, and stat every file once: the names must be known
        before the timed reads (knowing names is the stat workload's subject), and the sizes right."""
        todo = [
            w
            for w, on in (("cold_small", bool(cold)), ("large", bool(large_a)), ("concurrent", bool(large_b)))
            if on and (w, system.name) not in self.res.failed
        ]
        if not todo:
            return
        try:
            if system.s3_backed:
                put_many(self.client, system.bucket, [(f.rel, f.data) for f in cold])
                if large_b:
                    self.client.upload_fileobj(io.BytesIO(large_b), system.bucket, key_b)
                self.restart(system, system.bucket)
            else:
                for f in cold:
                    write_file(system.root / f.rel, f.data, WRITE_CHUNK, fsync=True)
                if large_b:
                    write_file(system.root / key_b, large_b, LARGE_CHUNK, fsync=True)
            if system.is_fs:
                paths = [(f.rel, len(f.data)) for f in cold]
                if "large" in todo:
                    paths.append((key_a, len(large_a)))
                if large_b:
                    paths.append((key_b, len(large_b)))
                with watchdog(system, 900, "metadata warm-up before the cold reads"):
                    for rel, n in paths:
                        st = os.stat(system.root / rel)
                        if st.st_size != n:
                            raise BenchFailure(f"{rel}: st_size {st.st_size}, expected {n}")
        except (BenchFailure, SystemError_, OSError, botocore.exceptions.BotoCoreError,
                botocore.exceptions.ClientError) as e:  # fmt: skip
            for w in todo:
                self.res.fail(w, system.name, f"preparing the cold phases: {e}")
            if isinstance(system, MountSystem):
                system.kill()

    def cold_small(self, system: System, files: list[FileSpec], run: int) -> None:
        with self.phase(system, "cold_small", run), watchdog(system, 900, "cold small reads"):
            lat, steps = self.read_small_files(system, files)
        self.res.add("sc_fps", system.name, len(lat) / (sum(lat) / 1000))
        self.res.add("sc_ms", system.name, lat)
        if steps:
            self.res.add("sc_open_ms", system.name, [r.open * 1000 for r in steps])
            self.res.add("sc_first_ms", system.name, [r.first * 1000 for r in steps])
        log(
            f"{system.name}: cold small reads: {len(lat) / (sum(lat) / 1000):.0f} files/s "
            f"(p50 {pct(lat, 0.5):.2f} ms)"
        )

    def large_cold(self, system: System, key: str, data: bytes, run: int) -> None:
        size = len(data)
        with self.phase(system, "large_cold", run), watchdog(system, 900, "cold large read"):
            if system.is_fs:
                dt, ttfb, got = read_large(system.root / key, size)
                check_bytes(key, got, data)
                del got
                self.res.add("lc_MBps", system.name, size / 1e6 / dt)
                self.res.add("lc_ttfb_ms", system.name, ttfb * 1000)
                log(f"{system.name}: cold large read {size / 1e6 / dt:.0f} MB/s, TTFB {ttfb * 1000:.1f} ms")
                return
            # boto3: the managed download (default TransferConfig) is the target's reference ...
            dest = system.workdir / "download.bin"
            dest.unlink(missing_ok=True)
            t0 = perf()
            self.client.download_file(
                system.bucket, key, str(dest), Config=boto3.s3.transfer.TransferConfig()
            )
            dt = perf() - t0
        check_bytes(key, dest.read_bytes(), data)
        dest.unlink()
        # ... and one get_object stream, which also gives a time to first byte.
        self.page_cache.drop()
        with self.phase(system, "large_cold_stream", run), watchdog(system, 900, "cold large get_object"):
            dts, ttfb, got = read_large_s3(self.client, system.bucket, key, size)
        check_bytes(key, got, data)
        del got
        self.res.add("lc_MBps", system.name, size / 1e6 / dt)
        self.res.add("lcs_MBps", system.name, size / 1e6 / dts)
        self.res.add("lc_ttfb_ms", system.name, ttfb * 1000)
        log(
            f"{system.name}: download_file {size / 1e6 / dt:.0f} MB/s; get_object stream "
            f"{size / 1e6 / dts:.0f} MB/s, TTFB {ttfb * 1000:.1f} ms"
        )

    def concurrent(self, system: System, key: str, data: bytes, run: int) -> None:
        size = len(data)
        barrier = threading.Barrier(READERS)
        spans: list[tuple[float, float]] = [(0.0, 0.0)] * READERS
        bufs: list[bytearray | None] = [None] * READERS
        errors: list[BaseException] = []

        def reader(i: int) -> None:
            try:
                barrier.wait(60)
                t0 = perf()
                if system.is_fs:
                    _, _, got = read_large(system.root / key, size)
                else:
                    _, _, got = read_large_s3(self.client, system.bucket, key, size)
                spans[i] = (t0, perf())
                bufs[i] = got
            except BaseException as e:  # reported below
                errors.append(e)

        with self.phase(system, "concurrent", run), watchdog(system, 900, f"{READERS} concurrent readers"):
            threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(READERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(1000)
        if errors or any(t.is_alive() for t in threads):
            raise BenchFailure(f"reader failed: {errors[0] if errors else 'still running'}")
        for i, got in enumerate(bufs):
            assert got is not None
            check_bytes(f"{key} (reader {i})", got, data)
        bufs.clear()
        wall = max(e for _, e in spans) - min(s for s, _ in spans)
        self.res.add("cc_MBps", system.name, READERS * size / 1e6 / wall)
        log(f"{system.name}: {READERS} cold readers: {READERS * size / 1e6 / wall:.0f} MB/s aggregate")

    # stat -------------------------------------------------------------------------------------------

    def stat(self, system: System, run: int) -> None:
        items = self.stat_items
        if not system.is_fs:
            t0 = perf()
            with self.phase(system, "stat_pass2", run), watchdog(system, 1800, "head_object pass"):
                for key, n in items:
                    got = self.client.head_object(Bucket=self.stat_bucket, Key=key)["ContentLength"]
                    if got != n:
                        raise BenchFailure(f"HEAD {key}: {got} bytes, expected {n}")
            rate = len(items) / (perf() - t0)
            for m in ("st1_ps", "st2_ps", "st3_ps"):
                self.res.add(m, system.name, rate)
            log(f"{system.name}: head_object {rate:.0f}/s")
            return
        if system.s3_backed:
            self.restart(system, self.stat_bucket)
            base = system.root
        else:
            base = system.root / "stat"
        paths = [(str(base / rel), n) for rel, n in items]

        def one_pass(label: str) -> float:
            sizes = []
            t0 = perf()
            with watchdog(system, 1800, f"stat {label}"):
                for p, _ in paths:
                    sizes.append(os.stat(p).st_size)
            dt = perf() - t0
            for (p, n), got in zip(paths, sizes, strict=True):
                if got != n:
                    raise BenchFailure(f"stat {p}: st_size {got}, expected {n}")
            return len(paths) / dt

        r1 = one_pass("first pass")
        with self.phase(system, "stat_pass2", run):
            r2 = one_pass("second pass")
        self.page_cache.drop(2)
        with self.phase(system, "stat_pass3", run):
            r3 = one_pass("pass after dropping dentries")
        self.res.add("st1_ps", system.name, r1)
        self.res.add("st2_ps", system.name, r2)
        self.res.add("st3_ps", system.name, r3)
        log(f"{system.name}: stat passes: {r1:.0f}/s, {r2:.0f}/s, {r3:.0f}/s (after dropping dentries)")

    # -- main loop --------------------------------------------------------------------------------

    def run(self) -> None:
        for run in range(1, self.args.runs + 1):
            # Rotate the order so that no system always runs first (or last) in a run.
            rot = (run - 1) % max(1, len(self.systems))
            order = self.systems[rot:] + self.systems[:rot]
            log(f"=== run {run}/{self.args.runs}: " + ", ".join(s.name for s in order))
            self.run_round(run, order)


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _field(text: str, name: str, sep: str = ":") -> str:
    for ln in text.splitlines():
        if ln.startswith(name) and sep in ln:
            return ln.split(sep, 1)[1].strip().strip('"')
    return "?"


def machine() -> dict[str, str]:
    info: dict[str, str] = {}
    cpuinfo = _read("/proc/cpuinfo")
    mem = _field(_read("/proc/meminfo"), "MemTotal")
    with contextlib.suppress(ValueError, IndexError):
        mem = f"{int(mem.split()[0]) / 2**20:.1f} GiB"
    info["CPU"] = (
        f"{_field(cpuinfo, 'model name')}, {os.cpu_count()} cores "
        f"({cpuinfo.count('processor')} in /proc/cpuinfo)"
    )
    info["RAM"] = mem
    info["Kernel"] = platform.release()
    info["OS"] = _field(_read("/etc/os-release"), "PRETTY_NAME", "=")
    return info


def versions(systems: list[System]) -> dict[str, str]:
    v = {s.name: s.version() for s in systems}
    v["SeaweedFS"] = _run_version([weed_binary(), "version"])
    v["Python"] = platform.python_version()
    v["boto3"] = f"{boto3.__version__} (botocore {botocore.__version__})"
    with contextlib.suppress(Exception):
        import pyfuse3

        v["pyfuse3"] = pyfuse3.__version__ if hasattr(pyfuse3, "__version__") else "?"
    import trio

    v["trio"] = trio.__version__
    return v


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def speed_ratio(metric: Metric, ours: float | None, other: float | None) -> float | None:
    """> 1 means s3cachefs is better (faster, or lower latency)."""
    if ours is None or other is None or ours <= 0 or other <= 0:
        return None
    return ours / other if metric.higher_better else other / ours


@dataclass
class Target:
    text: str
    metric: str
    reference: str  # a system name, "best peer", or "" (absolute)
    factor: float  # ratio required (relative), or the bound (absolute)


TARGETS = [
    Target("durable small writes ≥ 0.9x the direct PUT rate", "sw_fps", "boto3", 0.9),
    Target("hot small reads ≥ 5x the best peer", "sh_fps", "best peer", 5.0),
    Target("hot large read ≥ 0.8x local disk", "lh1_MBps", "local", 0.8),
    Target("cold small reads ≥ 0.9x the direct GET rate", "sc_fps", "boto3", 0.9),
    Target("cold large read ≥ 1.0x boto3's download", "lc_MBps", "boto3", 1.0),
    Target("time to first byte on a cold large file ≤ 10 ms", "lc_ttfb_ms", "", 10.0),
]


def target_context(res: Results, metric: str) -> str:
    """Measured figures that explain a target's verdict (computed, like the verdict)."""
    S, P = res.summary, res.p90
    parts: list[str] = []

    def have(*vals: float | None) -> bool:
        return all(v is not None for v in vals)

    if metric == "sw_fps":
        c, put = S("sw_close_ms", "s3cachefs"), S("sw_file_ms", "boto3")
        whole = S("sw_file_ms", "s3cachefs")
        if have(c, put, whole):
            parts.append(
                f"per file p50: s3cachefs {fmt(whole)} ms (of which close() {fmt(c)} ms), "
                f"boto3 put_object {fmt(put)} ms"
            )
        parts += s3_floor_context(res, metric, "one put_object per close()", "sw_file_ms")
    elif metric == "sh_fps":
        floor, peer = (
            S("sh_fps", "pyfuse3-floor"),
            max((v for v in (S("sh_fps", "rclone"), S("sh_fps", "s3fs")) if v is not None), default=None),
        )
        if floor is not None and peer is not None:
            parts.append(
                f"a pyfuse3 filesystem that does nothing (bench/pyfuse3_floor.py) reaches {fmt(floor)} files/s "
                f"(p50 {fmt(S('sh_ms', 'pyfuse3-floor'))} ms) = {floor / peer:.2f}x the best peer"
            )
    elif metric == "lh1_MBps":
        rep_, loc = S("lhr_MBps", "s3cachefs"), S("lhr_MBps", "local")
        if rep_ is not None and loc is not None:
            parts.append(f"repeat reads: {fmt(rep_)} MB/s = {rep_ / loc:.2f}x local's repeat reads")
    elif metric == "sc_fps":
        first, get = S("sc_first_ms", "s3cachefs"), S("sc_ms", "boto3")
        if have(first, get):
            parts.append(
                f"p50: s3cachefs first read() {fmt(first)} ms (p90 {fmt(P('sc_first_ms', 's3cachefs'))}), "
                f"boto3 get_object {fmt(get)} ms (p90 {fmt(P('sc_ms', 'boto3'))})"
            )
        parts += s3_floor_context(res, metric, "one get_object per open()", "sc_ms")
    elif metric == "lc_MBps":
        stream = S("lcs_MBps", "boto3")
        if stream is not None:
            parts.append(f"boto3 one get_object stream: {fmt(stream)} MB/s")
        ours, ref = phase_cpu(res, "large_cold", "s3cachefs"), phase_cpu(res, "large_cold", "boto3")
        if have(ours, ref):
            assert ours is not None and ref is not None
            parts.append(
                f"CPU seconds per run of the phase, every process (S3 client or daemon + reader + weed): "
                f"s3cachefs {ours:.2f}, boto3 {ref:.2f} ({ours / ref:.2f}x) on {os.cpu_count()} cores"
            )
    elif metric == "lc_ttfb_ms":
        b = S("lc_ttfb_ms", "boto3")
        if b is not None:
            parts.append(f"boto3 get_object after the same page-cache drop: {fmt(b)} ms to its first 64 KiB")
    return "; ".join(parts)


def phase_cpu(res: Results, phase: str, name: str) -> float | None:
    """Median CPU seconds of one run of `phase` for `name`, summed over its daemon (if any), the
    benchmark client and the S3 server; None unless the client's and the server's were measured."""
    per = res.cpu.get(phase, {})
    client, weed = per.get(f"{name}:client"), per.get(f"{name}:weed")
    if not client or not weed:
        return None
    daemon = per.get(name)
    return sum(statistics.median(p) for p in (daemon, client, weed) if p)


def s3_floor_context(res: Results, metric: str, what: str, per_file: str) -> list[str]:
    floor, ref, ours = (res.summary(metric, n) for n in (S3FloorSystem.name, "boto3", "s3cachefs"))
    if floor is None or ref is None or ours is None:
        return []
    return [
        f"the write-through pyfuse3 + trio + boto3 floor (bench/pyfuse3_s3_floor.py: {what}, nothing else) "
        f"reaches {fmt(floor)} files/s = {floor / ref:.2f}x the reference (s3cachefs {ours / ref:.2f}x, "
        f"= {ours / floor:.2f}x the floor); floor per file p50 {fmt(res.summary(per_file, S3FloorSystem.name))} ms"
    ]


def evaluate_targets(res: Results, names: list[str]) -> list[list[str]]:
    return [[*r, target_context(res, t.metric)] for r, t in zip(_verdicts(res, names), TARGETS, strict=True)]


def _verdicts(res: Results, names: list[str]) -> list[list[str]]:
    rows = []
    for t in TARGETS:
        ours = res.summary(t.metric, "s3cachefs")
        unit = METRIC[t.metric].unit
        if "s3cachefs" not in names:
            rows.append([t.text, "–", "–", "–", "n/a (s3cachefs not run)"])
            continue
        if ours is None:
            why = res.failed.get((METRIC[t.metric].workload, "s3cachefs"), "not measured")
            rows.append([t.text, "FAILED" if "not measured" not in why else "–", "–", "–",
                         f"FAIL ({why})" if "not measured" not in why else "n/a (not measured)"])  # fmt: skip
            continue
        if not t.reference:
            verdict = "PASS" if ours <= t.factor else "FAIL"
            rows.append([t.text, f"{fmt(ours)} {unit}", "–", f"{fmt(ours)} {unit} (≤ {t.factor:g})", verdict])
            continue
        if t.reference == "best peer":
            peers: list[tuple[float, str]] = []
            for p in ("rclone", "s3fs"):
                v = res.summary(t.metric, p) if p in names else None
                if v is not None:
                    peers.append((v, p))
            if not peers:
                rows.append([t.text, f"{fmt(ours)} {unit}", "–", "–", "n/a (no peer measured)"])
                continue
            ref, ref_name = max(peers)
        else:
            ref_or_none, ref_name = res.summary(t.metric, t.reference), t.reference
            if ref_or_none is None:
                rows.append(
                    [t.text, f"{fmt(ours)} {unit}", f"{t.reference}: –", "–", "n/a (reference not measured)"]
                )
                continue
            ref = ref_or_none
        ratio = ours / ref
        verdict = "PASS" if ratio >= t.factor else "FAIL"
        rows.append([t.text, f"{fmt(ours)} {unit}", f"{ref_name}: {fmt(ref)} {unit}",
                     f"{ratio:.2f}x (≥ {t.factor:g}x)", verdict])  # fmt: skip
    return rows


FLOORS = {FloorSystem.name: "pyfuse3 no-op floor", S3FloorSystem.name: "pyfuse3 S3 floor"}


def floor_table(res: Results, names: list[str]) -> str:
    rows = []
    cols = [*FLOORS, *(n for n in ("s3cachefs", "rclone", "s3fs", "boto3", "local") if n in names)]
    for key in ("sh_fps", "sh_ms", "st3_ps", "sw_fps", "sw_file_ms", "sw_close_ms", "sc_fps", "sc_ms"):
        m = METRIC[key]
        if all(res.summary(key, f) is None and not res.is_failed(key, f) for f in FLOORS):
            continue
        unit = f"{m.unit} p50 / p90" if m.samples else m.unit
        rows.append([m.label, unit, *(cell(res, m, n) for n in cols)])
        ref = res.summary(key, "boto3") if key in ("sw_fps", "sc_fps") else None
        if ref is not None:
            ratios = [res.summary(key, n) for n in cols]
            rows.append([f"{m.label} / boto3's", "x", *(f"{r / ref:.2f}x" if r else "–" for r in ratios)])
    if not rows:
        return ""
    return md_table(["metric", "unit", *(FLOORS.get(n, n) for n in cols)], rows)


def requests_table(res: Results) -> str:
    """The FUSE requests the S3 floor served per file (median over runs), by operation, and its ms."""
    if not res.requests:
        return ""
    ops = sorted(
        {op for runs in res.requests.values() for c in runs for op in c}, key=lambda op: ("ms" in op, op)
    )
    rows = [
        [phase, *(fmt(statistics.median(c.get(op, 0.0) for c in runs)) for op in ops)]
        for phase, runs in res.requests.items()
    ]
    return md_table(["phase", *ops], rows)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def cell(res: Results, m: Metric, name: str) -> str:
    if res.is_failed(m.key, name):
        return "**FAILED**"
    v = res.summary(m.key, name)
    if v is None:
        return "–"
    if m.samples:
        return f"{fmt(v)} / {fmt(res.p90(m.key, name))}"
    return fmt(v)


def results_tables(res: Results, names: list[str], breakdown: bool = False) -> tuple[str, str]:
    others = [n for n in names if n != "s3cachefs"]
    header = ["metric", "unit", *names] + ([f"vs {o}" for o in others] if "s3cachefs" in names else [])
    rows = []
    for m in METRICS:
        if m.breakdown != breakdown:
            continue
        if not any(m.key in res.values and n in res.values[m.key] for n in names) and not any(
            (m.workload, n) in res.failed for n in names
        ):
            continue
        unit = f"{m.unit} p50 / p90" if m.samples else m.unit
        row = [m.label, unit] + [cell(res, m, n) for n in names]
        if "s3cachefs" in names:
            ours = res.summary(m.key, "s3cachefs")
            for o in others:
                r = speed_ratio(m, ours, res.summary(m.key, o))
                row.append(f"{r:.2f}x" if r is not None else "–")
        rows.append(row)
    main = md_table(header, rows)

    # Every run's value, for the spread.
    raw_rows = []
    for m in METRICS:
        if m.samples or m.breakdown != breakdown or m.key not in res.values:
            continue
        row = [m.label, m.unit]
        for n in names:
            vals = res.values[m.key].get(n)
            row.append(", ".join(fmt(v) for v in vals) if vals else "–")
        raw_rows.append(row)
    raw = md_table(["metric", "unit", *names], raw_rows)
    return main, raw


def cpu_table(res: Results, names: list[str]) -> str:
    rows = []
    for phase in [*PHASES, "large_cold_stream", "stat_pass3"]:
        per = res.cpu.get(phase)
        if not per:
            continue
        row = [phase]
        for n in names:
            parts = [per.get(n), per.get(f"{n}:client"), per.get(f"{n}:weed")]
            row.append(" / ".join(fmt(statistics.median(p)) if p else "–" for p in parts))
        rows.append(row)
    return md_table(["phase", *[f"{n}: daemon / client / weed" for n in names]], rows)


METHOD = """\
All systems talk to one private SeaweedFS (`weed mini`, tests/harness.py `S3Server`) on loopback, each
to its own bucket; the stat tree is one shared bucket. Only one system is measured at a time. A run is
phase-major: every system does the small writes, then every system the hot small reads, and so on, so
that the two figures of a ratio are taken close together in time on a busy machine (the mounts that are
not being measured stay mounted and idle; rclone has finished its uploads before the next system starts).
Each run rotates the order of the systems. The benchmark client is one Python process. s3cachefs runs
from a copy of `s3cachefs/` taken when the benchmark starts (the version line says whether it equals the
commit), so that changes made to the checkout during a run do not mix two versions in one report.

| system | how | durable when |
|---|---|---|
| s3cachefs | `python -m s3cachefs.cli mount BUCKET MNT --foreground --endpoint-url URL --region us-east-1 --cache-dir DIR --cache-size 20G` | close() returns |
| rclone | `rclone mount bench:BUCKET MNT --vfs-cache-mode full --cache-dir DIR` (S3 remote: provider SeaweedFS, path style; every other option at its default, so `--vfs-write-back 5s`) | S3 holds the object: polled with LIST every 50 ms, time taken when the poll that saw it started |
| s3fs | `s3fs BUCKET MNT -f -o url=URL -o use_path_request_style -o passwd_file=F -o use_cache=DIR` | close() returns (checked afterwards with LIST; a missing object would be a failure) |
| boto3 | one client, path style, `put_object`, `get_object(...)["Body"].read()`, `upload_fileobj`/`download_file` with the default TransferConfig (8 MiB parts, 10 threads), `head_object` | the call returns |
| local | a directory on the same disk as every cache and SeaweedFS's data; writes are fsynced before close() | fsync returns |

Workloads, per system and run:

- **small**: N files shaped like Synapse media (per item an original of 150-250 KiB at
  `local_content/AA/BB/REST` and 5 thumbnails of 5-100 KiB at `local_thumbnails/AA/BB/REST/W-H-image-jpeg-M`,
  fixed seed, new names every run), each written with `os.makedirs` + `open("wb")` + 64 KiB writes +
  `close()`, one after another. Rate = N / (time from the first makedirs until every object is in S3 with
  the right size and MD5). close() latency and the lag after the last close are reported separately.
  Then the same files are read back 3 times (hot), each with `open` + 16 KiB reads + `close`.
- **cold_small**: N other files (`remote_content/...`, `remote_thumbnail/...`) put with boto3, the
  mount restarted with an empty cache directory, every file stat'ed once (untimed: the names must be
  known, which is the stat workload's subject), the page cache dropped, then each file read once.
  boto3: `get_object` of the same objects after the same drop.
- **large**: one file written with 1 MiB writes, MB/s until durable; read back 3 times with 1 MiB reads
  (first re-read and the median of the repeats reported apart); then, after a restart with an empty
  cache, an untimed stat and a page-cache drop, read cold: MB/s for the whole file and the time to first
  byte (open() until the first 64 KiB read returns). boto3's cold figure is `download_file` (to a
  file on the same disk); one `get_object` stream is reported too, with its time to first byte.
- **concurrent**: a second large file, put with boto3 before the restart, read by 8 threads at once
  through the same cold mount (page cache dropped); MB/s = 8 x size / wall time.
- **stat**: M tiny objects at `local_content/AA/BB/REST` (one per leaf directory, as in Synapse), put
  with boto3; a fresh mount (for s3cachefs after its background listing is done); a first pass of
  `os.stat` over every path, the measured second pass, and a third pass after `echo 2 >
  /proc/sys/vm/drop_caches` (kernel dentries and inodes dropped, so every lookup reaches the daemon).
  boto3: `head_object` of every key.
- **pyfuse3 floor** (whenever s3cachefs is measured): right after the hot small reads and before the
  stat passes, `bench/pyfuse3_floor.py` (a pyfuse3 + trio filesystem whose handlers answer from memory)
  is mounted for a moment and measured with the same client code: 3 passes of hot reads of 100 KiB
  files whose names were stat'ed first, and one stat pass after dropping dentries over paths of the
  stat tree's shape. It is not a contender: it shows what any pyfuse3 + trio daemon can reach here.
- **pyfuse3 S3 floor** (whenever s3cachefs is measured): `bench/pyfuse3_s3_floor.py`, its own bucket,
  takes its turn right after s3cachefs in the small writes and the cold small reads, measured exactly
  as the systems are. It lists its bucket once at mount (lookups of known names make no request),
  keeps a file being written in memory and PUTs it once in close() (close() returns after the PUT), and
  GETs a whole object in open() for reading; s3cachefs's boto3 client and limiter, no Content-MD5, no
  check of what came back, no disk, no index. It counts the FUSE requests it serves, per operation.

Every read is compared byte for byte with what was written (reads land in a preallocated buffer, the
comparison happens outside the timing); every stat checks the size. A system that returns wrong bytes, loses
a write or misses a file is reported **FAILED** for that workload, never with a rate. Every phase has a
watchdog that kills a hung system. "Cold" means: the system's own cache emptied (cache directory wiped,
process restarted) and `sync; echo 3 > /proc/sys/vm/drop_caches`, which drops the page cache of the
whole machine (SeaweedFS's files included). Rates are medians over the runs; latencies are p50 / p90 over
every operation of every run. Ratios are "speed ratios": s3cachefs's rate / the other's rate, or the
other's latency / s3cachefs's latency, so above 1 always means s3cachefs is better.
"""

NOTES_START = "<!-- notes:start (kept when compare.py rewrites this file) -->"
NOTES_END = "<!-- notes:end -->"


def report(bench: Bench, started: float, load_before: str, load_after: str, cmdline: str) -> str:
    res = bench.res
    names = [s.name for s in bench.systems]
    main, raw = results_tables(res, names)
    steps, _ = results_tables(res, names, breakdown=True)
    targets = md_table(
        ["target", "s3cachefs", "reference", "ratio", "verdict", "context"], evaluate_targets(res, names)
    )
    floor = floor_table(res, names)
    mach = machine()
    mach["Disk"] = _fs_type(bench.workdir)
    mach["Load average"] = f"{load_before} before, {load_after} after"
    vers = versions(bench.systems)
    s = bench.sizes
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `bench/compare.py` on {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(started))} "
        f"in {(time.time() - started) / 60:.0f} min: `{cmdline}`.",
        "",
        f"Runs: {bench.args.runs}. Small files: {s.small_files} written, {s.cold_files} cold. Large file: "
        f"{s.large / MiB:.0f} MiB. Stat tree: {s.stat_files} files. Seed {bench.args.seed}."
        + (
            " Page cache NOT dropped (--no-drop-caches or not root): cold reads are warm in the kernel."
            if bench.page_cache.works is False or not bench.page_cache.enabled
            else ""
        )
        + (" **Profiled with py-spy: figures perturbed.**" if bench.profiler.exe else ""),
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in mach.items()],
        "- Other processes were running on this machine during the run (a shared 2-core development VM); "
        "the figures are noisy, compare ratios within one run rather than absolute numbers across runs.",
        "",
        "Versions:",
        "",
        *[f"- {k}: {v}" for k, v in vers.items()],
        "",
        "## Targets (computed from this run's medians)",
        "",
        targets,
        "",
        "## Results (medians; latencies p50 / p90)",
        "",
        main,
        "",
    ]
    if floor:
        lines += [
            "The floor of a Python FUSE daemon on this machine: `bench/pyfuse3_floor.py`, a pyfuse3 + trio "
            "filesystem whose handlers answer from memory and do nothing else, and `bench/pyfuse3_s3_floor.py`, "
            "the thinnest write-through S3 layer in pyfuse3 + trio + boto3 (one put_object per close(), one "
            "get_object per open(), names from one listing at mount), measured in the same run with the same "
            "client code:",
            "",
            floor,
            "",
        ]
    if res.requests:
        lines += [
            "FUSE requests per file that the S3 floor served, and its milliseconds per file inside boto3 "
            "calls and around them (trio.to_thread: the boto3 call and both thread hops); medians over "
            "runs; the cold reads follow a drop of the kernel's dentries, as for every system:",
            "",
            requests_table(res),
            "",
        ]
    if res.failed:
        lines += ["Failures:", ""]
        lines += [f"- {sysname} / {wl}: {why}" for (wl, sysname), why in sorted(res.failed.items())]
        lines.append("")
    notes = res.notes + [w for s in bench.systems for w in dict.fromkeys(s.warnings)]
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    lines += [
        "CPU seconds used during each timed phase (median over runs): by the system's daemon, by the "
        "benchmark client (this Python process: for boto3 that is boto3's own work) and by SeaweedFS:",
        "",
        cpu_table(res, names),
        "",
        "Where the time goes: the steps of one file operation, as the benchmark client sees them "
        "(ms, p50 / p90 over every file of every run):",
        "",
        steps,
        "",
        "Every run's value:",
        "",
        raw,
        "",
        "## Method",
        "",
        METHOD,
        "Run it: `bash bench/install_peers.sh && python -m bench.compare` (as root, with the project's "
        "virtualenv python). `--quick` for a smoke run, `--runs N`, `--only s3cachefs,boto3`, "
        "`--workloads small,large`, `--py-spy DIR` to profile the s3cachefs daemon (perturbs the figures).",
        "",
    ]
    return "\n".join(lines)


def write_markdown(path: Path, body: str) -> None:
    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_START in old and NOTES_END in old:
            notes = old[old.index(NOTES_START) : old.index(NOTES_END) + len(NOTES_END)]
    if not notes:
        notes = f"{NOTES_START}\n## Observations\n\n(none yet)\n{NOTES_END}"
    # Observations go right after the targets, before the long tables.
    marker = "## Results (medians"
    body = body.replace(marker, notes + "\n\n" + marker, 1)
    path.write_text(body)


def console_summary(bench: Bench) -> str:
    res = bench.res
    names = [s.name for s in bench.systems]
    main, _ = results_tables(res, names)
    targets = md_table(
        ["target", "s3cachefs", "reference", "ratio", "verdict", "context"], evaluate_targets(res, names)
    )
    fails = "\n".join(f"  FAILED {n} / {w}: {why}" for (w, n), why in sorted(res.failed.items()))
    return f"\n{main}\n\n{targets}\n" + (f"\n{fails}\n" if fails else "")


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=None, help="runs per system (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--only", default=",".join(SYSTEM_ORDER), help="systems, comma-separated")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="workloads, comma-separated")
    ap.add_argument("--small-files", type=int, help="small files written (default 300; quick 60)")
    ap.add_argument("--cold-files", type=int, help="small files read cold (default 300; quick 60)")
    ap.add_argument("--large-mib", type=int, help="large file size in MiB (default 256; quick 32)")
    ap.add_argument("--stat-files", type=int, help="files in the stat tree (default 10000; quick 1000)")
    ap.add_argument("--seed", type=int, default=20260521)
    ap.add_argument(
        "--workdir", help="where the server data, mounts and caches go (default: a temp dir in /tmp)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--output", default=None, help="Markdown report (default BENCHMARKS.md; quick: none)")
    ap.add_argument("--json", default=None, help="every sample as JSON (default: WORKDIR/../compare-*.json)")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not drop the kernel page cache")
    ap.add_argument(
        "--py-spy", metavar="DIR", help="profile the s3cachefs daemon in every phase (raw stacks)"
    )
    args = ap.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for s in args.only:
        if s not in ALL_SYSTEMS:
            ap.error(f"unknown system {s!r} (known: {', '.join(SYSTEM_ORDER)})")
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.output is None:
        args.output = "" if args.quick else str(REPO_ROOT / "BENCHMARKS.md")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    q = args.quick
    sizes = Sizes(
        small_files=args.small_files or (60 if q else 300),
        cold_files=args.cold_files or (60 if q else 300),
        large=(args.large_mib or (32 if q else 256)) * MiB,
        stat_files=args.stat_files or (1000 if q else 10000),
    )
    if os.geteuid() != 0 and not args.no_drop_caches:
        log("!! not root: the page cache cannot be dropped; cold reads will be warm in the kernel")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="s3cfs-compare-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cmdline = "python -m bench.compare " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    started = time.time()
    load_before = _read("/proc/loadavg").split()[:3]
    bench = Bench(args, sizes, workdir)
    try:
        bench.setup()
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        bench.teardown()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        return 130
    finally:
        bench.teardown()
    load_after = _read("/proc/loadavg").split()[:3]
    print(console_summary(bench))
    body = report(bench, started, " ".join(load_before), " ".join(load_after), cmdline)
    if args.output:
        write_markdown(Path(args.output), body)
        log(f"wrote {args.output}")
    json_path = Path(args.json) if args.json else workdir.parent / f"{workdir.name}.json"
    json_path.write_text(
        json.dumps(
            {
                "started": started,
                "cmdline": cmdline,
                "sizes": sizes.__dict__,
                "values": bench.res.values,
                "failed": {f"{s}/{w}": why for (w, s), why in bench.res.failed.items()},
                "cpu": bench.res.cpu,
                "s3_floor_requests_per_file": bench.res.requests,
                "machine": machine(),
                "versions": versions(bench.systems),
                "s3cachefs_uncommitted_diff": next(
                    (
                        getattr(s, "snapshot_diff", "")
                        for s in bench.systems
                        if isinstance(s, S3cachefsSystem)
                    ),
                    "",
                ),
            },
            indent=1,
        )
    )
    log(f"wrote {json_path}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
