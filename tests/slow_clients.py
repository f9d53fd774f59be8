"""Slow clients on real sockets, for the tests of a real server (`pluristeer serve`, `pluristeer up`): bodies and
headers trickled a byte at a time, and /healthz polled meanwhile."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

LOGIN_HEAD = (b"POST /console/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n"
              b"Content-Length: 100000\r\n\r\n")


@dataclass
class SlowClient:
    """Sends `head`, then `trickle` one byte every `interval` s until the server answers or closes; `answer` is
    what came back (b"" for a plain close) and `cut_after` the seconds from the first byte until then."""

    port: int
    head: bytes = LOGIN_HEAD
    trickle: bytes = b"a" * 1000
    interval: float = 0.5
    answer: bytes | None = None
    cut_after: float | None = None
    thread: threading.Thread = field(init=False)

    def start(self) -> SlowClient:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
            sock.settimeout(self.interval)
            received = b""
            try:
                sock.sendall(self.head)
                for byte in self.trickle:
                    sock.sendall(bytes([byte]))
                    try:
                        received += sock.recv(65536)
                        break  # an answer, or a close: the server cut it off
                    except TimeoutError:
                        continue
                sock.settimeout(30)
                while chunk := sock.recv(65536):
                    received += chunk
            except OSError:
                pass
        self.answer, self.cut_after = received, time.monotonic() - started

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)


def poll_health(url: str, times: int, every: float = 0.3) -> list[tuple[int, float]]:
    """(status, seconds) of `times` GET /healthz, `every` s apart; status 0 when it failed or timed out (10 s)."""
    results = []
    for _ in range(times):
        started = time.monotonic()
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
                response.read()
                status = response.status
        except (urllib.error.URLError, OSError):
            status = 0
        took = time.monotonic() - started
        results.append((status, took))
        time.sleep(max(0.0, every - took))
    return results
