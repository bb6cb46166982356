"""`s3cachefs import SRC_DIR BUCKET`: upload an existing media_store, so that a server can switch to the mount.

A batch job, not part of the daemon: plain threads (concurrent.futures), no trio. The main thread walks
the tree lazily (os.scandir, one directory listing in memory at a time), keeps at most 2 x --jobs files
in flight, records the results, deletes verified sources and draws the progress bar. Workers only read
files and talk to S3, and return what happened; the state they share with the main thread is the byte
counter of the progress bar (behind a lock) and the stop event.

Per file, with key = prefix + relative path (as the mount and synapse-s3-storage-provider do it):

1. HEAD the key. If the object has the same size and the same checksum, the file is skipped ("already
   in S3"); this is what makes an interrupted run resumable. The checksum is the ETag: the MD5 for a
   single-part object; for a multipart one (MD5 of the part MD5s, "-N") the file's own multipart ETag,
   computed with the object's part size, which HEAD with PartNumber=1 reports. When the part size
   cannot be learned, the file is uploaded again rather than trusted on its size alone.
2. Otherwise upload it: one PUT with Content-MD5 below multipart_threshold, else a multipart upload with
   Content-MD5 on every part, aborted on any failure (so no partial object ever becomes visible).
3. Verify: HEAD again; size and ETag must be what was computed from the bytes sent. Only then is the
   file counted as uploaded, and only then may --delete-source remove it.

Where an ETag is not a checksum of the content (SSE-C on AWS, SSE-KMS), steps 1 and 3 read the object
back and compare MD5s instead.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import enum
import hashlib
import logging
import os
import re
import signal
import stat
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from .config import (
    MOUNT_FILE_KEYS,
    S3_FILE_KEYS,
    ConfigError,
    S3Options,
    build_config,
    load_config_file,
    s3_key,
)
from .importsource import Entry, files_text, shown, signature, size_text, type_name, walk
from .procmounts import mount_of
from .s3 import (
    AccessDenied,
    NoSuchBucket,
    Part,
    S3Error,
    SyncS3,
    Unavailable,
    md5_file,
    md5_of_etag,
    multipart_etag,
    multipart_etag_of_file,
    parts_of,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef

log = logging.getLogger(__name__)

EXIT_OK, EXIT_INCOMPLETE = 0, 1
_MULTIPART_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})-([0-9]+)"?$')
# Failures and unsupported files named in the summary; the rest are only counted (all are printed as
# they happen).
_SHOWN = 10
# After this many files in a row failed because S3 was unreachable, stop rather than spend every
# remaining file's retries on a dead endpoint.
_UNREACHABLE_STREAK = 20
# Only aws:kms ETags are not an MD5 of the content among the server-side encryptions S3 reports here
# (SSE-S3 "AES256" keeps the MD5); SSE-C is known from our own settings.
_ETAG_NOT_MD5_SSE = ("aws:kms", "aws:kms:dsse")
_REPLACED_DIFFERS = "replaced: the object in S3 differed"
_REPLACED_UNVERIFIABLE = "re-uploaded: could not verify existing"


@dataclass(frozen=True)
class ImportOptions:
    src: Path
    s3: S3Options
    jobs: int = 8
    dry_run: bool = False
    delete_source: bool = False
    include_url_cache: bool = False
    progress: bool = False


# -- options --------------------------------------------------------------------------------------------


def options_from_args(args: argparse.Namespace) -> ImportOptions:
    """The parsed `import` arguments (and --config) -> validated options; usage errors -> ConfigError."""
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(load_config_file(args.config))
    # One config file serves mount and import; the mount's own keys mean nothing here. threadpool_size
    # neither: import's workers are --jobs.
    for name in (*MOUNT_FILE_KEYS, "threadpool_size"):
        values.pop(name, None)
    # Each S3 flag's dest is its config-file key, as for `mount`; a flag that was given wins.
    for name, value in vars(args).items():
        if name in S3_FILE_KEYS and value is not None:
            values[name] = value
    if args.jobs < 1:
        raise ConfigError(f"--jobs: must be at least 1, got {args.jobs}")
    src = Path(args.src).absolute()
    if not src.is_dir():
        raise ConfigError(f"SRC_DIR {args.src}: not a directory")
    if _on_s3cachefs_mount(src):
        raise ConfigError(f"SRC_DIR {args.src}: is on an s3cachefs mount; import from the old media_store")
    # build_config checks the S3 settings exactly as `mount` does; it also wants a mount point, which
    # import does not have, so it gets SRC_DIR as a stand-in and only .s3 is used.
    s3 = build_config({**values, "mountpoint": str(src)}).s3
    if s3.max_pool_connections is None:
        # One connection per worker; the mount's default (threadpool_size) is not about import.
        s3 = dataclasses.replace(s3, max_pool_connections=args.jobs)
    return ImportOptions(
        src=src,
        s3=s3,
        jobs=args.jobs,
        dry_run=args.dry_run,
        delete_source=args.delete_source,
        include_url_cache=args.include_url_cache,
        progress=not args.no_progress and sys.stderr.isatty(),
    )


def _on_s3cachefs_mount(path: Path) -> bool:
    """Is `path` inside an s3cachefs mount? Importing the mount into its own bucket with --delete-source
    would delete the objects themselves."""
    try:
        m = mount_of(path)
    except OSError:
        return False  # no /proc: nothing to check against
    return m is not None and (m.fstype == "fuse.s3cachefs" or m.source.startswith("s3cachefs:"))


# -- one file -------------------------------------------------------------------------------------------


class Outcome(enum.Enum):
    UPLOADED = "uploaded"
    PRESENT = "already in S3"
    WOULD_UPLOAD = "would upload"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class _Result:
    entry: Entry
    outcome: Outcome
    reason: str = ""  # why it failed, or why an existing object is replaced
    # (size, mtime_ns, ctime_ns, inode) of the file as it was read; deletion requires it unchanged.
    sig: tuple[int, int, int, int] | None = None
    reported: int = 0  # bytes already added to the progress counter by the worker
    unreachable: bool = False


class _FileFailed(Exception):
    """This file cannot be imported; the message says why, for the user."""


class _Interrupted(Exception):
    pass


class _Progress:
    """Bytes handled so far, added to by the workers (per part) and the main thread (per file)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


class _Uploader:
    """One file at a time, called from the worker threads. The S3 calls are the mount's own (SyncS3), so
    Content-MD5, SSE-C and the storage class are applied exactly as the mount applies them."""

    def __init__(self, opts: ImportOptions, s3: SyncS3, progress: _Progress, stop: threading.Event) -> None:
        self.opts = opts
        self.s3 = s3
        self.progress = progress
        self.stop = stop

    def process(self, e: Entry) -> _Result:
        reported = [0]
        try:
            return self._process(e, reported)
        except _Interrupted:
            return _Result(e, Outcome.INTERRUPTED, reported=reported[0])
        except _FileFailed as x:
            return _Result(e, Outcome.FAILED, str(x), reported=reported[0])
        except S3Error as x:
            return _Result(
                e, Outcome.FAILED, str(x), reported=reported[0], unreachable=isinstance(x, Unavailable)
            )
        except OSError as x:
            return _Result(e, Outcome.FAILED, f"local file: {x.strerror or x}", reported=reported[0])
        except Exception as x:
            # A bug, but a batch over millions of files should still finish the others.
            log.exception("importing %s", shown(e.rel))
            return _Result(e, Outcome.FAILED, f"internal error: {x!r}", reported=reported[0])

    def _process(self, e: Entry, reported: list[int]) -> _Result:
        key = s3_key(self.opts.s3.prefix, e.rel)
        st = os.lstat(e.path)
        if not stat.S_ISREG(st.st_mode):
            raise _FileFailed(f"is no longer a regular file (now a {type_name(st.st_mode)})")
        sig = signature(st)
        size = st.st_size
        replacing = ""
        remote = self.s3.head_object(key)
        if remote is not None:
            same, why = self._same_as_local(key, e.path, size, remote)
            if same:
                self._check_unchanged(e.path, sig)
                return _Result(e, Outcome.PRESENT, sig=sig)
            replacing = why
        if self.opts.dry_run:
            return _Result(e, Outcome.WOULD_UPLOAD, replacing)
        if self.stop.is_set():
            raise _Interrupted
        if not self.s3.is_multipart(size):
            expected = whole_md5 = self.s3.put_single(key, e.path).md5 or ""
        else:
            expected, whole_md5 = self._put_multipart(key, e.path, size, reported)
        self._verify(key, size, expected, whole_md5)
        self._check_unchanged(e.path, sig)
        return _Result(e, Outcome.UPLOADED, replacing, sig=sig, reported=reported[0])

    @staticmethod
    def _check_unchanged(path: str, sig: tuple[int, int, int, int]) -> None:
        if signature(os.lstat(path)) != sig:
            # What S3 holds may be the old content or a mix; a rerun will compare again.
            raise _FileFailed("changed while it was being imported; run again")

    # -- reading S3 -------------------------------------------------------------------------------------

    def _etag_is_checksum(self, head: HeadObjectOutputTypeDef) -> bool:
        return not self.s3.sse and head.get("ServerSideEncryption") not in _ETAG_NOT_MD5_SSE

    def _same_as_local(
        self, key: str, path: str, size: int, head: HeadObjectOutputTypeDef
    ) -> tuple[bool, str]:
        """Does the object hold exactly this file? Also says why not, for the summary."""
        if int(head["ContentLength"]) != size:
            return False, _REPLACED_DIFFERS
        if not self._etag_is_checksum(head):
            return self.s3.md5_of_object(key) == md5_file(path), _REPLACED_DIFFERS
        etag = head.get("ETag", "")
        if (md5 := md5_of_etag(etag)) is not None:
            return md5 == md5_file(path), _REPLACED_DIFFERS
        if m := _MULTIPART_ETAG.match(etag):
            nparts = int(m.group(2))
            part = self.s3.head_object(key, part_number=1) if nparts > 0 else None
            part_size = int(part["ContentLength"]) if part is not None else 0
            # A server that ignores PartNumber answers with the whole object, and parts of unequal
            # size cannot be recomputed: either way the layout does not give N equal parts.
            if part_size <= 0 or (size + part_size - 1) // part_size != nparts:
                return False, _REPLACED_UNVERIFIABLE
            want = f"{m.group(1).lower()}-{nparts}"
            return multipart_etag_of_file(path, part_size) == want, _REPLACED_DIFFERS
        return False, _REPLACED_UNVERIFIABLE

    def _verify(self, key: str, size: int, expected_etag: str, whole_md5: str) -> None:
        head = self.s3.head_object(key)
        if head is None:
            raise _FileFailed("verification failed: no object in S3 after the upload")
        if int(head["ContentLength"]) != size:
            raise _FileFailed(f"verification failed: S3 holds {head['ContentLength']} bytes, the file {size}")
        if self._etag_is_checksum(head):
            got = head.get("ETag", "").strip('"').lower()
            if got != expected_etag:
                raise _FileFailed(f"verification failed: ETag {got} in S3, {expected_etag} expected")
        elif self.s3.md5_of_object(key) != whole_md5:
            raise _FileFailed("verification failed: the object read back from S3 has another MD5")

    # -- writing S3 -------------------------------------------------------------------------------------

    def _put_multipart(self, key: str, path: str, size: int, reported: list[int]) -> tuple[str, str]:
        """Parts go up one after the other: parallelism comes from --jobs, and one part in memory per
        worker keeps memory at jobs x part size. Returns (expected ETag, MD5 of the whole file)."""
        upload_id = self.s3.create_multipart(key)
        whole = hashlib.md5()
        parts: list[Part] = []
        try:
            with open(path, "rb") as f:
                for number, _, length in parts_of(size, self.opts.s3.multipart_chunksize):
                    if self.stop.is_set():
                        raise _Interrupted
                    data = f.read(length)
                    if len(data) != length:
                        raise _FileFailed("changed while it was being imported; run again")
                    parts.append(self.s3.upload_part(key, upload_id, number, data))
                    whole.update(data)
                    self.progress.add(len(data))
                    reported[0] += len(data)
            self.s3.complete_multipart(key, upload_id, parts)
        except BaseException:
            self.s3.abort_multipart(key, upload_id)
            raise
        return multipart_etag(p.md5 for p in parts), whole.hexdigest()


# -- the run --------------------------------------------------------------------------------------------


@dataclass
class _Stats:
    """Counts kept by the main thread only."""

    uploaded: int = 0
    uploaded_bytes: int = 0
    present: int = 0
    present_bytes: int = 0
    would_upload: int = 0
    would_upload_bytes: int = 0
    url_cache: int = 0
    url_cache_bytes: int = 0
    unsupported: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: int = 0
    replaced: Counter[str] = field(default_factory=Counter)
    deleted: int = 0
    deleted_bytes: int = 0
    pruned_dirs: int = 0

    @property
    def done(self) -> int:
        return self.uploaded + self.present + self.would_upload + len(self.failed) + self.interrupted


class Importer:
    def __init__(
        self, opts: ImportOptions, s3: SyncS3, out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.opts = opts
        self.root = os.path.normpath(str(opts.src))
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.stop = threading.Event()
        self.stop_signal: int | None = None
        self.gave_up = False
        self.stats = _Stats()
        self.progress = _Progress()
        self.uploader = _Uploader(opts, s3, self.progress, self.stop)
        self.bar: tqdm[Any] | None = None
        # Set by the counting thread: (files, bytes, finished); one tuple, so one atomic assignment.
        self.total: tuple[int, int, bool] = (0, 0, False)
        self._unreachable_streak = 0
        self._last_refresh = 0.0

    # -- classification ----------------------------------------------------------------------------------

    def _is_url_cache(self, rel: str) -> bool:
        return not self.opts.include_url_cache and rel.split("/", 1)[0].startswith("url_cache")

    def _count(self) -> None:
        """Second, metadata-only walk in a thread, so that the bar gets a total and an ETA without
        delaying the first upload; it costs one stat per file, far less than an upload."""
        files = nbytes = 0
        for e in walk(self.root, self.stop):
            if e.kind == "file" and not self._is_url_cache(e.rel):
                files += 1
                nbytes += e.size
                if files % 1000 == 0:
                    self.total = (files, nbytes, False)
        self.total = (files, nbytes, not self.stop.is_set())

    # -- output ------------------------------------------------------------------------------------------

    def _say(self, line: str, to: TextIO | None = None) -> None:
        f = to or self.err
        if self.bar is not None:
            self.bar.write(line, file=f)
        else:
            print(line, file=f, flush=True)

    def _refresh_bar(self, force: bool = False) -> None:
        bar = self.bar
        if bar is None:
            return
        now = time.monotonic()
        if not force and now - self._last_refresh < 0.25:
            return
        self._last_refresh = now
        files, nbytes, finished = self.total
        if finished and bar.total != nbytes:
            bar.total = nbytes
        bar.update(self.progress.value - bar.n)
        s = self.stats
        bar.set_postfix_str(
            f"files {s.done}/{files}{'' if finished else '+'}, up {s.uploaded}, skip {s.present}, "
            f"failed {len(s.failed)}",
            refresh=False,
        )
        bar.refresh()

    # -- recording ---------------------------------------------------------------------------------------

    def _fail(self, rel: str, reason: str) -> None:
        line = f"{shown(rel)}: {reason}"
        self.stats.failed.append(line)
        self._say(f"s3cachefs: import: failed: {line}")

    def _record(self, r: _Result) -> None:
        s, e = self.stats, r.entry
        self.progress.add(e.size - r.reported)
        if r.outcome is not Outcome.INTERRUPTED:
            self._unreachable_streak = self._unreachable_streak + 1 if r.unreachable else 0
        if self._unreachable_streak >= _UNREACHABLE_STREAK and not self.stop.is_set():
            self.gave_up = True
            self.stop.set()
            self._say(f"s3cachefs: import: {_UNREACHABLE_STREAK} files in a row could not reach S3; stopping")
        if r.outcome is Outcome.FAILED:
            self._fail(e.rel, r.reason)
            return
        if r.outcome is Outcome.INTERRUPTED:
            s.interrupted += 1
            return
        if r.outcome is Outcome.WOULD_UPLOAD:
            s.would_upload += 1
            s.would_upload_bytes += e.size
            if r.reason:
                s.replaced[r.reason] += 1
            note = f" (replaces the object: {r.reason})" if r.reason else ""
            self._say(f"upload  {shown(e.rel)}  {e.size}{note}", self.out)
            return
        if r.outcome is Outcome.PRESENT and self.opts.dry_run:
            self._say(f"skip    {shown(e.rel)}  {e.size} (already in S3)", self.out)
        assert r.sig is not None
        if self.opts.delete_source and not self.opts.dry_run and not self._delete(e, r.sig):
            return
        if r.outcome is Outcome.UPLOADED:
            s.uploaded += 1
            s.uploaded_bytes += e.size
            if r.reason:
                s.replaced[r.reason] += 1
        else:
            s.present += 1
            s.present_bytes += e.size

    def _delete(self, e: Entry, sig: tuple[int, int, int, int]) -> bool:
        """Remove a verified source file and the parent directories this leaves empty (never SRC_DIR).
        False (and a failure recorded) if the file cannot be deleted or is not the one verified."""
        try:
            if signature(os.lstat(e.path)) != sig:
                self._fail(e.rel, "changed after it was verified in S3; kept, run again")
                return False
            os.remove(e.path)
        except OSError as x:
            self._fail(e.rel, f"in S3 and verified, but could not delete the source: {x.strerror}")
            return False
        self.stats.deleted += 1
        self.stats.deleted_bytes += e.size
        parent = os.path.dirname(e.path)
        while parent != self.root and parent.startswith(self.root + os.sep):
            try:
                os.rmdir(parent)
            except OSError:
                break  # not empty (or already gone): so are its parents
            self.stats.pruned_dirs += 1
            parent = os.path.dirname(parent)
        return True

    # -- main loop ---------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is not None:
            # Second signal: leave now. Nothing half-done can be deleted: deletes happen only in this
            # thread, after verification; parts of an unfinished multipart upload stay invisible.
            os.write(2, b"s3cachefs: import: stopped at once\n")
            os._exit(128 + signum)
        # Only flags here: printing from a signal handler can hit the interrupted print (reentrant call).
        self.stop_signal = signum
        self.stop.set()

    def _submit_or_record(self, pool: cf.ThreadPoolExecutor, e: Entry) -> cf.Future[_Result] | None:
        s = self.stats
        if self._is_url_cache(e.rel):
            s.url_cache += 1
            s.url_cache_bytes += e.size
            return None
        if e.kind == "error":
            self._fail(e.rel or ".", e.what)
            return None
        if e.kind == "unsupported":
            s.unsupported.append(f"{e.what} {shown(e.rel)}")
            return None
        try:
            s3_key(self.opts.s3.prefix, e.rel).encode("utf-8")
        except UnicodeEncodeError:
            self.progress.add(e.size)
            self._fail(e.rel, "the name is not valid UTF-8 and S3 keys must be; rename it")
            return None
        return pool.submit(self.uploader.process, e)

    def _collect(self, inflight: set[cf.Future[_Result]], timeout: float) -> None:
        done, _ = cf.wait(inflight, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        for f in done:
            inflight.discard(f)
            if not f.cancelled():
                self._record(f.result())
        self._refresh_bar()

    def run(self) -> int:
        start = time.monotonic()
        if self.opts.progress:
            self.bar = tqdm(
                total=None, unit="B", unit_scale=True, unit_divisor=1024, file=self.err, dynamic_ncols=True
            )
            threading.Thread(target=self._count, name="import-count", daemon=True).start()
        window = 2 * self.opts.jobs
        inflight: set[cf.Future[_Result]] = set()
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:
            pass  # not the main thread (embedded use): no signal handling, Ctrl-C is the caller's
        try:
            with cf.ThreadPoolExecutor(max_workers=self.opts.jobs, thread_name_prefix="import") as pool:
                for e in walk(self.root, self.stop):
                    f = self._submit_or_record(pool, e)
                    if f is not None:
                        inflight.add(f)
                    while len(inflight) >= window and not self.stop.is_set():
                        self._collect(inflight, 0.25)
                    if self.stop.is_set():
                        break
                stopping = False
                while inflight:
                    if self.stop.is_set() and not stopping:
                        stopping = True
                        for f in inflight:
                            f.cancel()  # queued, not started: never looked at, picked up by a rerun
                        if self.stop_signal is not None:
                            self._say(
                                f"s3cachefs: import: {signal.Signals(self.stop_signal).name}: finishing "
                                "the uploads in progress (send it again to quit at once)"
                            )
                    self._collect(inflight, 0.25)
        finally:
            self.stop.set()  # ends the counting thread, if it still runs
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.bar is not None:
                self._refresh_bar(force=True)
                self.bar.close()
        self._summary(time.monotonic() - start)
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        return EXIT_INCOMPLETE if self.stats.failed or self.gave_up else EXIT_OK

    # -- summary -----------------------------------------------------------------------------------------

    def _summary(self, elapsed: float) -> None:
        s, o = self.stats, self.opts
        where = f"s3://{o.s3.bucket}/{o.s3.prefix}"
        lines = [
            f"s3cachefs import {o.src} -> {where}{'  (dry run: nothing uploaded or deleted)' if o.dry_run else ''}"
        ]

        def row(label: str, text: str) -> None:
            lines.append(f"  {label + ':':<21} {text}")

        if o.dry_run:
            row("would upload", f"{files_text(s.would_upload)}, {size_text(s.would_upload_bytes)}")
        else:
            row("uploaded", f"{files_text(s.uploaded)}, {size_text(s.uploaded_bytes)}, verified")
        lines += [f"      {files_text(n)} {why}" for why, n in sorted(s.replaced.items())]
        row("already in S3", f"{files_text(s.present)}, {size_text(s.present_bytes)} (skipped)")
        hint = "" if o.include_url_cache else " (--include-url-cache imports them)"
        row("skipped url_cache*", f"{files_text(s.url_cache)}, {size_text(s.url_cache_bytes)}{hint}")
        row("skipped unsupported", f"{len(s.unsupported)} (only regular files are imported)")
        lines += [f"      {u}" for u in s.unsupported[:_SHOWN]]
        if len(s.unsupported) > _SHOWN:
            lines.append(f"      ... and {len(s.unsupported) - _SHOWN} more")
        row("failed", files_text(len(s.failed)))
        lines += [f"      {f}" for f in s.failed[:_SHOWN]]
        if len(s.failed) > _SHOWN:
            lines.append(f"      ... and {len(s.failed) - _SHOWN} more (printed above as they happened)")
        if s.interrupted:
            row("interrupted", f"{files_text(s.interrupted)} (not uploaded)")
        if o.delete_source and not o.dry_run:
            row(
                "deleted from source",
                f"{files_text(s.deleted)}, {size_text(s.deleted_bytes)}; {s.pruned_dirs} emptied directories removed",
            )
        secs = max(elapsed, 1e-6)
        uploads = f", uploads at {s.uploaded / secs:.0f} files/s and {size_text(s.uploaded_bytes / secs)}/s"
        row("elapsed", f"{elapsed:.1f} s; {s.done / secs:.0f} files/s checked{'' if o.dry_run else uploads}")
        if self.stop_signal is not None:
            result = f"INTERRUPTED by {signal.Signals(self.stop_signal).name}; run the same command again to resume"
        elif self.gave_up:
            result = "STOPPED: S3 is unreachable; run the same command again to resume"
        elif o.dry_run:
            result = f"dry run: {files_text(len(s.failed))} would fail" if s.failed else "dry run complete"
        elif s.failed:
            result = (
                f"INCOMPLETE: {files_text(len(s.failed))} failed; fix them and run the same command again"
            )
        else:
            result = "OK: every file is in S3 and verified"
        row("result", result)
        print("\n".join(lines), file=self.out, flush=True)


def main(args: argparse.Namespace) -> int:
    """`s3cachefs import`: exit 0 when every eligible file is in S3 and verified, 1 otherwise, 2 for bad
    usage (ConfigError, printed by the caller), 128 + signal number when interrupted."""
    opts = options_from_args(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="s3cachefs: %(name)s: %(message)s")
    s3 = SyncS3(opts.s3)
    try:
        s3.check_access()
    except NoSuchBucket as e:
        raise ConfigError(str(e)) from None
    except AccessDenied as e:
        raise ConfigError(f"access refused, check the credentials and the bucket policy ({e})") from None
    except S3Error as e:
        print(f"s3cachefs: error: cannot reach S3: {e}", file=sys.stderr)
        return EXIT_INCOMPLETE
    return Importer(opts, s3).run()
