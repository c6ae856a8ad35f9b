"""One job, end to end: validate -> fetch -> decode -> caption -> output -> delivery.
No runpod import (``handler`` is the glue).

``Worker`` is created once per process (after the model is loaded) and runs many jobs at once,
each in its own thread (the async runpod handler hands it to a thread pool):

    downloads (per-job thread pool, inputs.JobInputs)
      -> decode + preprocess (shared thread pool, DECODE_WORKERS)
      -> GPU batches across all running jobs (batcher.Batcher, one GPU thread)

Everything overlaps: the GPU captions the first images while later ones still download. A
process-wide semaphore bounds how many decoded images wait for the GPU, so memory stays flat
however large or numerous the jobs are.

``Worker.run(job_input, job_id)`` never raises: it returns the output dict, or
``{"error": message}`` (plus ``"refresh_worker": True`` when the GPU is unusable).
``Worker.cancel(job_id)`` (RunPod cancelled or timed the job out) stops its downloads and drops
its images still waiting for the GPU; the job then answers that it was cancelled.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import deliver
import output
import schema
from batcher import Batcher, Producer
from config import Config
from engines import BaseEngine, is_fatal_device_error
from errors import FatalDeviceError, ImageError, JobError
from inputs import ImageFailure, ImageSource, JobInputs, decode_image
from params import CaptionResult
from text import short

log = logging.getLogger("blip.jobs")

Progress = Callable[[int, int | None], None]  # (captioned so far, total if known)


@dataclass
class _Entry:
    order: tuple[int, int]
    image_path: str
    member: str  # raw zip member name ("" for a whole source): names the caption file
    future: Future  # resolves to CaptionResult


@dataclass
class _JobState:
    job_id: str
    progress: Progress | None
    report_every: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    gpu: list[Future] = field(default_factory=list)  # its images queued for the GPU
    inputs: JobInputs | None = None
    producer: Producer | None = None  # open while this job may still queue images
    done: int = 0
    total: int | None = None
    first_gpu_at: float | None = None
    last_result_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_batch(self, n: int) -> None:
        """Report progress after a batch, unless the job was cancelled: a batch already on the
        GPU at a cancel still finishes, but the job has ended for RunPod, and an update posted
        then would describe a job that no longer runs (with a count from before the cancel)."""
        with self.lock:  # ``cancel`` sets the flag under this lock: no update after it returns
            self.done += n
            if self.cancelled.is_set() or self.progress is None:
                return
            if self.total is None or self.total > self.report_every:
                self.progress(self.done, self.total)  # posts from its own thread: quick

    def cancel(self) -> None:
        with self.lock:
            self.cancelled.set()


class Worker:
    def __init__(self, cfg: Config, engine: BaseEngine):
        self.cfg = cfg
        self.engine = engine
        self.batcher = Batcher(engine, cfg.batch_wait_ms).start()
        workers = cfg.decode_threads
        self.decode_pool = start_threads(ThreadPoolExecutor(workers, thread_name_prefix="decode"),
                                         workers)
        # Decoded images waiting for (or riding in) a GPU batch, across all jobs.
        self.in_flight = threading.BoundedSemaphore(max(64, 2 * engine.max_batch_size))
        self._active = 0
        self._active_lock = threading.Lock()
        self._jobs: dict[str, list[_JobState]] = {}  # running jobs by id (for cancel)

    def close(self) -> None:
        self.batcher.stop()
        self.decode_pool.shutdown(wait=True, cancel_futures=True)

    # --- public ---------------------------------------------------------------------------
    def run(self, job_input: Any, job_id: str = "local", progress: Progress | None = None
            ) -> dict:
        """Run one job; never raises (see module docstring)."""
        started = time.monotonic()
        try:
            request = schema.parse_request(job_input, self.cfg)
            batch = request.batch_size or self.engine.batch_limit(request.generation)
            state = _JobState(job_id, progress, report_every=batch)
            with self._activity(state):
                return self._run(request, state, started)
        except JobError as exc:
            log.info("job %s failed: %s", job_id, exc.message)
            return {"error": exc.message}
        except FatalDeviceError as exc:
            log.error("job %s: GPU failure, asking RunPod to replace this worker: %s", job_id, exc)
            return {"error": f"the GPU failed while captioning ({short(str(exc), 200)}); this "
                             "worker will be replaced, please retry the job",
                    "refresh_worker": True}
        except Exception as exc:  # noqa: BLE001 - the handler must never raise
            log.exception("job %s: internal error", job_id)
            return {"error": f"internal error: {type(exc).__name__}: {short(str(exc), 200)}. "
                             "This is a bug in the worker; please report it with the job id."}

    def cancel(self, job_id: str) -> None:
        """Stop job ``job_id`` (from any thread): its downloads are cut, its images not yet
        on the GPU are dropped, and ``run`` answers that it was cancelled."""
        with self._active_lock:
            states = list(self._jobs.get(job_id, ()))
        for state in states:
            log.info("job %s: cancelled", job_id)
            state.cancel()
            if state.inputs is not None:
                state.inputs.cancel()
            for f in list(state.gpu):
                f.cancel()

    # --- internals ------------------------------------------------------------------------
    @contextmanager
    def _activity(self, state: _JobState) -> Iterator[None]:
        with self._active_lock:
            self._active += 1
            self._jobs.setdefault(state.job_id, []).append(state)
        try:
            yield
        finally:
            with self._active_lock:
                self._active -= 1
                last = self._active == 0
                self._jobs[state.job_id].remove(state)
                if not self._jobs[state.job_id]:
                    del self._jobs[state.job_id]
            if last:  # release cached GPU memory only when no other job is running
                try:
                    self.engine.release_memory()
                except Exception as exc:  # noqa: BLE001 - never replace the job's answer
                    log.error("releasing GPU memory failed: %s: %s", type(exc).__name__, exc)

    def _run(self, request: schema.CaptionRequest, state: _JobState, started: float) -> dict:
        job_id = state.job_id
        entries: list[_Entry] = []
        failures: list[tuple[tuple[int, int], str, str]] = []
        with JobInputs(request.sources, request.single, self.cfg) as inputs:
            state.inputs = inputs
            completed = False
            # tells the GPU loop that this job may still send images (released once the
            # inputs are exhausted and every image was decoded and queued)
            state.producer = self.batcher.producer()
            try:
                try:
                    for item in inputs:
                        if state.cancelled.is_set():
                            break
                        if isinstance(item, ImageFailure):
                            failures.append((item.order, item.image_path, item.error))
                            continue
                        entries.append(self._start(item, request, state))
                finally:
                    state.producer.release()
                if not state.cancelled.is_set():  # every input seen: the total is known
                    with state.lock:
                        state.total = len(entries)
                results = [(e, e.future.result()) for e in entries]
                completed = not state.cancelled.is_set()
            finally:
                if not completed:  # an early exit: drop this job's images still queued
                    state.cancelled.set()
                    for f in list(state.gpu):
                        f.cancel()
                for e in entries:  # wait so no thread reads the temp dir after it is gone
                    _wait_quietly(e.future)
            if not completed:
                raise JobError("the job was cancelled")
            skipped = inputs.skipped
            fetched_at = inputs.fetched_at or time.monotonic()
        caption_s = ((state.last_result_at or state.first_gpu_at or 0.0)
                     - (state.first_gpu_at or 0.0))
        timings = {"fetch_s": round(max(fetched_at - started, 0.0), 3),
                   "caption_s": round(max(caption_s, 0.0), 3),
                   "total_s": round(time.monotonic() - started, 3)}
        captions = output.collect(request, results, failures)
        out = output.build(captions, skipped=skipped, model=self.engine.model_id,
                           engine=self.engine.name, timings=timings)
        if request.output_format == "zip":  # the delivery: uploaded when a bucket is set
            out.update(deliver.zip_fields(request, captions.rows, captions.members, job_id,
                                          self.cfg))
        log.info("job %s: %d captions, %d errors, %d skipped in %.2fs", job_id,
                 len(out["captions"]), len(out.get("errors", [])), skipped, timings["total_s"])
        return out

    def _start(self, item: ImageSource, request: schema.CaptionRequest,
               state: _JobState) -> _Entry:
        """Take an in-flight slot, then decode on the pool and queue for the GPU."""
        self.in_flight.acquire()
        done: Future = Future()
        entry = _Entry(item.order, item.image_path, item.member, done)
        state.producer.hold()
        try:
            self.decode_pool.submit(self._decode_and_queue, item, request, state, done)
        except BaseException:
            state.producer.release()
            self.in_flight.release()
            raise
        return entry

    def _decode_and_queue(self, item: ImageSource, request: schema.CaptionRequest,
                          state: _JobState, done: Future) -> None:
        try:
            self._decode_and_submit(item, request, state, done)
        finally:
            state.producer.release()  # after the submit: the GPU loop sees the image first

    def _decode_and_submit(self, item: ImageSource, request: schema.CaptionRequest,
                           state: _JobState, done: Future) -> None:
        try:
            if state.cancelled.is_set():
                raise ImageError("job ended before this image was decoded")
            try:
                image = decode_image(item, self.cfg, self.engine.image_size)
            finally:
                if item.discard is not None:  # its file is no longer needed: free the disk
                    item.discard()
            pixels = self.engine.preprocess(image)
            del image
            if state.first_gpu_at is None:
                state.first_gpu_at = time.monotonic()
            gpu = self.batcher.submit(pixels, request.prompt, request.generation,
                                      request.batch_size, state.on_batch)
            state.gpu.append(gpu)
        except ImageError as exc:
            self._finish(done, state, result=CaptionResult(error=exc.message))
            return
        except Exception as exc:  # noqa: BLE001 - resolve the future whatever happens
            log.exception("job %s: could not prepare %s", state.job_id, short(item.image_path))
            self._finish(done, state, result=CaptionResult(
                error=f"could not prepare the image: {type(exc).__name__}: {short(str(exc))}"))
            return
        gpu.add_done_callback(lambda f: self._finish_from(f, done, state))

    def _finish_from(self, gpu: Future, done: Future, state: _JobState) -> None:
        exc = None if gpu.cancelled() else gpu.exception()
        if gpu.cancelled():
            self._finish(done, state, result=CaptionResult(error="cancelled before captioning"))
        elif exc is not None and is_fatal_device_error(exc):  # the worker must be replaced
            fatal = exc if isinstance(exc, FatalDeviceError) else FatalDeviceError(str(exc))
            self._finish(done, state, error=fatal)
        elif exc is not None:  # one failed batch costs only its own images
            log.error("job %s: captioning failed: %s: %s", state.job_id, type(exc).__name__, exc)
            self._finish(done, state, result=CaptionResult(
                error=f"captioning failed: {type(exc).__name__}: {short(str(exc), 200)}"))
        else:
            self._finish(done, state, result=gpu.result())

    def _finish(self, done: Future, state: _JobState, result: CaptionResult | None = None,
                error: BaseException | None = None) -> None:
        self.in_flight.release()
        state.last_result_at = time.monotonic()
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)


AUTO_JOBS_MIN, AUTO_JOBS_MAX = 16, 64


def concurrent_jobs(setting: int, max_batch_size: int) -> int:
    """The jobs a worker runs at once: ``MAX_CONCURRENT_JOBS``, or for 0 (auto) as many
    one-image jobs as one batch of ``max_batch_size`` holds, clamped to 16..64.

    Jobs run at once are what share a batch: with 16, a burst of 64 one-image jobs on an H100
    rides batches of 16 instead of one of 64, which the engine benchmark finds much slower
    (OPTIMIZATION.md has the figures). More than one batch holds would only queue on this
    worker, where RunPod cannot hand them to another; at most 64 bounds what concurrent zip
    jobs hold on disk (one zip each, or a window of downloads), for a small loss against
    batches of 256. At least 16 keeps a small GPU's (or a CPU's) next jobs downloading while it
    captions."""
    if setting:
        return setting
    return max(AUTO_JOBS_MIN, min(AUTO_JOBS_MAX, max_batch_size))


def start_threads(pool: ThreadPoolExecutor, n: int) -> ThreadPoolExecutor:
    """Start ``n`` of the pool's threads now, at setup, not on the first burst of jobs.

    A pool starts a thread on ``submit`` when none is idle, and ``Thread.start`` waits until the
    new thread runs. In a busy worker the new thread first has to get the GIL from the threads
    captioning and decoding, so the first burst of jobs paid that wait once per thread, on the
    event loop that accepts jobs: through the local API the first round of jobs was much slower
    than the later ones, and with the threads started at setup it no longer is
    (OPTIMIZATION.md has the figures).
    """
    gate = threading.Barrier(n + 1)
    for _ in range(n):  # each task holds its thread until all have started
        pool.submit(gate.wait)
    gate.wait()
    return pool


def _wait_quietly(future: Future) -> None:
    try:
        future.result()
    except BaseException:  # noqa: BLE001 - already reported through the job's result
        pass
