"""boto3 behind trio worker threads: one client, one CapacityLimiter, errors turned into our own types.

Two layers. `SyncS3` holds the blocking calls (PUT, the multipart steps, HEAD, the access check) and the
rules around them (Content-MD5, SSE-C, storage class, error translation); `s3cachefs import` calls it
from its own thread pool. `S3`, the mount's, runs those same calls, and its own GETs and LISTs, through
`trio.to_thread.run_sync(..., limiter=self.limiter)`; the functions that run in threads touch no shared
state (boto3 clients are thread-safe). Retries and timeouts are
botocore's ("standard" mode, bounded attempts, connect/read timeouts), so a dead endpoint turns into
`Unavailable` after a bounded time instead of hanging a FUSE request forever.

That bound is not enough on its own: Synapse closes files on its one reactor thread, and with the
defaults a hung S3 held each close() for 30 to 120 s (four attempts of a 30 s read timeout). So every
call of the mount's `S3` also has a deadline (s3_deadline, 10 s, plus DEADLINE_PER_MIB per MiB it
moves), whatever the timeouts and retries say; see S3._run for where it applies. A call that misses it
raises `DeadlineMissed` (an Unavailable) and its worker thread is abandoned, still holding its
limiter slot until boto3 gives up; and a `Breaker` then fails every call at once until S3 answers
again, so that abandoned threads cannot pile up and fill the limiter.

Integrity: every PUT and every multipart part carries Content-MD5, so the server rejects a body that
was damaged on the way; every GET is checked against the object's length and, where the ETag is a
plain MD5 (single-part, no SSE-C), against its MD5 before the caller may treat it as complete.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, BinaryIO, ParamSpec, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.handlers
import trio

from .config import S3Options
from .metrics import Metrics

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

_READ_CHUNK = 1024 * 1024
# PUT bodies up to this size are sent from memory (the size of a default multipart part).
_IN_MEMORY_BODY = 8 * 1024 * 1024
# Downloads report progress every chunk: small enough for a quick first byte, large enough that the
# hop back into the event loop costs little.
_STREAM_CHUNK = 256 * 1024
_FIRST_CHUNK = 64 * 1024
_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
# The most parts S3 accepts in one multipart upload.
MAX_PARTS = 10_000
_MiB = 1024 * 1024
# One S3 operation may take s3_deadline plus this per MiB it moves: 1 MiB/s is slower than any link a
# media store should sit on, so only a hung or unreachable S3 misses it.
DEADLINE_PER_MIB = 1.0
# While the circuit is open, the probe (S3.run) asks S3 this often, each time for at most
# PROBE_DEADLINE: S3 coming back is noticed within about a second, for one small LIST a second.
PROBE_EVERY = 1.0
PROBE_DEADLINE = 3.0
# Without the probe, the first call this long after the circuit opened (or after the last trial
# failed) is let through as a trial; while S3 is still hung, that caller waits a whole deadline.
HALF_OPEN_AFTER = PROBE_EVERY


class S3Error(Exception):
    """Any failure talking to S3 that is not one of the more precise subclasses."""


class NotFound(S3Error):
    pass


class NoSuchBucket(S3Error):
    pass


class AccessDenied(S3Error):
    pass


class Unavailable(S3Error):
    """Could not reach S3, or it kept failing (timeouts, refused connections, 5xx) after retries."""


class Unreachable(Unavailable):
    """No connection to S3 could be made (refused, connect timeout, DNS): opens the circuit."""


class DeadlineMissed(Unavailable):
    """The operation did not finish within its deadline (s3_deadline): S3 did not answer in time
    (which opens the circuit), or no worker thread came free in time (which does not)."""


class CircuitOpen(Unavailable):
    """Not sent: S3 stopped answering a moment ago and has not answered since (see Breaker)."""


class LocalWriteError(S3Error):
    """Writing what S3 sent to the local file failed (e.g. ENOSPC on the cache disk): not S3's fault."""

    def __init__(self, err: OSError):
        super().__init__(f"writing to the cache: {err.strerror or err}")
        self.errno = err.errno


class IntegrityError(S3Error):
    """What arrived does not match what S3 says the object is (or the server rejected our digest)."""


class Changed(S3Error):
    """412: the object is no longer the version asked for (If-Match): it was replaced (or deleted
    and written again) behind our back, so what the index says about it is out of date."""


@dataclass(frozen=True)
class RangeResult:
    total: int  # size of the whole object
    etag: str
    mtime_ns: int
    md5: str | None  # of the bytes received, when the whole object came in one response


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    mtime_ns: int
    md5: str | None = None  # hex MD5 of the bytes we sent or received, when we computed it


def translate_error(e: Exception, what: str) -> S3Error:
    """A botocore (or socket) failure of the call described by `what` -> one of our error types; our own
    errors pass through; anything else is a bug and is raised as it is."""
    if isinstance(e, S3Error):
        return e
    if isinstance(e, botocore.exceptions.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        msg = f"{what}: {code or status} {err.get('Message', '')}".strip()
        if code == "NoSuchBucket":
            return NoSuchBucket(msg)
        if code in ("404", "NoSuchKey", "NotFound") or status == 404:
            return NotFound(msg)
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return AccessDenied(msg)
        if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
            return IntegrityError(msg)
        if code == "PreconditionFailed" or status == 412:
            return Changed(msg)
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
            return Unavailable(msg)
        return S3Error(msg)
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return AccessDenied(f"{what}: no credentials found (config file or AWS_* environment)")
    if isinstance(e, botocore.exceptions.ConnectionError):
        # Refused, connect timeout, DNS failure, proxy unreachable (botocore's ConnectionError is
        # the parent of EndpointConnectionError and ConnectTimeoutError): no request reached S3.
        return Unreachable(f"{what}: {e}")
    if isinstance(e, botocore.exceptions.BotoCoreError | OSError):
        # Connection refused, DNS failure, connect/read timeouts, connection reset: after botocore's
        # own retries these all mean "S3 is not reachable right now".
        return Unavailable(f"{what}: {e}")
    raise e


def _mtime_ns(obj: dict[str, Any]) -> int:
    lm = obj.get("LastModified")
    return int(lm.timestamp() * 1e9) if lm is not None else 0


def _info(key: str, head: HeadObjectOutputTypeDef) -> ObjectInfo:
    return ObjectInfo(key, int(head["ContentLength"]), head.get("ETag", ""), _mtime_ns(dict(head)))


def s3_answered(e: BaseException) -> bool:
    """Did S3 itself answer with this error (an HTTP response), rather than not answer at all?"""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, botocore.exceptions.ClientError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__
    return False


def _outcome(e: S3Error) -> str:
    """The `outcome` label of a failed S3 request (s3cachefs_s3_requests_total)."""
    for cls, name in (
        (NotFound, "not_found"),
        (AccessDenied, "denied"),
        (IntegrityError, "integrity"),
        (LocalWriteError, "local_write"),
        (Unavailable, "unavailable"),
    ):
        if isinstance(e, cls):
            return name
    return "error"


@contextlib.contextmanager
def first_error() -> Iterator[None]:
    """Around a nursery of parallel parts: their failures arrive as an exception group, but the
    caller handles (and maps to an errno) one error. Cancellation and the like keep the group."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        pending: list[BaseException] = [group]
        while pending:
            e = pending.pop()
            if isinstance(e, BaseExceptionGroup):
                pending.extend(e.exceptions)
            else:
                leaves.append(e)
        if not leaves or not all(isinstance(e, Exception) for e in leaves):
            raise
        raise leaves[0] from group


def md5_file(path: str) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            md5.update(chunk)
    return md5.hexdigest()


def md5_fd(fd: int) -> str:
    md5 = hashlib.md5()
    off = 0
    while chunk := os.pread(fd, _READ_CHUNK, off):
        md5.update(chunk)
        off += len(chunk)
    return md5.hexdigest()


def md5_of_etag(etag: str) -> str | None:
    """The MD5 (lower-case hex) that a plain ETag is, or None for any other ETag (a multipart upload's)."""
    m = _MD5_ETAG.match(etag)
    return m.group(1).lower() if m else None


def multipart_etag(part_md5s: Iterable[bytes]) -> str:
    """The ETag S3 gives a multipart upload whose parts have these MD5 digests: md5(the digests)-N."""
    digests = list(part_md5s)
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def multipart_etag_of_file(path: str, part_size: int) -> str:
    """The ETag S3 gives a multipart upload of this file in parts of `part_size`."""
    digests = []
    with open(path, "rb") as f:
        while True:
            part = hashlib.md5()
            left = part_size
            while left and (chunk := f.read(min(_READ_CHUNK, left))):
                part.update(chunk)
                left -= len(chunk)
            if left == part_size:
                break
            digests.append(part.digest())
    return multipart_etag(digests)


def parts_of(size: int, part_size: int) -> Iterator[tuple[int, int, int]]:
    """(part number, offset, length) of each part of a multipart upload of `size` bytes. The part size
    is doubled until the file needs at most MAX_PARTS parts, the most S3 accepts in one upload."""
    while (size + part_size - 1) // part_size > MAX_PARTS:
        part_size *= 2
    for offset in range(0, size, part_size):
        yield offset // part_size + 1, offset, min(part_size, size - offset)


def make_client(opts: S3Options) -> S3Client:
    cfg = botocore.config.Config(
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        retries={"mode": "standard", "total_max_attempts": opts.max_attempts},
        max_pool_connections=opts.pool_connections,
        # Content-MD5 is our integrity check on PUT; the newer flexible checksums are not implemented
        # by every S3 server (Garage, older MinIO/Ceph), so send them only when an operation needs one.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(
        aws_access_key_id=opts.access_key_id,
        aws_secret_access_key=opts.secret_access_key,
        aws_session_token=opts.session_token,
        region_name=opts.region_name,
    )
    # verify: TLS certificates are always checked; a private CA is added with ca_bundle, never by
    # turning verification off.
    client = session.client("s3", endpoint_url=opts.endpoint_url, config=cfg, verify=opts.ca_bundle or True)
    # botocore sends `Expect: 100-continue` with every file-object body and waits for the server's
    # interim answer before sending it: one more round trip on every close(), measured at about a
    # third of a small file's close() latency. The bodies are ours, bounded, and carry Content-MD5.
    client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
    return client


@dataclass(frozen=True)
class Part:
    """One uploaded part of a multipart upload."""

    number: int
    etag: str  # as S3 answered, for CompleteMultipartUpload
    md5: bytes  # digest of the bytes sent, for the upload's ETag (multipart_etag)


class SyncS3:
    """The blocking S3 calls, in one copy for both users: the mount's `S3` runs them in trio worker
    threads, `s3cachefs import` in its own thread pool. They touch no state but the client (boto3 clients
    are thread-safe), so any thread may call them, several at a time. Failures of S3 leave as our
    S3Error types; failures of the local file (opening, reading) stay OSError, which is the caller's to
    report (they are not S3's fault).
    """

    def __init__(self, opts: S3Options, client: S3Client | None = None):
        self.opts = opts
        self.bucket = opts.bucket
        self.client = client if client is not None else make_client(opts)
        # SSE-C: every request that reads or writes an object's data must carry the key. (Any: the
        # values go to boto3 as keyword arguments.)
        self.sse: dict[str, Any] = {}
        if opts.sse_customer_key:
            self.sse = {
                "SSECustomerKey": opts.sse_customer_key,
                "SSECustomerAlgorithm": opts.sse_customer_algo,
            }

    def call(self, what: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn(*args, **kwargs), its failures translated (translate_error) with `what` in the message."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise translate_error(e, what) from e

    def check_access(self) -> str:
        """Before any real work: the bucket exists and we may list and read it. Returns the server's
        `Server` header ("" if none), for warnings about known server bugs."""
        what = f"bucket {self.bucket}"
        try:
            r = self.call(what, self.client.head_bucket, Bucket=self.bucket)
            self.call(
                what, self.client.list_objects_v2, Bucket=self.bucket, Prefix=self.opts.prefix, MaxKeys=1
            )
        except NotFound as e:
            raise NoSuchBucket(f"bucket {self.bucket}: does not exist") from e
        return str(r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("server", ""))

    def is_multipart(self, size: int) -> bool:
        """Does a file of `size` bytes go up as a multipart upload (else one PUT)?"""
        return size >= self.opts.multipart_threshold

    def extra_put_args(self) -> dict[str, Any]:
        """What every object we create carries besides its bytes: the SSE-C key, the storage class."""
        args: dict[str, Any] = dict(self.sse)
        if self.opts.storage_class != "STANDARD":
            args["StorageClass"] = self.opts.storage_class
        return args

    def etag_is_md5_of(self, etag: str, md5_hex: str) -> bool | None:
        """True/False if the ETag is a plain MD5 we can compare with; None if it is not one (a
        multipart upload's ETag, or any object under SSE-C)."""
        md5 = md5_of_etag(etag)
        if md5 is None or self.sse:
            return None
        return md5 == md5_hex

    # -- reading ------------------------------------------------------------------------------------

    def head_object(self, key: str, part_number: int | None = None) -> HeadObjectOutputTypeDef | None:
        """HEAD `key` (with `part_number`: that part's size as ContentLength); None if there is no such object."""
        kwargs: dict[str, Any] = dict(self.sse)
        if part_number is not None:
            kwargs["PartNumber"] = part_number
        try:
            return self.call(f"HEAD {key}", self.client.head_object, Bucket=self.bucket, Key=key, **kwargs)
        except NotFound:
            return None

    def md5_of_object(self, key: str) -> str:
        """Read the whole object and return its MD5: the check where the ETag is not a checksum."""
        what = f"GET {key}"
        body = self.call(what, self.client.get_object, Bucket=self.bucket, Key=key, **self.sse)["Body"]
        md5 = hashlib.md5()
        while chunk := self.call(what, body.read, _READ_CHUNK):
            md5.update(chunk)
        return md5.hexdigest()

    # -- writing ------------------------------------------------------------------------------------

    def put_single(self, key: str, path: str) -> ObjectInfo:
        """One PUT of the file at `path` with its Content-MD5 (for files below the multipart threshold)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= _IN_MEMORY_BODY:
                # One read, one hash, one sendall: a file body would go out in http.client's 8 KiB
                # read+send steps (a third of a small close()'s CPU). Memory stays bounded as for a
                # multipart part: one body per worker thread, at most _IN_MEMORY_BODY each.
                data = f.read()
                size = len(data)
                md5 = hashlib.md5(data)
                body: bytes | BinaryIO = data
            else:
                md5 = hashlib.md5()
                size = 0
                while chunk := f.read(_READ_CHUNK):
                    md5.update(chunk)
                    size += len(chunk)
                f.seek(0)
                body = f
            # botocore rewinds a seekable body before each retry, so retries resend the same bytes.
            r = self.call(
                f"PUT {key}",
                self.client.put_object,
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentLength=size,
                ContentMD5=base64.b64encode(md5.digest()).decode(),
                **self.extra_put_args(),
            )
        return ObjectInfo(key, size, r.get("ETag", '"' + md5.hexdigest() + '"'), 0, md5.hexdigest())

    def create_multipart(self, key: str) -> str:
        """Start a multipart upload of `key`; returns its upload id. Until complete_multipart() the
        object does not exist; abort_multipart() makes sure it never will."""
        r = self.call(
            f"CreateMultipartUpload {key}",
            self.client.create_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            **self.extra_put_args(),
        )
        return r["UploadId"]

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Part:
        """Send one part with its Content-MD5, so the server rejects a body damaged on the way."""
        digest = hashlib.md5(data).digest()
        r = self.call(
            f"UploadPart {key} #{number}",
            self.client.upload_part,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ContentMD5=base64.b64encode(digest).decode(),
            **self.sse,
        )
        return Part(number, r["ETag"], digest)

    def complete_multipart(self, key: str, upload_id: str, parts: Iterable[Part]) -> str:
        """Make the object out of `parts` (in any order); returns the ETag S3 gives it."""
        done = self.call(
            f"CompleteMultipartUpload {key}",
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={
                "Parts": [
                    {"ETag": p.etag, "PartNumber": p.number} for p in sorted(parts, key=lambda p: p.number)
                ]
            },
        )
        return str(done.get("ETag", ""))

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop the parts uploaded so far. Never raises S3Error: it runs while another error is on its
        way out, and that one is what the caller must see."""
        try:
            self.call(
                f"AbortMultipartUpload {key}",
                self.client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
            )
        except S3Error as e:
            # The parts stay invisible (never a readable object); a bucket lifecycle rule for
            # incomplete uploads reclaims their space.
            # (tests/test_faults.py reads this line from the mount's log: keep the wording.)
            log.warning("could not abort multipart upload of %s: %s", key, e)


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


class Breaker:
    """The circuit breaker in front of S3, so that a hung or unreachable S3 costs one caller a
    deadline and every other caller nothing, and abandoned worker threads cannot fill the limiter.

    closed    every call goes to S3.
    open      entered when a call misses its deadline or cannot connect (refused, connect timeout).
              Every call fails at once with CircuitOpen, before it takes a worker thread. Left when
              S3 answers anything (an error response too: this guards against silence, not errors):
              - the probe, S3.run, asks it every PROBE_EVERY s from a thread and client of its own;
              - without the probe (not started by the composition root), the first call
                HALF_OPEN_AFTER s after the circuit opened or the last trial failed goes to S3 as
                the trial (half-open; the others keep failing at once), and its outcome decides.
              A call that was already on its way when the circuit opened and then gets an answer
              closes it as well.
    Event loop only (no locks); logs once when the circuit opens and once when it closes.
    """

    def __init__(self) -> None:
        self.is_open = False
        self.probing = False  # S3.run is running
        self.opened_at = 0.0
        self.reason = ""
        self._next_trial = 0.0
        self._trial = False
        self._opened = trio.Event()

    def admit(self, what: str) -> bool:
        """Raise CircuitOpen if the call must not go to S3; True if it goes as the half-open trial."""
        if not self.is_open:
            return False
        if not self.probing and not self._trial and trio.current_time() >= self._next_trial:
            self._trial = True
            return True
        raise CircuitOpen(f"{what}: S3 unreachable; circuit open ({self.reason})")

    def trial_done(self) -> None:
        self._trial = False

    def unreachable(self, reason: str) -> None:
        now = trio.current_time()
        self._next_trial = now + HALF_OPEN_AFTER
        if self.is_open:
            return
        self.is_open = True
        self.opened_at = now
        self.reason = reason
        self._opened.set()
        log.warning("S3 unreachable (%s): circuit open, S3 calls fail at once until it answers", reason)

    def answered(self, by: str) -> None:
        if not self.is_open:
            return
        self.is_open = False
        self._opened = trio.Event()
        log.warning(
            "S3 answers again (%s): circuit closed after %.1f s", by, trio.current_time() - self.opened_at
        )

    async def wait_open(self) -> None:
        while not self.is_open:
            await self._opened.wait()


@dataclass
class _Deadline:
    """When one S3 call must be over, on trio's clock: s3_deadline after it started plus
    DEADLINE_PER_MIB per MiB it moves, never later than `until` (the deadline of the operation it is
    part of). A GET learns its size from the response: moves() extends the deadline then."""

    start: float
    base: float
    until: float
    nbytes: int = 0
    scope: trio.CancelScope | None = None

    @property
    def at(self) -> float:
        return min(self.until, self.start + self.base + self.nbytes / _MiB * DEADLINE_PER_MIB)

    def moves(self, nbytes: int) -> None:
        """Event loop only."""
        self.nbytes = nbytes
        if self.scope is not None:
            self.scope.deadline = self.at


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

    def deadline(self, nbytes: int = 0, until: float = math.inf) -> _Deadline:
        """The deadline of a call that starts now and moves `nbytes`."""
        return _Deadline(trio.current_time(), self.opts.deadline, until, nbytes)

    async def _run(
        self,
        what: str,
        fn: Callable[[], T],
        nbytes: int = 0,
        *,
        until: float = math.inf,
        deadline: _Deadline | None = None,
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
            outcome = _outcome(e)
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
        return None if r is None else _info(key, r)

    async def has_prefix(self, prefix: str) -> bool:
        """Is there at least one object under `prefix` (a directory implied by keys)?"""

        def fn() -> bool:
            r = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
            return bool(r.get("KeyCount", 0) or r.get("Contents") or r.get("CommonPrefixes"))

        return await self._run(f"LIST {prefix}", fn)

    async def list_pages(
        self, prefix: str, delimiter: str | None = None
    ) -> AsyncIterator[tuple[list[ObjectInfo], list[str]]]:
        """Yield (objects, common prefixes) one page (up to 1000 keys) at a time, never all at once."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._run(f"LIST {prefix}", functools.partial(self.client.list_objects_v2, **kwargs))
            objs = [
                ObjectInfo(o["Key"], int(o.get("Size", 0)), o.get("ETag", ""), _mtime_ns(dict(o)))
                for o in page.get("Contents", [])
            ]
            prefixes = [p["Prefix"] for p in page.get("CommonPrefixes", []) if "Prefix" in p]
            yield objs, prefixes
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                return

    # -- data ---------------------------------------------------------------------------------------

    async def put_file(self, key: str, path: str) -> ObjectInfo:
        """Upload the file at `path` to `key`; returns once S3 holds the complete object.

        Below the multipart threshold: one PUT with Content-MD5. Above: a multipart upload whose parts
        each carry Content-MD5; any failure aborts it, so no partial object can ever become visible.
        Either way the whole upload has one deadline, for the file's size (the abort after a failure
        is outside it).
        """
        size = os.stat(path).st_size
        if not self.sync.is_multipart(size):
            info = await self._run(f"PUT {key}", functools.partial(self.sync.put_single, key, path), size)
            self.metrics.s3_sent_bytes.inc(info.size)
            return info
        return await self._put_multipart(key, path, size)

    async def _put_multipart(self, key: str, path: str, size: int) -> ObjectInfo:
        mpu = MultipartUpload(self, key, until=self.deadline(size).at)
        await mpu.start()
        whole: list[str] = []

        async def hash_task() -> None:
            # The parts are hashed one by one for Content-MD5; the cache wants the whole file's MD5.
            whole.append(await trio.to_thread.run_sync(md5_file, path, limiter=self.limiter))

        try:
            with first_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hash_task)
                    for number, offset, length in parts_of(size, self.opts.multipart_chunksize):
                        nursery.start_soon(mpu.upload_part, number, path, offset, length)
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
    ) -> RangeResult:
        """GET bytes [start, end] (end inclusive; None: the whole object, with no Range header) of
        `key` into `fd` at the same offsets, calling `progress(bytes so far)` in the event loop as
        chunks land, so that readers can be served before the download ends. The worker thread only
        queues those calls (it never waits for the event loop, which is busy serving the readers);
        the last one is made before this returns.

        With `if_match`, S3 refuses (412) if the object is no longer that version: the parts of one
        download never mix two versions of an object.

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
            md5 = hashlib.md5() if end is None else None
            body = r["Body"]
            # Small first chunks get the first bytes to a waiting reader sooner (the kernel's first
            # read of a file asks for 128 KiB).
            while chunk := body.read(_FIRST_CHUNK if got < 2 * _FIRST_CHUNK else _STREAM_CHUNK):
                if gone:
                    raise Unavailable(f"GET {key}: abandoned at its deadline")
                if md5 is not None:
                    md5.update(chunk)
                view = memoryview(chunk)
                while view:
                    try:
                        n = os.pwrite(wfd, view, start + got)
                    except OSError as err:
                        raise LocalWriteError(err) from err
                    view = view[n:]
                    got += n
                if got < length:
                    # Queued, not awaited: run_sync_soon keeps the order, and the thread's result
                    # is delivered after every call queued before it. The last chunk needs none.
                    token.run_sync_soon(report, got)
            if got != length:
                raise IntegrityError(f"GET {key}: got {got} bytes, S3 said {length}")
            return RangeResult(total, r.get("ETag", ""), _mtime_ns(dict(r)), md5.hexdigest() if md5 else None)

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
            return _info(dst, r)

        return await self._run(f"COPY {src} -> {dst}", fn, size)
