"""The mount's S3: SyncS3's calls and its own GETs and LISTs in trio worker threads, under one
limiter, each within its deadline and behind the circuit breaker; and the multipart upload it pipelines."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import botocore.config
import botocore.exceptions
import botocore.handlers
import trio

from ..config import S3Options
from ..metrics import Metrics
from .breaker import PROBE_DEADLINE, PROBE_EVERY, Breaker, Deadline
from .errors import (
    Changed,
    CircuitOpen,
    DeadlineMissed,
    IntegrityError,
    LocalWriteError,
    NotFound,
    ObjectInfo,
    RangeResult,
    S3Error,
    Unavailable,
    Unreachable,
    first_error,
    outcome_of,
    s3_answered,
)
from .sync import (
    Head,
    Part,
    SyncS3,
    info_of_head,
    make_client,
    md5_and_part_digests,
    md5_file,
    mtime_ns_of,
    parts_of,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


log = logging.getLogger(__name__)


T = TypeVar("T")
# Downloads report progress every chunk: small enough for a quick first byte, large enough that the
# hop back into the event loop costs little.
_STREAM_CHUNK = 256 * 1024
_FIRST_CHUNK = 64 * 1024


class MultipartUpload:
    """One multipart upload whose parts are ranges of a local file, sent by SyncS3 in worker threads.

    Parts may be uploaded in any order and in parallel (at most 4 at a time per upload, so one large
    file cannot take every worker thread, and with 8 MiB parts it holds at most 32 MiB of memory).
    Until complete() the object does not exist; abort() makes sure it never will.

    Each call has its own deadline (S3._run); `until`, when given, is the deadline of the whole upload
    that no call may pass (S3.put_file sets it; the pipeline that uploads parts while the file is
    still being written has none, since its end depends on the writer).
    """

    PARALLEL_PARTS = 4

    def __init__(self, s3: S3, key: str, until: float = math.inf):
        self.s3 = s3
        self.key = key
        self.until = until
        self.upload_id: str | None = None
        self.parts: dict[int, Part] = {}
        self.nbytes = 0  # of the parts uploaded: CompleteMultipartUpload takes longer for more
        self._limiter = trio.CapacityLimiter(self.PARALLEL_PARTS)

    async def start(self) -> None:
        self.upload_id = await self.s3._run(
            f"CreateMultipartUpload {self.key}",
            functools.partial(self.s3.sync.create_multipart, self.key),
            until=self.until,
        )

    async def upload_part(self, number: int, path: str, offset: int, length: int) -> None:
        s3, upload_id = self.s3, self.upload_id
        assert upload_id is not None, "start() first"

        def send() -> Part:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
            if len(data) != length:
                raise IntegrityError(
                    f"UploadPart {self.key} #{number}: file has {len(data)} of {length} bytes"
                )
            return s3.sync.upload_part(self.key, upload_id, number, data)

        async with self._limiter:
            # Stored here, in the event loop: the worker threads share nothing.
            self.parts[number] = await s3._run(
                f"UploadPart {self.key} #{number}", send, length, until=self.until
            )
            self.nbytes += length
            s3.metrics.s3_sent_bytes.inc(length)

    async def complete(self) -> str:
        upload_id = self.upload_id
        assert upload_id is not None, "start() first"
        return await self.s3._run(
            f"CompleteMultipartUpload {self.key}",
            functools.partial(
                self.s3.sync.complete_multipart, self.key, upload_id, list(self.parts.values())
            ),
            self.nbytes,
            until=self.until,
        )

    async def abort(self) -> None:
        if self.upload_id is None:
            return
        # Not bounded by `until`: the upload may have failed for another reason with S3 up, and then
        # its parts should go. When S3 is what failed, the circuit is open and this fails at once.
        with trio.CancelScope(shield=True):
            try:
                await self.s3._run(
                    f"AbortMultipartUpload {self.key}",
                    functools.partial(self.s3.sync.abort_multipart, self.key, self.upload_id),
                )
            except S3Error as e:
                # As in SyncS3.abort_multipart: the error on its way out is what the caller must see.
                # (tests/test_faults.py reads this line from the mount's log: keep the wording.)
                log.warning("could not abort multipart upload of %s: %s", self.key, e)


class S3:
    """The mount's S3: SyncS3's calls in trio worker threads, behind one CapacityLimiter, each under
    a deadline, all behind one circuit breaker (start `run`, its probe, in the mount's nursery)."""

    def __init__(
        self,
        opts: S3Options,
        limiter: trio.CapacityLimiter,
        client: S3Client | None = None,
        metrics: Metrics | None = None,
    ):
        self.sync = SyncS3(opts, client)
        self.metrics = metrics if metrics is not None else Metrics()
        self.opts = opts
        self.bucket = opts.bucket
        self.client = self.sync.client
        self.limiter = limiter
        self.breaker = Breaker()
        self.calls: Counter[str] = Counter()

    def deadline(self, nbytes: int = 0, until: float = math.inf) -> Deadline:
        """The deadline of a call that starts now and moves `nbytes`."""
        return Deadline(trio.current_time(), self.opts.deadline, until, nbytes)

    async def _run(
        self,
        what: str,
        fn: Callable[[], T],
        nbytes: int = 0,
        *,
        until: float = math.inf,
        deadline: Deadline | None = None,
    ) -> T:
        """fn() in a worker thread: the one place every call of the mount's S3 goes through.

        Where the deadline applies: to each call, from before it waits for a worker thread to its
        answer, botocore's retries included; the call moves `nbytes` (or `deadline` says, and may
        extend, how long it may take); `until` caps it for calls that are part of a larger operation
        (the parts of put_file's multipart upload share one deadline for the whole file).

        The thread runs in a shielded scope whose only cancellation is the deadline: cancelled from
        outside (unmount, a failed sibling part), the caller still waits for the thread, at most
        until the deadline, so no thread outlives a caller that believes it is done (a part upload
        after its abort, a write into a closed fd). At the deadline the thread is abandoned: it keeps
        its limiter slot until boto3 gives up, which is why the circuit opens. A call that missed
        its deadline still waiting for a slot says nothing about S3 (every slot may be busy with
        large transfers), so that one fails without opening the circuit.
        """
        op = what.split(" ", 1)[0]
        try:
            trial = self.breaker.admit(what)
        except CircuitOpen:
            self.metrics.s3_request(op, "refused", None)
            raise
        # Counted here, in the event loop, per logical call sent (botocore's retries are not counted).
        self.calls[op] += 1
        dl = deadline if deadline is not None else self.deadline(nbytes, until)
        sent = False  # set by the worker thread as it starts the call

        def call() -> T:
            nonlocal sent
            sent = True
            return self.sync.call(what, fn)

        started = time.monotonic()
        outcome = "ok"
        try:
            with trio.CancelScope(shield=True, deadline=dl.at) as scope:
                dl.scope = scope
                result = await trio.to_thread.run_sync(call, limiter=self.limiter, abandon_on_cancel=True)
            if scope.cancelled_caught:
                took = dl.at - dl.start
                if not sent:
                    raise DeadlineMissed(
                        f"{what}: no S3 worker thread free within {took:.1f} s (s3_deadline)"
                    )
                raise DeadlineMissed(f"{what}: no answer from S3 within {took:.1f} s (s3_deadline)")
        except DeadlineMissed as e:
            outcome = "deadline"
            if sent:
                self.breaker.unreachable(str(e))
            raise
        except Unreachable as e:
            outcome = "unreachable"
            self.breaker.unreachable(str(e))
            raise
        except S3Error as e:
            outcome = outcome_of(e)
            if s3_answered(e):
                self.breaker.answered(what)
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            if trial:
                self.breaker.trial_done()
            self.metrics.s3_request(op, outcome, time.monotonic() - started)
        self.breaker.answered(what)
        return result

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The breaker's probe, until cancelled: start it with `nursery.start(s3.run)`. While the
        circuit is open, a LIST of one key every PROBE_EVERY s closes it once S3 answers. Its thread
        and client are its own (one attempt, timeouts of PROBE_DEADLINE), so it never waits behind
        the abandoned calls that hold the main limiter, and never leaves many threads behind."""
        limiter = trio.CapacityLimiter(1)
        opts = replace(
            self.opts,
            connect_timeout=min(self.opts.connect_timeout, PROBE_DEADLINE),
            read_timeout=PROBE_DEADLINE,
            max_attempts=1,
            max_pool_connections=1,
        )
        client: S3Client | None = None
        self.breaker.probing = True
        try:
            task_status.started()
            while True:
                await self.breaker.wait_open()
                await trio.sleep(PROBE_EVERY)
                if not self.breaker.is_open:
                    continue
                if client is None:
                    client = await trio.to_thread.run_sync(make_client, opts, limiter=limiter)
                if await self._probe(client, limiter):
                    self.breaker.answered("probe")
        finally:
            self.breaker.probing = False

    async def _probe(self, client: S3Client, limiter: trio.CapacityLimiter) -> bool:
        """Does S3 answer a LIST of one key within PROBE_DEADLINE (an error answer counts)?"""

        def ask() -> bool:
            try:
                client.list_objects_v2(Bucket=self.bucket, Prefix=self.opts.prefix, MaxKeys=1)
            except botocore.exceptions.ClientError:
                return True
            except (botocore.exceptions.BotoCoreError, OSError):
                return False
            return True

        with trio.move_on_after(PROBE_DEADLINE):
            return await trio.to_thread.run_sync(ask, limiter=limiter, abandon_on_cancel=True)
        return False

    def etag_is_md5_of(self, etag: str, md5_hex: str) -> bool | None:
        return self.sync.etag_is_md5_of(etag, md5_hex)

    # -- metadata -----------------------------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo | None:
        r = await self._run(f"HEAD {key}", functools.partial(self.sync.head_object, key))
        return None if r is None else info_of_head(key, r)

    async def has_prefix(self, prefix: str) -> bool:
        """Is there at least one object under `prefix` (a directory implied by keys)?"""

        def fn() -> bool:
            r = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
            return bool(r.get("KeyCount", 0) or r.get("Contents") or r.get("CommonPrefixes"))

        return await self._run(f"LIST {prefix}", fn)

    async def list_pages(
        self, prefix: str, delimiter: str | None = None, page_size: int = 1000
    ) -> AsyncIterator[tuple[list[ObjectInfo], list[str]]]:
        """Yield (objects, common prefixes) one page (up to page_size keys) at a time, never all at
        once. A smaller page is parsed in shorter steps: botocore's XML parsing, in the worker
        thread, competes with the event loop for the interpreter lock."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": page_size}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            objs, prefixes, token = await self._run(
                f"LIST {prefix}", functools.partial(self._list_page, kwargs)
            )
            yield objs, prefixes
            if not token:
                return

    def _list_page(self, kwargs: dict[str, Any]) -> tuple[list[ObjectInfo], list[str], str | None]:
        """Worker thread: one LIST page, turned into our records here rather than on the event loop
        (a thousand keys and their dates take milliseconds of Python)."""
        page = self.client.list_objects_v2(**kwargs)
        objs = [
            ObjectInfo(o["Key"], int(o.get("Size", 0)), o.get("ETag", ""), mtime_ns_of(dict(o)))
            for o in page.get("Contents", [])
        ]
        prefixes = [p["Prefix"] for p in page.get("CommonPrefixes", []) if "Prefix" in p]
        token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        return objs, prefixes, token or None

    # -- data ---------------------------------------------------------------------------------------

    async def put_file(
        self, key: str, path: str, head: Head | None = None, expect_md5: str | None = None
    ) -> ObjectInfo:
        """Upload the file at `path` to `key`; returns once S3 holds the complete object.

        Below the multipart threshold: one PUT with Content-MD5 (`head`, if given: the MD5 of the
        file's first bytes, taken as they were written, so that only the rest is hashed here; see
        SyncS3.put_single). Above: a multipart upload whose parts each carry Content-MD5; any failure
        aborts it, so no partial object can ever become visible. Either way the whole upload has one
        deadline, for the file's size (the abort after a failure is outside it).

        expect_md5: the MD5 the caller checked the file to have (a queued upload: its cached copy
        may change under it only by damage or tampering). Nothing else is stored: the upload fails
        with IntegrityError if the bytes sent are not those.
        """
        size = os.stat(path).st_size
        if not self.sync.is_multipart(size):
            put = functools.partial(self.sync.put_single, key, path, head, expect_md5)
            info = await self._run(f"PUT {key}", put, size)
            self.metrics.s3_sent_bytes.inc(info.size)
            return info
        return await self._put_multipart(key, path, size, expect_md5)

    async def _put_multipart(self, key: str, path: str, size: int, expect_md5: str | None) -> ObjectInfo:
        mpu = MultipartUpload(self, key, until=self.deadline(size).at)
        await mpu.start()
        whole: list[str] = []
        digests: list[bytes] = []

        async def hash_task() -> None:
            # The parts are hashed one by one for Content-MD5; the cache wants the whole file's MD5.
            if expect_md5 is None:
                whole.append(await trio.to_thread.run_sync(md5_file, path, limiter=self.limiter))
                return
            # Checked: this pass's MD5 is the expected one, and every part sent is the bytes this
            # pass read (the parts read the file again, each on its own).
            md5, parts = await trio.to_thread.run_sync(
                md5_and_part_digests, path, size, self.opts.multipart_chunksize, limiter=self.limiter
            )
            whole.append(md5)
            digests.extend(parts)

        try:
            with first_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hash_task)
                    for number, offset, length in parts_of(size, self.opts.multipart_chunksize):
                        nursery.start_soon(mpu.upload_part, number, path, offset, length)
            if expect_md5 is not None and (
                whole[0] != expect_md5 or [mpu.parts[n + 1].md5 for n in range(len(digests))] != digests
            ):
                raise IntegrityError(
                    f"PUT {key}: the file changed since it was checked (MD5 {whole[0]}, expected"
                    f" {expect_md5}); the upload is aborted"
                )
            etag = await mpu.complete()
        except BaseException:
            await mpu.abort()
            raise
        return ObjectInfo(key, size, etag, 0, whole[0])

    async def get_range(
        self,
        key: str,
        fd: int,
        start: int,
        end: int | None,
        progress: Callable[[int], None],
        if_match: str | None = None,
        size: int | None = None,
    ) -> RangeResult:
        """GET bytes [start, end] (end inclusive; None: the whole object, with no Range header) of
        `key` into `fd` at the same offsets, calling `progress(bytes so far)` in the event loop as
        chunks land, so that readers can be served before the download ends. The worker thread only
        queues those calls (it never waits for the event loop, which is busy serving the readers);
        the last one is made before this returns.

        With `if_match`, S3 refuses (412) if the object is no longer that version: the parts of one
        download never mix two versions of an object. `size`: what the index (and so the kernel)
        says that version's size is; an answer of another size raises Changed (the refresh it leads
        to learns the size S3 gives), before any byte is written, as does an answer to a ranged GET
        that is not exactly the range asked for (a server may answer 200 and the whole object).

        The deadline is for the range's size; a GET of the whole object learns it from the answer.
        A thread abandoned at the deadline writes only into its own dup of `fd` (the caller closes
        `fd` when this returns, and its number may then name another file) and reports no progress.
        """

        token = trio.lowlevel.current_trio_token()
        got = 0
        gone = False  # this call has returned: the thread, if still running, is abandoned
        handoff = threading.Lock()  # orders the thread's dup of fd before `gone`
        dl = self.deadline(0 if end is None else end - start + 1)
        log.debug("GET %s bytes=%s-%s", key, start, "" if end is None else end)

        def report(n: int) -> None:
            if not gone:
                progress(n)

        def sized(n: int) -> None:
            if not gone:
                dl.moves(n)

        def fn() -> RangeResult:
            with handoff:
                if gone:
                    raise Unavailable(f"GET {key}: abandoned before it started")
                wfd = os.dup(fd)
            try:
                return transfer(wfd)
            finally:
                os.close(wfd)

        def transfer(wfd: int) -> RangeResult:
            nonlocal got
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, **self.sync.sse}
            if end is not None:
                kwargs["Range"] = f"bytes={start}-{end}"
            if if_match:
                kwargs["IfMatch"] = if_match
            r = self.client.get_object(**kwargs)
            length = int(r["ContentLength"])
            if end is None:
                token.run_sync_soon(sized, length)
            content_range = r.get("ContentRange")  # "bytes 0-8388607/20971520"
            total = int(content_range.rsplit("/", 1)[1]) if content_range else length
            if size is not None and total != size:
                raise Changed(f"GET {key}: the object has {total} bytes, the index said {size}")
            if end is not None and (
                not content_range
                or content_range.split("/", 1)[0].strip() != f"bytes {start}-{min(end, total - 1)}"
                or length != min(end, total - 1) - start + 1
            ):
                raise IntegrityError(
                    f"GET {key}: asked for bytes {start}-{end}, got {length} bytes"
                    f" ({content_range or 'no Content-Range'})"
                )
            md5 = hashlib.md5() if end is None else None
            body = r["Body"]
            # Small first chunks get the first bytes to a waiting reader sooner (the kernel's first
            # read of a file asks for 128 KiB).
            while chunk := body.read(_FIRST_CHUNK if got < 2 * _FIRST_CHUNK else _STREAM_CHUNK):
                if gone:
                    raise Unavailable(f"GET {key}: abandoned at its deadline")
                view = memoryview(chunk)
                while view:
                    try:
                        n = os.pwrite(wfd, view, start + got)
                    except OSError as err:
                        raise LocalWriteError(err) from err
                    view = view[n:]
                    got += n
                if got < length:
                    # Readers first, then the hash (hashing first made them wait 0.3-0.4 ms per
                    # chunk). Queued, not awaited: run_sync_soon keeps the order, and the thread's
                    # result is delivered after every call queued before it. The last chunk waits
                    # for the check below, so that no reader gets to the end of a file whose bytes
                    # do not match its ETag.
                    token.run_sync_soon(report, got)
                if md5 is not None:
                    md5.update(chunk)
            if got != length:
                raise IntegrityError(f"GET {key}: got {got} bytes, S3 said {length}")
            etag = r.get("ETag", "")
            digest = md5.hexdigest() if md5 is not None else None
            if digest is not None:
                # A whole object: checked here, in the thread, so that the readers of its end are
                # woken now rather than once this result has made its way back to the event loop
                # and through the download's own checks (1 ms for a cold image here). The
                # download checks it again (and a ranged GET is checked there only).
                if self.etag_is_md5_of(etag, digest) is False:
                    raise IntegrityError(f"GET {key}: MD5 {digest} does not match ETag {etag}")
                token.run_sync_soon(report, got)
            return RangeResult(total, etag, mtime_ns_of(dict(r)), digest)

        try:
            return await self._run(f"GET {key}", fn, deadline=dl)
        finally:
            with handoff:
                gone = True
            progress(got)  # the bytes that landed, also when the GET failed part way
            self.metrics.s3_received_bytes.inc(got)

    async def get_bytes(self, key: str, start: int, size: int, if_match: str) -> bytes:
        """GET bytes [start, start + size) of that version of `key` into memory (size is bounded by
        the caller: one FUSE read). For reads that the cache disk has no room for."""

        def fn() -> bytes:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, **self.sync.sse}
            kwargs["Range"] = f"bytes={start}-{start + size - 1}"
            kwargs["IfMatch"] = if_match
            r = self.client.get_object(**kwargs)
            data: bytes = r["Body"].read()
            if len(data) != int(r["ContentLength"]):
                raise IntegrityError(f"GET {key}: got {len(data)} bytes, S3 said {r['ContentLength']}")
            return data

        data = await self._run(f"GET {key}", fn, size)
        self.metrics.s3_received_bytes.inc(len(data))
        return data

    async def delete(self, key: str) -> None:
        await self._run(f"DELETE {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    async def copy(self, src: str, dst: str, size: int = 0) -> ObjectInfo:
        """Server-side copy (boto3's managed copy switches to multipart copy above 5 GB). `size`, the
        object's if the caller knows it, gives the copy more time (it moves that many bytes)."""
        sse = self.sync.sse
        extra = self.sync.extra_put_args()
        if sse:
            extra["CopySourceSSECustomerKey"] = sse["SSECustomerKey"]
            extra["CopySourceSSECustomerAlgorithm"] = sse["SSECustomerAlgorithm"]

        def fn() -> ObjectInfo:
            self.client.copy({"Bucket": self.bucket, "Key": src}, self.bucket, dst, ExtraArgs=extra or None)
            r = self.sync.head_object(dst)
            if r is None:
                raise NotFound(f"COPY {src} -> {dst}: no object after the copy")
            return info_of_head(dst, r)

        return await self._run(f"COPY {src} -> {dst}", fn, size)
