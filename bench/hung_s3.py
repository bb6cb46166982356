"""What a hung S3 costs the callers of a mount with default options (issue 12's figures).

s3cachefs gives each S3 operation a deadline (s3_deadline, 10 s by default, plus 1 s per MiB it moves:
s3cachefs/s3/breaker.py) and opens a circuit breaker when one misses it: later calls fail at once until
S3 answers again (the mount's probe asks every second). tests/test_breaker.py checks this with a short
--s3-deadline and loose bounds; this measures it with the DEFAULT options against the issue's targets:
the first synchronous close() fails within 15 s for a small file, the next within 2 s; a cached file not
read since the mount reads in under 1 s while 40 cold reads are pending.

Starts a private SeaweedFS on loopback (tests.harness.S3Server); "hung" is SIGSTOP of it
(S3Server.pause): it keeps its sockets, so connections succeed and nothing is answered. Each of
--rounds rounds uses a fresh bucket, cache directory and mount (tests.harness.Mount, no extra options):

  1. --cold-reads objects (20 KB) are put into the bucket with boto3. The mount starts; the bench waits
     for its background listing to end (so no S3 call of its own is pending) and makes the directories
     local_content/AA/BB/ of the files below through the mount. S3 is paused, then three times: a new
     2 KB original local_content/AA/BB/REST is created, written (timed apart: "prep") and closed; the
     close() is timed on its own (the mount uploads an original synchronously at close) and its errno
     kept. S3 is resumed; a new file is written and closed every 0.25 s until a close() succeeds (no
     remount): the time from the resume to the end of that close() is the recovery. Its object is
     checked in S3 (HEAD, length).
  2. A 3 MiB file is written through the mount (uploaded at close, kept in the cache), the mount is
     unmounted and started again on the same cache: the cached copy is then unverified, so its first
     read hashes it. After the listing, S3 is paused, one thread per cold object reads it through the
     mount, 1 s later (while they are all still blocked) the cached file is read whole and timed and
     compared byte for byte; then S3 stays paused until every cold read has ended (bounded), whose
     durations and errnos are kept, and is resumed.

Every blocking system call runs in a thread joined with a timeout (--max-wait): a call still blocked
then is reported as such, and S3 is resumed before anything is stopped. The report (markdown, printed
and appended to --output) gives the medians and maxima over the rounds against the targets, the
per-round figures and the daemon's log lines about the circuit of the first round. Exit status 0
whatever the figures; a broken run ends with a traceback. Everything started here (mounts, server, the
run's directory unless --keep) is stopped or removed in finally blocks, on Ctrl-C too.

    python -m bench.hung_s3 [--rounds 3] [--cold-reads 40] [--max-wait 120] [--workdir DIR] [--keep]
                            [--output bench/hung-s3-results.md]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import append_report, header, interrupt_on_signals, log
from bench.workdir import run_dir
from tests.harness import HarnessError, Mount, S3Server, circuit_closed, wait_until

SMALL_BYTES = 2000
CACHED_BYTES = 3 * 1024 * 1024
COLD_BYTES = 20_000
RECOVERY_POLL = 0.25
# Let the cold reads reach the daemon and take its S3 threads before the cached read (as the test).
COLD_HEAD_START = 1.0
DEFAULT_DEADLINE = 10.0  # s3cachefs.config.S3Options.deadline
TARGET_FIRST = 15.0
TARGET_NEXT = 2.0
TARGET_CACHED = 1.0
CIRCUIT_WORDS = ("circuit", "s3_deadline", "S3 unreachable", "S3 answers again")


# ---------------------------------------------------------------------------------------------------
# Bounded calls
# ---------------------------------------------------------------------------------------------------


@dataclass
class Timed:
    """One system call made in a thread: how long it took and the errno it failed with (None: it
    succeeded); `done` False means it was still blocked when the bench stopped waiting."""

    seconds: float = float("nan")
    errno: int | None = None
    error: str = ""
    done: bool = False


def timed_in_thread(call: Callable[[], object], name: str) -> tuple[threading.Thread, Timed]:
    out = Timed()

    def run() -> None:
        t0 = time.monotonic()
        try:
            call()
        except OSError as e:
            out.errno = e.errno
            out.error = repr(e)
        except Exception as e:  # reported, not raised: the thread has no caller
            out.errno = -1
            out.error = repr(e)
        out.seconds = time.monotonic() - t0
        out.done = True

    t = threading.Thread(target=run, name=name, daemon=True)  # a call blocked for good must not hold exit
    t.start()
    return t, out


def bounded(call: Callable[[], object], name: str, max_wait: float) -> Timed:
    t, out = timed_in_thread(call, name)
    t.join(max_wait)
    if not out.done:
        out.seconds = max_wait
    return out


def errname(e: int | None) -> str:
    if e is None:
        return "ok"
    if e < 0:
        return "not OSError"
    return errno.errorcode.get(e, str(e))


# ---------------------------------------------------------------------------------------------------
# One round
# ---------------------------------------------------------------------------------------------------


@dataclass
class Round:
    closes: list[Timed] = field(default_factory=list)  # the three close()s while S3 is hung
    prep: list[Timed] = field(default_factory=list)  # their create + write, timed apart
    recovery: float = float("nan")  # resume -> end of the first close() that succeeded
    recovery_tries: int = 0
    recovery_errnos: list[str] = field(default_factory=list)
    cached: Timed = field(default_factory=Timed)
    cold: list[Timed] = field(default_factory=list)
    pending_at_cached: int = 0  # cold reads still blocked when the cached read ended
    log_lines: list[str] = field(default_factory=list)


class Closer:
    """Creates, writes and closes new small originals through the mount, the close() timed apart."""

    def __init__(self, root: Path, round_no: int) -> None:
        self.root = root
        self.round_no = round_no
        self.count = 0

    def path(self, i: int) -> Path:
        return self.root / f"local_content/h{self.round_no}/c{i % 10}/hungbench{i:05d}abcdefghijklmnop"

    def make_dirs(self) -> None:
        for i in range(10):
            self.path(i).parent.mkdir(parents=True, exist_ok=True)

    def one(self, max_wait: float) -> tuple[Timed, Timed]:
        """(create + write, close) of the next new file."""
        path = self.path(self.count)
        self.count += 1
        fds: list[int] = []

        def prep() -> None:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
            fds.append(fd)
            os.write(fd, os.urandom(SMALL_BYTES))

        p = bounded(prep, "prep", max_wait)
        if not fds:
            return p, Timed(errno=-1, error="not opened", done=True)
        return p, bounded(lambda: os.close(fds[0]), "close", max_wait)


def new_log_lines(mount: Mount, offset: int) -> tuple[list[str], int]:
    text = mount.log_text()
    lines = [ln.strip() for ln in text[offset:].splitlines() if any(w in ln for w in CIRCUIT_WORDS)]
    return lines, len(text)


def wait_listed(mount: Mount, timeout: float) -> None:
    """The background listing of the last start is over (or the daemon is gone: an error)."""
    if not wait_until(lambda: "listed " in mount.log_text().rsplit("start:", 1)[-1], timeout, 0.1):
        raise HarnessError(f"no listing line within {timeout:.0f}s\n{mount.log_tail()}")


def hung_round(server: S3Server, base: Path, n: int, args: argparse.Namespace, notes: list[str]) -> Round:
    r = Round()
    client = server.client()
    bucket = server.new_bucket()
    cold = {
        f"remote_content/example.org/ab/cd/cold{i:03d}xyz": os.urandom(COLD_BYTES)
        for i in range(args.cold_reads)
    }
    for key, body in cold.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    mount = Mount(server, bucket, base / f"mnt{n}", base / f"cache{n}", base / f"mount{n}.log")
    (base / f"cache{n}").mkdir()
    try:
        mount.start()
        wait_listed(mount, args.max_wait)
        closer = Closer(mount.path, n)
        closer.make_dirs()
        _, offset = new_log_lines(mount, 0)

        # 1. close() while S3 is hung, then after it is back.
        server.pause()
        try:
            for _ in range(3):
                p, c = closer.one(args.max_wait)
                r.prep.append(p)
                r.closes.append(c)
                log(f"  round {n}: prep {p.seconds:.2f}s, close() {c.seconds:.2f}s {errname(c.errno)}")
        finally:
            server.resume()
        resumed = time.monotonic()
        until = resumed + args.max_wait
        while time.monotonic() < until:
            r.recovery_tries += 1
            p, c = closer.one(args.max_wait)
            if c.done and c.errno is None:
                r.recovery = time.monotonic() - resumed
                break
            r.recovery_errnos.append(errname(c.errno) if c.done else "still blocked")
            time.sleep(RECOVERY_POLL)
        log(f"  round {n}: a close() succeeded {r.recovery:.2f}s after the resume ({r.recovery_tries} tries)")
        if r.recovery == r.recovery:  # not NaN
            key = str(closer.path(closer.count - 1).relative_to(mount.path))
            size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
            if size != SMALL_BYTES:
                raise HarnessError(f"{key}: {size} bytes in S3 after a successful close(), not {SMALL_BYTES}")

        # 2. a cached, unverified file read while the cold reads wait on a hung S3.
        cached = mount.path / f"local_content/h{n}/cached/hungbenchcached3mib"
        data = os.urandom(CACHED_BYTES)
        cached.parent.mkdir(parents=True)
        cached.write_bytes(data)
        mount.unmount()
        mount.start()
        wait_listed(mount, args.max_wait)
        if not wait_until(lambda: circuit_closed(mount), args.max_wait, 0.1):
            raise HarnessError(f"circuit still open after the remount\n{mount.log_tail()}")
        got: list[bytes] = []
        server.pause()
        threads: list[tuple[threading.Thread, Timed]] = []
        try:
            threads = [
                timed_in_thread(functools.partial(Path.read_bytes, mount.path / k), f"cold{i}")
                for i, k in enumerate(cold)
            ]
            time.sleep(COLD_HEAD_START)
            early = sum(o.done for _, o in threads)
            if early:
                notes.append(f"round {n}: {early} cold reads had ended before the cached read started")
            r.cached = bounded(lambda: got.append(cached.read_bytes()), "cached", args.max_wait)
            r.pending_at_cached = sum(not o.done for _, o in threads)
            log(
                f"  round {n}: cached read {r.cached.seconds:.3f}s {errname(r.cached.errno)}, "
                f"{r.pending_at_cached} cold reads pending"
            )
            until = time.monotonic() + args.max_wait
            for t, _ in threads:
                t.join(max(0.0, until - time.monotonic()))
        finally:
            server.resume()
        for _, o in threads:
            if not o.done:
                o.seconds = args.max_wait
            r.cold.append(o)
        if r.cached.done and r.cached.errno is None and got != [data]:
            raise HarnessError(f"round {n}: the cached file read back wrong bytes")
        # Done with the hung S3: the abandoned threads get their answers, the circuit closes.
        wait_until(lambda: circuit_closed(mount), 30, 0.1)
        r.log_lines, _ = new_log_lines(mount, offset)
        mount.unmount(check=False)
        for t, _ in threads:
            t.join(10)
    finally:
        if server.paused:
            server.resume()
        notes.extend(mount.cleanup())
    return r


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def fmt(x: float, unit: str = "s") -> str:
    return "—" if x != x else f"{x:.3f} {unit}" if x < 1 else f"{x:.2f} {unit}"


def errnos(ts: Sequence[Timed]) -> str:
    counts: dict[str, int] = {}
    for t in ts:
        name = errname(t.errno) if t.done else "still blocked"
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items())


def row(name: str, target: float | None, values: list[float], ts: Sequence[Timed]) -> str:
    finite = [v for v in values if v == v]
    med = statistics.median(finite) if finite else float("nan")
    top = max(finite) if finite else float("nan")
    if target is None:
        verdict = ""
    elif len(finite) < len(values) or any(not t.done for t in ts):
        verdict = "**not met** (no figure)"
    else:
        verdict = "met" if top <= target else f"**not met** (+{top - target:.2f} s)"
    per_round = ", ".join(fmt(v) for v in values)
    tgt = f"≤ {target:g} s" if target is not None else "—"
    return f"| {name} | {tgt} | {fmt(med)} | {fmt(top)} | {per_round} | {errnos(ts)} | {verdict} |"


def abridged(log_lines: list[str]) -> list[str]:
    """Every line of the breaker; of the others (one or two per failed call), the first of each
    logger, then how many more there were."""
    out: list[str] = []
    seen: set[str] = set()
    skipped = 0
    for ln in log_lines:
        words = ln.split()
        logger = words[3] if len(words) > 3 else ""
        if "breaker" in logger or logger not in seen:
            seen.add(logger)
            out.append(ln[:300])
        else:
            skipped += 1
            if not out[-1].startswith("..."):
                out.append("...")
    return [*out, f"({skipped} more lines of the same kinds left out)"] if skipped else out


def report(args: argparse.Namespace, head: list[str], rounds: list[Round], notes: list[str]) -> str:
    first = [r.closes[0] for r in rounds]
    second = [r.closes[1] for r in rounds]
    third = [r.closes[2] for r in rounds]
    cached = [r.cached for r in rounds]
    cold_max = [max((c.seconds for c in r.cold), default=float("nan")) for r in rounds]
    cold_med = [statistics.median([c.seconds for c in r.cold]) if r.cold else float("nan") for r in rounds]
    all_cold = [c for r in rounds for c in r.cold]
    recovery_ok = [Timed(seconds=r.recovery, done=r.recovery == r.recovery) for r in rounds]
    lines = [
        *head,
        "",
        f"Default mount options: s3_deadline {DEFAULT_DEADLINE:g} s, so one S3 operation may take "
        f"{DEFAULT_DEADLINE:g} s + 1 s/MiB it moves (s3cachefs/s3/breaker.py, DEADLINE_PER_MIB): "
        f"{DEFAULT_DEADLINE + SMALL_BYTES / 2**20:.3f} s for the {SMALL_BYTES} B PUT of a close(), "
        f"{DEFAULT_DEADLINE:g} s for a GET of unknown size (extended by its size once it answers). "
        f"Rounds: {len(rounds)}; S3 hung = SeaweedFS stopped with SIGSTOP.",
        "",
        "| figure | target | median | max | per round | errno | verdict |",
        "|---|---|---|---|---|---|---|",
        row("1st close() of a new 2 KB original, S3 hung", TARGET_FIRST, [t.seconds for t in first], first),
        row("2nd close()", TARGET_NEXT, [t.seconds for t in second], second),
        row("3rd close()", TARGET_NEXT, [t.seconds for t in third], third),
        row(
            "S3 resumed: until a close() succeeds (no remount)",
            None,
            [r.recovery for r in rounds],
            recovery_ok,
        ),
        row(
            f"read of a cached unverified 3 MiB file, {args.cold_reads} cold reads pending",
            TARGET_CACHED,
            [t.seconds for t in cached],
            cached,
        ),
        row("cold reads: the median read's time to fail", None, cold_med, []),
        row("cold reads: the slowest read's time to fail", None, cold_max, all_cold),
        "",
        "Per round: create + write of the hung files (prep, max), cold reads still pending when the "
        "cached read ended, cold-read times min / median / max, the close() polls after the resume:",
        "",
    ]
    for i, r in enumerate(rounds, 1):
        cs = sorted(c.seconds for c in r.cold)
        lines.append(
            f"- round {i}: prep max {fmt(max(p.seconds for p in r.prep))}; "
            f"{r.pending_at_cached}/{len(r.cold)} cold reads pending at the cached read; cold reads "
            f"{fmt(cs[0]) if cs else '—'} / {fmt(statistics.median(cs)) if cs else '—'} / "
            f"{fmt(cs[-1]) if cs else '—'} ({errnos(r.cold)}); {r.recovery_tries} close() after the "
            f"resume ({', '.join(r.recovery_errnos) or 'none'} before the one that succeeded)"
        )
    if rounds and rounds[0].log_lines:
        lines += ["", "The daemon's log about S3 and the circuit, round 1 (abridged):", "", "```"]
        lines += abridged(rounds[0].log_lines)
        lines.append("```")
    errs = [t.error for r in rounds for t in (*r.closes, r.cached) if t.error][:3]
    if errs:
        lines += ["", "Errors as the caller saw them (first 3): " + "; ".join(f"`{e}`" for e in errs)]
    if notes or not all_cold:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each on a fresh mount (default 3)")
    ap.add_argument("--cold-reads", type=int, default=40, help="cold reads pending (default 40)")
    ap.add_argument(
        "--max-wait",
        type=float,
        default=120.0,
        help="bound of every wait: one system call, the recovery, the listing (default 120 s)",
    )
    ap.add_argument("--workdir", default=None, help="parent of the run's directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (server data, mount logs)")
    ap.add_argument("--output", default="bench/hung-s3-results.md", help="markdown file ('' for none)")
    args = ap.parse_args(argv)
    if not 1 <= args.rounds <= 20:
        ap.error("--rounds must be 1..20")
    if not 1 <= args.cold_reads <= 200:
        ap.error("--cold-reads must be 1..200")
    if not 20 <= args.max_wait <= 600:
        ap.error("--max-wait must be 20..600 seconds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_signals()
    head = header(
        f"bench.hung_s3, {args.rounds} round{'s' if args.rounds > 1 else ''}",
        "A noisy 2-core VM shared with other test runs.",
    )
    print("\n".join(head), flush=True)
    notes: list[str] = []
    rounds: list[Round] = []
    with run_dir("s3cfs-hung-", args.workdir, args.keep, log) as base, contextlib.ExitStack() as stack:
        server = S3Server(base / "s3")
        stack.callback(server.stop)  # registered before start: a half-started server is stopped too
        server.start()
        log(f"SeaweedFS at {server.endpoint_url}")
        for n in range(1, args.rounds + 1):
            log(f"round {n}")
            rounds.append(hung_round(server, base, n, args, notes))
        text = report(args, head, rounds, notes)
    print("\n" + text, flush=True)
    append_report(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
