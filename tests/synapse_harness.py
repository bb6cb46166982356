"""A real Synapse homeserver for the end-to-end tests, started the way a user starts one.

`SynapseServer` writes a homeserver.yaml (SQLite, loopback only, federation and URL previews off,
generous rate limits, `media_store_path` = an s3cachefs mount), runs
`python -m synapse.app.homeserver -c homeserver.yaml` and stops it with SIGTERM. `MatrixClient` talks
to it over HTTP with the standard library (urllib), as a client would.

Synapse's own data (SQLite database, signing key, log config, logs) lives in a directory outside the
mount. Every wait is bounded and every HTTP call has a timeout. A Synapse still running when the
interpreter exits is killed (it would otherwise keep the mount busy).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import IO, Any

from .harness import LOOPBACK, HarnessError, free_ports, tail

# The same values for every rc_* limit we touch: far above anything one test does.
_GENEROUS = {"per_second": 1000, "burst_count": 1000}

_live: list[SynapseServer] = []


@atexit.register
def _sweep() -> None:
    for s in list(_live):
        with contextlib.suppress(Exception):
            s.kill()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class SynapseServer:
    """One `python -m synapse.app.homeserver` on 127.0.0.1, with its data in `data_dir`.

    start() may be called again after stop(): the same config, database and port are reused.
    """

    START_TIMEOUT = 120.0
    STOP_TIMEOUT = 30.0
    SERVER_NAME = "s3cachefs-e2e.test"

    def __init__(self, data_dir: Path, media_store_path: Path, max_upload_size: str = "100M") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.media_store_path = Path(media_store_path).resolve()
        self.max_upload_size = max_upload_size
        self.config_path = self.data_dir / "homeserver.yaml"
        self.log_config_path = self.data_dir / "log.config"
        self.log_path = self.data_dir / "homeserver.log"
        # stdout/stderr of the process: tracebacks from before logging is set up land here.
        self.console_path = self.data_dir / "console.log"
        self.signing_key_path = self.data_dir / "signing.key"
        self.registration_shared_secret = secrets.token_hex(32)
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- configuration ----------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "server_name": self.SERVER_NAME,
            "pid_file": str(self.data_dir / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "type": "http",
                    "tls": False,
                    "bind_addresses": [LOOPBACK],
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {"name": "sqlite3", "args": {"database": str(self.data_dir / "homeserver.db")}},
            "log_config": str(self.log_config_path),
            "signing_key_path": str(self.signing_key_path),
            "macaroon_secret_key": secrets.token_hex(32),
            "form_secret": secrets.token_hex(32),
            "registration_shared_secret": self.registration_shared_secret,
            "enable_registration": False,
            "report_stats": False,
            "enable_metrics": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "federation_domain_whitelist": [],
            "presence": {"enabled": False},
            # Media: the s3cachefs mount as an ordinary directory, no storage providers,
            # enable_local_media_storage left at its default (true), no URL previews.
            "media_store_path": str(self.media_store_path),
            "max_upload_size": self.max_upload_size,
            "url_preview_enabled": False,
            "rc_message": _GENEROUS,
            "rc_registration": _GENEROUS,
            "rc_login": {"address": _GENEROUS, "account": _GENEROUS, "failed_attempts": _GENEROUS},
            "rc_media_create": _GENEROUS,
        }

    def log_config(self) -> dict[str, Any]:
        return {
            "version": 1,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"
                }
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                }
            },
            "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }

    def write_config(self) -> None:
        """homeserver.yaml and log.config (JSON is valid YAML), and an ed25519 signing key."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")
        self.log_config_path.write_text(json.dumps(self.log_config(), indent=2) + "\n")
        if not self.signing_key_path.exists():
            # The format of `--generate-keys` (signedjson.key.write_signing_keys): algorithm, key id,
            # unpadded base64 of the 32-byte seed. Writing it saves one Synapse start.
            seed = base64.b64encode(os.urandom(32)).decode().rstrip("=")
            self.signing_key_path.write_text(f"ed25519 a_e2e {seed}\n")
            self.signing_key_path.chmod(0o600)

    # -- lifecycle --------------------------------------------------------------------------------

    def command(self) -> list[str]:
        return [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)]

    def describe(self, lines: int = 60) -> str:
        return (
            f"--- {self.log_path} ---\n{tail(self.log_path, lines)}\n"
            f"--- {self.console_path} ---\n{tail(self.console_path, 20)}"
        )

    def start(self) -> float:
        """Start Synapse and wait until its client API answers. Returns the seconds that took."""
        if self.running:
            raise HarnessError("SynapseServer.start(): already running")
        if not self.config_path.exists():
            self.write_config()
        began = time.monotonic()
        self._console = open(self.console_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self._console.write(
            f"\n===== {time.strftime('%H:%M:%S')} start: {' '.join(self.command())}\n".encode()
        )
        self._console.flush()
        env = dict(os.environ)
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _live.append(self)
        deadline = began + self.START_TIMEOUT
        last = "no attempt yet"
        while True:
            code = self.proc.poll()
            if code is not None:
                self._reap()
                raise HarnessError(f"Synapse exited with code {code} before it was ready\n{self.describe()}")
            try:
                status, _, _ = http_request("GET", f"{self.base_url}/_matrix/client/versions", timeout=2)
                if status == 200:
                    return time.monotonic() - began
                last = f"/_matrix/client/versions answered {status}"
            except OSError as e:
                last = str(e)
            if time.monotonic() >= deadline:
                self.kill()
                raise HarnessError(
                    f"Synapse not ready at {self.base_url} after {self.START_TIMEOUT:.0f}s ({last})\n"
                    f"{self.describe()}"
                )
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM and wait (bounded). Raises if Synapse does not exit in time (it is then killed)."""
        assert self.proc is not None, "stop(): never started"
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise HarnessError(
                    f"Synapse did not exit within {self.STOP_TIMEOUT:.0f}s of SIGTERM\n{self.describe()}"
                ) from None
        self._reap()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._reap()

    def _reap(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None
        if self in _live:
            _live.remove(self)


# ---------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------

# No proxies, whatever the environment says: everything we talk to is on loopback.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, Message, bytes]:
    """One HTTP request; returns (status, headers, body) for every status, raises OSError on I/O errors."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


@dataclass
class Response:
    status: int
    headers: Message
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class MatrixClient:
    """Client-server and admin API calls against one SynapseServer."""

    server: SynapseServer
    access_token: str | None = None
    user_id: str | None = None
    timeout: float = 60.0
    calls: list[tuple[str, str, int, float]] = field(default_factory=list)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        query: dict[str, str | int] | None = None,
        expect: int | None = 200,
        auth: bool = True,
    ) -> Response:
        url = self.server.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers: dict[str, str] = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if auth and self.access_token is not None:
            headers["Authorization"] = f"Bearer {self.access_token}"
        began = time.monotonic()
        status, resp_headers, data = http_request(method, url, body, headers, self.timeout)
        seconds = time.monotonic() - began
        self.calls.append((method, path, status, seconds))
        if expect is not None and status != expect:
            raise AssertionError(
                f"{method} {path}: HTTP {status}, expected {expect}: {data[:500]!r}\n{self.server.describe(40)}"
            )
        return Response(status, resp_headers, data, seconds)

    def json_request(
        self, method: str, path: str, payload: Any = None, expect: int | None = 200, auth: bool = True
    ) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        ctype = None if payload is None else "application/json"
        return self.request(method, path, body, ctype, expect=expect, auth=auth).json()

    # -- accounts ---------------------------------------------------------------------------------

    def register_admin(self, username: str, password: str) -> None:
        """Shared-secret registration (HMAC-SHA1 over nonce, user, password, "admin"); logs in as it."""
        path = "/_synapse/admin/v1/register"
        nonce = self.json_request("GET", path, auth=False)["nonce"]
        mac = hmac.new(self.server.registration_shared_secret.encode(), digestmod=hashlib.sha1)
        for part in (
            nonce.encode(),
            b"\x00",
            username.encode(),
            b"\x00",
            password.encode(),
            b"\x00",
            b"admin",
        ):
            mac.update(part)
        payload = {
            "nonce": nonce,
            "username": username,
            "password": password,
            "admin": True,
            "mac": mac.hexdigest(),
        }
        result = self.json_request("POST", path, payload, auth=False)
        self.access_token = result["access_token"]
        self.user_id = result["user_id"]

    # -- media ------------------------------------------------------------------------------------

    def upload(self, data: bytes, content_type: str, filename: str) -> tuple[str, str, float]:
        """POST /_matrix/media/v3/upload; returns (server_name, media_id, seconds)."""
        r = self.request("POST", "/_matrix/media/v3/upload", data, content_type, query={"filename": filename})
        uri = r.json()["content_uri"]
        assert isinstance(uri, str) and uri.startswith("mxc://"), uri
        server_name, media_id = uri[len("mxc://") :].split("/", 1)
        return server_name, media_id, r.seconds

    def download(self, server_name: str, media_id: str, expect: int | None = 200) -> Response:
        """Authenticated media (MSC3916): /_matrix/client/v1/media/download with the access token."""
        return self.request(
            "GET", f"/_matrix/client/v1/media/download/{server_name}/{media_id}", expect=expect
        )

    def thumbnail(
        self, server_name: str, media_id: str, width: int, height: int, method: str, expect: int | None = 200
    ) -> Response:
        return self.request(
            "GET",
            f"/_matrix/client/v1/media/thumbnail/{server_name}/{media_id}",
            query={"width": width, "height": height, "method": method},
            expect=expect,
        )

    def admin_delete_media(self, server_name: str, media_id: str) -> Any:
        return self.json_request("DELETE", f"/_synapse/admin/v1/media/{server_name}/{media_id}")

    def admin_delete_old_local_media(self, before_ts: int, keep_profiles: bool = True) -> Any:
        """POST /_synapse/admin/v1/media/delete?before_ts=...: local media last used before before_ts (ms)."""
        r = self.request(
            "POST",
            "/_synapse/admin/v1/media/delete",
            b"{}",
            "application/json",
            query={"before_ts": before_ts, "keep_profiles": "true" if keep_profiles else "false"},
        )
        return r.json()


__all__ = ["MatrixClient", "Response", "SynapseServer", "http_request"]
