"""The front: a small asyncio HTTP/1.1 proxy that `pluristeer up` and `pluristeer serve` put in front of gunicorn.

gunicorn's threads read a request's body themselves, as the application asks for it: a client that sends
its body one byte at a time holds a request thread for as long as it likes, and a few dozen of them hold
every thread, /healthz's included. The front reads each request whole first, with deadlines, and only then
hands it to gunicorn (over a Unix socket only the front knows), so a slow or stalled client costs a
coroutine here and never a request thread:

- the request line and headers must arrive within `REQUEST_HEADER_TIMEOUT` seconds of their first byte (else
  408, closed; a connection that sends nothing is closed after that long without an answer);
- the body must arrive within `REQUEST_BODY_TIMEOUT` seconds plus one second for every
  `REQUEST_BODY_MIN_RATE` bytes received so far: a body that stalls is cut off (408, closed)
  `REQUEST_BODY_TIMEOUT` seconds after its last byte at the latest, and one that trickles in slower than
  `REQUEST_BODY_MIN_RATE` bytes a second on average (after the first `REQUEST_BODY_TIMEOUT` seconds) too;
- a body larger than the largest body any route accepts (`max_body_bytes` here) is refused at once (413);
  bodies past `SPOOL_BYTES` wait in a temporary file, not in memory;
- chunked bodies are decoded here and handed on with a Content-Length; `Expect: 100-continue` is answered
  here;
- a response is relayed as it comes (event streams included); a client that takes none of the
  `RESPONSE_BUFFER` bytes waiting for it within `REQUEST_BODY_TIMEOUT` seconds is cut off (reset), and a
  client that closes its connection has the request's connection to gunicorn half-closed, so the API sees it
  gone as it would without the front (the chat routes cancel its generation then);
- kept-alive connections wait `IDLE_TIMEOUT_S` for their next request.

Client addresses: the front appends its peer's address to `X-Forwarded-For` (and the API, told by
`PLURISTEER_FRONT`, trusts that one hop more). With `TRUSTED_PROXIES` at 0 it first drops every
`X-Forwarded-*` and `Forwarded` header a client sent, so none can be spoofed; with `TRUSTED_PROXIES` above
0 it keeps them for the API's `ProxyFix`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import resource
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import IO, Any

from service.settings import Settings

log = logging.getLogger(__name__)

HEAD_LIMIT = 64 << 10  # the request line and headers together (431 past it)
CHUNK_LINE_LIMIT = 4096  # a chunk-size line of a chunked body
SPOOL_BYTES = 1 << 20  # a body larger than this waits in a temporary file
READ_CHUNK = 64 << 10
IDLE_TIMEOUT_S = 15.0  # a kept-alive connection with no new request is closed
RESPONSE_BUFFER = 1 << 20  # response bytes held for a slow reader before the front stops reading from gunicorn
PIPELINE_LIMIT = 64 << 10  # bytes of a next (pipelined) request kept while a response is relayed
MAX_CONNECTIONS = 1000  # client connections at once; more are answered 503 and closed
UPSTREAM_HEAD_LIMIT = 256 << 10
LINGER_S = 2.0  # after an error answer, input still arriving is read and dropped this long (the answer is seen)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^\x00-\x20\x7f]+) HTTP/(\d)\.(\d)")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
               b"transfer-encoding", b"content-length", b"expect"}
# What a client must not set unless a trusted proxy in front of this one set it (gunicorn reads the scheme
# ones itself from a Unix-socket peer; the API's ProxyFix reads X-Forwarded-For and -Proto).
_FORWARDED = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-protocol", b"x-forwarded-ssl",
              b"x-forwarded-host", b"x-forwarded-port", b"x-forwarded-prefix", b"x-real-ip", b"forwarded",
              b"front-end-https"}
_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 417: "Expectation Failed",
            431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}


@dataclass(frozen=True)
class FrontLimits:
    """What the front allows a client (see the module's docstring)."""

    header_timeout: float = 10.0
    body_timeout: float = 10.0
    body_min_rate: int = 8192
    max_body_bytes: int = 128 << 20
    trusted_proxies: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> FrontLimits:
        return cls(header_timeout=settings.request_header_timeout, body_timeout=settings.request_body_timeout,
                   body_min_rate=max(1, settings.request_body_min_rate), max_body_bytes=largest_body(settings),
                   trusted_proxies=max(0, settings.trusted_proxies))


def largest_body(settings: Settings) -> int:
    """More than the largest body any route accepts: JSON bodies, uploads, and the adapter import's base64
    body (`service.api.profiles.import_body_limit`). The routes answer their own 413 below it."""
    adapter_import = 4 * (settings.max_adapter_bytes // 3 + 1) + (1 << 20)
    return max(settings.max_body_bytes, settings.max_upload_bytes, adapter_import) + (1 << 20)


class _Reject(Exception):
    def __init__(self, status: int, type: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type, message, field


class _ClientGone(Exception):
    pass


@dataclass
class _Relayed:
    started: bool = False  # response bytes went to the client (a failure then cannot be answered any more)


@dataclass
class _Request:
    method: bytes
    target: bytes
    minor: int
    headers: list[tuple[bytes, bytes]]
    length: int | None  # None: chunked
    expect_continue: bool
    keep_alive: bool


class _Client:
    """One client connection: its reader with a buffer of bytes read but not used yet."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = bytearray()
        peer = writer.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""

    async def fill(self, deadline: float) -> None:
        """Read more into `buf` by `deadline` (loop time): TimeoutError past it, _ClientGone at EOF."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        data = await asyncio.wait_for(self.reader.read(READ_CHUNK), remaining)
        if not data:
            raise _ClientGone
        self.buf += data


class _BodyClock:
    """The body's deadline: `body_timeout` after its start plus a second per `body_min_rate` bytes received."""

    def __init__(self, limits: FrontLimits) -> None:
        self.limits = limits
        self.start = asyncio.get_running_loop().time()
        self.received = 0

    def deadline(self) -> float:
        return self.start + self.limits.body_timeout + self.received / self.limits.body_min_rate

    def timeout(self, expected: int | None) -> _Reject:
        elapsed = asyncio.get_running_loop().time() - self.start
        of = f" of {expected}" if expected is not None else ""
        return _Reject(408, "request_timeout", f"the request body was not received in time: {self.received}{of} "
                       f"bytes in {elapsed:.1f} s (a body must arrive within {self.limits.body_timeout:g} s plus "
                       f"1 s per {self.limits.body_min_rate} bytes)")


def parse_head(head: bytes) -> _Request:
    """The request line and headers (without the final blank line), checked strictly: what gunicorn is
    then handed has one unambiguous reading."""
    lines = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise _Reject(400, "bad_request", "malformed request line")
    method, target, major, minor = match.group(1), match.group(2), int(match.group(3)), int(match.group(4))
    if (major, minor) not in ((1, 0), (1, 1)):
        raise _Reject(505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise _Reject(400, "bad_request", "malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise _Reject(400, "bad_request", f"control character in header {name.decode()!r}")
        headers.append((name, value))

    def values(wanted: bytes) -> list[bytes]:
        items = [item.strip() for name, value in headers if name.lower() == wanted for item in value.split(b",")]
        return [item for item in items if item]

    encodings = [v.lower() for v in values(b"transfer-encoding")]
    lengths = [v for n, v in headers if n.lower() == b"content-length"]
    length: int | None
    if encodings:
        if lengths:
            raise _Reject(400, "bad_request", "both Content-Length and Transfer-Encoding")
        if minor == 0:
            raise _Reject(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
        if encodings != [b"chunked"]:
            raise _Reject(501, "not_implemented", "the only transfer coding accepted is chunked")
        length = None
    elif lengths:
        parts = {p.strip() for v in lengths for p in v.split(b",")}
        if len(parts) != 1 or not re.fullmatch(rb"\d{1,18}", next(iter(parts))):
            raise _Reject(400, "bad_request", "invalid Content-Length", "Content-Length")
        length = int(next(iter(parts)))
    else:
        length = 0
    expect = [v.lower() for n, v in headers if n.lower() == b"expect"]
    if any(v != b"100-continue" for v in expect):
        raise _Reject(417, "expectation_failed", "the only expectation accepted is 100-continue", "Expect")
    connection = {v.lower() for v in values(b"connection")}
    keep_alive = b"close" not in connection if minor == 1 else False
    return _Request(method, target, minor, headers, length, bool(expect) and minor == 1, keep_alive)


def upstream_head(request: _Request, body_length: int, peer: str, trusted_proxies: int) -> bytes:
    """The request as gunicorn gets it: hop-by-hop headers dropped, the body's length set, `peer` appended
    to X-Forwarded-For (client-sent forwarding headers dropped unless proxies in front are trusted), and
    `Connection: close` (one request per connection to gunicorn)."""
    named_by_connection = {t.strip().lower() for n, v in request.headers if n.lower() == b"connection"
                           for t in v.split(b",")}
    lines = [b"%s %s HTTP/1.%d" % (request.method, request.target, request.minor)]
    forwarded_for: list[bytes] = []
    for name, value in request.headers:
        low = name.lower()
        if low in _HOP_BY_HOP or low in named_by_connection:
            continue
        if low in _FORWARDED and trusted_proxies <= 0:
            continue
        if low == b"x-forwarded-for":
            forwarded_for.append(value)
            continue
        lines.append(name + b": " + value)
    if peer:
        forwarded_for.append(peer.encode())
    if forwarded_for:
        lines.append(b"X-Forwarded-For: " + b", ".join(forwarded_for))
    if body_length or request.length is None or any(n.lower() == b"content-length" for n, _ in request.headers):
        lines.append(b"Content-Length: %d" % body_length)
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def error_response(reject: _Reject, extra: dict[str, str] | None = None) -> bytes:
    body = json.dumps({"error": {"type": reject.type, "message": reject.message, "field": reject.field}}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close",
               **(extra or {})}
    head = f"HTTP/1.1 {reject.status} {_REASONS.get(reject.status, 'Error')}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


class Front:
    """The front on `host`:`port`, handing requests to gunicorn at the Unix socket `upstream`. `start()` binds
    (an OSError when the address is taken) and serves from a thread of its own; `stop()` ends it."""

    def __init__(self, host: str, port: int, upstream: str, limits: FrontLimits) -> None:
        self.host, self.port, self.upstream, self.limits = host, port, upstream, limits
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.Server | None = None
        self.thread: threading.Thread | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.connections = 0

    def start(self) -> None:
        _raise_open_files_limit(4 * MAX_CONNECTIONS)
        loop = asyncio.new_event_loop()
        try:
            self.server = loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, self.port, limit=READ_CHUNK, backlog=1024))
        except BaseException:
            loop.close()
            raise
        self.loop = loop
        self.thread = threading.Thread(target=loop.run_forever, name="pluristeer-front", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self.loop, self.thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        if not thread.is_alive():
            loop.close()
        self.loop = self.thread = self.server = None

    async def _close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        client = _Client(reader, writer)
        graceful = True
        try:
            writer.transport.set_write_buffer_limits(high=RESPONSE_BUFFER)
            if self.connections > MAX_CONNECTIONS:
                await self._refuse(client, _Reject(503, "unavailable", "too many connections; retry"), "1")
                return
            first = True
            while await self._one(client, first):
                first = False
        except (_ClientGone, ConnectionError, TimeoutError, OSError, asyncio.IncompleteReadError):
            graceful = False
        except asyncio.CancelledError:  # stopping; not raised on (asyncio's stream callback would log it)
            graceful = False
        except Exception:
            graceful = False
            log.exception("front: unexpected error on a connection from %s", client.peer)
        finally:
            self.connections -= 1
            self.tasks.discard(task)
            await self._close_client(writer, graceful)

    async def _close_client(self, writer: asyncio.StreamWriter, graceful: bool) -> None:
        """Close after what is buffered for the client was sent (within `body_timeout`), or at once: then with a
        reset, so what the kernel still holds for a client that reads nothing is dropped too."""
        if graceful:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), self.limits.body_timeout)
                return
            except (TimeoutError, OSError, asyncio.CancelledError):
                pass
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _refuse(self, client: _Client, reject: _Reject, retry_after: str | None = None) -> None:
        """Answer `reject` and end the connection: our side is shut, then what the client still sends is read
        and dropped for LINGER_S (closing with unread input would reset the connection and lose the answer)."""
        log.info("front: %s %s for %s", reject.status, reject.message, client.peer)
        client.writer.write(error_response(reject, {"Retry-After": retry_after} if retry_after else None))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.writer.drain(), self.limits.body_timeout)
            if client.writer.can_write_eof():
                client.writer.write_eof()

            async def drop_input() -> None:
                while await client.reader.read(READ_CHUNK):
                    pass

            await asyncio.wait_for(drop_input(), LINGER_S)

    async def _one(self, client: _Client, first: bool) -> bool:
        """Serve one request of the connection; whether the connection stays open for another."""
        try:
            head = await self._read_head(client, first)
            if head is None:
                return False
            request = parse_head(head)
            if request.length is not None and request.length > self.limits.max_body_bytes:
                raise _Reject(413, "payload_too_large", f"the body is {request.length} bytes; this server accepts "
                              f"at most {self.limits.max_body_bytes}", "Content-Length")
            if request.expect_continue and request.length != 0:
                client.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await asyncio.wait_for(client.writer.drain(), self.limits.body_timeout)
            body, body_length = await self._read_body(client, request)
        except _Reject as reject:
            await self._refuse(client, reject)
            return False
        try:
            return await self._forward(client, request, body, body_length)
        finally:
            body.close()

    async def _read_head(self, client: _Client, first: bool) -> bytes | None:
        """The next request's line and headers, within `header_timeout` of its first byte (408 past it);
        None when no request comes (the connection is closed without an answer)."""
        loop = asyncio.get_running_loop()
        wait = self.limits.header_timeout if first else IDLE_TIMEOUT_S
        while True:
            while client.buf.startswith(b"\r\n"):  # stray line ends before a request line are ignored (RFC 9112)
                del client.buf[:2]
            if client.buf:
                break
            try:
                await client.fill(loop.time() + wait)
            except (TimeoutError, _ClientGone):
                return None
        return await self._read_rest_of_head(client, loop.time() + self.limits.header_timeout)

    async def _read_rest_of_head(self, client: _Client, deadline: float) -> bytes:
        while (end := client.buf.find(b"\r\n\r\n")) < 0:
            if len(client.buf) > HEAD_LIMIT:
                raise _Reject(431, "request_header_fields_too_large", f"the headers are over {HEAD_LIMIT} bytes")
            try:
                await client.fill(deadline)
            except TimeoutError:
                raise _Reject(408, "request_timeout", "the request's headers did not arrive within "
                              f"{self.limits.header_timeout:g} s") from None
        if end > HEAD_LIMIT:
            raise _Reject(431, "request_header_fields_too_large", f"the headers are over {HEAD_LIMIT} bytes")
        head = bytes(client.buf[:end])
        del client.buf[:end + 4]
        return head

    async def _read_body(self, client: _Client, request: _Request) -> tuple[IO[bytes], int]:
        """The whole body, by its deadline (408 past it), into a file spooled to disk past SPOOL_BYTES."""
        sink = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        clock = _BodyClock(self.limits)
        try:
            if request.length is None:
                await self._read_chunked(client, sink, clock)
            else:
                await self._read_exactly(client, request.length, sink, clock)
        except TimeoutError:
            sink.close()
            raise clock.timeout(request.length) from None
        except BaseException:
            sink.close()
            raise
        return sink, clock.received

    async def _read_exactly(self, client: _Client, n: int, sink: IO[bytes], clock: _BodyClock) -> None:
        left = n
        while left:
            if not client.buf:
                await client.fill(clock.deadline())
            take = bytes(client.buf[:left])
            del client.buf[:len(take)]
            left -= len(take)
            sink.write(take)
            clock.received += len(take)

    async def _read_line(self, client: _Client, clock: _BodyClock, limit: int) -> bytes:
        while (end := client.buf.find(b"\r\n")) < 0:
            if len(client.buf) > limit:
                raise _Reject(400, "bad_request", "malformed chunked body")
            await client.fill(clock.deadline())
        line = bytes(client.buf[:end])
        del client.buf[:end + 2]
        return line

    async def _read_chunked(self, client: _Client, sink: IO[bytes], clock: _BodyClock) -> None:
        while True:
            line = await self._read_line(client, clock, CHUNK_LINE_LIMIT)
            size_text = line.split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size_text):
                raise _Reject(400, "bad_request", "malformed chunk size in a chunked body")
            size = int(size_text, 16)
            if size == 0:
                trailers = 0
                while line := await self._read_line(client, clock, HEAD_LIMIT):  # trailers: read and dropped
                    trailers += len(line)
                    if trailers > HEAD_LIMIT:
                        raise _Reject(431, "request_header_fields_too_large", "the trailers are too large")
                return
            if clock.received + size > self.limits.max_body_bytes:
                raise _Reject(413, "payload_too_large",
                              f"the body is over {self.limits.max_body_bytes} bytes, the most this server accepts")
            await self._read_exactly(client, size, sink, clock)
            while len(client.buf) < 2:
                await client.fill(clock.deadline())
            if client.buf[:2] != b"\r\n":
                raise _Reject(400, "bad_request", "malformed chunked body (no CRLF after a chunk)")
            del client.buf[:2]

    async def _forward(self, client: _Client, request: _Request, body: IO[bytes], body_length: int) -> bool:
        """Hand the request to gunicorn and relay its response; whether the client connection stays open.

        The body is sent while the response is read, on a plain socket: a route may answer (a 413, a 401) and
        close before it reads the body, and its answer must still be read after the send failed."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, self.upstream)
        except OSError:
            sock.close()
            await self._refuse(client, _Reject(503, "unavailable", "the API is not answering (starting or "
                                               "restarting); retry"), "1")
            return False
        up = _Upstream(sock)
        head = upstream_head(request, body_length, client.peer, self.limits.trusted_proxies)
        sender = asyncio.create_task(up.send(head, body))
        gone = asyncio.Event()
        watcher = asyncio.create_task(self._watch_client(client, sender, up, gone))
        relayed = _Relayed()
        try:
            keep = await self._relay(client, request, up, relayed)
            return keep and not gone.is_set()
        except (ConnectionError, OSError, ValueError):
            if not relayed.started and not gone.is_set():
                await self._refuse(client, _Reject(502, "bad_gateway", "the API closed the connection without "
                                                   "an answer"))
            return False
        finally:
            for task in (watcher, sender):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            sock.close()

    @staticmethod
    async def _watch_client(client: _Client, sender: asyncio.Task[None], up: _Upstream, gone: asyncio.Event) -> None:
        """While gunicorn answers: a client that closes its connection has the request's connection to gunicorn
        half-closed too, once the request is sent, so the API sees it gone as it would without the front (the
        chat routes cancel their generation then). Bytes of a next, pipelined request are kept."""
        while len(client.buf) < PIPELINE_LIMIT:
            try:
                data = await client.reader.read(READ_CHUNK)
            except OSError:
                data = b""
            if not data:
                gone.set()
                with contextlib.suppress(Exception):
                    await sender
                    up.sock.shutdown(socket.SHUT_WR)
                return
            client.buf += data

    async def _send(self, client: _Client, data: bytes) -> None:
        client.writer.write(data)
        try:
            await asyncio.wait_for(client.writer.drain(), self.limits.body_timeout)
        except TimeoutError:
            log.info("front: a client took no response bytes in %g s; cut off (%s)", self.limits.body_timeout,
                     client.peer)
            raise ConnectionError("slow reader") from None

    async def _relay(self, client: _Client, request: _Request, up: _Upstream, relayed: _Relayed) -> bool:
        while True:
            raw = await up.read_until(b"\r\n\r\n", UPSTREAM_HEAD_LIMIT)
            lines = raw[:-4].split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise ConnectionError("malformed response from the API")
            status = int(parts[1])
            headers = [(n, v.strip()) for n, _, v in (line.partition(b":") for line in lines[1:])]
            if 100 <= status < 200 and status != 101:
                if request.minor == 1:  # interim responses (early hints) to HTTP/1.1 clients only
                    relayed.started = True
                    await self._send(client, raw)
                continue
            break
        named = {t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",")}
        kept = [(n, v) for n, v in headers
                if n.lower() not in (b"connection", b"keep-alive", b"proxy-connection") and n.lower() not in named]
        chunked = any(n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in kept)
        length_values = [v for n, v in kept if n.lower() == b"content-length"]
        no_body = request.method == b"HEAD" or status in (204, 304)
        length = int(length_values[0]) if length_values and length_values[0].isdigit() else None
        delimited = no_body or chunked or length is not None
        keep = request.keep_alive and delimited
        out = [lines[0]] + [n + b": " + v for n, v in kept] + ([] if keep else [b"Connection: close"])
        relayed.started = True
        await self._send(client, b"\r\n".join(out) + b"\r\n\r\n")
        if no_body:
            return keep
        if chunked:
            await self._relay_chunked(client, up)
        else:
            await self._relay_bytes(client, up, length)
        return keep

    async def _relay_bytes(self, client: _Client, up: _Upstream, n: int | None) -> None:
        """`n` bytes of the response (None: until gunicorn closes) to the client, as they come."""
        left = n
        while left is None or left > 0:
            data = await up.read_some(READ_CHUNK if left is None else min(READ_CHUNK, left))
            if not data:
                if left is None:
                    return
                raise ConnectionError("the API closed its response early")
            await self._send(client, data)
            if left is not None:
                left -= len(data)

    async def _relay_chunked(self, client: _Client, up: _Upstream) -> None:
        while True:
            line = await up.read_until(b"\r\n", CHUNK_LINE_LIMIT)
            await self._send(client, line)
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := await up.read_until(b"\r\n", UPSTREAM_HEAD_LIMIT)) != b"\r\n":
                    await self._send(client, trailer)
                await self._send(client, b"\r\n")
                return
            await self._relay_bytes(client, up, size + 2)


class _Upstream:
    """One request's connection to gunicorn, a non-blocking Unix socket. Sending and receiving fail apart: a
    send refused because gunicorn answered and closed leaves its answer readable."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.loop = asyncio.get_running_loop()

    async def send(self, head: bytes, body: IO[bytes]) -> None:
        try:
            await self.loop.sock_sendall(self.sock, head)
            body.seek(0)
            while chunk := body.read(READ_CHUNK):
                await self.loop.sock_sendall(self.sock, chunk)
        except OSError:
            pass  # gunicorn answered without reading it all: the answer is read all the same

    async def read_some(self, n: int) -> bytes:
        """Up to `n` bytes; b"" once gunicorn closed."""
        if self.buf:
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        return await self.loop.sock_recv(self.sock, n)

    async def read_until(self, separator: bytes, limit: int) -> bytes:
        """Up to and with `separator`; ConnectionError past `limit` or when gunicorn closes first."""
        while (end := self.buf.find(separator)) < 0:
            if len(self.buf) > limit:
                raise ConnectionError("the API's response head is too large")
            data = await self.loop.sock_recv(self.sock, READ_CHUNK)
            if not data:
                raise ConnectionError("the API closed the connection")
            self.buf += data
        end += len(separator)
        line = bytes(self.buf[:end])
        del self.buf[:end]
        return line


def _raise_open_files_limit(wanted: int) -> None:
    """Each connection takes a descriptor, and one more to gunicorn: raise the soft limit toward `wanted`."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))

