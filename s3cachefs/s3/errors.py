"""Our S3 error types, what botocore errors become, and the small result records."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import botocore.config
import botocore.exceptions
import botocore.handlers

if TYPE_CHECKING:
    pass


log = logging.getLogger(__name__)


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


def outcome_of(e: S3Error) -> str:
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
