"""Shared test support: a real local HTTP server, real encoded images, real zips.

Everything here is real: the server is ``http.server.ThreadingHTTPServer`` on 127.0.0.1 in a
background thread, images are encoded by PIL, zips are written by ``zipfile`` (and patched byte
by byte where zipfile refuses, e.g. the encryption flag). Nothing is mocked.

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

Images: ``picture(seed)`` draws a distinct picture per seed (colours, gradient direction,
shapes and stripes all depend on it), so captioning tests get distinct captions;
``image_bytes(fmt, seed, size, mode)`` encodes one; the special cases (CMYK, 16-bit, palette
with transparency, EXIF rotation, animation, pixel-bomb header, truncation, photo-like) have
their own factories.

Zips: ``make_zip(entries)`` with entries ``(name or ZipInfo, bytes)``; ``symlink_entry``,
``patch_entry`` (flags, sizes, CRC in the central directory and local header), ``corrupt_entry``
(damage compressed data), ``zip_bomb``, ``many_members_zip``, ``truncated``; name lists
``JUNK_NAMES`` and ``ZIP_SLIP_NAMES``. ``data_uri(bytes, mime)`` builds inline sources.
"""
from __future__ import annotations

import base64
import functools
import io
import random
import socket
import stat
import struct
import threading
import time
import zipfile
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Iterator

from PIL import Image, ImageDraw

PRIVATE_ENV = "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"
PROXY_ENVS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")

Route = Callable[["_Handler"], None]


# --- HTTP server -----------------------------------------------------------------------------

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


# --- images ----------------------------------------------------------------------------------

def _color(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A distinct RGB picture per seed: two-colour gradient (direction by seed), then shapes
    and stripes whose colours, places and kinds all come from the seed."""
    rng = random.Random(seed)
    w, h = size
    mask = Image.linear_gradient("L").rotate(90 * (seed % 4)).resize(size)
    img = Image.composite(Image.new("RGB", size, _color(rng)), Image.new("RGB", size, _color(rng)),
                          mask)
    draw = ImageDraw.Draw(img)
    for _ in range(3 + seed % 4):
        x0, y0 = rng.randrange(max(w, 1)), rng.randrange(max(h, 1))
        box = (x0, y0, x0 + rng.randrange(1, w // 2 + 2), y0 + rng.randrange(1, h // 2 + 2))
        shape = (draw.ellipse, draw.rectangle)[rng.randrange(2)]
        shape(box, fill=_color(rng))
    stripe = max(1, w // (4 + seed % 5))
    for x in range(0, w, stripe * 2):
        draw.line((x, 0, x, h // 4), fill=_color(rng), width=max(1, stripe // 2))
    return img


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def image_bytes(fmt: str = "JPEG", seed: int = 0, size: tuple[int, int] = (64, 48),
                mode: str = "RGB", **params: object) -> bytes:
    """``picture(seed, size)`` in ``mode`` ("L", "LA", "RGBA", "1", "P", ...) encoded as fmt."""
    img = picture(seed, size)
    if mode != "RGB":
        img = img.convert(mode)
    return encode(img, fmt, **params)


def jpeg(seed: int = 0, size: tuple[int, int] = (64, 48), **params: object) -> bytes:
    return image_bytes("JPEG", seed, size, **params)


def png(seed: int = 0, size: tuple[int, int] = (64, 48), **params: object) -> bytes:
    return image_bytes("PNG", seed, size, **params)


def cmyk_jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    return image_bytes("JPEG", seed, size, mode="CMYK")


def png16(size: tuple[int, int] = (64, 48)) -> bytes:
    """A 16-bit grayscale PNG (mode I;16): a horizontal ramp over the full 0..65535 range."""
    ramp = Image.linear_gradient("L").rotate(90).resize(size).convert("I")
    return encode(ramp.point(lambda v: v * 257).convert("I;16"), "PNG")


def palette_png_transparent(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    """A palette PNG whose colour index 0 is transparent."""
    img = picture(seed, size).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


def exif_rotated_jpeg(seed: int = 0, size: tuple[int, int] = (80, 40),
                      orientation: int = 6) -> bytes:
    """A JPEG stored ``size`` wide whose EXIF says to rotate it (6 = 90° clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(picture(seed, size), "JPEG", exif=exif)


def animated_gif(colors: Iterable[tuple[int, int, int]] = ((255, 0, 0), (0, 0, 255)),
                 size: tuple[int, int] = (32, 32)) -> bytes:
    """An animated GIF whose frames are solid ``colors`` (frame 0 first)."""
    frames = [Image.new("RGB", size, c) for c in colors]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100,
                  loop=0)


def truncated_jpeg(seed: int = 0, size: tuple[int, int] = (256, 192), keep: float = 0.5) -> bytes:
    data = jpeg(seed, size)
    return data[: int(len(data) * keep)]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def pixel_bomb_png(width: int = 50000, height: int = 50000) -> bytes:
    """A tiny PNG whose IHDR claims width x height (8-bit RGB); the pixel data is a stub."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def photo(size: tuple[int, int] = (4000, 3000), seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth per-channel gradients, sensor-like noise, soft shapes."""
    rng = random.Random(seed)
    channels = [Image.linear_gradient("L").rotate(rng.choice((0, 90, 180, 270))).resize(size)
                for _ in range(3)]
    img = Image.merge("RGB", channels)
    noise = Image.effect_noise(size, 24).convert("RGB")
    img = Image.blend(img, noise, 0.15)
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(12):
        x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(w // 20, w // 6)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_color(rng))
    return img


# --- zips ------------------------------------------------------------------------------------

JUNK_NAMES = ("__MACOSX/._a.jpg", ".DS_Store", "dir/.hidden.jpg", ".git/config", "notes.txt")
ZIP_SLIP_NAMES = ("../../x.jpg", "/abs/x.jpg", "back\\slash.jpg")

Entry = tuple["str | zipfile.ZipInfo", bytes]


def make_zip(entries: Iterable[Entry], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A real zip of ``(name or ZipInfo, data)`` entries; names are kept verbatim."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries:
            if isinstance(name, str):  # a ZipInfo keeps its own settings
                name = zipfile.ZipInfo(name)
                name.compress_type = compression
            zf.writestr(name, data)
    return buf.getvalue()


def symlink_entry(name: str, target: str = "/etc/passwd") -> Entry:
    """A unix symlink member (S_IFLNK in external_attr), as ``zip --symlinks`` writes it."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _central_entries(data: bytes) -> Iterator[tuple[int, str]]:
    """(offset, name) of each central directory entry, walked from the end record."""
    end = data.rindex(b"PK\x05\x06")
    count, _, offset = struct.unpack("<HII", data[end + 10:end + 20])
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[offset + 28:offset + 34])
        yield offset, data[offset + 46:offset + 46 + name_len].decode("utf-8", "replace")
        offset += 46 + name_len + extra_len + comment_len


# field -> (offset in the central entry, offset in the local header or None, struct format)
_FIELDS = {"flag_bits": (8, 6, "<H"), "crc": (16, 14, "<I"), "compress_size": (20, 18, "<I"),
           "file_size": (24, 22, "<I"), "external_attr": (38, None, "<I")}


def patch_entry(data: bytes, name: str, **fields: int) -> bytes:
    """Overwrite header fields of member ``name`` (flag_bits, crc, compress_size, file_size,
    external_attr) in the central directory and the local header, e.g. ``flag_bits=1`` marks
    it encrypted (zipfile cannot encrypt) and ``file_size=10`` makes its header lie."""
    out = bytearray(data)
    for offset, entry_name in _central_entries(data):
        if entry_name != name:
            continue
        local = struct.unpack("<I", data[offset + 42:offset + 46])[0]
        for field, value in fields.items():
            central_at, local_at, fmt = _FIELDS[field]
            struct.pack_into(fmt, out, offset + central_at, value)
            if local_at is not None:
                struct.pack_into(fmt, out, local + local_at, value)
    return bytes(out)


def corrupt_entry(data: bytes, name: str) -> bytes:
    """Damage the compressed data of member ``name`` (header intact): reading it fails."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(name)
    local = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[local + 26:local + 30])
    start = local + 30 + name_len + extra_len
    out = bytearray(data)
    for k in range(start + 2, start + min(info.compress_size, 64)):
        out[k] ^= 0x5A
    return bytes(out)


@functools.lru_cache(maxsize=None)
def zip_bomb(size: int = 50 * 1024 * 1024) -> bytes:
    """One member of ``size`` zero bytes, deflated at level 9 (ratio about 1000:1)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("zeros.jpg", "w") as member:
            block = bytes(1 << 20)
            for _ in range(size >> 20):
                member.write(block)
    return buf.getvalue()


def many_members_zip(count: int, data: bytes = b"x") -> bytes:
    """``count`` tiny members named img00000.jpg, ... (only the count matters)."""
    return make_zip((f"img{i:05d}.jpg", data) for i in range(count))


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def data_uri(data: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# --- the worker as a process ---------------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
HANDLER = REPO / "src" / "handler.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**overrides: str) -> dict[str, str]:
    """Environment for a worker process: tiny model (or TEST_ENGINE's engine), private URLs
    allowed for the local server, no proxies."""
    import os
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENVS}
    env.update({"BLIP_MODEL": "tiny-random", PRIVATE_ENV: "true", "PYTHONUNBUFFERED": "1",
                "BLIP_ENGINE": os.environ.get("TEST_ENGINE", "transformers")})
    env.update(overrides)
    return env


def run_handler(*args: str, timeout: float = 300, **env: str):
    """``python src/handler.py ARGS`` in the repo root, as a user runs it locally."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, str(HANDLER), *args], cwd=REPO, env=worker_env(**env),
                          capture_output=True, text=True, timeout=timeout)


class ApiServer:
    """``python src/handler.py --rp_serve_api`` in a subprocess: runpod's own local API."""

    def __init__(self, log_path, **env: str):
        self.port = free_port()
        self.env = worker_env(**env)
        self.log_path = log_path
        self.proc = None

    def start(self, timeout: float = 180) -> "ApiServer":
        import subprocess
        import sys
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(HANDLER), "--rp_serve_api", "--rp_api_port", str(self.port)],
            cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API server exited: {self.output()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the API server did not start: {self.output()[-2000:]}")

    def output(self) -> str:
        self.log.flush()
        return open(self.log_path).read()

    def post(self, path: str, payload: object = None, timeout: float = 300) -> dict:
        import json
        import urllib.request
        data = json.dumps(payload if payload is not None else {}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)

    def runsync(self, job_input: dict, timeout: float = 300) -> dict:
        return self.post("/runsync", {"input": job_input}, timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        if self.proc:
            self.log.close()

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- hardening: more hostile files, outcomes, load mixes, process figures -------------------

def animated(fmt: str = "WEBP", colors: Iterable[tuple[int, int, int]] = ((255, 0, 0), (0, 0, 255)),
             size: tuple[int, int] = (32, 32), **params: object) -> bytes:
    """An animated GIF or WebP (lossless unless ``params`` say otherwise) whose frames are
    solid ``colors`` (frame 0 first)."""
    frames = [Image.new("RGB", size, c) for c in colors]
    if fmt == "WEBP":
        params.setdefault("lossless", True)
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                  **params)


def drip_headers(interval: float = 0.2) -> Route:
    """Answer 200, then drip header bytes, one every ``interval`` seconds, never ending them
    (a read timeout never trips; only a deadline that covers the headers stops it)."""
    def serve(h: _Handler) -> None:
        h.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        for _ in range(100_000):
            h.wfile.write(b"x")
            time.sleep(interval)
    return serve


def solid(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    """A lossless PNG of one colour (e.g. what an animation's first frame must caption as)."""
    return encode(Image.new("RGB", size, color), "PNG")


def upright(data: bytes) -> bytes:
    """The image as a viewer shows it (EXIF orientation applied), as a lossless PNG."""
    from PIL import ImageOps
    return encode(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), "PNG")


def outcomes(out: dict) -> dict[str, "str | None"]:
    """A job's result as {image_path: None (captioned) or its error}, in output order."""
    got: dict[str, str | None] = {c["image_path"]: None for c in out.get("captions", [])}
    got.update({e["image_path"]: e["error"] for e in out.get("errors", [])})
    return got


def outcome_problems(out: dict, expected: dict[str, "str | None"]) -> list[str]:
    """How a job's outcomes differ from ``expected`` ({image_path: None = captioned, or the
    start of its error message}); [] when they match exactly: the same images, each once."""
    got = outcomes(out)
    entries = len(out.get("captions", [])) + len(out.get("errors", []))
    problems = [f"{entries - len(got)} image paths answered twice"] if entries > len(got) else []
    problems += [f"{path}: missing from the output" for path in expected if path not in got]
    problems += [f"{path}: not expected in the output" for path in got if path not in expected]
    for path, want in expected.items():
        if path not in got:
            continue
        have = got[path]
        if want is None and have is not None:
            problems.append(f"{path}: expected a caption, got the error {have!r}")
        elif want is not None and (have is None or not have.startswith(want)):
            problems.append(f"{path}: expected an error starting {want!r}, got {have!r}")
    return problems


def api_output(answer: dict) -> dict:
    """A /runsync answer in ``Worker.run``'s shape: the output, or {"error": ...}."""
    if answer.get("status") == "COMPLETED":
        return answer["output"]
    return {"error": answer.get("error", f"no error in the answer {answer!r}")}


def within(seconds: float, fn: Callable, *args: object):
    """``fn(*args)``, or AssertionError when it has not returned within ``seconds``: a hang
    becomes a failure (the call is left running in a daemon thread)."""
    done: list = []
    thread = threading.Thread(target=lambda: done.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert done, f"{getattr(fn, '__name__', fn)} did not return within {seconds:g} s"
    return done[0]


def proc_figures(pid: int) -> dict[str, int]:
    """Resident memory (KiB), thread count and open file descriptors of a live process."""
    import os
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


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


# A load mix: jobs of every shape with exact expectations. Pool images are named by seed and
# captioned alone once (``MixJob.problems`` compares every caption with its image's own).

POOL_SIZE = 40


def pool_image(seed: int) -> bytes:
    """Pool image ``seed``: a small JPEG (even seeds) or PNG (odd seeds), distinct per seed."""
    return jpeg(seed) if seed % 2 == 0 else png(seed)


# (member/file bytes, expected error start) for the bad members and sources a mix contains
BAD_FILES = {
    "truncated": (lambda: truncated_jpeg(7), "not a readable image: truncated or corrupt JPEG"),
    "text": (lambda: b"this is not a picture", "not an image or a zip: the content is not"),
    "empty": (lambda: b"", "the file is empty (0 bytes); check that the source holds the image"),
}
BAD_MEMBERS = {
    **BAD_FILES,
    "symlink": (None, "symbolic link in the zip: links are not followed"),
    "nested": (lambda: make_zip([("a.png", png(1))]), "a zip inside the zip is not opened"),
}
GPU_FAILED = "the GPU failed while captioning"


class MixJob:
    """One job of a load mix and exactly what it must answer.

    ``expect``: {image_path: pool seed (captioned as that image is alone) or the start of its
    error}, in output order; ``skipped``: zip members skipped; ``fails``: the start of the job's
    error when the whole job must fail."""

    def __init__(self, name: str, job_input: dict, expect: dict[str, "int | str"],
                 skipped: int = 0, fails: "str | None" = None):
        self.name, self.input, self.expect = name, job_input, expect
        self.skipped, self.fails = skipped, fails

    @property
    def images(self) -> int:
        """Images this job must caption."""
        return 0 if self.fails else sum(isinstance(v, int) for v in self.expect.values())

    def problems(self, out: dict, captions: dict[int, str]) -> list[str]:
        """Where ``out`` (``Worker.run``'s shape) differs from what this job must answer;
        [] when exactly right. ``captions``: each pool image's caption alone."""
        if self.fails is not None:
            if str(out.get("error", "")).startswith(self.fails):
                return []
            return [f"{self.name}: expected the job to fail with {self.fails!r}..., got "
                    f"{str(out)[:300]}"]
        if "error" in out:
            return [f"{self.name}: the job failed: {str(out['error'])[:300]}"]
        problems = outcome_problems(out, {path: None if isinstance(v, int) else v
                                          for path, v in self.expect.items()})
        want = [(path, captions[v]) for path, v in self.expect.items() if isinstance(v, int)]
        got = [(c["image_path"], c["caption"]) for c in out.get("captions", [])]
        if not problems and got != want:
            problems.append("captions differ from each image's own caption: "
                            + "; ".join(f"#{i}: got {g!r}, expected {w!r}"
                                        for i, (g, w) in enumerate(zip(got, want)) if g != w))
        if out.get("skipped", 0) != self.skipped:
            problems.append(f"skipped {out.get('skipped', 0)}, expected {self.skipped}")
        return [f"{self.name}: {p}" for p in problems]


class LoadMix:
    """Jobs of mixed shapes against ``server`` (a LocalServer), drawn deterministically from
    ``seed``, each with its exact expected answer (``MixJob``):

    - ``url`` / ``inline``: one pool image by URL or as a data: URI;
    - ``list``: 2-6 pool images, by URL or inline, half the time with one bad source (a 404, or
      an inline truncated / text / empty file);
    - ``zip``: 5-50 pool images in folders, by URL or inline, with 0-3 bad members (truncated,
      text named .jpg, empty, symlink, nested zip) and 0-2 junk files (skipped), sometimes with
      a job ``batch_size``;
    - ``zip_list``: such a zip among two pool images (member paths prefixed by the zip's label);
    - ``fail``: every download fails (404s, plus a slow drip when ``drip`` is set, which lasts
      until the worker's DOWNLOAD_DEADLINE_S): the job fails with "no image could be captioned";
    - ``poison`` (only with ``poison``, the worker's BLIP_INJECT_CUDA_ERROR_PROMPT): the
      simulated CUDA failure; the job fails asking for a new worker. It uses num_beams=1, so it
      never shares a GPU batch with the others (images in a batch whose device failed fail
      with it, as they would on a real GPU).

    Pool images are ``pool_image(seed)`` for seeds below ``pool``; ``pool_captions`` captions
    each alone, and every caption of every job must equal its image's.
    """

    KINDS = (("url", 25), ("inline", 15), ("list", 20), ("zip", 22), ("zip_list", 10),
             ("fail", 6), ("poison", 2))

    def __init__(self, server: LocalServer, params: dict, seed: int = 0, prefix: str = "mix",
                 pool: int = POOL_SIZE, drip: bool = False, poison: "str | None" = None):
        self.server, self.params, self.prefix, self.pool = server, dict(params), prefix, pool
        self.rng = random.Random(seed)
        self.drip, self.poison = drip, poison
        self.made = 0
        self.pool_urls = {s: server.route(f"/{prefix}/pool/{s}.{'jpg' if s % 2 == 0 else 'png'}",
                                          body(pool_image(s))) for s in range(pool)}
        self.pool_uris = {s: data_uri(pool_image(s)) for s in range(pool)}

    def jobs(self, count: int, kinds: "Iterable[str] | None" = None) -> list[MixJob]:
        """``count`` jobs drawn from ``kinds`` (default: all) with the mix's weights."""
        allowed = set(kinds or (k for k, _ in self.KINDS)) - ({"poison"} if not self.poison
                                                                else set())
        names = [k for k, _ in self.KINDS if k in allowed]
        weights = [w for k, w in self.KINDS if k in allowed]
        return [getattr(self, f"_{self.rng.choices(names, weights)[0]}")() for _ in range(count)]

    # -- pieces --

    def _job(self, kind: str, job_input: dict, expect: dict, skipped: int = 0,
             fails: "str | None" = None) -> MixJob:
        self.made += 1
        return MixJob(f"{self.prefix}-{self.made}-{kind}", {**job_input, **self.params}, expect,
                      skipped, fails)

    def _unique(self, what: str, ext: str = "") -> str:
        return f"/{self.prefix}/{what}/{self.made}-{self.rng.randrange(10 ** 9)}{ext}"

    def _pool_source(self, seed: int, label: str) -> tuple[str, str]:
        """(source, image_path) of a pool image, by URL (60%) or inline labelled ``label``."""
        if self.rng.random() < 0.6:
            return self.pool_urls[seed], self.pool_urls[seed]
        return self.pool_uris[seed], label

    def _bad_source(self, label: str) -> tuple[str, str, str]:
        """(source, image_path, expected error) of a source that cannot be captioned."""
        kind = self.rng.choice(["404", *sorted(BAD_FILES)])
        if kind == "404":  # unknown paths answer 404
            url = self.server.url(self._unique("gone", ".jpg"))
            return url, url, "the server answered HTTP 404 Not Found"
        make, error = BAD_FILES[kind]
        return data_uri(make()), label, error

    def _zip_file(self) -> tuple[bytes, dict[str, "int | str"], int]:
        """A zip of 5-50 pool images (most jobs small), maybe with bad members and junk:
        (bytes, {member: seed or error} sorted by path, members skipped)."""
        members: dict[str, int | str] = {}
        entries: list[Entry] = []
        for j in range(5 + int(45 * self.rng.random() ** 2)):
            seed = self.rng.randrange(self.pool)
            name = f"d{j % 3}/img{j:02d}.{'jpg' if seed % 2 == 0 else 'png'}"
            entries.append((name, pool_image(seed)))
            members[name] = seed
        for j in range(self.rng.choice((0, 0, 1, 2, 3))):
            kind = self.rng.choice(sorted(BAD_MEMBERS))
            make, error = BAD_MEMBERS[kind]
            name = f"d{j % 3}/bad{j}-{kind}.jpg"
            entries.append(symlink_entry(name) if make is None else (name, make()))
            members[name] = error
        junk = self.rng.sample(JUNK_NAMES, self.rng.choice((0, 0, 1, 2)))
        entries += [(name, b"junk") for name in junk]
        self.rng.shuffle(entries)
        return make_zip(entries), dict(sorted(members.items())), len(junk)

    def _zip_source(self, data: bytes, label: str) -> tuple[str, str]:
        """(source, label) of a zip: served by URL or inline (then labelled ``label``)."""
        if self.rng.random() < 0.5:
            return data_uri(data, "application/zip"), label
        url = self.server.route(self._unique("zip", ".zip"), body(data, "application/zip"))
        return url, url

    # -- kinds --

    def _url(self) -> MixJob:
        seed = self.rng.randrange(self.pool)
        return self._job("url", {"data_url": self.pool_urls[seed]}, {self.pool_urls[seed]: seed})

    def _inline(self) -> MixJob:
        seed = self.rng.randrange(self.pool)
        return self._job("inline", {"data_url": self.pool_uris[seed]}, {"data_url": seed})

    def _list(self) -> MixJob:
        seeds: list[int | None] = list(self.rng.sample(range(self.pool), self.rng.randint(2, 6)))
        if self.rng.random() < 0.5:
            seeds.insert(self.rng.randrange(len(seeds) + 1), None)  # the bad one
        sources, expect = [], {}
        for i, seed in enumerate(seeds):
            if seed is None:
                source, label, outcome = self._bad_source(f"data_urls[{i}]")
            else:
                (source, label), outcome = self._pool_source(seed, f"data_urls[{i}]"), seed
            sources.append(source)
            expect[label] = outcome
        return self._job("list", {"data_urls": sources}, expect)

    def _zip(self) -> MixJob:
        data, members, skipped = self._zip_file()
        source, _ = self._zip_source(data, "data_url")
        extra = {"batch_size": self.rng.randint(1, 8)} if self.rng.random() < 0.3 else {}
        return self._job("zip", {"data_url": source, **extra}, members, skipped)

    def _zip_list(self) -> MixJob:
        data, members, skipped = self._zip_file()
        where = self.rng.randrange(3)
        seeds = self.rng.sample(range(self.pool), 2)
        sources, expect = [], {}
        for i in range(3):
            if i == where:
                source, label = self._zip_source(data, f"data_urls[{i}]")
                expect.update({f"{label}/{name}": v for name, v in members.items()})
            else:
                seed = seeds.pop()
                source, label = self._pool_source(seed, f"data_urls[{i}]")
                expect[label] = seed
            sources.append(source)
        return self._job("zip_list", {"data_urls": sources}, expect, skipped)

    def _fail(self) -> MixJob:
        urls = [self.server.url(self._unique("gone", ".jpg"))
                for _ in range(self.rng.randint(1, 3))]
        if self.drip:
            urls.append(self.server.route(self._unique("drip", ".jpg"),
                                          drip(b"\xff\xd8\xff" + bytes(400), interval=0.25)))
        return self._job("fail", {"data_urls": urls}, {}, fails="no image could be captioned (")

    def _poison(self) -> MixJob:
        seed = self.rng.randrange(self.pool)
        job = self._job("poison", {"data_url": self.pool_urls[seed]}, {}, fails=GPU_FAILED)
        job.input.update(prompt=self.poison, num_beams=1)
        return job


def pool_captions(run: Callable[[dict], dict], params: dict, pool: int = POOL_SIZE
                  ) -> dict[int, str]:
    """{seed: caption} of each pool image captioned alone by ``run`` (a job input -> output)."""
    return {s: run({"data_url": data_uri(pool_image(s)), **params})["captions"][0]["caption"]
            for s in range(pool)}


def run_load(run: Callable[[dict], dict], jobs: list[MixJob], clients: int
             ) -> list[tuple[MixJob, dict, float]]:
    """Send ``jobs`` from ``clients`` concurrent clients (client k sends jobs k, k+clients, ...
    one after another) through ``run`` (a job input -> output); (job, output, seconds) each."""
    from concurrent.futures import ThreadPoolExecutor

    def client(k: int) -> list[tuple[MixJob, dict, float]]:
        done = []
        for job in jobs[k::clients]:
            start = time.monotonic()
            out = run(job.input)
            done.append((job, out, time.monotonic() - start))
        return done

    with ThreadPoolExecutor(clients) as pool:
        return [row for rows in pool.map(client, range(clients)) for row in rows]


def load_beside_failures(run: Callable[[dict], dict], mix: LoadMix, jobs: list[MixJob],
                         clients: int, failing_clients: int):
    """Send ``jobs`` from ``clients`` clients alone, then again while ``failing_clients`` more
    clients send, back to back, ``mix`` jobs whose every download fails (a slow drip among
    them when the mix has ``drip``): (alone, beside, failed) results, as ``run_load``'s."""
    from concurrent.futures import ThreadPoolExecutor
    alone = run_load(run, jobs, clients)
    stop, failed = threading.Event(), []

    def keep_failing() -> None:
        while not stop.is_set():
            job = mix.jobs(1, kinds=("fail",))[0]
            failed.append((job, run(job.input), 0.0))

    with ThreadPoolExecutor(failing_clients) as pool:
        running = [pool.submit(keep_failing) for _ in range(failing_clients)]
        time.sleep(0.2)  # the failing jobs are under way
        try:
            beside = run_load(run, jobs, clients)
        finally:
            stop.set()
        for future in running:
            future.result()
    return alone, beside, failed


def slowed(alone: list, beside: list, by: float) -> list[tuple[str, float, float]]:
    """The jobs (name, seconds alone, seconds beside) that took more than ``by`` seconds longer
    in ``beside`` than in ``alone`` (the same jobs from the same clients, as
    ``load_beside_failures`` returns them)."""
    assert [job for job, _, _ in alone] == [job for job, _, _ in beside]
    return [(job.name, round(a, 2), round(b, 2))
            for (job, _, a), (_, _, b) in zip(alone, beside) if b > a + by]


def load_problems(results: list[tuple[MixJob, dict, float]], captions: dict[int, str]
                  ) -> list[str]:
    """Every way the answers of a load differ from what the jobs must answer ([] = none)."""
    return [p for job, out, _ in results for p in job.problems(out, captions)]
