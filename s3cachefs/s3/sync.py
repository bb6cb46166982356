"""The blocking S3 calls (SyncS3) and the rules around them: Content-MD5, SSE-C, storage class,
multipart part sizes and ETags. `s3cachefs import` calls them from its own threads; the mount, through
client.S3 in trio worker threads."""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, ParamSpec, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.handlers
import botocore.session
import botocore.utils

from ..config import S3Options
from .errors import IntegrityError, NoSuchBucket, NotFound, ObjectInfo, S3Error, translate_error
from .listparse import ParserFactory

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef


log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


_READ_CHUNK = 1024 * 1024
# PUT bodies up to this size are sent from memory (the size of a default multipart part).
_IN_MEMORY_BODY = 8 * 1024 * 1024
_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
# The most parts S3 accepts in one multipart upload.
MAX_PARTS = 10_000


def mtime_ns_of(obj: dict[str, Any]) -> int:
    lm = obj.get("LastModified")
    return int(lm.timestamp() * 1e9) if lm is not None else 0


def info_of_head(key: str, head: HeadObjectOutputTypeDef) -> ObjectInfo:
    return ObjectInfo(key, int(head["ContentLength"]), head.get("ETag", ""), mtime_ns_of(dict(head)))


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
    size = os.stat(path).st_size
    lengths = (min(part_size, size - off) for off in range(0, size, part_size))
    return multipart_etag(_part_digests(path, lengths))


def md5_and_part_digests(path: str, size: int, part_size: int) -> tuple[str, list[bytes]]:
    """The whole file's MD5 (hex) and the MD5 digest of each of its parts as parts_of lays them out,
    in one pass."""
    whole = hashlib.md5()
    digests = _part_digests(path, (length for _, _, length in parts_of(size, part_size)), whole)
    return whole.hexdigest(), digests


def _part_digests(path: str, lengths: Iterable[int], whole: hashlib._Hash | None = None) -> list[bytes]:
    """The MD5 digest of each part of the file, parts of these lengths in order (and `whole`
    updated with every byte read, if given)."""
    digests = []
    with open(path, "rb") as f:
        for length in lengths:
            part = hashlib.md5()
            left = length
            while left and (chunk := f.read(min(_READ_CHUNK, left))):
                if whole is not None:
                    whole.update(chunk)
                part.update(chunk)
                left -= len(chunk)
            digests.append(part.digest())
    return digests


def parts_of(size: int, part_size: int) -> Iterator[tuple[int, int, int]]:
    """(part number, offset, length) of each part of a multipart upload of `size` bytes. The part size
    is doubled until the file needs at most MAX_PARTS parts, the most S3 accepts in one upload."""
    while (size + part_size - 1) // part_size > MAX_PARTS:
        part_size *= 2
    for offset in range(0, size, part_size):
        yield offset // part_size + 1, offset, min(part_size, size - offset)


def parse_timestamp(value: Any) -> datetime.datetime:  # whatever the XML or header held
    """A response's timestamp: ISO 8601 with a zone (LIST's LastModified) by the standard library,
    anything else (an HTTP date in a header, epoch seconds) by botocore's own parser."""
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    result: datetime.datetime = botocore.utils.parse_timestamp(value)
    return result


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
    core = botocore.session.get_session()
    # botocore parses every timestamp of a response with dateutil, ~100-130 us each here: a LIST
    # page of 1,000 keys spent 0.1 s of CPU on LastModified alone (a million objects: two minutes),
    # in a worker thread holding the GIL that the event loop needs. S3 writes them in ISO 8601.
    # LIST pages are read with ElementTree rather than botocore's shape walk (listparse.py).
    parsers = ParserFactory()
    parsers.set_parser_defaults(timestamp_parser=parse_timestamp)
    core.register_component("response_parser_factory", parsers)
    session = boto3.session.Session(
        aws_access_key_id=opts.access_key_id,
        aws_secret_access_key=opts.secret_access_key,
        aws_session_token=opts.session_token,
        region_name=opts.region_name,
        botocore_session=core,
    )
    # verify: TLS certificates are always checked; a private CA is added with ca_bundle, never by
    # turning verification off.
    client = session.client("s3", endpoint_url=opts.endpoint_url, config=cfg, verify=opts.ca_bundle or True)
    # botocore sends `Expect: 100-continue` with every file-object body and waits for the server's
    # interim answer before sending it: one more round trip on every close(), measured at about a
    # third of a small file's close() latency. The bodies are ours, bounded, and carry Content-MD5.
    client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
    return client


# The MD5 of a file's first n bytes and n (SyncS3.put_single).
Head = tuple["hashlib._Hash", int]


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

    def put_single(
        self, key: str, path: str, head: Head | None = None, expect_md5: str | None = None
    ) -> ObjectInfo:
        """One PUT of the file at `path` with its Content-MD5 (for files below the multipart threshold).

        head: (MD5 of the file's first n bytes, n), hashed from the writer's buffers as they were
        written (cache/write.py); only the bytes after them are hashed here. A write out of sequence
        through another descriptor while this runs could make it wrong for the bytes read here: S3
        then refuses the PUT (BadDigest), or, where the ETag is an MD5, answers another one; either
        way the PUT is made again with the whole file hashed here.

        expect_md5: the MD5 the file was checked to have (a queued upload's): bytes read here that
        differ (the file changed since) are not sent, and a body that changes while it is sent does
        not match its Content-MD5, which S3 refuses."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if head is not None and head[1] > size:
                head = None  # truncated since (a truncate stops the hashing, but not a copy taken)
            md5, hashed = head if head is not None else (hashlib.md5(), 0)
            if size <= _IN_MEMORY_BODY:
                # One read, one hash, one sendall: a file body would go out in http.client's 8 KiB
                # read+send steps (a third of a small close()'s CPU). Memory stays bounded as for a
                # multipart part: one body per worker thread, at most _IN_MEMORY_BODY each.
                data = f.read()
                size = len(data)
                md5.update(memoryview(data)[hashed:])
                body: bytes | BinaryIO = data
            else:
                size = hashed
                f.seek(hashed)
                while chunk := f.read(_READ_CHUNK):
                    md5.update(chunk)
                    size += len(chunk)
                f.seek(0)
                body = f
            if expect_md5 is not None and md5.hexdigest() != expect_md5:
                raise IntegrityError(
                    f"PUT {key}: the file changed since it was checked (MD5 {md5.hexdigest()}, expected"
                    f" {expect_md5}); not sent"
                )
            # botocore rewinds a seekable body before each retry, so retries resend the same bytes.
            try:
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
                refused = False
            except IntegrityError:
                if head is None:
                    raise
                refused = True
        etag = "" if refused else r.get("ETag", '"' + md5.hexdigest() + '"')
        # Refused (BadDigest), or taken with another MD5 by a server that does not check it (the
        # object holds the bytes sent, which the MD5 recorded would not match): once more, whole.
        if head is not None and (refused or self.etag_is_md5_of(etag, md5.hexdigest()) is False):
            log.warning(
                "PUT %s: the MD5 taken as the file was written was not its bytes'; hashing it whole", key
            )
            return self.put_single(key, path)
        return ObjectInfo(key, size, etag, 0, md5.hexdigest())

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
