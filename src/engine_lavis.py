"""``BLIP_ENGINE=lavis``: BLIP-2 ``caption_coco_opt2.7b`` run by salesforce-lavis 1.0.2 itself.

The seed worker's exact stack, for users who want it: the model comes from LAVIS's
``load_model_and_preprocess(name="blip2_opt", model_type="caption_coco_opt2.7b", is_eval=True)``,
images go through LAVIS's ``vis_processors["eval"]`` and captions through ``Blip2OPT.generate``,
all unchanged. Batching, the OOM fallback and the chaos knob are ``engine.BaseEngine``'s, shared
with the default transformers engine; the API contract is the same (see ``engine``).

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

Model sources (``BLIP_MODEL``): the default (or ``caption_coco_opt2.7b``) loads the real files from
the caches LAVIS reads -- ``eva_vit_g.pth`` and ``blip2_caption_opt2.7b.pth`` in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``), ``facebook/opt-2.7b`` and ``bert-base-uncased`` in the Hugging
Face cache -- which ``prefetch`` downloads (``python builder/fetch_model.py --engine lavis``).
``tiny-random`` builds a tiny model offline (``lavis_tiny``).

torch >= 2.6 loads with ``weights_only=True`` by default and LAVIS calls ``torch.load`` without the
argument. ``trusted_checkpoint_loads`` keeps that safe default for every file and, only for the
two LAVIS checkpoints named above at their place in the torch hub cache, falls back to
``weights_only=False`` if (and only if) the safe load refuses them.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import urlparse

import torch
from PIL import Image

import engines.base as engine
from config import DEFAULT_MODEL, Config
from errors import ModelLoadError
from modeling import TINY
from params import GenerationParams

log = logging.getLogger("blip.engine.lavis")

MODEL_NAME = "blip2_opt"
MODEL_TYPE = "caption_coco_opt2.7b"
MODEL_ID = "Salesforce/LAVIS caption_coco_opt2.7b"
REAL_SOURCES = (DEFAULT_MODEL, MODEL_TYPE)  # BLIP_MODEL values that mean the real LAVIS model
PINNED_TRANSFORMERS = "4.25.1"  # see requirements-lavis.txt

# What LAVIS downloads for caption_coco_opt2.7b. The URLs are LAVIS's own (create_eva_vit_g and
# the caption yaml's `finetuned`; a test keeps them in step); the file name is the URL's last
# part, as LAVIS's download_cached_file stores it.
_LAVIS_BUCKET = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
EVA_VIT_G_URL = _LAVIS_BUCKET + "eva_vit_g.pth"
CAPTION_CHECKPOINT_URL = _LAVIS_BUCKET + "blip2_caption_opt2.7b.pth"
CHECKPOINT_URLS = (EVA_VIT_G_URL, CAPTION_CHECKPOINT_URL)
OPT_REPO = "facebook/opt-2.7b"
BERT_REPO = "bert-base-uncased"
WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_PICKLE = "pytorch_model.bin"


# ----------------------------------------------------------------------------------------------
# where the real files live, what is missing, and fetching them (builder/fetch_model.py)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFFile:
    """One file of a Hugging Face repo: the first of ``names`` the repo has is the one used."""
    repo: str
    names: tuple[str, ...]
    required: bool = True


@dataclass(frozen=True)
class CacheLayout:
    """The two caches LAVIS reads, and the environment the worker needs to read them there."""
    torch_checkpoints: Path  # timm's download_cached_file: torch.hub.get_dir()/checkpoints
    hf_cache: Path  # transformers' TRANSFORMERS_CACHE
    env: dict[str, str] = field(default_factory=dict)

    def checkpoint_targets(self) -> list[tuple[str, Path]]:
        """(url, file) of each LAVIS checkpoint, named as LAVIS names its download."""
        return [(url, self.torch_checkpoints / Path(urlparse(url).path).name)
                for url in CHECKPOINT_URLS]


def lavis_checkpoint_paths(layout: CacheLayout | None = None) -> list[Path]:
    """Where LAVIS reads its own checkpoints: the only files ``trusted_checkpoint_loads``
    may load with ``weights_only=False``."""
    return [path for _url, path in (layout or cache_layout()).checkpoint_targets()]


def cache_layout(cache_dir: str | os.PathLike | None = None) -> CacheLayout:
    """The caches under ``cache_dir`` (``torch/`` and ``huggingface/``; the worker then needs
    ``TORCH_HOME`` and ``HF_HOME`` from ``env``), or, by default, the ones this process reads."""
    if cache_dir is not None:
        root = Path(cache_dir).absolute()
        return CacheLayout(root / "torch" / "hub" / "checkpoints", root / "huggingface" / "hub",
                           env={"TORCH_HOME": str(root / "torch"),
                                "HF_HOME": str(root / "huggingface")})
    from transformers.utils.hub import TRANSFORMERS_CACHE
    return CacheLayout(Path(torch.hub.get_dir()) / "checkpoints", Path(TRANSFORMERS_CACHE))


def hf_files(safetensors_available: bool) -> list[HFFile]:
    """The Hugging Face files LAVIS loads: OPT's slow tokenizer, config and weights, and BERT's
    tokenizer, config and weights (for the Q-Former). Weights: the file transformers 4.25.1
    picks -- ``model.safetensors`` first when the safetensors package is installed."""
    weights = ((WEIGHTS_SAFETENSORS, WEIGHTS_PICKLE) if safetensors_available
               else (WEIGHTS_PICKLE,))
    out = []
    for repo, vocab in ((OPT_REPO, ("vocab.json", "merges.txt")), (BERT_REPO, ("vocab.txt",))):
        out += [HFFile(repo, (name,)) for name in ("config.json",) + vocab]
        out += [HFFile(repo, (name,), required=False)
                for name in ("tokenizer_config.json", "special_tokens_map.json")]
        out.append(HFFile(repo, weights))
    return out


def _safetensors_available() -> bool:
    from transformers.utils import is_safetensors_available
    return is_safetensors_available()


def _hf_cached(item: HFFile, hf_cache: Path) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(item.repo, name, cache_dir=str(hf_cache)), str)
               for name in item.names)


def _have(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def missing_files(layout: CacheLayout | None = None) -> list[str]:
    """What the real model still lacks, readable (empty when everything is in place)."""
    layout = layout or cache_layout()
    missing = [str(path) for path in lavis_checkpoint_paths(layout) if not _have(path)]
    missing += [f"{item.repo}/{' or '.join(item.names)}"
                for item in hf_files(_safetensors_available())
                if item.required and not _hf_cached(item, layout.hf_cache)]
    return missing


def _download_url(url: str, target: Path) -> None:
    torch.hub.download_url_to_file(url, str(target), progress=True)  # temp file + rename


def _download_hf(repo: str, name: str, hf_cache: Path) -> bool:
    """Download one file into the cache; False when the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError
    try:
        hf_hub_download(repo, name, cache_dir=str(hf_cache))
    except EntryNotFoundError:
        return False
    return True


def prefetch(cache_dir: str | os.PathLike | None = None, *,
             fetch_url: Callable[[str, Path], None] = _download_url,
             fetch_hf: Callable[[str, str, Path], bool] = _download_hf,
             say: Callable[[str], None] = print) -> dict[str, str]:
    """Download everything ``BLIP_ENGINE=lavis`` loads into the caches LAVIS reads; files
    already there are skipped. Returns the environment the worker needs to find them (empty for
    the default caches). Used by ``builder/fetch_model.py --engine lavis``."""
    layout = cache_layout(cache_dir)
    for url, target in layout.checkpoint_targets():
        if _have(target):
            say(f"have {target}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        say(f"downloading {url} -> {target}")
        fetch_url(url, target)
    for item in hf_files(_safetensors_available()):
        label = f"{item.repo}/{' or '.join(item.names)}"
        if _hf_cached(item, layout.hf_cache):
            say(f"have {label}")
            continue
        say(f"downloading {label} -> {layout.hf_cache}")
        if not any(fetch_hf(item.repo, name, layout.hf_cache) for name in item.names):
            if item.required:
                raise ModelLoadError(f"{item.repo} has none of {', '.join(item.names)}")
    return layout.env


# ----------------------------------------------------------------------------------------------
# torch.load and weights_only
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def trusted_checkpoint_loads(trusted: Iterable[str | os.PathLike]) -> Iterator[None]:
    """While active, a ``torch.load`` of one of the ``trusted`` files that does not say
    ``weights_only`` is first tried with ``weights_only=True`` and, only if that refuses the
    file, repeated with ``weights_only=False`` (a warning says so). Every other call keeps
    torch's own default. Swaps ``torch.load`` process-wide: use it while loading, before the
    worker serves."""
    paths = {os.path.realpath(p) for p in trusted}
    original = torch.load

    def load(f, *args, **kwargs):
        if ("weights_only" in kwargs or not isinstance(f, (str, os.PathLike))
                or os.path.realpath(f) not in paths):
            return original(f, *args, **kwargs)
        try:
            return original(f, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:
            log.warning("%s is not loadable with weights_only=True (%s); loading it with "
                        "weights_only=False as a trusted LAVIS checkpoint", f,
                        str(exc).splitlines()[-1][:200])
            return original(f, *args, weights_only=False, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


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
    if name != "auto" and engine.resolve_dtype(name, device) != natural:
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
        import lavis_tiny
        return lavis_tiny.registered(), TINY
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


class LavisEngine(engine.BaseEngine):
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
        device = engine.resolve_device(cfg.device)
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


__all__ = ["LavisEngine", "prefetch", "cache_layout", "missing_files", "lavis_checkpoint_paths",
           "trusted_checkpoint_loads", "generate_kwargs", "group_by_prompt", "CacheLayout",
           "HFFile"]
