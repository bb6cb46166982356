"""Follow Synapse's quarantine changes and drop the cached copies of quarantined media.

Synapse (1.163+) numbers every (un)quarantine in a stream that its admin API pages through:
`GET /_synapse/admin/v1/media/quarantine_changes?from=N` gives up to 100 changes after position N,
each `{origin, media_id, quarantined}`, and `next_batch`, the position to ask from next. We keep that
position in the index (meta `synapse_quarantine_from`), so a restart goes on where it stopped and a
change made while the mount was down is still seen.

For a quarantined medium, the cached copies of its original and its thumbnails are removed
(Cache.drop_copies: CACHED -> REMOTE). The objects in S3 stay: Synapse may unquarantine the medium,
and then its next read simply fetches it again. Where the files are (synapse/media/filepath.py):
local media at local_content/AA/BB/REST and local_thumbnails/AA/BB/REST/*, remote media at
remote_content/ORIGIN/AA/BB/REST and remote_thumbnail/ORIGIN/AA/BB/REST/*, where the remote one's
path is made of its filesystem_id, which `GET /_synapse/admin/v1/media/{origin}/{media_id}` gives
(and which tells local media, with no filesystem_id, from remote).

HTTP runs in worker threads (urllib, a timeout per request) under a limiter of their own, so a
hung Synapse holds up nothing else. Errors (Synapse down, a refused token) are logged once each time
the state changes, and the task keeps polling: it never ends the mount.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import stat
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import trio

from .cache import Cache
from .config import SynapseOptions

log = logging.getLogger(__name__)

POSITION_KEY = "synapse_quarantine_from"
HTTP_TIMEOUT = 10.0
HTTP_THREADS = 2
# Synapse's own page size for the stream (rest/admin/media.py): a full page means more is waiting.
PAGE = 100
# A path component Synapse would accept (filepath.py's _validate_path_component refuses "/" and "..").
_COMPONENT = re.compile(r"^[^/\0]+$")


class PollError(Exception):
    """Why a poll failed, as one line for the log (never the token)."""


@dataclass(frozen=True)
class Change:
    origin: str
    media_id: str
    quarantined: bool


def read_token(path: os.PathLike[str] | str) -> str:
    """The admin access token from its file. Refused when others may read the file: it is a
    Synapse admin's token."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise PollError(f"admin_token_file {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o077:
            raise PollError(
                f"admin_token_file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                "not using it: chmod 600 it"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            token = f.read(4096).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    if not token or any(c.isspace() for c in token):
        raise PollError(f"admin_token_file {path}: expected one access token")
    return token


class SynapseAdmin:
    """The two admin API calls, synchronous (run them in a worker thread)."""

    def __init__(self, opts: SynapseOptions, timeout: float = HTTP_TIMEOUT):
        self.opts = opts
        self.timeout = timeout

    def _get(self, path: str, query: dict[str, str | int] | None = None) -> tuple[int, Any]:
        """(status, JSON body); 404 and 400 are answers, other statuses and failures PollError."""
        token = read_token(self.opts.admin_token_file)
        url = self.opts.admin_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = json.loads(resp.read())
                if not isinstance(body, dict):
                    raise PollError(f"{path}: unexpected answer")
                return resp.status, body
        except urllib.error.HTTPError as e:
            body = e.read()[:2000]
            with e:
                if e.code in (400, 404):
                    try:
                        answer = json.loads(body)
                    except ValueError:
                        answer = {}
                    return e.code, answer if isinstance(answer, dict) else {}
                what = {401: "token refused", 403: "token is not an admin's"}.get(e.code, e.reason)
                raise PollError(f"{self.opts.admin_url}: HTTP {e.code} ({what})") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise PollError(f"{self.opts.admin_url}: {reason}") from None

    def changes(self, from_id: int) -> tuple[int, list[Change]] | None:
        """(next_batch, changes) after position from_id; None if Synapse refuses the position (a
        position from another Synapse, or a database restored from an older backup)."""
        status, body = self._get("/_synapse/admin/v1/media/quarantine_changes", {"from": from_id})
        if status == 400 and body.get("errcode") == "M_INVALID_PARAM":
            return None
        if status != 200:
            raise PollError(f"quarantine_changes: HTTP {status}: {body.get('error', '')}")
        try:
            return int(body["next_batch"]), [
                Change(str(c["origin"]), str(c["media_id"]), bool(c["quarantined"])) for c in body["changes"]
            ]
        except (KeyError, TypeError, ValueError):
            raise PollError("quarantine_changes: unexpected answer (Synapse 1.163 or later needed)") from None

    def media_paths(self, origin: str, media_id: str) -> list[str]:
        """The medium's original and thumbnail directory, relative to the media store; [] when
        Synapse does not know it (any more)."""
        if not _COMPONENT.match(origin) or origin in (".", ".."):
            return []
        q = urllib.parse.quote
        status, info = self._get(f"/_synapse/admin/v1/media/{q(origin, safe='')}/{q(media_id, safe='')}")
        if status != 200:
            return []
        return paths_of(origin, media_id, info.get("filesystem_id"))


def paths_of(origin: str, media_id: str, filesystem_id: str | None) -> list[str]:
    """synapse/media/filepath.py: local media by media id, remote media by filesystem id."""
    fid = media_id if filesystem_id is None else filesystem_id
    if len(fid) < 5 or not _COMPONENT.match(fid) or ".." in fid:
        return []
    tail = f"{fid[:2]}/{fid[2:4]}/{fid[4:]}"
    if filesystem_id is None:
        return [f"local_content/{tail}", f"local_thumbnails/{tail}"]
    return [f"remote_content/{origin}/{tail}", f"remote_thumbnail/{origin}/{tail}"]


class QuarantineFollower:
    def __init__(self, cache: Cache, opts: SynapseOptions, admin: SynapseAdmin | None = None):
        self.cache = cache
        self.opts = opts
        self.admin = admin or SynapseAdmin(opts)
        self.limiter = trio.CapacityLimiter(HTTP_THREADS)
        self._problem: str | None = ""  # "": no poll yet, None: the last one worked
        # Files that were open when their medium was quarantined: tried again at each poll.
        self._busy: list[str] = []

    async def _call(self, fn: Any, *args: Any) -> Any:
        # abandon_on_cancel: an unmount does not wait for a hung Synapse's timeout.
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter, abandon_on_cancel=True)

    def _position(self) -> int:
        try:
            return int(self.cache.index.get_meta(POSITION_KEY) or 0)
        except ValueError:
            return 0

    async def poll_once(self) -> bool:
        """Apply one page of changes. True when a full page came (more may be waiting)."""
        if self._busy:
            _, self._busy = self.cache.drop_copies(self._busy)
        pos = self._position()
        got = await self._call(self.admin.changes, pos)
        if got is None:
            log.warning(
                "Synapse refused the quarantine stream position %d (another Synapse, or its database "
                "was restored?); following it from the start again",
                pos,
            )
            self.cache.index.set_meta(POSITION_KEY, "0")
            return True
        next_batch, changes = got
        # Only the last change of a medium in the page counts (quarantined, then released).
        last: dict[tuple[str, str], bool] = {}
        for c in changes:
            last[(c.origin, c.media_id)] = c.quarantined
        for (origin, media_id), quarantined in last.items():
            if not quarantined:
                continue  # fetched again from S3 at its next read
            paths = await self._call(self.admin.media_paths, origin, media_id)
            removed, busy = self.cache.drop_copies(paths)
            self._busy += busy
            log.info(
                "quarantined %s/%s: removed %d cached copies%s",
                origin,
                media_id,
                removed,
                f" ({len(busy)} open, later)" if busy else "",
            )
        # Only once the page is applied: a crash before this replays it, which is harmless.
        if next_batch != pos:
            self.cache.index.set_meta(POSITION_KEY, str(next_batch))
        return len(changes) >= PAGE

    def _state(self, problem: str | None) -> None:
        """Log once per change of state, not at every poll."""
        if problem == self._problem:
            return
        if problem is not None:
            log.warning(
                "cannot follow Synapse's quarantine changes: %s; retrying every %.0fs",
                problem,
                self.opts.quarantine_poll_interval,
            )
        elif self._problem:
            log.info("following Synapse's quarantine changes again (%s)", self.opts.admin_url)
        else:
            log.info("following Synapse's quarantine changes at %s", self.opts.admin_url)
        self._problem = problem

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            more = False
            try:
                more = await self.poll_once()
                self._state(None)
            except PollError as e:
                self._state(str(e))
            except (OSError, sqlite3.Error) as e:
                # A full cache disk (the index): the removals are tried again at the next poll.
                self._state(f"{type(e).__name__}: {e}")
            if not more:
                await trio.sleep(self.opts.quarantine_poll_interval)
