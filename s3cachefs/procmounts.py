"""The kernel's table of mounts (/proc/mounts), read in one place."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# /proc/mounts writes space, tab, newline and backslash in its fields as octal escapes ("\040").
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    source: str  # the device, or what the filesystem put there (s3cachefs: "s3cachefs:CACHE_DIR")
    point: str
    fstype: str  # "fuse.s3cachefs" for ours
    options: tuple[str, ...]


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[MountEntry]:
    """Every mount, in the kernel's order (a later entry on the same mount point hides an earlier one)."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 4:
                continue
            source, point, fstype = (_unescape(x) for x in fields[:3])
            out.append(MountEntry(source, point, fstype, tuple(fields[3].split(","))))
    return out


def mount_of(path: str | os.PathLike[str]) -> MountEntry | None:
    """The mount that holds `path` (symlinks resolved): the longest mount point that is `path` or one of
    its parents; of several on the same point, the last mounted, which is the one visible."""
    real = os.path.realpath(path)
    best: MountEntry | None = None
    for m in mounts():
        inside = real == m.point or real.startswith(m.point.rstrip("/") + "/")
        if inside and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best
