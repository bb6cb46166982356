"""The Prometheus endpoint (--metrics-addr), the Grafana dashboard over it, and live `status` figures.

Real mounts on the real S3 server; the endpoint is scraped over HTTP and parsed with
prometheus_client's own parser, as Prometheus would read it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from s3cachefs.cli import config_from_args
from s3cachefs.config import ConfigError, parse_metrics_addr

from .harness import (
    REPO_ROOT,
    HarnessError,
    MakeMount,
    Mount,
    S3Server,
    free_ports,
    mount_status,
    queues_empty,
    wait_until,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

DASHBOARD = REPO_ROOT / "contrib" / "grafana" / "s3cachefs.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_mount(make_mount: MakeMount, *args: str, server: S3Server | None = None) -> tuple[Mount, int]:
    port = free_ports(1)[0]
    return make_mount(extra_args=["--metrics-addr", f"127.0.0.1:{port}", *args], server=server), port


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text: str = r.read().decode()
    return text


def scrape(port: int) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(scrape_text(port)):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def index_cached(m: Mount) -> tuple[int, int]:
    """(files, bytes) of the rows in the cache (CACHED, LOCAL, QUEUED), from the index itself."""
    db = sqlite3.connect(f"file:{m.cache_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM nodes WHERE state IN (2, 4, 5)"
        ).fetchone()
        return int(row[0]), int(row[1])
    finally:
        db.close()


def test_the_counters_move_by_exactly_the_operations_done(
    make_mount: MakeMount, s3: S3Client, bucket: str
) -> None:
    remote = {f"remote_content/srv/cold{i}": os.urandom(3000 + i) for i in range(2)}
    for key, data in remote.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    m, port = metrics_mount(make_mount, "--cache-size", "64M", "--cache-min-free", "5%")
    # The background listing ran (or runs): wait for it, so its LISTs are behind the baseline.
    assert wait_until(
        lambda: (
            value(s := scrape(port), "s3cachefs_listing_running") == 0
            and value(s, "s3cachefs_listing_objects") == len(remote)
        ),
        15,
    ), scrape_text(port)
    base = scrape(port)

    originals = {f"local_content/ab/cd/orig{i}": os.urandom(1000 * (i + 1)) for i in range(3)}
    os.makedirs(m.path / "local_content/ab/cd")
    for rel, data in originals.items():
        (m.path / rel).write_bytes(data)  # synchronous: uploaded before close() returns
    after_writes = scrape(port)
    assert value(after_writes, "s3cachefs_uploads_total", mode="sync") - value(
        base, "s3cachefs_uploads_total", mode="sync"
    ) == len(originals)
    requests = "s3cachefs_s3_requests_total"
    assert value(after_writes, requests, operation="PUT", outcome="ok") - value(
        base, requests, operation="PUT", outcome="ok"
    ) == len(originals)
    sent = sum(len(d) for d in originals.values())
    assert (
        value(after_writes, "s3cachefs_s3_sent_bytes_total") - value(base, "s3cachefs_s3_sent_bytes_total")
        == sent
    )
    assert (
        value(after_writes, "s3cachefs_uploaded_bytes_total") - value(base, "s3cachefs_uploaded_bytes_total")
        == sent
    )

    for key, data in remote.items():
        assert (m.path / key).read_bytes() == data  # cold: one GET each
    assert (m.path / "local_content/ab/cd/orig0").read_bytes() == originals["local_content/ab/cd/orig0"]
    # A cold read's last bytes reach the reader as soon as the worker thread has checked them, before
    # that thread returns and the GET is counted (cache/download.py): the counters are read once the
    # GETs are, a moment later, and must then show exactly these operations.
    received = sum(len(d) for d in remote.values())
    assert wait_until(
        lambda: (
            value(scrape(port), "s3cachefs_s3_received_bytes_total")
            - value(base, "s3cachefs_s3_received_bytes_total")
            >= received
        ),
        5,
    ), scrape_text(port)
    after_reads = scrape(port)
    assert value(after_reads, "s3cachefs_cache_misses_total") - value(
        base, "s3cachefs_cache_misses_total"
    ) == len(remote)
    assert value(after_reads, "s3cachefs_cache_hits_total") - value(base, "s3cachefs_cache_hits_total") == 1
    assert value(after_reads, requests, operation="GET", outcome="ok") - value(
        base, requests, operation="GET", outcome="ok"
    ) == len(remote)
    assert (
        value(after_reads, "s3cachefs_s3_received_bytes_total")
        - value(base, "s3cachefs_s3_received_bytes_total")
        == received
    )

    os.makedirs(m.path / "local_thumbnails/ab/cd")
    (m.path / "local_thumbnails/ab/cd/thumb").write_bytes(b"t" * 500)  # async: queued at close()
    os.unlink(m.path / "local_content/ab/cd/orig1")  # its DELETE is queued
    with pytest.raises(OSError):
        os.rmdir(m.path / "local_content/ab/cd")  # not empty
    assert wait_until(lambda: queues_empty(m), 30)
    done = scrape(port)
    assert value(done, "s3cachefs_uploads_queued_total") - value(base, "s3cachefs_uploads_queued_total") == 1
    assert (
        value(done, "s3cachefs_uploads_total", mode="queued")
        - value(base, "s3cachefs_uploads_total", mode="queued")
        == 1
    )
    assert (
        value(done, requests, operation="PUT", outcome="ok")
        - value(base, requests, operation="PUT", outcome="ok")
        == len(originals) + 1
    )
    assert (
        value(done, requests, operation="DELETE", outcome="ok")
        - value(base, requests, operation="DELETE", outcome="ok")
        == 1
    )
    assert value(done, "s3cachefs_deletes_total") - value(base, "s3cachefs_deletes_total") == 1
    errors = "s3cachefs_fuse_errors_total"
    assert (
        value(done, errors, operation="rmdir", errno="ENOTEMPTY")
        - value(base, errors, operation="rmdir", errno="ENOTEMPTY")
        == 1
    )
    # Every request Synapse's reactor waits on was timed.
    hist = "s3cachefs_fuse_request_duration_seconds_count"
    for op in ("lookup", "create", "open", "read", "write", "flush", "release", "unlink", "rmdir"):
        assert value(done, hist, operation=op) > value(base, hist, operation=op), op
    assert total(done, "s3cachefs_s3_request_duration_seconds_count", operation="PUT") == total(
        done, requests, operation="PUT"
    )

    # The gauges, published once a second by the daemon, agree with its index.
    files, nbytes = index_cached(m)
    assert wait_until(
        lambda: (
            value(s := scrape(port), "s3cachefs_cached_files") == files
            and value(s, "s3cachefs_cached_bytes") == nbytes
            and value(s, "s3cachefs_delete_queue_keys") == 0
            and value(s, "s3cachefs_upload_queue_files") == 0
        ),
        10,
    ), (files, nbytes, scrape_text(port))
    assert files == len(remote) + len(originals) - 1 + 1  # the thumbnail stays cached after its upload
    final = scrape(port)
    assert value(final, "s3cachefs_cache_cap_bytes") == 64 * 1024**2
    st = os.statvfs(m.cache_dir)
    assert value(final, "s3cachefs_cache_min_free_bytes") == int(0.05 * st.f_blocks * st.f_frsize)
    assert value(final, "s3cachefs_cache_fs_free_bytes") > 0
    assert value(final, "s3cachefs_upload_queue_oldest_age_seconds") == 0
    assert value(final, "s3cachefs_s3_circuit_open") == 0


def test_a_queued_upload_shows_in_the_queue_gauges_until_it_is_sent(
    make_mount: MakeMount, own_s3server: S3Server
) -> None:
    """While S3 is paused, the thumbnail's upload waits in the queue: length 1, an age that grows."""
    m, port = metrics_mount(make_mount, server=own_s3server)
    os.makedirs(m.path / "local_thumbnails/q")
    assert wait_until(lambda: value(scrape(port), "s3cachefs_listing_running") == 0, 15)
    own_s3server.pause()
    try:
        (m.path / "local_thumbnails/q/t").write_bytes(b"x" * 100)  # queued at close(): no S3 call
        assert wait_until(lambda: value(scrape(port), "s3cachefs_upload_queue_files") == 1, 10)
        first = value(scrape(port), "s3cachefs_upload_queue_oldest_age_seconds")
        assert wait_until(
            lambda: value(scrape(port), "s3cachefs_upload_queue_oldest_age_seconds") > first, 10
        )
    finally:
        own_s3server.resume()
    assert wait_until(lambda: queues_empty(m), 60)
    assert wait_until(lambda: value(scrape(port), "s3cachefs_upload_queue_files") == 0, 10)


def dashboard_metric_names() -> set[str]:
    """Every metric name the dashboard's queries use (panel targets and template variables)."""

    def strings(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    yield v
                else:
                    yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)

    dash = json.loads(DASHBOARD.read_text())
    names: set[str] = set()
    for text in strings(dash):
        # Digits too: s3cachefs_s3_... ([a-z_]+ alone would stop at "s3cachefs_s").
        names |= set(re.findall(r"\bs3cachefs_[a-z0-9_]+", text))
    return names


def exported_names(text: str) -> set[str]:
    """The names a query may use for what the endpoint exports: each sample's name, and for families
    with no sample yet (a labelled counter nothing has counted) the names of their type's samples."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ())}
    return names


def test_the_dashboard_queries_only_metrics_the_endpoint_exports(make_mount: MakeMount) -> None:
    _, port = metrics_mount(make_mount)
    used = dashboard_metric_names()
    assert len(used) >= 10, used  # the regex found the queries
    missing = used - exported_names(scrape_text(port))
    assert not missing, f"the dashboard queries metrics the endpoint does not export: {sorted(missing)}"


def test_status_of_a_running_mount_counts_an_upload_at_once(make_mount: MakeMount, tmp_path: Path) -> None:
    m = make_mount()
    before = mount_status(m)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(2048))
    os.makedirs(m.path / "local_content/st")
    shutil.copy(src, m.path / "local_content/st/file")
    after = mount_status(m)  # no wait: the daemon saves its counters when status asks
    assert after["live"] is True
    assert int(str(after["uploads"])) == int(str(before["uploads"])) + 1
    assert int(str(after["saves"])) > int(str(before["saves"]))


def test_a_metrics_address_in_use_fails_the_mount_before_it_appears(make_mount: MakeMount) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        m = make_mount(extra_args=["--metrics-addr", f"127.0.0.1:{port}"], start=False)
        with pytest.raises(HarnessError, match="exited with code"):
            m.start()
    assert not m.is_mounted()
    assert f"metrics_addr 127.0.0.1:{port}: Address already in use" in m.log_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9406", ("127.0.0.1", 9406)),
        ("[::1]:9406", ("::1", 9406)),
        ("10.0.0.5:80", ("10.0.0.5", 80)),
    ],
)
def test_a_metrics_address_is_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_addr(text) == expected


@pytest.mark.parametrize("text", ["9406", "localhost", ":9406", "127.0.0.1:0", "127.0.0.1:99999", "h:x"])
def test_a_metrics_address_without_a_host_or_a_valid_port_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="metrics_addr"):
        parse_metrics_addr(text)


def test_metrics_are_off_unless_an_address_is_given_by_flag_or_config_file(tmp_path: Path) -> None:
    _, c = config_from_args(["mount", "media", "/mnt/media"])
    assert c.metrics_addr is None
    _, c = config_from_args(["mount", "media", "/mnt/media", "--metrics-addr", "127.0.0.1:9406"])
    assert c.metrics_addr == ("127.0.0.1", 9406)
    path = tmp_path / "s3cachefs.toml"
    path.write_text('bucket = "media"\nmetrics_addr = "[::1]:9406"\n')
    _, c = config_from_args(["mount", "--config", str(path), "/mnt/media"])
    assert c.metrics_addr == ("::1", 9406)
