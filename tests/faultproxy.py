"""A small fault-injecting HTTP proxy on loopback, between s3cachefs and a real S3 server.

    proxy = FaultProxy(upstream_port=server.s3_port, seed=1).start()
    ... mount with --endpoint-url proxy.endpoint_url ...
    proxy.set_mode("http_503", probability=0.5)   # thread-safe, takes effect at the next request
    proxy.counts()                                 # requests seen, per mode that was applied
    proxy.stop()

Modes, applied per request:
  pass       forward to the server and relay the answer
  http_500   answer `500 InternalError` (S3 XML error body) without forwarding
  http_503   answer `503 SlowDown` without forwarding
  drop       read the request head, then reset the connection (RST); nothing is forwarded
  reset_mid  forward the head and half of the body to the server, then reset both connections, so
             the server sees a truncated upload; a request without a body is reset before anything
             is forwarded (as `drop`): the server never receives a complete faulted request
  blackhole  read and discard whatever arrives and never answer: a hung server
  late       forward to the server at once, and relay its answer `delay` seconds later: the server
             acted on the request long before the client hears of it (a LIST page that is old news)
  garble     forward to the server, and relay its answer with the last byte of a 200's body flipped
             (headers, length and ETag untouched): bytes damaged on the way, which only a checksum
             shows. The answer is held until the server has sent all of it (bounded by max_answer)
  rewrite    forward to the server, and relay its answer as `rewrite(request headers, answer head,
             answer body)` returns it (the body de-chunked; Content-Length set again): a server
             that answers something else than S3 would (held whole, as garble)
With probability p < 1, each request gets the fault with probability p (seeded RNG: reproducible
for a given sequence of requests) and is passed through otherwise.

Keep-alive: botocore reuses pooled connections, so a decision per connection would let a connection
opened in `pass` mode carry on after the switch to a fault. Parsing request and response boundaries
(Content-Length, chunked, HEAD, 1xx, 204/304) would fix that at the cost of a lot of code. Instead
the proxy makes every connection carry exactly one request: it rewrites the request head with
`Connection: close`, the server answers with `Connection: close` and closes after its answer, and the
client therefore opens a fresh connection for its next request. One connection is one request, so
deciding per connection is deciding per request, and the body after the head can be relayed as raw
bytes in both directions (which also keeps `Expect: 100-continue` working untouched). An injected
answer also says `Connection: close` and the proxy closes after it. On loopback the extra TCP
handshake per request costs nothing that matters.

Everything is bounded: one asyncio loop in one daemon thread, every connection ends after at most
`max_connection_s`, upstream connects time out, and stop() cancels whatever is still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator

LOOPBACK = "127.0.0.1"
MODES = ("pass", "http_500", "http_503", "drop", "reset_mid", "blackhole", "late", "garble", "rewrite")
_ERRORS = {
    "http_500": (500, "Internal Server Error", "InternalError", "We encountered an internal error."),
    "http_503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
}
_HEAD_LIMIT = 64 * 1024
_CHUNK = 64 * 1024
_HOP_HEADERS = (b"connection", b"keep-alive", b"proxy-connection")
# Mode "rewrite": (request headers, lower-cased names) x (answer head, answer body) -> (head, body).
Rewrite = Callable[[dict[str, str], bytes, bytes], tuple[bytes, bytes]]


class _Request:
    """The parsed head of one request: enough to rewrite it and to know how long its body is."""

    def __init__(self, head: bytes) -> None:
        lines = head[:-4].split(b"\r\n")
        self.request_line = lines[0]
        self.method = lines[0].split(b" ", 1)[0].decode("ascii", "replace")
        parts = lines[0].split(b" ")
        self.target = parts[1].decode("ascii", "replace") if len(parts) > 1 else ""
        self.headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.append((name.strip(), value.strip()))
        self.content_length = 0
        self.expect_continue = False
        self.chunked = False
        for name, value in self.headers:
            low = name.lower()
            if low == b"content-length" and value.isdigit():
                self.content_length = int(value)
            elif low == b"expect" and value.lower() == b"100-continue":
                self.expect_continue = True
            elif low == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True

    def rewritten(self, drop_expect: bool = False) -> bytes:
        """The head with `Connection: close` (and without Expect, when we answer 100 ourselves)."""
        out = [self.request_line]
        for name, value in self.headers:
            low = name.lower()
            if low in _HOP_HEADERS or (drop_expect and low == b"expect"):
                continue
            out.append(name + b": " + value)
        out.append(b"Connection: close")
        return b"\r\n".join(out) + b"\r\n\r\n"


def _rewritten(req: _Request, answer: bytes, rewrite: Rewrite) -> bytes:
    """Mode "rewrite": the whole answer, its body de-chunked, through `rewrite`, with its length."""
    at = answer.find(b"\r\n\r\n")
    head, body = answer[:at], answer[at + 4 :]
    lines = head.split(b"\r\n")
    if any(ln.lower().startswith(b"transfer-encoding:") and b"chunked" in ln.lower() for ln in lines):
        out, rest = bytearray(), body
        while (n := int(rest[: rest.find(b"\r\n")].split(b";")[0], 16)) > 0:
            start = rest.find(b"\r\n") + 2
            out += rest[start : start + n]
            rest = rest[start + n + 2 :]
        body = bytes(out)
    headers = {name.decode().lower(): value.decode() for name, value in req.headers}
    head, body = rewrite(headers, head, body)
    drop = (b"content-length", b"transfer-encoding", *_HOP_HEADERS)
    lines = [ln for ln in head.split(b"\r\n") if ln.split(b":", 1)[0].strip().lower() not in drop]
    lines += [b"Content-Length: %d" % len(body), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close after whatever is still buffered has gone out (bounded); abort() would drop it."""
    if writer.transport.is_closing():
        return
    writer.close()
    try:
        async with asyncio.timeout(5):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()  # the peer does not read: give up on the rest
    except (ConnectionError, OSError):
        pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a middlebox dropping the flow would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = LOOPBACK,
        seed: int = 0,
        max_connection_s: float = 120.0,
        upstream_connect_s: float = 5.0,
        max_answer: int = 64 * 1024 * 1024,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.max_connection_s = max_connection_s
        self.max_answer = max_answer  # mode "garble" holds a whole answer in memory
        self.upstream_connect_s = upstream_connect_s
        self._lock = threading.Lock()
        self._mode = "pass"
        self._probability = 1.0
        # Only requests whose "METHOD target" contains this string get the fault (None: all).
        self._only: str | None = None
        self._delay = 0.0  # mode "late": how long an answer is held
        self._rewrite: Rewrite | None = None  # mode "rewrite"
        self._rng = random.Random(seed)
        self._counts: Counter[str] = Counter()
        self._requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    # -- control (any thread) -----------------------------------------------------------------------

    def set_mode(
        self,
        mode: str,
        probability: float = 1.0,
        only: str | None = None,
        delay: float = 2.0,
        rewrite: Rewrite | None = None,
    ) -> None:
        """only: the fault applies to requests whose "METHOD target" contains this (e.g. "DELETE "
        or "PUT /bucket/local_thumbnails/"); the others pass. delay: mode "late" only. rewrite:
        mode "rewrite" only (required there)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], got {probability}")
        if (mode == "rewrite") != (rewrite is not None):
            raise ValueError("mode 'rewrite' takes a rewrite function, and only it does")
        with self._lock:
            self._mode, self._probability, self._only, self._delay = mode, probability, only, delay
            self._rewrite = rewrite

    @property
    def mode(self) -> tuple[str, float]:
        with self._lock:
            return self._mode, self._probability

    @contextlib.contextmanager
    def fault(
        self,
        mode: str,
        probability: float = 1.0,
        only: str | None = None,
        delay: float = 2.0,
        rewrite: Rewrite | None = None,
    ) -> Iterator[FaultProxy]:
        """Apply a mode for the duration of a with-block, then go back to `pass`."""
        self.set_mode(mode, probability, only, delay, rewrite)
        try:
            yield self
        finally:
            self.set_mode("pass")

    def counts(self) -> dict[str, int]:
        """Requests seen so far, keyed by the mode that was applied to them."""
        with self._lock:
            return dict(self._counts)

    def requests(self) -> int:
        with self._lock:
            return self._requests

    def _decide(self, method: str, target: str = "") -> str:
        with self._lock:
            self._requests += 1
            mode = self._mode
            if (mode != "pass" and self._only is not None and self._only not in f"{method} {target}") or (
                mode != "pass" and self._probability < 1.0 and self._rng.random() >= self._probability
            ):
                mode = "pass"
            self._counts[mode] += 1
            self._counts[f"{mode}:{method}"] += 1
            return mode

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("FaultProxy.start(): already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, LOOPBACK, 0, limit=_HEAD_LIMIT)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"faultproxy->{self.upstream[1]}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError(f"FaultProxy did not start: {failure[0] if failure else 'timeout'}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=timeout / 2)
            if self._server is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._server.wait_closed(), timeout / 2)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("FaultProxy.stop(): the proxy thread did not end")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one connection = one request ---------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with asyncio.timeout(self.max_connection_s):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return  # closed (an idle pooled connection) or garbage: nothing to count
                req = _Request(head)
                mode = self._decide(req.method, req.target)
                if mode == "pass":
                    await self._forward(req, reader, writer)
                elif mode == "late":
                    with self._lock:
                        delay = self._delay
                    await self._forward(req, reader, writer, hold=delay)
                elif mode == "garble":
                    await self._forward(req, reader, writer, garble=True)
                elif mode == "rewrite":
                    with self._lock:
                        rewrite = self._rewrite
                    await self._forward(req, reader, writer, rewrite=rewrite)
                elif mode in _ERRORS:
                    await self._answer_error(mode, req, reader, writer)
                elif mode == "drop" or (mode == "reset_mid" and (req.content_length == 0 or req.chunked)):
                    _reset(writer)
                elif mode == "reset_mid":
                    await self._forward_half_then_reset(req, reader, writer)
                else:  # blackhole
                    while await reader.read(_CHUNK):
                        pass
        except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            await _close(writer)

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.wait_for(asyncio.open_connection(*self.upstream), self.upstream_connect_s)
        except (OSError, TimeoutError):
            return None

    async def _forward(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        hold: float = 0.0,
        garble: bool = False,
        rewrite: Rewrite | None = None,
    ) -> None:
        up = await self._open_upstream()
        if up is None:
            _reset(writer)  # the server is down: the client sees its connection fail, as it would directly
            return
        up_reader, up_writer = up
        try:
            up_writer.write(req.rewritten())
            await up_writer.drain()

            async def client_to_server() -> None:
                while data := await reader.read(_CHUNK):
                    up_writer.write(data)
                    await up_writer.drain()

            async def server_to_client() -> None:
                if rewrite is not None:
                    answer = bytearray()
                    while data := await up_reader.read(_CHUNK):
                        answer += data
                        if len(answer) > self.max_answer:
                            raise ConnectionError("rewrite: answer over max_answer")
                    writer.write(_rewritten(req, bytes(answer), rewrite))
                    await writer.drain()
                    return
                if garble:
                    # The server closes after its answer (Connection: close): all of it is here.
                    answer = bytearray()
                    while data := await up_reader.read(_CHUNK):
                        answer += data
                        if len(answer) > self.max_answer:
                            raise ConnectionError("garble: answer over max_answer")
                    body_at = answer.find(b"\r\n\r\n") + 4
                    if answer.startswith(b"HTTP/1.1 200") and 4 <= body_at < len(answer):
                        answer[-1] ^= 0xFF
                    writer.write(bytes(answer))
                    await writer.drain()
                    return
                first = True
                while data := await up_reader.read(_CHUNK):
                    if first and hold:
                        await asyncio.sleep(hold)
                    first = False
                    writer.write(data)
                    await writer.drain()

            upload = asyncio.ensure_future(client_to_server())
            answer = asyncio.ensure_future(server_to_client())
            try:
                # The server closes after its answer (Connection: close). The client never half-closes
                # an HTTP/1.1 request, so its EOF first means it gave up (a timeout): end both sides.
                done, _ = await asyncio.wait({upload, answer}, return_when=asyncio.FIRST_COMPLETED)
                if answer in done and answer.exception() is None:
                    await _close(writer)
            finally:
                for t in (upload, answer):
                    t.cancel()
                await asyncio.gather(upload, answer, return_exceptions=True)
        finally:
            up_writer.transport.abort()

    async def _answer_error(
        self, mode: str, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        status, reason, code, message = _ERRORS[mode]
        if not req.expect_continue and not req.chunked and req.content_length:
            # Take the body first, so that the client reads our answer rather than a reset.
            await reader.readexactly(req.content_length)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>faultproxy-{self.requests()}</RequestId></Error>"
        ).encode()
        if req.method == "HEAD":
            body = b""
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head + body)
        await writer.drain()
        writer.write_eof()
        # With Expect: 100-continue the client may still send its body once its 1 s wait is over;
        # read it (bounded) instead of closing on unread data, which would turn into a reset.
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(3):
                while await reader.read(_CHUNK):
                    pass

    async def _forward_half_then_reset(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up = await self._open_upstream()
        if up is None:
            _reset(writer)
            return
        _, up_writer = up
        try:
            # The server must expect the body at once; the client gets its 100 Continue from us.
            up_writer.write(req.rewritten(drop_expect=True))
            if req.expect_continue:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            half = req.content_length // 2
            sent = 0
            while sent < half:
                data = await reader.read(min(_CHUNK, half - sent))
                if not data:
                    break
                up_writer.write(data)
                await up_writer.drain()
                sent += len(data)
            await asyncio.sleep(0.05)  # let the server start on the truncated body
        finally:
            _reset(up_writer)
            _reset(writer)
