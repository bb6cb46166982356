"""A quarantine-aware cache (issue "operations", part 6), end to end with a real Synapse.

The mount has a `[synapse]` table pointing at a real Synapse whose media store it is. Media that an
admin quarantines lose their cached copies (original and thumbnails) within a poll or two, while the
objects stay in S3; once released they are served again, fetched from S3. The admin token is read
from its file at each poll: a file others can read is refused, a refused token is logged once.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .harness import MakeMount, Mount, mount_status, wait_until
from .synapse_harness import MatrixClient, SynapseServer
from .test_synapse import PREFIX, Medium, get_bytes, has_both_thumbnails, log_problems, make_image

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.mount

REMOTE, CACHED = 1, 2  # index.State


def rows_under(mount: Mount, relpaths: list[str]) -> dict[str, tuple[int, int]]:
    """relpath -> (ino, state) of each file row at or directly under these paths (read-only index)."""
    db = sqlite3.connect(f"file:{mount.cache_dir / 'index.sqlite'}?mode=ro", uri=True)
    out: dict[str, tuple[int, int]] = {}
    try:
        for rel in relpaths:
            ino, state = 1, 0
            for name in rel.split("/"):
                row = db.execute(
                    "SELECT ino, state FROM nodes WHERE parent=? AND name=?", (ino, name.encode())
                ).fetchone()
                if row is None:
                    break
                ino, state = row
            else:
                if state != 0:
                    out[rel] = (ino, state)
                for child, cname, cstate in db.execute(
                    "SELECT ino, name, state FROM nodes WHERE parent=? AND state != 0", (ino,)
                ):
                    out[f"{rel}/{bytes(cname).decode()}"] = (child, cstate)
    finally:
        db.close()
    return out


def data_file(mount: Mount, ino: int) -> Path:
    """cache/store.py's data_path."""
    return mount.cache_dir / "data" / f"{ino % 256:02x}" / str(ino)


@pytest.fixture
def quarantine_mount(
    request: pytest.FixtureRequest, make_mount: MakeMount, bucket: str, tmp_path: Path
) -> Iterator[tuple[Mount, SynapseServer, Path]]:
    """A mount with `[synapse]` (poll every second) and the Synapse whose media store it is. The
    token file does not exist yet: the admin is registered once Synapse runs."""
    mount = make_mount(bucket=bucket, extra_args=["--prefix", PREFIX], start=False)
    server = SynapseServer(tmp_path / "synapse", media_store_path=mount.path)
    server.write_config()
    token_file = tmp_path / "admin-token"
    config = tmp_path / "s3cachefs.toml"
    config.write_text(
        "[synapse]\n"
        f'admin_url = "{server.base_url}"\n'
        f'admin_token_file = "{token_file}"\n'
        'quarantine_poll_interval = "1s"\n'
    )
    mount.extra_args += ["--config", str(config)]
    mount.start()
    failed_before = request.session.testsfailed
    try:
        yield mount, server, token_file
    finally:
        try:
            if server.running:
                server.stop()
        finally:
            server.kill()
            if request.session.testsfailed > failed_before:
                print(server.describe(80))


def write_token(path: Path, token: str, mode: int) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, mode)  # whatever the umask


def test_quarantined_media_leave_the_cache_but_not_s3_and_come_back_when_released(
    quarantine_mount: tuple[Mount, SynapseServer, Path], s3: S3Client, bucket: str
) -> None:
    mount, server, token_file = quarantine_mount
    server.start()
    client = MatrixClient(server)
    client.register_admin("admin", "correct horse battery staple")
    assert client.access_token is not None

    # -- the token: missing, then readable by others (refused), then wrong (401), then right
    assert wait_until(lambda: "admin_token_file" in mount.log_text(), 30), mount.log_tail()
    write_token(token_file, client.access_token, 0o644)
    assert wait_until(lambda: "readable by others" in mount.log_text(), 30), mount.log_tail()
    write_token(token_file, "not-a-token", 0o600)
    assert wait_until(lambda: "HTTP 401" in mount.log_text(), 30), mount.log_tail()
    wait_until(lambda: False, 3.0)  # three more polls, all refused
    assert mount.log_text().count("HTTP 401") == 1, "a lasting error is logged once"
    write_token(token_file, client.access_token, 0o600)
    assert wait_until(lambda: "following Synapse's quarantine changes again" in mount.log_text(), 30), (
        mount.log_tail()
    )
    assert client.access_token not in mount.log_text()

    # -- an image (Synapse thumbnails it), downloaded: original and thumbnails are cached
    m = Medium("photo.png", "image/png", make_image("PNG", (800, 600), "RGB"), (800, 600))
    m.server_name, m.media_id, _ = client.upload(m.data, m.content_type, m.filename)
    assert wait_until(functools.partial(has_both_thumbnails, s3, bucket, m), 60), "no thumbnails"
    assert client.download(m.server_name, m.media_id).body == m.data
    for method, w, h in (("crop", 32, 32), ("scale", 320, 240)):
        client.thumbnail(m.server_name, m.media_id, w, h, method)
    paths = [m.relpath, m.thumbnail_dir]

    def states() -> dict[str, tuple[int, int]]:
        return rows_under(mount, paths)

    assert wait_until(lambda: {s for _, s in states().values()} == {CACHED}, 30), states()
    rows = states()
    assert m.relpath in rows and len(rows) >= 3, rows  # the original and at least two thumbnails
    assert all(data_file(mount, ino).exists() for ino, _ in rows.values())
    in_s3 = {rel: get_bytes(s3, bucket, rel) for rel in rows}
    removals_before = int(mount_status(mount).get("quarantine_removals", 0) or 0)  # type: ignore[call-overload]

    # -- quarantined: every cached copy goes within a few polls; S3 keeps the objects
    client.json_request("POST", f"/_synapse/admin/v1/media/quarantine/{m.server_name}/{m.media_id}", {})

    def all_gone() -> bool:
        now = states()
        return set(now) == set(rows) and all(
            s == REMOTE and not data_file(mount, ino).exists() for ino, s in now.values()
        )

    assert wait_until(all_gone, 30), f"still cached: {states()}\n{mount.log_tail()}"
    for rel, body in in_s3.items():
        assert get_bytes(s3, bucket, rel) == body, f"{rel} changed in S3"
    assert client.download(m.server_name, m.media_id, expect=None).status != 200, "served while quarantined"
    status = mount_status(mount)
    assert status["quarantine_removals"] == removals_before + len(rows), status

    # -- released: served again, the same bytes, fetched from S3 into the cache
    client.json_request("POST", f"/_synapse/admin/v1/media/unquarantine/{m.server_name}/{m.media_id}", {})
    r = client.download(m.server_name, m.media_id)
    assert r.body == m.data
    assert wait_until(lambda: states()[m.relpath][1] == CACHED, 10), states()
    for method, w, h in (("crop", 32, 32), ("scale", 320, 240)):
        assert client.thumbnail(m.server_name, m.media_id, w, h, method).status == 200

    # The stream position is kept in the index: a remount does not apply the quarantine again.
    assert server.stop() == 0
    mount.unmount()
    seen = len(mount.log_text())
    mount.start()
    server.start()
    assert wait_until(lambda: "following Synapse's quarantine changes" in mount.log_text()[seen:], 30), (
        mount.log_tail()
    )
    wait_until(lambda: False, 2.5)
    assert states()[m.relpath][1] == CACHED, "the old quarantine was applied again after the remount"
    assert client.download(m.server_name, m.media_id).body == m.data
    assert server.stop() == 0
    mount.unmount()
    problems = log_problems(mount.log_path)
    assert problems == [], "s3cachefs logged problems:\n" + "\n".join(problems[:20])
