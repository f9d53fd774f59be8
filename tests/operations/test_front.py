"""The front (`service.front`), against a small upstream on a Unix socket: whole requests are handed on,
responses relayed as they come, and slow, stalled, oversize or malformed requests are answered by the front
itself without reaching the upstream. The real server behind it: tests/operations/test_slow_clients.py."""

from __future__ import annotations

import http.client
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from service.front import Front, FrontLimits
from service.redis import free_port


class Upstream(BaseHTTPRequestHandler):
    """What gunicorn would be: echoes what it got; /stream streams; /early answers before reading the body;
    /until-gone streams until its client is gone."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []
    gone: list[str] = []

    def log_message(self, format: str, *args: object) -> None:  # a Unix socket has no client address
        pass

    def _answer(self, status: int, payload: dict, close: bool = True) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _handle(self) -> None:
        if self.path == "/early":
            self._answer(413, {"error": "too large"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        record = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                  "body_len": len(body), "body_head": body[:20].decode("latin-1"), "version": self.request_version}
        Upstream.seen.append(record)
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                self._chunk(f"data: {i}\n\n".encode())
                time.sleep(0.3)
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path == "/big":  # more than the front and the sockets hold for a client that reads nothing
            self.send_response(200)
            self.send_header("Content-Length", str(64 << 20))
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"x" * (1 << 20))
            except OSError:
                Upstream.gone.append(self.path)
            return
        if self.path == "/until-gone":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk(b"data: first\n\n")
            # As the chat routes do: a readable socket that yields no byte is a client gone.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                self.connection.settimeout(0.05)
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        Upstream.gone.append(self.path)
                        return
                except TimeoutError:
                    pass
            return
        self._answer(200, record)

    do_GET = do_POST = do_PUT = do_HEAD = _handle


@pytest.fixture
def upstream(tmp_path) -> Iterator[str]:
    path = str(tmp_path / "api.sock")
    Upstream.seen, Upstream.gone = [], []
    server = socketserver.ThreadingUnixStreamServer(path, Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path
    server.shutdown()
    server.server_close()


def start(upstream: str, **limits) -> tuple[Front, int]:
    port = free_port()
    front = Front("127.0.0.1", port, upstream, FrontLimits(**{"header_timeout": 2.0, "body_timeout": 1.0,
                                                             "body_min_rate": 1000, **limits}))
    front.start()
    return front, port


@pytest.fixture
def front(upstream) -> Iterator[int]:
    front, port = start(upstream)
    yield port
    front.stop()


def raw(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send `data`, read until the front closes; (what came back, seconds taken)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received, time.monotonic() - started


def test_requests_are_handed_on_whole_and_connections_kept_alive(front):
    conn = http.client.HTTPConnection("127.0.0.1", front, timeout=10)
    conn.request("GET", "/echo?x=1", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
    first = json.loads(conn.getresponse().read())
    assert first["method"] == "GET" and first["path"] == "/echo?x=1" and first["version"] == "HTTP/1.1"
    # The client's forwarding headers are dropped (no proxy in front is trusted); the front adds its peer.
    assert first["headers"]["X-Forwarded-For"] == "127.0.0.1" and "X-Forwarded-Proto" not in first["headers"]
    assert first["headers"]["Connection"] == "close"  # one request per connection to the upstream
    conn.request("POST", "/echo", body=b"a" * 5000, headers={"Content-Type": "text/plain"})
    second = json.loads(conn.getresponse().read())  # the same connection, kept alive
    assert second["body_len"] == 5000 and second["headers"]["Content-Length"] == "5000"
    # A chunked body arrives decoded, with its length.
    conn.request("PUT", "/echo", body=iter([b"x" * 1000, b"y" * 2500]), encode_chunked=True)
    third = json.loads(conn.getresponse().read())
    assert third["body_len"] == 3500 and "Transfer-Encoding" not in third["headers"]
    assert third["body_head"] == "x" * 20
    conn.close()
    # Two pipelined requests in one write: two answers, in order.
    pair = b"GET /echo?n=1 HTTP/1.1\r\nHost: a\r\n\r\nGET /echo?n=2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    answer, _ = raw(front, pair)
    assert answer.count(b"HTTP/1.0 200") + answer.count(b"HTTP/1.1 200") == 2, answer
    assert answer.index(b"/echo?n=1") < answer.index(b"/echo?n=2")


def test_trusted_proxies_keep_their_forwarding_headers(upstream):
    front, port = start(upstream, trusted_proxies=1)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/echo", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
        headers = json.loads(conn.getresponse().read())["headers"]
        conn.close()
        assert headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1" and headers["X-Forwarded-Proto"] == "https"
    finally:
        front.stop()


def test_a_streamed_response_is_relayed_as_it_comes(front):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", front), timeout=10) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        received = b""
        while b"data: 0" not in received:
            received += sock.recv(4096)
        first_at = time.monotonic() - started
        while not received.endswith(b"0\r\n\r\n"):
            received += sock.recv(4096)
        done_at = time.monotonic() - started
    assert b"Transfer-Encoding: chunked" in received and b"data: 2" in received
    assert first_at < 0.3 < 0.6 < done_at, (first_at, done_at)  # not held back until the end


def test_a_stalled_body_is_cut_off_with_408_at_its_deadline_and_never_reaches_the_api(front):
    head = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
    answer, took = raw(front, head + b"x" * 100)
    # The deadline: body_timeout (1 s) plus 1 s per body_min_rate (1000) bytes received: 1.1 s.
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "request_timeout" and "100 of 100000 bytes" in error["message"]
    assert 1.05 <= took < 3.0, took
    assert Upstream.seen == []


def test_a_trickling_body_is_cut_off_once_it_falls_below_the_minimum_rate(front):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", front), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
        try:
            while time.monotonic() - started < 8:
                sock.sendall(b"x")  # a byte every 0.2 s: 5 bytes/s against a minimum of 1000
                time.sleep(0.2)
        except OSError:
            pass
        sock.settimeout(5)
        try:
            answer = sock.recv(65536)
        except OSError:
            answer = b""
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ") or answer == b"", answer
    assert took < 4.0, took
    assert Upstream.seen == []


def test_headers_that_stall_get_408(front):
    answer, took = raw(front, b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Slow: ")
    assert answer.startswith(b"HTTP/1.1 408 ") and 1.9 <= took < 4.0, (answer, took)
    # A connection that sends nothing is closed without an answer.
    answer, took = raw(front, b"")
    assert answer == b"" and 1.9 <= took < 4.0


def test_too_large_malformed_and_unsupported_requests_are_answered_by_the_front(upstream):
    front, port = start(upstream, max_body_bytes=10_000)
    try:
        answer, _ = raw(port, b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 20000\r\n\r\n" + b"x" * 20000)
        assert answer.startswith(b"HTTP/1.1 413 ") and b"at most 10000" in answer, answer
        chunked = b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunks = b"1000\r\n" + b"x" * 4096 + b"\r\n" + b"2000\r\n" + b"x" * 8192 + b"\r\n0\r\n\r\n"
        answer, _ = raw(port, chunked + chunks)  # 12288 bytes: over the limit once the second chunk is announced
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        for request, status in [
            (b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", 400),
            (b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
            (b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
            (chunked + b"zz\r\n", 400),
            (chunked + b"3\r\nabcXY", 400),
            (b"GET /echo HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            (b"GET /echo HTTP/1.1\r\nHost : a\r\n\r\n", 400),
            (b"GET /echo HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
            (b"GET /echo HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
            (b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: magic\r\nContent-Length: 1\r\n\r\nx", 417),
        ]:
            answer, _ = raw(port, request)
            assert answer.startswith(b"HTTP/1.1 %d " % status), (request[:80], answer[:200])
        assert Upstream.seen == []
    finally:
        front.stop()


def test_expect_100_continue_is_answered_by_the_front(front):
    with socket.create_connection(("127.0.0.1", front), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n"
                     b"Connection: close\r\n\r\n")
        assert sock.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    record = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert record["body_len"] == 5 and "Expect" not in record["headers"]


def test_an_answer_given_before_the_body_is_read_still_reaches_the_client(front):
    body = b"x" * (4 << 20)  # more than the socket buffers: the upstream answers and closes unread
    answer, _ = raw(front, b"POST /early HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                    % len(body) + body)
    assert answer.startswith(b"HTTP/1.0 413") or answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_client_that_goes_away_is_seen_gone_by_the_api(front):
    with socket.create_connection(("127.0.0.1", front), timeout=10) as sock:
        sock.sendall(b"GET /until-gone HTTP/1.1\r\nHost: a\r\n\r\n")
        received = b""
        while b"data: first" not in received:
            received += sock.recv(4096)
    deadline = time.monotonic() + 5
    while not Upstream.gone:
        assert time.monotonic() < deadline, "the upstream never saw its client go"
        time.sleep(0.05)


def test_http_1_0_clients_get_their_answer_and_a_close(front):
    answer, _ = raw(front, b"GET /echo HTTP/1.0\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b" 200 " in head.split(b"\r\n")[0] and b"Connection: close" in head
    assert json.loads(body)["version"] == "HTTP/1.0"


def test_a_client_that_reads_no_response_is_cut_off_and_frees_the_api(front):
    with socket.create_connection(("127.0.0.1", front), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        deadline = time.monotonic() + 10  # the front's deadline is body_timeout (1 s) without progress
        while not Upstream.gone:
            assert time.monotonic() < deadline, "the upstream was left writing to a client that reads nothing"
            time.sleep(0.1)
        received = b""
        try:
            while chunk := sock.recv(1 << 20):
                received += chunk
        except OSError:
            pass
    assert len(received) < 64 << 20


def test_no_upstream_is_503_with_retry_after(tmp_path):
    front, port = start(str(tmp_path / "nobody.sock"))
    try:
        answer, _ = raw(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in answer, answer
    finally:
        front.stop()


def test_the_address_in_use_is_an_error_at_start(upstream):
    front, port = start(upstream)
    try:
        with pytest.raises(OSError):
            Front("127.0.0.1", port, upstream, FrontLimits()).start()
    finally:
        front.stop()
