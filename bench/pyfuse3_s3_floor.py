"""The thinnest write-through S3 filesystem in pyfuse3 + trio + boto3: the floor under any such design.

No index, no disk cache, no SQLite, no integrity checks. The bucket is listed once before mounting (names
and sizes in memory, as s3cachefs's background listing leaves them), so lookup and getattr make no
request and a name the listing did not have is absent (every write goes through this mount). create
keeps the bytes in memory; flush (close()) does ONE put_object in a worker thread and returns only after
it did; an open for reading does ONE get_object of the whole object into memory and read() serves from
it. The boto3 client is s3cachefs's own (`make_client` with the default S3Options: pool, retries,
timeouts, no `Expect: 100-continue`), behind one trio.CapacityLimiter of s3cachefs's size, and the
mount's read-ahead is raised as s3cachefs raises it. Left out, unlike s3cachefs: Content-MD5 on PUT,
checking a GET against its ETag, rewriting part of an existing file (a write-open needs O_TRUNC).

compare.py measures it on the small writes and the cold small reads, with the systems. Every FUSE
request is counted by operation, and the milliseconds spent inside boto3 calls ("boto3 ms", in the
worker thread) and around them ("to_thread ms", the thread hops too) are summed; SIGUSR1 prints these
since the previous print as one line `requests {json}` on stdout.

    python -m bench.pyfuse3_s3_floor BUCKET MOUNTPOINT ENDPOINT_URL REGION   # credentials: AWS_* env
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import signal
import stat
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.exceptions
import pyfuse3
import trio

from s3cachefs.config import Config, S3Options
from s3cachefs.fs import ATTR_TIMEOUT, ENTRY_TIMEOUT, NEGATIVE_TIMEOUT
from s3cachefs.mount import _set_read_ahead
from s3cachefs.s3 import make_client

S3_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


@dataclass
class Node:
    parent: int
    name: bytes
    is_dir: bool
    size: int = 0
    children: dict[bytes, int] = field(default_factory=dict)


@dataclass
class Handle:
    ino: int
    data: bytearray | bytes
    dirty: bool = False  # written since the last PUT (a new or truncated file is, even if empty)


class S3FloorFS(pyfuse3.Operations):
    def __init__(self, client: Any, bucket: str, limiter: trio.CapacityLimiter) -> None:
        super().__init__()
        self.client, self.bucket, self.limiter = client, bucket, limiter
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: Node(0, b"", True)}
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.requests: Counter[str] = Counter()
        self.ms: defaultdict[str, float] = defaultdict(float)  # in the boto3 call; around to_thread
        for name, fn in vars(pyfuse3.Operations).items():
            if inspect.iscoroutinefunction(fn):  # every request handler, implemented or not
                setattr(self, name, self._counted(name, getattr(self, name)))

    def _counted(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.requests[name] += 1
            return await fn(*args, **kwargs)

        return counted

    def load(self) -> int:
        """List the bucket once: every key becomes a file, every prefix a directory."""
        n = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for obj in page.get("Contents", []):
                *dirs, leaf = os.fsencode(obj["Key"]).split(b"/")
                parent = pyfuse3.ROOT_INODE
                for d in dirs:
                    parent = self.nodes[parent].children.get(d) or self._add(parent, d, True)
                if leaf:
                    self._add(parent, leaf, False, int(obj["Size"]))
                    n += 1
        return n

    def _add(self, parent: int, name: bytes, is_dir: bool, size: int = 0) -> int:
        ino = len(self.nodes) + 1
        self.nodes[ino] = Node(parent, name, is_dir, size)
        self.nodes[parent].children[name] = ino
        return ino

    def _key(self, ino: int) -> str:
        parts = []
        while ino != pyfuse3.ROOT_INODE:
            node = self.nodes[ino]
            parts.append(node.name)
            ino = node.parent
        return os.fsdecode(b"/".join(reversed(parts)))

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        node = self.nodes[ino]
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if node.is_dir:
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFREG | 0o644, node.size, 1
        a.entry_timeout, a.attr_timeout = ENTRY_TIMEOUT, ATTR_TIMEOUT
        return a

    def _handle(self, h: Handle) -> int:
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = h
        return fh

    async def _s3(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        def call() -> tuple[Any, float]:
            t = time.perf_counter()
            return fn(Bucket=self.bucket, **kwargs), time.perf_counter() - t

        t0 = time.perf_counter()
        try:
            result, inside = await trio.to_thread.run_sync(call, limiter=self.limiter)
        except S3_ERRORS as e:
            print(f"S3 error: {e}", file=sys.stderr, flush=True)
            raise pyfuse3.FUSEError(errno.EIO) from None
        self.ms["boto3 ms"] += inside * 1000
        self.ms["to_thread ms"] += (time.perf_counter() - t0) * 1000
        return result

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        ino = self.nodes[parent_inode].children.get(name)
        if ino is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino, negative.entry_timeout = 0, NEGATIVE_TIMEOUT
            return negative
        return self._attr(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name in self.nodes[parent_inode].children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        return self._attr(self._add(parent_inode, name, True))

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        ino = self.nodes[parent_inode].children.get(name)
        if ino is None:
            ino = self._add(parent_inode, name, False)
        elif self.nodes[ino].is_dir or flags & os.O_EXCL:
            raise pyfuse3.FUSEError(errno.EISDIR if self.nodes[ino].is_dir else errno.EEXIST)
        self.nodes[ino].size = 0
        fh = self._handle(Handle(ino, bytearray(), dirty=True))
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self._attr(ino)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.nodes[inode]
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            if not flags & os.O_TRUNC:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # the floor does not rewrite parts of objects
            node.size = 0
            return pyfuse3.FileInfo(fh=self._handle(Handle(inode, bytearray(), dirty=True)), keep_cache=False)
        body = await self._s3(lambda **kw: self.client.get_object(**kw)["Body"].read(), Key=self._key(inode))
        return pyfuse3.FileInfo(fh=self._handle(Handle(inode, body)), keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(memoryview(self.handles[fh].data)[off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        assert isinstance(h.data, bytearray)
        h.data[off : off + len(buf)] = buf
        h.dirty = True
        self.nodes[h.ino].size = len(h.data)
        return len(buf)

    async def flush(self, fh: int) -> None:
        h = self.handles[fh]
        if h.dirty:
            await self._s3(self.client.put_object, Key=self._key(h.ino), Body=bytes(h.data))
            h.dirty = False

    async def release(self, fh: int) -> None:
        del self.handles[fh]

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None


async def report_requests(fs: S3FloorFS) -> None:
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            print("requests " + json.dumps({**fs.requests, **fs.ms}), flush=True)
            fs.requests.clear()
            fs.ms.clear()


async def serve(fs: S3FloorFS, mountpoint: Path) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(report_requests, fs)
        nursery.start_soon(_set_read_ahead, mountpoint, Config.read_ahead, fs.limiter)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    bucket, mountpoint, endpoint_url, region = sys.argv[1:5]
    opts = S3Options(bucket=bucket, endpoint_url=endpoint_url, region_name=region)
    fs = S3FloorFS(make_client(opts), bucket, trio.CapacityLimiter(opts.threadpool_size))
    print(f"listed {fs.load()} objects", flush=True)
    options = set(pyfuse3.default_options)
    options.add("fsname=pyfuse3-s3-floor")
    pyfuse3.init(fs, mountpoint, options)
    try:
        trio.run(serve, fs, Path(mountpoint))
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
