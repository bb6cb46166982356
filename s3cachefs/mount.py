"""The composition root: checks, builds the parts, mounts, runs them in one nursery, unmounts.

Order matters and is chosen so that a mount never appears unless it can work:
  1. mount point and cache directory are usable; the cache directory is locked (one instance each);
  2. S3 answers for the bucket (exists, credentials accepted, listable) -- before anything is mounted;
  3. the index is opened, checked to belong to this bucket and prefix, and crash leftovers are undone;
  4. pyfuse3.init mounts; without --foreground we fork into the background only now, so the parent's
     exit status tells whether the mount is up;
  5. trio runs pyfuse3's main loop, the background listing, the age evictor and the reaper of
     evicted files in one nursery;
     SIGTERM/SIGINT unmount cleanly (systemd stop), `fusermount3 -u` ends the loop as well;
     SIGHUP reopens the log file (logrotate, systemctl reload) and never ends the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import logging
import logging.handlers
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from . import procmounts, slowsteps
from .cache import Cache, Limits
from .config import Config, ConfigError
from .errors import EXIT_OK, EXIT_RUNTIME, StartupError, report
from .fs import Operations
from .index import Index
from .metrics import PUBLISH_EVERY, Exporter, Metrics
from .namespace import Namespace
from .quarantine import QuarantineFollower
from .s3 import S3, AccessDenied, NoSuchBucket, S3Error, SyncS3

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL = 0.0005  # seconds; CPython's default is 0.005 (see run())

HOUSEKEEPING_EVERY = 60.0
# Worker threads for local disk work and for calls into the kernel (see _build).
DISK_THREADS = 4
KERNEL_THREADS = 2
# How long a clean stop goes on sending queued uploads and deletes (systemd's TimeoutStopSec is 120 s).
DRAIN_TIMEOUT = 90.0
STATS_EVERY = 5.0


@dataclass
class _Parts:
    index: Index
    cache: Cache
    ns: Namespace
    ops: Operations
    kernel: trio.CapacityLimiter  # threads for calls into the kernel
    listing: bool
    metrics: Metrics


def _setup_logging(config: Config, daemon: bool) -> None:
    root = logging.getLogger()
    root.setLevel(config.log_level)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if config.log_file is not None:
        handler = logging.FileHandler(config.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif daemon and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("s3cachefs[%(process)d]: %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    # botocore logs request bodies and headers at DEBUG; keep its chatter (and any secret) out.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _reopen_log_file() -> None:
    """SIGHUP, after logrotate moved the log file away: later lines go to a new file at the old path.
    Opened before the old one is closed, so a failure (say, the directory is gone) keeps the old file."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            name = handler.baseFilename
            try:
                # Appending, as _setup_logging's handler does; the handler keeps the file open.
                stream = open(name, "a", encoding=handler.encoding, errors=handler.errors)  # noqa: SIM115
            except OSError as e:
                log.error(
                    "SIGHUP: cannot reopen the log file %s (%s); still writing to the old one",
                    name,
                    e.strerror,
                )
                continue
            old = handler.setStream(stream)
            if old is not None:
                old.close()
            log.info("SIGHUP: reopened the log file %s", name)


def _check_mountpoint(path: Path) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            # A previous instance died without unmounting ("Transport endpoint is not connected").
            st = _clear_dead_mount(path, "")
        elif e.errno == errno.ENOENT:
            raise ConfigError(f"mount point {path}: does not exist") from None
        else:
            raise ConfigError(f"mount point {path}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise ConfigError(f"mount point {path}: not a directory")
    if os.path.ismount(path) and _dead_mount_of_ours(path):
        # Killed (a crash, the watchdog): stat() above still answered from the kernel's attribute
        # cache (ATTR_TIMEOUT), but nothing serves the mount any more. Clear it, or the restart
        # would exit 2 and systemd's RestartPreventExitStatus=2 would stop retrying.
        st = _clear_dead_mount(path, " (its daemon is gone)")
    if os.path.ismount(path):
        raise ConfigError(f"mount point {path}: something is already mounted there")
    return st


def _clear_dead_mount(path: Path, why: str) -> os.stat_result:
    """Lazily unmount what a dead daemon left at `path`; the stat of what is there then."""
    log.warning("clearing a dead mount at %s%s", path, why)
    subprocess.run(["fusermount3", "-uz", str(path)], check=False, capture_output=True)
    return os.stat(path)


def _dead_mount_of_ours(path: Path) -> bool:
    """An s3cachefs mount at `path` whose daemon is gone: statfs, unlike stat, is never answered
    from the kernel's cache, and a FUSE connection without its daemon fails it with ENOTCONN."""
    entry = procmounts.mount_of(path)
    if entry is None or entry.point != os.path.realpath(path) or entry.fstype != "fuse.s3cachefs":
        return False
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


# What the daemon (root, as a rule) opens or creates by name inside the cache directory: a symlink
# or a hard link there would turn its writes onto any file of the system. Only the entries whose
# names are fixed are checked; the files inside data/ and tmp/ are made with O_EXCL (a planted
# name makes that open fail) or renamed into place (which replaces a link, never follows it).
_CACHE_SUBDIRS = ("data", "tmp", "trash")
# reserve: the space kept for the index on a full disk (cache/space.py).
_CACHE_FILES = ("index.sqlite", "index.sqlite-journal", "index.sqlite-wal", "index.sqlite-shm", "reserve")


def _unsafe_dir(st: os.stat_result) -> str | None:
    """Why a directory (lstat'ed) must not be used for the cache, or None. Only checked, never
    chmodded: whoever else can write there could already have planted anything in it."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link; give the real directory"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by uid {os.geteuid()} that runs s3cachefs"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); chmod go-w it"
    return None


def _unsafe_ancestor(path: Path) -> str | None:
    """As root (sshd's StrictModes): a directory above the cache that others can write to lets them
    swap the cache directory, between our checks and our opens, for one of their own making; unless
    it is root's and sticky, like /tmp, where nobody may rename what is not theirs."""
    if os.geteuid() != 0:
        return None
    parent = Path(os.path.realpath(path.parent))
    for d in (*parent.parents[::-1], parent):
        try:
            st = os.stat(d)
        except OSError:
            continue  # made below, by us
        if st.st_mode & stat.S_IWOTH and not (st.st_uid == 0 and st.st_mode & stat.S_ISVTX):
            return f"{d} above it is writable by others and not sticky (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _check_cache_dir(path: Path) -> None:
    """Create the cache directory if it is missing, then refuse it unless it is a real directory of
    ours that nobody else can write to, with no symlink in place of what the cache opens by name."""
    if (why := _unsafe_ancestor(path)) is not None:
        raise ConfigError(f"cache dir {path}: {why}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The last component made here, 0700, or left as it is when it exists and judged by lstat
        # below: Path.mkdir(exist_ok=True) would quietly take a symlink to a directory for one.
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        st = os.lstat(path)
    except OSError as e:
        raise ConfigError(f"cache dir {path}: {e.strerror}") from None
    if (why := _unsafe_dir(st)) is not None:
        raise ConfigError(f"cache dir {path}: {why}")
    for name in _CACHE_SUBDIRS:
        try:
            st = os.lstat(path / name)
        except FileNotFoundError:
            continue  # the cache makes it
        except OSError as e:
            raise ConfigError(f"cache dir {path}: {name}/: {e.strerror}") from None
        if (why := _unsafe_dir(st)) is not None:
            raise ConfigError(f"cache dir {path}: {name}/ {why}")
    try:
        # data/XX: the cache renames downloaded files into them.
        links = sorted(e.name for e in os.scandir(path / "data") if e.is_symlink())
    except FileNotFoundError:
        links = []
    except OSError as e:
        raise ConfigError(f"cache dir {path}: data/: {e.strerror}") from None
    if links:
        raise ConfigError(f"cache dir {path}: data/{links[0]} is a symbolic link; refusing to follow it")
    for name in _CACHE_FILES:
        try:
            st = os.lstat(path / name)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ConfigError(f"cache dir {path}: {name}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            raise ConfigError(f"cache dir {path}: {name} is not a regular file of ours with one link")


def _open_lock(path: Path) -> int:
    """The lock file, opened without following a symlink and then checked on the open file itself
    (fstat), so nothing can be swapped in between the check and the use."""
    lock = path / "lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"cache dir {path}: lock is a symbolic link; refusing to follow it") from None
        raise ConfigError(f"cache dir {path}: lock: {e.strerror}") from None
    st = os.fstat(fd)
    # A hard link would let us truncate another file of ours (root's: any file) when we write our pid.
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
        os.close(fd)
        raise ConfigError(f"cache dir {path}: lock is not a regular file of ours with one link")
    return fd


@contextlib.contextmanager
def _locked_cache_dir(path: Path) -> Iterator[Callable[[], None]]:
    _check_cache_dir(path)
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(f"cache dir {path}: in use by another s3cachefs (pid {other})") from None

        def record_pid() -> None:
            # Again after daemonizing: `status` reports the process that serves the mount.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

        record_pid()
        yield record_pid
    finally:
        os.close(fd)


def _check_identity(index: Index, config: Config) -> None:
    ident = f"{config.s3.endpoint_url or 'aws'} {config.s3.bucket} {config.s3.prefix!r}"
    have = index.get_meta("identity")
    if have is None:
        index.set_meta("identity", ident)
    elif have != ident:
        raise ConfigError(
            f"cache dir {config.cache_dir}: holds the cache of {have}, not of {ident}; use another --cache-dir"
        )


# glibc's mallopt parameter number for the arena cap (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def _limit_malloc_arenas() -> None:
    """glibc gives a thread that finds the malloc lock taken an arena of its own, up to 8 per core,
    and memory freed into one arena is not reused by another. Our worker threads (S3 calls, file
    I/O) take turns, so with many arenas the daemon's RSS creeps up for a long time before it
    levels off. Two arenas keep it near what is in use (bench/soak.py, README "Memory"). Set before
    any worker thread exists; MALLOC_ARENA_MAX in the environment, read by glibc itself, wins."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc (musl has no arenas to cap)
    mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


def _check_s3(config: Config) -> None:
    try:
        server = SyncS3(config.s3).check_access()
        if "seaweedfs" in server.lower():
            # Measured with bench/seaweedfs_folder_cleaner.py on SeaweedFS 4.48: its empty-folder
            # cleaner deletes an object written at the key of a folder emptied shortly before.
            log.warning(
                "the S3 server is %s: unless its empty-folder cleaner is off, it can delete a file "
                "written where a directory of the same name was emptied in the last minutes "
                "(README, 'SeaweedFS')",
                server,
            )
    except NoSuchBucket as e:
        raise ConfigError(str(e)) from None
    except AccessDenied as e:
        raise ConfigError(f"access refused, check the credentials and the bucket policy ({e})") from None
    except S3Error as e:
        raise StartupError(f"cannot reach S3: {e}") from None


def _build(config: Config, uid: int, gid: int) -> _Parts:
    try:
        return _build_parts(config, uid, gid)
    except sqlite3.DatabaseError as e:
        # A damaged (or unreadable) index refuses the start with exit 2, so that systemd does not
        # restart into the same error (RestartPreventExitStatus=2), and says what the admin can do.
        raise ConfigError(
            f"cache directory {config.cache_dir}: its index (index.sqlite) cannot be used: {e}. To start"
            " afresh, move the cache directory aside and mount again: the index is rebuilt from the"
            " bucket (files that were only in this cache, such as uploads still queued, stay in the"
            " moved directory's data/)"
        ) from None
    except OSError as e:  # the cache directory's layout (a symlink where a directory must be, modes)
        raise ConfigError(f"cache directory {config.cache_dir}: {e}") from None


def _build_parts(config: Config, uid: int, gid: int) -> _Parts:
    limiter = trio.CapacityLimiter(config.s3.threadpool_size)
    index = Index(config.cache_dir / "index.sqlite")
    _check_identity(index, config)
    # Recorded whether or not --metrics-addr serves them: the same code paths either way.
    metrics = Metrics()
    s3 = S3(config.s3, limiter, metrics=metrics)
    limits = Limits(
        config.cache_size,
        config.cache_min_free,
        config.cache_max_age,
        config.policies,
        config.s3.read_part_size,
        config.s3.read_concurrency,
        config.upload_queue_max,
    )
    # One limiter per scarce resource: S3 connections (above), local disk work (hashes, copies,
    # fsync, unlinks), and calls into the kernel (invalidations, which can wait on the kernel's page
    # locks). A hung S3 then never holds up a cached read's MD5 check or an invalidation.
    disk = trio.CapacityLimiter(DISK_THREADS)
    kernel = trio.CapacityLimiter(KERNEL_THREADS)
    cache = Cache(config.cache_dir, index, s3, config.s3.prefix, limits, disk, metrics=metrics)
    cache.recover()
    ns = Namespace(index, s3, cache, config.s3.prefix, config.metadata_ttl, config.relist_interval)
    ops = Operations(index, ns, cache, uid, gid, kernel, metrics)
    return _Parts(index, cache, ns, ops, kernel, config.listing, metrics)


def _bind_metrics(config: Config, metrics: Metrics) -> Exporter | None:
    """Bind the metrics endpoint, before anything is mounted: a taken or wrong address is a
    start-up error, not a mount without the metrics it was asked for."""
    if config.metrics_addr is None:
        return None
    host, port = config.metrics_addr
    try:
        return Exporter(metrics, host, port)
    except OSError as e:
        raise ConfigError(f"metrics_addr {host}:{port}: {e.strerror or e}") from None


async def _publish_gauges(parts: _Parts) -> None:
    """The gauges' snapshot for scrapes, from the event loop (see metrics.py for why)."""
    while True:
        try:
            parts.metrics.gauges = parts.cache.gauges(parts.ns.listing_active, parts.ns.listed_objects)
        except sqlite3.Error as e:
            log.debug("could not read the queues for the metrics: %s", e)
        await trio.sleep(PUBLISH_EVERY)


async def _set_read_ahead(mountpoint: Path, nbytes: int, limiter: trio.CapacityLimiter) -> None:
    """Raise the mount's kernel read-ahead (sysfs, per device), which also caps the size of the read
    requests we get. The kernel lowers it to its default when it gets our answer to FUSE INIT, so
    this waits for a stat() of the mount to come back (INIT is answered before any other request)."""
    if not nbytes:
        return
    try:
        st = await trio.to_thread.run_sync(os.stat, mountpoint, limiter=limiter)
        path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(max(4, nbytes // 1024)))
    except OSError as e:
        log.warning("could not set the read-ahead of %s (%s); reads stay in 128 KiB requests", mountpoint, e)


def _sd_notify(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


def _watchdog_interval() -> float | None:
    """Seconds between two WATCHDOG=1, or None when systemd watches no one here. Half of
    WATCHDOG_USEC, as sd_watchdog_enabled(3) advises: one late ping must not cost a restart."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not os.environ.get("NOTIFY_SOCKET"):
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were started by one that systemd watches)
    try:
        interval = int(usec) / 2 / 1_000_000
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    return interval if interval > 0 else None


async def _watchdog(interval: float) -> None:
    """Ping systemd from the event loop itself: FUSE requests are answered by this loop, so when it
    is wedged (a synchronous call that blocks, an endless loop) the pings stop and systemd restarts
    us, instead of Synapse waiting on a mount that never answers."""
    while True:
        try:
            _sd_notify("WATCHDOG=1")
        except OSError as e:
            log.warning("could not ping the systemd watchdog: %s", e)
        await trio.sleep(interval)


def _daemonize() -> None:
    if os.fork() > 0:
        os._exit(EXIT_OK)
    os.setsid()
    if os.fork() > 0:
        os._exit(EXIT_OK)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


async def _housekeeping(cache: Cache) -> None:
    """Every minute: age limits, free space taken by others, batched access times; counters more often."""
    ticks = 0
    while True:
        await trio.sleep(STATS_EVERY)
        ticks += 1
        try:
            if ticks * STATS_EVERY >= HOUSEKEEPING_EVERY:
                ticks = 0
                cache.housekeeping()
            else:
                cache.persist_stats()
        except (OSError, sqlite3.Error) as e:
            # A full cache disk must not take the mount down; writes already fail with ENOSPC.
            log.error("housekeeping failed: %s", e)


async def _drain(cache: Cache) -> None:
    """At a clean stop: send what the upload and DELETE queues hold, for DRAIN_TIMEOUT at most (the
    unit's TimeoutStopSec is 120 s); the rest stays queued in the index for the next mount."""
    with trio.move_on_after(DRAIN_TIMEOUT) as scope:
        n = await cache.queue.drain()
        if n:
            log.info("sent the %d queued uploads and deletes before stopping", n)
    if scope.cancelled_caught:
        q = cache.index.queue_summary(cache.store.clock())
        log.warning(
            "stopping with %d uploads and %d deletes still queued; they resume at the next mount",
            q["queued_uploads"],
            q["queued_deletes"],
        )


def _fsname(config: Config) -> str:
    """The mount's source as `mount` and `df` show it; `s3cachefs status MOUNTPOINT` reads the cache dir from it."""
    cache_dir = str(config.cache_dir)
    if any(c in cache_dir for c in ",\\ \t\n"):  # would break the mount option string
        return f"s3cachefs:{config.s3.bucket}"
    return f"s3cachefs:{cache_dir}"


async def _serve(parts: _Parts, config: Config) -> bool:
    """Run until unmounted. Returns True if we were asked to stop (and so must unmount ourselves)."""
    stopped_by_signal = False

    async def on_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal stopped_by_signal
        with trio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP
        ) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    _reopen_log_file()
                    continue
                if signum == signal.SIGUSR1:
                    # For `s3cachefs status` (and tests): counters now rather than in 5 s.
                    try:
                        parts.cache.flush_atimes()
                        parts.cache.persist_stats()
                    except sqlite3.Error as e:
                        # A locked or full index must not end the mount over a request for figures.
                        log.error("SIGUSR1: could not save the counters: %s", e)
                    continue
                log.info("got %s: unmounting", signal.Signals(signum).name)
                stopped_by_signal = True
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(on_signals)
        # The circuit breaker's probe: while S3 is unreachable, it notices S3 answering again.
        await nursery.start(parts.cache.s3.run)
        # Before the first pass (a large pass leaves its data files to the reaper) and before the
        # listing (which has the kernel invalidate what changed behind our back, in the background).
        await nursery.start(parts.cache.run)
        if parts.listing:
            nursery.start_soon(parts.ns.listing_task)
        # A lowered cap, a fuller disk or entries that aged while unmounted: settle them first.
        parts.cache.housekeeping()
        nursery.start_soon(_housekeeping, parts.cache)
        if config.synapse is not None:
            # Cached copies of media Synapse quarantines go (quarantine.py); a Synapse that is down
            # or refuses the token is logged, never fatal.
            await nursery.start(QuarantineFollower(parts.cache, config.synapse).run)
        if config.metrics_addr is not None:  # no index reads every second for nobody
            nursery.start_soon(_publish_gauges, parts)
        nursery.start_soon(_set_read_ahead, config.mountpoint, config.read_ahead, parts.kernel)
        _sd_notify("READY=1")
        watchdog = _watchdog_interval()  # read after daemonizing: WATCHDOG_PID names the process
        if watchdog is not None:
            nursery.start_soon(_watchdog, watchdog)
        await pyfuse3.main()
        _sd_notify("STOPPING=1")
        await _drain(parts.cache)
        nursery.cancel_scope.cancel()
    return stopped_by_signal


def run(config: Config) -> int:
    # Everything we create (cache files, index, logs) is for this process only: 0600 files, 0700 dirs.
    os.umask(0o077)
    # SIGHUP's default action ends the process and leaves a dead mount ("Transport endpoint is not
    # connected") for Synapse. Ignored until the loop runs, which then takes it to reopen the log file
    # (logrotate, `systemctl reload`); trio restores this when the loop ends.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _limit_malloc_arenas()
    try:
        _setup_logging(config, daemon=False)
    except OSError as e:
        return report(ConfigError(f"log_file {config.log_file}: {e.strerror}"))
    try:
        st = _check_mountpoint(config.mountpoint)
        with _locked_cache_dir(config.cache_dir) as record_pid:
            _check_s3(config)
            uid = st.st_uid if config.uid is None else config.uid
            gid = st.st_gid if config.gid is None else config.gid
            parts = _build(config, uid, gid)
            exporter = _bind_metrics(config, parts.metrics)
            options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
            options |= {f"fsname={_fsname(config)}", "subtype=s3cachefs"}
            if config.allow_other:
                options.add("allow_other")
            try:
                pyfuse3.init(parts.ops, str(config.mountpoint), options)
            except RuntimeError as e:
                raise StartupError(f"mount at {config.mountpoint} failed: {e}") from None
            log.info(
                "mounted s3://%s/%s at %s (cache %s, cap %d bytes)",
                config.s3.bucket,
                config.s3.prefix,
                config.mountpoint,
                config.cache_dir,
                config.cache_size,
            )
            if not config.foreground:
                if config.log_file is None and not os.path.exists("/dev/log"):
                    log.warning("no syslog socket (/dev/log): the daemon's logs are lost; use --log-file")
                _daemonize()
                record_pid()
                _setup_logging(config, daemon=True)
            if exporter is not None:
                exporter.start()  # after the fork: the serving thread would not survive it
                host, port = exporter.address
                log.info(
                    "serving metrics at http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port
                )
            # Worker threads (S3 calls, the listing's page parsing, hashing) hold the GIL while they
            # run Python code, and the event loop gives it up at every SQLite call: with CPython's
            # default interval each of those may wait 5 ms to get it back, and a FUSE request that
            # makes ten of them waited 30-60 ms behind the listing of a large bucket. A shorter
            # interval bounds each wait to GIL_SWITCH_INTERVAL.
            sys.setswitchinterval(GIL_SWITCH_INTERVAL)
            # What exists now (modules, botocore's service models and clients: ~124,000 objects
            # the collector tracks) lives as long as the mount. A full collection scans all of it,
            # 70-90 ms holding the GIL here, and the first one comes within a second of the mount
            # (the oldest generation's count is already near its threshold): the event loop waited
            # for it, and a FUSE request with it (bench.listing_stall's one probe over 50 ms at
            # the start). Frozen, they are never scanned again: a full collection takes under 1 ms.
            gc.collect()
            gc.freeze()
            unmount = True
            try:
                unmount = trio.run(_serve, parts, config, instruments=slowsteps.from_env())
            except BaseException:
                log.exception("s3cachefs stopped on an error")
                pyfuse3.close(unmount=True)
                parts.index.close()
                return EXIT_RUNTIME
            finally:
                if exporter is not None:
                    exporter.close()
            pyfuse3.close(unmount=unmount)
            try:
                parts.cache.flush_atimes()
                parts.cache.persist_stats()
            except sqlite3.Error as e:
                log.error("could not save access times and counters: %s", e)
            parts.index.close()
            log.info("unmounted %s", config.mountpoint)
            return EXIT_OK
    except (ConfigError, StartupError) as e:
        return report(e)
