"""One job, end to end: validate -> fetch -> decode -> caption -> output. No runpod import.

``Worker`` is created once per process (after the model is loaded) and runs many jobs at once,
each in its own thread (the async runpod handler hands it over with ``asyncio.to_thread``):

    downloads (per-job thread pool, inputs.JobInputs)
      -> decode + preprocess (shared thread pool, DECODE_WORKERS)
      -> GPU batches across all running jobs (batcher.Batcher, one GPU thread)

Everything overlaps: the GPU captions the first images while later ones still download. A
process-wide semaphore bounds how many decoded images wait for the GPU, so memory stays flat
however large or numerous the jobs are.

``Worker.run(job_input, job_id)`` never raises: it returns the output dict, or
``{"error": message}`` (plus ``"refresh_worker": True`` when the GPU is unusable).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import output
import schema
from batcher import Batcher
from config import Config
from engine import BaseEngine, CaptionResult, FatalDeviceError
from errors import ImageError, JobError, short
from inputs import ImageFailure, ImageSource, JobInputs, decode_image

log = logging.getLogger("blip.jobs")

Progress = Callable[[int, int | None], None]  # (captioned so far, total if known)


@dataclass
class _Entry:
    order: tuple[int, int]
    image_path: str
    future: Future  # resolves to CaptionResult


@dataclass
class _JobState:
    job_id: str
    progress: Progress | None
    report_every: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: int = 0
    total: int | None = None
    first_gpu_at: float | None = None
    last_result_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_batch(self, n: int) -> None:
        with self.lock:
            self.done += n
            done, total = self.done, self.total
        if self.progress is not None and (total is None or total > self.report_every):
            self.progress(done, total)


class Worker:
    def __init__(self, cfg: Config, engine: BaseEngine):
        self.cfg = cfg
        self.engine = engine
        self.batcher = Batcher(engine, cfg.batch_wait_ms).start()
        workers = cfg.decode_workers or min(16, os.cpu_count() or 1)
        self.decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        # Decoded images waiting for (or riding in) a GPU batch, across all jobs.
        self.in_flight = threading.BoundedSemaphore(max(64, 2 * engine.max_batch_size))
        self._active = 0
        self._active_lock = threading.Lock()

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
            with self._activity():
                return self._run(request, job_id, progress, started)
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

    # --- internals ------------------------------------------------------------------------
    @contextmanager
    def _activity(self) -> Iterator[None]:
        with self._active_lock:
            self._active += 1
        try:
            yield
        finally:
            with self._active_lock:
                self._active -= 1
                last = self._active == 0
            if last:  # release cached GPU memory only when no other job is running
                self.engine.release_memory()

    def _run(self, request: schema.CaptionRequest, job_id: str, progress: Progress | None,
             started: float) -> dict:
        batch = request.batch_size or self.engine.batch_limit(request.generation)
        state = _JobState(job_id, progress, report_every=batch)
        entries: list[_Entry] = []
        failures: list[tuple[tuple[int, int], str, str]] = []
        with JobInputs(request.sources, request.single, self.cfg) as inputs:
            try:
                for item in inputs:
                    if isinstance(item, ImageFailure):
                        failures.append((item.order, item.image_path, item.error))
                        continue
                    entries.append(self._start(item, request, state))
                fetch_s = time.monotonic() - started
                with state.lock:
                    state.total = len(entries)
                results = [(e, e.future.result()) for e in entries]
            finally:
                state.cancelled.set()
                for e in entries:  # on an early exit, wait so no thread reads the temp dir
                    _wait_quietly(e.future)
            skipped = inputs.skipped
        caption_s = ((state.last_result_at or state.first_gpu_at or 0.0)
                     - (state.first_gpu_at or 0.0))
        timings = {"fetch_s": round(fetch_s, 3), "caption_s": round(max(caption_s, 0.0), 3),
                   "total_s": round(time.monotonic() - started, 3)}
        out = output.build(request, results, failures, skipped, self.engine, timings, job_id,
                           self.cfg)
        log.info("job %s: %d captions, %d errors, %d skipped in %.2fs", job_id,
                 len(out["captions"]), len(out.get("errors", [])), skipped, timings["total_s"])
        return out

    def _start(self, item: ImageSource, request: schema.CaptionRequest,
               state: _JobState) -> _Entry:
        """Take an in-flight slot, then decode on the pool and queue for the GPU."""
        self.in_flight.acquire()
        done: Future = Future()
        entry = _Entry(item.order, item.image_path, done)
        try:
            self.decode_pool.submit(self._decode_and_queue, item, request, state, done)
        except BaseException:
            self.in_flight.release()
            raise
        return entry

    def _decode_and_queue(self, item: ImageSource, request: schema.CaptionRequest,
                          state: _JobState, done: Future) -> None:
        try:
            if state.cancelled.is_set():
                raise ImageError("job ended before this image was decoded")
            pixels = self.engine.preprocess(decode_image(item, self.cfg, self.engine.image_size))
            if state.first_gpu_at is None:
                state.first_gpu_at = time.monotonic()
            gpu = self.batcher.submit(pixels, request.prompt, request.generation,
                                      request.batch_size, state.on_batch)
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
        elif isinstance(exc, FatalDeviceError):
            self._finish(done, state, error=exc)  # fails the job: the worker must be replaced
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


def _wait_quietly(future: Future) -> None:
    try:
        future.result()
    except BaseException:  # noqa: BLE001 - already reported through the job's result
        pass
