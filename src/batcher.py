"""Cross-job batching: one GPU thread captions images from every running job.

Jobs submit one preprocessed image at a time (``submit`` returns a ``Future``). The GPU thread
takes the oldest waiting image, fills a batch with waiting images whose ``GenerationParams``
are equal (prompts may differ: rows are left-padded), and runs it through
``engine.generate_with_fallback``, resolving each image's future. When the batch is not full
and a running job may still send images (``producer``), it first waits for more: as long as
they keep arriving less than ``BLIP_BATCH_WAIT_MS`` apart, and at most ``WAIT_CAP`` times that
after its first image (a burst of jobs whose arrivals spread over more than the wait still
rides in one batch; a lone image never waits). So 64 one-image jobs arriving together ride in
one or a few GPU batches instead of 64, and a 1000-image job keeps the GPU busy while its
downloads continue.

Rules:
- A job's own ``batch_size`` caps every batch its images ride in.
- The largest batch per params is ``engine.batch_limit(params)``; after an out-of-memory
  fallback the reduced size is kept for that params until the queue drains.
- Images are taken oldest first, so no job starves.
- A ``FatalDeviceError`` (corrupted CUDA context) fails that batch's images with it; any other
  exception from the engine fails that batch's images with the exception; nothing hangs.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from engines import BaseEngine
from params import CaptionResult, GenerationParams

log = logging.getLogger("blip.batcher")
_NO_CAP = 1 << 30
# A batch that is not full waits for the next image for up to BLIP_BATCH_WAIT_MS, again after
# each arrival, but at most this many times BLIP_BATCH_WAIT_MS after its first image.
WAIT_CAP = 4


@dataclass(eq=False)  # identity, not field equality (fields hold tensors)
class _Item:
    pixels: torch.Tensor
    prompt: str
    params: GenerationParams
    cap: int  # the job's batch_size (or the engine limit)
    future: Future
    on_batch: Callable[[int], None] | None  # called once per batch with this job's count
    submitted: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, engine: BaseEngine, wait_ms: float = 5.0):
        self.engine = engine
        self.wait_s = max(0.0, wait_ms) / 1000.0
        self._queue: deque[_Item] = deque()
        self._cv = threading.Condition()
        self._oom_caps: dict[GenerationParams, int] = {}
        self._stop = False
        self._producers = 0  # jobs that may still submit images (see ``producer``)
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        self.batch_sizes: list[int] = []  # recent batch sizes (bench / tests)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> "Batcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gpu-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the GPU thread; images still queued fail (nothing waits forever)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._fail_queued(RuntimeError("the GPU batcher stopped before captioning this image"))

    # --- API ------------------------------------------------------------------------------
    def submit(self, pixels: torch.Tensor, prompt: str, params: GenerationParams,
               batch_size: int | None = None,
               on_batch: Callable[[int], None] | None = None) -> Future:
        """Queue one preprocessed image; the future resolves to a ``CaptionResult``."""
        future: Future = Future()
        # No job cap -> only the engine's limit applies, computed when the batch is formed
        # (free memory is only meaningful between batches).
        cap = batch_size if batch_size else _NO_CAP
        item = _Item(pixels, prompt, params, max(1, cap), future, on_batch)
        with self._cv:
            if self._stop:
                raise RuntimeError("the GPU batcher is stopped")
            self._queue.append(item)
            self._cv.notify()
        return future

    def producer(self) -> "Producer":
        """Register a job that will submit images: while any registered job may still submit,
        a batch that is not full waits for more (``_take_batch``); when none may, it starts at
        once (a lone image never waits for company that cannot come)."""
        with self._cv:
            self._producers += 1
        return Producer(self)

    def _producer_done(self) -> None:
        with self._cv:
            self._producers -= 1
            self._cv.notify_all()

    # --- GPU thread -----------------------------------------------------------------------
    def _limit_for(self, params: GenerationParams) -> int:
        limit = self.engine.batch_limit(params)
        return min(limit, self._oom_caps.get(params, limit))

    def _take_batch(self) -> list[_Item] | None:
        """Wait for work, then pick the oldest item's group (under the lock)."""
        with self._cv:
            while not self._queue and not self._stop:
                self._oom_caps.clear()  # the queue drained: forget OOM-reduced sizes
                self._cv.wait()
            if self._stop:
                return None
            head = self._queue[0]
            limit = min(self._limit_for(head.params), head.cap)
            latest = head.submitted + self.wait_s * WAIT_CAP
            while True:
                batch, cap = self._select(head.params, limit)
                # wait while images keep arriving less than wait_s apart, within the cap
                last = max(it.submitted for it in batch)
                remaining = min(last + self.wait_s, latest) - time.monotonic()
                if (len(batch) >= cap or remaining <= 0 or self._stop
                        or self._producers == 0):
                    break
                self._cv.wait(timeout=remaining)
            for item in batch:
                self._queue.remove(item)
            return batch

    def _select(self, params: GenerationParams, limit: int) -> tuple[list[_Item], int]:
        """The oldest items with these params that fit together, and the batch size they allow
        (the smallest ``batch_size`` among them caps it)."""
        batch: list[_Item] = []
        cap = limit
        for item in self._queue:
            if item.params != params:
                continue
            new_cap = min(cap, item.cap)
            if len(batch) + 1 > new_cap:
                continue
            batch.append(item)
            cap = new_cap
            if len(batch) >= cap:
                break
        return batch, cap

    def _loop(self) -> None:
        while True:
            try:
                batch = self._take_batch()
            except Exception as exc:  # noqa: BLE001 - a scheduler bug must not hang every job
                log.exception("batch selection failed; failing the queued images")
                self._fail_queued(exc)
                continue
            if batch is None:
                return
            self._run(batch)

    def _fail_queued(self, exc: BaseException) -> None:
        with self._cv:
            items, self._queue = list(self._queue), deque()
        for item in items:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(exc)

    def _run(self, batch: list[_Item]) -> None:
        params = batch[0].params
        live = [it for it in batch if it.future.set_running_or_notify_cancel()]
        if not live:
            return
        size = len(live)
        try:
            results, worked = self.engine.generate_with_fallback(
                [it.pixels for it in live], [it.prompt for it in live], params, size)
        except BaseException as exc:  # noqa: BLE001 - every future must resolve
            log.error("batch of %d failed: %s: %s", size, type(exc).__name__, exc)
            for it in live:
                it.future.set_exception(exc)
            return
        if worked < size:
            self._oom_caps[params] = worked
        self.batches_run += 1
        self.batch_sizes = (self.batch_sizes + [size])[-1000:]
        # One progress call per job per batch, before the results: a job's final answer must
        # never be overtaken by its own progress post. (Bound methods compare and hash equal
        # when they are the same method of the same object, so they group correctly.)
        counts: dict[Callable[[int], None], int] = {}
        for it in live:
            if it.on_batch is not None:
                counts[it.on_batch] = counts.get(it.on_batch, 0) + 1
        for cb, n in counts.items():
            try:
                cb(n)
            except Exception as exc:  # noqa: BLE001 - progress is never fatal
                log.warning("progress callback failed: %s", exc)
        for it, res in zip(live, results):
            it.future.set_result(res)


__all__ = ["Batcher", "CaptionResult"]


class Producer:
    """A registered job's claim that more images may come. Opened by ``Batcher.producer``
    holding one reference (the job's own loop over its inputs); ``hold`` adds one per image
    still being decoded, ``release`` drops one; the claim ends when the last is dropped."""

    def __init__(self, batcher: Batcher):
        self._batcher = batcher
        self._refs = 1
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            if self._refs <= 0:
                raise RuntimeError("producer already closed")
            self._refs += 1

    def release(self) -> None:
        with self._lock:
            if self._refs <= 0:
                return
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._batcher._producer_done()
