"""The engine interface: what the service needs of a caption engine, and what both engines share
(batching in chunks, the out-of-memory fallback, chaos injection, memory bookkeeping). Imports
neither engine; both import it. No runpod import here.

What the service calls (``engines.load_engine(cfg)`` builds the engine and calls ``warmup``)::

    engine.preprocess(pil) -> tensor      # decode threads (jobs, caption_folder); thread-safe
    engine.image_size                     # the side images are decoded towards
    engine.batch_limit(params) -> int     # largest batch for these params (batcher, jobs)
    engine.generate_with_fallback(pixels, prompts, params, batch_size)
        -> (results, batch size that worked)      # the GPU thread (batcher, caption_folder)
    engine.collate(pixels) -> batch       # inside generate_with_fallback (and the benchmark)
    engine.max_batch_size                 # sizes admission (handler, jobs)
    engine.release_memory() -> stats      # after each job (jobs)
    engine.warmup() -> seconds            # once, at load (load_engine)
    engine.name, .model_id, .device       # reported (handler, output)

``results[i]`` is a ``CaptionResult``: ``captions``, ``num_captions`` strings for ``pixels[i]``
(input order), or ``error``, a readable per-image error (e.g. out of memory even alone).

``engine.caption(images, params, prompts="a photo of", batch_size=None)`` does all of it for PIL
images in one call: a convenience for tools and tests; the service does not use it.

Generation semantics (the API contract): the prompt follows the 32 query tokens and BOS; the
caption is the continuation without the prompt, stripped (``include_prompt`` prepends it);
``max_length`` / ``min_length`` count new caption tokens; eos is "\\n"; sampling forces one
beam; fp16 on CUDA (``BLIP_DTYPE`` overrides), fp32 on CPU. Results do not depend on the batch.

Memory: every batch runs under ``torch.inference_mode()``. On ``torch.cuda.OutOfMemoryError``
references are dropped, ``gc.collect()`` + ``torch.cuda.empty_cache()`` run, the batch is halved
and the same chunk retried, down to 1; an image that fails alone gets a per-image error. The
reduced size is kept for the rest of the call. ``BLIP_INJECT_OOM_ABOVE_BATCH=k`` makes any
generate call with more than k images raise the OOM error (chaos testing, works on CPU).
A corrupted CUDA context (illegal memory access, device-side assert, ...) is raised as
``FatalDeviceError``: the worker must be replaced.
"""
from __future__ import annotations

import gc
import logging
import time
from typing import Sequence

import torch
from PIL import Image

import preprocess
from config import Config
from errors import FatalDeviceError
from params import DEFAULT_PROMPT, CaptionResult, GenerationParams, compose

log = logging.getLogger("blip.engine")

CPU_DEFAULT_BATCH = 8

# Messages of errors after which the CUDA context cannot be trusted (the process must go).
_FATAL_CUDA_MARKERS = (
    "illegal memory access", "device-side assert", "unspecified launch failure",
    "cuda error: misaligned address", "cublas_status_execution_failed",
    "cudnn_status_execution_failed", "an illegal instruction", "uncorrectable ecc",
    "cuda error: unknown error",
)


def is_fatal_device_error(exc: BaseException) -> bool:
    if isinstance(exc, FatalDeviceError):
        return True
    if isinstance(exc, torch.OutOfMemoryError) or not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _FATAL_CUDA_MARKERS)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"BLIP_DEVICE={name!r} but no CUDA device is available; "
                         "use BLIP_DEVICE=auto or cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class BaseEngine:
    """Shared batching, OOM fallback, chaos injection and memory bookkeeping (the interface the
    service calls: see the module docstring).

    Subclasses set ``name``, ``model_id``, ``device``, ``dtype``, ``image_size`` and implement
    ``preprocess`` and ``_generate``.
    """

    name = "base"
    model_id = ""
    image_size = preprocess.IMAGE_SIZE
    device_collate = False  # collate copies images to the device itself (see TransformersEngine)

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.inject_oom_above = cfg.inject_oom_above_batch
        self.max_batch_size = cfg.max_batch_size or CPU_DEFAULT_BATCH
        self.load_s = 0.0
        self.warmup_s = 0.0
        # the start-up self-check's outcome (engines.self_check.Outcome), for the ready line
        self.self_check = None

    # --- to implement ---------------------------------------------------------------------
    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """One PIL image -> one CPU tensor ready to stack. Thread-safe."""
        raise NotImplementedError

    def _generate(self, pixels: torch.Tensor, prompts: Sequence[str],
                  params: GenerationParams) -> list[list[str]]:
        """Caption a stacked batch: per image, ``num_captions`` continuations (prompt removed,
        stripped, no newline), best first."""
        raise NotImplementedError

    def collate(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Preprocessed images -> one batch tensor for ``generate_batch``."""
        return torch.stack(list(pixels))

    # --- shared ---------------------------------------------------------------------------
    def batch_limit(self, params: GenerationParams) -> int:
        """Largest batch for these params (the request's ``batch_size`` may lower it)."""
        return self.max_batch_size

    def generate_batch(self, pixels: torch.Tensor, prompts: Sequence[str],
                       params: GenerationParams) -> list[list[str]]:
        n = pixels.shape[0]
        if len(prompts) != n:
            raise ValueError(f"{n} images but {len(prompts)} prompts")
        if self.inject_oom_above is not None and n > self.inject_oom_above:
            raise torch.OutOfMemoryError(
                f"injected out-of-memory for a batch of {n} (BLIP_INJECT_OOM_ABOVE_BATCH="
                f"{self.inject_oom_above})")
        if self.cfg.inject_cuda_error_prompt and self.cfg.inject_cuda_error_prompt in prompts:
            raise FatalDeviceError("CUDA error: an illegal memory access was encountered "
                                   "(injected: BLIP_INJECT_CUDA_ERROR_PROMPT)")
        try:
            with torch.inference_mode():
                out = self._generate(pixels, prompts, params)
        except RuntimeError as exc:
            if is_fatal_device_error(exc) and not isinstance(exc, FatalDeviceError):
                raise FatalDeviceError(str(exc).splitlines()[0]) from exc
            raise
        if len(out) != n:  # pragma: no cover - engine bug guard
            raise AssertionError(f"engine returned {len(out)} results for {n} images")
        return out

    def generate_with_fallback(self, pixels: Sequence[torch.Tensor], prompts: Sequence[str],
                               params: GenerationParams, batch_size: int
                               ) -> tuple[list[CaptionResult], int]:
        """Caption ``pixels`` in chunks of ``batch_size``, halving on OOM down to 1.

        Returns results in input order and the batch size that finally worked (keep using it).
        """
        results: list[CaptionResult] = []
        size = max(1, batch_size)
        i = 0
        while i < len(pixels):
            chunk = slice(i, i + size)
            try:
                out = self.generate_batch(self.collate(pixels[chunk]), prompts[chunk], params)
            except torch.OutOfMemoryError:
                out = None  # handled below: the traceback still holds the batch's tensors here
            if out is None:
                self.free_memory(drop_caches=True)
                if size == 1:
                    log.warning("out of memory on a single image; giving up on it")
                    results.append(CaptionResult(error=oom_message(params)))
                    i += 1
                else:
                    size = max(1, size // 2)
                    log.warning("out of memory at batch %d; retrying at %d", size * 2, size)
                continue
            results.extend(CaptionResult(captions=c) for c in out)
            i += len(out)
        return results, size

    def caption(self, images: Sequence[Image.Image], params: GenerationParams | None = None,
                prompts: str | Sequence[str] = DEFAULT_PROMPT, batch_size: int | None = None,
                include_prompt: bool = False) -> list[CaptionResult]:
        """Caption PIL images in input order (the simple, synchronous path): a convenience for
        tools and tests; the service goes through ``preprocess`` and ``generate_with_fallback``."""
        params = params or GenerationParams()
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        limit = self.batch_limit(params)
        size = min(batch_size, limit) if batch_size else limit
        pixels = [self.preprocess(img) for img in images]
        results, _ = self.generate_with_fallback(pixels, list(prompts), params, size)
        for res, prompt in zip(results, prompts):
            res.captions = [compose(prompt, c, include_prompt) for c in res.captions]
        return results

    def warmup(self) -> float:
        t0 = time.perf_counter()
        img = Image.new("RGB", (self.image_size, self.image_size), (127, 127, 127))
        self.generate_batch(self.preprocess(img).unsqueeze(0), [DEFAULT_PROMPT],
                            GenerationParams(num_beams=1, max_length=2, min_length=0))
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s

    def free_memory(self, drop_caches: bool = False) -> None:
        """Return cached GPU blocks to the driver. ``drop_caches`` (after an out-of-memory
        error) also drops the engine's reusable buffers and runs the garbage collector, which
        costs up to a second with a model loaded: not something to do after every job."""
        if drop_caches:
            self.drop_caches()
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def drop_caches(self) -> None:
        """Engines with reusable device buffers release them here."""

    def memory_stats(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        gib = 2.0 ** 30
        return {"allocated_gib": round(torch.cuda.memory_allocated(self.device) / gib, 2),
                "reserved_gib": round(torch.cuda.memory_reserved(self.device) / gib, 2),
                "peak_gib": round(torch.cuda.max_memory_allocated(self.device) / gib, 2)}

    def release_memory(self) -> dict[str, float]:
        """After a job: return cached blocks to the driver and report memory."""
        self.free_memory()
        stats = self.memory_stats()
        if stats:
            log.info("GPU memory after job: %s", stats)
        return stats


def oom_message(params: GenerationParams) -> str:
    return ("out of GPU memory even when captioned alone "
            f"(num_beams={params.num_beams}, max_length={params.max_length}, "
            f"num_captions={params.num_captions}); lower num_beams, max_length or num_captions")
