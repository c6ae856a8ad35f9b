"""The transformers engine: BLIP-2 on Hugging Face transformers (``BLIP_ENGINE=transformers``,
the default). See ``engines.base`` for the interface and the contract.

Decoding (``BLIP_DECODER``): ``fast`` (default) runs ``generation.FastGenerator``, which
prefills each image's prompt once and shares it across beams — the same tokens as transformers'
``generate``, which ``hf`` runs.
"""
from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Sequence

import torch
from PIL import Image

import preprocess
from config import Config
from engines.base import CPU_DEFAULT_BATCH, BaseEngine, resolve_device, resolve_dtype
from params import GenerationParams

if TYPE_CHECKING:  # imported where the fast decoder is used
    from generation import DecodeOptions

log = logging.getLogger("blip.engine")

MAX_AUTO_BATCH = 256


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
            reason = generation.refusal(self.model)
            if reason is None:
                self.fast = generation.FastGenerator(self.model, loaded.eos_token_id,
                                                     loaded.pad_token_id,
                                                     decode or decode_options(cfg, device))
            else:
                log.warning("BLIP_DECODER=fast: %s; using transformers' generate", reason)
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
        if cfg.model in modeling.SYNTHETIC:  # tiny-random, random-full: built in code
            import testing_models
            loaded = testing_models.load_model(cfg.model, device, dtype)
        else:
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
        free = usable_free_bytes(free, torch.cuda.memory_reserved(self.device),
                                 torch.cuda.memory_allocated(self.device),
                                 self.fast.pool_bytes if self.fast is not None else 0)
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

    def model_inputs(self, pixels: torch.Tensor, prompts: Sequence[str]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A collated uint8 batch and its prompts as the decoders take them, on the device:
        normalised pixels, left-padded ids and their attention mask."""
        ids, mask = self.build_inputs(prompts)
        if self._pin and pixels.device.type == "cpu":
            pixels = pixels.pin_memory()
        pixels = preprocess.normalize(pixels.to(self.device, non_blocking=True), self.dtype)
        return (pixels, ids.to(self.device, non_blocking=True),
                mask.to(self.device, non_blocking=True))

    def hf_tokens(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  params: GenerationParams) -> list[list[int]]:
        """New token ids per output row from transformers' generate."""
        out = self.model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                  **self._generation_kwargs(params))
        return out[:, ids.shape[1]:].tolist()

    def fast_tokens(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                    params: GenerationParams) -> list[list[int]]:
        """New token ids per output row from the fast decoder (and the chaos knob
        ``BLIP_INJECT_DECODER_MISMATCH``, which makes them wrong for the self-check to catch:
        ``fast`` always, ``graphs`` while CUDA graphs are on)."""
        rows = self.fast.generate(pixels, ids, mask, params)
        inject = self.cfg.inject_decoder_mismatch
        if inject == "fast" or (inject == "graphs" and self.fast.cuda_graphs):
            vocab = self.model.config.text_config.vocab_size
            rows = [[(row[0] + 1) % vocab, *row[1:]] if row else row for row in rows]
        return rows

    def use_hf_decoder(self) -> None:
        """Decode with transformers' generate from now on (the self-check's last fallback)."""
        if self.fast is not None:
            self.fast.release()
        self.fast = None
        self.decoder = "hf"
        if not self.cfg.max_batch_size:  # generate keeps a whole cache per beam: less fits
            self.max_batch_size = self._auto_batch_size()

    def _generate(self, pixels: torch.Tensor, prompts: Sequence[str],
                  params: GenerationParams) -> list[list[str]]:
        inputs = self.model_inputs(pixels, prompts)
        rows = (self.fast_tokens if self.fast is not None else self.hf_tokens)(*inputs, params)
        texts = [self._decode(seq) for seq in rows]
        k = params.num_captions
        return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]

    def _decode(self, seq: list[int]) -> str:
        eos = self.m.eos_token_id
        if eos in seq:
            seq = seq[:seq.index(eos)]
        return self.tokenizer.decode(seq, skip_special_tokens=True).strip()


def usable_free_bytes(device_free: int, reserved: int, allocated: int, graph_pool: int) -> int:
    """GPU memory a batch can use: what the device has free, plus the blocks torch's allocator
    holds unused, less those of the CUDA graphs' private pool (held for the graphs' replays,
    unusable by any other work)."""
    return device_free + max(0, reserved - allocated - graph_pool)


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
