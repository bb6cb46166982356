"""What a homeserver admin sees: Synapse's reactor under media uploads, with S3 RTT ms away (issue
"responsiveness", part 6).

Four media stores (five with --only ...,async), each behind its own real Synapse
(tests/synapse_harness.py: SQLite, loopback), all measured in the same run against one private
SeaweedFS (tests/harness.py S3Server) reached through a latency-injecting proxy on loopback
(LatencyProxy below):

  local      media_store_path is a plain directory (no S3 at all: the floor)
  provider   the same, plus synapse-s3-storage-provider with store_local, store_remote and
             store_synchronous true (the upload request returns once the object is in S3)
  floor      media_store_path is bench/pyfuse3_s3_floor.py: the thinnest write-through S3 filesystem
             in pyfuse3 + trio + boto3 (one PUT in close(), one GET in open(), no disk, no index, no
             checks; its own bucket, listed once at mount). Not a contender: what any filesystem in
             this stack pays through Synapse, measured in the same run (the floor under s3cachefs)
  s3cachefs  media_store_path is an s3cachefs mount of this checkout (synchronous write-through)
  async      the same, with `upload = "async"` for local_content/ as well as the thumbnails (the
             default policies otherwise): originals queued on the cache disk and uploaded in the
             background, the trade the README describes. Only with --only; its remount for the cold
             reads is a clean stop, which drains the queue first

For every RTT (--rtt, milliseconds), every round and every store:
  1. uploads: N images (JPEG and PNG of 200-300 KiB made with Pillow, fresh bytes for each upload, so
     Synapse makes ~5 thumbnails of each) and then one 8 MiB file, one after another, while a probe
     sends GET /_matrix/client/versions every 20 ms on a keep-alive connection and records how long
     each answer takes. Synapse runs every filesystem call on its one reactor thread (open, close,
     stat, mkdir; docs/synapse-media-io.md), so this is the latency every other client of the
     homeserver sees while media is uploaded.
  2. a 32 MiB upload (timed, not probed), then thumbnails of the first images (crop 32x32 and scale
     320x240) with the thumbnails still on local disk / in the cache ("warm").
  3. cold reads, --cold-rounds times: make the store cold, then download K images, a thumbnail of each
     and the 32 MiB file, every byte compared, with the probe running again. Cold means: s3cachefs's
     cache directory wiped and the mount remounted (after its background listing finished, so the index
     knows every object: the steady state of an evicted file); provider: Synapse's local media files
     deleted, so it fetches from S3; local: nothing to do. When run as root the kernel's page cache is
     dropped too (--no-drop-caches to skip), for every store.

The proxy waits RTT/2 before it forwards the first chunk after an idle gap of more than 2 ms, in each
direction, so each request/response exchange costs one RTT and a streaming body is not slowed; it also
counts those waits, which shows how many S3 exchanges each store makes per upload.

Output: one markdown table per RTT (metric x store, with the ratios s3cachefs / provider, floor /
provider and async / provider), printed and written to --output. Figures are medians over rounds
(probe percentiles over all the probe's samples).

    python -m bench.reactor [--rtt 0,30,100] [--quick] [--rounds 2] [--images 30] [--output FILE]

Needs what the Synapse tests need (the `test` extra, /dev/fuse, fusermount3) and
synapse-s3-storage-provider in the same virtualenv. Exit status 0 means the benchmark ran, whatever
the figures; any error or wrong byte ends it with a traceback and non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from PIL import Image

from bench.report import steal_seconds
from bench.workdir import run_dir
from s3cachefs.config import DEFAULT_POLICIES
from tests.harness import (
    LOOPBACK,
    REPO_ROOT,
    TEST_REGION,
    HarnessError,
    Mount,
    S3Server,
    wait_until,
    weed_binary,
)
from tests.synapse_harness import MatrixClient, SynapseServer

STORES = ("local", "provider", "floor", "s3cachefs", "async")
# Measured unless --only says otherwise; "async" (originals uploaded in the background too) is opt-in.
DEFAULT_STORES = ("local", "provider", "floor", "s3cachefs")
PROBE_PATH = "/_matrix/client/versions"
MIB = 1024 * 1024
LARGE_UPLOAD = 8 * MIB  # uploaded during the probed phase
COLD_LARGE = 32 * MIB  # uploaded after it, read cold


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Latency-injecting TCP proxy
# ---------------------------------------------------------------------------------------------------


class LatencyProxy:
    """A loopback TCP proxy to 127.0.0.1:target_port that makes the S3 server look `rtt` seconds away.

    Each direction of each connection is one thread: it forwards chunks as they come, but when a chunk
    arrives after the direction was idle for more than IDLE_GAP, it first waits rtt/2. A request then
    costs one RTT (rtt/2 out, rtt/2 back), an `Expect: 100-continue` upload two (as with real S3), and
    the chunks of a body that follow each other closely pass without delay. Keep-alive is left alone.

    Bounded: at most MAX_CONNECTIONS connections at once (more are refused by closing them); every
    thread checks the stop flag at least every POLL seconds and close() joins them with a timeout.
    `rtt` may be changed while running; it applies from the next chunk.
    """

    IDLE_GAP = 0.002
    MAX_CONNECTIONS = 256
    POLL = 0.25
    CHUNK = 256 * 1024

    def __init__(self, target_port: int, rtt: float = 0.0) -> None:
        self.target_port = target_port
        self.rtt = rtt
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(self.POLL)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.waits = {"to_server": 0, "to_client": 0}  # delays injected, per direction
        self.refused = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> LatencyProxy:
        self._acceptor.start()
        return self

    def waits_snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.waits)

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for s in conns:
            with contextlib.suppress(OSError):
                s.close()
        self._listener.close()

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                full = len(self._conns) >= 2 * self.MAX_CONNECTIONS
            if full:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(None)  # sends block; receives are preceded by a select with a timeout
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            with self._lock:
                self._conns.update((client, upstream))
                for src, dst, name in ((client, upstream, "to_server"), (upstream, client, "to_client")):
                    t = threading.Thread(
                        target=self._pipe, args=(pair, src, dst, name), name=f"proxy-{name}", daemon=True
                    )
                    self._threads.append(t)
                    t.start()

    def _pipe(self, pair: _Pair, src: socket.socket, dst: socket.socket, name: str) -> None:
        last = time.monotonic()  # when this direction last forwarded something (or the connection began)
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([src], [], [], self.POLL)
                if not ready:
                    continue
                data = src.recv(self.CHUNK)
                if not data:
                    break
                half = self.rtt / 2
                if half > 0 and time.monotonic() - last > self.IDLE_GAP:
                    with self._lock:
                        self.waits[name] += 1
                    if self._stop.wait(half):
                        break
                dst.sendall(data)
                last = time.monotonic()
        except OSError:
            pass
        finally:
            # Pass the end of this direction on (keeps half-closed HTTP exchanges honest); the second
            # direction to finish closes both sockets.
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            if pair.finish():
                with self._lock:
                    self._conns.difference_update((pair.a, pair.b))
                for s in (pair.a, pair.b):
                    with contextlib.suppress(OSError):
                        s.close()


class _Pair:
    """The two sockets of one proxied connection, closed when both directions have ended."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.a, self.b = a, b
        self._left = 2
        self._lock = threading.Lock()

    def finish(self) -> bool:
        with self._lock:
            self._left -= 1
            return self._left == 0


# ---------------------------------------------------------------------------------------------------
# The probe: GET /_matrix/client/versions every 20 ms
# ---------------------------------------------------------------------------------------------------


class Probe:
    """Polls one Synapse every `period` seconds on a keep-alive connection, one request at a time (a
    slow answer delays the next request; no catch-up burst after it), and records each latency.

    Bounded by stop(), by `max_seconds` and by `max_samples`, whichever comes first.
    """

    def __init__(self, port: int, period: float = 0.020, max_seconds: float = 900.0) -> None:
        self.port = port
        self.period = period
        self.max_seconds = max_seconds
        self.max_samples = int(max_seconds / period) + 1
        self.samples: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(40)

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(LOOPBACK, self.port, timeout=30)

    def _run(self) -> None:
        conn = self._connect()
        deadline = time.monotonic() + self.max_seconds
        due = time.monotonic()
        try:
            while (
                not self._stop.is_set()
                and time.monotonic() < deadline
                and len(self.samples) < self.max_samples
            ):
                t0 = time.perf_counter()
                try:
                    conn.request("GET", PROBE_PATH)
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        self.errors += 1
                except (OSError, http.client.HTTPException):
                    self.errors += 1
                    conn.close()
                    conn = self._connect()
                    self._stop.wait(self.period)
                    continue
                self.samples.append(time.perf_counter() - t0)
                due += self.period
                delay = due - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    due = time.monotonic()
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------------------------------


class ProviderSynapse(SynapseServer):
    """A SynapseServer whose homeserver.yaml adds synapse-s3-storage-provider, as its README shows."""

    def __init__(self, data_dir: Path, media_store_path: Path, provider: dict[str, Any]) -> None:
        super().__init__(data_dir, media_store_path)
        self.provider = provider

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["media_storage_providers"] = [
            {
                "module": "s3_storage_provider.S3StorageProviderBackend",
                "store_local": True,
                "store_remote": True,
                "store_synchronous": True,
                "config": self.provider,
            }
        ]
        return cfg


class ProxiedMount(Mount):
    """tests.harness.Mount, but talking to S3 through the proxy."""

    def __init__(
        self, server: S3Server, bucket: str, base: Path, endpoint_url: str, extra_args: Sequence[str] = ()
    ) -> None:
        super().__init__(server, bucket, base / "mnt", base / "cache", base / "mount.log", extra_args)
        self.endpoint_url = endpoint_url

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--endpoint-url") + 1] = self.endpoint_url
        return cmd

    def listings_done(self) -> int:
        """Full listings finished so far (s3cachefs.namespace logs "listed N objects in S s")."""
        return len(re.findall(r"\blisted \d+ objects in ", self.log_text()))


class FloorMount(ProxiedMount):
    """bench/pyfuse3_s3_floor.py on the mount point instead of s3cachefs, through the same proxy. It
    lists its bucket before it mounts, so a mount that is up has finished its listing."""

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "bench.pyfuse3_s3_floor",
            self.bucket, str(self.path), self.endpoint_url, TEST_REGION,
        ]  # fmt: skip

    def listings_done(self) -> int:
        return len(re.findall(r"^listed \d+ objects$", self.log_text(), re.MULTILINE))


@dataclass
class Store:
    name: str
    synapse: SynapseServer
    mount: ProxiedMount | None = None
    client: MatrixClient | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def media_dir(self) -> Path:
        return self.synapse.media_store_path

    def matrix(self) -> MatrixClient:
        assert self.client is not None
        return self.client


def make_stores(base: Path, s3: S3Server, proxy: LatencyProxy) -> list[Store]:
    stores: list[Store] = []
    local_dir = base / "local" / "media"
    local_dir.mkdir(parents=True)
    stores.append(Store("local", SynapseServer(base / "local" / "synapse", local_dir)))

    prov_dir = base / "provider" / "media"
    prov_dir.mkdir(parents=True)
    provider_cfg = {
        "bucket": s3.new_bucket(),
        "endpoint_url": proxy.endpoint_url,
        "region_name": TEST_REGION,
        "access_key_id": s3.access_key,
        "secret_access_key": s3.secret_key,
    }
    stores.append(Store("provider", ProviderSynapse(base / "provider" / "synapse", prov_dir, provider_cfg)))

    floor = FloorMount(s3, s3.new_bucket(), base / "floor", proxy.endpoint_url)
    stores.append(Store("floor", SynapseServer(base / "floor" / "synapse", floor.path), floor))

    mount = ProxiedMount(s3, s3.new_bucket(), base / "s3cachefs", proxy.endpoint_url)
    stores.append(Store("s3cachefs", SynapseServer(base / "s3cachefs" / "synapse", mount.path), mount))

    policy = base / "async" / "policy.toml"
    policy.parent.mkdir(parents=True)
    policy.write_text(async_originals_policies())
    amount = ProxiedMount(s3, s3.new_bucket(), base / "async", proxy.endpoint_url, ["--config", str(policy)])
    stores.append(Store("async", SynapseServer(base / "async" / "synapse", amount.path), amount))
    return stores


def async_originals_policies() -> str:
    """The default [[cache_policy]] tables, with `upload = "async"` for local_content/ too: the trade
    the README describes for admins who accept losing originals with the cache disk before their upload."""
    tables = []
    for p in DEFAULT_POLICIES:
        lines = ["[[cache_policy]]", f'prefix = "{p.prefix}"', f"evict_rank = {p.evict_rank}"]
        if p.local_only:
            lines.append("local_only = true")
        if p.max_age is not None:
            lines.append(f"max_age = {int(p.max_age)}")
        if p.upload_async or p.prefix == "local_content/":
            lines.append('upload = "async"')
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"


def start_store(store: Store) -> None:
    if store.mount is not None:
        before = store.mount.listings_done()
        store.mount.start()
        wait_listing(store.mount, before)
    store.synapse.write_config()
    took = store.synapse.start()
    log(f"{store.name}: Synapse ready in {took:.1f}s on port {store.synapse.port}")
    store.client = MatrixClient(store.synapse, timeout=300)
    store.client.register_admin("admin", "correct horse battery staple")


def wait_listing(mount: ProxiedMount, before: int, timeout: float = 120) -> None:
    """Wait (bounded) for the mount's background listing to finish: its "listed N objects" log line."""
    if not wait_until(lambda: mount.listings_done() > before, timeout, 0.1):
        raise HarnessError(f"s3cachefs listing not done after {timeout:.0f}s\n{mount.log_tail()}")


def stop_store(store: Store) -> None:
    try:
        if store.synapse.running:
            store.synapse.stop()
    finally:
        store.synapse.kill()
        if store.mount is not None:
            forced = store.mount.cleanup()
            if forced:
                log(f"{store.name}: cleanup had to force: {forced}")


class PageCache:
    """sync + echo 1 > /proc/sys/vm/drop_caches, when allowed (root) and wanted."""

    def __init__(self, wanted: bool) -> None:
        self.enabled = wanted and os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)

    def drop(self) -> None:
        if not self.enabled:
            return
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")


def make_cold(store: Store, page_cache: PageCache) -> None:
    """Leave the store as an admin's server is for media not read for a while (see the module doc)."""
    if store.name == "provider":
        for sub in ("local_content", "local_thumbnails"):
            shutil.rmtree(store.media_dir / sub, ignore_errors=True)
    # floor: nothing to do; it keeps no copy and GETs the object at every open()
    elif store.name in ("s3cachefs", "async"):  # a clean stop drains the async store's upload queue
        mount = store.mount
        assert mount is not None
        before = mount.listings_done()
        restart = False
        try:
            mount.unmount(check=True)
        except AssertionError as e:
            if not mount.is_mounted():
                raise
            # Synapse held something open on the mount (EBUSY): restart it around the remount (noted).
            store.notes.append(f"remount needed a Synapse restart ({str(e).splitlines()[0]})")
            store.synapse.stop()
            mount.unmount(check=True)
            restart = True
        mount.wipe_cache()
        mount.start()
        wait_listing(mount, before)
        if restart:
            store.synapse.start()
    page_cache.drop()
    # Code pages dropped with the page cache come back before anything is timed.
    for _ in range(3):
        store.matrix().request("GET", PROBE_PATH, auth=False)


# ---------------------------------------------------------------------------------------------------
# Media
# ---------------------------------------------------------------------------------------------------


@dataclass
class Medium:
    filename: str
    content_type: str
    data: bytes
    media_id: str = ""
    server_name: str = ""
    upload_seconds: float = 0.0

    @property
    def is_image(self) -> bool:
        return self.content_type.startswith("image/")


def make_image(i: int) -> Medium:
    """Even i: a 1024x768 JPEG (~280 KiB); odd i: a 1024x768 PNG (~210 KiB). Blocky noise, so the
    bytes are new every time and the sizes are real; Synapse thumbnails both kinds."""
    w, h, k = 1024, 768, 4
    small = Image.frombytes("RGB", (w // k, h // k), os.urandom((w // k) * (h // k) * 3))
    out = io.BytesIO()
    if i % 2 == 0:
        small.resize((w, h), Image.Resampling.BILINEAR).save(out, format="JPEG", quality=85)
        return Medium(f"photo{i}.jpg", "image/jpeg", out.getvalue())
    small.resize((w, h), Image.Resampling.NEAREST).save(out, format="PNG")
    return Medium(f"screen{i}.png", "image/png", out.getvalue())


def upload(client: MatrixClient, m: Medium) -> None:
    m.server_name, m.media_id, m.upload_seconds = client.upload(m.data, m.content_type, m.filename)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def download_checked(client: MatrixClient, m: Medium) -> float:
    r = client.download(m.server_name, m.media_id)
    if r.body != m.data:
        raise AssertionError(
            f"{m.filename}: {len(r.body)} bytes served differ from the {len(m.data)} uploaded"
        )
    return r.seconds


def thumbnail_checked(client: MatrixClient, m: Medium, w: int, h: int, method: str) -> float:
    r = client.thumbnail(m.server_name, m.media_id, w, h, method)
    ctype = r.headers.get("Content-Type", "")
    if ctype not in ("image/jpeg", "image/png") or len(r.body) == 0:
        raise AssertionError(f"{m.filename}: thumbnail {w}x{h} {method} is {ctype!r}, {len(r.body)} bytes")
    return r.seconds


# ---------------------------------------------------------------------------------------------------
# One phase
# ---------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """What one (rtt, round, store) measured; seconds."""

    probe_upload: list[float] = field(default_factory=list)
    probe_cold: list[float] = field(default_factory=list)
    probe_errors: int = 0
    image_uploads: list[float] = field(default_factory=list)
    upload_8m: float = 0.0
    upload_32m: float = 0.0
    upload_phase: float = 0.0
    thumb_warm: list[float] = field(default_factory=list)
    cold_small: list[float] = field(default_factory=list)
    cold_thumb: list[float] = field(default_factory=list)
    cold_large: list[float] = field(default_factory=list)
    waits_per_upload: float = 0.0  # proxy waits towards S3 per upload of the probed phase
    steal_upload: float = 0.0  # share of the CPUs' time the hypervisor took during the probed uploads


def run_phase(
    store: Store, proxy: LatencyProxy, page_cache: PageCache, images: int, cold_rounds: int, cold_images: int
) -> Phase:
    client = store.matrix()
    ph = Phase()
    media = [make_image(i) for i in range(images)]
    big = Medium("archive8.bin", "application/octet-stream", os.urandom(LARGE_UPLOAD))

    # 1. uploads under the probe
    w0 = proxy.waits_snapshot()["to_server"]
    with Probe(store.synapse.port) as probe:
        time.sleep(0.2)  # a few samples before the first upload
        t0, s0 = time.perf_counter(), steal_seconds()
        for m in media:
            upload(client, m)
            ph.image_uploads.append(m.upload_seconds)
        upload(client, big)
        ph.upload_8m = big.upload_seconds
        ph.upload_phase = time.perf_counter() - t0
        ph.steal_upload = (steal_seconds() - s0) / (ph.upload_phase * (os.cpu_count() or 1))
    ph.probe_upload = probe.samples
    ph.probe_errors += probe.errors
    ph.waits_per_upload = (proxy.waits_snapshot()["to_server"] - w0) / (len(media) + 1)

    # 2. a large file for the cold reads; warm thumbnails
    large = Medium("archive32.bin", "application/octet-stream", os.urandom(COLD_LARGE))
    upload(client, large)
    ph.upload_32m = large.upload_seconds
    for m in media[: min(10, len(media))]:
        ph.thumb_warm.append(thumbnail_checked(client, m, 32, 32, "crop"))
        ph.thumb_warm.append(thumbnail_checked(client, m, 320, 240, "scale"))

    # 3. cold reads; each round reads images no earlier round read
    for r in range(cold_rounds):
        make_cold(store, page_cache)
        chosen = media[r * cold_images : (r + 1) * cold_images] or media[:cold_images]
        with Probe(store.synapse.port) as probe:
            for m in chosen:
                ph.cold_small.append(download_checked(client, m))
                ph.cold_thumb.append(thumbnail_checked(client, m, 320, 240, "scale"))
            ph.cold_large.append(download_checked(client, large))
        ph.probe_cold += probe.samples
        ph.probe_errors += probe.errors
    return ph


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))]


def corrected(samples: Sequence[float], period: float = 0.020) -> list[float]:
    """The samples plus the ones the probe could not send while it waited (HdrHistogram's
    recordValueWithExpectedInterval): a request that took L > period stood for requests due every
    period meanwhile, which would have waited L - period, L - 2 period, ... A probe that sends one
    request at a time otherwise under-reports stalls (coordinated omission)."""
    out = list(samples)
    for v in samples:
        missed = v - period
        while missed > 0:
            out.append(missed)
            missed -= period
    return out


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    label: str
    unit: str  # "ms", "s", "%" (of a fraction) or "" (a count)
    of: Callable[[list[Phase]], float]
    compare: bool = True  # a ratio s3cachefs / provider means something


def _all(phases: list[Phase], attr: str) -> list[float]:
    out: list[float] = []
    for p in phases:
        out += getattr(p, attr)
    return out


def _median_of_rounds(attr: str) -> Callable[[list[Phase]], float]:
    return lambda phases: med([getattr(p, attr) for p in phases])


ROWS = [
    Row("probe during uploads: p50", "ms", lambda ps: pct(_all(ps, "probe_upload"), 0.50)),
    Row("probe during uploads: p99", "ms", lambda ps: pct(_all(ps, "probe_upload"), 0.99)),
    Row("probe during uploads: max", "ms", lambda ps: max(_all(ps, "probe_upload"), default=float("nan"))),
    Row("probe during uploads: samples", "", lambda ps: float(len(_all(ps, "probe_upload"))), False),
    Row(
        "probe during uploads, corrected: p50",
        "ms",
        lambda ps: pct(corrected(_all(ps, "probe_upload")), 0.50),
    ),
    Row(
        "probe during uploads, corrected: p99",
        "ms",
        lambda ps: pct(corrected(_all(ps, "probe_upload")), 0.99),
    ),
    Row("image upload (median)", "ms", lambda ps: med(_all(ps, "image_uploads"))),
    Row("8 MiB upload", "ms", _median_of_rounds("upload_8m")),
    Row("upload phase, wall time", "s", _median_of_rounds("upload_phase")),
    Row("proxy waits towards S3 per upload", "", _median_of_rounds("waits_per_upload")),
    # Time the hypervisor gave this VM's CPUs to others: it stalls Synapse and the mount alike.
    Row("VM steal time during uploads", "%", _median_of_rounds("steal_upload"), False),
    Row("32 MiB upload", "ms", _median_of_rounds("upload_32m")),
    Row("thumbnail, warm (median)", "ms", lambda ps: med(_all(ps, "thumb_warm"))),
    Row("cold download, image (median)", "ms", lambda ps: med(_all(ps, "cold_small"))),
    Row("cold thumbnail (median)", "ms", lambda ps: med(_all(ps, "cold_thumb"))),
    Row("cold download, 32 MiB (median)", "ms", lambda ps: med(_all(ps, "cold_large"))),
    Row("probe during cold reads: p99", "ms", lambda ps: pct(_all(ps, "probe_cold"), 0.99)),
    Row("probe during cold reads: max", "ms", lambda ps: max(_all(ps, "probe_cold"), default=float("nan"))),
]


def fmt(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "-"
    if unit == "ms":
        v = value * 1000
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    if unit == "s":
        return f"{value:.1f}"
    if unit == "%":
        return f"{value * 100:.1f}"
    return f"{value:.1f}" if value != int(value) else f"{int(value)}"


def ratio(a: float, b: float) -> str:
    if a != a or b != b or b == 0:
        return "-"
    return f"{a / b:.2f}"


def table(rtt_ms: int, results: dict[str, list[Phase]]) -> str:
    # The floor's and async's columns and ratios only when they ran (older tables stay alike).
    stores = [s for s in STORES if s not in ("floor", "async") or results.get(s)]
    ratios = [("s3cachefs", "provider")] + [(s, "provider") for s in ("floor", "async") if s in stores]
    lines = [
        f"### RTT {rtt_ms} ms",
        "",
        "| metric | " + " | ".join(stores) + " | " + " | ".join(f"{a} / {b}" for a, b in ratios) + " |",
        "|---|" + "---:|" * (len(stores) + len(ratios)),
    ]
    for row in ROWS:
        vals = {s: row.of(results[s]) if results.get(s) else float("nan") for s in stores}
        unit = f" ({row.unit})" if row.unit else ""
        cells = " | ".join(fmt(vals[s], row.unit) for s in stores)
        rs = " | ".join(ratio(vals[a], vals[b]) if row.compare else "" for a, b in ratios)
        lines.append(f"| {row.label}{unit} | {cells} | {rs} |")
    errors = {s: sum(p.probe_errors for p in results.get(s, [])) for s in STORES}
    if any(errors.values()):
        lines += ["", f"Probe errors (not counted as samples): {errors}"]
    return "\n".join(lines)


def git(*args: str) -> str:
    r = subprocess.run(
        ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30, check=False
    )
    return r.stdout.strip() if r.returncode == 0 else f"(git {' '.join(args)} failed: {r.stderr.strip()})"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def header(args: argparse.Namespace, page_cache: PageCache, weed_version: str) -> str:
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "s3cachefs")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    mode = "QUICK run (fewer uploads, one round): indicative only" if args.quick else "full run"
    return "\n".join(
        [
            "# Synapse reactor latency: local disk vs synapse-s3-storage-provider vs s3cachefs"
            + (" (and the pyfuse3 S3 floor)" if "floor" in args.stores else ""),
            "",
            f"- {mode}; generated by `python -m bench.reactor {' '.join(sys.argv[1:])}` on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- s3cachefs measured: commit {commit}"
            + (" **with uncommitted changes in s3cachefs/**" if dirty else " (s3cachefs/ clean)"),
            f"- machine: {os.cpu_count()} CPUs, load average at start {load}, {platform.platform()}. "
            "**Noisy shared 2-core machine**: Synapse, SeaweedFS, the proxy, the mount and the client "
            "all share it; trust ratios and orders of magnitude, not single milliseconds.",
            f"- Synapse {version('matrix-synapse')}, synapse-s3-storage-provider "
            f"{version('synapse-s3-storage-provider')}, SeaweedFS {weed_version}, Python {platform.python_version()}",
            f"- per round and store: {args.images} images (JPEG/PNG 1024x768, 200-300 KiB) + one 8 MiB file "
            f"uploaded one after another under the probe (GET {PROBE_PATH} every 20 ms, keep-alive, one at a "
            f"time); then one 32 MiB upload; warm thumbnails of the first 10 images (32x32 crop, 320x240 "
            f"scale); {args.cold_rounds} cold round(s) of {args.cold_images} image(s) + a 320x240 thumbnail "
            f"of each + the 32 MiB file. {args.rounds} round(s); medians over rounds, probe percentiles "
            f'over all samples. "corrected": with the requests the probe could not send while it '
            f"waited for a slow answer added back (coordinated omission; see bench/README.md).",
            "- cold: s3cachefs cache wiped and remounted (listing finished before timing); provider: "
            "local media files deleted; floor (bench/pyfuse3_s3_floor.py, not a contender): nothing to do, "
            "it GETs the object at every open(); local: as is"
            + (
                "; kernel page cache dropped for every store"
                if page_cache.enabled
                else "; page cache NOT dropped"
            ),
            "- S3: one SeaweedFS on loopback behind a proxy that waits RTT/2 per direction before the first "
            "chunk after >2 ms idle (one RTT per request/response; `Expect: 100-continue` PUTs pay two).",
            "",
        ]
    )


def weed_version() -> str:
    try:
        r = subprocess.run(
            [weed_binary(), "version"], capture_output=True, text=True, timeout=30, check=False
        )
        return r.stdout.strip().splitlines()[0] if r.stdout.strip() else "?"
    except (OSError, subprocess.TimeoutExpired, HarnessError):
        return "?"


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt", default="0,30,100", help="round-trip times to S3 in ms, comma-separated")
    ap.add_argument("--quick", action="store_true", help="8 images, 1 round, 1 cold round of 2 images")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per RTT and store (default 2; quick 1)")
    ap.add_argument("--images", type=int, default=None, help="images per round (default 30; quick 8)")
    ap.add_argument(
        "--cold-rounds", type=int, default=None, help="cold rounds per round (default 3; quick 1)"
    )
    ap.add_argument(
        "--cold-images", type=int, default=None, help="images per cold round (default 3; quick 2)"
    )
    ap.add_argument(
        "--only",
        default=",".join(DEFAULT_STORES),
        help=f"stores to measure, of {', '.join(STORES)} (default: all but async)",
    )
    ap.add_argument("--output", default="bench/reactor-results.md", help="markdown file ('' for none)")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache for cold reads")
    ap.add_argument("--workdir", default=None, help="parent of the run's directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (logs, databases)")
    args = ap.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds if args.rounds is not None else (1 if q else 2)
    args.images = args.images if args.images is not None else (8 if q else 30)
    args.cold_rounds = args.cold_rounds if args.cold_rounds is not None else (1 if q else 3)
    args.cold_images = args.cold_images if args.cold_images is not None else (2 if q else 3)
    args.rtts = [int(x) for x in args.rtt.split(",") if x.strip()]
    args.stores = [s for s in args.only.split(",") if s]
    bad = [s for s in args.stores if s not in STORES]
    if bad or not args.rtts or min(args.rtts) < 0 or max(args.rtts) > 1000:
        ap.error(f"bad --only {bad} or --rtt {args.rtt} (0..1000 ms)")
    for name in ("rounds", "images", "cold_rounds", "cold_images"):
        if not 1 <= getattr(args, name) <= 200:
            ap.error(f"--{name.replace('_', '-')} must be 1..200")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if "provider" in args.stores and version("synapse-s3-storage-provider") == "not installed":
        sys.exit("synapse-s3-storage-provider is not installed: pip install synapse-s3-storage-provider")
    signal.signal(signal.SIGTERM, _interrupt)
    # Also when started in the background by a shell without job control, which ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    page_cache = PageCache(not args.no_drop_caches)
    head = header(args, page_cache, weed_version())
    print(head, flush=True)
    results: dict[int, dict[str, list[Phase]]] = {rtt: {s: [] for s in args.stores} for rtt in args.rtts}
    notes: list[str] = []
    with run_dir("s3cfs-reactor-", args.workdir, args.keep, log) as base, contextlib.ExitStack() as stack:
        s3 = S3Server(base / "s3")
        stack.callback(s3.stop)  # registered before start: a half-started server is stopped too
        s3.start()
        proxy = stack.enter_context(LatencyProxy(s3.s3_port))
        stores = [s for s in make_stores(base, s3, proxy) if s.name in args.stores]
        for store in stores:
            stack.callback(stop_store, store)
            start_store(store)
        for rtt in args.rtts:
            proxy.rtt = rtt / 1000
            for rnd in range(args.rounds):
                for store in stores:
                    log(f"RTT {rtt} ms, round {rnd + 1}/{args.rounds}: {store.name}")
                    ph = run_phase(store, proxy, page_cache, args.images, args.cold_rounds, args.cold_images)
                    results[rtt][store.name].append(ph)
                    log(
                        f"  probe p50 {pct(ph.probe_upload, 0.5) * 1000:.1f} ms, p99 "
                        f"{pct(ph.probe_upload, 0.99) * 1000:.1f} ms, max {max(ph.probe_upload, default=0) * 1000:.0f} ms; "
                        f"image upload median {med(ph.image_uploads) * 1000:.0f} ms; "
                        f"cold 32 MiB {med(ph.cold_large) * 1000:.0f} ms"
                    )
            print("\n" + table(rtt, results[rtt]) + "\n", flush=True)
        for store in stores:
            notes += [f"{store.name}: {n}" for n in store.notes]
        if proxy.refused:
            notes.append(f"proxy refused {proxy.refused} connections (over its limit)")
    body = "\n\n".join(table(rtt, results[rtt]) for rtt in args.rtts)
    text = head + "\n" + body + "\n"
    if notes:
        text += "\nNotes:\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print("\n" + text)
    if args.output:
        Path(args.output).write_text(text)
        log(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
