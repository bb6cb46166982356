"""Command line: arguments and config file -> Config; user errors -> one line and exit code 2.

Also mount(8)'s helper for `fuse.s3cachefs` (fstab): `s3cachefs SOURCE MOUNTPOINT -o options`, no
subcommand, turned into the argv of `mount` (see _mount_helper_argv). The exit codes are in errors.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from .config import Config, ConfigError, build_config, load_config_file
from .errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, report

# Re-exported: callers and tests have always found the codes here.
__all__ = ["EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "config_from_args", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: systemd's journal and a shell user both read it at a glance.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line's parser and that of its `mount` subcommand (whose options -o maps onto)."""
    p = _Parser(
        prog="s3cachefs",
        description="Mount an S3 bucket as a local directory with a disk cache.",
        epilog="As mount(8)'s helper (mount -t fuse.s3cachefs, fstab): s3cachefs BUCKET MOUNTPOINT "
        "-o config=FILE[,key=value,...], the keys being the long options of `mount`.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    m = sub.add_parser(
        "mount",
        help="mount BUCKET at MOUNTPOINT",
        description="Mount BUCKET at MOUNTPOINT. Flags override values from --config. "
        "Secrets are never taken from the command line: use the config file or boto3's usual chain "
        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, instance roles).",
    )
    m.add_argument("bucket", nargs="?", help="bucket name (or `bucket` in the config file)")
    m.add_argument("mountpoint", nargs="?", help="where to mount (or `mountpoint` in the config file)")
    m.add_argument("--config", type=Path, help="TOML file; keys as in synapse-s3-storage-provider")
    m.add_argument("--prefix", help="key prefix, concatenated to the relative path as is (no slash added)")
    m.add_argument("--endpoint-url", dest="endpoint_url", help="S3 endpoint, e.g. http://127.0.0.1:8333")
    m.add_argument("--region", dest="region_name", help="S3 region name")
    m.add_argument(
        "--ca-bundle", dest="ca_bundle", help="CA certificates (PEM) for an endpoint with a private CA"
    )
    m.add_argument(
        "--storage-class",
        dest="storage_class",
        help="STANDARD (default), REDUCED_REDUNDANCY, STANDARD_IA, ONEZONE_IA or INTELLIGENT_TIERING",
    )
    m.add_argument("--cache-dir", dest="cache_dir", help="where cached files and the index live")
    m.add_argument("--cache-size", dest="cache_size", help="cap on cached bytes, e.g. 50G (default 10G)")
    m.add_argument(
        "--cache-max-age", dest="cache_max_age", help="drop cached copies unused for this long, e.g. 30d"
    )
    m.add_argument(
        "--cache-min-free",
        dest="cache_min_free",
        help="keep this much free on the cache filesystem, e.g. 20G or 10%%",
    )
    m.add_argument(
        "--upload-queue-max",
        dest="upload_queue_max",
        help='bytes of async uploads (upload = "async" paths) that may wait in the queue; past it, '
        "they upload at close() (default 1G; 0: every upload at close())",
    )
    m.add_argument(
        "--no-listing",
        dest="listing",
        action="store_false",
        default=None,
        help="do not list the bucket at mount, nor again every --relist-interval: trust the index "
        "(when nothing else writes to the bucket)",
    )
    m.add_argument(
        "--metadata-ttl",
        dest="metadata_ttl",
        help="how long to trust what the index says about a name (there or not, its version) before "
        "asking S3 again, e.g. 10s; for buckets others write to while mounted (default: unlimited)",
    )
    m.add_argument(
        "--relist-interval",
        dest="relist_interval",
        help="list the bucket again this often, to find objects others added, replaced or deleted "
        "(default 1h; 0 or off: only at mount)",
    )
    m.add_argument("-f", "--foreground", action="store_true", default=None, help="do not daemonize")
    m.add_argument(
        "--allow-other",
        dest="allow_other",
        action="store_true",
        default=None,
        help="let other users (e.g. synapse) use the mount; always paired with default_permissions",
    )
    m.add_argument("--uid", type=int, help="owner shown for all files (default: owner of MOUNTPOINT)")
    m.add_argument("--gid", type=int, help="group shown for all files (default: group of MOUNTPOINT)")
    m.add_argument(
        "--threadpool-size", dest="threadpool_size", type=int, help="S3 worker threads (default 40)"
    )
    m.add_argument(
        "--max-pool-connections",
        dest="max_pool_connections",
        type=int,
        help="HTTP connections kept to S3 (default: --threadpool-size)",
    )
    m.add_argument("--connect-timeout", dest="connect_timeout", help="S3 connect timeout (default 5s)")
    m.add_argument("--read-timeout", dest="read_timeout", help="S3 read timeout (default 30s)")
    m.add_argument(
        "--max-attempts", dest="max_attempts", type=int, help="attempts per S3 request (default 4)"
    )
    m.add_argument(
        "--s3-deadline",
        dest="s3_deadline",
        help="longest an S3 operation may take, retries included, plus 1 s per MiB it moves "
        "(default 10s); then it fails with EIO and S3 calls fail at once until S3 answers again",
    )
    m.add_argument(
        "--read-ahead",
        dest="read_ahead",
        help="kernel read-ahead of the mount (default 1M; 0: kernel default)",
    )
    m.add_argument(
        "--read-part-size", dest="read_part_size", help="part size of parallel cold reads (default 8M)"
    )
    m.add_argument(
        "--read-concurrency",
        dest="read_concurrency",
        type=int,
        help="parallel ranged GETs per cold file (default 8)",
    )
    m.add_argument("--multipart-threshold", dest="multipart_threshold", help="default 16M")
    m.add_argument("--multipart-chunksize", dest="multipart_chunksize", help="default 8M")
    m.add_argument("--log-level", dest="log_level", help="DEBUG, INFO (default), WARNING or ERROR")
    m.add_argument(
        "--log-file",
        dest="log_file",
        help="log here instead of stderr (daemon default: syslog); SIGHUP reopens it",
    )
    m.add_argument(
        "--metrics-addr",
        dest="metrics_addr",
        help="serve Prometheus metrics over HTTP at HOST:PORT, e.g. 127.0.0.1:9406 (default: off); "
        "no authentication: bind it to loopback or a private interface",
    )
    st = sub.add_parser(
        "status",
        help="show what is in a cache",
        description="Show cached bytes and files, "
        "the cap, the hit ratio, evictions and pending uploads of a mount or a cache directory.",
    )
    st.add_argument("path", type=Path, help="a mount point or a cache directory")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    im = sub.add_parser(
        "import",
        help="upload an existing media_store to BUCKET",
        description="Upload the files under SRC_DIR (an existing media_store) to BUCKET, key = prefix + "
        "relative path, so that Synapse can switch to the mount. Objects already in S3 with the same size "
        "and checksum are skipped, so an interrupted run resumes; every upload is verified. S3 flags and "
        "--config as for `mount` (mount-only keys in the file are ignored). Exit 0 when every file is in "
        "S3 and verified, 1 otherwise.",
    )
    im.add_argument("src", type=Path, metavar="SRC_DIR", help="the media_store to upload")
    im.add_argument(
        "bucket", nargs="?", metavar="BUCKET", help="bucket name (or `bucket` in the config file)"
    )
    im.add_argument("--config", type=Path, metavar="FILE", help="TOML file, the same as for mount")
    for flag, help_ in (
        ("--prefix", "key prefix, concatenated to the relative path as is (no slash added)"),
        ("--endpoint-url", "S3 endpoint, e.g. http://127.0.0.1:8333"),
        ("--region", "S3 region name"),
        ("--ca-bundle", "CA certificates (PEM) for an endpoint with a private CA"),
        ("--storage-class", "STANDARD (default), REDUCED_REDUNDANCY, STANDARD_IA, ONEZONE_IA, ..."),
        ("--max-pool-connections", "HTTP connections kept to S3 (default: --jobs)"),
        ("--connect-timeout", "S3 connect timeout (default 5s)"),
        ("--read-timeout", "S3 read timeout (default 30s)"),
        ("--max-attempts", "attempts per S3 request (default 4)"),
        ("--multipart-threshold", "files this large or larger go up in parts (default 16M)"),
        ("--multipart-chunksize", "part size (default 8M)"),
    ):
        dest = "region_name" if flag == "--region" else flag[2:].replace("-", "_")
        im.add_argument(flag, dest=dest, help=help_)
    im.add_argument("-j", "--jobs", type=int, default=8, help="files uploaded in parallel (default 8)")
    im.add_argument(
        "-n", "--dry-run", action="store_true", help="list what would be uploaded or skipped; change nothing"
    )
    im.add_argument(
        "--delete-source",
        action="store_true",
        help="delete each source file once it is verified in S3 (files skipped because S3 already holds "
        "the same bytes count as verified and are deleted too), then the directories this empties; "
        "never SRC_DIR itself, never a file that failed or was not looked at",
    )
    im.add_argument(
        "--include-url-cache",
        action="store_true",
        help="also upload url_cache* (skipped by default: URL previews are local-only, as with the provider)",
    )
    im.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (none either when stderr is not a terminal)",
    )
    return p, m


# mount(8) form (fstab, `mount -t fuse.s3cachefs`): mount.fuse3 runs `s3cachefs SOURCE MOUNTPOINT -o
# OPTIONS` through /bin/sh, where OPTIONS are the fstab options plus the generic ones mount(8) adds.
# These concern mount(8), systemd or the kernel's generic flags, not us: FUSE mounts are always nodev
# and nosuid for an unprivileged daemon anyway, and access times live in our own cache index.
_MOUNT_ONLY_OPTIONS = frozenset(
    {
        "rw",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
        "_netdev",
        "nofail",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "defaults",
        "atime",
        "noatime",
        "relatime",
        "strictatime",
        "nodiratime",
        "lazytime",
        "async",
    }
)


def _is_mount_helper_call(argv: list[str]) -> bool:
    """mount.fuse3 never names a subcommand and always passes -o; a typo of a subcommand has no -o."""
    if not argv or argv[0] in ("mount", "status", "import") or argv[0].startswith("-"):
        return False
    return any(a == "-o" or a.startswith("-o") for a in argv)


def _mount_helper_argv(argv: list[str]) -> list[str]:
    """`SOURCE MOUNTPOINT -o key=value,flag,...` -> the argv of `mount`: each key is a long option of
    `s3cachefs mount` (`cache_dir` or `cache-dir`), `config=FILE` is --config. The daemon goes into the
    background once mounted (mount(8) waits for us to exit) unless `foreground` is among the options."""
    positional: list[str] = []
    options: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options += next(args, "").split(",")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
        elif arg.startswith("-"):
            raise ConfigError(f"{arg}: called as a mount helper, s3cachefs takes only -o key=value,...")
        else:
            positional.append(arg)
    long_options = {
        opt[2:]: action
        for action in _parsers()[1]._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }
    out = ["mount", *positional]
    for option in options:
        key, has_value, value = option.partition("=")
        if not key or key in _MOUNT_ONLY_OPTIONS or key.startswith("x-") or key == "comment":
            continue  # x-*: userspace-only options for mount(8) and systemd (x-systemd.automount, ...)
        if key == "ro":
            raise ConfigError("-o ro: s3cachefs has no read-only mode (Synapse writes to its media store)")
        action = long_options.get(key.replace("_", "-"))
        if action is None:
            raise ConfigError(f"-o {key}: unknown option (the options are those of `s3cachefs mount --help`)")
        flag = action.option_strings[-1]
        if action.nargs == 0:
            if has_value:
                raise ConfigError(f"-o {key}: takes no value")
            out.append(flag)
        elif not has_value:
            raise ConfigError(f"-o {key}: needs a value ({key}=...)")
        else:
            out += [flag, value]
    return out


def config_from_args(argv: list[str]) -> tuple[str, Config]:
    if _is_mount_helper_call(argv):
        argv = _mount_helper_argv(argv)
    args = _parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(load_config_file(args.config))
    positional = [v for v in (args.bucket, args.mountpoint) if v is not None]
    if len(positional) == 2:
        values["bucket"], values["mountpoint"] = positional
    elif len(positional) == 1:
        # One positional is the mount point; the bucket must then come from the config file.
        values["mountpoint"] = positional[0]
    # Every other flag's dest is its config-file key; a flag that was given overrides the file.
    for name, value in vars(args).items():
        if name not in ("command", "config", "bucket", "mountpoint") and value is not None:
            values[name] = value
    return args.command, build_config(values)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["status"]:
            from .status import main as status_main

            args = _parser().parse_args(argv)
            return status_main(args.path, args.json)
        if argv[:1] == ["import"]:
            args = _parser().parse_args(argv)
            from .importer import main as import_main  # after parsing: boto3 is slow to import for --help

            return import_main(args)
        command, config = config_from_args(argv)
    except ConfigError as e:
        return report(e)
    from .mount import run  # imported late: pyfuse3 and boto3 are slow to import for `--help`

    assert command == "mount"
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
