"""`s3cachefs status PATH`: what is in a cache, read from its index (beside a running daemon or not).

PATH is a mount point (its cache directory is read from the mount's source in /proc/mounts, which
the daemon sets to `s3cachefs:CACHE_DIR`) or a cache directory. The daemon saves its counters to the
index every few seconds, and at once on SIGUSR1: status sends it one and waits (LIVE_WAIT at most)
until the index's count of saves moves, so the figures of a running mount are those of the moment
it was asked. Where it cannot signal the daemon (another user's), it shows the last saved ones
(`live` false), at most a few seconds old.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from . import procmounts
from .config import ConfigError
from .errors import EXIT_OK
from .index import Index

# How long status waits for a running daemon to save its counters (it does so between two requests;
# a daemon so busy that it takes longer has its last saved figures shown).
LIVE_WAIT = 2.0


def cache_dir_of(path: Path) -> Path:
    """The cache directory behind a mount point, or `path` itself if it is a cache directory.

    The mount table is asked first: inside a mount point, an `index.sqlite` is a file from the
    bucket, which anyone who can write to the bucket could have put there."""
    target = str(path.absolute())
    ours = [m for m in procmounts.mounts() if m.point == target and m.fstype == "fuse.s3cachefs"]
    if ours:
        src = ours[-1].source  # the last mounted on that point is the one visible
        if src.startswith("s3cachefs:/"):
            return Path(src[len("s3cachefs:") :])
        raise ConfigError(
            f"{path}: mounted without its cache directory in its source; give the cache directory instead"
        )
    if (path / "index.sqlite").is_file():
        return path
    raise ConfigError(f"{path}: neither an s3cachefs mount point nor a cache directory (no index.sqlite)")


def _daemon_pid(cache_dir: Path) -> int | None:
    try:
        pid = int((cache_dir / "lock").read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if not pid:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"s3cachefs" in cmdline else None


def _lock_held(lock: Path) -> bool:
    """Does a process hold the flock() of this lock file (per /proc/locks, which takes no lock)?"""
    try:
        st = os.stat(lock)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2171217 0 EOF"; waiters have "->" after the number.
    return any(f[1] == "FLOCK" and f[5] == want for f in (line.split() for line in lines) if len(f) > 5)


def _ask_to_save(index: Index, cache_dir: Path, pid: int | None) -> bool:
    """Have the daemon save its counters now (SIGUSR1) and wait until it has: True if it did.

    Only a pid whose cache directory is locked is signalled: SIGUSR1 ends a process that does not
    handle it, and the pid in a stale lock file may have been reused."""
    if pid is None or not _lock_held(cache_dir / "lock"):
        return False
    before = index.get_meta("saves")
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:  # not ours to signal (PermissionError), or it just exited
        return False
    # Any save after this point was made after we were asked: it holds what we were asked for.
    deadline = time.monotonic() + LIVE_WAIT
    while time.monotonic() < deadline:
        if index.get_meta("saves") != before:
            return True
        time.sleep(0.01)
    return False


def collect(path: Path) -> dict[str, Any]:
    cache_dir = cache_dir_of(path)
    pid = _daemon_pid(cache_dir)
    index = Index(cache_dir / "index.sqlite", readonly=True)
    try:
        live = _ask_to_save(index, cache_dir, pid)
        summary = index.cache_summary()
        queues = index.queue_summary(time.time())
        stats = json.loads(index.get_meta("stats") or "{}")
        limits = json.loads(index.get_meta("limits") or "{}")
        identity = index.get_meta("identity")
        saves = int(index.get_meta("saves") or 0)
    finally:
        index.close()
    hits, misses = stats.get("hits", 0), stats.get("misses", 0)
    return {
        "cache_dir": str(cache_dir),
        "source": identity,
        "pid": pid,
        "live": live,
        "cap_bytes": limits.get("cap"),
        "min_free": limits.get("min_free"),
        "cached_files": summary.get("cached_files", 0),
        "cached_bytes": summary.get("cached_bytes", 0),
        "local_only_files": summary.get("local_files", 0),
        "local_only_bytes": summary.get("local_bytes", 0),
        "remote_files": summary.get("remote_files", 0),
        "pending_upload_files": summary.get("writing_files", 0),
        "queued_bytes": summary.get("queued_bytes", 0),
        **queues,
        "hits": hits,
        "misses": misses,
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        "evictions": stats.get("evictions", 0),
        "evicted_bytes": stats.get("evicted_bytes", 0),
        "uploads": stats.get("uploads", 0),
        "uploaded_bytes": stats.get("uploaded_bytes", 0),
        "damaged_refetched": stats.get("damaged", 0),
        "quarantine_removals": stats.get("quarantine_removals", 0),
        "s3_calls": {k[3:]: v for k, v in sorted(stats.items()) if k.startswith("s3_")},
        "saves": saves,
    }


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _daemon_line(s: dict[str, Any]) -> str:
    if not s["pid"]:
        return "not running"
    figures = "live figures" if s["live"] else "figures as last saved (could not ask it to save them now)"
    return f"running, pid {s['pid']}; {figures}"


def render(s: dict[str, Any]) -> str:
    in_cache = s["cached_bytes"] + s["local_only_bytes"] + s["queued_bytes"]
    cap = s["cap_bytes"]
    pct = f" ({100 * in_cache / cap:.0f}% of the cap)" if cap else ""
    ratio = "n/a" if s["hit_ratio"] is None else f"{100 * s['hit_ratio']:.1f}%"
    min_free = s["min_free"]
    floor = "none" if not min_free else (f"{100 * min_free:.0f}%" if min_free < 1 else _size(int(min_free)))
    lines = [
        f"cache directory  {s['cache_dir']}",
        f"source           {s['source'] or '?'}",
        f"daemon           {_daemon_line(s)}",
        f"in cache         {_size(in_cache)}{pct}, cap {_size(cap)}, free-space floor {floor}",
        f"  cached         {s['cached_files']} files, {_size(s['cached_bytes'])} (also in S3)",
        f"  local-only     {s['local_only_files']} files, {_size(s['local_only_bytes'])} (never uploaded)",
        f"not cached       {s['remote_files']} files known in S3",
        f"being written    {s['pending_upload_files']} files",
        f"upload queue     {s['queued_uploads']} files, {_size(s['queued_upload_bytes'])}, "
        f"oldest {s['oldest_queued_upload_age']:.0f}s",
        f"delete queue     {s['queued_deletes']} keys, oldest {s['oldest_queued_delete_age']:.0f}s",
        f"hits / misses    {s['hits']} / {s['misses']} (hit ratio {ratio})",
        f"evictions        {s['evictions']} ({_size(s['evicted_bytes'])})",
        f"uploads          {s['uploads']} ({_size(s['uploaded_bytes'])})",
        f"damaged copies   {s['damaged_refetched']} found and fetched again",
        f"quarantined      {s['quarantine_removals']} cached copies removed",
        "S3 calls         " + (", ".join(f"{k} {v}" for k, v in s["s3_calls"].items()) or "none"),
    ]
    return "\n".join(lines)


def main(path: Path, as_json: bool) -> int:
    if not path.exists():
        raise ConfigError(f"{path}: does not exist")
    try:
        s = collect(path)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    except sqlite3.Error as e:
        raise ConfigError(f"{path}: cannot read the index: {e}") from None
    try:
        print(json.dumps(s, indent=2) if as_json else render(s), flush=True)
    except BrokenPipeError:  # `s3cachefs status ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK
