"""A local RunPod serverless endpoint: both HTTP sides, as runpod 1.12's SDK speaks them.

``RunPodSim`` is a real HTTP server (``http.server.ThreadingHTTPServer`` on 127.0.0.1, in a
background thread) that plays RunPod for one endpoint:

- the endpoint API that clients call (``runpod.Endpoint``, ``runpod.AsyncioEndpoint``, or any
  HTTP client pointed at ``base_url``): ``POST /v2/{id}/run`` and ``/runsync``,
  ``GET /v2/{id}/status/{job}``, ``POST /v2/{id}/cancel/{job}``, ``GET /v2/{id}/health``, with
  ``Authorization: Bearer <api_key>``;
- the worker side that ``runpod.serverless.start`` calls in production mode (when
  ``RUNPOD_WEBHOOK_GET_JOB`` is set; ``worker_env`` gives the variables): job-take and
  job-take-batch (long polls), job-done (results and progress updates), job-stop (long poll
  for cancelled jobs) and the heartbeat ping, with the raw worker key as ``Authorization``.

Everything a worker and a client do is recorded per job (``SimJob``: status, worker, times,
every progress update, the result, ``stopPod``, anything posted after the job was final) and
counted per request kind (``counts``). ``throttle`` / ``throttle_rate`` answer 429s,
``expire`` forgets a result as retention would, ``pause_takes`` holds jobs in the queue.
``WorkerProcess`` runs ``python src/handler.py`` against a simulator::

    with RunPodSim() as sim, WorkerProcess(sim, "w1", REPO, MAX_CONCURRENT_JOBS="4") as w:
        w.start().wait_ready()
        endpoint = runpod.Endpoint(sim.endpoint_id, api_key=sim.api_key)  # with
        # runpod.endpoint_url_base = sim.base_url (the SDK reads RUNPOD_ENDPOINT_BASE_URL once,
        # at import; client_env() gives it for a client process)
        job = endpoint.run({"data_url": ...})
        sim.wait_for(lambda s: s.job(job.job_id).final, timeout=60)

Simulated as RunPod does it (see shared/notes/runpod-protocol.md; checked in the SDK):
a FIFO queue; a held take answers as soon as a job is queued (a single take a dict, a batch
take a list of up to ``batch_size``), else 204 after ``take_wait_s``; a taken job is
IN_PROGRESS and /status shows its latest progress update as ``output``; a cancel of a taken
job is handed to its worker by job-stop; a job whose worker dies stays IN_PROGRESS forever (the
client's own timeout must notice); finished results are kept ``retention_s`` then answer 404;
/run bodies over ``max_body_bytes`` answer 413 (/runsync: twice that, as RunPod's 10/20 MB).

Not simulated: scaling, cold starts and starting workers (start them yourself), execution
timeouts and TTL from ``policy`` (``policy`` and ``webhook`` are accepted and ignored; a test
can call ``time_out(job)``), /stream and generator handlers, /purge-queue, retries of failed
jobs, job-take's 400 (FlashBoot), RunPod's exact error texts, and the fitness checks the SDK
runs at start (``WorkerProcess`` turns them off: the network one dials 8.8.8.8:53 and
os._exit(1)s a worker that cannot reach it, the memory one wants 4 GB free). Times are
``time.monotonic()``.
"""
from __future__ import annotations

import collections
import copy
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qs, urlsplit

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
ENDPOINT_CALLS = ("run", "runsync", "status", "cancel", "health")


class Update(NamedTuple):
    """One progress update a worker posted: when the simulator received it, and its output."""
    at: float
    output: Any


class Post(NamedTuple):
    """Something a worker posted for a job that was already final: kind "done" or "progress"."""
    at: float
    kind: str
    body: Any


class Take(NamedTuple):
    """One job-take request answered: ``kind`` "take" or "take_batch", the jobs handed out."""
    at: float
    worker_id: str
    kind: str
    batch_size: int
    job_in_progress: str | None
    job_ids: tuple[str, ...]


class Ping(NamedTuple):
    at: float
    worker_id: str
    job_ids: tuple[str, ...]  # the worker's in-progress jobs, as its heartbeat lists them
    runpod_version: str | None


@dataclass
class SimJob:
    id: str
    input: Any
    status: str = "IN_QUEUE"
    worker_id: str | None = None
    submitted_at: float = 0.0
    taken_at: float | None = None
    finished_at: float | None = None  # completed, failed, cancelled or timed out
    progress: list[Update] = field(default_factory=list)
    output: Any = None
    error: Any = None
    stop_pod: bool = False
    posts_after_final: list[Post] = field(default_factory=list)
    body_bytes: int = 0
    # more than the spec asks
    cancelled_at: float | None = None  # the client's /cancel (or time_out) of a live job
    stop_sent_at: float | None = None  # when job-stop handed the cancel to the worker
    done_posts: int = 0  # job-done results received while it was live (0 or 1)
    expired: bool = False  # expire() called: /status answers 404
    sync: bool = False  # submitted with /runsync

    @property
    def final(self) -> bool:
        return self.status in FINAL


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: simple and enough
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.sim._serve(self, "GET")

    def do_POST(self) -> None:  # noqa: N802
        self.server.sim._serve(self, "POST")

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    sim: "RunPodSim"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that went away mid-answer (a killed worker) is part of the tests


class _Answer(Exception):
    """Raised inside a route to answer at once: status, JSON payload (None = no body)."""

    def __init__(self, code: int, payload: Any = None, headers: dict[str, str] | None = None):
        super().__init__(code)
        self.code, self.payload, self.headers = code, payload, headers or {}


class RunPodSim:
    """One simulated serverless endpoint (see the module docstring)."""

    def __init__(self, endpoint_id: str = "sim-endpoint", api_key: str = "sim-key",
                 worker_key: str = "sim-worker-key", retention_s: float = 1800.0,
                 max_body_bytes: int = 10_000_000, take_wait_s: float = 1.0,
                 runsync_wait_s: float = 90.0):
        self.endpoint_id, self.api_key, self.worker_key = endpoint_id, api_key, worker_key
        self.retention_s, self.max_body_bytes = retention_s, max_body_bytes
        self.take_wait_s, self.runsync_wait_s = take_wait_s, runsync_wait_s
        self.counts: collections.Counter[str] = collections.Counter()
        self._cv = threading.Condition()
        self._jobs: dict[str, SimJob] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._stops: dict[str, list[str]] = collections.defaultdict(list)  # worker -> job ids
        self._takes: list[Take] = []
        self._pings: list[Ping] = []
        self._holding: dict[str, list[float]] = collections.defaultdict(list)  # open takes
        self._seen: dict[str, float] = {}  # worker -> last request
        self._paused = False
        self._stopping = False
        self._throttle_left, self._throttle_calls = 0, frozenset[str]()
        self._throttle_after: float | None = None
        self._rate, self._rate_calls, self._rate_after = 0.0, frozenset[str](), None
        self._rng = random.Random(0)
        self._ids = itertools.count(1)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.sim = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True, name="runpod-sim")

    # --- life ---------------------------------------------------------------------------------
    def start(self) -> "RunPodSim":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True  # held polls answer now
            self._cv.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "RunPodSim":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- addresses ----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """RUNPOD_ENDPOINT_BASE_URL for clients (``runpod.endpoint_url_base``)."""
        return f"http://127.0.0.1:{self.port}/v2"

    def client_env(self) -> dict[str, str]:
        return {"RUNPOD_API_KEY": self.api_key, "RUNPOD_ENDPOINT_BASE_URL": self.base_url}

    def worker_env(self, worker_id: str) -> dict[str, str]:
        """What RunPod sets in a worker's container, in the forms runpod 1.12 reads them:
        the take URL's ``$ID`` becomes RUNPOD_POD_ID (rp_job.py JOB_GET_URL); the done URL's
        ``$RUNPOD_POD_ID`` and ``$ID`` the worker and job ids, and it must hold a ``?``
        (rp_http.py); the ping URL's ``$RUNPOD_POD_ID`` (rp_ping.py). Pings need
        RUNPOD_AI_API_KEY and RUNPOD_POD_ID; RUNPOD_PING_INTERVAL is in ms, floored to whole
        seconds (below 1000 the heartbeat never sleeps)."""
        root = f"{self.base_url}/{self.endpoint_id}"
        return {"RUNPOD_WEBHOOK_GET_JOB": f"{root}/job-take/$ID?gpu=sim",
                "RUNPOD_WEBHOOK_POST_OUTPUT": f"{root}/job-done/$RUNPOD_POD_ID/$ID?gpu=sim",
                "RUNPOD_WEBHOOK_PING": f"{root}/ping/$RUNPOD_POD_ID?gpu=sim",
                "RUNPOD_POD_ID": worker_id, "RUNPOD_AI_API_KEY": self.worker_key,
                "RUNPOD_ENDPOINT_ID": self.endpoint_id, "RUNPOD_PING_INTERVAL": "1000"}

    # --- test controls ------------------------------------------------------------------------
    def throttle(self, count: int, retry_after: float | None = 0.2,
                 calls: tuple[str, ...] = ("run", "status")) -> None:
        """The next ``count`` requests of these kinds (any of ``counts``' kinds, e.g. "take")
        answer 429, with ``Retry-After: <retry_after>`` unless None. runpod's sync client
        retries 429s through urllib3's Retry, which skips POSTs (its /run sees the 429) and
        refuses a non-integer Retry-After with InvalidHeader: use whole seconds with it."""
        with self._cv:
            self._throttle_left, self._throttle_calls = count, frozenset(calls)
            self._throttle_after = retry_after

    def throttle_rate(self, fraction: float, retry_after: float | None = 0.2,
                      calls: tuple[str, ...] = ("run", "status"), seed: int = 0) -> None:
        """A 429 storm: each request of these kinds answers 429 with probability ``fraction``
        (drawn from ``seed``) until ``throttle_rate(0)``."""
        with self._cv:
            self._rate, self._rate_calls, self._rate_after = fraction, frozenset(calls), retry_after
            self._rng = random.Random(seed)

    def pause_takes(self, paused: bool = True) -> None:
        """While paused, job-take hands out nothing (held takes then answer 204): queue jobs,
        then ``pause_takes(False)`` and one take-batch can carry them all."""
        with self._cv:
            self._paused = paused
            self._cv.notify_all()

    def expire(self, job_id: str) -> None:
        """Forget a finished job's result now, as after ``retention_s``: /status answers 404."""
        with self._cv:
            job = self._jobs[job_id]
            assert job.final, f"job {job_id} is {job.status}, not finished"
            job.expired = True

    def time_out(self, job_id: str) -> None:
        """End a live job as RunPod's execution timeout does: TIMED_OUT, and job-stop tells
        its worker (queued: it is never handed out)."""
        self._end(job_id, "TIMED_OUT")

    # --- what happened ------------------------------------------------------------------------
    def jobs(self) -> list[SimJob]:
        """Copies of every job, in submission order."""
        with self._cv:
            return [self._copy(j) for j in self._jobs.values()]

    def job(self, job_id: str) -> SimJob:
        """A copy of one job (KeyError if unknown)."""
        with self._cv:
            return self._copy(self._jobs[job_id])

    def takes(self, worker_id: str | None = None) -> list[Take]:
        """Every take answered (200 or 204), oldest first; only ``worker_id``'s if given."""
        with self._cv:
            return [t for t in self._takes if worker_id in (None, t.worker_id)]

    def pings(self, worker_id: str | None = None) -> list[Ping]:
        with self._cv:
            return [p for p in self._pings if worker_id in (None, p.worker_id)]

    def open_takes(self, worker_id: str) -> list[float]:
        """Start times of ``worker_id``'s take requests being held right now."""
        with self._cv:
            return list(self._holding[worker_id])

    def wait_for(self, predicate: Callable[["RunPodSim"], bool], timeout: float) -> None:
        """Poll ``predicate(self)`` until true; AssertionError with a summary on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                what = getattr(predicate, "__name__", predicate)
                raise AssertionError(f"not within {timeout:g} s: {what}\n{self.summary()}")
            time.sleep(0.05)

    def summary(self) -> str:
        """Jobs (status, worker, progress, late posts) and request counts, for messages."""
        lines = []
        for j in self.jobs():
            last = repr(j.progress[-1].output)[:60] if j.progress else "-"
            lines.append(f"  {j.id}: {j.status} worker={j.worker_id} progress={len(j.progress)}"
                         f" (last {last}) late_posts={len(j.posts_after_final)}"
                         f" error={str(j.error)[:100] if j.error else None}")
        return "jobs:\n" + ("\n".join(lines) or "  none") + f"\ncounts: {dict(self.counts)}"

    # --- HTTP -----------------------------------------------------------------------------------
    def _serve(self, h: _Handler, method: str) -> None:
        parts = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        path = [p for p in parts.path.split("/") if p]
        try:
            code, payload, headers = 200, self._route(h, method, path, query), {}
        except _Answer as answer:
            code, payload, headers = answer.code, answer.payload, answer.headers
        data = b"" if payload is None else json.dumps(payload).encode()
        try:
            h.send_response(code)
            for name, value in headers.items():
                h.send_header(name, value)
            if payload is not None:
                h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            pass  # the caller is gone

    def _route(self, h: _Handler, method: str, path: list[str], query: dict[str, str]) -> Any:
        if len(path) < 3 or path[0] != "v2":
            raise _Answer(404, {"error": f"no such path {h.path}"})
        if path[1] != self.endpoint_id:
            raise _Answer(404, {"error": f"endpoint {path[1]} not found"})
        call, rest = path[2], path[3:]
        kinds = {"run": "run", "runsync": "runsync", "status": "status", "cancel": "cancel",
                 "health": "health", "job-take": "take", "job-take-batch": "take_batch",
                 "job-stop": "stop", "job-done": "done", "ping": "ping"}
        if call not in kinds:
            raise _Answer(404, {"error": f"no such call {call}"})
        kind = kinds[call]
        body = b""
        if method == "POST":
            body = self._read_body(h, 2 * self.max_body_bytes if kind == "runsync"
                                   else self.max_body_bytes if kind == "run" else None)
        if kind == "done":  # done and progress share the URL; count them apart
            kind = "progress" if _json(body, {}).get("status") == "IN_PROGRESS" else "done"
        self._count(kind)
        if kind in ENDPOINT_CALLS:
            if h.headers.get("Authorization") != f"Bearer {self.api_key}":
                self._count("401")
                raise _Answer(401, {"error": "Unauthorized"})
        elif h.headers.get("Authorization") != self.worker_key:
            self._count("401")
            raise _Answer(401, {"error": "Unauthorized"})
        self._maybe_throttle(kind)
        if kind in ("run", "runsync"):
            if method != "POST":
                raise _Answer(405, {"error": "use POST"})
            return self._run(body, sync=kind == "runsync")
        if kind == "status":
            return self._status(_only(rest))
        if kind == "cancel":
            return self._cancel(_only(rest))
        if kind == "health":
            return self._health()
        worker = rest[0] if rest else ""
        with self._cv:
            self._seen[worker] = time.monotonic()
        if kind in ("take", "take_batch"):
            n = int(query.get("batch_size", "1")) if kind == "take_batch" else 1
            return self._take(worker, kind, n, query.get("job_in_progress"))
        if kind == "stop":
            return self._stop_poll(worker)
        if kind == "ping":
            return self._ping(worker, query)
        return self._done(worker, rest[1] if len(rest) > 1 else "", kind, body)

    def _read_body(self, h: _Handler, limit: int | None) -> bytes:
        size = int(h.headers.get("Content-Length") or 0)
        if limit is not None and size > limit:
            left = size  # read it all, so the client sees the 413 and not a reset
            while left > 0:
                chunk = h.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            self._count("413")
            raise _Answer(413, {"error": f"request body too large: {size} bytes, the limit is "
                                         f"{limit} bytes"})
        return h.rfile.read(size) if size else b""

    def _count(self, kind: str) -> None:
        with self._cv:
            self.counts[kind] += 1

    def _maybe_throttle(self, kind: str) -> None:
        with self._cv:
            if self._throttle_left > 0 and kind in self._throttle_calls:
                self._throttle_left -= 1
                after = self._throttle_after
            elif self._rate > 0 and kind in self._rate_calls and self._rng.random() < self._rate:
                after = self._rate_after
            else:
                return
            self.counts["429"] += 1
            self.counts[f"429:{kind}"] += 1
        headers = {} if after is None else {"Retry-After": f"{after:g}"}
        raise _Answer(429, {"error": "Too Many Requests"}, headers)

    # --- endpoint side --------------------------------------------------------------------------
    def _run(self, body: bytes, sync: bool) -> Any:
        request = _json(body, None)
        if not isinstance(request, dict) or "input" not in request:
            raise _Answer(400, {"error": "the body must be a JSON object with an \"input\""})
        job = SimJob(f"sim-{next(self._ids)}-{uuid.uuid4().hex[:8]}", request["input"],
                     submitted_at=time.monotonic(), body_bytes=len(body), sync=sync)
        with self._cv:
            self._jobs[job.id] = job
            self._queue.append(job.id)
            self._cv.notify_all()
            if not sync:
                return {"id": job.id, "status": "IN_QUEUE"}
            deadline = time.monotonic() + self.runsync_wait_s
            while not job.final and not self._stopping and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
            return self._view(job) if job.final else {"id": job.id, "status": job.status}

    def _status(self, job_id: str) -> Any:
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None or job.expired or (
                    job.final and time.monotonic() - (job.finished_at or 0) > self.retention_s):
                raise _Answer(404, {"error": f"job {job_id} not found"})
            return self._view(job)

    def _view(self, job: SimJob) -> dict:
        now = time.monotonic()
        started = job.taken_at or job.finished_at or now
        view = {"id": job.id, "status": job.status,
                "delayTime": int(1000 * (started - job.submitted_at)),
                "executionTime": int(1000 * ((job.finished_at or now) - started))
                if job.taken_at else 0}
        if job.status == "IN_PROGRESS" and job.progress:
            view["output"] = job.progress[-1].output
        elif job.status in ("COMPLETED", "FAILED") and job.output is not None:
            view["output"] = job.output
        if job.error is not None:
            view["error"] = job.error
        return view

    def _cancel(self, job_id: str) -> Any:
        if job_id not in self._jobs:
            raise _Answer(404, {"error": f"job {job_id} not found"})
        status = self._end(job_id, "CANCELLED")
        return {"id": job_id, "status": status}

    def _end(self, job_id: str, status: str) -> str:
        with self._cv:
            job = self._jobs[job_id]
            if job.final:
                return job.status
            now = time.monotonic()
            if job.status == "IN_QUEUE":
                self._queue.remove(job_id)
            else:
                self._stops[job.worker_id or ""].append(job_id)
            job.status, job.finished_at, job.cancelled_at = status, now, now
            self._cv.notify_all()
            return status

    def _health(self) -> Any:
        with self._cv:
            by = collections.Counter(j.status for j in self._jobs.values())
            now = time.monotonic()
            alive = [w for w, t in self._seen.items() if now - t < 10]
            running = {j.worker_id for j in self._jobs.values() if j.status == "IN_PROGRESS"}
            return {"jobs": {"completed": by["COMPLETED"], "failed": by["FAILED"],
                             "inProgress": by["IN_PROGRESS"], "inQueue": by["IN_QUEUE"],
                             "retried": 0},
                    "workers": {"idle": len([w for w in alive if w not in running]),
                                "running": len([w for w in alive if w in running])}}

    # --- worker side ----------------------------------------------------------------------------
    def _take(self, worker: str, kind: str, n: int, in_progress: str | None) -> Any:
        with self._cv:
            start = time.monotonic()
            deadline = start + self.take_wait_s
            self._holding[worker].append(start)
            try:
                while not (self._queue and not self._paused) and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            finally:
                self._holding[worker].remove(start)
            taken = []
            while self._queue and not self._paused and not self._stopping and len(taken) < n:
                job = self._jobs[self._queue.popleft()]
                job.status, job.worker_id, job.taken_at = "IN_PROGRESS", worker, time.monotonic()
                taken.append(job)
            self._takes.append(Take(time.monotonic(), worker, kind, n, in_progress,
                                    tuple(j.id for j in taken)))
            if not taken:
                raise _Answer(204)
            handed = [{"id": j.id, "input": copy.deepcopy(j.input)} for j in taken]
            return handed[0] if kind == "take" else handed

    def _stop_poll(self, worker: str) -> Any:
        with self._cv:
            deadline = time.monotonic() + self.take_wait_s
            while not self._stops[worker] and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            ids, self._stops[worker] = self._stops[worker], []
            now = time.monotonic()
            for job_id in ids:
                self._jobs[job_id].stop_sent_at = now
            if not ids:
                raise _Answer(204)
            return {"jobsToStop": ids}

    def _ping(self, worker: str, query: dict[str, str]) -> Any:
        ids = tuple(i for i in query.get("job_id", "").split(",") if i)
        with self._cv:
            self._pings.append(Ping(time.monotonic(), worker, ids, query.get("runpod_version")))
        return {}

    def _done(self, worker: str, job_id: str, kind: str, body: bytes) -> Any:
        # runpod posts json.dumps(result) labelled x-www-form-urlencoded: parse it as JSON
        result = _json(body, None)
        if not isinstance(result, dict):
            raise _Answer(400, {"error": f"job-done body is not a JSON object: {body[:200]!r}"})
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None or job.worker_id != worker:
                raise _Answer(404, {"error": f"job {job_id} is not taken by worker {worker}"})
            now = time.monotonic()
            if job.final:
                job.posts_after_final.append(Post(now, kind, result))
            elif kind == "progress":
                job.progress.append(Update(now, result.get("output")))
            else:
                job.done_posts += 1
                job.status = "FAILED" if "error" in result else "COMPLETED"
                job.output, job.error = result.get("output"), result.get("error")
                job.stop_pod = bool(result.get("stopPod"))
                job.finished_at = now
            self._cv.notify_all()
        return {}

    @staticmethod
    def _copy(job: SimJob) -> SimJob:
        c = copy.copy(job)
        c.progress, c.posts_after_final = list(job.progress), list(job.posts_after_final)
        return c


def _json(body: bytes, default: Any) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return default


def _only(rest: list[str]) -> str:
    if len(rest) != 1:
        raise _Answer(404, {"error": "expected /<call>/<job id>"})
    return rest[0]


# --- a worker process ----------------------------------------------------------------------------

class WorkerProcess:
    """``python src/handler.py`` in production mode, taking jobs from ``sim`` as ``worker_id``.

    Environment: ``support.worker.worker_env`` (tiny model, private download URLs allowed, no
    proxies), then ``DEFAULTS``, then ``sim.worker_env(worker_id)``, then ``env``. Its stdout
    and stderr go to a file (``log()``). It runs in its own process group: ``kill`` (SIGKILL)
    and leaving the ``with`` block end the whole group, including runpod's heartbeat process,
    which a killed worker would otherwise leave behind; ``terminate`` sends SIGTERM to the main
    process only, as ``docker stop`` does to PID 1."""

    DEFAULTS = {"BLIP_MODEL": "tiny-random", "BLIP_DEVICE": "cpu",
                "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true", "BLIP_LOG_LEVEL": "INFO",
                # runpod's start-up fitness checks (rp_fitness.py): the network one dials
                # 8.8.8.8:53 and os._exit(1)s a worker that cannot reach it (no network, CI);
                # memory (4 GB free), disk and GPU checks are not what these tests are about
                "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true"}

    def __init__(self, sim: RunPodSim, worker_id: str, repo_root: Path | None = None,
                 log_path: Path | None = None, **env: str):
        from support.worker import REPO, worker_env
        self.sim, self.worker_id = sim, worker_id
        self.repo_root = Path(repo_root or REPO)
        self.env = worker_env(**{**self.DEFAULTS, **sim.worker_env(worker_id), **env})
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix=f"worker-{worker_id}-")) / "worker.log"
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(self.repo_root / "src" / "handler.py")],
                cwd=self.repo_root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 180) -> "WorkerProcess":
        """Wait until it has polled job-take at least once (the model is loaded by then)."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while not self.sim.takes(self.worker_id) and not self.sim.open_takes(self.worker_id):
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.worker_id} exited with {self.proc.returncode}"
                                   f" before taking a job:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.worker_id} took no job within {timeout:g} s:"
                                   f"\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``: SIGKILL to the whole process group, any other signal to the worker."""
        if self.proc is None:
            return
        try:
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, sig)
            elif self.proc.poll() is None:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        self.kill(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """Its exit code (subprocess.TimeoutExpired if still running after ``timeout``)."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        if self.proc is not None:
            self.kill(signal.SIGKILL)  # the group: the worker and its heartbeat process
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
