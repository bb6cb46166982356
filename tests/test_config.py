"""Settings: size/duration parsing, key building, validation, config files and the command line.

Pure tests: no server, no mount (one subprocess runs the CLI to check what a user sees on bad input).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from s3cachefs.cache.policy import Policies
from s3cachefs.cli import EXIT_USAGE, config_from_args, main
from s3cachefs.config import (
    DEFAULT_POLICIES,
    Config,
    ConfigError,
    PathPolicy,
    S3Options,
    build_config,
    default_cache_dir,
    load_config_file,
    parse_duration,
    parse_policies,
    parse_size,
    s3_key,
)

from .harness import REPO_ROOT

GiB = 1024**3
MiB = 1024**2

MINIMAL = {"bucket": "media", "mountpoint": "/mnt/media"}


def config(**values: Any) -> Config:
    return build_config({**MINIMAL, **values})


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s3cachefs.toml"
    path.write_text(text)
    return path


# --- parse_size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50G", 50 * GiB),
        ("512M", 512 * MiB),
        ("512m", 512 * MiB),
        ("1.5G", int(1.5 * GiB)),
        ("64K", 64 * 1024),
        ("2T", 2 * 1024**4),
        ("1GiB", GiB),
        ("4096", 4096),
        (" 8M ", 8 * MiB),
        (4096, 4096),
        (0, 0),
    ],
)
def test_size_suffixes_are_binary_and_bare_numbers_are_bytes(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10GB", 10 * 1000**3), ("500MB", 500 * 1000**2), ("3KB", 3000), ("1TB", 1000**4)],
)
def test_size_suffixes_ending_in_b_are_decimal(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["abc", "-1", "5X", "", "G", "1.2.3G", "5 G B", "1e9", True, -1])
def test_size_rejects_garbage_negative_and_unknown_units(bad: str | int) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_size_error_names_the_setting_and_the_value() -> None:
    with pytest.raises(ConfigError, match=r"^cache_size: .*'5X'"):
        parse_size("5X", "cache_size")


# --- parse_duration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", 30 * 86400.0),
        ("12h", 12 * 3600.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("2w", 14 * 86400.0),
        ("1h30m", 5400.0),
        ("1d12h", 36 * 3600.0),
        ("1.5h", 5400.0),
        ("30D", 30 * 86400.0),
        ("45", 45.0),
        ("2.5", 2.5),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_duration_units_combine_and_bare_numbers_are_seconds(text: str | float, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["", "  ", "abc", "5y", "-5", "h", "1h-5m", "30 days", True, -1, -0.5])
def test_duration_rejects_garbage_negative_and_unknown_units(bad: str | float) -> None:
    with pytest.raises(ConfigError):
        parse_duration(bad)


def test_duration_error_names_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"^cache_max_age: .*'5y'"):
        parse_duration("5y", "cache_max_age")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_duration_rejects_nan_and_infinity(bad: float) -> None:
    with pytest.raises(ConfigError, match=r"^read_timeout: "):
        parse_duration(bad, "read_timeout")


@pytest.mark.parametrize("literal", ["nan", "inf"])
def test_timeout_of_nan_or_inf_in_a_config_file_is_refused(tmp_path: Path, literal: str) -> None:
    path = write_toml(tmp_path, f'bucket = "media"\nread_timeout = {literal}\n')
    with pytest.raises(ConfigError, match=r"^read_timeout: "):
        config_from_args(["mount", "--config", str(path), "/mnt/media"])


# --- s3_key -------------------------------------------------------------------------------------


def test_prefix_is_concatenated_without_slash() -> None:
    assert s3_key("foo", "local_content/ab/cd/x") == "foolocal_content/ab/cd/x"


def test_prefix_with_trailing_slash_makes_a_folder() -> None:
    assert s3_key("p/", "local_content/ab/cd/x") == "p/local_content/ab/cd/x"


def test_empty_prefix_keeps_the_path_as_the_key() -> None:
    assert (
        s3_key("", "local_thumbnails/ab/cd/x/32-32-image-png") == "local_thumbnails/ab/cd/x/32-32-image-png"
    )


def test_config_key_uses_the_configured_prefix() -> None:
    assert config(prefix="synapse/").key("remote_content/x") == "synapse/remote_content/x"
    assert config().key("remote_content/x") == "remote_content/x"


# --- build_config -------------------------------------------------------------------------------


def test_minimal_config_gets_the_documented_defaults() -> None:
    c = config()
    assert c.s3.bucket == "media"
    assert c.s3.prefix == ""
    assert c.s3.endpoint_url is None
    assert c.s3.storage_class == "STANDARD"
    assert c.s3.threadpool_size == 40
    assert c.s3.pool_connections == 40
    assert c.s3.multipart_chunksize == 8 * MiB
    assert c.s3.multipart_threshold == 16 * MiB
    assert c.mountpoint == Path("/mnt/media")
    assert c.cache_dir == default_cache_dir("media")
    assert c.cache_size == 10 * GiB
    assert c.cache_max_age is None
    assert c.foreground is False
    assert c.allow_other is False
    assert c.log_level == "INFO"


def test_default_cache_dir_is_per_bucket() -> None:
    assert default_cache_dir("media").name == "media"
    assert default_cache_dir("media") != default_cache_dir("other")
    if os.geteuid() == 0:
        assert default_cache_dir("media") == Path("/var/cache/s3cachefs/media")


def test_default_cache_dir_differs_per_prefix_so_two_mounts_never_share_one() -> None:
    a, b = config(prefix="a/").cache_dir, config(prefix="b/").cache_dir
    assert a != b
    assert a.parent == b.parent == default_cache_dir("media").parent
    assert a == config(prefix="a/").cache_dir  # stable across runs
    assert config(prefix="").cache_dir == default_cache_dir("media")


def test_explicit_cache_dir_wins_over_the_default() -> None:
    assert config(prefix="a/", cache_dir="/srv/cache").cache_dir == Path("/srv/cache")


def test_empty_string_values_mean_not_set(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path, 'bucket = "media"\nsession_token = ""\nendpoint_url = ""\nstorage_class = ""\n'
    )
    _, c = config_from_args(["mount", "--config", str(path), "/mnt/media"])
    assert c.s3.session_token is None
    assert c.s3.endpoint_url is None
    assert c.s3.storage_class == "STANDARD"


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    c = build_config({"bucket": "media", "mountpoint": "mnt", "cache_dir": "cache", "log_file": "fs.log"})
    assert c.mountpoint == tmp_path / "mnt"
    assert c.cache_dir == tmp_path / "cache"
    assert c.log_file == tmp_path / "fs.log"


def test_missing_bucket_is_an_error_that_says_how_to_give_it() -> None:
    with pytest.raises(ConfigError, match=r"^bucket: required"):
        build_config({"mountpoint": "/mnt/media"})


def test_missing_mountpoint_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^mountpoint: required"):
        build_config({"bucket": "media"})


@pytest.mark.parametrize("bad", ["-media", "me dia", "media/x", "a"])
def test_invalid_bucket_name_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^bucket: "):
        config(bucket=bad)


def test_bad_storage_class_is_refused_and_lowercase_is_accepted() -> None:
    with pytest.raises(ConfigError, match=r"^storage_class: .*GLACIER"):
        config(storage_class="GLACIER")
    assert config(storage_class="standard_ia").s3.storage_class == "STANDARD_IA"


@pytest.mark.parametrize(
    "bad", ["localhost:8333", "127.0.0.1:8333", "ftp://s3.example.com", "http://", "s3.amazonaws.com"]
)
def test_endpoint_without_http_scheme_and_host_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^endpoint_url: "):
        config(endpoint_url=bad)


@pytest.mark.parametrize(
    "good", ["http://127.0.0.1:8333", "https://s3.eu-west-1.amazonaws.com", "http://minio"]
)
def test_http_and_https_endpoints_are_accepted(good: str) -> None:
    assert config(endpoint_url=good).s3.endpoint_url == good


def test_multipart_chunks_under_5m_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^multipart_chunksize: .*5M"):
        config(multipart_chunksize="4M")
    assert config(multipart_chunksize="5M").s3.multipart_chunksize == 5 * MiB


def test_multipart_threshold_below_chunksize_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^multipart_threshold: "):
        config(multipart_threshold="8M", multipart_chunksize="16M")
    c = config(multipart_threshold="64M", multipart_chunksize="16M")
    assert (c.s3.multipart_threshold, c.s3.multipart_chunksize) == (64 * MiB, 16 * MiB)


def test_cache_size_under_1m_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^cache_size: .*at least 1M"):
        config(cache_size="512K")
    with pytest.raises(ConfigError, match=r"^cache_size: "):
        config(cache_size=0)
    assert config(cache_size="1M").cache_size == MiB
    assert config(cache_size="50G").cache_size == 50 * GiB


def test_cache_max_age_is_parsed_and_must_be_positive() -> None:
    assert config(cache_max_age="30d").cache_max_age == 30 * 86400.0
    with pytest.raises(ConfigError, match=r"^cache_max_age: "):
        config(cache_max_age="0")


def test_metadata_is_trusted_for_ever_and_relisted_hourly_unless_told_otherwise() -> None:
    c = config()
    assert (c.metadata_ttl, c.relist_interval) == (None, 3600.0)
    c = config(metadata_ttl="10s", relist_interval="15m")
    assert (c.metadata_ttl, c.relist_interval) == (10.0, 900.0)
    assert config(metadata_ttl="unlimited", relist_interval="off").metadata_ttl is None
    assert config(metadata_ttl=0).metadata_ttl == 0.0  # ask S3 every time
    assert config(relist_interval="0").relist_interval is None
    assert config(relist_interval="never").relist_interval is None
    with pytest.raises(ConfigError, match=r"^metadata_ttl: .*unlimited"):
        config(metadata_ttl="soon")
    with pytest.raises(ConfigError, match=r"^relist_interval: "):
        config(relist_interval="-1s")


def test_metadata_ttl_and_relist_interval_come_from_flags_and_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('bucket = "media"\nmetadata_ttl = "30s"\nrelist_interval = "2h"\n')
    _, c = config_from_args(["mount", "--config", str(f), "/mnt/media"])
    assert (c.metadata_ttl, c.relist_interval) == (30.0, 7200.0)
    _, c = config_from_args(["mount", "--config", str(f), "/mnt/media", "--metadata-ttl", "5s"])
    assert c.metadata_ttl == 5.0


def test_timeouts_are_durations_and_must_be_positive() -> None:
    c = config(connect_timeout="2s", read_timeout="1m")
    assert (c.s3.connect_timeout, c.s3.read_timeout) == (2.0, 60.0)
    with pytest.raises(ConfigError, match=r"^read_timeout: "):
        config(read_timeout=0)


@pytest.mark.parametrize(
    ("name", "value"),
    [("threadpool_size", 0), ("max_pool_connections", 0), ("max_attempts", 0), ("uid", -1), ("gid", -1)],
)
def test_counts_and_ids_below_their_minimum_are_refused(name: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}: must be at least"):
        config(**{name: value})


@pytest.mark.parametrize(
    ("name", "value"), [("threadpool_size", "many"), ("uid", 1.5), ("max_attempts", True)]
)
def test_non_integers_are_refused_for_whole_number_settings(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}: expected a whole number"):
        config(**{name: value})


@pytest.mark.parametrize("value", ["--5", "²", "5-", "0x10", "1_000"])
def test_odd_numeric_strings_are_a_config_error_not_a_crash(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^threadpool_size: expected a whole number"):
        config(threadpool_size=value)


def test_numeric_strings_are_accepted_for_whole_number_settings() -> None:
    assert config(threadpool_size=" 12 ").s3.threadpool_size == 12


def test_pool_connections_follow_threadpool_unless_set() -> None:
    assert config(threadpool_size=8).s3.pool_connections == 8
    assert config(threadpool_size=8, max_pool_connections=50).s3.pool_connections == 50


def test_booleans_must_be_booleans() -> None:
    with pytest.raises(ConfigError, match=r"^allow_other: "):
        config(allow_other="yes")
    assert config(allow_other=True).allow_other is True


def test_log_level_is_checked_and_case_insensitive() -> None:
    assert config(log_level="debug").log_level == "DEBUG"
    with pytest.raises(ConfigError, match=r"^log_level: "):
        config(log_level="TRACE")


def test_only_aes256_is_accepted_for_sse_c() -> None:
    assert config(sse_customer_key="k" * 32).s3.sse_customer_algo == "AES256"
    with pytest.raises(ConfigError, match=r"^sse_customer_algo: "):
        config(sse_customer_algo="aws:kms")


def test_string_settings_refuse_other_types() -> None:
    with pytest.raises(ConfigError, match=r"^prefix: expected a string"):
        config(prefix=5)


def test_secrets_never_appear_in_repr() -> None:
    c = config(secret_access_key="SECRET-1", session_token="SECRET-2", sse_customer_key="SECRET-3")
    assert "SECRET" not in repr(c)
    assert "SECRET" not in repr(c.s3)
    assert c.s3.secret_access_key == "SECRET-1"


def test_config_is_frozen() -> None:
    c = config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.cache_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.s3.prefix = "x"  # type: ignore[misc]
    assert isinstance(c.s3, S3Options)


# --- config file --------------------------------------------------------------------------------

PROVIDER_TOML = """
bucket = "synapse-media"
prefix = "media/"
endpoint_url = "https://s3.example.com"
region_name = "eu-west-1"
access_key_id = "AKIAEXAMPLE"
secret_access_key = "file-secret"
storage_class = "STANDARD_IA"
threadpool_size = 16
cache_dir = "/var/cache/s3cachefs/synapse"
cache_size = "50G"
cache_max_age = "30d"
read_timeout = 10
"""


def test_config_file_takes_the_storage_provider_keys(tmp_path: Path) -> None:
    path = write_toml(tmp_path, PROVIDER_TOML)
    _, c = config_from_args(["mount", "--config", str(path), "/mnt/media"])
    assert c.s3.bucket == "synapse-media"
    assert c.s3.prefix == "media/"
    assert c.s3.endpoint_url == "https://s3.example.com"
    assert c.s3.region_name == "eu-west-1"
    assert c.s3.access_key_id == "AKIAEXAMPLE"
    assert c.s3.secret_access_key == "file-secret"
    assert c.s3.storage_class == "STANDARD_IA"
    assert c.s3.threadpool_size == 16
    assert c.s3.read_timeout == 10.0
    assert c.cache_dir == Path("/var/cache/s3cachefs/synapse")
    assert c.cache_size == 50 * GiB
    assert c.cache_max_age == 30 * 86400.0
    assert c.key("local_content/ab") == "media/local_content/ab"


def test_unknown_key_in_config_file_is_named_in_the_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'bucket = "media"\nbuckett = "typo"\ncache_sise = "1G"\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\): buckett, cache_sise$"):
        load_config_file(path)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'bucket = "media\n')
    with pytest.raises(ConfigError, match=r"invalid TOML"):
        load_config_file(path)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found"):
        config_from_args(["mount", "--config", str(tmp_path / "nope.toml"), "media", "/mnt/media"])


def test_flags_override_config_file_values(tmp_path: Path) -> None:
    path = write_toml(tmp_path, PROVIDER_TOML)
    _, c = config_from_args(
        ["mount", "--config", str(path), "--prefix", "other/", "--cache-size", "2G", "--region", "us-east-1",
         "--threadpool-size", "4", "/mnt/media"]
    )  # fmt: skip
    assert c.s3.prefix == "other/"
    assert c.cache_size == 2 * GiB
    assert c.s3.region_name == "us-east-1"
    assert c.s3.threadpool_size == 4
    assert c.s3.endpoint_url == "https://s3.example.com"  # not overridden: still from the file


def test_one_positional_is_the_mountpoint_and_the_bucket_comes_from_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'bucket = "from-file"\nmountpoint = "/mnt/file"\n')
    _, c = config_from_args(["mount", "--config", str(path), "/mnt/cli"])
    assert (c.s3.bucket, c.mountpoint) == ("from-file", Path("/mnt/cli"))


def test_two_positionals_override_bucket_and_mountpoint_from_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'bucket = "from-file"\nmountpoint = "/mnt/file"\n')
    _, c = config_from_args(["mount", "--config", str(path), "from-cli", "/mnt/cli"])
    assert (c.s3.bucket, c.mountpoint) == ("from-cli", Path("/mnt/cli"))


def test_config_file_alone_can_name_bucket_and_mountpoint(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'bucket = "from-file"\nmountpoint = "/mnt/file"\n')
    _, c = config_from_args(["mount", "--config", str(path)])
    assert (c.s3.bucket, c.mountpoint) == ("from-file", Path("/mnt/file"))


def test_one_positional_without_a_bucket_in_a_file_asks_for_the_bucket() -> None:
    with pytest.raises(ConfigError, match=r"^bucket: required"):
        config_from_args(["mount", "/mnt/media"])


def test_bad_value_in_config_file_is_reported_by_name(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'bucket = "media"\ncache_size = "lots"\n')
    with pytest.raises(ConfigError, match=r"^cache_size: .*'lots'"):
        config_from_args(["mount", "--config", str(path), "/mnt/media"])


# --- command line -------------------------------------------------------------------------------


def test_command_line_flags_reach_the_config() -> None:
    command, c = config_from_args(
        ["mount", "media", "/mnt/media", "--foreground", "--allow-other", "--uid", "991", "--gid", "992",
         "--endpoint-url", "http://127.0.0.1:8333", "--cache-dir", "/tmp/c", "--cache-max-age", "12h",
         "--connect-timeout", "3s", "--max-attempts", "2", "--multipart-chunksize", "16M",
         "--multipart-threshold", "32M", "--log-level", "warning", "--storage-class", "STANDARD"]
    )  # fmt: skip
    assert command == "mount"
    assert c.foreground and c.allow_other
    assert (c.uid, c.gid) == (991, 992)
    assert c.s3.endpoint_url == "http://127.0.0.1:8333"
    assert c.cache_dir == Path("/tmp/c")
    assert c.cache_max_age == 12 * 3600.0
    assert c.s3.connect_timeout == 3.0
    assert c.s3.max_attempts == 2
    assert (c.s3.multipart_chunksize, c.s3.multipart_threshold) == (16 * MiB, 32 * MiB)
    assert c.log_level == "WARNING"


def test_flags_left_out_mean_not_given() -> None:
    _, c = config_from_args(["mount", "media", "/mnt/media"])
    assert c.foreground is False
    assert c.allow_other is False
    assert c.uid is None


def test_main_turns_a_config_error_into_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mount", "media", "/mnt/media", "--cache-size", "banana"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "s3cachefs: error: cache_size: expected a size such as 512M, 50G or 1T, got 'banana'\n"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "s3cachefs.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["mount", "media", "/mnt/media", "--cache-size", "banana"],  # ConfigError
        ["mount", "media", "/mnt/media", "--threadpool-size", "many"],  # argparse type error
        ["mount", "media", "/mnt/media", "--no-such-flag"],  # argparse unknown option
        ["mount", "/mnt/media"],  # no bucket anywhere
        ["mount", "--config", "/nonexistent/s3cachefs.toml", "media", "/mnt/media"],
        [],  # no command
    ],
    ids=["bad-size", "bad-int", "unknown-flag", "no-bucket", "missing-config", "no-command"],
)
def test_bad_usage_exits_2_with_one_line_and_no_traceback(args: list[str]) -> None:
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), r.stderr
    assert r.stderr.startswith("s3cachefs"), r.stderr
    assert "error:" in r.stderr
    assert r.stdout == ""


def test_help_lists_the_mount_options() -> None:
    r = run_cli("mount", "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--cache-size", "--cache-dir", "--endpoint-url", "--prefix", "--foreground", "--config"):
        assert flag in r.stdout


# --- credentials from the environment -------------------------------------------------------------


def _without_aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY", "AWS_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_alternative_env_names_aws_access_key_and_aws_secret_key_are_used_when_the_standard_ones_are_absent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_aws_keys(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY", "alt-id")
    monkeypatch.setenv("AWS_SECRET_KEY", "alt-secret")
    c = config()
    assert (c.s3.access_key_id, c.s3.secret_access_key) == ("alt-id", "alt-secret")


def test_standard_env_names_win_over_the_alternative_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    # None: boto3's own chain then reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    _without_aws_keys(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "std-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "std-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY", "alt-id")
    monkeypatch.setenv("AWS_SECRET_KEY", "alt-secret")
    c = config()
    assert (c.s3.access_key_id, c.s3.secret_access_key) == (None, None)


def test_config_file_keys_win_over_the_alternative_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_aws_keys(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY", "alt-id")
    monkeypatch.setenv("AWS_SECRET_KEY", "alt-secret")
    c = config(access_key_id="file-id", secret_access_key="file-secret")
    assert (c.s3.access_key_id, c.s3.secret_access_key) == ("file-id", "file-secret")


def test_half_of_the_alternative_pair_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_aws_keys(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY", "alt-id")
    c = config()
    assert (c.s3.access_key_id, c.s3.secret_access_key) == (None, None)


# --- mount(8) helper form: `s3cachefs SOURCE MOUNTPOINT -o options` -------------------------------


def test_mount_helper_form_loads_config_honours_allow_other_and_ignores_mount_only_options(
    tmp_path: Path,
) -> None:
    path = write_toml(tmp_path, PROVIDER_TOML)
    # What mount.fuse3 runs for `BUCKET /mnt/x fuse.s3cachefs config=FILE,_netdev,nofail` plus
    # the options mount(8) adds.
    command, c = config_from_args(
        ["media", "/mnt/x", "-o", f"rw,config={path},_netdev,nofail,allow_other,dev,suid,x-systemd.automount"]
    )
    assert command == "mount"
    assert (c.s3.bucket, c.mountpoint) == ("media", Path("/mnt/x"))
    assert c.allow_other is True
    assert c.foreground is False  # mount(8) waits for us: the daemon must go into the background
    assert c.s3.endpoint_url == "https://s3.example.com"  # from the file


def test_mount_helper_options_map_onto_long_options_with_underscores_or_dashes(tmp_path: Path) -> None:
    _, c = config_from_args(
        ["media", "/mnt/x", "-o", "rw,cache_dir=/var/cache/x,cache-size=2G,no_listing,region=eu-1",
         "-o", "foreground,threadpool_size=4"]
    )  # fmt: skip
    assert c.cache_dir == Path("/var/cache/x")
    assert c.cache_size == 2 * GiB
    assert c.listing is False
    assert c.s3.region_name == "eu-1"
    assert c.foreground is True
    assert c.s3.threadpool_size == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("rw,no_such_thing=1", "-o no_such_thing: unknown option"),
        ("rw,cache_size", "-o cache_size: needs a value"),
        ("rw,allow_other=yes", "-o allow_other: takes no value"),
        ("ro", "-o ro: s3cachefs has no read-only mode"),
        ("rw,help", "-o help: unknown option"),
    ],
)
def test_mount_helper_form_refuses_unknown_or_malformed_options_with_exit_2(
    options: str, message: str
) -> None:
    r = run_cli("media", "/mnt/x", "-o", options)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"s3cachefs: error: {message}"), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_a_mistyped_subcommand_without_o_is_still_a_usage_error() -> None:
    r = run_cli("mout", "media", "/mnt/x")
    assert r.returncode == 2 and "invalid choice: 'mout'" in r.stderr, r.stderr


def test_synapse_table_is_read_with_a_30s_default_poll(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'bucket = "media"\n[synapse]\nadmin_url = "http://127.0.0.1:8008/"\nadmin_token_file = "tok"\n',
    )
    _, c = config_from_args(["mount", "--config", str(path), str(tmp_path / "mnt")])
    assert c.synapse is not None
    assert c.synapse.admin_url == "http://127.0.0.1:8008"
    assert c.synapse.admin_token_file.is_absolute()
    assert c.synapse.quarantine_poll_interval == 30.0
    _, plain = config_from_args(["mount", "media", str(tmp_path / "mnt")])
    assert plain.synapse is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('admin_url = "127.0.0.1:8008"\nadmin_token_file = "t"', "admin_url"),
        ('admin_url = "http://h:8008"', "admin_token_file: required"),
        ('admin_url = "http://h:8008"\nadmin_token_file = "t"\ntoken = "x"', "unknown key(s): token"),
        ('admin_url = "http://h"\nadmin_token_file = "t"\nquarantine_poll_interval = "0s"', "more than zero"),
    ],
)
def test_bad_synapse_table_is_refused(tmp_path: Path, table: str, message: str) -> None:
    path = write_toml(tmp_path, f'bucket = "media"\n[synapse]\n{table}\n')
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_args(["mount", "--config", str(path), str(tmp_path / "mnt")])


def test_the_documented_async_originals_policies_are_the_defaults_with_originals_queued() -> None:
    # docs/configuration.md gives admins a whole [[cache_policy]] set to copy (the tables replace the
    # defaults as a whole): it must parse, and differ from the defaults only in local_content/.
    text = (REPO_ROOT / "docs" / "configuration.md").read_text()
    section = text.split("### Originals asynchronous too", 1)[1]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    policies = parse_policies(tomllib.loads(block)["cache_policy"])
    expected = tuple(
        dataclasses.replace(p, upload_async=True) if p.prefix == "local_content/" else p
        for p in DEFAULT_POLICIES
    )
    assert policies == expected
    assert any(p.prefix == "local_content/" and p.upload_async for p in policies)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"read_part_size": "0"}, "read_part_size: must be at least 64K"),  # a plan that never ends
        ({"read_part_size": "1"}, "read_part_size: must be at least 64K"),  # a plan as long as the object
        ({"uid": 2**32}, "uid: must be at most"),  # every getattr failed (uid_t overflow)
        ({"gid": 2**40}, "gid: must be at most"),
        ({"max_pool_connections": 10**9}, "max_pool_connections: must be at most 10000"),  # urllib3 fills it
        ({"threadpool_size": 10**7}, "threadpool_size: must be at most 10000"),
        ({"cache_size": "9" * 400}, "cache_size: too large"),  # float overflow
        ({"connect_timeout": "999999"}, "connect_timeout: must be at most a day"),
        ({"read_timeout": "30d"}, "read_timeout: must be at most a day"),
        ({"cache_dir": "/var/cache/s3cachefs\x00x"}, "cache_dir: must not contain a NUL character"),
        ({"log_file": "/var/log/x\x00"}, "log_file: must not contain a NUL character"),
    ],
)
def test_values_past_what_the_mount_can_use_are_refused_with_the_settings_name(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config({**MINIMAL, **values})


def test_a_config_file_that_is_not_utf8_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "s3cachefs.toml"
    path.write_bytes(b'bucket = "media"\nprefix = "\xff"\n')
    with pytest.raises(ConfigError, match=f"config file {path}: not UTF-8 text"):
        load_config_file(path)


@pytest.mark.parametrize("where", ["a directory", "in a missing directory"])
def test_a_log_file_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path: Path, where: str) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path if where == "a directory" else tmp_path / "missing" / "s3cachefs.log"
    r = run_cli(
        "mount", "media", str(mountpoint), "--foreground", "--cache-dir", str(tmp_path / "cache"),
        "--endpoint-url", "http://127.0.0.1:9", "--log-file", str(log),
    )  # fmt: skip
    assert r.returncode == EXIT_USAGE, r.stderr
    assert r.stderr.startswith(f"s3cachefs: error: log_file {log}:") and "Traceback" not in r.stderr, r.stderr


def test_the_listings_local_only_shortcut_agrees_with_the_policy_of_every_path() -> None:
    policies = Policies(
        (
            *DEFAULT_POLICIES,
            PathPolicy("url_cache/keep/", local_only=False),  # a more specific policy wins
            PathPolicy("scratch/", local_only=True),
        ),
        None,
    )
    paths = [
        "url_cache/ab/f", "url_cache/keep/f", "url_cache_thumbnails/x", "url_cachex", "scratch/a",
        "scratchy", "local_content/ab/cd/x", "local_thumbnails/ab/cd/x/1-1", "remote_content/s/ab/cd/x", "",
    ]  # fmt: skip
    assert [policies.local_only(p) for p in paths] == [policies.klass(p).local_only for p in paths]
    assert policies.local_only("url_cache/ab/f") and not policies.local_only("url_cache/keep/f")
