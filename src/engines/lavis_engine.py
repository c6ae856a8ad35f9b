"""``BLIP_ENGINE=lavis``: BLIP-2 ``caption_coco_opt2.7b`` run by salesforce-lavis 1.0.2 itself.

The seed worker's exact stack, for users who want it: the model comes from LAVIS's
``load_model_and_preprocess(name="blip2_opt", model_type="caption_coco_opt2.7b", is_eval=True)``,
images go through LAVIS's ``vis_processors["eval"]`` and captions through ``Blip2OPT.generate``,
all unchanged. Batching, the OOM fallback and the chaos knob are ``engines.base.BaseEngine``'s,
shared with the default transformers engine; the API contract is the same (see ``engines.base``).
The files it loads, and fetching them, are ``engines.lavis_checkpoints``'; ``tiny-random`` is
built by ``testing_models``.

Needs its own environment: requirements-lavis.txt (transformers 4.25.1, torch 2.14.1), built by
``make venv-lavis``. Do not import this module from the main environment.

How our parameters map onto ``Blip2OPT.generate`` (see ``generate_kwargs``):

- ``max_length``: LAVIS passes it to Hugging Face as ``max_new_tokens``: new tokens, as ours.
- ``min_length``: LAVIS passes it as Hugging Face's ``min_length``, which counts every token in
  the ``input_ids`` it generates from: BOS and the prompt. The 32 query embeddings are not
  counted: LAVIS hands them over separately (``query_embeds``), not as ``input_ids``. So we add
  the prompt's token count (BOS included) to get "at least ``min_length`` new tokens".
- LAVIS tokenizes ``samples["prompt"]`` as one string repeated for the batch, without padding:
  a batch is captioned in groups of equal prompts (``group_by_prompt``).
- sampling forces one beam in LAVIS, as in ours; every other field is passed through.

Device and precision are LAVIS's: fp16 autocast over an fp16 OPT on CUDA, float32 on CPU
(``load_model_and_preprocess`` calls ``.float()`` there). ``BLIP_DTYPE`` may only name that.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import pickle
import time
from typing import Sequence

import torch
from PIL import Image

from config import DEFAULT_MODEL, Config
from engines.base import BaseEngine, resolve_device, resolve_dtype
from engines.lavis_checkpoints import (CacheLayout, cache_layout, lavis_checkpoint_paths,
                                       missing_files, trusted_checkpoint_loads)
from errors import ModelLoadError
from modeling import TINY
from params import GenerationParams

log = logging.getLogger("blip.engine.lavis")

MODEL_NAME = "blip2_opt"
MODEL_TYPE = "caption_coco_opt2.7b"
MODEL_ID = "Salesforce/LAVIS caption_coco_opt2.7b"
REAL_SOURCES = (DEFAULT_MODEL, MODEL_TYPE)  # BLIP_MODEL values that mean the real LAVIS model
PINNED_TRANSFORMERS = "4.25.1"  # see requirements-lavis.txt


# ----------------------------------------------------------------------------------------------
# generation parameters
# ----------------------------------------------------------------------------------------------
def generate_kwargs(params: GenerationParams, prompt_tokens: int) -> dict:
    """``Blip2OPT.generate`` keyword arguments for ``params`` (our semantics, see the module
    docstring); ``prompt_tokens`` = the prompt's token count with BOS."""
    return dict(use_nucleus_sampling=params.use_nucleus_sampling,
                num_beams=params.effective_beams, max_length=params.max_length,
                min_length=params.min_length + prompt_tokens, top_p=params.top_p,
                temperature=params.temperature, repetition_penalty=params.repetition_penalty,
                length_penalty=params.length_penalty, num_captions=params.num_captions)


def group_by_prompt(prompts: Sequence[str]) -> dict[str, list[int]]:
    """Row indices of each distinct prompt, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    return groups


def clean(text: str) -> str:
    """A caption as the contract has it: up to the first newline (eos), stripped."""
    return text.split("\n", 1)[0].strip()


def lavis_dtype(name: str, device: torch.device) -> torch.dtype:
    """LAVIS's precision on ``device``; BLIP_DTYPE may only name it (or be ``auto``)."""
    natural = torch.float16 if device.type == "cuda" else torch.float32
    if name != "auto" and resolve_dtype(name, device) != natural:
        raise ModelLoadError(
            f"BLIP_DTYPE={name} is not available with BLIP_ENGINE=lavis: LAVIS runs float16 "
            "autocast on CUDA and float32 on CPU. Unset BLIP_DTYPE (auto) or use "
            "BLIP_ENGINE=transformers.")
    return natural


def missing_weights_message(missing: Sequence[str], layout: CacheLayout) -> str:
    return (f"cannot load the LAVIS model {MODEL_TYPE} (BLIP_ENGINE=lavis): missing "
            f"{', '.join(missing)} "
            f"(torch hub cache {layout.torch_checkpoints}, Hugging Face cache {layout.hf_cache}). "
            "Download them first with `python builder/fetch_model.py --engine lavis` (the Docker "
            "image built with --build-arg BLIP_ENGINE=lavis does this), or try the worker "
            "without weights with BLIP_MODEL=tiny-random.")


# ----------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------
def _source(model: str) -> tuple[contextlib.AbstractContextManager, str]:
    """(context yielding the LAVIS model type to load, model id to report); fails fast, before
    LAVIS is imported, on a source it cannot load."""
    if model == TINY:
        import testing_models
        return testing_models.registered(), TINY
    if model not in REAL_SOURCES:
        raise ModelLoadError(
            f"BLIP_MODEL={model!r} is not available with BLIP_ENGINE=lavis: it loads LAVIS's "
            f"{MODEL_TYPE} (leave BLIP_MODEL unset) or the offline test model "
            f"(BLIP_MODEL={TINY}).")
    layout = cache_layout()
    missing = missing_files(layout)
    if missing:
        raise ModelLoadError(missing_weights_message(missing, layout))
    return contextlib.nullcontext(MODEL_TYPE), MODEL_ID


class LavisEngine(BaseEngine):
    """BLIP-2 OPT-2.7b COCO captioning on salesforce-lavis (``Blip2OPT``)."""

    name = "lavis"

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, model,
                 vis_processor, model_id: str, image_size: int, load_s: float = 0.0):
        super().__init__(cfg, device, dtype)
        self.model = model
        self.vis_processor = vis_processor
        self.model_id = model_id
        self.image_size = image_size
        self.load_s = load_s
        self._pin = device.type == "cuda"
        self._prompt_tokens = functools.lru_cache(maxsize=1024)(self._count_prompt_tokens)

    @classmethod
    def load(cls, cfg: Config) -> "LavisEngine":
        device = resolve_device(cfg.device)
        dtype = lavis_dtype(cfg.dtype, device)
        source, model_id = _source(cfg.model)
        import transformers
        try:
            from lavis.models import load_model_and_preprocess
            from lavis.models.blip2_models.blip2_opt import Blip2OPT
            from omegaconf import OmegaConf
        except ImportError as exc:
            raise ModelLoadError(
                f"BLIP_ENGINE=lavis: LAVIS is not installed in this Python environment ({exc}). "
                "Run it from its own environment (`make venv-lavis`, then `make run "
                "BLIP_ENGINE=lavis` or `.venv-lavis/bin/python src/handler.py`) or from the "
                "image built with `docker build --build-arg BLIP_ENGINE=lavis`; or unset "
                "BLIP_ENGINE to use the transformers engine.") from None
        if transformers.__version__ != PINNED_TRANSFORMERS:
            log.warning("transformers %s with LAVIS: only %s keeps its KV cache and beam search "
                        "intact (requirements-lavis.txt)", transformers.__version__,
                        PINNED_TRANSFORMERS)
        checkpoints = lavis_checkpoint_paths()
        t0 = time.perf_counter()  # like the transformers engine: excludes the imports
        with source as model_type, trusted_checkpoint_loads(checkpoints):
            try:
                model, vis, _txt = load_model_and_preprocess(
                    name=MODEL_NAME, model_type=model_type, is_eval=True, device=device)
            except (OSError, pickle.UnpicklingError) as exc:
                raise ModelLoadError(f"LAVIS could not load {model_type}: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:300]}") from exc
            image_size = OmegaConf.load(Blip2OPT.default_config_path(model_type)
                                        ).preprocess.vis_processor.eval.image_size
        load_s = time.perf_counter() - t0
        log.info("loaded LAVIS %s on %s (%s) in %.1fs", model_id, device,
                 "fp16 autocast" if device.type == "cuda" else "fp32", load_s)
        return cls(cfg, device, dtype, model, vis["eval"], model_id, int(image_size), load_s)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """LAVIS's own ``vis_processors["eval"]``: float32 (3, S, S), normalised. Thread-safe."""
        return self.vis_processor(img if img.mode == "RGB" else img.convert("RGB"))

    def _count_prompt_tokens(self, prompt: str) -> int:
        # What Blip2OPT.generate feeds as input_ids (BOS included): its prompt_length.
        return len(self.model.opt_tokenizer(prompt).input_ids)

    def _generate(self, pixels: torch.Tensor, prompts: Sequence[str],
                  params: GenerationParams) -> list[list[str]]:
        if self._pin:
            pixels = pixels.pin_memory()
        pixels = pixels.to(self.device, non_blocking=True)
        k = params.num_captions
        out: list[list[str]] = [[] for _ in prompts]
        for prompt, rows in group_by_prompt(prompts).items():
            images = pixels if len(rows) == len(prompts) else pixels[rows]
            texts = self.model.generate({"image": images, "prompt": prompt},
                                        **generate_kwargs(params, self._prompt_tokens(prompt)))
            for j, row in enumerate(rows):
                out[row] = [clean(t) for t in texts[j * k:(j + 1) * k]]
        return out


__all__ = ["LavisEngine", "generate_kwargs", "group_by_prompt"]
