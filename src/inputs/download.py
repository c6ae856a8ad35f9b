"""Downloading one URL to a file: the downloader, its watchdog and the socket guard.

- Downloads go through runpod's ``rp_ssrf.safe_get`` (non-public addresses refused, every
  redirect hop re-checked; ``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true`` opens private addresses).
  They run concurrently (DOWNLOAD_CONCURRENCY per job, at most AHEAD_PER_DOWNLOAD sources per
  download thread ahead of the images the job has taken), with connect/read timeouts and a total
  deadline per file, retries included (DOWNLOAD_DEADLINE_S). A slow drip never trips a read
  timeout, so a watchdog shuts the sockets down, which ends a blocked read: at the deadline, or
  earlier when the transfer averages under DOWNLOAD_LOW_SPEED_LIMIT bytes/s over
  DOWNLOAD_LOW_SPEED_TIME_S (curl's --speed-limit; that cut is retried like a stall). It covers
  the whole attempt, connection, headers (a server can drip those too), every redirect hop and
  the body. Cancelling a job cuts its downloads the same way.
  Connection errors, timeouts, 5xx, 408 and 429 answers are retried with exponential backoff
  (or after the server's Retry-After); other 4xx never.
  Identity encoding is requested; a server that compresses anyway is decoded by urllib3, whose
  decoder bounds its output per read, and the cap counts decoded bytes (gzip bombs stop there).
"""
from __future__ import annotations

import re
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager, suppress
from functools import partial
from http.client import HTTPException
from typing import Callable, Iterator

import requests
import urllib3
import urllib3.util.connection
from runpod.serverless.utils import rp_ssrf

from config import ENV, Config
from errors import ImageError
from text import human_size, short

from .sniff import _reason, _Sink

CHUNK = 64 * 1024  # largest single read from the network

_NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, HTTPException,
                   OSError)


class _Retry(Exception):
    """A transient failure (connection error, timeout, 5xx, 408, 429): try again after a
    backoff, or after the server's Retry-After when it gave one (seconds)."""

    def __init__(self, reason: str, after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.after = after


class _Cancelled(Exception):
    """The job ended while this download was running."""


# --- downloading -----------------------------------------------------------------------------

_REFUSALS: tuple[tuple[str, Callable[[re.Match, Config], str]], ...] = (
    (r"host (.+) resolves to non-public address (\S+)",
     lambda m, cfg: f"refused: {short(m[1], 80)} resolves to a non-public address ({m[2]}); "
                    "only public http(s) URLs can be downloaded"),
    (r"download exceeds size cap: (\d+) >",
     lambda m, cfg: f"the file is {human_size(int(m[1]))} (its Content-Length); the limits are "
                    f"{human_size(cfg.max_image_bytes)} for an image ({ENV['max_image_bytes']}) "
                    f"and {human_size(cfg.max_zip_bytes)} for a zip ({ENV['max_zip_bytes']})"),
    (r"exceeded maximum redirects \((\d+)\)",
     lambda m, cfg: f"too many redirects (more than {m[1]}); use the final URL"),
    (r"blocked URL scheme", lambda m, cfg: "refused: a redirect led to a non-http(s) URL"),
    (r"could not resolve host|no addresses resolved",
     lambda m, cfg: "could not resolve the host name; check the URL"),
)


def _refusal(text: str, cfg: Config) -> str:
    """rp_ssrf's SSRFError message, rewritten for the person who sent the job."""
    for pattern, explain in _REFUSALS:
        match = re.search(pattern, text)
        if match:
            return explain(match, cfg)
    return "refused: " + short(text, 160)


def _network_reason(exc: BaseException, cfg: Config) -> str:
    if isinstance(exc, (requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)):
        return (f"could not connect within {cfg.connect_timeout_s:g} s "
                f"({ENV['connect_timeout_s']})")
    if isinstance(exc, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError,
                        TimeoutError)):
        return f"no data for {cfg.read_timeout_s:g} s ({ENV['read_timeout_s']})"
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    if errno_text:
        return f"connection failed ({errno_text[1].strip()})"
    if isinstance(exc, requests.ConnectionError) and "Connection aborted" in str(exc):
        return "the server closed the connection without answering"
    return "the connection broke during the download"


def _check_status(resp: requests.Response) -> None:
    code = resp.status_code
    if 200 <= code < 300:
        return
    answer = f"the server answered HTTP {code} {short(resp.reason or '', 40)}".rstrip()
    if code >= 500 or code in (408, 429):  # server trouble, a timeout, "too many requests"
        raise _Retry(answer, _retry_after(resp))
    raise ImageError(f"{answer}; check that the URL is correct and publicly readable "
                     "(no login, not expired)")


def _retry_after(resp: requests.Response) -> float | None:
    """The server's Retry-After in seconds (the delta-seconds form), if any."""
    with suppress(TypeError, ValueError):
        return max(0.0, float(resp.headers.get("Retry-After")))
    return None


def _content_length(resp: requests.Response) -> int | None:
    with suppress(TypeError, ValueError):
        return int(resp.headers.get("Content-Length"))
    return None


def _abort(resp: requests.Response) -> None:
    """End a read blocked in another thread: shut the socket down (it then returns at once)."""
    try:
        resp.raw.shutdown()
    except Exception:  # already released, or an urllib3 without shutdown(): close instead
        with suppress(Exception):
            resp.close()


def _shutdown(sock: socket.socket) -> None:
    """End a read blocked on ``sock`` in another thread (a closed socket raises: ignored)."""
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """Cuts one download attempt at the deadline, whatever the server's pace: while it connects,
    waits for headers (a server may drip them too), follows redirects and streams the body.
    It also cuts a transfer that stays too slow, as curl's ``--speed-limit``/``--speed-time``
    do: when the body bytes counted with ``received`` average under ``low_speed`` (bytes/s,
    over ``window`` seconds), the attempt is cut, and the downloader retries it like a stall.
    Header bytes are not counted, so headers still arriving after ``window`` seconds count as
    slow: a read timeout never fires on a server that drips one byte a second.
    What it cuts is registered with ``watch``: each socket the attempt's thread opens (see
    ``_opened``) and the response. One thread per attempt watches the clock."""

    def __init__(self, seconds: float, low_speed: float = 0.0, window: float = 30.0):
        self.fired: str | None = None  # "deadline" or "slow" once it has cut the attempt
        self.received = 0  # body bytes so far (written by the attempt's thread only)
        self._seconds, self._low_speed, self._window = seconds, low_speed, window
        self._lock = threading.Lock()
        self._cut = False  # everything watched is cut, and so is what is watched from now on
        self._cuts: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch_clock, daemon=True,
                                        name="download-watchdog")

    def watch(self, cut: Callable[[], None]) -> None:
        """Call ``cut`` at the deadline or on ``cut_all`` (at once if that already happened:
        a socket opened after a cancel is cut as it opens)."""
        with self._lock:
            if not self._cut:
                self._cuts.append(cut)
                return
        with suppress(Exception):
            cut()

    def _watch_clock(self) -> None:
        start = time.monotonic()
        end = start + self._seconds
        window = self._window
        # (time, bytes) samples; the first is the newest one at least ``window`` old
        samples: deque[tuple[float, int]] = deque([(start, 0)])
        tick = min(1.0, window / 4) if self._low_speed else None
        while True:
            left = end - time.monotonic()
            if self._stop.wait(max(0.0, left if tick is None else min(left, tick))):
                return
            now = time.monotonic()
            if now >= end:
                self._fire("deadline")
                return
            if tick is None:
                continue
            samples.append((now, self.received))
            while len(samples) > 1 and samples[1][0] <= now - window:
                samples.popleft()
            since, before = samples[0]
            if now - since >= window and self.received - before < self._low_speed * (now - since):
                self._fire("slow")
                return

    def _fire(self, why: str) -> None:
        self.fired = why
        self.cut_all()

    def cut_all(self) -> None:
        with self._lock:
            self._cut = True
            cuts, self._cuts = self._cuts, []
        for cut in cuts:
            with suppress(Exception):
                cut()

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._stop.set()


# The watchdog of the attempt a download thread is making. urllib3 opens the sockets inside
# runpod's safe_get, out of reach, so its connection factory is wrapped (once, process-wide,
# when the first downloader is made;
# threads without a watchdog are not affected) to register each socket with that watchdog.
_opened = threading.local()


def _register_sockets() -> None:
    real = urllib3.util.connection.create_connection
    if getattr(real, "registers_with_watchdog", False):
        return

    def create_connection(*args, **kwargs):
        sock = real(*args, **kwargs)
        watchdog = getattr(_opened, "watchdog", None)
        if watchdog is not None:
            watchdog.watch(partial(_shutdown, sock))
        return sock

    create_connection.registers_with_watchdog = True  # type: ignore[attr-defined]
    urllib3.util.connection.create_connection = create_connection


class _Downloader:
    """Streams http(s) URLs to files: SSRF guard, timeouts, deadline, retries, size cap."""

    def __init__(self, cfg: Config):
        _register_sockets()  # idempotent; done here, not at import: importing has no effects
        self.cfg = cfg
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._active: set[_Watchdog] = set()

    def cancel(self) -> None:
        """Stop every download: pending backoffs end, blocked reads return."""
        self.cancelled.set()
        with self._lock:
            active = list(self._active)
        for watchdog in active:
            watchdog.cut_all()

    def fetch(self, url: str, path: str) -> str:
        """Download ``url`` into ``path`` and return its type; raise ImageError."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.download_deadline_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(url, path, deadline)
            except _Retry as exc:
                reason, asked = exc.reason, exc.after
            delay = cfg.retry_backoff_s * 2 ** (attempt - 1)
            if asked is not None:  # the server said when: wait that long (within the deadline)
                delay = max(delay, asked)
            if attempt > cfg.download_retries:
                break
            if time.monotonic() + delay >= deadline:
                raise ImageError(f"download failed: {reason}; no time left to retry "
                                 f"({self._deadline_text()})")
            if self.cancelled.wait(delay):
                raise _Cancelled()
        tries = f" after {attempt} attempts" if attempt > 1 else ""
        raise ImageError(f"download failed{tries}: {reason}")

    def _slow_text(self) -> str:
        cfg = self.cfg
        return (f"the transfer was slower than {human_size(cfg.low_speed_limit)}/s for "
                f"{cfg.low_speed_time_s:g} s ({ENV['low_speed_limit']}, "
                f"{ENV['low_speed_time_s']})")

    def _deadline_text(self) -> str:
        return (f"the download did not finish within {self.cfg.download_deadline_s:g} s "
                f"({ENV['download_deadline_s']})")

    def _attempt(self, url: str, path: str, deadline: float) -> str:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ImageError(self._deadline_text())
        with self._watching(left) as watchdog:
            resp = self._open(url, left, watchdog)
            try:
                watchdog.watch(partial(_abort, resp))
                _check_status(resp)
                with open(path, "wb") as file:
                    sink = _Sink(file, self.cfg, _content_length(resp))
                    self._stream(resp, sink, watchdog)
                    return sink.finish()
            finally:
                resp.close()

    def _open(self, url: str, left: float, watchdog: _Watchdog) -> requests.Response:
        cfg = self.cfg
        timeout = (min(cfg.connect_timeout_s, left), min(cfg.read_timeout_s, left))
        try:
            return rp_ssrf.safe_get(url, stream=True, timeout=timeout,
                                    max_bytes=max(cfg.max_image_bytes, cfg.max_zip_bytes),
                                    headers={"Accept-Encoding": "identity"})
        except rp_ssrf.SSRFError as exc:
            raise ImageError(_refusal(str(exc), cfg)) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise self._read_failure(exc, watchdog) from None
        except (requests.RequestException, ValueError) as exc:
            if watchdog.fired or self.cancelled.is_set():  # a cut socket can fail oddly
                raise self._read_failure(exc, watchdog) from None
            raise ImageError(f"not a valid URL ({_reason(exc)})") from None

    @contextmanager
    def _watching(self, seconds: float) -> Iterator[_Watchdog]:
        """Arm the deadline watchdog for one attempt, register it for cancellation, and have
        the sockets this thread opens meanwhile registered with it."""
        cfg = self.cfg
        watchdog = _Watchdog(seconds, cfg.low_speed_limit, cfg.low_speed_time_s)
        with self._lock:
            self._active.add(watchdog)
        _opened.watchdog = watchdog
        try:
            if self.cancelled.is_set():
                raise _Cancelled()
            watchdog.start()
            yield watchdog
        finally:
            _opened.watchdog = None
            watchdog.cancel()
            with self._lock:
                self._active.discard(watchdog)

    def _stream(self, resp: requests.Response, sink: _Sink, watchdog: _Watchdog) -> None:
        while True:
            try:
                chunk = resp.raw.read1(min(CHUNK, sink.room()), decode_content=True)
            except Exception as exc:  # whatever a read raises, also once its socket is shut
                raise self._read_failure(exc, watchdog) from None
            if watchdog.fired or self.cancelled.is_set():  # a shut socket reads as an end
                raise self._read_failure(None, watchdog)
            if not chunk:
                return
            watchdog.received += len(chunk)
            sink.write(chunk)

    def _read_failure(self, exc: Exception | None, watchdog: _Watchdog) -> Exception:
        if watchdog.fired == "deadline":
            return ImageError(self._deadline_text())
        if self.cancelled.is_set():
            return _Cancelled()
        if watchdog.fired == "slow":
            return _Retry(self._slow_text())
        if exc is None:  # pragma: no cover - only called without one after a cut
            return RuntimeError("download cut for no reason")
        if isinstance(exc, _NETWORK_ERRORS):
            return _Retry(_network_reason(exc, self.cfg))
        return exc
