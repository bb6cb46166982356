"""End to end: a real Synapse homeserver whose media_store_path is an s3cachefs mount (issue 4).

One Synapse (SQLite, loopback only, federation and URL previews off) is driven over HTTP the way
clients drive it: shared-secret admin registration, uploads of PNG and JPEG images of different sizes
(Synapse thumbnails them) and of a 32 MiB binary file, authenticated downloads
(`/_matrix/client/v1/media/download`, `enable_authenticated_media` left at its default, true) and
thumbnails, a restart on a wiped cache (everything then comes from S3), admin deletes and the admin
purge of old local media. The bucket is checked with boto3 all along: originals are in S3 as soon as the
upload request returns (thumbnails soon after, from the upload queue), and the keys are exactly
synapse-s3-storage-provider's layout under the prefix.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image

from .faultproxy import FaultProxy
from .harness import MakeMount, Mount, S3Server, dir_bytes, files_under, wait_until
from .synapse_harness import MatrixClient, Response, SynapseServer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.mount

PREFIX = "synapse/"
_ID = r"(?P<aa>[A-Za-z]{2})/(?P<bb>[A-Za-z]{2})/(?P<rest>[A-Za-z]{20})"
ORIGINAL_KEY = re.compile(rf"^{re.escape(PREFIX)}local_content/{_ID}$")
THUMBNAIL_KEY = re.compile(
    rf"^{re.escape(PREFIX)}local_thumbnails/{_ID}/(?P<w>[1-9][0-9]*)-(?P<h>[1-9][0-9]*)-image-(?P<sub>jpeg|png)-(?P<method>crop|scale)$"
)
BIG_SIZE = 32 * 1024 * 1024 + 12345  # over s3cachefs's 16 MiB multipart threshold


@dataclass(eq=False)  # compared by identity
class Medium:
    """One upload and what the test learned about it."""

    filename: str
    content_type: str
    data: bytes
    image_size: tuple[int, int] | None  # (width, height) for images, None for other files
    server_name: str = ""
    media_id: str = ""
    upload_seconds: float = 0.0
    thumbnails: dict[str, bytes] = field(default_factory=dict)  # "crop"/"scale" -> bytes served

    @property
    def relpath(self) -> str:
        """MediaFilePaths.local_media_filepath_rel: local_content/AA/BB/REST."""
        m = self.media_id
        return f"local_content/{m[:2]}/{m[2:4]}/{m[4:]}"

    @property
    def thumbnail_dir(self) -> str:
        m = self.media_id
        return f"local_thumbnails/{m[:2]}/{m[2:4]}/{m[4:]}"


def make_image(fmt: str, size: tuple[int, int], mode: str) -> bytes:
    """Noise (so the sizes are real and no two images are alike), encoded by Pillow."""
    w, h = size
    img = Image.frombytes(mode, size, os.urandom(w * h * len(mode)))
    out = io.BytesIO()
    img.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def bucket_listing(s3: S3Client, bucket: str) -> dict[str, tuple[int, str, float]]:
    """key -> (size, ETag, LastModified timestamp) of every object in the bucket."""
    out: dict[str, tuple[int, str, float]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["Size"], obj["ETag"], obj["LastModified"].timestamp())
    return out


def keys_under(listing: dict[str, tuple[int, str, float]], relprefix: str) -> set[str]:
    return {k for k in listing if k.startswith(PREFIX + relprefix)}


def get_bytes(s3: S3Client, bucket: str, relpath: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=PREFIX + relpath)["Body"].read()


def check_thumbnail(r: Response, medium: Medium, width: int, height: int, method: str) -> None:
    """A valid JPEG or PNG of a plausible size for the request (Synapse serves the closest stored one)."""
    assert medium.image_size is not None
    ctype = r.headers.get("Content-Type", "")
    assert ctype in ("image/jpeg", "image/png"), ctype
    with Image.open(io.BytesIO(r.body)) as img:
        assert img.format == ctype.split("/")[1].upper(), (img.format, ctype)
        tw, th = img.size
        img.verify()
    ow, oh = medium.image_size
    if method == "crop":
        assert (tw, th) == (width, height), f"{medium.filename}: crop {width}x{height} gave {tw}x{th}"
    else:
        assert tw <= ow and th <= oh, f"{medium.filename}: scale gave {tw}x{th}, larger than {ow}x{oh}"
        assert abs(tw / th - ow / oh) < 0.05, (
            f"{medium.filename}: scale {tw}x{th} lost the aspect of {ow}x{oh}"
        )
        assert tw >= min(width, ow) or th >= min(height, oh), f"{medium.filename}: scale {tw}x{th} too small"


def fetch_everything(client: MatrixClient, media: list[Medium]) -> dict[str, bytes]:
    """Download every medium (bytes compared) and its crop and scale thumbnails; returns what was served."""
    served: dict[str, bytes] = {}
    for m in media:
        r = client.download(m.server_name, m.media_id)
        assert len(r.body) == len(m.data), f"{m.filename}: {len(r.body)} bytes served, {len(m.data)} uploaded"
        assert r.body == m.data, f"{m.filename}: downloaded bytes differ from the upload"
        assert r.headers.get("Content-Type") == m.content_type, r.headers.get("Content-Type")
        if m.image_size is None:
            continue
        for method, w, h in (("crop", 32, 32), ("scale", 320, 240)):
            t = client.thumbnail(m.server_name, m.media_id, w, h, method)
            check_thumbnail(t, m, w, h, method)
            served[f"{m.media_id}/{method}"] = t.body
    return served


def check_layout(listing: dict[str, tuple[int, str, float]], media: list[Medium]) -> None:
    """Exactly synapse-s3-storage-provider's keys: prefix + local_content/... and local_thumbnails/..."""
    strays = [k for k in listing if not (ORIGINAL_KEY.match(k) or THUMBNAIL_KEY.match(k))]
    assert strays == [], f"keys outside the media layout (markers, url_cache, no prefix, ...): {strays}"
    empty = [k for k, (size, _, _) in listing.items() if size == 0]
    assert empty == [], f"0-byte objects: {empty}"
    originals = {k for k in listing if ORIGINAL_KEY.match(k)}
    assert originals == {PREFIX + m.relpath for m in media}
    for m in media:
        thumbs = keys_under(listing, m.thumbnail_dir + "/")
        if m.image_size is None:
            assert thumbs == set(), f"{m.filename} is not an image but has thumbnails: {thumbs}"
        else:
            methods = {match.group("method") for k in thumbs if (match := THUMBNAIL_KEY.match(k))}
            assert methods == {"crop", "scale"}, f"{m.filename}: thumbnails {sorted(thumbs)}"


def thumbnails_in_bucket(s3: S3Client, bucket: str, m: Medium) -> set[str]:
    listing = bucket_listing(s3, bucket)
    return {
        match.group("method")
        for k in keys_under(listing, m.thumbnail_dir + "/")
        if (match := THUMBNAIL_KEY.match(k))
    }


def has_both_thumbnails(s3: S3Client, bucket: str, m: Medium) -> bool:
    return thumbnails_in_bucket(s3, bucket, m) >= {"crop", "scale"}


def check_gone(mount: Mount, s3: S3Client, bucket: str, client: MatrixClient, m: Medium) -> None:
    client.download(m.server_name, m.media_id, expect=404)
    assert not os.path.exists(mount.path / m.relpath), f"{m.relpath} still in the mount"
    assert not os.path.exists(mount.path / m.thumbnail_dir), f"{m.thumbnail_dir} still in the mount"

    def left() -> set[str]:
        listing = bucket_listing(s3, bucket)
        return keys_under(listing, m.relpath) | keys_under(listing, m.thumbnail_dir + "/")

    # The DELETEs are queued at unlink (Synapse's reactor does not wait for them) and done at once.
    assert wait_until(lambda: left() == set(), 60), f"{m.filename}: still in the bucket: {sorted(left())}"


def log_problems(path: Path, markers: tuple[str, ...] = ("ERROR", "CRITICAL", "Traceback")) -> list[str]:
    text = path.read_text(errors="replace")
    return [ln for ln in text.splitlines() if any(m in ln for m in markers)]


@pytest.fixture
def synapse_mount(
    request: pytest.FixtureRequest, make_mount: MakeMount, bucket: str, tmp_path: Path
) -> Iterator[tuple[Mount, SynapseServer]]:
    """An s3cachefs mount with a prefix, and a (not yet started) Synapse whose media store it is.

    Synapse is stopped before the mount goes (this fixture is torn down before make_mount's). When the
    test failed, the tail of Synapse's log is printed at teardown, and pytest shows it in the report.
    """
    mount = make_mount(bucket=bucket, extra_args=["--prefix", PREFIX])
    server = SynapseServer(tmp_path / "synapse", media_store_path=mount.path)
    server.write_config()
    failed_before = request.session.testsfailed
    try:
        yield mount, server
    finally:
        try:
            if server.running:
                server.stop()
        finally:
            server.kill()
            if request.session.testsfailed > failed_before:
                print(server.describe(80))


def test_synapse_media_lives_in_s3_survives_a_cache_wipe_and_deletes_reach_the_bucket(
    synapse_mount: tuple[Mount, SynapseServer], s3: S3Client, bucket: str
) -> None:
    mount, server = synapse_mount
    began = time.monotonic()
    figures: dict[str, float] = {"synapse start": server.start()}
    client = MatrixClient(server)
    client.register_admin("admin", "correct horse battery staple")

    media = [
        Medium("photo.jpg", "image/jpeg", make_image("JPEG", (1600, 1200), "RGB"), (1600, 1200)),
        Medium("small.jpg", "image/jpeg", make_image("JPEG", (320, 200), "RGB"), (320, 200)),
        Medium("screenshot.png", "image/png", make_image("PNG", (1024, 768), "RGB"), (1024, 768)),
        Medium("icon.png", "image/png", make_image("PNG", (64, 64), "RGBA"), (64, 64)),
        Medium("archive.bin", "application/octet-stream", os.urandom(BIG_SIZE), None),
    ]

    # -- upload: a 200 means the original is in S3; its thumbnails (upload = "async" by default) are
    # queued on the cache disk and reach S3 in the background
    for m in media:
        m.server_name, m.media_id, m.upload_seconds = client.upload(m.data, m.content_type, m.filename)
        assert m.server_name == server.SERVER_NAME
        stored = get_bytes(s3, bucket, m.relpath)  # no sleep, no retry
        assert hashlib.sha256(stored).digest() == hashlib.sha256(m.data).digest(), f"{m.filename} in S3"
    for m in media:
        if m.image_size is not None:
            assert wait_until(functools.partial(has_both_thumbnails, s3, bucket, m), 60), (
                f"{m.filename}: no thumbnails"
            )
    big = media[-1]
    figures["32 MiB upload"] = big.upload_seconds
    figures["image uploads (max)"] = max(m.upload_seconds for m in media[:-1])
    etag = s3.head_object(Bucket=bucket, Key=PREFIX + big.relpath)["ETag"].strip('"')
    assert re.fullmatch(r"[0-9a-f]{32}-[0-9]+", etag), f"32 MiB original not multipart: {etag}"

    # -- downloads and thumbnails, warm cache
    t0 = time.monotonic()
    warm = fetch_everything(client, media)
    figures["fetch all, warm"] = time.monotonic() - t0
    listing = bucket_listing(s3, bucket)
    check_layout(listing, media)
    for m in media:
        on_mount = sorted(os.listdir(mount.path / m.thumbnail_dir)) if m.image_size else []
        in_bucket = sorted(k.rsplit("/", 1)[1] for k in keys_under(listing, m.thumbnail_dir + "/"))
        assert on_mount == in_bucket, f"{m.filename}: mount {on_mount} vs bucket {in_bucket}"
    for key, body in warm.items():  # a served thumbnail is one of the stored ones, byte for byte
        media_id = key.split("/")[0]
        m = next(x for x in media if x.media_id == media_id)
        stored_thumbs = {
            get_bytes(s3, bucket, k[len(PREFIX) :]) for k in keys_under(listing, m.thumbnail_dir + "/")
        }
        assert body in stored_thumbs, f"{key}: served thumbnail is not in the bucket"

    # -- stop everything, wipe the cache, start again: every byte now comes from S3
    assert server.stop() == 0
    mount.unmount()
    mount.wipe_cache()
    assert list(mount.cache_dir.iterdir()) == []
    mount.start()
    figures["synapse restart"] = server.start()
    t0 = time.monotonic()
    cold = fetch_everything(client, media)
    figures["fetch all, cold (from S3)"] = time.monotonic() - t0
    assert cold == warm, "thumbnails served after the cache wipe differ from the ones served before"
    total_media_bytes = sum(len(m.data) for m in media)
    assert dir_bytes(mount.cache_dir) >= total_media_bytes, "downloads did not go through the cache"
    assert bucket_listing(s3, bucket) == listing, "reading media after the restart changed the bucket"

    # -- admin delete of single media: gone from Synapse, the mount and the bucket (thumbnails too)
    deleted = [media[0], media[2]]
    for m in deleted:
        result = client.admin_delete_media(m.server_name, m.media_id)
        assert result == {"deleted_media": [m.media_id], "total": 1}, result
        check_gone(mount, s3, bucket, client, m)
    remaining = [m for m in media if m not in deleted]
    check_layout(bucket_listing(s3, bucket), remaining)  # nothing else went
    fetch_everything(client, remaining)

    # -- admin purge of all local media older than now: frees the bucket space
    bytes_before = sum(size for size, _, _ in bucket_listing(s3, bucket).values())
    assert bytes_before > BIG_SIZE
    t0 = time.monotonic()
    result = client.admin_delete_old_local_media(before_ts=int(time.time() * 1000) + 1000)
    figures["purge"] = time.monotonic() - t0
    assert sorted(result["deleted_media"]) == sorted(m.media_id for m in remaining), result
    assert result["total"] == len(remaining)
    for m in remaining:
        check_gone(mount, s3, bucket, client, m)
    assert wait_until(lambda: bucket_listing(s3, bucket) == {}, 60), (
        "objects left in the bucket after the purge"
    )
    assert list(files_under(mount.path)) == [], "files left in the mount after the purge"

    assert server.stop() == 0
    mount.unmount()
    # Synapse logs failed thumbnailing at INFO and failed removals at WARNING, and goes on.
    problems = log_problems(
        server.log_path,
        ("ERROR", "CRITICAL", "Traceback", "Failed to generate thumbnails", "Failed to remove file"),
    )
    assert problems == [], "Synapse logged problems:\n" + "\n".join(problems[:20])
    problems = log_problems(mount.log_path)
    assert problems == [], "s3cachefs logged problems:\n" + "\n".join(problems[:20])

    figures["test body"] = time.monotonic() - began
    print("figures (s): " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    print(f"32 MiB upload through Synapse: {BIG_SIZE / big.upload_seconds / 2**20:.1f} MiB/s")


def test_thumbnails_still_queued_when_the_cache_is_lost_are_made_again_by_synapse(
    make_mount: MakeMount, s3server: S3Server, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    # Thumbnails are acknowledged once queued on the cache disk. If that disk is lost before they
    # are sent, Synapse finds them missing and makes them again from the originals, which are in S3:
    # every thumbnail request still gets a valid image.
    with FaultProxy(s3server.s3_port, seed=1) as proxy:
        mount = make_mount(
            bucket=bucket,
            extra_args=["--prefix", PREFIX, "--endpoint-url", proxy.endpoint_url, "--max-attempts", "2"],
        )
        server = SynapseServer(tmp_path / "synapse", media_store_path=mount.path)
        server.write_config()
        try:
            proxy.set_mode("http_503", only=f"PUT /{bucket}/{PREFIX}local_thumbnails/")
            server.start()
            client = MatrixClient(server)
            client.register_admin("admin", "correct horse battery staple")
            media = [
                Medium("photo.jpg", "image/jpeg", make_image("JPEG", (800, 600), "RGB"), (800, 600)),
                Medium("screenshot.png", "image/png", make_image("PNG", (640, 480), "RGB"), (640, 480)),
            ]
            for m in media:
                m.server_name, m.media_id, m.upload_seconds = client.upload(
                    m.data, m.content_type, m.filename
                )
                assert get_bytes(s3, bucket, m.relpath) == m.data
                assert thumbnails_in_bucket(s3, bucket, m) == set(), "thumbnail PUTs are refused"
                assert os.listdir(mount.path / m.thumbnail_dir), "Synapse made its thumbnails"
            assert server.stop() == 0
            mount.kill()  # the queued thumbnails die with the cache disk
            mount.wipe_cache()
            mount.start()
            server.start()
            for m in media:
                for method, w, h in (("crop", 32, 32), ("scale", 320, 240)):
                    check_thumbnail(
                        client.thumbnail(m.server_name, m.media_id, w, h, method), m, w, h, method
                    )
            proxy.set_mode("pass")
            for m in media:  # made again, queued again, and sent now that S3 takes them
                assert wait_until(functools.partial(has_both_thumbnails, s3, bucket, m), 60)
            assert server.stop() == 0
        finally:
            if server.running:
                server.stop()
            server.kill()
