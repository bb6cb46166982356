"""Exit codes and the errors a user sees as one line, shared by cli.py and mount.py.

Kept apart from both so that neither imports the other: cli.py imports mount.py late (pyfuse3 and
boto3 are slow to import for `--help`), and mount.py needs the codes and the error types.

Exit codes: 0 after a clean unmount, 2 for bad usage or configuration (including a bucket that does not
exist or credentials the server refuses), 1 for a runtime failure (S3 unreachable, mount failed, crash).
systemd's unit relies on 2 meaning "do not restart" (RestartPreventExitStatus=2).
"""

from __future__ import annotations

import sys

from .config import ConfigError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class StartupError(Exception):
    """A runtime failure before mounting (exit 1), e.g. S3 unreachable."""


def report(error: ConfigError | StartupError) -> int:
    """Print the error as the one line a user sees and return its exit code."""
    print(f"s3cachefs: error: {error}", file=sys.stderr)
    return EXIT_RUNTIME if isinstance(error, StartupError) else EXIT_USAGE


__all__ = ["EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "ConfigError", "StartupError", "report"]
