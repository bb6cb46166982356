"""boto3 behind trio worker threads: one client, one CapacityLimiter, errors turned into our own types.

Every blocking call runs through `trio.to_thread.run_sync(..., limiter=self.limiter)`; the functions
that run in threads touch no shared state (boto3 clients are thread-safe). Retries and timeouts are
botocore's ("standard" mode, bounded attempts, connect/read timeouts), so a dead endpoint turns into
`Unavailable` after a bounded time instead of hanging a FUSE request forever.

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
import os
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.handlers
import trio

from .config import S3Options

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
T = TypeVar("T")

_READ_CHUNK = 1024 * 1024
# PUT bodies up to this size are sent from memory (the size of a default multipart part).
_IN_MEMORY_BODY = 8 * 1024 * 1024
# Downloads report progress every chunk: small enough for a quick first byte, large enough that the
# hop back into the event loop costs little.
_STREAM_CHUNK = 256 * 1024
_FIRST_CHUNK = 64 * 1024
_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


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


class LocalWriteError(S3Error):
    """Writing what S3 sent to the local file failed (e.g. ENOSPC on the cache disk): not S3's fault."""

    def __init__(self, err: OSError):
        super().__init__(f"writing to the cache: {err.strerror or err}")
        self.errno = err.errno


class IntegrityError(S3Error):
    """What arrived does not match what S3 says the object is (or the server rejected our digest)."""


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


def _translate(e: Exception, what: str) -> S3Error:
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
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
            return Unavailable(msg)
        return S3Error(msg)
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return AccessDenied(f"{what}: no credentials found (config file or AWS_* environment)")
    if isinstance(e, botocore.exceptions.BotoCoreError | OSError):
        # Connection refused, DNS failure, connect/read timeouts, connection reset: after botocore's
        # own retries these all mean "S3 is not reachable right now".
        return Unavailable(f"{what}: {e}")
    raise e


def _mtime_ns(obj: dict[str, Any]) -> int:
    lm = obj.get("LastModified")
    return int(lm.timestamp() * 1e9) if lm is not None else 0


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


class MultipartUpload:
    """One multipart upload whose parts are ranges of a local file, each sent with its Content-MD5.

    Parts may be uploaded in any order and in parallel (at most 4 at a time per upload, so one large
    file cannot take every worker thread, and with 8 MiB parts it holds at most 32 MiB of memory).
    Until complete() the object does not exist; abort() makes sure it never will.
    """

    PARALLEL_PARTS = 4

    def __init__(self, s3: S3, key: str):
        self.s3 = s3
        self.key = key
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}
        self._limiter = trio.CapacityLimiter(self.PARALLEL_PARTS)

    async def start(self) -> None:
        s3 = self.s3
        created = await s3._run(
            f"CreateMultipartUpload {self.key}",
            lambda: s3.client.create_multipart_upload(Bucket=s3.bucket, Key=self.key, **s3._extra_put_args()),
        )
        self.upload_id = created["UploadId"]

    async def upload_part(self, number: int, path: str, offset: int, length: int) -> None:
        s3, upload_id = self.s3, self.upload_id
        assert upload_id is not None, "start() first"

        def send() -> str:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
            if len(data) != length:
                raise IntegrityError(
                    f"UploadPart {self.key} #{number}: file has {len(data)} of {length} bytes"
                )
            r = s3.client.upload_part(
                Bucket=s3.bucket,
                Key=self.key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode(),
                **s3._sse,  # type: ignore[arg-type]
            )
            return r["ETag"]

        async with self._limiter:
            self.etags[number] = await s3._run(f"UploadPart {self.key} #{number}", send)

    async def complete(self) -> str:
        s3, upload_id = self.s3, self.upload_id
        assert upload_id is not None, "start() first"
        parts = [{"ETag": self.etags[n], "PartNumber": n} for n in sorted(self.etags)]
        done = await s3._run(
            f"CompleteMultipartUpload {self.key}",
            lambda: s3.client.complete_multipart_upload(
                Bucket=s3.bucket,
                Key=self.key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            ),
        )
        return str(done.get("ETag", ""))

    async def abort(self) -> None:
        s3, upload_id = self.s3, self.upload_id
        if upload_id is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await s3._run(
                    f"AbortMultipartUpload {self.key}",
                    lambda: s3.client.abort_multipart_upload(
                        Bucket=s3.bucket, Key=self.key, UploadId=upload_id
                    ),
                )
            except S3Error as e:
                # The parts stay invisible (never a readable object); a bucket lifecycle rule for
                # incomplete uploads reclaims their space.
                log.warning("could not abort multipart upload of %s: %s", self.key, e)


class S3:
    def __init__(self, opts: S3Options, limiter: trio.CapacityLimiter, client: S3Client | None = None):
        self.opts = opts
        self.bucket = opts.bucket
        self.limiter = limiter
        self.client = client if client is not None else make_client(opts)
        self.calls: Counter[str] = Counter()
        self._sse: dict[str, str] = {}
        if opts.sse_customer_key:
            self._sse = {
                "SSECustomerKey": opts.sse_customer_key,
                "SSECustomerAlgorithm": opts.sse_customer_algo,
            }

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        # Counted here, in the event loop, per logical call (botocore's retries are not counted).
        self.calls[what.split(" ", 1)[0]] += 1

        def call() -> T:
            try:
                return fn()
            except Exception as e:
                raise _translate(e, what) from e

        return await trio.to_thread.run_sync(call, limiter=self.limiter)

    # -- checks -------------------------------------------------------------------------------------

    def check_access_sync(self) -> str:
        """Called before mounting (no trio yet): the bucket exists and we may list and read it.
        Returns the server's `Server` header ("" if none), for warnings about known server bugs."""
        try:
            r = self.client.head_bucket(Bucket=self.bucket)
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.opts.prefix, MaxKeys=1)
            return str(r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("server", ""))
        except Exception as e:
            err = _translate(e, f"bucket {self.bucket}")
            if isinstance(err, NotFound):
                err = NoSuchBucket(f"bucket {self.bucket}: does not exist")
            raise err from e

    # -- metadata -----------------------------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo | None:
        def fn() -> ObjectInfo | None:
            try:
                r = self.client.head_object(Bucket=self.bucket, Key=key, **self._sse)  # type: ignore[arg-type]
            except botocore.exceptions.ClientError as e:
                if _translate(e, key).__class__ is NotFound:
                    return None
                raise
            return ObjectInfo(key, int(r["ContentLength"]), r.get("ETag", ""), _mtime_ns(dict(r)))

        return await self._run(f"HEAD {key}", fn)

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
        """
        size = os.stat(path).st_size
        if size < self.opts.multipart_threshold:
            return await self._run(f"PUT {key}", lambda: self._put_single(key, path))
        return await self._put_multipart(key, path, size)

    def _extra_put_args(self) -> dict[str, Any]:
        args: dict[str, Any] = dict(self._sse)
        if self.opts.storage_class != "STANDARD":
            args["StorageClass"] = self.opts.storage_class
        return args

    def _put_single(self, key: str, path: str) -> ObjectInfo:
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
            r = self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentLength=size,
                ContentMD5=base64.b64encode(md5.digest()).decode(),
                **self._extra_put_args(),
            )
        return ObjectInfo(key, size, r.get("ETag", '"' + md5.hexdigest() + '"'), 0, md5.hexdigest())

    async def _put_multipart(self, key: str, path: str, size: int) -> ObjectInfo:
        chunk = self.opts.multipart_chunksize
        # S3 allows at most 10,000 parts: grow the part size for very large files.
        while (size + chunk - 1) // chunk > 10_000:
            chunk *= 2
        mpu = MultipartUpload(self, key)
        await mpu.start()
        whole: list[str] = []

        async def hash_task() -> None:
            # The parts are hashed one by one for Content-MD5; the cache wants the whole file's MD5.
            whole.append(await trio.to_thread.run_sync(md5_file, path, limiter=self.limiter))

        try:
            with first_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hash_task)
                    for i in range((size + chunk - 1) // chunk):
                        nursery.start_soon(
                            mpu.upload_part, i + 1, path, i * chunk, min(chunk, size - i * chunk)
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
    ) -> RangeResult:
        """GET bytes [start, end] (end inclusive; None: the whole object, with no Range header) of
        `key` into `fd` at the same offsets, calling `progress(bytes so far)` in the event loop as
        chunks land, so that readers can be served before the download ends. The worker thread only
        queues those calls (it never waits for the event loop, which is busy serving the readers);
        the last one is made before this returns.

        With `if_match`, S3 refuses (412) if the object is no longer that version: the parts of one
        download never mix two versions of an object.
        """

        token = trio.lowlevel.current_trio_token()
        got = 0
        log.debug("GET %s bytes=%s-%s", key, start, "" if end is None else end)

        def fn() -> RangeResult:
            nonlocal got
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, **self._sse}
            if end is not None:
                kwargs["Range"] = f"bytes={start}-{end}"
            if if_match:
                kwargs["IfMatch"] = if_match
            r = self.client.get_object(**kwargs)
            length = int(r["ContentLength"])
            content_range = r.get("ContentRange")  # "bytes 0-8388607/20971520"
            total = int(content_range.rsplit("/", 1)[1]) if content_range else length
            md5 = hashlib.md5() if end is None else None
            body = r["Body"]
            # Small first chunks get the first bytes to a waiting reader sooner (the kernel's first
            # read of a file asks for 128 KiB).
            while chunk := body.read(_FIRST_CHUNK if got < 2 * _FIRST_CHUNK else _STREAM_CHUNK):
                if md5 is not None:
                    md5.update(chunk)
                view = memoryview(chunk)
                while view:
                    try:
                        n = os.pwrite(fd, view, start + got)
                    except OSError as err:
                        raise LocalWriteError(err) from err
                    view = view[n:]
                    got += n
                if got < length:
                    # Queued, not awaited: run_sync_soon keeps the order, and the thread's result
                    # is delivered after every call queued before it. The last chunk needs none.
                    token.run_sync_soon(progress, got)
            if got != length:
                raise IntegrityError(f"GET {key}: got {got} bytes, S3 said {length}")
            return RangeResult(total, r.get("ETag", ""), _mtime_ns(dict(r)), md5.hexdigest() if md5 else None)

        try:
            return await self._run(f"GET {key}", fn)
        finally:
            progress(got)  # the bytes that landed, also when the GET failed part way

    async def get_bytes(self, key: str, start: int, size: int, if_match: str) -> bytes:
        """GET bytes [start, start + size) of that version of `key` into memory (size is bounded by
        the caller: one FUSE read). For reads that the cache disk has no room for."""

        def fn() -> bytes:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, **self._sse}
            kwargs["Range"] = f"bytes={start}-{start + size - 1}"
            kwargs["IfMatch"] = if_match
            r = self.client.get_object(**kwargs)
            data: bytes = r["Body"].read()
            if len(data) != int(r["ContentLength"]):
                raise IntegrityError(f"GET {key}: got {len(data)} bytes, S3 said {r['ContentLength']}")
            return data

        return await self._run(f"GET {key}", fn)

    def etag_is_md5_of(self, etag: str, md5_hex: str) -> bool | None:
        """True/False if the ETag is a plain MD5 we can compare with; None if it is not one (a
        multipart upload's ETag, or any object under SSE-C)."""
        m = _MD5_ETAG.match(etag)
        if not m or self._sse:
            return None
        return m.group(1).lower() == md5_hex

    async def delete(self, key: str) -> None:
        await self._run(f"DELETE {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    async def copy(self, src: str, dst: str) -> ObjectInfo:
        """Server-side copy (boto3's managed copy switches to multipart copy above 5 GB)."""
        extra = self._extra_put_args()
        if self._sse:
            extra["CopySourceSSECustomerKey"] = self._sse["SSECustomerKey"]
            extra["CopySourceSSECustomerAlgorithm"] = self._sse["SSECustomerAlgorithm"]

        def fn() -> ObjectInfo:
            self.client.copy({"Bucket": self.bucket, "Key": src}, self.bucket, dst, ExtraArgs=extra or None)
            r = self.client.head_object(Bucket=self.bucket, Key=dst, **self._sse)  # type: ignore[arg-type]
            return ObjectInfo(dst, int(r["ContentLength"]), r.get("ETag", ""), _mtime_ns(dict(r)))

        return await self._run(f"COPY {src} -> {dst}", fn)
