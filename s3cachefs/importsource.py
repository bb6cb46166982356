"""The media store `s3cachefs import` reads: walking it (symlinks reported, never followed), and how its
names, sizes and file counts are shown."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

# -- walking --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    rel: str  # relative to SRC_DIR, '/'-separated; undecodable bytes are surrogate escapes (os's str paths)
    path: str
    kind: Literal["file", "unsupported", "error"]
    size: int = 0
    what: str = ""  # unsupported: the file type; error: why


def type_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def walk(root: str, stop: threading.Event) -> Iterator[Entry]:
    """Every entry below root, depth first in name order (a rerun goes through the files in the same
    order); symlinks are reported, never followed. Lazy: holds one directory listing at a time."""
    stack = [""]
    while stack and not stop.is_set():
        reldir = stack.pop()
        path = os.path.join(root, reldir) if reldir else root
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda d: d.name)
        except FileNotFoundError:
            continue  # gone meanwhile, e.g. an empty directory that --delete-source pruned
        except OSError as err:
            yield Entry(reldir, path, "error", what=f"cannot list the directory: {err.strerror}")
            continue
        subdirs = []
        for d in entries:
            rel = f"{reldir}/{d.name}" if reldir else d.name
            try:
                if d.is_dir(follow_symlinks=False):
                    subdirs.append(rel)
                    continue
                st = d.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as err:
                yield Entry(rel, d.path, "error", what=f"cannot stat: {err.strerror}")
                continue
            if stat.S_ISREG(st.st_mode):
                # Empty files too: like the mount, which stores a file empty at its last close as a
                # 0-byte object (Synapse serves 0-byte media).
                yield Entry(rel, d.path, "file", st.st_size)
            else:
                yield Entry(rel, d.path, "unsupported", what=type_name(st.st_mode))
        stack.extend(reversed(subdirs))


def shown(rel: str) -> str:
    """A path fit for a terminal, also when its name is not valid UTF-8."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def files_text(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
