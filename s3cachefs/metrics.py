"""Prometheus metrics: what the mount counts, and the HTTP endpoint that serves them (--metrics-addr).

One `Metrics` object per mount, built by the composition root (mount.py) and handed to the parts
that record (S3, Cache, Operations). Its metrics live in a registry of its own, never prometheus_client's
global one: two mounts in one process (the in-process tests) do not collide, and nothing else that
imports prometheus_client leaks into our endpoint. Without --metrics-addr the parts get a Metrics
whose registry is simply never served, so the code paths are the same either way.

Threads: counters and histograms are recorded in the event loop and read by the HTTP server's own
threads; prometheus_client makes those thread-safe. The gauges (cache size, queues, listing, circuit)
are different: their sources are the index and plain attributes of the event loop's objects, which
the HTTP threads must not touch (SQLite connections are not to be shared, and the accounting changes
between two awaits). So the event loop publishes them as one immutable `Gauges` snapshot, at most
PUBLISH_EVERY old (mount.py), and a scrape reads only that; the queues' ages are computed at scrape
time from the oldest entry's timestamp, so they keep growing even if the event loop is stuck.

The endpoint has no authentication and no TLS: bind it to loopback or a private interface
(docs/metrics.md).
"""

from __future__ import annotations

import errno
import logging
import socket
import socketserver
import threading
import time
from collections import Counter as _Counter
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# How often the event loop publishes the gauges (mount.py).
PUBLISH_EVERY = 1.0

# FUSE requests: a cached open or read is well under a millisecond; a close that uploads, or a cold
# read, can take seconds (the S3 deadline is 10 s plus 1 s per MiB).
FUSE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30
)  # fmt: skip
S3_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# Cache.stats keys -> (counter, label values): see Stats. Keys not listed are in `status` only.
_STAT_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hits": ("hits", ()),
    "misses": ("misses", ()),
    "evictions": ("evictions", ()),
    "evicted_bytes": ("evicted_bytes", ()),
    "uploads": ("uploads", ("sync",)),
    "queued_uploads_sent": ("uploads", ("queued",)),
    "queued_uploads": ("uploads_queued", ()),
    "uploaded_bytes": ("uploaded_bytes", ()),
    "queued_deletes_done": ("deletes", ()),
    "damaged": ("damaged", ()),
    "direct_reads": ("direct_reads", ()),
    "quarantine_removals": ("quarantine_removals", ()),
}


@dataclass(frozen=True)
class Gauges:
    """What the gauges show, published by the event loop (mount.py) and read by scrapes."""

    cached_bytes: int = 0  # CACHED, LOCAL and QUEUED rows: what the cap is compared with
    cached_files: int = 0
    cap_bytes: int = 0
    min_free_bytes: int = 0  # the free-space floor (cache_min_free) in bytes; 0: none
    fs_free_bytes: int = 0  # free on the cache filesystem (for non-root: what the floor is compared with)
    queued_uploads: int = 0
    queued_upload_bytes: int = 0
    oldest_queued_upload_at: float | None = None  # time.time() of the oldest entry
    queued_deletes: int = 0
    oldest_queued_delete_at: float | None = None
    listing_running: bool = False
    listed_objects: int = 0  # by the running listing, or by the last one
    circuit_open: bool = False


class Stats(_Counter[str]):
    """Cache.stats (the counters that `s3cachefs status` shows, saved in the index) whose increases
    also go to the Prometheus counter of the same event: one place counts, so the two never disagree,
    and the modules that count (download.py, write.py, queue.py, states.py) need not know about
    Prometheus."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        super().__init__()

    def __setitem__(self, key: str, value: int) -> None:
        delta = value - self[key]
        super().__setitem__(key, value)
        if delta > 0:
            self._metrics.stat(key, delta)


class _GaugeCollector(Collector):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = self.metrics.gauges  # one read: the snapshot is immutable
        now = time.time()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"s3cachefs_{name}", doc, value=value)

        def age(at: float | None) -> float:
            return max(0.0, now - at) if at is not None else 0.0

        yield gauge(
            "cached_bytes", "Bytes of files in the cache (cached, local-only and queued)", g.cached_bytes
        )
        yield gauge("cached_files", "Files in the cache (cached, local-only and queued)", g.cached_files)
        yield gauge("cache_cap_bytes", "The cache's size cap (--cache-size)", g.cap_bytes)
        yield gauge(
            "cache_min_free_bytes",
            "Free space kept on the cache filesystem (cache_min_free)",
            g.min_free_bytes,
        )
        yield gauge("cache_fs_free_bytes", "Free space on the cache filesystem", g.fs_free_bytes)
        yield gauge("upload_queue_files", "Files whose upload is queued", g.queued_uploads)
        yield gauge("upload_queue_bytes", "Bytes of the files whose upload is queued", g.queued_upload_bytes)
        yield gauge(
            "upload_queue_oldest_age_seconds",
            "Age of the oldest queued upload (0 when none)",
            age(g.oldest_queued_upload_at),
        )
        yield gauge("delete_queue_keys", "S3 keys whose DELETE is queued", g.queued_deletes)
        yield gauge(
            "delete_queue_oldest_age_seconds",
            "Age of the oldest queued DELETE (0 when none)",
            age(g.oldest_queued_delete_at),
        )
        yield gauge("listing_running", "1 while the background listing of the bucket runs", g.listing_running)
        yield gauge(
            "listing_objects",
            "Objects listed by the running background listing, or the last one",
            g.listed_objects,
        )
        yield gauge("s3_circuit_open", "1 while the circuit breaker in front of S3 is open", g.circuit_open)


class Metrics:
    """The mount's metrics, in `registry` (a fresh one, never served, if not given)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.gauges = Gauges()
        self.s3_requests = Counter(
            "s3cachefs_s3_requests",
            "S3 requests by operation and outcome (ok, or the error; refused: not sent, circuit open)",
            ["operation", "outcome"],
            registry=r,
        )
        self.s3_duration = Histogram(
            "s3cachefs_s3_request_duration_seconds",
            "Time of S3 requests sent, botocore's retries and the wait for a worker thread included",
            ["operation"],
            buckets=S3_BUCKETS,
            registry=r,
        )
        self.s3_sent_bytes = Counter(
            "s3cachefs_s3_sent_bytes", "Bytes uploaded to S3 (PUT, UploadPart)", registry=r
        )
        self.s3_received_bytes = Counter(
            "s3cachefs_s3_received_bytes", "Bytes downloaded from S3 (GET)", registry=r
        )
        self.fuse_duration = Histogram(
            "s3cachefs_fuse_request_duration_seconds",
            "Time to answer FUSE requests, by operation",
            ["operation"],
            buckets=FUSE_BUCKETS,
            registry=r,
        )
        self.fuse_errors = Counter(
            "s3cachefs_fuse_errors",
            "FUSE requests answered with an error, by operation and errno",
            ["operation", "errno"],
            registry=r,
        )
        self._stats = {
            "hits": Counter("s3cachefs_cache_hits", "Opens served from a complete cached copy", registry=r),
            "misses": Counter("s3cachefs_cache_misses", "Downloads of files not in the cache", registry=r),
            "evictions": Counter("s3cachefs_evictions", "Cached copies evicted", registry=r),
            "evicted_bytes": Counter("s3cachefs_evicted_bytes", "Bytes of cached copies evicted", registry=r),
            "uploads": Counter(
                "s3cachefs_uploads",
                "Files uploaded: at close() (sync) or from the upload queue (queued)",
                ["mode"],
                registry=r,
            ),
            "uploads_queued": Counter(
                "s3cachefs_uploads_queued", "Files whose upload was queued at close()", registry=r
            ),
            "uploaded_bytes": Counter("s3cachefs_uploaded_bytes", "Bytes of files uploaded", registry=r),
            "deletes": Counter("s3cachefs_deletes", "Queued S3 DELETEs done", registry=r),
            "damaged": Counter(
                "s3cachefs_damaged_copies", "Damaged cached copies found and fetched again", registry=r
            ),
            "quarantine_removals": Counter(
                "s3cachefs_quarantine_removals",
                "Cached copies removed because Synapse quarantined their media",
                registry=r,
            ),
            "direct_reads": Counter(
                "s3cachefs_direct_reads",
                "Reads served by a ranged GET, for lack of room on the cache disk",
                registry=r,
            ),
        }
        r.register(_GaugeCollector(self))

    def stats(self) -> Stats:
        """The Counter for Cache.stats, mirrored into this object's counters."""
        return Stats(self)

    def stat(self, key: str, delta: int) -> None:
        known = _STAT_METRICS.get(key)
        if known is None:
            return
        name, labels = known
        counter = self._stats[name]
        (counter.labels(*labels) if labels else counter).inc(delta)

    def s3_request(self, operation: str, outcome: str, seconds: float | None) -> None:
        """One S3 request done; seconds None: never sent (refused by the open circuit)."""
        self.s3_requests.labels(operation, outcome).inc()
        if seconds is not None:
            self.s3_duration.labels(operation).observe(seconds)

    def fuse_request(self, operation: str, seconds: float, err: int | None) -> None:
        self.fuse_duration.labels(operation).observe(seconds)
        if err is not None:
            self.fuse_errors.labels(operation, errno.errorcode.get(err, str(err))).inc()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        # wsgiref writes a line per request to stderr; a scrape every 15 s is not news.
        log.debug("metrics: " + format, *args)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    # A request in progress must not hold up the daemon's exit.
    daemon_threads = True


class Exporter:
    """The HTTP endpoint: bound at start-up (so a bad or taken address fails the mount before it
    appears), served from a thread of its own once the daemon has forked (threads do not survive
    fork), shut down at unmount."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_Server", (_Server,), {"address_family": family})
        # Binds here; raises OSError (address in use, no such address).
        self.server: _Server = server_class((host, port), _QuietHandler)
        self.server.set_app(make_wsgi_app(metrics.registry))
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
            self._thread = None
        self.server.server_close()
