"""A pyfuse3 filesystem that does nothing: the floor under any pyfuse3 + trio design on this machine.

Every name below a directory exists: names starting with "d" are directories, the others are files of
FILE_SIZE bytes (the same bytes for every file). Handlers answer at once from memory: no index, no disk,
no S3. compare.py mounts it for a moment and measures the same hot small reads and the same stat pass
(after dropping the kernel's dentries) as for the real systems, so that a target which asks for more
than this floor can be shown to be out of reach for a Python FUSE daemon rather than for s3cachefs.

    python -m bench.pyfuse3_floor MOUNTPOINT      # serves until unmounted (fusermount3 -u)
"""

from __future__ import annotations

import errno
import random
import stat
import sys
from collections.abc import Sequence

import pyfuse3
import trio

FILE_SIZE = 100 * 1024
DATA = random.Random(20260521).randbytes(FILE_SIZE)  # compare.py checks what it reads against this
TIMEOUT = 60.0  # the same entry/attribute timeouts as s3cachefs


class NoopFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.inodes: dict[tuple[int, bytes], int] = {}
        self.is_dir: dict[int, bool] = {pyfuse3.ROOT_INODE: True}

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if self.is_dir[ino]:
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFREG | 0o644, FILE_SIZE, 1
        a.attr_timeout = a.entry_timeout = TIMEOUT
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if not self.is_dir.get(parent_inode) or name in (b".", b".."):
            raise pyfuse3.FUSEError(errno.ENOENT)
        ino = self.inodes.get((parent_inode, name))
        if ino is None:
            ino = self.inodes[(parent_inode, name)] = len(self.is_dir) + 1
            self.is_dir[ino] = name.startswith(b"d")
        return self._attr(ino)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.is_dir[inode]:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return DATA[off : off + size]

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        return None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None


def main() -> None:
    options = set(pyfuse3.default_options)
    options.add("fsname=pyfuse3-floor")
    pyfuse3.init(NoopFS(), sys.argv[1], options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
