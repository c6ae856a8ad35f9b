"""Caption engine: owns the model — load, preprocess, generate, decode — behind a small,
backend-neutral interface. No runpod import here.

Interface (both engines, see ``BaseEngine``)::

    engine = load_engine(cfg)                       # TransformersEngine, or LavisEngine (BLIP_ENGINE=lavis)
    results = engine.caption(images, params, prompts="a photo of", batch_size=None)
    results[i].captions   # list of num_captions strings for images[i] (input order)
    results[i].error      # or a readable per-image error (e.g. out of memory even alone)

Lower level, used by the batching pipeline (``batcher.py``) which feeds the GPU from worker
threads: ``engine.preprocess(pil) -> tensor`` (CPU, thread-safe) and
``engine.generate_with_fallback(pixels, prompts, params, batch_size)``.

Generation semantics (the API contract): the prompt follows the 32 query tokens and BOS; the
caption is the continuation without the prompt, stripped (``include_prompt`` prepends it);
``max_length`` / ``min_length`` count new caption tokens; eos is "\\n"; sampling forces one
beam; fp16 on CUDA (``BLIP_DTYPE`` overrides), fp32 on CPU. Results do not depend on the batch.

Decoding (``BLIP_DECODER``): ``fast`` (default) runs ``generation.FastGenerator``, which
prefills each image's prompt once and shares it across beams — the same tokens as transformers'
``generate``, which ``hf`` runs.

Memory: every batch runs under ``torch.inference_mode()``. On ``torch.cuda.OutOfMemoryError``
references are dropped, ``gc.collect()`` + ``torch.cuda.empty_cache()`` run, the batch is halved
and the same chunk retried, down to 1; an image that fails alone gets a per-image error. The
reduced size is kept for the rest of the call. ``BLIP_INJECT_OOM_ABOVE_BATCH=k`` makes any
generate call with more than k images raise the OOM error (chaos testing, works on CPU).
A corrupted CUDA context (illegal memory access, device-side assert, ...) is raised as
``FatalDeviceError``: the worker must be replaced.
"""
from __future__ import annotations

import functools
import gc
import logging
import time
from typing import TYPE_CHECKING, Sequence

import torch
from PIL import Image

import preprocess
from config import Config
from errors import FatalDeviceError
from params import DEFAULT_PROMPT, CaptionResult, GenerationParams, compose

if TYPE_CHECKING:  # imported where the fast decoder is used
    from generation import DecodeOptions

log = logging.getLogger("blip.engine")

CPU_DEFAULT_BATCH = 8
MAX_AUTO_BATCH = 256

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


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


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
    """Shared batching, OOM fallback, chaos injection and memory bookkeeping.

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
        """Caption PIL images in input order (the simple, synchronous path)."""
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


class TransformersEngine(BaseEngine):
    """BLIP-2 on Hugging Face transformers (``Blip2ForConditionalGeneration``)."""

    name = "transformers"

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, loaded,
                 decode: DecodeOptions | None = None):
        super().__init__(cfg, device, dtype)
        self.m = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.image_size = loaded.image_size
        self.load_s = loaded.load_s
        self._pin = device.type == "cuda"
        # preprocess writes each image into pinned memory and collate copies them one by one,
        # asynchronously, into a batch tensor on the GPU: the GPU thread no longer stacks and
        # pins a whole batch on the host (~100 MB at 256 images) while the GPU waits
        self.device_collate = self._pin
        self.fast = None
        if cfg.decoder == "fast":
            import generation
            if generation.supports(self.model):
                self.fast = generation.FastGenerator(self.model, loaded.eos_token_id,
                                                     loaded.pad_token_id,
                                                     decode or decode_options(cfg, device))
            else:
                log.warning("BLIP_DECODER=fast does not support this language model; "
                            "using transformers' generate")
        self.decoder = "fast" if self.fast is not None else "hf"
        self._prompt_ids = functools.lru_cache(maxsize=1024)(self._tokenize_prompt)
        self._kv_bytes_per_token = self._kv_cache_bytes_per_token()
        self.max_batch_size = cfg.max_batch_size or self._auto_batch_size()
        log.info("max batch size %d (%s)", self.max_batch_size,
                 "BLIP_MAX_BATCH_SIZE" if cfg.max_batch_size else
                 "auto: " + ("free GPU memory" if device.type == "cuda" else "CPU default"))

    @classmethod
    def load(cls, cfg: Config, decode: DecodeOptions | None = None) -> "TransformersEngine":
        import modeling
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        loaded = modeling.load_model(cfg.model, device, dtype)
        log.info("loaded %s on %s in %s in %.1fs", loaded.model_id, device,
                 str(dtype).replace("torch.", ""), loaded.load_s)
        return cls(cfg, device, dtype, loaded, decode)

    def drop_caches(self) -> None:
        if self.fast is not None:
            self.fast.release()

    # --- memory sizing --------------------------------------------------------------------
    def _kv_cache_bytes_per_token(self) -> int:
        text = self.model.config.text_config
        return 2 * text.num_hidden_layers * text.hidden_size * torch.finfo(self.dtype).bits // 8

    def _auto_batch_size(self) -> int:
        if self.device.type != "cuda":
            return CPU_DEFAULT_BATCH
        free, _total = torch.cuda.mem_get_info(self.device)
        return max(1, min(MAX_AUTO_BATCH, self._batch_for_bytes(free, GenerationParams())))

    def _bytes_per_image(self, params: GenerationParams) -> int:
        """Rough peak bytes one image costs during generate: the decoder's KV cache, logits over
        the vocabulary for every row, and the vision encoder's activations."""
        prompt = self.m.num_query_tokens + 16
        rows = params.sequences_per_image
        if self.fast is not None:  # prompt cache once per image, generated tokens per row
            kv = (prompt + rows * params.max_length) * self._kv_bytes_per_token * 2
        else:  # a full cache per row, and concatenation copies it
            kv = rows * (prompt + params.max_length) * self._kv_bytes_per_token * 2
        logits = rows * self.model.config.text_config.vocab_size * 4 * 3
        vision = self.model.config.vision_config
        patches = (self.image_size // vision.patch_size) ** 2 + 1
        encoder = patches * vision.intermediate_size * 2 * 4
        return kv + logits + encoder

    def _batch_for_bytes(self, free_bytes: int, params: GenerationParams) -> int:
        budget = free_bytes * 0.7
        return int(budget // self._bytes_per_image(params))

    def batch_limit(self, params: GenerationParams) -> int:
        if self.cfg.max_batch_size or self.device.type != "cuda":
            return self.max_batch_size
        # Size for these params: many beams and long captions need more memory per image.
        free, _total = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return max(1, min(self.max_batch_size, self._batch_for_bytes(free, params)))

    # --- preprocessing --------------------------------------------------------------------
    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """uint8 (3, S, S): resized on the CPU; normalised on the device in ``_generate``."""
        return preprocess.to_uint8(img, self.image_size, pin=self.device_collate)

    def collate(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        if not self.device_collate:
            return super().collate(pixels)
        out = torch.empty((len(pixels), *pixels[0].shape), dtype=pixels[0].dtype,
                          device=self.device)
        for row, p in zip(out, pixels):
            row.copy_(p, non_blocking=True)
        return out

    def _tokenize_prompt(self, prompt: str) -> tuple[int, ...]:
        # split_special_tokens: a prompt saying "<image>" or "</s>" is plain text, never a
        # control token (it could otherwise add a 33rd image slot or end the prompt early).
        return tuple(self.tokenizer(prompt, add_special_tokens=True,
                                    split_special_tokens=True).input_ids)

    def build_inputs(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded rows of ``<image>`` x 32 + BOS + prompt, and their attention mask."""
        rows = [(self.m.image_token_id,) * self.m.num_query_tokens + self._prompt_ids(p)
                for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.m.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        # Sanity guard: every row carries exactly 32 image tokens, or transformers would
        # silently caption without the image.
        if not bool((ids == self.m.image_token_id).sum(1).eq(self.m.num_query_tokens).all()):
            raise AssertionError("every row must carry exactly the 32 <image> tokens")
        return ids, mask

    def _generation_kwargs(self, params: GenerationParams) -> dict:
        kw = dict(max_new_tokens=params.max_length, num_beams=params.effective_beams,
                  num_return_sequences=params.num_captions, do_sample=params.use_nucleus_sampling,
                  repetition_penalty=params.repetition_penalty,
                  eos_token_id=self.m.eos_token_id, pad_token_id=self.m.pad_token_id)
        if params.min_length:
            kw["min_new_tokens"] = params.min_length
        if params.use_nucleus_sampling:  # top_k 50: transformers' default, explicit here
            kw.update(top_p=params.top_p, temperature=params.temperature, top_k=50)
        if params.effective_beams > 1:
            kw["length_penalty"] = params.length_penalty
        return kw

    def _generate(self, pixels: torch.Tensor, prompts: Sequence[str],
                  params: GenerationParams) -> list[list[str]]:
        ids, mask = self.build_inputs(prompts)
        if self._pin and pixels.device.type == "cpu":
            pixels = pixels.pin_memory()
        pixels = preprocess.normalize(pixels.to(self.device, non_blocking=True), self.dtype)
        ids = ids.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        if self.fast is not None:
            rows = self.fast.generate(pixels, ids, mask, params)
        else:
            out = self.model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                      **self._generation_kwargs(params))
            rows = out[:, ids.shape[1]:].tolist()
        texts = [self._decode(seq) for seq in rows]
        k = params.num_captions
        return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]

    def _decode(self, seq: list[int]) -> str:
        eos = self.m.eos_token_id
        if eos in seq:
            seq = seq[:seq.index(eos)]
        return self.tokenizer.decode(seq, skip_special_tokens=True).strip()


def decode_options(cfg: Config, device: torch.device) -> DecodeOptions:
    """The fast decoder's options for these settings on ``device``."""
    import generation
    graphs = cfg.cuda_graphs and device.type == "cuda"
    # step buffers kept for graph replay: at most 15% of the GPU's memory
    budget = (torch.cuda.get_device_properties(device).total_memory * 15 // 100
              if graphs else 0)
    # overlap (queue the next step before reading whether to stop) pays on a GPU;
    # on a CPU it would only add one wasted step per batch
    return generation.DecodeOptions(cuda_graphs=graphs, graph_memory_bytes=budget,
                                    overlap=device.type == "cuda")


def load_engine(cfg: Config, decode: DecodeOptions | None = None) -> BaseEngine:
    """Build the configured engine, load its model and warm it up (``BLIP_WARMUP``).
    ``decode``: the fast decoder's options where they are not ``decode_options``'s, as the
    benchmark's variants have them (the LAVIS engine has no fast decoder)."""
    if cfg.engine == "lavis":
        from engine_lavis import LavisEngine  # separate environment (requirements-lavis.txt)
        engine: BaseEngine = LavisEngine.load(cfg)
    else:
        engine = TransformersEngine.load(cfg, decode)
    if cfg.warmup:
        log.info("warm-up caption in %.2fs", engine.warmup())
    return engine


__all__ = ["BaseEngine", "TransformersEngine", "decode_options", "load_engine",
           "is_fatal_device_error", "is_oom"]
