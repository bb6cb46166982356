"""Validated, frozen settings and the pure helpers that build them.

Nothing here touches the network or the mount; the only I/O is reading a TOML file the user named.
Every problem becomes a ConfigError whose message is one line meant for a human: the CLI prints it
and exits 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """A bad option, config value or config file. The message is shown to the user as is."""


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1000,
    "KIB": 1024,
    "M": 1024**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "T": 1024**4,
    "TB": 1000**4,
    "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int, what: str = "size") -> int:
    """'50G' -> 53687091200. Bare K/M/G/T are binary (as in rclone and du); KB/MB/GB are decimal."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a size such as 50G, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{what}: must not be negative, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ConfigError(f"{what}: expected a size such as 512M, 50G or 1T, got {text!r}")
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(value) or value >= 2**63:
        raise ConfigError(f"{what}: too large, got {text!r}")
    return int(value)


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")


def parse_duration(text: str | int | float, what: str = "duration") -> float:
    """'30d' -> 2592000.0 seconds; '1h30m' works too; a bare number is seconds."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a duration such as 30d, got {text!r}")
    if isinstance(text, int | float):
        if not math.isfinite(text) or text < 0:
            raise ConfigError(f"{what}: expected a finite, non-negative number of seconds, got {text}")
        return float(text)
    s = str(text).strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise ConfigError(f"{what}: expected a duration such as 90s, 12h or 30d, got {text!r}")
    return total


def parse_min_free(text: str | int) -> float:
    """'10%' -> 0.1 (a fraction of the cache filesystem); '20G' -> bytes."""
    if isinstance(text, str) and text.strip().endswith("%"):
        try:
            pct = float(text.strip()[:-1])
        except ValueError:
            pct = -1.0
        if not 0 <= pct < 100:
            raise ConfigError(f"cache_min_free: expected a percentage from 0% to 99%, got {text!r}")
        return pct / 100
    n = parse_size(text, "cache_min_free")
    return float(n) if n else 0.0


def parse_policies(raw: Any) -> tuple[PathPolicy, ...]:
    """The `[[cache_policy]]` tables of the config file; they replace the defaults as a whole."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError("cache_policy: expected [[cache_policy]] tables")
    out = []
    for i, t in enumerate(raw):
        where = f"cache_policy #{i + 1}"
        unknown = sorted(set(t) - {"prefix", "local_only", "evict_rank", "max_age", "upload"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s): {', '.join(unknown)}")
        prefix = t.get("prefix")
        if not isinstance(prefix, str) or not prefix or prefix.startswith("/"):
            raise ConfigError(f'{where}: prefix must be a relative path such as "url_cache/"')
        local_only = t.get("local_only", False)
        if not isinstance(local_only, bool):
            raise ConfigError(f"{where}: local_only must be true or false")
        rank = t.get("evict_rank", DEFAULT_RANK)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= 9:
            raise ConfigError(f"{where}: evict_rank must be a whole number from 0 to 9")
        age = parse_duration(t["max_age"], f"{where}: max_age") if "max_age" in t else None
        if age is not None and age <= 0:
            raise ConfigError(f"{where}: max_age must be more than zero")
        upload = t.get("upload", "sync")
        if upload not in ("sync", "async"):
            raise ConfigError(f'{where}: upload must be "sync" or "async"')
        if upload == "async" and local_only:
            raise ConfigError(f"{where}: a local_only path is never uploaded; upload does not apply")
        out.append(PathPolicy(prefix, local_only, rank, age, upload_async=upload == "async"))
    return tuple(out)


def s3_key(prefix: str, relpath: str) -> str:
    """The object key for a path relative to the mount root.

    Plain concatenation, exactly as synapse-s3-storage-provider does it (`prefix + path`, no slash
    inserted), so that a bucket written by the provider mounts as is.
    """
    return prefix + relpath


STORAGE_CLASSES = ("STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING")


@dataclass(frozen=True)
class S3Options:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region_name: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = dataclasses.field(default=None, repr=False)
    session_token: str | None = dataclasses.field(default=None, repr=False)
    sse_customer_key: str | None = dataclasses.field(default=None, repr=False)
    sse_customer_algo: str = "AES256"
    storage_class: str = "STANDARD"
    # Worker threads that run boto3 calls (the provider's name for it, and its default).
    threadpool_size: int = 40
    # botocore's own default (10) is smaller than the thread pool and makes it warn and reconnect
    # (synapse-s3-storage-provider#117); None means "as many as threadpool_size".
    max_pool_connections: int | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    # Total attempts per request, first try included (botocore "standard" retry mode).
    max_attempts: int = 4
    # s3_deadline: seconds one S3 operation of the mount may take, retries included, plus
    # s3.DEADLINE_PER_MIB per MiB it moves. Bounds a close() when S3 hangs, whatever the timeouts and
    # attempts above allow; a miss opens the circuit breaker (s3.Breaker).
    deadline: float = 10.0
    # PEM file of CA certificates for an endpoint with a private CA; TLS is always verified.
    ca_bundle: str | None = None
    # Cold reads of objects above one part use parallel ranged GETs of this size.
    read_part_size: int = 8 * 1024**2
    read_concurrency: int = 8
    multipart_threshold: int = 16 * 1024**2
    multipart_chunksize: int = 8 * 1024**2

    @property
    def pool_connections(self) -> int:
        return self.max_pool_connections or self.threadpool_size


@dataclass(frozen=True)
class PathPolicy:
    """How the cache treats files under one path prefix (relative to the mount root).

    local_only: never uploaded, kept only in the cache (like the provider, which never stores
    url_cache*); such files are dropped by age and, under space pressure, only after every
    S3-backed file has gone, since they cannot be fetched again.
    evict_rank: under space pressure, lower ranks are evicted first (then least recently used).
    max_age: drop cached copies not used for this long (overrides cache_max_age for these paths).
    upload_async (config `upload = "async"`): close() returns once the file is durable on the cache
    disk, and a background uploader sends it; for files that can be made again if the cache disk is
    lost before the upload (thumbnails, which Synapse regenerates from the original).
    """

    prefix: str
    local_only: bool = False
    evict_rank: int = 1
    max_age: float | None = None
    upload_async: bool = False


# Synapse's layout (../docs, synapse/media/filepath.py): remote media can be fetched again from
# the origin server, so it goes first; URL previews are short-lived and never uploaded; thumbnails
# are made again from their original when missing, so their uploads are queued (async).
DEFAULT_POLICIES = (
    PathPolicy("url_cache/", local_only=True, evict_rank=3, max_age=7 * 86400.0),
    PathPolicy("url_cache_thumbnails/", local_only=True, evict_rank=3, max_age=7 * 86400.0),
    PathPolicy("remote_content/", evict_rank=0),
    PathPolicy("remote_thumbnail/", evict_rank=0, upload_async=True),
    PathPolicy("local_thumbnails/", evict_rank=1, upload_async=True),
    PathPolicy("local_content/", evict_rank=2),
)
DEFAULT_RANK = 1


def policy_for(policies: tuple[PathPolicy, ...], relpath: str) -> PathPolicy | None:
    """The policy with the longest prefix that `relpath` starts with."""
    best: PathPolicy | None = None
    for p in policies:
        if relpath.startswith(p.prefix) and (best is None or len(p.prefix) > len(best.prefix)):
            best = p
    return best


@dataclass(frozen=True)
class SynapseOptions:
    """The `[synapse]` table: where Synapse's admin API is, for following its quarantine changes
    (quarantine.py). The token is read from its file at each poll (so a new one is picked up), never
    kept in the config or logged."""

    admin_url: str
    admin_token_file: Path
    quarantine_poll_interval: float = 30.0


SYNAPSE_FILE_KEYS = ("admin_url", "admin_token_file", "quarantine_poll_interval")


def parse_synapse(raw: Any) -> SynapseOptions:
    if not isinstance(raw, dict):
        raise ConfigError("synapse: expected a [synapse] table")
    unknown = sorted(set(raw) - set(SYNAPSE_FILE_KEYS))
    if unknown:
        raise ConfigError(f"synapse: unknown key(s): {', '.join(unknown)}")
    url = raw.get("admin_url")
    if not isinstance(url, str) or not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise ConfigError(
            f"synapse: admin_url: expected http://host[:port] or https://host[:port], got {url!r}"
        )
    token_file = raw.get("admin_token_file")
    if not isinstance(token_file, str) or not token_file:
        raise ConfigError("synapse: admin_token_file: required (a file holding an admin access token)")
    interval = raw.get("quarantine_poll_interval", "30s")
    secs = parse_duration(interval, "synapse: quarantine_poll_interval")
    if secs <= 0:
        raise ConfigError(f"synapse: quarantine_poll_interval: must be more than zero, got {interval!r}")
    return SynapseOptions(url.rstrip("/"), Path(token_file).absolute(), secs)


@dataclass(frozen=True)
class Config:
    s3: S3Options
    mountpoint: Path
    cache_dir: Path
    cache_size: int = 10 * 1024**3
    # Seconds since last access after which a cached copy is dropped; None keeps it until space is needed.
    cache_max_age: float | None = None
    # Keep at least this much free on the cache filesystem: bytes, or a fraction of it (0 < f < 1).
    cache_min_free: float = 0.0
    policies: tuple[PathPolicy, ...] = DEFAULT_POLICIES
    # List the whole prefix in the background at every mount, to see what others changed in the bucket.
    listing: bool = True
    # Seconds the mount trusts its index about a name (there or not, its ETag) before asking S3 again;
    # None: for ever (only this mount writes to the bucket). mountpoint-s3's --metadata-ttl.
    metadata_ttl: float | None = None
    # Seconds between two background listings after the mount's first (None: only the first). Off
    # with `listing`.
    relist_interval: float | None = 3600.0
    # Kernel read-ahead of the mount (bytes; 0 keeps the kernel's 128 KiB). Also the largest read
    # request the kernel sends us: 1 MiB means 8 times fewer round trips than the default.
    read_ahead: int = 1024 * 1024
    foreground: bool = False
    allow_other: bool = False
    uid: int | None = None
    gid: int | None = None
    log_level: str = "INFO"
    log_file: Path | None = None
    # Bytes of async uploads waiting in the queue at most; past it, those files upload at close().
    upload_queue_max: int = 1024**3
    # (host, port) of the Prometheus endpoint, None: off. No authentication: loopback or a private
    # interface only (docs/metrics.md).
    metrics_addr: tuple[str, int] | None = None
    # The `[synapse]` table: follow Synapse's quarantine changes (None: off).
    synapse: SynapseOptions | None = None

    def key(self, relpath: str) -> str:
        return s3_key(self.s3.prefix, relpath)


# Config-file keys. The S3 ones follow synapse-s3-storage-provider's names so a provider block can be
# copied over; the rest are ours and mirror the command-line flags (with underscores).
S3_FILE_KEYS = (
    "bucket",
    "prefix",
    "endpoint_url",
    "region_name",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "sse_customer_key",
    "sse_customer_algo",
    "storage_class",
    "threadpool_size",
    "max_pool_connections",
    "connect_timeout",
    "read_timeout",
    "max_attempts",
    "multipart_threshold",
    "multipart_chunksize",
    "ca_bundle",
    "read_part_size",
    "read_concurrency",
)
SECRET_KEYS = ("secret_access_key", "session_token", "sse_customer_key")
MOUNT_FILE_KEYS = (
    "mountpoint",
    "cache_dir",
    "cache_size",
    "cache_max_age",
    "cache_min_free",
    "cache_policy",
    "upload_queue_max",
    "listing",
    "metadata_ttl",
    "relist_interval",
    "read_ahead",
    "s3_deadline",
    "allow_other",
    "uid",
    "gid",
    "log_level",
    "log_file",
    "metrics_addr",
    "synapse",
)


def parse_metrics_addr(text: str) -> tuple[str, int]:
    """HOST:PORT, or [IPv6]:PORT, of the metrics endpoint."""
    host, sep, port_s = str(text).strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigError(f"metrics_addr: expected HOST:PORT, e.g. 127.0.0.1:9406, got {text!r}")
    return host, int(port_s)


def load_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    unknown = sorted(set(data) - set(S3_FILE_KEYS) - set(MOUNT_FILE_KEYS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s): {', '.join(unknown)}")
    secrets = sorted(k for k in SECRET_KEYS if data.get(k))
    if secrets:
        mode = os.stat(path).st_mode
        if mode & 0o077:
            # A warning, not an error: refusing would take a homeserver's media offline over a chmod.
            log.warning(
                "config file %s holds %s but is readable by others (mode %o); chmod 600 it",
                path,
                ", ".join(secrets),
                mode & 0o777,
            )
    return data


def default_cache_dir(bucket: str, prefix: str = "") -> Path:
    """One directory per bucket and prefix, so two mounts of one bucket never share (or fight over) one."""
    if os.geteuid() == 0:
        base = Path("/var/cache/s3cachefs")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "s3cachefs"
    if not prefix:
        return base / bucket
    return base / f"{bucket}-{hashlib.sha256(prefix.encode()).hexdigest()[:12]}"


def _str(values: Mapping[str, Any], name: str) -> str | None:
    v = values.get(name)
    if v is None or v == "":
        # An empty value (`session_token = ""`) means "not set", as in the provider's YAML.
        return None
    if not isinstance(v, str):
        raise ConfigError(f"{name}: expected a string, got {v!r}")
    if "\x00" in v:
        raise ConfigError(f"{name}: must not contain a NUL character")
    return v


def _int(values: Mapping[str, Any], name: str, minimum: int, maximum: int = 2**31) -> int | None:
    v = values.get(name)
    if v is None:
        return None
    if isinstance(v, str) and re.fullmatch(r"\s*-?[0-9]+\s*", v):
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"{name}: expected a whole number, got {v!r}")
    if v < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {v}")
    if v > maximum:
        raise ConfigError(f"{name}: must be at most {maximum}, got {v}")
    return v


def _bool(values: Mapping[str, Any], name: str) -> bool | None:
    v = values.get(name)
    if v is None or isinstance(v, bool):
        return v
    raise ConfigError(f"{name}: expected true or false, got {v!r}")


def _seconds(values: Mapping[str, Any], name: str, positive: bool) -> float | None:
    v = values.get(name)
    if v is None:
        return None
    secs = parse_duration(v, name)
    if positive and secs <= 0:
        raise ConfigError(f"{name}: must be more than zero, got {v!r}")
    return secs


def _ttl(values: Mapping[str, Any], name: str, default: float | None, off: tuple[str, ...]) -> float | None:
    """A duration, or one of the words in `off` (None: unlimited, or never)."""
    v = values.get(name)
    if v is None:
        return default
    if isinstance(v, str) and v.strip().lower() in off:
        return None
    try:
        return parse_duration(v, name)
    except ConfigError:
        raise ConfigError(
            f"{name}: expected a duration such as 30s or 5m, or {' or '.join(off)}, got {v!r}"
        ) from None


# S3's rule is 3-63 characters; some S3 servers allow capitals and underscores, so allow those too.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,62}$")


def _credentials(values: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Keys from the config file; else None, and boto3 looks in its usual chain (AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY first). Env files written for other S3 tools, matrix-docker-ansible-deploy's
    among them, name the pair AWS_ACCESS_KEY / AWS_SECRET_KEY: taken only when both are set and the
    standard names are absent, so that they never mix with (or override) the standard ones."""
    access_key_id, secret = _str(values, "access_key_id"), _str(values, "secret_access_key")
    if access_key_id is not None or secret is not None:
        return access_key_id, secret
    env = os.environ
    if "AWS_ACCESS_KEY_ID" in env or "AWS_SECRET_ACCESS_KEY" in env:
        return None, None
    alt_key, alt_secret = env.get("AWS_ACCESS_KEY"), env.get("AWS_SECRET_KEY")
    if alt_key and alt_secret:
        return alt_key, alt_secret
    return None, None


def build_config(values: Mapping[str, Any]) -> Config:
    """Validate merged settings (file values overridden by flags; None means "not given")."""
    bucket = _str(values, "bucket")
    if not bucket:
        raise ConfigError("bucket: required (give it on the command line or as `bucket` in the config file)")
    if not _BUCKET_RE.match(bucket):
        raise ConfigError(f"bucket: not a valid bucket name: {bucket!r}")
    mountpoint = _str(values, "mountpoint")
    if not mountpoint:
        raise ConfigError("mountpoint: required")

    storage_class = (_str(values, "storage_class") or "STANDARD").upper()
    if storage_class not in STORAGE_CLASSES:
        raise ConfigError(
            f"storage_class: must be one of {', '.join(STORAGE_CLASSES)}, got {storage_class!r}"
        )
    endpoint = _str(values, "endpoint_url")
    if endpoint is not None and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", endpoint):
        raise ConfigError(
            f"endpoint_url: expected http://host[:port] or https://host[:port], got {endpoint!r}"
        )
    ca_bundle = _str(values, "ca_bundle")
    if ca_bundle is not None and not os.path.isfile(ca_bundle):
        raise ConfigError(f"ca_bundle: no such file: {ca_bundle}")
    sse_key = _str(values, "sse_customer_key")
    sse_algo = _str(values, "sse_customer_algo") or "AES256"
    if sse_algo != "AES256":
        raise ConfigError(f"sse_customer_algo: only AES256 is supported by S3, got {sse_algo!r}")

    access_key_id, secret_access_key = _credentials(values)
    s3_kwargs: dict[str, Any] = {
        "bucket": bucket,
        "prefix": _str(values, "prefix") or "",
        "endpoint_url": endpoint,
        "region_name": _str(values, "region_name"),
        "access_key_id": access_key_id,
        "secret_access_key": secret_access_key,
        "session_token": _str(values, "session_token"),
        "sse_customer_key": sse_key,
        "sse_customer_algo": sse_algo,
        "storage_class": storage_class,
        "ca_bundle": os.path.abspath(ca_bundle) if ca_bundle else None,
    }
    for name, minimum in (
        ("threadpool_size", 1),
        ("max_pool_connections", 1),
        ("max_attempts", 1),
        ("read_concurrency", 1),
    ):
        n = _int(values, name, minimum, 10_000)
        if n is not None:
            s3_kwargs[name] = n
    for name in ("connect_timeout", "read_timeout"):
        secs = _seconds(values, name, positive=True)
        if secs is not None:
            if secs > 86400:  # botocore turns a larger one into an error about time_t at the first call
                raise ConfigError(f"{name}: must be at most a day (86400s), got {values[name]!r}")
            s3_kwargs[name] = secs
    deadline = _seconds(values, "s3_deadline", positive=True)
    if deadline is not None:
        s3_kwargs["deadline"] = deadline
    for name in ("multipart_threshold", "multipart_chunksize", "read_part_size"):
        if values.get(name) is not None:
            s3_kwargs[name] = parse_size(values[name], name)
    if "multipart_threshold" not in s3_kwargs and "multipart_chunksize" in s3_kwargs:
        # Only the part size was given: never split a file into a single part.
        s3_kwargs["multipart_threshold"] = max(
            S3Options.multipart_threshold, s3_kwargs["multipart_chunksize"]
        )
    s3 = S3Options(**s3_kwargs)
    # S3 refuses parts under 5 MiB (except the last) and allows at most 10,000 parts.
    # A download plans one entry per part: a part of 0 bytes never ends the plan, a tiny one makes
    # it as long as the object.
    if s3.read_part_size < 64 * 1024:
        raise ConfigError(f"read_part_size: must be at least 64K, got {s3.read_part_size}")
    if s3.multipart_chunksize < 5 * 1024**2:
        raise ConfigError("multipart_chunksize: S3 needs parts of at least 5M")
    if s3.multipart_threshold < s3.multipart_chunksize:
        raise ConfigError("multipart_threshold: must be at least multipart_chunksize")

    cache_dir_s = _str(values, "cache_dir")
    cache_size = (
        parse_size(values["cache_size"], "cache_size") if values.get("cache_size") is not None else None
    )
    if cache_size is not None and cache_size < 1024**2:
        raise ConfigError(f"cache_size: must be at least 1M, got {values['cache_size']!r}")
    max_age = _seconds(values, "cache_max_age", positive=True)
    min_free = parse_min_free(values["cache_min_free"]) if values.get("cache_min_free") is not None else 0.0
    policies = (
        parse_policies(values["cache_policy"]) if values.get("cache_policy") is not None else DEFAULT_POLICIES
    )
    log_level = (_str(values, "log_level") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level: must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    log_file = _str(values, "log_file")

    kwargs: dict[str, Any] = {
        "s3": s3,
        "mountpoint": Path(mountpoint).absolute(),
        "cache_dir": Path(cache_dir_s).absolute() if cache_dir_s else default_cache_dir(bucket, s3.prefix),
        "cache_max_age": max_age,
        "cache_min_free": min_free,
        "policies": policies,
        "foreground": bool(_bool(values, "foreground")),
        "listing": _bool(values, "listing") is not False,
        "metadata_ttl": _ttl(values, "metadata_ttl", None, ("unlimited", "indefinite")),
        # 0 turns the relisting off as well.
        "relist_interval": _ttl(values, "relist_interval", Config.relist_interval, ("off", "never")) or None,
        "read_ahead": parse_size(values["read_ahead"], "read_ahead")
        if values.get("read_ahead") is not None
        else 1024 * 1024,
        "allow_other": bool(_bool(values, "allow_other")),
        "uid": _int(values, "uid", 0, 2**32 - 2),
        "gid": _int(values, "gid", 0, 2**32 - 2),
        "log_level": log_level,
        "log_file": Path(log_file).absolute() if log_file else None,
    }
    if cache_size is not None:
        kwargs["cache_size"] = cache_size
    if values.get("upload_queue_max") is not None:
        kwargs["upload_queue_max"] = parse_size(values["upload_queue_max"], "upload_queue_max")
    metrics_addr = _str(values, "metrics_addr")
    if metrics_addr:
        kwargs["metrics_addr"] = parse_metrics_addr(metrics_addr)
    if values.get("synapse") is not None:
        kwargs["synapse"] = parse_synapse(values["synapse"])
    return Config(**kwargs)
