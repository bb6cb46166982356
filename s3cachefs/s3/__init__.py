"""boto3 behind trio worker threads: one client, one CapacityLimiter, errors turned into our own types.

Modules: errors (our error types, translate_error), sync (SyncS3, the blocking calls and their
rules), breaker (the deadline of one operation, the circuit breaker), client (S3, the mount's, and
MultipartUpload).

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

from .breaker import (
    DEADLINE_PER_MIB,
    HALF_OPEN_AFTER,
    PROBE_DEADLINE,
    PROBE_EVERY,
    Breaker,
)
from .client import (
    S3,
    MultipartUpload,
)
from .errors import (
    AccessDenied,
    Changed,
    CircuitOpen,
    DeadlineMissed,
    IntegrityError,
    LocalWriteError,
    NoSuchBucket,
    NotFound,
    ObjectInfo,
    RangeResult,
    S3Error,
    Unavailable,
    Unreachable,
    first_error,
    s3_answered,
    translate_error,
)
from .sync import (
    MAX_PARTS,
    Part,
    SyncS3,
    make_client,
    md5_fd,
    md5_file,
    md5_of_etag,
    multipart_etag,
    multipart_etag_of_file,
    parts_of,
)

__all__ = [
    "DEADLINE_PER_MIB",
    "HALF_OPEN_AFTER",
    "MAX_PARTS",
    "PROBE_DEADLINE",
    "PROBE_EVERY",
    "S3",
    "AccessDenied",
    "Breaker",
    "Changed",
    "CircuitOpen",
    "DeadlineMissed",
    "IntegrityError",
    "LocalWriteError",
    "MultipartUpload",
    "NoSuchBucket",
    "NotFound",
    "ObjectInfo",
    "Part",
    "RangeResult",
    "S3Error",
    "SyncS3",
    "Unavailable",
    "Unreachable",
    "first_error",
    "make_client",
    "md5_fd",
    "md5_file",
    "md5_of_etag",
    "multipart_etag",
    "multipart_etag_of_file",
    "parts_of",
    "s3_answered",
    "translate_error",
]
