"""How long the mount's event loop stalls while the background listing of a large bucket runs.

At every mount s3cachefs lists the whole bucket in the background (Namespace.full_listing: keys applied
200 per transaction with a trio checkpoint between batches, then the end of the listing in slices of
20,000 inode numbers). Synapse's reactor makes its stat()/open() calls through the mount, i.e. through
this one event loop, so any stretch of the listing that does not yield is a stall of the homeserver.

  1. Starts a private SeaweedFS on loopback (tests.harness.S3Server) and puts --objects small objects
     (100 bytes) into a fresh bucket in Synapse's layout: half `local_content/AA/BB/REST` (AA, BB two
     letters, REST 20), half `local_thumbnails/AA/BB/REST/W-H-TYPE-METHOD` (five thumbnails per media
     id), with boto3 in a pool of --threads threads. Bounded by --max-put-seconds: past it no more puts
     are started and the run goes on with what was put (said in the output).
  2. Mounts s3cachefs on it with an empty cache (tests.harness.Mount); the background listing starts at
     once. Right after the mount appears, creates through it a probe directory `listing-probe-RANDOM/` (made
     by mkdir, so its listing is complete) and a 100-byte file in it (cached, never waits on S3).
  3. Until the mount logs "listed N objects in Xs" (bounded by --max-listing-seconds), a probe every
     10 ms, timed as a whole:
       - lstat() of a name never used before in `listing-probe/`: a FUSE LOOKUP that reaches the daemon
         every time (a fresh name is in no kernel cache) and is answered from the index (ENOENT, the
         directory is complete), with no S3 request;
       - stat() of the probe file (answered by the kernel's attribute cache after the first: 300 s);
       - open(), read(), close() of the probe file: FUSE OPEN and FLUSH reach the daemon (the read is
         served from the kernel's page cache after the first, keep_cache).
     Each FUSE request waits for the event loop, so a probe's time is bounded below by any stall of it.
     Each probe is also timed through bench/pyfuse3_floor.py (a pyfuse3 filesystem answering from
     memory, mounted beside it unless --no-floor) right after, and the VM's steal time (/proc/stat)
     during it is recorded: what the machine alone costs the same FUSE calls at that moment.
     Meanwhile the daemon's VmRSS is read from /proc/PID/status every second.
  4. The same probe for --baseline-seconds after the listing ended (the baseline).

The probe latencies are raw (no correction for coordinated omission: a probe that waits 500 ms hides
the ~50 probes that would have been made meanwhile); the stall figure is the max.

Output: a markdown report, printed and written to --output. Exit status 0 means the benchmark ran,
whatever the figures; a broken run ends with a traceback and non-zero. Everything started here (the
mount, the server, the run's directory unless --keep) is removed in finally blocks, on Ctrl-C too.

    python -m bench.listing_stall [--objects 1000000] [--threads 48] [--workdir DIR] [--keep]
                                  [--output bench/listing-stall-results.md]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import random
import re
import string
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import botocore.config

from bench.pyfuse3_floor import DATA as FLOOR_DATA
from bench.report import append_report, header, interrupt_on_signals, log, steal_seconds
from bench.workdir import run_dir
from tests.harness import TEST_REGION, HarnessError, Mount, S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

OBJECT_BYTES = 100
PROBE_PERIOD = 0.010
SLOW_PROBE = 0.050
FLOOR_SLOW = 0.020
STOLEN = 0.010  # steal during a probe counted as "stolen" (/proc/stat's resolution)
RSS_PERIOD = 1.0
THUMBNAILS = ("32-32-image-png-crop", "96-96-image-png-crop", "320-240-image-png-scale",
              "640-480-image-png-scale", "800-600-image-png-scale")  # fmt: skip
LISTED_RE = re.compile(r"listed (\d+) objects in ([\d.]+)s")
LETTERS = string.ascii_letters


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))]


# ---------------------------------------------------------------------------------------------------
# Putting the objects
# ---------------------------------------------------------------------------------------------------


def synapse_keys(n: int, seed: int = 1) -> Iterator[str]:
    """n keys: half local_content/AA/BB/REST, half local_thumbnails/AA/BB/REST/<thumbnail>, five
    thumbnails per media id (of other media ids than the local_content ones)."""
    rng = random.Random(seed)

    def media_id() -> str:
        return "".join(rng.choice(LETTERS) for _ in range(24))

    contents = n // 2
    for _ in range(contents):
        m = media_id()
        yield f"local_content/{m[:2]}/{m[2:4]}/{m[4:]}"
    left = n - contents
    while left > 0:
        m = media_id()
        for thumb in THUMBNAILS[: min(left, len(THUMBNAILS))]:
            yield f"local_thumbnails/{m[:2]}/{m[2:4]}/{m[4:]}/{thumb}"
        left -= min(left, len(THUMBNAILS))


@dataclass
class PutResult:
    wanted: int
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    stopped_early: bool = False

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def put_objects(s3: S3Server, bucket: str, n: int, threads: int, max_seconds: float) -> PutResult:
    """Put n objects with `threads` boto3 clients (one per thread); at most 4 * threads in flight, and
    none started past max_seconds."""
    local = threading.local()
    config = botocore.config.Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 5},
        s3={"addressing_style": "path"},
        max_pool_connections=2,
    )
    body = bytes(random.Random(2).getrandbits(8) for _ in range(OBJECT_BYTES))

    def client() -> S3Client:
        c: S3Client | None = getattr(local, "client", None)
        if c is None:
            c = boto3.session.Session().client(
                "s3",
                endpoint_url=s3.endpoint_url,
                aws_access_key_id=s3.access_key,
                aws_secret_access_key=s3.secret_key,
                region_name=TEST_REGION,
                config=config,
            )
            local.client = c
        return c

    def put(key: str) -> None:
        client().put_object(Bucket=bucket, Key=key, Body=body, ContentType="image/png")

    res = PutResult(wanted=n)
    started = time.monotonic()
    deadline = started + max_seconds
    next_report = started + 15
    keys = synapse_keys(n)
    window = 4 * threads
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        pending: set[concurrent.futures.Future[None]] = set()
        try:
            exhausted = False
            while pending or not exhausted:
                while not exhausted and len(pending) < window:
                    if time.monotonic() >= deadline:
                        res.stopped_early = True
                        exhausted = True
                        break
                    key = next(keys, None)
                    if key is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(put, key))
                finished, pending = concurrent.futures.wait(
                    pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for f in finished:
                    if f.exception() is None:
                        res.done += 1
                    else:
                        res.failed += 1
                        if res.failed <= 3:
                            log(f"  put failed: {f.exception()!r}")
                if res.failed > max(100, n // 100):
                    raise HarnessError(f"{res.failed} puts failed; giving up")
                now = time.monotonic()
                if now >= next_report:
                    next_report = now + 15
                    log(f"  put {res.done}/{n} ({res.done / (now - started):.0f}/s)")
        finally:
            for f in pending:
                f.cancel()
    res.seconds = time.monotonic() - started
    return res


# ---------------------------------------------------------------------------------------------------
# Probing the mount
# ---------------------------------------------------------------------------------------------------


@dataclass
class Probes:
    times: list[float] = field(default_factory=list)  # seconds each
    control: list[float] = field(default_factory=list)  # the same machine's stat() of a local file
    steal: list[float] = field(default_factory=list)  # the VM's steal time during each probe
    floor: list[float] = field(default_factory=list)  # the same probe through the no-op FUSE floor
    # (offset, seconds, slowest part, steal, the floor probe's seconds right after)
    slow: list[tuple[float, float, str, float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    steal_total: float = 0.0  # over the whole run, both CPUs
    wall: float = 0.0


class Prober:
    """The probe of the module docstring; one instance per mount, names never reused."""

    def __init__(
        self, probe_dir: Path, probe_file: Path, expect: bytes, control: Path, floor: Path | None
    ) -> None:
        self.control = control
        self.floor = floor
        self.dir = probe_dir
        self.file = probe_file
        self.expect = expect
        self.counter = 0

    def local(self) -> float:
        """The control: stat() of a file outside the mount, i.e. how long this machine takes to run a
        system call for us (CPU contention, scheduling), with no FUSE daemon involved."""
        t = time.perf_counter()
        os.stat(self.control)
        return time.perf_counter() - t

    def once(self) -> tuple[float, str]:
        """One probe; returns its wall time and which part of it took longest."""
        self.counter += 1
        t0 = time.perf_counter()
        with contextlib.suppress(FileNotFoundError):
            os.lstat(self.dir / f"missing-{self.counter}")
            raise HarnessError(f"missing-{self.counter} exists in the probe directory")
        t1 = time.perf_counter()
        os.stat(self.file)
        t2 = time.perf_counter()
        fd = os.open(self.file, os.O_RDONLY)
        t3 = time.perf_counter()
        try:
            data = os.read(fd, 4096)
        finally:
            t4 = time.perf_counter()
            os.close(fd)
        t5 = time.perf_counter()
        if data != self.expect:
            raise HarnessError(f"probe file read {len(data)} bytes, not the {len(self.expect)} written")
        parts = {"lookup": t1 - t0, "stat": t2 - t1, "open": t3 - t2, "read": t4 - t3, "close": t5 - t4}
        return t5 - t0, max(parts, key=lambda k: parts[k])

    def floor_once(self) -> float:
        """The same probe through bench/pyfuse3_floor.py (every name exists there, and every file holds
        its DATA): the FUSE round trips and wake-ups of the probe with no listing behind them."""
        assert self.floor is not None
        t0 = time.perf_counter()
        os.lstat(self.floor / f"p{self.counter}")
        os.stat(self.floor / "known")
        fd = os.open(self.floor / "known", os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        took = time.perf_counter() - t0
        if data != FLOOR_DATA[:4096]:
            raise HarnessError("the floor filesystem returned other bytes than its DATA")
        return took

    def run(self, until: threading.Event | None, seconds: float, origin: float) -> Probes:
        """Probe every PROBE_PERIOD until `until` is set, for at most `seconds`."""
        out = Probes()
        deadline = time.monotonic() + seconds
        next_at = began = time.monotonic()
        stolen = steal_seconds()
        while (until is None or not until.is_set()) and time.monotonic() < deadline:
            out.control.append(self.local())
            start = time.monotonic()
            steal0 = steal_seconds()
            try:
                took, part = self.once()
            except OSError as e:
                out.errors.append(f"{start - origin:.1f}s: {e!r}")
                if len(out.errors) > 100:
                    raise HarnessError(f"probe failing: {out.errors[-3:]}") from e
                took, part = time.monotonic() - start, "error"
            steal = steal_seconds() - steal0
            floor = self.floor_once() if self.floor is not None else float("nan")
            out.times.append(took)
            out.steal.append(steal)
            out.floor.append(floor)
            if took > SLOW_PROBE:
                out.slow.append((start - origin, took, part, steal, floor))
            next_at = max(next_at + PROBE_PERIOD, time.monotonic())
            time.sleep(max(0.0, next_at - time.monotonic()))
        out.steal_total = steal_seconds() - stolen
        out.wall = time.monotonic() - began
        return out


class NoopMount(Mount):
    """bench/pyfuse3_floor.py on its own mount point instead of s3cachefs (tests.harness.Mount runs it
    and unmounts it)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.pyfuse3_floor", str(self.path)]


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Watcher(threading.Thread):
    """Samples the daemon's VmRSS every second and watches the mount log for the end of the listing."""

    def __init__(self, mount: Mount, log_offset: int, max_seconds: float) -> None:
        super().__init__(daemon=True)
        assert mount.proc is not None
        self.pid = mount.proc.pid
        self.log_path = mount.log_path
        self.offset = log_offset
        self.max_seconds = max_seconds
        self.listed = threading.Event()  # the listing's log line was seen
        self.stop = threading.Event()
        self.listed_line = ""
        self.listed_at = 0.0  # time.monotonic() when the line was seen
        self.rss: list[tuple[float, int]] = []  # (monotonic, KiB)
        self.daemon_gone = False
        self._buf = ""

    def _scan_log(self) -> None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        self.offset += len(chunk)
        self._buf += chunk.decode(errors="replace")
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if not self.listed.is_set() and LISTED_RE.search(line):
                self.listed_line = line.strip()
                self.listed_at = time.monotonic()
                self.listed.set()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            kib = rss_kib(self.pid)
            if kib is None:
                self.daemon_gone = True
                self.listed.set()  # nothing more to wait for
                return
            self.rss.append((time.monotonic(), kib))
            for _ in range(5):  # the log every 200 ms, the RSS every second
                self._scan_log()
                if self.stop.wait(RSS_PERIOD / 5):
                    return
        self.listed.set()  # bounded: the caller sees listed_line empty


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def renice_threads(pid: int, nice: int) -> tuple[int, int]:
    """Set the nice value of every thread of process `pid` (nice is per thread on Linux; threads made
    later inherit it from the thread that makes them). Returns (threads seen, threads that already had
    it)."""
    seen = already = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            seen += 1
            if os.getpriority(os.PRIO_PROCESS, int(tid)) == nice:
                already += 1
            else:
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    return seen, already


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def probe_row(name: str, p: Probes, seconds: float) -> str:
    t = p.times
    c = p.control
    return (
        f"| {name} | {seconds:.1f} | {len(t)} | {ms(pct(t, 0.5))} | {ms(pct(t, 0.99))} | "
        f"{ms(max(t, default=float('nan')))} | {len(p.slow)} | {len(p.errors)} | "
        f"{ms(pct(c, 0.99))} / {ms(max(c, default=float('nan')))} / {sum(x > SLOW_PROBE for x in c)} |"
    )


def steal_lines(p: Probes) -> list[str]:
    """How the slow probes line up with the VM's steal time (10 ms resolution)."""
    if not p.times:
        return []
    cpus = os.cpu_count() or 1
    n_st = sum(st >= STOLEN for st in p.steal)
    n_no = len(p.times) - n_st
    slow_st = sum(st >= STOLEN for _, _, _, st, _ in p.slow)
    slow_no = len(p.slow) - slow_st

    def share(k: int, n: int) -> str:
        return f"{k} of {n} ({100 * k / n:.1f} %)" if n else f"{k} of 0"

    return [
        f"Steal time (/proc/stat: the hypervisor running something else on this VM's CPUs) during "
        f"the listing: {p.steal_total:.1f} s, {100 * p.steal_total / (p.wall * cpus):.1f} % of the "
        f"{cpus} CPUs' time. Probes during which 10 ms or more was stolen: {share(n_st, len(p.times))}; "
        f"over 50 ms among them: {share(slow_st, n_st)}; among the others: {share(slow_no, n_no)}.",
        "",
    ]


def floor_lines(p: Probes) -> list[str]:
    """The no-op FUSE floor probed right after each probe: what the machine costs the same FUSE calls
    with no daemon work behind them."""
    f = [x for x in p.floor if x == x]
    if not f:
        return []
    both = sum(fl > FLOOR_SLOW for *_, fl in p.slow)
    return [
        f"The same probe through bench/pyfuse3_floor.py (a pyfuse3 filesystem answering from memory, "
        f"mounted beside it), right after each probe: p50 {ms(pct(f, 0.5))}, p99 {ms(pct(f, 0.99))}, "
        f"max {ms(max(f))} ms, {sum(x > SLOW_PROBE for x in f)} over 50 ms; of the {len(p.slow)} "
        f"probes over 50 ms, {both} had a floor probe over {FLOOR_SLOW * 1000:.0f} ms right after.",
        "",
    ]


def report(
    args: argparse.Namespace,
    head: list[str],
    put: PutResult,
    listed_line: str,
    listing_seconds: float,
    during: Probes,
    after: Probes,
    after_seconds: float,
    rss: list[tuple[float, int]],
    notes: list[str],
) -> str:
    lines = [*head, ""]
    lines.append(
        f"Objects: {put.done} of {put.wanted} put ({OBJECT_BYTES} B each) in {put.seconds:.0f}s, "
        f"{put.rate:.0f} objects/s with {args.threads} threads"
        + (f", {put.failed} failed" if put.failed else "")
        + (" (stopped by --max-put-seconds)" if put.stopped_early else "")
        + "."
    )
    lines.append(f"Daemon's log: `{listed_line or '(no listing line seen)'}`")
    lines.append(
        f"Listing, from mount to that line as seen by the bench: {listing_seconds:.1f}s; "
        f"daemon max VmRSS {max((k for _, k in rss), default=0) / 1024:.0f} MiB "
        f"({len(rss)} samples, last {rss[-1][1] / 1024 if rss else 0:.0f} MiB)."
    )
    lines += [
        "",
        "| probes | seconds | count | p50 ms | p99 ms | max ms | over 50 ms | errors "
        "| control p99 / max ms / over 50 ms |",
        "|---|---|---|---|---|---|---|---|---|",
        probe_row("during the listing", during, listing_seconds),
        probe_row("after it (baseline)", after, after_seconds),
        "",
        "Control: a stat() of a local file (not on the mount) just before each probe: what CPU "
        "contention and scheduling on this machine cost any system call, with no FUSE daemon involved.",
        "",
    ]
    if during.slow:
        worst = sorted(during.slow, key=lambda s: -s[1])[:15]
        lines.append(
            f"Probes over {SLOW_PROBE * 1000:.0f} ms during the listing ({len(during.slow)}; the worst "
            f"{len(worst)}: seconds after the mount appeared, ms, slowest part of the probe):"
        )
        lines.append(
            ", ".join(
                f"{o:.1f}s {t * 1000:.0f} ms ({part}{f', steal {st * 1000:.0f} ms' if st else ''}"
                f"{f', floor {fl * 1000:.1f} ms' if fl == fl else ''})"
                for o, t, part, st, fl in sorted(worst)
            )
        )
        lines.append("")
    lines += steal_lines(during) + floor_lines(during)
    for name, p in (("during", during), ("after", after)):
        if p.errors:
            lines.append(f"Probe errors {name} the listing: {'; '.join(p.errors[:5])}")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--objects", type=int, default=1_000_000, help="objects in the bucket (default 1,000,000)"
    )
    ap.add_argument("--threads", type=int, default=48, help="threads putting them (default 48)")
    ap.add_argument(
        "--max-put-seconds", type=float, default=3600, help="stop putting after this (default 3600)"
    )
    ap.add_argument(
        "--max-listing-seconds",
        type=float,
        default=3600,
        help="give up on the listing after this (default 3600)",
    )
    ap.add_argument(
        "--baseline-seconds", type=float, default=5.0, help="probing after the listing (default 5)"
    )
    ap.add_argument("--workdir", default=None, help="parent of the run's directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (server data, logs, cache)")
    ap.add_argument(
        "--data",
        default=None,
        help="a directory kept across runs for the server's data: the first run puts the objects there "
        "(and records them in put.json), later runs with the same --objects reuse them and only measure",
    )
    ap.add_argument(
        "--server-nice",
        type=int,
        default=None,
        help="nice value for every thread of the SeaweedFS server (e.g. 19): S3 runs on another machine "
        "in production, here it shares the two cores with the daemon and the probe",
    )
    ap.add_argument(
        "--no-floor",
        action="store_true",
        help="do not probe bench/pyfuse3_floor.py beside the mount (by default each probe is made through it "
        "too, right after: the FUSE round trips with no daemon work behind them)",
    )
    ap.add_argument("--output", default="bench/listing-stall-results.md", help="markdown file ('' for none)")
    args = ap.parse_args(argv)
    if args.server_nice is not None and not 0 <= args.server_nice <= 19:
        ap.error("--server-nice must be 0..19")
    if not 1 <= args.objects <= 10_000_000:
        ap.error("--objects must be 1..10,000,000")
    if not 1 <= args.threads <= 256:
        ap.error("--threads must be 1..256")
    for name in ("max_put_seconds", "max_listing_seconds", "baseline_seconds"):
        if not 0 < getattr(args, name) <= 86400:
            ap.error(f"--{name.replace('_', '-')} must be in (0, 86400]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_signals()
    head = header(
        f"bench.listing_stall, {args.objects:,} objects",
        "A noisy 2-core VM shared with other test runs: the SeaweedFS server, the daemon and this probe "
        "share the two cores.",
    )
    print("\n".join(head), flush=True)
    notes: list[str] = []
    with run_dir("s3cfs-liststall-", args.workdir, args.keep, log) as base, contextlib.ExitStack() as stack:
        data = Path(args.data) if args.data else base / "s3"
        data.mkdir(parents=True, exist_ok=True)
        s3 = S3Server(data)
        stack.callback(s3.stop)  # registered before start: a half-started server is stopped too
        s3.start()
        if args.server_nice is not None:
            assert s3.proc is not None
            seen, _ = renice_threads(s3.proc.pid, args.server_nice)
            log(f"SeaweedFS: its {seen} threads set to nice {args.server_nice}")
        record = data / "put.json"
        earlier = json.loads(record.read_text()) if record.exists() else None
        if earlier is not None and earlier["wanted"] == args.objects:
            bucket = earlier["bucket"]
            put = PutResult(**{k: v for k, v in earlier.items() if k != "bucket"})
            log(f"SeaweedFS at {s3.endpoint_url}, reusing bucket {bucket} ({put.done} objects put earlier)")
            notes.append(f"objects put by an earlier run into {data} (its figures given above)")
        else:
            bucket = s3.new_bucket()
            log(f"SeaweedFS at {s3.endpoint_url}, bucket {bucket}; putting {args.objects} objects")
            put = put_objects(s3, bucket, args.objects, args.threads, args.max_put_seconds)
            log(f"put {put.done} objects in {put.seconds:.0f}s ({put.rate:.0f}/s), {put.failed} failed")
            if args.data:
                record.write_text(json.dumps({"bucket": bucket, **dataclasses.asdict(put)}))

        floor: NoopMount | None = None
        if not args.no_floor:
            floor = NoopMount(s3, bucket, base / "floor-mnt", base / "floor-cache", base / "floor.log")
            stack.callback(floor.cleanup)
            floor.start()
        mount = Mount(s3, bucket, base / "mnt", base / "cache", base / "mount.log")
        stack.callback(lambda: notes.extend(mount.cleanup()))
        (base / "cache").mkdir()
        mount.start()
        mounted_at = time.monotonic()
        assert mount.proc is not None
        watcher = Watcher(mount, 0, args.max_listing_seconds + args.baseline_seconds + 60)
        watcher.start()
        stack.callback(watcher.join, 10)
        stack.callback(watcher.stop.set)

        probe_dir = mount.path / f"listing-probe-{os.urandom(4).hex()}"  # new at every run: --data
        probe_file = probe_dir / "known.png"
        expect = os.urandom(OBJECT_BYTES)
        t = time.monotonic()
        probe_dir.mkdir()
        probe_file.write_bytes(expect)
        control = base / "control"
        control.write_bytes(expect)
        prober = Prober(probe_dir, probe_file, expect, control, floor.path if floor else None)
        prober.once()
        log(f"mounted (pid {mount.proc.pid}); probe file made in {time.monotonic() - t:.2f}s; probing")

        during = prober.run(watcher.listed, args.max_listing_seconds, mounted_at)
        if not watcher.listed_line:
            if watcher.daemon_gone:
                raise HarnessError(f"the daemon exited during the listing\n{mount.log_tail()}")
            raise HarnessError(f"no listing line within {args.max_listing_seconds:.0f}s\n{mount.log_tail()}")
        listing_seconds = watcher.listed_at - mounted_at
        log(f"{watcher.listed_line}; {len(during.times)} probes, max {ms(max(during.times))} ms")

        t = time.monotonic()
        after = prober.run(None, args.baseline_seconds, mounted_at)
        after_seconds = time.monotonic() - t
        watcher.stop.set()
        watcher.join(10)
        if args.server_nice is not None:
            assert s3.proc is not None
            seen, already = renice_threads(s3.proc.pid, args.server_nice)  # made since: inherited?
            notes.append(
                f"SeaweedFS run at nice {args.server_nice} (--server-nice): after the listing {already} "
                f"of its {seen} threads had that value"
            )
        m = LISTED_RE.search(watcher.listed_line)
        if m and int(m.group(1)) < put.done:
            notes.append(f"the listing saw {m.group(1)} objects, fewer than the {put.done} put")
        if mount.running:
            mount.unmount(check=False)
        text = report(
            args, head, put, watcher.listed_line, listing_seconds, during, after, after_seconds,
            watcher.rss, notes,
        )  # fmt: skip
    print("\n" + text, flush=True)
    append_report(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
