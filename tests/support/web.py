"""The local HTTP server and its routes, and data: URIs (the other way a test hands the
worker bytes).

The server is ``http.server.ThreadingHTTPServer`` on 127.0.0.1 in a background thread; nothing
is mocked.

Server (one per test session, see the ``http_server`` fixture in conftest.py)::

    url = http_server.route("/a.jpg", body(jpeg(1), "image/jpeg"))
    http_server.route("/flaky", fail_then(2, body(png(2))))     # 500, 500, then the image
    http_server.hits("/flaky")                                     # requests seen on that path
    http_server.sent("/big")                                       # body bytes it managed to send

Routes are plain callables ``route(handler)`` that write a whole response; the factories below
cover static bodies (any content type or none, any status, true/absent/lying Content-Length),
``status``, ``fail_then``, ``delay``, ``drip``, ``redirect``, ``reset`` (close without answering) and
``huge`` (a body generated on the fly, so tests never allocate it). Unknown paths answer 404.
Private addresses are refused by runpod's SSRF guard unless RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS
is true: ``allow_private_urls(monkeypatch)`` (the fixture does it) turns it on for one test.

``drip_headers`` never finishes its headers; ``count_bytes_returned`` counts what a client
really read; ``data_uri(bytes, mime)`` builds inline sources.
"""
from __future__ import annotations

import base64
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


PRIVATE_ENV = "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"
PROXY_ENVS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")

Route = Callable[["_Handler"], None]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one response per connection; a body may end at close
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        owner = self.server.owner
        owner._count(owner._hits, path, 1)
        try:
            owner.routes.get(path, status(404))(self)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass  # the client went away (a cap, a deadline): expected

    def log_message(self, format: str, *args: object) -> None:
        pass

    def write_body(self, data: bytes) -> None:
        """Write part of the body and count it toward ``sent(path)``."""
        self.wfile.write(data)
        self.server.owner._count(self.server.owner._sent, self.path.split("?", 1)[0], len(data))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: "LocalServer"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # resets and client disconnects are part of the tests


class LocalServer:
    """A real threaded HTTP server on 127.0.0.1 with a per-test routing table."""

    def __init__(self, host: str = "127.0.0.1"):
        self._httpd = _Server((host, 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="test-http-server")
        self._lock = threading.Lock()
        self.routes: dict[str, Route] = {}
        self._hits: Counter[str] = Counter()
        self._sent: Counter[str] = Counter()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def route(self, path: str, handler: Route) -> str:
        """Serve ``handler`` at ``path``; return the URL."""
        self.routes[path] = handler
        return self.url(path)

    def hits(self, path: str) -> int:
        """Requests received on ``path`` since the last reset."""
        with self._lock:
            return self._hits[path]

    def sent(self, path: str) -> int:
        """Body bytes written on ``path`` since the last reset (what the socket accepted)."""
        with self._lock:
            return self._sent[path]

    def _count(self, counter: Counter[str], path: str, n: int) -> None:
        with self._lock:
            counter[path] += n

    def reset(self) -> None:
        """Forget routes and counters (between tests)."""
        with self._lock:
            self.routes.clear()
            self._hits.clear()
            self._sent.clear()

    def start(self) -> "LocalServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def allow_private_urls(monkeypatch) -> None:
    """Let runpod's SSRF guard fetch 127.0.0.1 (and fetch it directly, not through a proxy)."""
    monkeypatch.setenv(PRIVATE_ENV, "true")
    for name in PROXY_ENVS:
        monkeypatch.delenv(name, raising=False)


def _head(h: _Handler, code: int, headers: dict[str, str]) -> None:
    h.send_response(code)
    for name, value in headers.items():
        h.send_header(name, value)
    h.end_headers()


def body(data: bytes, content_type: str | None = "application/octet-stream", code: int = 200,
         length: bool | int = True, headers: dict[str, str] | None = None) -> Route:
    """A fixed response. ``length``: True = true Content-Length, False = none (the body ends
    when the connection closes), an int = that (lying) Content-Length."""
    extra = dict(headers or {})
    if content_type is not None:
        extra["Content-Type"] = content_type
    if length is not False:
        extra["Content-Length"] = str(len(data) if length is True else length)

    def serve(h: _Handler) -> None:
        _head(h, code, extra)
        h.write_body(data)
    return serve


def status(code: int) -> Route:
    """An error page with this status (a small HTML body, as real servers send)."""
    return body(f"<html><body>{code}</body></html>".encode(), "text/html", code=code)


def fail_then(times: int, then: Route, failure: Route | None = None) -> Route:
    """Fail the first ``times`` requests (default: HTTP 500; or any route, e.g. ``reset()``),
    then behave like ``then``."""
    failure = failure or status(500)
    seen = Counter[str]()
    lock = threading.Lock()

    def serve(h: _Handler) -> None:
        with lock:
            seen["n"] += 1
            failing = seen["n"] <= times
        (failure if failing else then)(h)
    return serve


def delay(seconds: float, then: Route) -> Route:
    """Wait ``seconds`` before answering like ``then`` (a slow server, not a slow body)."""
    def serve(h: _Handler) -> None:
        time.sleep(seconds)
        then(h)
    return serve


def drip(data: bytes, interval: float = 0.2, step: int = 1, length: bool = True) -> Route:
    """Send ``step`` bytes every ``interval`` seconds (never trips a read timeout)."""
    def serve(h: _Handler) -> None:
        _head(h, 200, {"Content-Length": str(len(data))} if length else {})
        for start in range(0, len(data), step):
            h.write_body(data[start:start + step])
            time.sleep(interval)
    return serve


def redirect(location: str, code: int = 302) -> Route:
    """Redirect to a path, another host/port, or (pointing at itself) a loop."""
    return body(b"", None, code=code, headers={"Location": location})


def reset() -> Route:
    """Close the connection with a TCP reset and no response at all."""
    def serve(h: _Handler) -> None:
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
        h.close_connection = True
    return serve


def huge(size: int, head: bytes = b"", length: bool = False, chunk: int = 64 * 1024) -> Route:
    """A ``size``-byte body generated on the fly: ``head`` (e.g. JPEG magic) then filler.
    ``length=False`` sends no Content-Length, so only a streaming cap can stop it."""
    filler = bytes(range(256)) * (chunk // 256)

    def serve(h: _Handler) -> None:
        _head(h, 200, {"Content-Length": str(size)} if length else {})
        h.write_body(head)
        left = size - len(head)
        while left > 0:
            h.write_body(filler[:left])
            left -= len(filler)
    return serve


def drip_headers(interval: float = 0.2) -> Route:
    """Answer 200, then drip header bytes, one every ``interval`` seconds, never ending them
    (a read timeout never trips; only a deadline that covers the headers stops it)."""
    def serve(h: _Handler) -> None:
        h.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        for _ in range(100_000):
            h.wfile.write(b"x")
            time.sleep(interval)
    return serve


def count_bytes_returned(monkeypatch, owner: object, name: str) -> list[int]:
    """Spy on ``owner.name`` (a method returning bytes): the length of every value it returns,
    e.g. ``urllib3.response.HTTPResponse.read1``: the body bytes a client really read."""
    got: list[int] = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        data = real(*args, **kwargs)
        got.append(len(data))
        return data
    monkeypatch.setattr(owner, name, spy)
    return got


def data_uri(data: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
