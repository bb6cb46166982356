"""The working directory of one benchmark run: made fresh, removed at the end unless kept, and never
removed while a mount below it is still there (its contents would be the mount's)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.harness import fuse_mounts


@contextlib.contextmanager
def run_dir(prefix: str, workdir: str | None, keep: bool, log: Callable[[str], None]) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        elif any(m.startswith(str(path)) for m in fuse_mounts()):
            log(f"not removing {path}: a mount below it is still there")
        else:
            shutil.rmtree(path, ignore_errors=True)
